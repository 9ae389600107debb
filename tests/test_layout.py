"""The card's layout: an algorithm file and common.py are all a run needs. Copied alone into an
empty folder they train, evaluate, resume and answer --help; common.py is small and imports
nothing of the repository, and the algorithm files import nothing else of it."""

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_script

ALGORITHMS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "algorithms")) if f.endswith(".py"))
REPOSITORY = {"common", "algorithms", "tools", "tests", "offline_data", "run_folder", "speed", "conftest",
              "make_dataset", *ALGORITHMS}
# Behaviour models, pretraining phases and ARQ's support, made seconds long.
SMALL = {"fisher_brc": ["--bc-steps", "20"], "itrpo": ["--bc-steps", "20"],
         "brac_plus": ["--bc-steps", "20", "--pretrain-steps", "20"], "cql": ["--bc-warmup-steps", "10"],
         "arq": ["--bc-steps", "20", "--score-batch-size", "32", "--n-support", "2", "--sampler", "ode", "--sampler-steps", "2",
                 "--likelihood-steps", "2"]}


def imports(path: str) -> set[str]:
    """The top-level names of every module a file imports, wherever the import statement is."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_the_top_level_is_the_cards():
    ignored = {"__pycache__", "runs", "results", "MUJOCO_LOG.TXT"}  # .gitignore's
    entries = {e for e in os.listdir(ROOT) if not e.startswith(".")} - ignored
    assert entries == {"algorithms", "common.py", "requirements.txt", "benchmark.sh", "tests", "README.md",
                       "docs", "tools", "benchmarks"}, entries


def test_common_imports_nothing_of_the_repository_but_the_builder_on_demand():
    path = os.path.join(ROOT, "common.py")
    assert imports(path) & REPOSITORY == {"make_dataset"}, imports(path) & REPOSITORY  # local/* builds


def test_common_lines_are_at_most_100_characters():
    with open(os.path.join(ROOT, "common.py")) as f:
        wide = [i for i, line in enumerate(f, 1) if len(line.rstrip("\n")) > 100]
    assert not wide, f"common.py lines over 100 characters: {wide}"


def test_the_algorithm_files_import_only_common_from_the_repository():
    for name in ALGORITHMS:
        assert imports(os.path.join(ROOT, "algorithms", f"{name}.py")) & REPOSITORY == {"common"}, name


def copied(tmp_path, name: str) -> str:
    folder = tmp_path / f"project_{name}"
    folder.mkdir()
    shutil.copy(os.path.join(ROOT, "algorithms", f"{name}.py"), folder)
    shutil.copy(os.path.join(ROOT, "common.py"), folder)
    return str(folder)


def outside(args, datasets_path, cwd, timeout=600):
    """A run in the copied folder with nothing of the repository on the path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MINARI_DATASETS_PATH=datasets_path, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_a_copied_file_and_common_train_evaluate_and_resume_alone(datasets_path, tmp_path, name):
    folder = copied(tmp_path, name)
    assert sorted(os.listdir(folder)) == sorted([f"{name}.py", "common.py"])
    help_ = outside([f"{name}.py", "--help"], datasets_path, folder)
    assert help_.returncode == 0 and "--env" in help_.stdout, help_.stderr[-2000:]
    flags = [f"{name}.py", "--env", "test/hopper/random-v0", "--total-steps", "40", "--eval-every", "10",
             "--eval-episodes", "2", "--batch-size", "32", "--output-dir", "runs", *SMALL.get(name, [])]
    whole = outside([*flags, "--run-name", "whole"], datasets_path, folder)
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-3000:]
    # the same run, killed after its second evaluation and started again by the same command; a run
    # that finished between two looks at its results.json was not killed: again, in a fresh folder
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MINARI_DATASETS_PATH=datasets_path, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    killed = os.path.join(folder, "runs", "killed")
    for _ in range(5):
        shutil.rmtree(killed, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, *flags, "--run-name", "killed"], cwd=folder, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            try:
                with open(os.path.join(killed, "results.json")) as f:
                    if len(json.load(f)["evaluations"]) >= 2:
                        proc.send_signal(signal.SIGKILL)
                        break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        proc.communicate(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            break
    assert proc.returncode == -signal.SIGKILL, "the run finished five times before it could be killed"
    again = outside([*flags, "--run-name", "killed"], datasets_path, folder)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert f"[{name}] resuming from step" in again.stdout, again.stdout[-2000:]
    runs = {}
    for run in ("whole", "killed"):
        with open(os.path.join(folder, "runs", run, "results.json")) as f:
            runs[run] = json.load(f)
    assert runs["killed"]["finished"] and [e["return_mean"] for e in runs["killed"]["evaluations"]] == \
        [e["return_mean"] for e in runs["whole"]["evaluations"]]
    assert len(runs["whole"]["evaluations"]) == 4


def test_a_local_id_that_is_not_built_tells_a_copied_file_how_to_build_it(datasets_path, tmp_path):
    folder = copied(tmp_path, "bc")
    result = outside(["bc.py", "--env", "local/hopper/medium-3k-v0"], datasets_path, folder)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "make_dataset.py --id local/hopper/medium-3k-v0" in result.stderr.strip().splitlines()[-1]


def test_the_repository_runs_the_files_from_anywhere(datasets_path, tmp_path):
    result = run_script([os.path.join(ROOT, "algorithms", "bc.py"), "--help"], datasets_path, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
