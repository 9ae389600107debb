"""benchmark.sh / tools/benchmark.py / tools/summarize.py: commands, resume, Slurm, summary numbers."""

import csv
import json
import os
import subprocess

import pytest

from conftest import ROOT
from common import UserError
from tools import benchmark, summarize


def dry_run(capsys, *argv) -> list[str]:
    """The command lines a dry run prints (comment lines dropped)."""
    assert benchmark.main(["--dry-run", *argv]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]


def write_results(folder, algo, env, seed, scores, total_steps=1_000_000, finished=True):
    """A results.json like common.Run writes, with one evaluation per score."""
    run_dir = os.path.join(folder, benchmark.run_name(algo, env, seed))
    os.makedirs(run_dir, exist_ok=True)
    evaluations = [{"step": 1000 * (i + 1), "return_mean": 10.0 * s, "return_std": 0.0,
                    "normalized_score_mean": s, "normalized_score_std": 0.0, "wall_time": float(i)}
                   for i, s in enumerate(scores)]
    results = {"algorithm": algo, "env": env, "seed": seed, "args": {"total_steps": total_steps},
               "dataset": {"transitions": 1000, "episodes": 10, "ref_min_score": 0.0, "ref_max_score": 1.0,
                           "ref_scores_source": "dataset"},
               "evaluations": evaluations, "final_return": evaluations[-1]["return_mean"],
               "final_normalized_score": scores[-1], "finished": finished, "train_seconds": 1.0}
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)  # indented as common.atomic_write_json does: the sbatch grep relies on it


