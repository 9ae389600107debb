"""Long runs: each file at the papers' budget (or the step budget of RUNS) on the offline-built datasets.

    python tools/long_runs.py run --runs-dir ~/long_runs      # runs them, two at a time, one thread each
    python tools/long_runs.py collect --runs-dir ~/long_runs  # their small results into docs/long_runs/
    python tools/long_runs.py report                          # the tables (markdown) and the figures

`run` starts or continues every run of RUNS in list order: each is one command line
    OMP_NUM_THREADS=1 python algorithms/<algo>.py --env <dataset> --seed <s> --total-steps <n> \
        --eval-every 10000 --eval-episodes 10 --output-dir <runs-dir> --run-name <name> --save-model
so an interrupted `run` resumes every run from its last checkpoint (one every 10k steps) when the same
command is given again, and a finished run is skipped, as is one whose finished results are collected
in docs/long_runs/ (its folder may be gone). Each run's console goes to <runs-dir>/<name>.out.

`collect` copies what the report needs into docs/long_runs/<name>.json (the evaluations, the logged
mean Q of dataset actions, the run's flags and time), finished or not, so that the results survive
the run folders; a run that restarted (its folder lost) does not replace a collected record with more
evaluations until it has caught up. A record whose `earlier_defaults` lists flags ran before a file's
defaults changed (those flags give its run with today's file): it is not the run RUNS asks for, so
`run` starts that run again, and `collect` replaces the record with it: before its first evaluation
with the pretraining phase and step its checkpoint has reached (the row says so), then with its
evaluations; until then `report` names the earlier flags in the row. `report` reads only those
files: a table per dataset (file, steps, final = mean of the last 10 evaluations, best evaluation,
largest logged mean Q) and a figure per dataset, docs/long-<dataset>.png.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import io
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import UserError, atomic_write, install_user_error_hook, lock_folder, write_json  # noqa: E402

DOCS = os.path.join(ROOT, "docs")
COLLECTED = os.path.join(DOCS, "long_runs")
EVAL_EVERY, EVAL_EPISODES = 10_000, 10
HOPPER = "local/hopper/medium-replay-v0"
HALFCHEETAH = "local/halfcheetah/medium-replay-v0"
WALKER2D = "local/walker2d/medium-replay-v0"
# (algorithm, dataset, seed, gradient steps, flags beyond the file's defaults), in the order they run.
# BC, TD3+BC, IQL and AWR train for the papers' 1M steps. The other five train for a step budget that
# their per-step cost allows on one CPU core (their pretraining phases are the papers' full length):
# CQL and BRAC+ 50k, Fisher-BRC, iTRPO and ARQ 100k. BRAC+ runs at the authors' code's sizes (every
# network 256 wide); ARQ with the probability-flow ODE sampler (20 steps): the paper's
# predictor-corrector would take about 13 hours for this support (90k states x 30) on one core
# (docs/speed.md, ARQ), the ODE sampler about 3.
RUNS: list[tuple[str, str, int, int, list[str]]] = [
    ("bc", HOPPER, 0, 1_000_000, []),
    ("td3_bc", HOPPER, 0, 1_000_000, []),
    ("bc", HOPPER, 1, 1_000_000, []),
    ("fisher_brc", HOPPER, 0, 100_000, []),
    # the second seeds of the two files that collapsed with standardised states, each after a behaviour
    # model of its own: Fisher-BRC trains one per --seed; iTRPO shares one (--bc-seed 0) by default, as
    # its code loads one checkpoint in every run, so its seed 1 names its own
    ("fisher_brc", HOPPER, 1, 100_000, []),
    ("itrpo", HOPPER, 1, 100_000, ["--bc-seed", "1"]),
    ("cql", HOPPER, 0, 50_000, []),
    ("iql", HOPPER, 0, 1_000_000, []),
    ("itrpo", HOPPER, 0, 100_000, []),
    # HalfCheetah (where BC needs 400k steps to reach the behaviour average) first, with BC's curve;
    # then ARQ beside the 1M-step runs (its score model, support set and RL steps take longer than any
    # other run), BRAC+ (2 steps/s at these sizes), the second seeds; last, TD3+BC seed 1 and AWR seed 0,
    # collected to 830k and 890k without their checkpoints: they would start again at step 0
    ("bc", HALFCHEETAH, 0, 1_000_000, []),
    ("td3_bc", HALFCHEETAH, 0, 1_000_000, []),
    ("iql", HALFCHEETAH, 0, 1_000_000, []),
    ("arq", HOPPER, 0, 100_000, ["--sampler", "ode"]),
    ("bc", WALKER2D, 0, 1_000_000, []),
    ("td3_bc", WALKER2D, 0, 1_000_000, []),
    ("iql", WALKER2D, 0, 1_000_000, []),
    ("brac_plus", HOPPER, 0, 50_000, ["--actor-hidden-dim", "256", "--vae-hidden-dim", "256"]),
    ("iql", HOPPER, 1, 1_000_000, []),
    ("awr", HOPPER, 1, 1_000_000, []),
    ("awr", HOPPER, 0, 1_000_000, []),
    ("td3_bc", HOPPER, 1, 1_000_000, []),
    # CQL's second seed (about 2.6 hours on one core)
    ("cql", HOPPER, 1, 50_000, []),
]
# the flag that sets each pretraining phase's length
PHASE_STEPS = {"behaviour model": "bc_steps", "score model": "bc_steps", "initial policy": "pretrain_steps",
               "Q initialisation": "pretrain_steps"}
ORDER = ["bc", "td3_bc", "awr", "iql", "cql", "fisher_brc", "itrpo", "brac_plus", "arq"]


def run_name(algo: str, dataset: str, seed: int) -> str:
    return f"{dataset.removeprefix('local/').replace('/', '-')}__{algo}__{seed}"


def command(algo: str, dataset: str, seed: int, steps: int, flags: list[str], runs_dir: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "algorithms", f"{algo}.py"), "--env", dataset, "--seed", str(seed),
            "--total-steps", str(steps), "--eval-every", str(EVAL_EVERY), "--eval-episodes", str(EVAL_EPISODES),
            "--output-dir", runs_dir, "--run-name", run_name(algo, dataset, seed), "--save-model", *flags]


def run_all(runs_dir: str, workers: int) -> None:
    os.makedirs(runs_dir, exist_ok=True)
    # a second scheduler would skip the runs in progress and start `workers` more
    lock = lock_folder(runs_dir, "it runs these runs already; wait for it to end, or pass another --runs-dir")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def one(spec) -> None:
        name = run_name(*spec[:3])
        if collected_finished(spec):
            print(f"[long_runs] {name}: finished, collected in {os.path.relpath(COLLECTED, ROOT)}/", flush=True)
            return
        cmd = command(*spec, runs_dir)
        earlier = earlier_defaults(spec, folder_args(os.path.join(runs_dir, name)))
        if earlier:  # resuming it would be refused: its flags are not today's
            print(f"[long_runs] {name}: its folder ran with earlier defaults ({' '.join(earlier)}); "
                  f"starting it over", flush=True)
            cmd += ["--resume", "never"]
        print(f"[long_runs] {time.strftime('%H:%M:%S')} start {name}", flush=True)
        with open(os.path.join(runs_dir, f"{name}.out"), "a") as out:
            rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        print(f"[long_runs] {time.strftime('%H:%M:%S')} end {name} (exit {rc})", flush=True)

    with lock, concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, RUNS))


def read_collected(name: str) -> dict | None:
    path = os.path.join(COLLECTED, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def same_budget(record: dict | None, steps: int, flags: list[str]) -> bool:
    """Whether `record` is of the run RUNS asks for: its steps and flags, with today's defaults."""
    return (bool(record) and record["total_steps"] == steps and record["flags"] == flags
            and not record.get("earlier_defaults"))


