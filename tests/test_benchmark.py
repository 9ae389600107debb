"""benchmark.sh / tools/benchmark.py / tools/summarize.py: commands, resume, Slurm, summary numbers."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_d4rl_files import write_file as write_d4rl_file
from common import UserError, load_dataset
from tools import benchmark, summarize


def dry_run(capsys, *argv) -> list[str]:
    """The command lines a dry run prints (comment lines dropped)."""
    assert benchmark.main(["--dry-run", *argv]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]


def write_results(folder, algo, env, seed, scores, total_steps=1_000_000, finished=True, last=None, **extra):
    """A results.json like common.Run writes, with one evaluation per score; `last` updates the last
    evaluation, `extra` the top level."""
    run_dir = os.path.join(folder, benchmark.run_name(algo, env, seed))
    os.makedirs(run_dir, exist_ok=True)
    evaluations = [{"step": 1000 * (i + 1), "return_mean": 10.0 * s, "return_std": 0.0,
                    "normalized_score_mean": s, "normalized_score_std": 0.0, "wall_time": float(i)}
                   for i, s in enumerate(scores)]
    results = {"algorithm": algo, "env": env, "seed": seed, "args": {"total_steps": total_steps},
               "dataset": {"transitions": 1000, "episodes": 10, "ref_min_score": 0.0, "ref_max_score": 1.0,
                           "ref_scores_source": "dataset"},
               "evaluations": evaluations, "final_return": evaluations[-1]["return_mean"],
               "final_normalized_score": scores[-1], "finished": finished, "train_seconds": 1.0, **extra}
    evaluations[-1].update(last or {})
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)  # indented as common.write_json does: the sbatch grep relies on it


def test_dry_run_lists_the_expected_commands(capsys, tmp_path):
    out = str(tmp_path / "runs")
    lines = dry_run(capsys, "--algos", "iql", "fisher_brc", "--datasets", "hopper-medium-v2", "D4RL/pen/human-v2",
                    "--seeds", "0", "1", "--steps", "100", "--bc-steps", "10", "--workers", "2",
                    "--output-dir", out)
    threads = max(1, (os.cpu_count() or 1) // 2)
    expected = []
    for seed in (0, 1):  # seed by seed, so that a second seed finds the first one's cached behaviour model
        for env in ("mujoco/hopper/medium-v0", "D4RL/pen/human-v2"):  # hopper-medium-v2's stand-in
            for algo in ("iql", "fisher_brc"):
                bc = " --bc-steps 10" if algo == "fisher_brc" else ""  # iql has no behaviour phase
                final = " --final-episodes 100" if benchmark.accepts_final_episodes(algo) else ""
                expected.append(f"OMP_NUM_THREADS={threads} python algorithms/{algo}.py --env {env} --seed {seed} "
                                f"--total-steps 100{bc} --eval-every 5000 --eval-episodes 10{final} --output-dir {out} "
                                f"--run-name {algo}__{env.replace('/', '-')}__s{seed}")
    lines = [" ".join(t for t in line.split() if not t.startswith("CUDA_VISIBLE_DEVICES=")) for line in lines]
    assert lines == expected


def test_bc_steps_reach_every_file_with_a_behaviour_phase(capsys, tmp_path):
    # ARQ declares it as Optional[int] (its default depends on the domain); it must still get it.
    algos = ["bc", "iql", "cql", "fisher_brc", "itrpo", "brac_plus", "arq"]
    lines = dry_run(capsys, "--algos", *algos, "--datasets", "local/hopper/medium-v0", "--seeds", "0",
                    "--steps", "100", "--bc-steps", "7", "--output-dir", str(tmp_path))
    flags = {line.split("algorithms/")[1].split(".py")[0]: line for line in lines}
    assert {algo for algo, line in flags.items() if "--bc-steps 7" in line} == {"fisher_brc", "itrpo", "brac_plus", "arq"}
    # CQL's behaviour cloning is a warm-up inside the RL loop, under its own name
    assert "--bc-warmup-steps 7 " in flags["cql"] and "--bc-steps" not in flags["cql"]


def test_quick_dry_run_uses_the_documented_budgets(capsys, tmp_path):
    lines = dry_run(capsys, "--quick", "--output-dir", str(tmp_path))
    assert set(benchmark.QUICK_BUDGETS) == set(benchmark.algorithm_names())  # all nine files
    pairs = {(line.split("--env ")[1].split()[0], line.split("algorithms/")[1].split(".py")[0]) for line in lines}
    # every file on Hopper, BC/TD3+BC/IQL on HalfCheetah and Walker2d
    assert {d for d, _ in pairs} == {f"local/{task}/medium-replay-v0" for task in ("hopper", "halfcheetah", "walker2d")}
    assert {a for d, a in pairs if "hopper" in d} == set(benchmark.algorithm_names())
    for task in ("halfcheetah", "walker2d"):
        assert {a for d, a in pairs if task in d} == {"bc", "td3_bc", "iql"}
    assert len(lines) == len(pairs) * len(benchmark.QUICK_SEEDS)
    # one dataset named on the command line: every file on it
    one = dry_run(capsys, "--quick", "--datasets", "local/walker2d/medium-replay-v0", "--output-dir", str(tmp_path))
    assert len(one) == len(benchmark.algorithm_names()) * len(benchmark.QUICK_SEEDS)
    for line in lines:
        assert line.startswith("OMP_NUM_THREADS=1 ")
        # one id, one dataset: the default builds, in the user's Minari folder, at their default size
        assert "MINARI_DATASETS_PATH" not in line and "LOCAL_DATASET_TRANSITIONS" not in line
        algo = line.split("algorithms/")[1].split(".py")[0]
        steps, bc_steps = benchmark.QUICK_BUDGETS[algo]
        assert f"--total-steps {steps} --" in line
        assert f"--eval-every {steps // 10} --eval-episodes 5" in line
        bc_flag = "--bc-warmup-steps" if algo == "cql" else "--bc-steps"  # else the quick CQL run is all warm-up
        assert (f"{bc_flag} {bc_steps} " in line) == (bc_steps is not None), line
        assert " ".join(benchmark.QUICK_FLAGS.get(algo, [])) in line


@pytest.mark.parametrize("argv, message", [
    (["--algos", "iqll"], "unknown algorithm 'iqll' (did you mean iql?)"),
    (["--datasets", "hopper-medum-v2"], "unknown dataset 'hopper-medum-v2'; close matches: hopper-medium-v2"),
    (["--datasets", "walker2d-medium-expert-v2"], "paper dataset 'walker2d-medium-expert-v2' has no stand-in"),
    (["--quick", "--datasets", "mujoco/hopper/medium-v0"], "--quick runs offline"),
    (["--steps", "0"], "--steps must be positive"),
    (["--final-episodes", "-1"], "--final-episodes must be 0 or more"),
    (["--time", "10"], "--time is an sbatch setting: it goes with --slurm"),
    (["--slurm", "--workers", "4"], "--workers is for runs on this machine; with --slurm, --max-parallel N"),
    (["--slurm", "--mem", "8GB"], "--mem '8GB' is not a Slurm value (e.g. 8G or 16000M)"),
    (["--slurm", "--time", "1 day"], "--time '1 day' is not a Slurm value"),
    (["--slurm", "--gpus", "0"], "--gpus '0' is not a Slurm value (e.g. 1 or a100:1)"),
    (["--slurm", "--max-parallel", "0"], "--max-parallel must be positive"),
    (["--seeds", str(2**32)], "--seeds must be in [0, 4294967295]"),
    (["--datasets", ""], "unknown dataset ''"),
    (["--datasets", "/"], "unknown dataset '/'"),
    (["--datasets", ".."], "unknown dataset '..'"),
    (["--results-dir", "{file}"], "--results-dir {file} cannot be a folder written here"),
    (["--output-dir", "{file}/runs"], "--output-dir {file}/runs cannot be a folder written here"),
])
def test_bad_selection_is_one_clear_error(argv, message, tmp_path):
    (tmp_path / "file").write_text("x")
    argv = [a.format(file=tmp_path / "file") for a in argv]
    message = message.format(file=tmp_path / "file")
    with pytest.raises(UserError) as info:
        benchmark.main(["--dry-run", "--output-dir", str(tmp_path), *argv])
    assert message in str(info.value)


def test_resume_skips_finished_runs_only(capsys, tmp_path):
    out = str(tmp_path)
    argv = ["--algos", "bc", "--datasets", "local/hopper/medium-v0", "--seeds", "0", "1", "2", "--steps", "50",
            "--output-dir", out]
    write_results(out, "bc", "local/hopper/medium-v0", 0, [1.0], total_steps=50)  # finished: skipped
    write_results(out, "bc", "local/hopper/medium-v0", 1, [1.0], total_steps=50, finished=False)  # interrupted
    lines = dry_run(capsys, *argv)
    assert [line.split("--run-name ")[1] for line in lines] == [
        "bc__local-hopper-medium-v0__s1", "bc__local-hopper-medium-v0__s2"]
    # A finished run made with other settings is not silently taken as this one.
    with pytest.raises(UserError, match="finished run of 50 steps but this selection asks for 60"):
        benchmark.main(["--dry-run", *argv[:-4], "--steps", "60", "--output-dir", out])


def test_precision_reaches_every_run_and_keeps_bf16_runs_apart(capsys, tmp_path):
    out = str(tmp_path)
    argv = ["--algos", "bc", "cql", "--datasets", "local/hopper/medium-v0", "--seeds", "0", "--steps", "50"]
    fp32 = dry_run(capsys, *argv, "--output-dir", out)
    assert all("--precision" not in line for line in fp32)  # the default adds nothing to the commands
    bf16 = dry_run(capsys, *argv, "--output-dir", out, "--precision", "bf16")
    assert [line + " --precision bf16" for line in fp32] == bf16
    # a finished fp32 run is not taken for a bf16 one, nor the other way round
    write_results(out, "bc", "local/hopper/medium-v0", 0, [1.0], total_steps=50)
    with pytest.raises(UserError, match="finished run in fp32 but this selection asks for bf16"):
        benchmark.main(["--dry-run", *argv, "--output-dir", out, "--precision", "bf16"])
    # without --output-dir, bf16 runs get folders of their own
    quick = dry_run(capsys, "--quick", "--algos", "bc", "--datasets", "local/hopper/medium-replay-v0", "--seeds", "987",
                    "--precision", "bf16")  # a seed no run in the repository's folders has
    assert quick and all("--output-dir runs/benchmark-quick-bf16 " in line for line in quick)


def fake_datasets(monkeypatch, tmp_path, *ids):
    """A Minari folder in which `ids` count as present (the test benchmark.dataset_on_disk makes)."""
    folder = tmp_path / "minari"
    for dataset_id in ids:
        (folder / dataset_id / "data").mkdir(parents=True)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(folder))
    return folder


def fake_command(folder, name: str, body: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("#!/bin/sh\n" + body)
    (folder / name).chmod(0o755)


def test_slurm_script_runs_the_same_commands_without_the_submitting_shell(capsys, tmp_path, monkeypatch):
    data = fake_datasets(monkeypatch, tmp_path, "local/hopper/medium-v0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    out = str(tmp_path / "runs")
    argv = ["--algos", "bc", "cql", "--datasets", "local/hopper/medium-v0", "--seeds", "0", "1", "--steps", "50",
            "--bc-steps", "5", "--output-dir", out]
    write_results(out, "cql", "local/hopper/medium-v0", 1, [1.0], total_steps=50)
    commands = [line.split(" python ", 1)[1] for line in dry_run(capsys, *argv)]
    script = str(tmp_path / "job.sbatch")
    # The tasks run the interpreter the script was written with, by its absolute path: here a fake one
    # that records its arguments and the dataset variables it was given.
    fake_bin = tmp_path / "bin"
    fake_command(fake_bin, "python", 'echo "$@" > "$RECORD"\n'
                 'echo "$MINARI_DATASETS_PATH $HF_HUB_OFFLINE $D4RL_DATASET_DIR" >> "$RECORD"\n')
    monkeypatch.setattr(sys, "executable", str(fake_bin / "python"))
    assert benchmark.main([*argv, "--slurm", script]) == 0
    monkeypatch.undo()
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    assert len(commands) == 3 and "#SBATCH --array=0-2\n" in text  # no throttle unless asked
    assert "#SBATCH --mem=8G\n" in text and "--time" not in text and "--partition" not in text and "gpu" not in text
    # Each array task runs its own command, from a shell with nothing of this one's environment.
    bare = {"PATH": "/usr/bin:/bin", "RECORD": str(tmp_path / "record")}
    for task, command in enumerate(commands):
        subprocess.run(["bash", script], env={**bare, "SLURM_ARRAY_TASK_ID": str(task)}, check=True)
        recorded = (tmp_path / "record").read_text().splitlines()
        assert recorded == [command, f"{data} 1 {tmp_path / 'd4rl'}"]
    # A task whose run finished since the script was written is skipped.
    write_results(out, "bc", "local/hopper/medium-v0", 0, [1.0], total_steps=50)
    done = subprocess.run(["bash", script], env={**bare, "SLURM_ARRAY_TASK_ID": "0"}, capture_output=True, text=True)
    assert done.returncode == 0 and "already finished" in done.stdout


def test_slurm_submission_groups_runs_by_memory_and_summarises_after_them(capsys, tmp_path, monkeypatch):
    """`bash FILE` submits one array per memory size (the resources asked for passed through) and
    the summary job after all of them; a fake sbatch records the calls."""
    fake_datasets(monkeypatch, tmp_path, "local/hopper/medium-v0", "D4RL/pen/human-v2")
    out, results, script = tmp_path / "runs", tmp_path / "results", tmp_path / "job.sbatch"
    argv = ["--algos", "bc", "brac_plus", "--datasets", "local/hopper/medium-v0", "D4RL/pen/human-v2",
            "--seeds", "0", "--steps", "50", "--output-dir", str(out), "--results-dir", str(results), "--slurm",
            str(script)]
    assert benchmark.main([*argv, "--max-parallel", "2", "--time", "2-00:00:00", "--partition", "gpu",
                           "--gpus", "a100:1"]) == 0
    text = script.read_text()
    for line in ("--array=0-3%2", "--time=2-00:00:00", "--partition=gpu", "--gres=gpu:a100:1", "--mem=24G",
                 f"--output={out}/slurm-logs/%A_%a.log"):
        assert f"#SBATCH {line}\n" in text, line
    fake_bin = tmp_path / "bin"
    n = tmp_path / "n"
    fake_command(fake_bin, "sbatch", f'echo "$@" >> "$RECORD"\nn=$(($(cat {n} 2>/dev/null || echo 100) + 1))\n'
                 f'echo $n > {n}\necho "$n;cluster"\n')
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "RECORD": str(tmp_path / "record")}
    submitted = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    calls = (tmp_path / "record").read_text().splitlines()
    # runs: bc hopper, brac_plus hopper, bc pen, brac_plus pen (BRAC+'s 1000-episode Adroit evaluations)
    assert calls[:3] == [f"--parsable --array=0-1%2 --mem=8G {script}",
                         f"--parsable --array=2%2 --mem=16G {script}", f"--parsable --array=3%2 --mem=24G {script}"]
    assert calls[3].startswith("--parsable --dependency=afterany:101:102:103 --job-name=offline-rl-summary ")
    assert "--time=2-00:00:00 --partition=gpu" in calls[3] and "gres" not in calls[3]
    assert calls[3].endswith(f"--wrap=cd {ROOT} && exec {sys.executable} tools/summarize.py {out} --out {results}")
    assert "as array job(s) 101 102 103 and the summary as job 104" in submitted.stdout
    # --mem sets every task: one array.
    assert benchmark.main([*argv, "--mem", "4000M"]) == 0
    (tmp_path / "record").unlink()
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    assert (tmp_path / "record").read_text().splitlines()[0] == f"--parsable --array=0-3 --mem=4000M {script}"


def test_slurm_refuses_a_selection_whose_datasets_are_not_here(tmp_path, monkeypatch):
    fake_datasets(monkeypatch, tmp_path, "local/hopper/medium-v0")
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    script = tmp_path / "job.sbatch"
    argv = ["--algos", "bc", "--seeds", "0", "--output-dir", str(tmp_path / "runs"), "--slurm", str(script)]
    with pytest.raises(UserError) as info:
        benchmark.main([*argv, "--datasets", "local/hopper/medium-v0", "D4RL/pen/human-v2", "d4rl/pen-human-v0"])
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        "--slurm: 2 of the selection's datasets are not here yet (D4RL/pen/human-v2, d4rl/pen-human-v0; ")
    assert message.endswith("run the same command with --fetch-only instead of --slurm first")
    assert not script.exists()
    (tmp_path / "d4rl").mkdir()
    (tmp_path / "d4rl" / "pen-v0_demos_clipped.hdf5").write_bytes(b"")  # D4RL's file, not yet written
    with pytest.raises(UserError):  # into Minari's storage, which --fetch-only does
        benchmark.main([*argv, "--datasets", "local/hopper/medium-v0", "d4rl/pen-human-v0"])
    (tmp_path / "minari" / "d4rl" / "pen-human-v0" / "data").mkdir(parents=True)
    assert benchmark.main([*argv, "--datasets", "local/hopper/medium-v0", "d4rl/pen-human-v0"]) == 0
    assert script.exists()


def test_the_full_benchmark_scores_the_final_policy_on_more_episodes(capsys, tmp_path, monkeypatch):
    """--final-episodes 100 reaches the files that have the flag, in the full benchmark only."""
    assert benchmark.accepts_final_episodes("bc") == ("final_episodes:" in open(os.path.join(ROOT, "algorithms",
                                                                                           "bc.py")).read())
    monkeypatch.setattr(benchmark, "accepts_final_episodes", lambda algo: algo != "cql")
    argv = ["--algos", "bc", "cql", "--datasets", "local/hopper/medium-replay-v0", "--seeds", "0",
            "--output-dir", str(tmp_path)]
    full = dry_run(capsys, *argv)
    assert "--eval-episodes 10 --final-episodes 100 --output-dir" in full[0] and "--final-episodes" not in full[1]
    assert all("--final-episodes" not in line for line in dry_run(capsys, *argv, "--final-episodes", "0"))
    assert "--final-episodes 30 " in dry_run(capsys, *argv, "--final-episodes", "30")[0]
    assert all("--final-episodes" not in line for line in dry_run(capsys, "--quick", *argv))


def test_slurm_script_requeues_on_usr1(capsys, tmp_path, monkeypatch):
    fake_datasets(monkeypatch, tmp_path, "local/hopper/medium-v0")
    script = str(tmp_path / "job.sbatch")
    assert benchmark.main(["--algos", "bc", "--datasets", "local/hopper/medium-v0", "--seeds", "0", "--steps", "50",
                           "--output-dir", str(tmp_path / "runs"), "--slurm", script]) == 0
    text = open(script).read()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --open-mode=append",
                 "trap 'forward USR1' USR1", "trap 'forward TERM' TERM", 'scontrol requeue "${SLURM_JOB_ID}"'):
        assert line in [t.strip() for t in text.splitlines()], line
    assert 'eval "exec ${COMMANDS[$i]}" &' in text  # python in the background, as the shell's child itself


def test_a_slurm_task_stopped_by_usr1_checkpoints_requeues_and_resumes(tmp_path, monkeypatch):
    """The generated script's body, run by bash with a fake scontrol, on a tiny real run (on a D4RL
    file, larger than the default batch)."""
    (tmp_path / "d4rl").mkdir()
    write_d4rl_file(tmp_path / "d4rl" / "hopper_medium_replay-v2.hdf5", 400)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    load_dataset("d4rl/hopper-medium-replay-v2")  # written into Minari's storage, as --fetch-only does
    out = tmp_path / "runs"
    script = str(tmp_path / "job.sbatch")
    assert benchmark.main(["--algos", "bc", "--datasets", "d4rl/hopper-medium-replay-v2", "--seeds", "0", "--steps", "1500",
                           "--eval-every", "300", "--eval-episodes", "1", "--output-dir", str(out),
                           "--slurm", script]) == 0
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text("#!/bin/sh\necho \"$@\" >> \"$RECORD\"\n")
    (fake_bin / "scontrol").chmod(0o755)
    record = tmp_path / "scontrol_calls"
    env = {**os.environ, "PATH": f"{fake_bin}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "RECORD": str(record), "SLURM_ARRAY_TASK_ID": "0", "SLURM_JOB_ID": "4242", "PYTHONUNBUFFERED": "1"}
    run_dir = out / benchmark.run_name("bc", "d4rl/hopper-medium-replay-v2", 0)
    task = subprocess.Popen(["bash", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run_dir / "checkpoint.pt").exists() and task.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert task.poll() is None, "the run ended before it could be signalled: " + "".join(task.communicate())[-3000:]
    task.send_signal(signal.SIGUSR1)  # what Slurm sends the batch shell (B:) before the time limit
    stdout, stderr = task.communicate(timeout=120)
    log = (run_dir / "stdout.log").read_text()  # the task's output: the run folder keeps it
    assert task.returncode == 128 + signal.SIGUSR1, stdout[-2000:] + stderr[-2000:] + log[-2000:]
    assert "stopped by SIGUSR1" in log and "requeueing" in log
    assert record.read_text().split() == ["requeue", "4242"]
    with open(run_dir / "results.json") as f:
        assert not json.load(f)["finished"]
    # Slurm runs the requeued task again: the run continues from its checkpoint and finishes.
    record.unlink()
    again = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=300)
    log = (run_dir / "stdout.log").read_text()
    assert again.returncode == 0, log[-2000:]
    assert "resuming from step" in log.split("requeueing")[1] and not record.exists()
    assert log.count("[slurm] job 4242") == 2  # both attempts' output, one after the other
    with open(run_dir / "results.json") as f:
        results = json.load(f)
    assert results["finished"] and results["evaluations"][-1]["step"] == 1500


def test_the_d4rl_file_of_a_paper_dataset_is_preferred_to_its_stand_in(capsys, tmp_path, monkeypatch):
    d4rl_dir = tmp_path / "d4rl"
    d4rl_dir.mkdir()
    monkeypatch.setenv("D4RL_DATASET_DIR", str(d4rl_dir))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    argv = ["--algos", "bc", "--seeds", "0", "--output-dir", str(tmp_path / "runs"), "--datasets",
            "hopper-medium-replay-v2", "antmaze-umaze-v2"]

    def envs(*extra):
        return [line.split("--env ")[1].split()[0] for line in dry_run(capsys, *argv, *extra)]

    assert envs() == ["local/hopper/medium-replay-v0", "D4RL/antmaze/umaze-v1"]
    for name in ("hopper_medium_replay-v2.hdf5", "walker2d_random-v2.hdf5",
                 "Ant_maze_u-maze_noisy_multistart_False_multigoal_False_sparse_fixed.hdf5"):
        (d4rl_dir / name).write_bytes(b"")  # only its presence matters to the selection
    # AntMaze files are not read here (tools/d4rl_files.py has none): the Minari port stays.
    assert envs() == ["d4rl/hopper-medium-replay-v2", "D4RL/antmaze/umaze-v1"]
    # A paper dataset without a stand-in becomes available; the default selection takes the file too.
    assert envs("walker2d-random-v2") == ["d4rl/hopper-medium-replay-v2", "D4RL/antmaze/umaze-v1",
                                          "d4rl/walker2d-random-v2"]
    assert "d4rl/hopper-medium-replay-v2" in benchmark.resolve_datasets(None, quick=False)
    # Quick mode keeps its small local datasets, sized for its budgets.
    assert benchmark.resolve_datasets(["hopper-medium-replay-v2"], quick=True) == ["local/hopper/medium-replay-v0"]


def test_summary_says_which_data_each_cell_used(tmp_path):
    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    for seed in range(5):
        write_results(runs, "iql", "d4rl/hopper-medium-replay-v2", seed, [70.0 + seed])
        write_results(runs, "td3_bc", "local/hopper/medium-replay-v0", seed, [20.0])
    summarize.main([runs, "--out", results])
    md = open(os.path.join(results, "summary.md")).read()
    section = md.split("### corl: D4RL v2 last")[1].split("###")[0]
    header = next(line for line in section.splitlines() if line.startswith("| paper dataset"))
    line = next(line for line in section.splitlines() if line.startswith("| hopper-medium-replay-v2 |"))
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in line.split("|")]))
    assert cells["our data"] == ("`d4rl/hopper-medium-replay-v2` (same data: D4RL's file), "
                                 "`local/hopper/medium-replay-v0` (stand-in)")
    # CORL's rule: the last evaluation of its 4 seeds (70..73), on the D4RL file; td3_bc only ran on the stand-in.
    assert cells["iql"].startswith("71.5 ± 1.1") and cells["iql"].endswith("on `d4rl/hopper-medium-replay-v2`")
    assert cells["td3_bc"].endswith("on `local/hopper/medium-replay-v0`")
    assert "| `d4rl/hopper-medium-replay-v2` | hopper-medium-replay-v2 | same data: D4RL's file |" in md


def test_summary_numbers_and_flags(tmp_path):
    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    env = "local/hopper/medium-v0"  # the quick stand-in for hopper-medium-v0 and -v2
    for seed in range(5):
        write_results(runs, "iql", env, seed, [10.0, 10.0] + [60.0 + seed] * 10)
    for seed in range(2):
        write_results(runs, "td3_bc", env, seed, [120.0] * 3, total_steps=5000)
    write_results(runs, "bc", env, 0, [50.0], finished=False)
    summarize.main([runs, "--out", results])
    md = open(os.path.join(results, "summary.md")).read()

    def row(table: str, dataset: str) -> list[str]:
        section = md.split(f"### {table}")[1].split("###")[0]
        header = next(line for line in section.splitlines() if line.startswith("| paper dataset"))
        line = next(line for line in section.splitlines() if line.startswith(f"| {dataset} |"))
        return dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in line.split("|")]))

    # Fisher-BRC: last evaluation, 5 seeds (60..64): mean 62, population std sqrt(2); no IQL column in the paper.
    fbrc = row("fisher_brc: Table 1", "hopper-medium-v0")
    # In brackets, the 95% bootstrap interval of the mean over the 5 seeds: about mean ± 1.96 x std / sqrt(5).
    mean_std, interval = fbrc["iql"].split(" [")
    low, high = (float(x) for x in interval.rstrip("]").split(", "))
    assert mean_std == "62.0 ± 1.4" and 60.0 < low < 62.0 < high < 64.0
    assert abs(low - (62 - 1.96 * 2 ** 0.5 / 5 ** 0.5)) < 0.3 and abs(high - (62 + 1.96 * 2 ** 0.5 / 5 ** 0.5)) < 0.3
    assert fbrc["our data"] == "`local/hopper/medium-v0` (stand-in)"
    assert fbrc["fisher_brc"] == "— (99.4 ± 0.3)" and fbrc["BRAC-p (paper)"] == "31.2"
    # iTRPO: last 10 evaluations of the first 4 seeds pooled (60..63 x 10): 61.5 ± 1.1, inside 63.6 ± 2 x 2.9.
    itrpo = row("itrpo: Table 2", "hopper-medium-v2")
    assert itrpo["iql"].startswith("61.5 ± 1.1 [") and itrpo["iql"].endswith("] (63.6 ± 2.9)")
    # td3_bc: 2 seeds of 5,000 steps, 120 vs 59.0 ± 0.7: flagged high, and marked as short of the protocol.
    assert itrpo["td3_bc"] == "120.0 ± 0.0 [120.0, 120.0] ⚠ high † (59.0 ± 0.7)"
    assert "td3_bc: 2 seeds, 5,000 steps, fewer than 10 evaluations" in md
    # CORL: last evaluation, 4 seeds (60..63): 61.5 is more than 5 points under 67.5 (no std given).
    corl = row("corl: D4RL v2 last", "hopper-medium-v2")["iql"]
    assert corl.startswith("61.5 ± 1.1 [") and corl.endswith("] ⚠ low (67.5)")
    # ARQ: 3 seeds (60, 61, 62).
    assert row("arq: Table A.4", "hopper-medium-v2")["iql"].startswith("61.0 ± 0.8")
    # The unfinished bc run is counted but left out of the tables.
    assert "(1 unfinished, left out of the tables)" in md and row("itrpo: Table 2", "hopper-medium-v2")["bc"] == "—"

    with open(os.path.join(results, "runs.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    first = next(r for r in rows if r["algorithm"] == "iql" and r["seed"] == "4")
    assert float(first["final_normalized_score"]) == 64.0 and float(first["mean_last_10_normalized_score"]) == 64.0
    with open(os.path.join(results, "curves", "local-hopper-medium-v0.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def paper_rows() -> list[dict]:
    with open(os.path.join(ROOT, "benchmarks", "paper_scores.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_reference_data_is_consistent():
    """Every paper row has a known rule, a mapped algorithm file or none, and a dataset mapping."""
    scores = paper_rows()
    with open(os.path.join(ROOT, "benchmarks", "datasets.csv")) as f:
        mapping = {r["paper_dataset"]: r for r in csv.DictReader(f)}
    algos = set(benchmark.algorithm_names())
    for row in scores:
        assert row["paper_dataset"] in mapping, row
        assert row["algo"] in algos | {""}, row
        if row["score_mean"]:
            float(row["score_mean"])
        else:  # a cell our copy of the paper lost (TRANSCRIPTION.md): its std is left out too
            assert not row["score_std"], row
        assert row["final_score_rule"] in summarize.RULES or row["final_score_rule"].startswith(
            ("borrowed:", "not stated")), row
        own = row["final_score_rule"] in summarize.RULES
        assert (row["rule_basis"] == "stated" or row["rule_basis"].startswith("inferred: ")) if own \
            else row["rule_basis"] == "", row
    for row in mapping.values():
        assert row["relation"] in ("same", "port", "stand-in", "none")
        assert bool(row["minari_id"]) == (row["relation"] != "none")
    for name in os.listdir(os.path.join(ROOT, "benchmarks")):  # self-contained: no paths outside the repository
        with open(os.path.join(ROOT, "benchmarks", name)) as f:
            assert "../shared" not in f.read(), name


LOCOMOTION = [f"{env}-{kind}-v2" for kind in ("expert", "medium", "medium-expert", "medium-replay")
              for env in ("hopper", "walker2d", "halfcheetah")]


def test_arq_locomotion_keeps_only_the_cells_the_text_proves():
    """The text copy of ARQ's Table A.4 dropped the "ARQ + pi_phi" cell of most locomotion rows; the
    number left in front of its std is IQL's. Only hopper-expert (row aligned: the one dropped cell is
    before s_psi) and hopper-medium-replay (81 is not IQL's 95) are known."""
    arq = {r["paper_dataset"]: r for r in paper_rows() if r["paper"] == "arq" and r["method"] == "ARQ + pi_phi"}
    iql = {r["paper_dataset"]: r for r in paper_rows() if r["paper"] == "arq" and r["method"] == "IQL"}
    kept = {ds: (arq[ds]["score_mean"], arq[ds]["score_std"]) for ds in LOCOMOTION if arq[ds]["score_mean"]}
    assert kept == {"hopper-expert-v2": ("111", "0.2"), "hopper-medium-replay-v2": ("81", "2.4")}
    # IQL's cells: its published v2 scores, rounded; IQL published none on expert data, so only the
    # aligned hopper-expert row gives one.
    assert {ds: iql[ds]["score_mean"] for ds in LOCOMOTION} == {
        "hopper-expert-v2": "110", "walker2d-expert-v2": "", "halfcheetah-expert-v2": "",
        "hopper-medium-v2": "66", "walker2d-medium-v2": "78", "halfcheetah-medium-v2": "47",
        "hopper-medium-expert-v2": "92", "walker2d-medium-expert-v2": "110", "halfcheetah-medium-expert-v2": "87",
        "hopper-medium-replay-v2": "95", "walker2d-medium-replay-v2": "74", "halfcheetah-medium-replay-v2": "44"}
    for ds in kept:
        assert arq[ds]["score_mean"] != iql[ds]["score_mean"], ds


# ARQ's Table 2: totals per dataset group of the columns Table A.4 details.
ARQ_TABLE_2 = {
    "locomotion": (LOCOMOTION, {"BC": 739, "Impl. BC": 521, "s_psi (ours)": 639, "Q(beta) + s_psi (ours)": 911,
                                "TD3+BC": 992, "CQL": 996, "IQL": 1007, "ARQ + pi_phi": 1000, "ARQ + s_psi": 947}),
    "human": ([f"{t}-human-v0" for t in ("pen", "door", "relocate", "hammer")],
              {"BC": 67, "Impl. BC": 99, "s_psi (ours)": 87, "Q(beta) + s_psi (ours)": 89, "CQL": 52, "IQL": 77,
               "ARQ + pi_phi": 45, "ARQ + s_psi": 90}),
    "cloned": ([f"{t}-cloned-v0" for t in ("pen", "door", "relocate", "hammer")],
               {"BC": 37, "s_psi (ours)": 29, "One-step": 62, "Q(beta) + s_psi (ours)": 71, "CQL": 42, "IQL": 41,
                "ARQ + pi_phi": 50, "ARQ + s_psi": 71}),
    "kitchen": ([f"kitchen-{k}-v0" for k in ("complete", "partial", "mixed")],
                {"BC": 155, "Impl. BC": 160, "s_psi (ours)": 170, "Q(beta) + s_psi (ours)": 186, "CQL": 145,
                 "IQL": 160, "ARQ + pi_phi": 126, "ARQ + s_psi": 204}),
    "antmaze": ([f"antmaze-{m}-v0" for m in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play",
                                              "large-diverse")],
                {"BC": 100, "s_psi (ours)": 121, "One-step": 125, "Q(beta) + s_psi (ours)": 215, "DT": 112,
                 "TD3+BC": 164, "CQL": 304, "IQL": 378, "ARQ + pi_phi": 416, "ARQ + s_psi": 327}),
}


