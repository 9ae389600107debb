"""Runs that are killed resume to the same result: checkpoints at every evaluation and on SIGTERM,
the previous checkpoint when the last one is damaged, and refusals that say what differs."""

import json
import os
import socket
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

FLAGS = {
    "td3_bc": ["--total-steps", "1500", "--eval-every", "150", "--batch-size", "64"],
    "brac_plus": ["--total-steps", "300", "--eval-every", "30", "--bc-steps", "20", "--pretrain-steps", "20",
                  "--epoch-steps", "25", "--kl-states", "64", "--batch-size", "16", "--hidden-dim", "32",
                  "--actor-hidden-dim", "32", "--vae-hidden-dim", "32", "--n-samples", "2", "--n-latent", "2"],
}


def command(algorithm: str, out, name: str, extra=()):
    return [sys.executable, os.path.join(ROOT, "algorithms", f"{algorithm}.py"), "--env", "test/hopper/random-v0",
            "--eval-episodes", "1", "--device", "cpu", "--output-dir", str(out), "--run-name", name,
            *FLAGS[algorithm], *extra]


def environment(datasets_path):
    return {**os.environ, "MINARI_DATASETS_PATH": datasets_path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(cmd, datasets_path):
    return subprocess.run(cmd, env=environment(datasets_path), capture_output=True, text=True, timeout=600)


def evaluations(out, name):
    with open(os.path.join(out, name, "results.json")) as f:
        results = json.load(f)
    return results, [(e["step"], e["return_mean"]) for e in results["evaluations"]]


def run_args(tmp_path, **overrides):
    """The flags common.Run reads, for a run folder <tmp_path>/r driven by the test itself."""
    import dataclasses

    @dataclasses.dataclass
    class Args:
        env: str = "test/hopper/random-v0"
        seed: int = 0
        output_dir: str = str(tmp_path)
        run_name: str = "r"
        resume: str = "auto"
        track: bool = False
        eval_every: int = 50
        batch_size: int = 16
        total_steps: int = 100

    return Args(**overrides)


def start_and_interrupt(cmd, datasets_path, folder, evaluations_before: int, sig=signal.SIGKILL):
    """Start a run and send `sig` once its checkpoint is written after `evaluations_before` evaluations."""
    proc = subprocess.Popen(cmd, env=environment(datasets_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    results = os.path.join(folder, "results.json")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            with open(results) as f:
                done = len(json.load(f)["evaluations"])
        except (OSError, ValueError):
            done = 0
        checkpoints = [n for n in ("checkpoint.pt", "checkpoint.prev.pt") if os.path.exists(os.path.join(folder, n))]
        if done >= evaluations_before and len(checkpoints) >= min(evaluations_before, 2):
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the run finished before it could be interrupted: make it longer"
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def uninterrupted(datasets_path, tmp_path_factory):
    """algorithm -> the evaluations of its run from start to end, made once for this module's tests."""
    out, made = tmp_path_factory.mktemp("uninterrupted"), {}

    def get(algorithm: str):
        if algorithm not in made:
            whole = run(command(algorithm, out, algorithm), datasets_path)
            assert whole.returncode == 0, whole.stderr[-2000:]
            made[algorithm] = evaluations(out, algorithm)[1]
        return made[algorithm]

    return get


@pytest.mark.parametrize("algorithm", ["td3_bc", "brac_plus"])
def test_a_killed_run_resumes_to_the_same_evaluations(algorithm, datasets_path, tmp_path, uninterrupted):
    out = tmp_path / "runs"
    expected = uninterrupted(algorithm)

    cmd = command(algorithm, out, "killed")
    start_and_interrupt(cmd, datasets_path, out / "killed", evaluations_before=1)
    partial, _ = evaluations(out, "killed")
    assert not partial["finished"] and partial["train_seconds"] > 0  # the training time so far
    again = run(cmd, datasets_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from step" in again.stdout
    results, got = evaluations(out, "killed")
    assert results["finished"] and got == expected
    assert results["train_seconds"] > partial["train_seconds"]  # both processes' training time
    assert not os.path.exists(out / "killed" / "checkpoint.pt")  # a finished run keeps no checkpoint

    # a finished run is not run again
    once_more = run(cmd, datasets_path)
    assert once_more.returncode == 0 and "nothing to do" in once_more.stdout


def test_sigterm_writes_a_checkpoint_and_the_run_continues_from_it(datasets_path, tmp_path, uninterrupted):
    out = tmp_path / "runs"
    expected = uninterrupted("td3_bc")
    cmd = command("td3_bc", out, "stopped")
    code, stdout, stderr = start_and_interrupt(cmd, datasets_path, out / "stopped", 1, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM" in stdout and "Traceback" not in stderr
    again = run(cmd, datasets_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert evaluations(out, "stopped")[1] == expected


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(datasets_path, tmp_path, uninterrupted):
    out = tmp_path / "runs"
    expected = uninterrupted("td3_bc")
    cmd = command("td3_bc", out, "damaged")
    start_and_interrupt(cmd, datasets_path, out / "damaged", evaluations_before=2)
    latest = out / "damaged" / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    again = run(cmd, datasets_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "checkpoint.pt cannot be read" in again.stdout and "trying the previous one" in again.stdout
    assert "resuming from step" in again.stdout and "checkpoint.prev.pt" in again.stdout
    assert evaluations(out, "damaged")[1] == expected


def test_a_checkpoint_from_other_flags_is_refused_naming_them(datasets_path, tmp_path):
    out = tmp_path / "runs"
    cmd = command("td3_bc", out, "r")
    start_and_interrupt(cmd, datasets_path, out / "r", evaluations_before=1)
    other = run(cmd + ["--lr", "0.001", "--alpha", "3.0", "--precision", "bf16"], datasets_path)
    assert other.returncode != 0
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and "--lr 0.0003 (now 0.001)" in lines[0] and "--alpha 2.5 (now 3.0)" in lines[0]
    assert "--precision fp32 (now bf16)" in lines[0]
    # a checkpoint written before a flag existed resumes when the flag is at its default, and one
    # written with a flag since dropped resumes too
    import common
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        path = out / "r" / name
        if path.exists():
            saved = common.load_file(str(path))
            del saved["args"]["precision"]
            saved["args"]["retired_flag"] = 3  # and one written with a flag the file no longer has
            common.save_file(str(path), saved)
    assert "--precision fp32 (now bf16)" in run(cmd + ["--precision", "bf16"], datasets_path).stderr
    resumed = run(cmd, datasets_path)
    assert resumed.returncode == 0 and "resuming from step" in resumed.stdout, resumed.stderr[-2000:]
    # --resume never starts over with the new flags
    fresh = run(cmd + ["--lr", "0.001", "--resume", "never", "--total-steps", "300"], datasets_path)
    assert fresh.returncode == 0 and "resuming" not in fresh.stdout, fresh.stderr[-2000:]


def test_a_run_started_over_replaces_the_last_runs_results_before_its_first_evaluation(datasets_path, tmp_path):
    """A folder's results.json is always its current run's: one started over and stopped before its
    first evaluation does not leave the last run's evaluations (or flags) there for a reader."""
    out = tmp_path / "runs"
    cmd = command("td3_bc", out, "again", ["--total-steps", "300"])
    assert run(cmd, datasets_path).returncode == 0
    assert evaluations(out, "again")[0]["finished"]
    proc = subprocess.Popen(cmd + ["--resume", "never", "--lr", "0.001", "--total-steps", "100000", "--eval-every",
                                   "100000"], env=environment(datasets_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the run's first line: the folder is set up and signals stop it cleanly
        if "run dir" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    results, got = evaluations(out, "again")
    assert got == [] and not results["finished"] and results["args"]["lr"] == 0.001


def test_a_run_folder_another_process_uses_is_refused_and_left_as_it_is(datasets_path, tmp_path):
    from common import lock_folder

    folder = tmp_path / "runs" / "busy"
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"the other process's checkpoint")
    with lock_folder(str(folder), ""):  # as a run still training holds it
        refused = run(command("td3_bc", tmp_path / "runs", "busy", ["--resume", "never"]), datasets_path)
    assert refused.returncode == 1 and refused.stderr.strip() == (
        f"error: {folder} is in use by another process (pid {os.getpid()} on {socket.gethostname()}); wait for it "
        f"to end, or pass another --run-name")
    assert (folder / "checkpoint.pt").read_bytes() == b"the other process's checkpoint"


def test_a_folder_whose_lock_file_cannot_be_opened_is_used_unlocked(tmp_path):
    """As a read-only folder without a lock file: a finished run there still says "nothing to do"."""
    from common import lock_folder

    (tmp_path / ".lock").mkdir()
    with lock_folder(str(tmp_path), ""), lock_folder(str(tmp_path), ""):
        pass


PHASE_FLAGS = ["--bc-steps", "200", "--pretrain-steps", "200", "--log-every", "10", "--eval-every", "50",
               "--total-steps", "100"]


@pytest.mark.parametrize("phase", ["behaviour model", "Q initialisation"])
def test_a_run_stopped_in_a_pretraining_phase_resumes_it_to_the_same_evaluations(phase, datasets_path, tmp_path):
    """BRAC+'s phases checkpoint every --eval-every steps and on SIGTERM. Stopped in the VAE phase
    (trained on its own random stream, not yet cached), the run continues that phase; stopped in
    Q_0's, it skips pi_0 (the checkpoint holds it) and continues Q_0."""
    whole = run(command("brac_plus", tmp_path / "a", "whole", PHASE_FLAGS), datasets_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    _, expected = evaluations(tmp_path / "a", "whole")

    cmd = command("brac_plus", tmp_path / "b", "stopped", PHASE_FLAGS)
    proc = subprocess.Popen(cmd, env=environment(datasets_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        if line.startswith(f"{phase} step 60 "):  # past the phase checkpoint at step 50
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert f"of the {phase} phase" in stdout
    assert not os.path.exists(tmp_path / "b" / "stopped" / "results.json")

    again = run(cmd, datasets_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming the {phase} phase from step" in again.stdout
    assert f"{phase} step 10 " not in again.stdout  # the phase went on from where it stopped
    if phase == "Q initialisation":
        assert "initial policy step" not in again.stdout
    assert evaluations(tmp_path / "b", "stopped")[1] == expected


def test_a_resumed_phase_drops_its_own_steps_after_the_checkpoint_and_no_other_curve(datasets_path, tmp_path,
                                                                                    monkeypatch):
    """Steps 60-70 of "initial policy", logged after its checkpoint at 50 and before a kill, are
    dropped when the phase resumes from 50 and logs them again; the behaviour model's curve, in its
    own folder, keeps its steps past 50, and the main loop's curve, logged again from its start, keeps
    none of its first attempt's steps. A run started over keeps none of the last one's."""
    import dataclasses

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import common

    monkeypatch.setenv("MINARI_DATASETS_PATH", datasets_path)
    args = run_args(tmp_path, eval_every=50)
    data = common.load_dataset(args.env)
    phases = ("behaviour model", "initial policy")
    agent = torch.nn.Linear(2, 2)

    first = common.Run(args, "fake", data, phases=phases)
    for step in range(10, 101, 10):
        first.log(step, {"losses/a": step}, phase="behaviour model")
    for step in range(10, 71, 10):
        first.log(step, {"losses/a": step}, phase="initial policy")
        first.pretraining_step(step, agent, "initial policy")  # a checkpoint at 50
    first.log(5, {"losses/a": 5.0})  # the main loop began, and was killed before its first checkpoint
    first.close()  # what was logged reached the disk; the process dies without finishing
    first.lock.close()

    again = common.Run(args, "fake", data, phases=phases)
    assert again.resume(agent, "initial policy", 100) == 50
    for step in range(60, 101, 10):
        again.log(step, {"losses/a": -step}, phase="initial policy")
    again.log(10, {"losses/a": 1.0})
    again.close()

    def curve(folder):
        events = EventAccumulator(str(tmp_path / "r" / folder), size_guidance={"scalars": 0})
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars("losses/a")]

    assert curve("behaviour_model") == [(s, s) for s in range(10, 101, 10)]
    assert curve("initial_policy") == [(s, s) for s in range(10, 51, 10)] + [(s, -s) for s in range(60, 101, 10)]
    assert curve("") == [(10, 1.0)]

    fresh = common.Run(dataclasses.replace(args, run_name="s"), "fake", data)  # no checkpoint: starts over
    fresh.log(10, {"losses/a": 1.0})
    fresh.log(20, {"losses/a": 2.0})
    fresh.close()
    fresh.lock.close()
    over = common.Run(dataclasses.replace(args, run_name="s"), "fake", data)
    over.log(10, {"losses/a": -1.0})
    over.close()
    assert curve("../s") == [(10, -1.0)]


def test_a_damaged_checkpoint_is_set_aside_so_that_the_next_one_keeps_the_good_previous_one(datasets_path,
                                                                                            tmp_path, monkeypatch):
    """Resumed from checkpoint.prev.pt, a run must not rotate the damaged checkpoint.pt over it: a
    second damage would leave nothing to resume from."""
    import common

    monkeypatch.setenv("MINARI_DATASETS_PATH", datasets_path)
    args = run_args(tmp_path, eval_every=10)
    data, agent = common.load_dataset(args.env), torch.nn.Linear(2, 2)
    latest = tmp_path / "r" / "checkpoint.pt"

    def damage_and_reopen():
        latest.write_bytes(latest.read_bytes()[:500])
        return common.Run(args, "fake", data)

    run = common.Run(args, "fake", data)
    for step in (10, 20):
        run.checkpoint(step, agent)
    run.close(), run.lock.close()
    run = damage_and_reopen()
    assert run.saved["step"] == 10 and (tmp_path / "r" / "checkpoint.damaged.pt").exists()
    run.checkpoint(20, agent)  # the resumed run's next checkpoint
    run.close(), run.lock.close()
    assert damage_and_reopen().saved["step"] == 10


def test_a_total_below_the_checkpoints_step_is_refused_on_resume(datasets_path, tmp_path):
    """--total-steps may stop a run at its checkpoint or continue it further, not end it before."""
    out = tmp_path / "runs"
    cmd = command("td3_bc", out, "r")
    start_and_interrupt(cmd, datasets_path, out / "r", evaluations_before=1)
    other = run([*cmd, "--total-steps", "10"], datasets_path)
    assert other.returncode != 0 and "past --total-steps 10: pass --total-steps" in other.stderr, other.stderr[-2000:]
    assert len(other.stderr.strip().splitlines()) == 1