def collected_finished(spec) -> bool:
    """Whether this run (same steps and flags) finished and its results are in docs/long_runs/."""
    algo, dataset, seed, steps, flags = spec
    old = read_collected(run_name(algo, dataset, seed))
    return same_budget(old, steps, flags) and old["finished"]


def folder_args(run_dir: str) -> dict | None:
    """The args a run folder's run was started with: its results.json's, else its checkpoint's (a run
    still in a pretraining phase has only that); None for a folder with neither."""
    from common import UserError, load_file

    try:
        with open(os.path.join(run_dir, "results.json")) as f:
            return json.load(f).get("args")
    except (OSError, ValueError, AttributeError):
        pass
    path = os.path.join(run_dir, "checkpoint.pt")
    try:
        return load_file(path).get("args") if os.path.exists(path) else None
    except UserError:
        return None


def earlier_defaults(spec, ran_with: dict | None) -> list[str]:
    """The flags in which a run's recorded args differ from what its RUNS command gives with the file
    as it is now: empty for a run of today's defaults. Not compared: fields the file fills in itself
    (None in the command's parse), the flags that change nothing trained, and flags the run's args
    lack (added since: what the run did instead is the file's history, not a flag)."""
    import importlib.util

    import tyro

    from common import RESUME_FREE_FLAGS

    algo, dataset, seed, steps, flags = spec
    if not isinstance(ran_with, dict):
        return []
    path = os.path.join(ROOT, "algorithms", f"{algo}.py")
    module_spec = importlib.util.spec_from_file_location(f"long_runs_{algo}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cli = command(algo, dataset, seed, steps, flags, "runs")[2:]
    now = vars(tyro.cli(module.Args, args=[a for a in cli if a != "--save-model"] + ["--save-model"]))
    differ = [k for k, v in now.items() if v is not None and k not in RESUME_FREE_FLAGS
              and k in ran_with and ran_with[k] != v]
    return [f"--{k.replace('_', '-')} {ran_with[k]}" if not isinstance(v, bool) else
            f"--{'' if ran_with[k] else 'no-'}{k.replace('_', '-')}" for k in differ for v in (now[k],)]


def logged_q(run_dir: str) -> list[list[float]]:
    """(step, value) of every logged `losses/q1` (mean Q of the batch's dataset actions)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        if "losses/q1" in acc.Tags()["scalars"]:
            points.update({e.step: e.value for e in acc.Scalars("losses/q1")})  # a resumed run logs a step again
    return [[s, points[s]] for s in sorted(points)]


def pretraining(run_dir: str) -> dict | None:
    """Where a run in a pretraining phase stands: its checkpoint's phase, step, the phase's length
    (None where the file names it otherwise) and args; None for a folder without such a checkpoint."""
    from common import UserError, load_file

    path = os.path.join(run_dir, "checkpoint.pt")
    try:
        saved = load_file(path) if os.path.exists(path) else None
    except UserError:
        return None
    if not isinstance(saved, dict) or saved.get("phase") is None:
        return None
    args = saved.get("args") if isinstance(saved.get("args"), dict) else {}
    return {"phase": saved["phase"], "step": saved["step"], "of": args.get(PHASE_STEPS.get(saved["phase"])),
            "args": args}


def collect(runs_dir: str) -> None:
    written = 0
    for algo, dataset, seed, steps, flags in RUNS:
        name = run_name(algo, dataset, seed)
        path = os.path.join(runs_dir, name, "results.json")
        results = None
        if os.path.exists(path):
            try:
                with open(path) as f:
                    results = json.load(f)
                if not (isinstance(results, dict) and isinstance(results.get("evaluations"), list)
                        and isinstance(results.get("dataset"), dict)):
                    raise TypeError
            except (OSError, ValueError, TypeError) as exc:
                print(f"{path} is not the results.json of a run ({type(exc).__name__}); left out", flush=True)
                results = None
        if not (results and results["evaluations"]):
            # before its first evaluation, a run of today's defaults replaces a record of earlier ones
            # (or none, or one without evaluations) with the phase and step of its checkpoint: the row
            # is today's run, unfinished
            old, where = read_collected(name), pretraining(os.path.join(runs_dir, name))
            if where and not (same_budget(old, steps, flags) and old["evaluations"]) and not earlier_defaults(
                    (algo, dataset, seed, steps, flags), where["args"]):
                write_json(os.path.join(COLLECTED, f"{name}.json"), {
                    "algorithm": algo, "env": dataset, "seed": seed, "total_steps": steps, "flags": flags,
                    "finished": False, "pretraining": {k: where[k] for k in ("phase", "step", "of")},
                    "train_seconds": None, "evaluations": [], "q1": []})
                written += 1
                continue
        if results is None:
            continue
        info = results["dataset"]
        lo, hi = info.get("ref_min_score"), info.get("ref_max_score")
        behaviour = None if lo is None else 100 * (info["episode_return_mean"] - lo) / (hi - lo)
        evaluations = [[e["step"], e["normalized_score_mean"], e["normalized_score_std"]]
                       for e in results["evaluations"]]
        old, finished = read_collected(name), bool(results.get("finished"))
        earlier = earlier_defaults((algo, dataset, seed, steps, flags), results.get("args"))
        if "args" not in results and old:  # nothing to compare: what was said of the run stays
            earlier = old.get("earlier_defaults", [])
        if old and not evaluations or same_budget(old, steps, flags) and (
                len(old["evaluations"]) > len(evaluations) or (old["finished"] and not finished)):
            # a run that restarted from scratch (its folder lost, or its defaults changed) has not
            # caught up yet, or has nothing to show yet
            print(f"[long_runs] {name}: kept the collected record ({len(old['evaluations'])} evaluations"
                  f"{', finished' if old['finished'] else ''}) over the run folder's {len(evaluations)}; "
                  f"delete {os.path.relpath(COLLECTED, ROOT)}/{name}.json to replace it")
            continue
        write_json(os.path.join(COLLECTED, f"{name}.json"), {
            "algorithm": algo, "env": dataset, "seed": seed, "total_steps": steps, "flags": flags,
            "finished": finished, **({"earlier_defaults": earlier} if earlier else {}),
            # the main loop's training time (evaluations and pretraining phases excluded), None for a
            # run folder whose results.json predates that field; not the process's wall time
            "train_seconds": results.get("train_seconds"),
            "behaviour_score": behaviour, "transitions": info["transitions"],
            "evaluations": evaluations,
            "q1": logged_q(os.path.dirname(path)),
        })
        written += 1
    print(f"[long_runs] {written} runs -> {os.path.relpath(COLLECTED, ROOT)}/")


def load_collected() -> list[dict]:
    runs = []
    for path in sorted(glob.glob(os.path.join(COLLECTED, "*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def summary(runs: list[dict]) -> dict:
    """Over the seeds of one file on one dataset: the curve at the steps every seed reached, the final
    (mean of the last 10 evaluations) and best (highest evaluation of the mean curve) scores."""
    curves = [{s: v for s, v, _ in r["evaluations"]} for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    values = np.array([[c[s] for s in steps] for c in curves])
    finals = values[:, -10:].mean(1)
    mean = values.mean(0)
    return {"steps": steps, "values": values, "final": finals.mean(), "final_std": finals.std(),
            "best": mean.max(), "best_step": steps[int(mean.argmax())], "seeds": len(runs),
            "max_q": max((v for r in runs for _, v in r["q1"]), default=float("nan")),
            "finished": all(r["finished"] for r in runs),
            "hours": np.mean([r["train_seconds"] for r in runs if r["train_seconds"] is not None] or [np.nan]) / 3600}


def report() -> None:
    collected = load_collected()
    runs = [r for r in collected if r["evaluations"]]
    # runs still in a pretraining phase: a row (or a seed in one) that says where they stand
    waiting = [r for r in collected if not r["evaluations"] and r.get("pretraining")]
    if not runs and not waiting:
        raise UserError(f"nothing collected in {os.path.relpath(COLLECTED, ROOT)}/: run `collect` first")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def standing(r: dict) -> str:
        at = r["pretraining"]
        of = f" of {at['of']:,}" if at.get("of") else ""
        return f"{at['phase']} step {at['step']:,}{of}"

    for dataset in sorted({r["env"] for r in runs + waiting}):
        mine = [r for r in runs if r["env"] == dataset]
        pending = [r for r in waiting if r["env"] == dataset]
        algos = [a for a in ORDER if any(r["algorithm"] == a for r in mine)]
        # seeds that finished, where any did; the others are named in the steps cell
        stats, others = {}, {}
        for a in algos:
            seeds = [r for r in mine if r["algorithm"] == a]
            done = [r for r in seeds if r["finished"]] or seeds
            stats[a] = summary(done)
            # seeds not in the summary, or ahead of the steps every seed reached
            others[a] = [f"seed {r['seed']} at {r['evaluations'][-1][0]:,}" for r in seeds
                         if r not in done or r["evaluations"][-1][0] > stats[a]["steps"][-1]]
            others[a] += [f"seed {r['seed']} at {standing(r)}" for r in pending if r["algorithm"] == a]
            stats[a]["ahead"] = [r for r in done if r["evaluations"][-1][0] > stats[a]["steps"][-1]]
        if mine:
            behaviour = mine[0]["behaviour_score"]
            print(f"\n### `{dataset}` ({mine[0]['transitions']:,} transitions; behaviour average {behaviour:.1f})\n")
        else:
            print(f"\n### `{dataset}`\n")
        print("| file | seeds | steps | final (last 10 evaluations) | best evaluation (step) | largest mean Q | hours per run |")
        print("|---|---|---|---|---|---|---|")
        for a in [a for a in ORDER if a in algos or any(r["algorithm"] == a for r in pending)]:
            if a not in algos:
                seeds = [r for r in pending if r["algorithm"] == a]
                where = "; ".join(standing(r) if len(seeds) == 1 else f"seed {r['seed']} at {standing(r)}"
                                  for r in seeds)
                print(f"| {a} | {len(seeds)} | unfinished, no evaluation yet: {where} | — | — | — | — |")
                continue
            s = stats[a]
            earlier = sorted({" ".join(r["earlier_defaults"]) for r in mine
                              if r["algorithm"] == a and r.get("earlier_defaults")})
            name = f"{a} (earlier defaults: {'; '.join(earlier)})" if earlier else a
            pm = f" ± {s['final_std']:.1f}" if s["seeds"] > 1 else ""
            # "unfinished", not "running": a run's folder may be gone, and its record is then where it stopped
            steps = f"{s['steps'][-1]:,}" + ("" if s["finished"] else " (unfinished)")
            if others[a]:
                steps += f" ({', '.join(others[a])}, unfinished)" if s["finished"] else ""
                steps = steps.replace(" (unfinished)", f" (unfinished; {', '.join(others[a])})")
            q = "—" if np.isnan(s["max_q"]) else f"{s['max_q']:.0f}"
            hours = "—" if np.isnan(s["hours"]) else f"{s['hours']:.1f}"
            print(f"| {name} | {s['seeds']} | {steps} | {s['final']:.1f}{pm} | {s['best']:.1f} ({s['best_step']:,}) | "
                  f"{q} | {hours} |")
        if not mine:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.axhline(behaviour, color="black", lw=1, ls=":", label=f"behaviour average ({behaviour:.1f})")
        for i, a in enumerate(algos):
            s = stats[a]
            style = {"color": "gray", "ls": "--"} if a == "bc" else {"color": f"C{i}"}
            earlier = any(r.get("earlier_defaults") for r in mine if r["algorithm"] == a)
            ax.plot(s["steps"], s["values"].mean(0), lw=1.2, **style,
                    label=f"{a} ({s['seeds']} seed{'s' * (s['seeds'] > 1)}{', earlier defaults' * earlier})")
            if s["seeds"] > 1:
                ax.fill_between(s["steps"], s["values"].min(0), s["values"].max(0), alpha=0.15, color=style["color"])
            for r in s["ahead"]:  # a seed beyond the steps every seed reached: its own curve, thinner
                steps, values = zip(*[(e[0], e[1]) for e in r["evaluations"] if e[0] >= s["steps"][-1]])
                ax.plot(steps, values, lw=0.7, alpha=0.8, color=style["color"], ls=style.get("ls", "-"),
                        label=f"{a} seed {r['seed']} alone")
        ax.set_xlabel("gradient steps")
        ax.set_ylabel("normalised score")
        ax.set_title(f"{dataset}: mean and range over seeds, {EVAL_EPISODES} episodes every {EVAL_EVERY:,} steps",
                     fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        name = "long-" + dataset.removeprefix("local/").replace("/", "-") + ".png"
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        atomic_write(os.path.join(DOCS, name), buf.getvalue())
        print(f"\n![{dataset}]({name})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="start or continue every long run")
    r.add_argument("--runs-dir", required=True, help="folder of the run folders (outside the repository)")
    r.add_argument("--workers", type=int, default=2, help="runs at a time, one thread each (default 2)")
    c = sub.add_parser("collect", help="copy the runs' small results into docs/long_runs/")
    c.add_argument("--runs-dir", required=True)
    sub.add_parser("report", help="print the tables and write the figures from docs/long_runs/")
    sub.add_parser("commands", help="print the command line of every run")
    args = p.parse_args(argv)
    if args.cmd == "run":
        if args.workers < 1:
            raise UserError("--workers must be at least 1")
        run_all(os.path.abspath(os.path.expanduser(args.runs_dir)), args.workers)
    elif args.cmd == "collect":
        folder = os.path.expanduser(args.runs_dir)
        if not os.path.isdir(folder):
            raise UserError(f"no such folder of runs: {folder}")
        collect(folder)
    elif args.cmd == "report":
        report()
    else:
        for spec in RUNS:
            print("OMP_NUM_THREADS=1 python " + " ".join(command(*spec, "<runs-dir>")[1:]).replace(ROOT + "/", ""))


if __name__ == "__main__":
    install_user_error_hook()
    main()
