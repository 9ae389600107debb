"""Every flag and every file either works or says what is wrong in one line (issue 16).

Flags: every numeric flag of every algorithm file, at 0 and at -1, is either refused by the checks
the script runs right after parsing (one-line UserError naming the flag) or accepted, and every
accepted value then trains to a valid results.json in a real run. Data: the arrays are checked
at load. Caches (checksummed files) are rebuilt when damaged. Output problems are one line and leave no
partial file."""

import dataclasses
import errno
import importlib.util
import io
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import typing
from contextlib import redirect_stdout

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
import tyro

import common
from conftest import ROOT, build_dataset, make_buffers, run_script
from tools.pretraining import shrink_flags

ALGORITHMS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "algorithms")) if f.endswith(".py"))
DATASET = "test/hopper/random-v0"


def load_script(name: str):
    """Import algorithms/<name>.py under its own name (tyro reads the Args docstrings from the source)."""
    spec = importlib.util.spec_from_file_location(f"hostile_{name}", os.path.join(ROOT, "algorithms", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def numeric_fields(args_class) -> dict[str, type]:
    """Args fields typed int or float (or Optional of them); bool is not numeric here."""
    fields = {}
    for name, hint in typing.get_type_hints(args_class).items():
        options = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
        if len(options) == 1 and options[0] in (int, float):
            fields[name] = options[0]
    return fields


def help_text(module) -> str:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        tyro.cli(module.Args, args=["--help"])
    assert exit_info.value.code == 0
    return out.getvalue()


def check_stage(module, argv: list[str]):
    """What the script runs between parsing and the first piece of work (see the next test)."""
    args = tyro.cli(module.Args, args=argv)
    common.check_args(args)
    module.check_args(args)
    return args


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_checks_run_right_after_parsing(algorithm):
    with open(os.path.join(ROOT, "algorithms", f"{algorithm}.py")) as f:
        source = f.read()
    assert "    args = tyro.cli(Args)\n    common.check_args(args)\n    check_args(args)\n" in source


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_valid_results(path):
    with open(path) as f:
        results = json.load(f)
    assert results["finished"] and results["evaluations"], results
    assert math.isfinite(results["final_return"])
    return results


# Flags that make a real run of each file take seconds; the hostile values are added after them.
TINY = ["--env", DATASET, "--total-steps", "4", "--eval-every", "4", "--log-every", "2", "--eval-episodes", "1",
        "--batch-size", "16", "--hidden-dim", "16", "--device", "cpu"]
TINY_EXTRA = {
    "brac_plus": ["--epoch-steps", "2", "--kl-states", "32", "--actor-hidden-dim", "16", "--vae-hidden-dim", "16",
                  "--n-samples", "2", "--n-latent", "2", "--n-ensembles", "1"],
    # the paper's sampler (pc), so that --snr is used, with few steps
    "arq": ["--n-support", "2", "--sampler-steps", "2", "--likelihood-steps", "2", "--score-hidden-dim", "16",
            "--score-blocks", "1", "--score-batch-size", "16"],
}


def tiny_flags(algorithm: str) -> dict[str, str]:
    flags = TINY + (shrink_flags(algorithm, 3) if algorithm != "arq" else ["--bc-steps", "3"])
    flags += TINY_EXTRA.get(algorithm, [])
    return dict(zip(flags[::2], flags[1::2]))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_numeric_flag_at_zero_and_below_works_or_is_one_line(algorithm, datasets_path, tmp_path):
    tried, refused, accepted = 0, 0, []
    module = load_script(algorithm)
    fields = numeric_fields(module.Args)
    # the flags a user sees in --help are the numeric fields of Args
    listed = set(re.findall(r"^\s+--([a-z0-9-]+) (?:\{None\}\|)?(?:INT|FLOAT)\b", help_text(module), re.M))
    assert listed == {name.replace("_", "-") for name in fields}, algorithm
    for name, kind in fields.items():
        flag = "--" + name.replace("_", "-")
        for value in (0, -1):
            tried += 1
            text = str(kind(value))
            try:
                args = check_stage(module, [flag, text, "--output-dir", str(tmp_path)])
            except common.UserError as exc:
                refused += 1
                assert "\n" not in str(exc) and flag in str(exc), (algorithm, flag, str(exc))
                continue
            assert getattr(args, name) == kind(value)
            accepted.append((flag, text))

    # every accepted value in a real run: several per run, each flag at most once in a run
    runs, values = [], accepted
    while values:
        batch, rest, seen = [], [], set()
        for flag, text in values:
            (rest if flag in seen else batch).append((flag, text))
            seen.add(flag)
        runs.append(batch)
        values = rest
    for i, values in enumerate(runs):
        flags = {**tiny_flags(algorithm), **dict(values), "--output-dir": str(tmp_path / f"run{i}"),
                 "--run-name": "r"}
        result = run_script([os.path.join(ROOT, "algorithms", f"{algorithm}.py"),
                             *[x for pair in flags.items() for x in pair]], datasets_path)
        if result.returncode == 0:
            assert_valid_results(tmp_path / f"run{i}" / "r" / "results.json")
        else:
            assert_one_line_error(result)
    n_accepted = sum(len(values) for values in runs)
    print(f"\n{tried} hostile values: {refused} refused by the checks, {n_accepted} accepted and trained in "
          f"{len(runs)} real runs")
    assert tried == refused + n_accepted and refused > 0 and n_accepted > 0


def test_not_finite_numbers_and_out_of_range_fractions_are_refused(tmp_path):
    iql = load_script("iql")
    for argv, message in [(["--gamma", "nan"], "--gamma must be a finite number"),
                          (["--lr", "inf"], "--lr must be a finite number"),
                          (["--max-weight", "1e300"], "--max-weight must be a finite number of float32's range"),
                          (["--lr", "-4e38"], "--lr must be a finite number of float32's range"),
                          (["--expectile", "1"], "--expectile must be in (0, 1), got 1.0"),
                          (["--gamma", "1"], "--gamma must be in [0, 1), got 1.0"),
                          (["--tau", "1.5"], "--tau must be in (0, 1], got 1.5"),
                          (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
                          (["--seed", str(2**32)], "--seed must be in [0, 4294967295]")]:
        with pytest.raises(common.UserError, match=re.escape(message)):
            check_stage(iql, [*argv, "--output-dir", str(tmp_path)])
    check_stage(iql, ["--expectile", "0.9", "--gamma", "0", "--tau", "1", "--max-weight", "3e38",
                      "--output-dir", str(tmp_path)])
    arq = load_script("arq")
    with pytest.raises(common.UserError, match=re.escape("--beta-max must be at least --beta-min (0.1)")):
        check_stage(arq, ["--beta-max", "0.05", "--output-dir", str(tmp_path)])


# The issue's table: TD3+BC on a local dataset
@pytest.mark.parametrize("argv, message", [
    (["--eval-every", "0"], "--eval-every must be at least 1, got 0"),
    (["--eval-episodes", "0"], "--eval-episodes must be at least 1, got 0"),
    (["--total-steps", "-5"], "--total-steps must be at least 1, got -5"),
    (["--total-steps", "0"], "--total-steps must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--batch-size", "100000000"], "--batch-size 100000000 is larger than the dataset 'test/hopper/random-v0'"),
])
def test_the_issue_s_hostile_flags_are_one_line_each(argv, message, datasets_path, tmp_path):
    result = run_script([os.path.join(ROOT, "algorithms", "td3_bc.py"), "--env", DATASET, "--total-steps", "4",
                         "--batch-size", "16", *argv, "--output-dir", str(tmp_path)], datasets_path)
    assert_one_line_error(result, message)
    assert not os.listdir(tmp_path), "refused before the run folder is made"


def test_a_batch_may_be_as_large_as_the_dataset_and_no_larger(datasets_path, tmp_path):
    data = common.load_dataset(DATASET)
    arq = load_script("arq")
    args = arq.Args(env=DATASET, batch_size=len(data), score_batch_size=len(data), output_dir=str(tmp_path),
                    run_name="fits")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        common.Run(args, "arq", data).close()  # Run installs signal handlers: pytest's come back below
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    for field in ("batch_size", "score_batch_size"):
        too_large = dataclasses.replace(args, run_name=field, **{field: len(data) + 1})
        flag = "--" + field.replace("_", "-")
        with pytest.raises(common.UserError, match=f"{flag} {len(data) + 1} is larger than the dataset .*"
                                                   f"use at most {len(data)}") as exc_info:
            common.Run(too_large, "arq", data)
        assert "\n" not in str(exc_info.value)
        assert not os.path.exists(tmp_path / field), "refused before the run folder is made"


# ----------------------------------------------------------------------------------------------
# Data, checked once at load, whatever the source
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def own_datasets(tmp_path, monkeypatch):
    """A MINARI_DATASETS_PATH of this test's own, to damage freely."""
    path = tmp_path / "minari"
    path.mkdir()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(path))
    return path


def hopper_buffers(n=4, seed=1):
    env = gym.make("Hopper-v5", max_episode_steps=30)
    return env, make_buffers(env, n, seed)


def test_values_that_are_not_finite_are_refused_saying_where(own_datasets):
    env, buffers = hopper_buffers()
    buffers[1].rewards[3] = np.nan
    buffers[2].observations[0][4] = np.inf
    buffers[2].observations[2][4] = np.nan
    minari.create_dataset_from_buffers("test/hopper/nan-v0", buffers, env=env)
    with pytest.raises(common.UserError) as exc_info:
        common.load_dataset("test/hopper/nan-v0")
    message = str(exc_info.value)
    assert "\n" not in message and "not finite (NaN or inf)" in message
    assert "2 rows of observations, the first in episode 2" in message  # the first field found


def empty_episodes(dataset_id, episodes):
    """Make the named episodes of a built dataset zero steps long, as a file written elsewhere may hold
    them (Minari's own HDF5 writer refuses them): the reset observation alone."""
    import h5py

    with h5py.File(data_file(dataset_id), "r+") as f:
        for e in episodes:
            group = f[f"episode_{e}"]
            for k in [k for k in group if isinstance(group[k], h5py.Dataset)]:
                kept = group[k][:1] if k == "observations" else group[k][:0]
                del group[k]
                group.create_dataset(k, data=kept)


def test_episodes_of_length_zero_are_dropped_with_a_notice(own_datasets, capsys):
    env, buffers = hopper_buffers()
    minari.create_dataset_from_buffers("test/hopper/empty-v0", buffers, env=env)
    empty_episodes("test/hopper/empty-v0", (1, 3))
    data = common.load_dataset("test/hopper/empty-v0")
    notices = [line for line in capsys.readouterr().out.splitlines() if "length zero" in line]
    assert notices == ["dataset 'test/hopper/empty-v0': dropped 2 episode(s) of length zero (episode 1, 3)"]
    assert data.episode_lengths.tolist() == [len(buffers[0].rewards), len(buffers[2].rewards)]
    first = len(buffers[0].rewards)  # the rows of episode 2 follow those of episode 0
    torch.testing.assert_close(data.observations[first], torch.as_tensor(buffers[2].observations[0]).float())
    torch.testing.assert_close(data.next_observations[first - 1],
                               torch.as_tensor(buffers[0].observations[-1]).float())
    minari.create_dataset_from_buffers("test/hopper/all-empty-v0", buffers[:1], env=env)
    empty_episodes("test/hopper/all-empty-v0", (0,))
    with pytest.raises(common.UserError, match="contains no transitions"):
        common.load_dataset("test/hopper/all-empty-v0")


def test_actions_beyond_the_bounds_are_clipped_with_a_notice(own_datasets, capsys):
    env, buffers = hopper_buffers()
    buffers[1].actions[2][0] = 1.5  # Hopper's actions are in [-1, 1]
    buffers[3].actions[0][1] = -1.25
    buffers[0].actions[0][2] = 1.0 + 1e-5  # float rounding: silently clipped
    minari.create_dataset_from_buffers("test/hopper/wide-v0", buffers, env=env)
    data = common.load_dataset("test/hopper/wide-v0")
    notices = [line for line in capsys.readouterr().out.splitlines() if "outside" in line]
    assert len(notices) == 1
    assert f"2 of {len(data)} actions lie outside the action space's bounds, by up to 0.5" in notices[0]
    assert "clipped" in notices[0]
    assert data.actions.abs().max().item() == 1.0


# ----------------------------------------------------------------------------------------------
# Damaged dataset files and caches
# ----------------------------------------------------------------------------------------------
def truncate(path, keep=0.5):
    with open(path, "rb") as f:
        payload = f.read()
    with open(path, "wb") as f:
        f.write(payload[:int(len(payload) * keep)])


def data_file(dataset_id):
    return os.path.join(os.environ["MINARI_DATASETS_PATH"], dataset_id, "data", "main_data.hdf5")


DAMAGED = ("it is damaged: delete ", "and build or download it again")  # its folder, named


def test_a_damaged_data_file_names_the_dataset_and_the_way_to_replace_it(own_datasets):
    build_dataset(DATASET, "Hopper-v5", n_episodes=3, max_steps=20)
    truncate(data_file(DATASET))
    with pytest.raises(common.UserError) as exc_info:
        common.load_dataset(DATASET)
    message = str(exc_info.value)
    assert "\n" not in message and f"dataset '{DATASET}' could not be read (OSError" in message
    assert all(part in message for part in DAMAGED)


def test_a_damaged_local_dataset_says_to_delete_its_folder(own_datasets):
    dataset_id = "local/hopper/random-v0"
    build_dataset(dataset_id, "Hopper-v5", n_episodes=3, max_steps=20)  # stands in for the built one
    truncate(data_file(dataset_id))
    with pytest.raises(common.UserError, match=re.escape(f"dataset '{dataset_id}' could not be read")) as exc_info:
        common.load_dataset(dataset_id)  # not built again over the damaged copy: the user deletes it
    assert "\n" not in str(exc_info.value) and all(part in str(exc_info.value) for part in DAMAGED)


def test_damaged_metadata_is_named_not_reported_as_an_unknown_id(own_datasets):
    build_dataset(DATASET, "Hopper-v5", n_episodes=3, max_steps=20)
    metadata = os.path.join(os.environ["MINARI_DATASETS_PATH"], DATASET, "data", "metadata.json")
    truncate(metadata)
    with pytest.raises(common.UserError, match=re.escape(f"dataset '{DATASET}' could not be read (JSONDecodeError")) \
            as exc_info:
        common.load_dataset(DATASET)
    message = str(exc_info.value)
    assert "\n" not in message and all(part in message for part in DAMAGED) and "minari download" not in message


def test_a_damaged_d4rl_file_names_the_file_and_where_to_download_it(tmp_path, monkeypatch):
    import h5py

    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    path = tmp_path / "hopper_medium_replay-v2.hdf5"
    with h5py.File(path, "w") as f:
        for key, shape in (("observations", (50, 11)), ("actions", (50, 3)), ("rewards", (50,)),
                           ("terminals", (50,))):
            f[key] = np.zeros(shape, dtype=np.float32)
    truncate(path)
    with pytest.raises(common.UserError) as exc_info:
        common.load_dataset("d4rl/hopper-medium-replay-v2")
    message = str(exc_info.value)
    assert "\n" not in message and f"{path} is not a whole D4RL file (OSError" in message
    assert ("download it again from http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/"
            "hopper_medium_replay-v2.hdf5") in message


def test_the_issue_s_damaged_files_in_a_real_run(own_datasets, tmp_path):
    build_dataset(DATASET, "Hopper-v5", n_episodes=6, max_steps=40)
    argv = [os.path.join(ROOT, "algorithms", "td3_bc.py"), "--env", DATASET, "--total-steps", "4",
            "--eval-episodes", "1", "--batch-size", "16", "--output-dir", str(tmp_path / "runs")]
    first = run_script([*argv, "--run-name", "first"], str(own_datasets))
    assert first.returncode == 0, first.stderr[-3000:]
    assert_valid_results(tmp_path / "runs" / "first" / "results.json")
    truncate(data_file(DATASET))
    third = run_script([*argv, "--run-name", "third"], str(own_datasets))
    assert_one_line_error(third, f"dataset '{DATASET}' could not be read (OSError", *DAMAGED)
    assert not os.path.exists(tmp_path / "runs" / "third"), "refused before the run folder is made"


def test_a_cache_that_does_not_fit_leaves_the_modules_as_they_were(tmp_path, capsys):
    torch.manual_seed(0)
    fits, misfit = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in fits.state_dict().items()}
    path = str(tmp_path / "cache.pt")
    common.save_file(path, {"a": torch.nn.Linear(3, 2).state_dict(), "b": torch.nn.Linear(4, 2).state_dict()})
    assert not common.load_pretrained(path, {"a": fits, "b": misfit}, torch.device("cpu"))
    for k, v in fits.state_dict().items():  # "a" fitted, but training again must start from its own weights
        torch.testing.assert_close(v, before[k])
    assert f"cache {path} does not fit" in capsys.readouterr().out


