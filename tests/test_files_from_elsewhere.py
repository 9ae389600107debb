"""Files a user is handed (a colleague's run folder, a released model.pt, a cached behaviour model):
no pickle in them runs code, damage is found and reported in one line, and what a killed run left
behind is cleaned up."""

import dataclasses
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import common
from conftest import ROOT
from test_resume import command, environment, evaluations, run, start_and_interrupt


class RunsCode:
    """Unpickling this creates `path`: a stand-in for a pickle that runs a command."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


def plant(path, marker):
    torch.save({"step": 1, "payload": RunsCode(marker)}, path)


def test_a_pickle_that_runs_code_is_refused_as_a_checkpoint_a_cache_and_a_model(datasets_path, tmp_path):
    marker = tmp_path / "code_ran"
    # a run folder holding it as checkpoint.pt: the run starts over, the code never runs
    folder = tmp_path / "runs" / "r"
    folder.mkdir(parents=True)
    plant(folder / "checkpoint.pt", marker)
    result = run(command("td3_bc", tmp_path / "runs", "r", ["--total-steps", "300"]), datasets_path)
    assert result.returncode == 0 and "cannot be read as weights only" in result.stdout, result.stderr[-2000:]
    assert "resuming" not in result.stdout and not marker.exists()
    # as a cache: a miss with a notice
    cache = tmp_path / "cache.pt"
    plant(cache, marker)
    assert common.load_cache(str(cache), "cpu") is None and not marker.exists()
    # as a model.pt given to tools/evaluate.py: one line
    plant(tmp_path / "model.pt", marker)
    evaluated = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), str(tmp_path / "model.pt")],
                               env=environment(datasets_path), capture_output=True, text=True, timeout=300)
    lines = evaluated.stderr.strip().splitlines()
    assert evaluated.returncode == 1 and len(lines) == 1 and "weights only" in lines[0], evaluated.stderr
    assert not marker.exists()


def test_bytes_damaged_in_the_middle_of_a_checkpoint_are_found_and_the_previous_one_is_used(datasets_path,
                                                                                            tmp_path):
    out = tmp_path / "runs"
    cmd = command("td3_bc", out, "whole")
    assert run(cmd, datasets_path).returncode == 0
    _, expected = evaluations(out, "whole")
    cmd = command("td3_bc", out, "damaged")
    start_and_interrupt(cmd, datasets_path, out / "damaged", evaluations_before=2)
    path = out / "damaged" / "checkpoint.pt"
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))
    again = run(cmd, datasets_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "checkpoint.pt" in again.stdout and "trying the previous one" in again.stdout
    assert evaluations(out, "damaged")[1] == expected


def test_a_flipped_byte_in_a_saved_file_is_found(tmp_path):
    path = tmp_path / "model.pt"
    common.save_file(str(path), {"w": torch.arange(1000.0), "args": {"lr": 3e-4}})
    raw = bytearray(path.read_bytes())
    weights = bytes(torch.arange(1000.0).numpy().tobytes())
    at = bytes(raw).index(weights[400:440])
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(common.UserError, match="damaged: its contents do not match their checksum"):
        common.load_file(str(path))


class Agent:
    def __init__(self):
        self.actor = torch.nn.Linear(2, 2)
        self.total_it = 0


@dataclasses.dataclass
class Args:
    env: str = "test/hopper/random-v0"
    seed: int = 0
    output_dir: str = ""
    run_name: str = "r"
    resume: str = "auto"
    track: bool = False
    eval_every: int = 10
    eval_episodes: int = 1
    total_steps: int = 10
    batch_size: int = 16
    capture_video: bool = False
    save_model: bool = False
    lr: float = 3e-4


@pytest.mark.parametrize("content", ["[1, 2]", "null", '"x"', "3", "{"])
def test_a_results_json_of_another_shape_is_no_finished_run(datasets_path, tmp_path, monkeypatch, content):
    monkeypatch.setenv("MINARI_DATASETS_PATH", datasets_path)
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "results.json").write_text(content)
    run_ = common.Run(Args(output_dir=str(tmp_path)), "fake", common.load_dataset(Args.env))
    run_.close()
    run_.lock.close()


def test_a_finished_run_started_with_other_flags_is_refused_naming_them(datasets_path, tmp_path):
    out = tmp_path / "runs"
    assert run(command("td3_bc", out, "r", ["--total-steps", "300"]), datasets_path).returncode == 0
    other = run(command("td3_bc", out, "r", ["--total-steps", "300", "--lr", "0.001"]), datasets_path)
    lines = other.stderr.strip().splitlines()
    assert other.returncode == 1 and len(lines) == 1 and "--lr 0.0003 (now 0.001)" in lines[0], other.stderr
    iql = [sys.executable, os.path.join(ROOT, "algorithms", "iql.py"), "--env", "test/hopper/random-v0",
           "--output-dir", str(out), "--run-name", "r", "--total-steps", "300", "--batch-size", "64"]
    another = run(iql, datasets_path)
    assert another.returncode == 1 and "was written with other flags" in another.stderr, another.stderr
    same = run(command("td3_bc", out, "r", ["--total-steps", "300"]), datasets_path)
    assert same.returncode == 0 and "nothing to do" in same.stdout


def test_what_a_killed_run_left_is_cleaned_at_its_next_start(datasets_path, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", datasets_path)
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / ".tmp-abc123checkpoint.pt").write_bytes(b"half a checkpoint")
    run_ = common.Run(Args(output_dir=str(tmp_path)), "fake", common.load_dataset(Args.env))
    assert not (folder / ".tmp-abc123checkpoint.pt").exists()
    run_.checkpoint(10, Agent())
    run_.finish()
    run_.lock.close()
    # killed between the final results.json and the checkpoints' removal
    common.save_file(str(folder / "checkpoint.pt"), {"step": 10})
    with pytest.raises(SystemExit):
        common.Run(Args(output_dir=str(tmp_path)), "fake", common.load_dataset(Args.env))
    assert not (folder / "checkpoint.pt").exists()


def test_weights_that_are_not_finite_are_never_checkpointed(datasets_path, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", datasets_path)
    run_ = common.Run(Args(output_dir=str(tmp_path)), "fake", common.load_dataset(Args.env))
    agent = Agent()
    run_.checkpoint(10, agent)
    good = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        agent.actor.weight[0, 0] = float("nan")
    with pytest.raises(common.UserError, match="at step 20: training diverged"):
        run_.checkpoint(20, agent)
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == good
    run_.close()
    run_.lock.close()


@pytest.mark.parametrize("name", ["../x", "/tmp/x", "a/b", ".."])
def test_a_run_name_is_one_folder_name(datasets_path, tmp_path, name):
    result = run(command("td3_bc", tmp_path / "runs", name), datasets_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "--run-name" in lines[0], result.stderr
    assert not (tmp_path / "x").exists()


def test_a_d4rl_file_declaring_a_billion_rows_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    with h5py.File(tmp_path / "hopper_medium_replay-v2.hdf5", "w") as f:
        for key, width in (("observations", 11), ("actions", 3), ("next_observations", 11)):
            f.create_dataset(key, shape=(10**9, width), dtype="f4", chunks=(1000, width))
        for key in ("rewards", "terminals", "timeouts"):
            f.create_dataset(key, shape=(10**9,), dtype="f4", chunks=(1000,))
    assert os.path.getsize(tmp_path / "hopper_medium_replay-v2.hdf5") < 100_000
    with pytest.raises(common.UserError, match="is not a whole D4RL file"):
        common.load_dataset("d4rl/hopper-medium-replay-v2")