@pytest.mark.parametrize("group", list(ARQ_TABLE_2))
def test_arq_columns_add_up_to_table_2(group):
    """Every column of Table A.4 whose cells we all have sums to Table 2's total, within the rounding of
    its integer cells (2 points); a column with a lost cell ("n/a") is skipped."""
    datasets, totals = ARQ_TABLE_2[group]
    rows = [r for r in paper_rows() if r["paper"] == "arq" and r["paper_dataset"] in datasets]
    skipped = set()
    for method, total in totals.items():
        cells = [r["score_mean"] for r in rows if r["method"] == method]
        assert len(cells) == len(datasets), (method, cells)
        if all(cells):
            assert abs(sum(float(c) for c in cells) - total) <= 2, (group, method, cells, total)
        else:
            skipped.add(method)
    assert skipped == ({"Impl. BC", "IQL", "ARQ + pi_phi"} if group == "locomotion" else set())


def test_rules_the_papers_do_not_state_are_labelled_inferred(tmp_path):
    """Rules read from a caption are "stated"; ARQ never says which evaluation it reports, and iTRPO's
    Table 3 gives only its seeds: both are "inferred", in the data and in the summary."""
    basis = {(r["paper"], r["table"], r["method"]): r["rule_basis"] for r in paper_rows() if r["rule_basis"]}
    assert basis[("itrpo", "Table 2", "iTRPO")] == basis[("fisher_brc", "Table 1", "F-BRC")] == "stated"
    assert basis[("itrpo", "Table 3", "iTRPO")].startswith("inferred: ")
    assert all(b.startswith("inferred: ") for (paper, _, _), b in basis.items() if paper == "arq")
    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    write_results(runs, "bc", "local/hopper/medium-v0", 0, [50.0])
    summarize.main([runs, "--out", results])
    md = open(os.path.join(results, "summary.md")).read()
    protocol = {title: section.split("Paper protocol:")[1].split("\n")[0]
                for title, section in (s.split("\n", 1) for s in md.split("### ")[1:])}
    assert "inferred" in protocol["arq: Table A.4"] and "inferred" in protocol["itrpo: Table 3"]
    assert "which evaluation" in protocol["arq: Table A.4"]
    assert "inferred" not in protocol["itrpo: Table 2"] and "inferred" not in protocol["corl: D4RL v2 last"]