def test_a_cache_that_is_damaged_or_not_ours_is_a_miss_with_a_notice(tmp_path, capsys):
    path = str(tmp_path / "cache.pt")
    module = torch.nn.Linear(3, 2)
    common.save_pretrained(path, {"a": module})
    assert common.load_pretrained(path, {"a": torch.nn.Linear(3, 2)}, torch.device("cpu"))
    torch.save({"a": module.state_dict()}, path)  # no checksum: not a file of this library
    assert common.load_cache(path, "cpu") is None
    assert f"{path} is not a file of this library" in capsys.readouterr().out
    truncate(path)
    assert not common.load_pretrained(path, {"a": torch.nn.Linear(3, 2)}, torch.device("cpu"))
    assert f"{path} cannot be read as weights only" in capsys.readouterr().out


def test_arq_rebuilds_a_damaged_score_model_or_support_cache(datasets_path, tmp_path):
    argv = [os.path.join(ROOT, "algorithms", "arq.py"),
            *[x for pair in tiny_flags("arq").items() for x in pair], "--output-dir", str(tmp_path)]
    first = run_script([*argv, "--run-name", "first"], datasets_path)
    assert first.returncode == 0, first.stderr[-3000:]
    cache = tmp_path / "arq_support_cache"
    (score,) = cache.glob("score_*.pt")
    (support,) = cache.glob("support_*.pt")
    reference = assert_valid_results(tmp_path / "first" / "results.json")["final_return"]

    common.save_file(str(support), {"samples": torch.zeros(3, 2, 3), "log_likelihoods": torch.zeros(3, 2)})  # foreign
    second = run_script([*argv, "--run-name", "second"], datasets_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"reusing the cached pretrained model {score}" in second.stdout
    assert f"cache {support} is unreadable or does not fit (ValueError)" in second.stdout
    assert assert_valid_results(tmp_path / "second" / "results.json")["final_return"] == reference

    truncate(score)
    third = run_script([*argv, "--run-name", "third"], datasets_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"cache: {score} cannot be read as weights only" in third.stdout and "score model step" in third.stdout
    assert assert_valid_results(tmp_path / "third" / "results.json")["final_return"] == reference


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def test_an_output_dir_that_cannot_be_a_folder_is_one_line_before_any_work(datasets_path, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_script([os.path.join(ROOT, "algorithms", "bc.py"), "--env", DATASET, "--batch-size", "16",
                         "--output-dir", str(blocker / "runs")], datasets_path)
    assert_one_line_error(result, f"--output-dir {blocker / 'runs'} cannot be a folder written here: {blocker} is a file")


def test_an_output_dir_without_write_permission_is_one_line(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root may write anywhere: the folder is read-only as os.access says
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and os.path.abspath(p) != str(locked))
    with pytest.raises(common.UserError, match=re.escape(f"cannot be a folder written here: {locked} is not writable")):
        common.check_output_dir(str(locked / "runs"))


def test_a_failed_write_keeps_the_old_file_leaves_no_temporary_and_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    common.write_json(str(path), {"a": 1})

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(common.UserError) as exc_info:
        common.write_json(str(path), {"a": 2})
    assert str(exc_info.value) == f"could not write {path}: No space left on device"
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["results.json"]


@pytest.mark.parametrize("limit, failing", [(64 * 1024, "checkpoint.pt"), (3000, "events")])
def test_a_run_that_hits_the_file_size_limit_stops_with_one_line_and_no_partial_file(limit, failing, datasets_path,
                                                                                     tmp_path):
    """A real write failure from the OS: RLIMIT_FSIZE makes writes past the limit fail with EFBIG (Python
    ignores SIGXFSZ), as a full disk fails them with ENOSPC. At 64 KiB results.json is written and the
    checkpoint is not (our own atomic write); at 3000 bytes tensorboard's event file fails first (in its
    writer thread, raised again in the main thread at the next scalar)."""

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "runs"
    env = {**os.environ, "MINARI_DATASETS_PATH": datasets_path, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "algorithms", "td3_bc.py"), "--env", DATASET,
                             "--total-steps", "200", "--eval-every", "100", "--log-every", "1", "--eval-episodes", "1",
                             "--batch-size", "16", "--save-model", "--output-dir", str(out), "--run-name", "r"],
                            env=env, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    if failing == "checkpoint.pt":
        assert_one_line_error(result, f"could not write {out / 'r' / 'checkpoint.pt'}: File too large")
    else:
        assert_one_line_error(result, f"could not write in {out / 'r'}: File too large")
    names = os.listdir(out / "r")
    assert "checkpoint.pt" not in names and "model.pt" not in names
    assert not [n for n in names if n.startswith(".tmp-")], names
    if "results.json" in names:  # whole, from the last evaluation before the failure
        results = json.loads((out / "r" / "results.json").read_text())
        assert not results["finished"] and len(results["evaluations"]) == 1
    assert ("results.json" in names) == (failing == "checkpoint.pt")
