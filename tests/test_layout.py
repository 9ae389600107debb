"""The import graph: algorithms -> common -> run_folder, speed -> offline_data, and tools -> common / offline_data.

Every import statement counts, wherever it is (imports inside functions run when the function does)."""

import ast
import os

import pytest

from conftest import ROOT

PACKAGE = "offline_data"


def python_files(folder: str) -> list[str]:
    path = os.path.join(ROOT, folder)
    return sorted(os.path.join(folder, f) for f in os.listdir(path) if f.endswith(".py")) if os.path.isdir(path) else []


def module_name(path: str) -> str:
    """'offline_data/recipe.py' -> 'offline_data.recipe', 'offline_data/__init__.py' -> 'offline_data'."""
    name = path[:-3].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def imports(path: str) -> set[str]:
    """The modules a file imports, as absolute dotted names (`from a import b` counts as a and a.b)."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read(), path)
    package = module_name(path) if path.endswith("__init__.py") else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package, one level up per extra dot
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def within(names: set[str], *tops: str) -> set[str]:
    return {name for name in names if name.split(".")[0] in tops}


LIBRARY = python_files(PACKAGE)
TOOLS = python_files("tools")
ALGORITHMS = python_files("algorithms")


def test_the_moved_files_are_gone():
    assert LIBRARY, f"no {PACKAGE}/ package"
    for name in ("basics.py", "d4rl_files.py"):
        assert not os.path.exists(os.path.join(ROOT, name)), f"{name} is still at the repository root"
    for path in ["common.py", *LIBRARY, *TOOLS, *ALGORITHMS]:
        assert not within(imports(path), "basics", "d4rl_files"), path


def test_the_data_layer_imports_neither_common_nor_the_run_folder_nor_tools_nor_algorithms():
    for path in LIBRARY:
        assert not within(imports(path), "common", "run_folder", "speed", "tools", "algorithms"), path


def test_common_imports_neither_tools_nor_algorithms():
    assert not within(imports("common.py"), "tools", "algorithms")


@pytest.mark.parametrize("path", ["run_folder.py", "speed.py"])
def test_the_run_folder_and_the_speed_layer_import_only_the_data_layer_from_the_repository(path):
    repository = within(imports(path), "common", "run_folder", "speed", "tools", "algorithms", PACKAGE)
    assert {name.split(".")[0] for name in repository} == {PACKAGE}


def test_the_algorithm_files_import_only_common_from_the_repository():
    for path in ALGORITHMS:
        repository = within(imports(path), "common", PACKAGE, "tools", "algorithms", "basics", "d4rl_files")
        assert repository == {"common"}, path


def test_the_library_loads_no_module_by_path_or_by_name():
    """importlib and __import__ would hide an import from the checks above."""
    for path in ["common.py", "run_folder.py", "speed.py", *LIBRARY]:
        with open(os.path.join(ROOT, path)) as f:
            tree = ast.parse(f.read(), path)
        assert not within(imports(path), "importlib"), path
        calls = [node.func.id for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
        assert "__import__" not in calls, path


def test_the_data_layer_modules_import_each_other_in_one_direction():
    graph = {module_name(path): within(imports(path), PACKAGE) for path in LIBRARY}
    # `from offline_data import d4rl` names offline_data.d4rl; the package itself is its __init__
    graph = {module: {name for name in names if name in graph} - {module} for module, names in graph.items()}

    def cycle_from(module, path):
        if module in path:
            return path[path.index(module):] + [module]
        for imported in sorted(graph[module]):
            if imported == PACKAGE:  # every submodule's import runs __init__ first: not an edge back
                continue
            found = cycle_from(imported, path + [module])
            if found:
                return found
        return None

    for module in graph:
        cycle = cycle_from(module, [])
        assert cycle is None, " -> ".join(cycle)