def test_lost_paper_cells_show_na_and_are_not_compared(tmp_path):
    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    for seed in range(3):
        write_results(runs, "arq", "local/hopper/medium-v0", seed, [20.0])  # far below every ARQ number
    summarize.main([runs, "--out", results])
    md = open(os.path.join(results, "summary.md")).read()
    section = md.split("### arq: Table A.4")[1].split("###")[0]
    line = next(line for line in section.splitlines() if line.startswith("| hopper-medium-v2 |"))
    assert "| 20.0 ± 0.0 [20.0, 20.0] (n/a) |" in line and "⚠" not in line
    assert "n/a: the paper has a number here that our copy of its text lost" in section


def test_full_benchmark_uses_each_papers_eval_episodes(capsys, tmp_path):
    lines = dry_run(capsys, "--algos", "arq", "brac_plus", "fisher_brc", "td3_bc", "iql", "cql", "itrpo",
                    "--datasets", "hopper-medium-v2", "pen-human-v0", "antmaze-umaze-v2", "--seeds", "0",
                    "--output-dir", str(tmp_path))
    episodes = {(line.split("algorithms/")[1].split(".py")[0], line.split("--env ")[1].split()[0]):
                int(line.split("--eval-episodes ")[1].split()[0]) for line in lines}
    hopper, pen, antmaze = "mujoco/hopper/medium-v0", "D4RL/pen/human-v2", "D4RL/antmaze/umaze-v1"
    expected = {"arq": (100, 100, 100),  # ARQ Table 2
                "brac_plus": (100, 1000, 100),  # BRAC+ Table 1 (gym), its Adroit table
                "fisher_brc": (10, 10, 10),  # Fisher-BRC Table 1
                "td3_bc": (10, 10, 10), "iql": (10, 10, 100),
                "cql": (10, 10, 10), "itrpo": (10, 10, 10)}  # not stated: the default
    assert episodes == {(algo, ds): n for algo, counts in expected.items()
                        for ds, n in zip((hopper, pen, antmaze), counts)}
    # --eval-episodes still sets every run.
    lines = dry_run(capsys, "--algos", "arq", "iql", "--datasets", "antmaze-umaze-v2", "--seeds", "0",
                    "--eval-episodes", "3", "--output-dir", str(tmp_path))
    assert len(lines) == 2 and all("--eval-episodes 3 " in line for line in lines)