def test_dry_run_lists_the_expected_commands(capsys, tmp_path):
    out = str(tmp_path / "runs")
    lines = dry_run(capsys, "--algos", "iql", "fisher_brc", "--datasets", "hopper-medium-v2", "D4RL/pen/human-v2",
                    "--seeds", "0", "1", "--steps", "100", "--bc-steps", "10", "--workers", "2",
                    "--output-dir", out)
    threads = max(1, (os.cpu_count() or 1) // 2)
    expected = []
    for env in ("mujoco/hopper/medium-v0", "D4RL/pen/human-v2"):  # hopper-medium-v2's stand-in
        for algo in ("iql", "fisher_brc"):
            for seed in (0, 1):
                bc = " --bc-steps 10" if algo == "fisher_brc" else ""  # iql has no behaviour phase
                expected.append(f"OMP_NUM_THREADS={threads} python algorithms/{algo}.py --env {env} --seed {seed} "
                                f"--total-steps 100{bc} --eval-every 5000 --eval-episodes 10 --output-dir {out} "
                                f"--run-name {algo}__{env.replace('/', '-')}__s{seed}")
    lines = [" ".join(t for t in line.split() if not t.startswith("CUDA_VISIBLE_DEVICES=")) for line in lines]
    assert lines == expected


def test_bc_steps_reach_every_file_with_a_behaviour_phase(capsys, tmp_path):
    # ARQ declares it as Optional[int] (its default depends on the domain); it must still get it.
    algos = ["bc", "iql", "cql", "fisher_brc", "itrpo", "brac_plus", "arq"]
    lines = dry_run(capsys, "--algos", *algos, "--datasets", "local/hopper/medium-v0", "--seeds", "0",
                    "--steps", "100", "--bc-steps", "7", "--output-dir", str(tmp_path))
    with_bc = {line.split("algorithms/")[1].split(".py")[0] for line in lines if "--bc-steps 7" in line}
    assert with_bc == {"cql", "fisher_brc", "itrpo", "brac_plus", "arq"}


def test_quick_dry_run_uses_the_documented_budgets(capsys, tmp_path):
    lines = dry_run(capsys, "--quick", "--output-dir", str(tmp_path))
    assert len(lines) == len(benchmark.QUICK_BUDGETS) * len(benchmark.QUICK_DATASETS) * len(benchmark.QUICK_SEEDS)
    for line in lines:
        assert line.startswith("OMP_NUM_THREADS=1 ")
        assert f"MINARI_DATASETS_PATH={tmp_path}/datasets" in line  # never the user's full-size local datasets
        algo = line.split("algorithms/")[1].split(".py")[0]
        steps, bc_steps = benchmark.QUICK_BUDGETS[algo]
        assert f"--total-steps {steps} --" in line
        assert f"--eval-every {steps // 10} --eval-episodes 5" in line
        assert (f"--bc-steps {bc_steps}" in line) == (bc_steps is not None)


@pytest.mark.parametrize("argv, message", [
    (["--algos", "iqll"], "unknown algorithm 'iqll' (did you mean iql?)"),
    (["--datasets", "hopper-medum-v2"], "unknown dataset 'hopper-medum-v2'; close matches: hopper-medium-v2"),
    (["--datasets", "walker2d-random-v2"], "paper dataset 'walker2d-random-v2' has no stand-in"),
    (["--quick", "--datasets", "mujoco/hopper/medium-v0"], "--quick runs offline"),
    (["--steps", "0"], "--steps must be positive"),
])
def test_bad_selection_is_one_clear_error(argv, message, tmp_path):
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


def test_slurm_script_runs_the_same_commands(capsys, tmp_path):
    out = str(tmp_path / "runs")
    argv = ["--algos", "bc", "cql", "--datasets", "local/hopper/medium-v0", "--seeds", "0", "1", "--steps", "50",
            "--bc-steps", "5", "--output-dir", out]
    write_results(out, "cql", "local/hopper/medium-v0", 1, [1.0], total_steps=50)
    commands = [line.split(" python ", 1)[1] for line in dry_run(capsys, *argv)]
    script = str(tmp_path / "job.sbatch")
    assert benchmark.main([*argv, "--slurm", script]) == 0
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    assert len(commands) == 3 and "#SBATCH --array=0-2%1" in text
    for command in commands:
        assert f"'python {command}'" in text
    # Each array task runs its own command: a fake `python` records what it was given.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python").write_text("#!/bin/sh\necho \"$@\" > \"$RECORD\"\n")
    (fake_bin / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "RECORD": str(tmp_path / "record")}
    for task, command in enumerate(commands):
        subprocess.run(["bash", script], env={**env, "SLURM_ARRAY_TASK_ID": str(task)}, check=True)
        assert (tmp_path / "record").read_text().strip() == command
    # A task whose run finished since the script was written is skipped.
    write_results(out, "bc", "local/hopper/medium-v0", 0, [1.0], total_steps=50)
    done = subprocess.run(["bash", script], env={**env, "SLURM_ARRAY_TASK_ID": "0"}, capture_output=True, text=True)
    assert done.returncode == 0 and "already finished" in done.stdout


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
    assert fbrc["iql"] == "62.0 ± 1.4"
    assert fbrc["our data"] == "`local/hopper/medium-v0` (stand-in)"
    assert fbrc["fisher_brc"] == "— (99.4 ± 0.3)" and fbrc["BRAC-p (paper)"] == "31.2"
    # iTRPO: last 10 evaluations of the first 4 seeds pooled (60..63 x 10): 61.5 ± 1.1, inside 63.6 ± 2 x 2.9.
    itrpo = row("itrpo: Table 2", "hopper-medium-v2")
    assert itrpo["iql"] == "61.5 ± 1.1 (63.6 ± 2.9)"
    # td3_bc: 2 seeds of 5,000 steps, 120 vs 59.0 ± 0.7: flagged high, and marked as short of the protocol.
    assert itrpo["td3_bc"] == "120.0 ± 0.0 ⚠ high † (59.0 ± 0.7)"
    assert "td3_bc: 2 seeds, 5,000 steps, fewer than 10 evaluations" in md
    # CORL: last evaluation, 4 seeds (60..63): 61.5 is more than 5 points under 67.5 (no std given).
    assert row("corl: D4RL v2 last", "hopper-medium-v2")["iql"] == "61.5 ± 1.1 ⚠ low (67.5)"
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


def test_reference_data_is_consistent():
    """Every paper row has a known rule, a mapped algorithm file or none, and a dataset mapping."""
    with open(os.path.join(ROOT, "benchmarks", "paper_scores.csv")) as f:
        scores = list(csv.DictReader(f))
    with open(os.path.join(ROOT, "benchmarks", "datasets.csv")) as f:
        mapping = {r["paper_dataset"]: r for r in csv.DictReader(f)}
    algos = set(benchmark.algorithm_names()) | {"arq"}  # arq.py is being written
    for row in scores:
        assert row["paper_dataset"] in mapping, row
        assert row["algo"] in algos | {""}, row
        float(row["score_mean"])
        assert row["final_score_rule"] in summarize.RULES or row["final_score_rule"].startswith(
            ("borrowed:", "not stated")), row
    for row in mapping.values():
        assert row["relation"] in ("same", "port", "stand-in", "none")
        assert bool(row["minari_id"]) == (row["relation"] != "none")


def test_quick_mode_end_to_end(tmp_path):
    out, results = str(tmp_path / "runs"), str(tmp_path / "results")
    argv = ["benchmark.sh", "--quick", "--algos", "bc", "--datasets", "local/pendulum/medium-v0", "--seeds", "0",
            "--steps", "20", "--eval-every", "10", "--eval-episodes", "1", "--output-dir", out,
            "--results-dir", results]
    env = {**os.environ, "LOCAL_DATASET_TRANSITIONS": "400", "OMP_NUM_THREADS": "1"}
    first = subprocess.run(["bash", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stdout + first.stderr
    with open(os.path.join(out, "bc__local-pendulum-medium-v0__s0", "results.json")) as f:
        assert json.load(f)["finished"]
    md = open(os.path.join(results, "summary.md")).read()
    assert "| `local/pendulum/medium-v0` | (no paper dataset) | — | 400 |" in md
    assert "| `local/pendulum/medium-v0` | bc | 1 |" in md
    # Resume: nothing left to run.
    again = subprocess.run(["bash", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0 and "1 already finished, 0 to do" in again.stdout