def test_quick_mode_end_to_end(tmp_path):
    out, results = str(tmp_path / "runs"), str(tmp_path / "results")
    argv = ["benchmark.sh", "--quick", "--algos", "bc", "--datasets", "local/pendulum/medium-400-v0", "--seeds", "0",
            "--steps", "20", "--eval-every", "10", "--eval-episodes", "1", "--output-dir", out,
            "--results-dir", results]
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "datasets"), "OMP_NUM_THREADS": "1"}
    first = subprocess.run(["bash", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stdout + first.stderr
    with open(os.path.join(out, "bc__local-pendulum-medium-400-v0__s0", "results.json")) as f:
        assert json.load(f)["finished"]
    md = open(os.path.join(results, "summary.md")).read()
    assert "| `local/pendulum/medium-400-v0` | (no paper dataset) | — | 400 |" in md
    assert "| `local/pendulum/medium-400-v0` | bc | 1 |" in md
    assert "## Quick profile" in md and "| `local/pendulum/medium-400-v0` | 400 |" in md
    assert os.path.exists(os.path.join(results, "curves", "quick-local-pendulum-medium-400-v0.png"))
    # Resume: nothing left to run.
    again = subprocess.run(["bash", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0 and "1 already finished, 0 to do" in again.stdout


def test_local_datasets_still_to_build_are_built_workers_at_a_time(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    ids = ["local/pendulum/medium-300-v0", "local/pendulum/random-200-v0"]
    assert benchmark.main(["--fetch-only", "--datasets", *ids, "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert f"building {ids[0]}, {ids[1]} from the shipped snapshots, 2 at a time" in out
    for dataset_id in ids:
        assert f"built {dataset_id} (" in out and benchmark.dataset_on_disk(dataset_id)
    # Built ones are not built again; one worker builds in this process, one at a time.
    assert benchmark.main(["--fetch-only", "--datasets", *ids, "--workers", "2"]) == 0
    assert "building" not in capsys.readouterr().out


def test_a_failed_parallel_build_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))

    def fake_run(argv, **kwargs):
        failing = argv[-1] == "local/pendulum/random-200-v0"
        return subprocess.CompletedProcess(argv, 1 if failing else 0, "", "error: no space left on device\n" if failing else "")

    monkeypatch.setattr(benchmark.subprocess, "run", fake_run)
    with pytest.raises(UserError, match=r"^could not build local/pendulum/random-200-v0: error: no space left on device$"):
        benchmark.fetch_datasets(["local/pendulum/medium-300-v0", "local/pendulum/random-200-v0"], workers=2)


def test_quick_table_marks_slow_files_names_flags_caches_and_files_below_bc(tmp_path):
    out = str(tmp_path / "runs")
    data = "local/hopper/medium-replay-v0"
    for seed, (bc, iql, cql) in enumerate([(10.0, 20.0, 5.0), (12.0, 22.0, 7.0)]):
        write_results(out, "bc", data, seed, [bc], total_steps=100)
        write_results(out, "iql", data, seed, [iql], total_steps=100)
        write_results(out, "cql", data, seed, [cql], total_steps=100)
        write_results(out, "brac_plus", data, seed, [50.0], total_steps=30)
        write_results(out, "td3_bc", data, seed, [0.0, 0.0, 30.0, 10.0], total_steps=100)
    with open(os.path.join(out, benchmark.run_name("iql", data, 1), "stdout.log"), "w") as f:
        f.write("reusing the cached pretrained model x.pt\n")
    with open(os.path.join(out, summarize.QUICK_PROFILE_FILE), "w") as f:
        json.dump({"bc": {"flags": [], "too_slow": None}, "iql": {"flags": ["--gp-weight", "1.0"], "too_slow": None},
                   "cql": {"flags": [], "too_slow": None}, "td3_bc": {"flags": [], "too_slow": None},
                   "brac_plus": {"flags": [], "too_slow": "30 RL steps in its share"}}, f)
    summarize.main([out, "--out", str(tmp_path / "results")])
    md = open(tmp_path / "results" / "summary.md").read()
    quick = md.split("## Quick profile")[1].split("## Paper tables")[0]
    row = next(line for line in quick.splitlines() if line.startswith(f"| `{data}`"))
    cells = dict(zip(quick.splitlines()[4].strip("| ").split(" | "), row.strip("| ").split(" | ")))
    assert cells["bc"] == "11.0 ± 1.0 [10.0, 12.0]" and cells["iql"] == "21.0 ± 1.0 [20.0, 22.0]"
    assert cells["cql"] == "6.0 ± 1.0 [5.0, 7.0]"
    assert cells["brac_plus"] == "too slow for quick: 30 steps"  # a score of 50 is not shown
    assert cells["td3_bc"] == "20.0 ± 0.0 [20.0, 20.0]"  # the mean of the second half of its evaluations
    assert f"On `{data}`, below BC (11.0): cql." in quick
    assert "iql: `--gp-weight 1.0`" in quick and "brac_plus: 30 RL steps in its share" in quick
    assert f"`{benchmark.run_name('iql', data, 1)}`" in quick.split("from the cache")[1]
    assert os.path.exists(tmp_path / "results" / "curves" / "quick-local-hopper-medium-replay-v0.png")


def test_quick_table_says_which_files_did_not_run_on_a_dataset(tmp_path):
    """The default quick profile runs three files on HalfCheetah and Walker2d: the others' cells say
    "not run", not a blank that reads like a failed run, and the figure has a panel per file that ran."""
    out = str(tmp_path / "runs")
    for algo in ("bc", "td3_bc", "iql"):
        write_results(out, algo, "local/hopper/medium-replay-v0", 0, [10.0], total_steps=100)
        write_results(out, algo, "local/walker2d/medium-replay-v0", 0, [20.0], total_steps=100)
    write_results(out, "cql", "local/hopper/medium-replay-v0", 0, [5.0], total_steps=100)
    write_results(out, "awr", "local/walker2d/medium-replay-v0", 0, [30.0], total_steps=100)
    with open(os.path.join(out, summarize.QUICK_PROFILE_FILE), "w") as f:
        json.dump({a: {"flags": [], "too_slow": None} for a in ("bc", "td3_bc", "awr", "iql", "cql")}, f)
    summarize.main([out, "--out", str(tmp_path / "results")])
    quick = open(tmp_path / "results" / "summary.md").read().split("## Quick profile")[1].split("## Paper tables")[0]
    header = quick.splitlines()[4].strip("| ").split(" | ")
    rows = {line.split(" | ")[0].strip("| `"): dict(zip(header, line.strip("| ").split(" | ")))
            for line in quick.splitlines() if line.startswith("| `local/")}
    assert rows["local/walker2d/medium-replay-v0"]["cql"] == "not run"
    assert rows["local/walker2d/medium-replay-v0"]["awr"] == "30.0"  # one seed: no interval
    assert rows["local/hopper/medium-replay-v0"]["awr"] == "not run"
    assert rows["local/walker2d/medium-replay-v0"]["bc"] == "20.0"
    import matplotlib.image
    figure = matplotlib.image.imread(tmp_path / "results" / "curves" / "quick-local-walker2d-medium-replay-v0.png")
    assert figure.shape[1] == 3 * 320 and figure.shape[0] == 2 * 240  # bc, td3_bc, awr, iql: 2 rows of 3


def test_quick_summary_says_when_its_runs_were_not_fp32(tmp_path):
    out = str(tmp_path / "runs")
    write_results(out, "bc", "local/hopper/medium-replay-v0", 0, [10.0], total_steps=100)
    write_results(out, "bc", "local/hopper/medium-replay-v0", 1, [12.0], total_steps=100)
    with open(os.path.join(out, summarize.QUICK_PROFILE_FILE), "w") as f:
        json.dump({"bc": {"flags": [], "too_slow": None}}, f)

    def quick_section():
        summarize.main([out, "--out", str(tmp_path / "results")])
        return open(tmp_path / "results" / "summary.md").read().split("## Quick profile")[1].split("## Paper tables")[0]

    assert "Precision" not in quick_section()  # fp32 runs (and results.json without the flag) say nothing
    path = os.path.join(out, benchmark.run_name("bc", "local/hopper/medium-replay-v0", 1), "results.json")
    results = json.load(open(path))
    results["args"]["precision"] = "bf16"
    json.dump(results, open(path, "w"))
    assert "Precision (--precision): bf16, fp32." in quick_section()


def aggregate_rows(md: str) -> dict[str, dict[str, str]]:
    section = md.split("## Aggregate over tasks")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = lines[0].strip("| ").split(" | ")
    return {line.split(" | ")[0].strip("| "): dict(zip(header, line.strip("| ").split(" | "))) for line in lines[1:]}


def test_aggregate_is_the_iqm_over_tasks_with_a_stratified_interval(tmp_path):
    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    # iql: 8 runs on two tasks, sorted 0 50 50 50 50 50 100 1000: the middle half is all 50, the mean 168.75.
    for seed, (a, b) in enumerate([(0.0, 50.0), (50.0, 50.0), (50.0, 50.0), (100.0, 1000.0)]):
        write_results(runs, "iql", "local/hopper/medium-v0", seed, [a])
        write_results(runs, "iql", "local/walker2d/medium-v0", seed, [b])
    # td3_bc: all 0 on one task, all 100 on the other. Resampled within each task, every resample holds
    # four of each (IQM 50, always); resampled over the pooled runs, the IQM would range from 0 to 100.
    for seed in range(4):
        write_results(runs, "td3_bc", "local/hopper/medium-v0", seed, [0.0])
        write_results(runs, "td3_bc", "local/walker2d/medium-v0", seed, [100.0])
    write_results(runs, "bc", "local/hopper/medium-v0", 0, [10.0], finished=False)  # unfinished: not counted
    summarize.main([runs, "--out", results])
    md = open(os.path.join(results, "summary.md")).read()
    rows = aggregate_rows(md)
    assert set(rows) == {"iql", "td3_bc"}
    assert rows["iql"]["tasks"] == "2" and rows["iql"]["runs"] == "8"
    assert rows["iql"]["IQM [95% CI]"].startswith("50.0 [") and rows["iql"]["mean [95% CI]"].startswith("168.8 [")
    assert rows["td3_bc"]["IQM [95% CI]"] == "50.0 [50.0, 50.0]"
    assert rows["td3_bc"]["mean [95% CI]"] == "50.0 [50.0, 50.0]"
    with open(os.path.join(results, summarize.PROFILE_FILE), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"![performance profile]({summarize.PROFILE_FILE})" in md
    # The same runs, the same summary: the bootstrap has a fixed seed.
    summarize.main([runs, "--out", results])
    assert open(os.path.join(results, "summary.md")).read() == md


def test_iqm_and_bootstrap_helpers():
    import numpy as np

    assert summarize.iqm(np.array([1.0, 2.0, 3.0, 4.0, 100.0])) == 3.0  # a quarter of 5 is 1 cut from each end
    assert summarize.iqm(np.array([[0.0, 1.0, 2.0, 3.0], [4.0, 4.0, 8.0, 8.0]])).tolist() == [1.5, 6.0]
    low, high = summarize.bootstrap([np.array([5.0, 5.0])], lambda drawn: drawn.mean(axis=1))
    assert low == high == 5.0
    assert summarize.seed_interval([[1.0]]) is None  # one seed: no interval


def test_summary_scores_the_final_evaluation_and_states_the_protocol(tmp_path):
    """The final score is the last evaluation's per-episode returns, normalised (over however many
    episodes --final-episodes gave it); runs.csv names torch, the device and the hours per 1M steps."""
    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    env = "local/hopper/medium-v0"
    # dataset references 0 and 1: returns 0.2 and 0.4 are 20 and 40, a final score of 30, whatever
    # the summary field says
    for seed in range(2):
        write_results(runs, "iql", env, seed, [10.0, 99.0], last={"episode_returns": [0.2, 0.4, 0.2, 0.4]},
                      train_seconds=7200.0, torch="2.5.1", device="NVIDIA H100 80GB HBM3")
    write_results(runs, "bc", env, 0, [40.0], total_steps=500_000, train_seconds=7200.0)
    summarize.main([runs, "--out", results])
    md = open(os.path.join(results, "summary.md")).read()
    assert rows_of(md, "corl: D4RL v2 last", "hopper-medium-v2")["iql"].startswith("30.0 ± 0.0 [30.0, 30.0]")
    assert aggregate_rows(md)["iql"]["final evaluation (episodes per run)"] == "4"
    assert aggregate_rows(md)["iql"]["IQM [95% CI]"] == "30.0 [30.0, 30.0]"
    assert aggregate_rows(md)["bc"]["final evaluation (episodes per run)"] == "?"  # results.json without them
    assert "Final, not best" in md and "No hyperparameter was tuned" in md
    assert "2 runs on NVIDIA H100 80GB HBM3, torch 2.5.1" in md and "1 runs on unknown, torch unknown" in md
    with open(os.path.join(results, "runs.csv")) as f:
        rows = {(r["algorithm"], r["seed"]): r for r in csv.DictReader(f)}
    assert rows[("iql", "0")]["torch"] == "2.5.1" and rows[("iql", "0")]["device"] == "NVIDIA H100 80GB HBM3"
    assert float(rows[("iql", "0")]["train_hours_per_1M_steps"]) == 2.0 and rows[("iql", "0")]["final_episodes"] == "4"
    assert rows[("bc", "0")]["torch"] == rows[("bc", "0")]["device"] == "unknown"
    assert float(rows[("bc", "0")]["train_hours_per_1M_steps"]) == 4.0


def rows_of(md: str, table: str, dataset: str) -> dict[str, str]:
    section = md.split(f"### {table}")[1].split("###")[0]
    header = next(line for line in section.splitlines() if line.startswith("| paper dataset"))
    line = next(line for line in section.splitlines() if line.startswith(f"| {dataset} |"))
    return dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in line.split("|")]))


@pytest.mark.parametrize("content", ["", "{", "[1, 2]", "null", '{"env": "x"}', '{"finished": true, "args": null}'])
def test_a_results_json_that_is_not_a_runs_is_left_out_of_the_summary_and_rerun_by_the_benchmark(
        content, capsys, tmp_path):
    runs, out = str(tmp_path / "runs"), str(tmp_path / "results")
    write_results(runs, "bc", "local/hopper/medium-v0", 0, [1.0], total_steps=50)
    write_results(runs, "bc", "local/hopper/medium-v0", 1, [1.0], total_steps=50)
    with open(os.path.join(runs, benchmark.run_name("bc", "local/hopper/medium-v0", 1), "results.json"), "w") as f:
        f.write(content)
    with open(os.path.join(runs, summarize.QUICK_PROFILE_FILE), "w") as f:
        f.write("{")  # damaged
    summarize.main([runs, "--out", out])
    said = capsys.readouterr().out
    assert "skipping" in said and "not the results.json of a run" in said and "not a quick profile" in said
    with open(os.path.join(out, "runs.csv")) as f:
        assert [row["seed"] for row in csv.DictReader(f)] == ["0"]
    argv = ["--algos", "bc", "--datasets", "local/hopper/medium-v0", "--seeds", "0", "1", "--steps", "50",
            "--output-dir", runs]
    if content == '{"finished": true, "args": null}':  # finished, but of no known settings: refused
        with pytest.raises(UserError, match="is a finished run of None steps"):
            benchmark.main(["--dry-run", *argv])
        return
    lines = dry_run(capsys, *argv)
    assert [line.split("--run-name ")[1] for line in lines] == ["bc__local-hopper-medium-v0__s1"]


def test_summarize_out_that_is_a_file_is_one_line(tmp_path):
    runs = str(tmp_path / "runs")
    write_results(runs, "bc", "local/hopper/medium-v0", 0, [1.0])
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"--out .*file cannot be a folder written here"):
        summarize.main([runs, "--out", str(tmp_path / "file")])


def test_slurm_arrays_keep_task_indices_within_slurms_default_limit(capsys, tmp_path, monkeypatch):
    """Slurm refuses array indices above MaxArraySize - 1 (1000 by default): a selection of more runs is
    submitted as arrays of indices from 0 with an offset, and each task runs the run offset + its index."""
    assert benchmark.array_chunks([0, 1, 2, 5]) == [(0, [0, 1, 2, 5])]
    assert benchmark.array_chunks(list(range(998, 1003)) + [2500]) == [(0, [998, 999, 1000]), (1001, [0, 1]),
                                                                       (2500, [0])]
    monkeypatch.setattr(benchmark, "SLURM_MAX_ARRAY_INDEX", 1)  # the same, at a size a test can run
    fake_datasets(monkeypatch, tmp_path, "local/hopper/medium-v0")
    out, script = tmp_path / "runs", tmp_path / "job.sbatch"
    argv = ["--algos", "bc", "--datasets", "local/hopper/medium-v0", "--seeds", "0", "1", "2", "3", "4",
            "--steps", "50", "--output-dir", str(out)]
    commands = [line.split(" python ", 1)[1] for line in dry_run(capsys, *argv)]
    fake_bin = tmp_path / "bin"
    fake_command(fake_bin, "python", 'echo "$@" > "$RECORD"\n')
    fake_command(fake_bin, "sbatch", 'echo "$@" >> "$CALLS"\necho 7\n')
    monkeypatch.setattr(sys, "executable", str(fake_bin / "python"))
    assert benchmark.main([*argv, "--slurm", str(script)]) == 0
    monkeypatch.undo()
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "CALLS": str(tmp_path / "calls"), "RECORD": str(tmp_path / "record")}
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[:3] == [f"--parsable --array=0-1 --mem=8G {script}",
                         f"--parsable --array=0-1 --mem=8G --export=ALL,RUN_OFFSET=2 {script}",
                         f"--parsable --array=0 --mem=8G --export=ALL,RUN_OFFSET=4 {script}"]
    for offset, task, run in ((0, 1, 1), (2, 0, 2), (2, 1, 3), (4, 0, 4)):
        subprocess.run(["bash", str(script)], check=True, capture_output=True,
                       env={**env, "SLURM_ARRAY_TASK_ID": str(task), **({"RUN_OFFSET": str(offset)} if offset else {})})
        assert (tmp_path / "record").read_text().strip() == commands[run]


def test_a_slurm_submission_refused_halfway_cancels_what_it_submitted(capsys, tmp_path, monkeypatch):
    fake_datasets(monkeypatch, tmp_path, "local/hopper/medium-v0", "D4RL/pen/human-v2")
    script = tmp_path / "job.sbatch"
    assert benchmark.main(["--algos", "bc", "--datasets", "local/hopper/medium-v0", "D4RL/pen/human-v2", "--seeds",
                           "0", "--steps", "50", "--output-dir", str(tmp_path / "runs"), "--slurm", str(script)]) == 0
    fake_bin = tmp_path / "bin"
    n = tmp_path / "n"
    # the first array is taken (job 101), the second refused
    fake_command(fake_bin, "sbatch", f'n=$(($(cat {n} 2>/dev/null || echo 100) + 1))\necho $n > {n}\n'
                 f'if [ $n -gt 101 ]; then echo "sbatch: error: Batch job submission failed" >&2; exit 1; fi\n'
                 'echo "$n;cluster"\n')
    fake_command(fake_bin, "scancel", 'echo "$@" >> "$CANCELLED"\n')
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "CANCELLED": str(tmp_path / "cancelled")}
    submitted = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert submitted.returncode != 0
    assert (tmp_path / "cancelled").read_text().split() == ["101"]
    assert "submission refused: cancelled the 1 array job(s) it had submitted" in submitted.stderr


def test_a_cell_is_the_mean_and_the_std_over_seeds_of_each_seeds_mean():
    """Under the mean-of-the-last-10 rule, the spread between one seed's evaluations is not spread over
    seeds: two seeds alternating 0 and 20 agree exactly."""
    assert summarize.cell([[0.0, 20.0] * 5, [20.0, 0.0] * 5]).startswith("10.0 ± 0.0 ")
    assert summarize.cell([[10.0] * 10, [30.0] * 10]).startswith("20.0 ± 10.0 ")
    assert summarize.cell([[42.0]]) == "42.0"


def test_repeated_seeds_run_once_and_slurm_takes_unlimited_time_and_paths_with_spaces(capsys, tmp_path, monkeypatch):
    lines = dry_run(capsys, "--algos", "bc", "--datasets", "local/hopper/medium-v0", "--seeds", "0", "0", "1",
                    "--steps", "50", "--output-dir", str(tmp_path / "runs"))
    assert [line.split("--run-name ")[1] for line in lines] == ["bc__local-hopper-medium-v0__s0",
                                                                "bc__local-hopper-medium-v0__s1"]
    fake_datasets(monkeypatch, tmp_path, "local/hopper/medium-v0")
    out, script = tmp_path / "my runs", tmp_path / "job.sbatch"
    assert benchmark.main(["--algos", "bc", "--datasets", "local/hopper/medium-v0", "--seeds", "0", "--steps", "50",
                           "--output-dir", str(out), "--slurm", str(script), "--time", "UNLIMITED"]) == 0
    text = script.read_text()
    assert "#SBATCH --time=UNLIMITED\n" in text
    assert f'#SBATCH --output="{out}/slurm-logs/%A_%a.log"\n' in text  # sbatch keeps a quoted path together
