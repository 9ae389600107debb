"""Run the algorithms on the paper datasets (or their Minari stand-ins) and summarise the results.

`bash benchmark.sh [flags]` calls this script. Every run is one command line,
    OMP_NUM_THREADS=T python algorithms/<algo>.py --env <dataset> --seed <s> --total-steps ... \
        --output-dir <out> --run-name <algo>__<dataset with / as ->__s<seed>
and the same lines are run here by a pool of --workers processes, printed by --dry-run, or written
to a Slurm array job by --slurm. A run whose results.json says `"finished": true` is skipped, so an
interrupted benchmark resumes where it stopped. At the end, tools/summarize.py writes the tables.

Which data stands in for which paper dataset is in benchmarks/datasets.csv; where D4RL's own file
of a paper dataset is in $D4RL_DATASET_DIR or ~/.d4rl/datasets (tools/d4rl_files.py writes it into Minari's
storage on first use: the locomotion and Adroit files), the runs use that file instead (`--env d4rl/<paper dataset>`): the same data. The papers' numbers
are in benchmarks/paper_scores.csv.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import difflib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
sys.path.insert(0, ROOT)
if TOOLS not in sys.path:
    sys.path.append(TOOLS)  # the dataset builder's modules (after the installed packages: no shadowing)
from common import (UserError, atomic_write, check_output_dir, dataset_task,  # noqa: E402
                    install_user_error_hook, load_dataset, write_json)
from d4rl_files import d4rl_files, d4rl_name  # noqa: E402
from dataset_recipe import parse_local_id  # noqa: E402
from dataset_snapshots import shipped_manifests  # noqa: E402
from tools.pretraining import behaviour_flag  # noqa: E402
from tools.summarize import QUICK_PROFILE_FILE  # noqa: E402

BENCHMARKS = os.path.join(ROOT, "benchmarks")
PAPER_STEPS = 1_000_000  # every paper table trains for 1M gradient steps
# Every 5k steps as TD3+BC and IQL's official code; the other papers state no interval. Of the
# scoring rules only iTRPO's (the last 10 evaluations) depends on it.
FULL_EVAL_EVERY = 5_000
# Episodes per evaluation in the full benchmark: the count the paper of each file states, per domain
# (common.dataset_task; "adroit" = pen, door, hammer, relocate; "*" = any other). Where a paper
# counts only the final policy's episodes (ARQ, BRAC+), every evaluation here uses it, so the last
# one matches.
# BRAC+'s 1000 Adroit episodes run as 1000 envs at once (~8 MB each).
ADROIT_TASKS = ("pen", "door", "hammer", "relocate")
PAPER_EVAL_EPISODES = {
    "arq": {"*": 100},                        # ARQ, Table 2 caption (Table A.4 reports the same runs)
    "brac_plus": {"*": 100, "adroit": 1000},  # BRAC+, Table 1 caption (gym) and Adroit table caption
    "fisher_brc": {"*": 10},                  # Fisher-BRC, Table 1 caption
    "td3_bc": {"*": 10},                      # TD3+BC paper's experimental setup (and its official code)
    "iql": {"*": 10, "antmaze": 100},         # IQL's official code: 10 by default, 100 in its AntMaze command
}
# No stated count for cql and awr (the lecture gives none), itrpo (our copy of its paper lacks the
# appendix with the evaluation details) or bc (no paper of its own): 10, the MuJoCo count of
# Fisher-BRC, TD3+BC and IQL.
FULL_EVAL_EPISODES = 10
FULL_SEEDS = 5  # the most any table uses (Fisher-BRC); the summary takes each paper's own count
# Episodes of each run's last evaluation in the full benchmark (the files' --final-episodes): the
# final policy is what the summary scores, and 10 episodes leave it several points of noise. Passed
# only to files that have the flag (FINAL_EPISODES_FLAG in their source); --final-episodes 0 or a
# value of 0 here turns it off.
FULL_FINAL_EPISODES = 100
FINAL_EPISODES_FLAG = "final_episodes"

# sbatch --mem of a run with --slurm (one value per array: the runs are grouped by it), in GB, per
# domain: an Adroit run needs about 8 GB and the quick profile's runs peak under 1 GB
# (docs/results.md); twice the largest need leaves room for the allocator and the eval envs. An
# evaluation of more than 100 episodes at once (BRAC+'s 1000 on Adroit) adds ~8 MB per env.
SLURM_MEM_GB = {"*": 8, "adroit": 16}
SLURM_MB_PER_EVAL_ENV = 8
SLURM_SUMMARY_MEM = "2G"  # the summary job reads results.json files and draws a few figures
SLURM_MAX_ARRAY_INDEX = 1000  # Slurm's default MaxArraySize is 1001: task indices 0 to 1000
# Variables the runs read their data through: the script exports the values the selection was checked
# with, so that a task finds the same data without the submitting shell's environment.
DATASET_VARIABLES = ("MINARI_DATASETS_PATH", "HF_HUB_OFFLINE", "D4RL_DATASET_DIR")

# --quick: offline, the default builds of the three locomotion tasks' medium-replay (QUICK_DATASETS,
# built once from the shipped snapshots, two at a time), two seeds, two runs at a time with one
# thread each. Budgets are sized from each file's Hopper speed in that setting (steps / train_seconds
# of the quick runs on a CPU with a 93 GFLOP/s one-thread matmul peak, docs/results.md "Quick mode")
# so that each file's RL phase takes one to two minutes there; behaviour phases come on top and are
# trained once: runs go seed by seed, so the second seed reads them from the cache in the output folder.
#   algo        steps  behaviour  RL / behaviour steps/s   RL training time
#   bc          10000     -       510                       20 s
#   td3_bc      10000     -       120                       85 s
#   iql          7500     -        83                       90 s
#   awr          5000     -        53                       95 s
#   cql           500    200        5 (warm-up inside)     100 s
#   fisher_brc   2500   5000       28 / 200                 90 s (+25 s once)
#   itrpo        3000  20000       22 / 300 (K = 2)        135 s (+70 s once)
#   brac_plus    1500   2000       18 / 50 (+ pi_0, Q_0)    85 s (+40 s once, +50 s per run)
#   arq         10000   3000       61 / 50 (+ support)     165 s (+60 s and ~300 s support once)
QUICK_BUDGETS = {
    "bc": (10_000, None),
    "td3_bc": (10_000, None),
    "iql": (7_500, None),
    "awr": (5_000, None),
    "cql": (500, 200),
    "fisher_brc": (2_500, 5_000),
    "itrpo": (3_000, 20_000),
    "brac_plus": (1_500, 2_000),
    "arq": (10_000, 3_000),
}
# Settings other than the files' defaults, for what the quick share cannot afford at the papers'
# sizes; the summary lists them under its table.
QUICK_FLAGS = {
    # lambda 0.1 collapses with a behaviour model trained for thousands rather than the authors' 1M
    # steps (docs/results.md, Fisher-BRC); lambda 1 is the paper's other ablation value (fig. 2).
    "fisher_brc": ["--gp-weight", "1.0"],
    # One policy and one latent sample in the KL bound (paper: 5 and 5), 256-wide VAEs and policy
    # (the official code's width), and the multipliers starting at 1: with a short pi_0 phase the
    # official beta = 10 collapses pi_0's entropy (docs/results.md, BRAC+).
    "brac_plus": ["--pretrain-steps", "2000", "--n-samples", "1", "--n-latent", "1", "--vae-hidden-dim", "256",
                  "--actor-hidden-dim", "256", "--beta-init", "1", "--alpha-init", "1"],
    # K = 2 policy samples per state for the KL estimate and the backup (the code's K = 10): 2.3 times the
    # speed (15 -> 34 steps/s on one CPU), twice the steps in the same share; with K = 10 one seed of two
    # sat on a gait at BC's level (docs/results.md, Quick mode).
    "itrpo": ["--n-samples", "2"],
    # N = 3 support samples per state from the fast ODE sampler (paper: 30 from the predictor-corrector)
    # and K = 1, about the paper's K / N = 9 / 30.
    "arq": ["--n-support", "3", "--kth", "1", "--sampler", "ode", "--sampler-steps", "10", "--likelihood-steps", "5"],
}
# Files that cannot reach a meaningful budget in the quick share at all: their cell says so, with
# the budget they had, instead of a score.
QUICK_TOO_SLOW: dict[str, str] = {}
# The quick datasets and the files each runs when no --algos/--datasets are given (None: all nine).
# Hopper takes every file (11 of the 16.6 minutes the whole profile took on a CPU with a 2-thread
# fp32 peak of 390-400 GFLOP/s; an estimated 30 minutes on the slower CPU the budgets were sized on);
# HalfCheetah and Walker2d take the three fastest (BC, TD3+BC, IQL: 2 minutes each there): all nine
# on all three would take about twice as long (docs/results.md, Quick mode). `--quick --datasets <id>`
# runs every file on one of them at the same budgets.
QUICK_DATASETS: dict[str, list[str] | None] = {
    "local/hopper/medium-replay-v0": None,                           # 90,000 transitions
    "local/halfcheetah/medium-replay-v0": ["bc", "td3_bc", "iql"],   # 70,000
    "local/walker2d/medium-replay-v0": ["bc", "td3_bc", "iql"],      # 280,000
}
QUICK_SEEDS = [0, 1]
QUICK_EVALUATIONS, QUICK_EVAL_EPISODES = 10, 5
# Remote Minari datasets with continuous actions that --datasets may name besides the ids of
# benchmarks/datasets.csv: an id neither listed, mapped, buildable nor in the Minari folder is refused
# with close matches instead of waiting on the network.
_MUJOCO_KINDS = {("halfcheetah", "hopper", "walker2d", "ant", "humanoid", "humanoidstandup"): ("simple", "medium", "expert"),
                 ("swimmer", "pusher", "reacher", "invertedpendulum", "inverteddoublependulum"): ("medium", "expert")}
KNOWN_REMOTE_DATASETS = sorted(
    [f"mujoco/{task}/{kind}-v0" for tasks, kinds in _MUJOCO_KINDS.items() for task in tasks for kind in kinds]
    + [f"D4RL/antmaze/{m}-v1" for m in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play",
                                        "large-diverse")]
    + [f"D4RL/{t}/{k}-v2" for t in ADROIT_TASKS for k in ("human", "cloned", "expert")]
    + [f"D4RL/kitchen/{k}-v2" for k in ("complete", "partial", "mixed")]
    + [f"D4RL/pointmaze/{m}{d}-v2" for m in ("umaze", "medium", "large", "open") for d in ("", "-dense")])


def algorithm_names() -> list[str]:
    folder = os.path.join(ROOT, "algorithms")
    return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))


def read_dataset_map() -> list[dict]:
    with open(os.path.join(BENCHMARKS, "datasets.csv"), newline="") as f:
        return list(csv.DictReader(f))


def minari_root() -> str:
    return os.environ.get("MINARI_DATASETS_PATH") or os.path.join(os.path.expanduser("~"), ".minari", "datasets")


def local_buildable(dataset_id: str) -> bool:
    """local/<env>/<kind>[-<size>]-v0 ids that tools/dataset_recipe.py can build from shipped snapshots."""
    parsed = parse_local_id(dataset_id)
    return parsed is not None and parsed[0] in shipped_manifests()


def d4rl_file_found(paper_dataset: str) -> bool:
    """Whether D4RL's own file of `paper_dataset` is where tools/d4rl_files.py looks ($D4RL_DATASET_DIR,
    ~/.d4rl/datasets) and reads it (locomotion and Adroit, not AntMaze)."""
    path = d4rl_files().get(paper_dataset)
    if path is None:
        return False
    folders = [os.path.expanduser(d) for d in (os.environ.get("D4RL_DATASET_DIR"), "~/.d4rl/datasets") if d]
    return any(os.path.isfile(os.path.join(d, path.rsplit("/", 1)[1])) for d in folders)


def d4rl_file_id(paper_dataset: str) -> str | None:
    """`d4rl/<paper dataset>` when the user has D4RL's own file of it (d4rl_file_found)."""
    return f"d4rl/{paper_dataset}" if d4rl_file_found(paper_dataset) else None


def dataset_present(dataset_id: str) -> bool:
    """Whether a run can read `dataset_id` without the network or a build: Minari's folder holds it
    (--fetch-only writes D4RL's files there, as a run's first use does)."""
    return dataset_on_disk(dataset_id)


def resolve_datasets(names: list[str] | None, quick: bool) -> list[str]:
    """Dataset ids for --datasets: ids as they are, paper dataset names through datasets.csv, except
    that D4RL's own file of a paper dataset, where the user has it, is preferred to its stand-in
    (not in quick mode, whose budgets are sized for the local builds)."""
    folder = minari_root()
    mapping = read_dataset_map()
    column = "quick_id" if quick else "minari_id"
    if not names:
        if quick:
            return list(QUICK_DATASETS)
        ids = [d4rl_file_id(row["paper_dataset"]) or row["minari_id"] for row in mapping]
        return list(dict.fromkeys(i for i in ids if i))
    by_paper = {row["paper_dataset"]: row for row in mapping}
    mapped = {row[c] for row in mapping for c in ("minari_id", "quick_id") if row[c]}
    result = []
    for name in names:
        if name in by_paper:
            row = by_paper[name]
            if not quick and d4rl_file_id(name):
                result.append(d4rl_file_id(name))
                continue
            if not row[column]:
                raise UserError(f"paper dataset '{name}' has no {'offline (quick) ' if quick else ''}stand-in: "
                                f"{row['note'] or 'see benchmarks/datasets.csv'}")
            result.append(row[column])
            continue
        d4rl_id = d4rl_name(name) is not None  # checked, with a clear message, when fetched
        an_id = bool(name) and name == name.strip("/") and ".." not in name.split("/")  # not any folder
        known = an_id and (d4rl_id or name in mapped or name in KNOWN_REMOTE_DATASETS or local_buildable(name)
                           or os.path.isdir(os.path.join(folder, name)))
        if not known:
            close = difflib.get_close_matches(name, sorted(set(by_paper) | mapped | set(KNOWN_REMOTE_DATASETS)), n=4)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise UserError(f"unknown dataset '{name}'{hint} (give a Minari id or a paper dataset name "
                            f"from benchmarks/datasets.csv)")
        if quick and not (d4rl_id or name.startswith("local/") or os.path.isdir(os.path.join(folder, name))):
            raise UserError(f"--quick runs offline, but '{name}' is neither local/* nor in {folder}")
        result.append(name)
    return list(dict.fromkeys(result))


def resolve_algos(names: list[str] | None, quick: bool, steps_given: bool) -> list[str]:
    available = algorithm_names()
    if not names:
        return [a for a in available if a in QUICK_BUDGETS] if quick else available
    for name in names:
        if name not in available:
            close = difflib.get_close_matches(name, available, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"unknown algorithm '{name}'{hint}; choose from {', '.join(available)}")
        if quick and name not in QUICK_BUDGETS and not steps_given:
            raise UserError(f"--quick has no budget for '{name}': pass --steps (and --bc-steps), or add it to "
                            f"QUICK_BUDGETS in tools/benchmark.py")
    return list(dict.fromkeys(names))


def paper_eval_episodes(algo: str, dataset: str) -> int:
    """Episodes per evaluation that `algo`'s paper used on `dataset`'s domain (FULL_EVAL_EPISODES if unstated)."""
    task = dataset_task(dataset)
    counts = PAPER_EVAL_EPISODES.get(algo, {})
    return counts.get("adroit" if task in ADROIT_TASKS else task, counts.get("*", FULL_EVAL_EPISODES))


def slurm_mem(dataset: str, episodes: int) -> str:
    """sbatch --mem of a run on `dataset` whose largest evaluation has `episodes` episodes."""
    base = SLURM_MEM_GB["adroit" if dataset_task(dataset) in ADROIT_TASKS else "*"]
    return f"{base + -(-max(0, episodes - 100) * SLURM_MB_PER_EVAL_ENV // 1024)}G"


def run_name(algo: str, dataset: str, seed: int) -> str:
    return f"{algo}__{dataset.replace('/', '-')}__s{seed}"


def gpu_ids() -> list[str]:
    """Visible GPUs, without importing torch: CUDA_VISIBLE_DEVICES if set, else nvidia-smi -L."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def accepts_final_episodes(algo: str) -> bool:
    """Whether algorithms/<algo>.py has --final-episodes: read from its source, as importing the nine
    files (torch and all) to ask would take longer than the dry run itself."""
    with open(os.path.join(ROOT, "algorithms", f"{algo}.py")) as f:
        return f"{FINAL_EPISODES_FLAG}:" in f.read()


def quick_selection(dataset: str, algo: str) -> bool:
    """Whether the default quick profile (no --algos, no --datasets) runs `algo` on `dataset`."""
    return QUICK_DATASETS.get(dataset) is None or algo in QUICK_DATASETS[dataset]


def build_runs(args, algos: list[str], datasets: list[str], out_dir: str) -> list[dict]:
    """One dict per run: its name, argv (with "python" as the interpreter) and environment."""
    # One OpenMP thread per core a worker may use (oversubscribed PyTorch threads spin-wait); quick
    # mode is sized for single-thread runs, and on a cluster Slurm gives each task its own cores.
    if args.threads:
        threads = args.threads
    elif args.quick or args.slurm is not None:
        threads = 1
    else:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
    gpus = gpu_ids()
    runs = []
    # Seed by seed: the second seed of a file with a behaviour phase starts after the first has cached it.
    default_quick = args.quick and not args.algos and not args.datasets
    for seed, dataset, algo in itertools.product(args.seeds, datasets, algos):
        if default_quick and not quick_selection(dataset, algo):
            continue
        steps, bc_steps = QUICK_BUDGETS.get(algo, (None, None)) if args.quick else (PAPER_STEPS, None)
        steps = args.steps or steps
        bc_steps = args.bc_steps or bc_steps
        if args.quick:
            eval_every = args.eval_every or max(1, steps // QUICK_EVALUATIONS)
            eval_episodes = args.eval_episodes or QUICK_EVAL_EPISODES
        else:
            eval_every = args.eval_every or FULL_EVAL_EVERY
            eval_episodes = args.eval_episodes or paper_eval_episodes(algo, dataset)
        name = run_name(algo, dataset, seed)
        argv = ["python", f"algorithms/{algo}.py", "--env", dataset, "--seed", str(seed),
                "--total-steps", str(steps)]
        if bc_steps is not None and behaviour_flag(algo):
            argv += [behaviour_flag(algo), str(bc_steps)]
        if args.quick:
            argv += QUICK_FLAGS.get(algo, [])
        argv += ["--eval-every", str(eval_every), "--eval-episodes", str(eval_episodes)]
        final_episodes = args.final_episodes if args.final_episodes is not None else \
            (0 if args.quick else FULL_FINAL_EPISODES)
        if final_episodes and accepts_final_episodes(algo):
            argv += ["--final-episodes", str(final_episodes)]
        argv += ["--output-dir", out_dir, "--run-name", name]
        if args.precision != "fp32":
            argv += ["--precision", args.precision]
        env = {"OMP_NUM_THREADS": str(threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[len(runs) % len(gpus)]  # round-robin over GPUs
        episodes = max(eval_episodes, final_episodes if accepts_final_episodes(algo) else 0)
        runs.append({"name": name, "algo": algo, "dataset": dataset, "seed": seed, "steps": steps,
                     "precision": args.precision, "argv": argv, "env": env,
                     "mem": args.mem or slurm_mem(dataset, episodes)})
    return runs


def command_line(run: dict, with_env: bool = True) -> str:
    prefix = [f"{k}={v}" for k, v in run["env"].items()] if with_env else []
    return " ".join(prefix + [shlex.join(run["argv"])])


def run_status(run: dict, out_dir: str) -> str:
    """'finished', 'todo', or a one-line conflict when finished results used other settings."""
    path = os.path.join(ROOT, out_dir, run["name"], "results.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return "todo"
    if not isinstance(results, dict) or not results.get("finished"):
        return "todo"  # the run's own start says what is wrong with a file of another shape
    done_args = results.get("args") if isinstance(results.get("args"), dict) else {}
    done_steps = done_args.get("total_steps")
    if done_steps != run["steps"]:
        return (f"{path} is a finished run of {done_steps} steps but this selection asks for {run['steps']}; "
                f"use another --output-dir or remove that run")
    done_precision = done_args.get("precision", "fp32")
    if done_precision != run["precision"]:
        return (f"{path} is a finished run in {done_precision} but this selection asks for {run['precision']}; "
                f"use another --output-dir or remove that run")
    return "finished"


def dataset_on_disk(dataset_id: str) -> bool:
    """Whether Minari's folder already holds `dataset_id` (the test common.load_dataset makes)."""
    return os.path.isdir(os.path.join(minari_root(), dataset_id, "data"))


def build_in_parallel(dataset_ids: list[str], workers: int) -> None:
    """Build local datasets `workers` at a time, each in its own one-thread process (a build is a
    single-threaded rollout of small networks, so two builds on two cores take the time of the
    longer one). Each build writes only its own dataset's folder."""
    print(f"[benchmark] building {', '.join(dataset_ids)} from the shipped snapshots, {workers} at a time",
          flush=True)

    def one(dataset_id):
        start = time.time()
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--fetch-only",
                               "--datasets", dataset_id], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True)
        return dataset_id, proc, time.time() - start

    failed = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for dataset_id, proc, seconds in pool.map(one, dataset_ids):
            if proc.returncode == 0:
                print(f"[benchmark] built {dataset_id} ({seconds:.0f} s)", flush=True)
            else:
                lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit {proc.returncode}"]
                failed.append(f"{dataset_id}: {lines[-1]}")
    if failed:
        raise UserError("could not build " + "; ".join(failed))


def fetch_datasets(datasets: list[str], workers: int = 1) -> None:
    """Download or build every dataset once, here, before any worker starts: parallel runs would
    otherwise race to write the same files. Local datasets still to build are built `workers` at a time."""
    to_build = [d for d in datasets if d.startswith("local/") and not dataset_on_disk(d)]
    if workers > 1 and len(to_build) > 1:
        build_in_parallel(to_build, workers)
    for dataset in datasets:
        print(f"[benchmark] dataset {dataset}", flush=True)
        # a local one is built, a remote one downloaded, and every one read once: a D4RL file has
        # nothing to fetch, and a missing or damaged file is said here, in one line, before any run
        load_dataset(dataset)


def mem_mb(mem: str) -> int:
    """Megabytes of an sbatch --mem value (a number with an optional K, M, G or T; M without)."""
    unit = mem[-1].upper() if mem[-1].isalpha() else "M"
    return int(mem.rstrip("KMGTkmgt")) * {"K": 1, "M": 1024, "G": 1024 ** 2, "T": 1024 ** 3}[unit] // 1024


def index_ranges(indices: list[int]) -> str:
    """Slurm's array syntax for sorted indices: [0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(parts)


def array_chunks(indices: list[int]) -> list[tuple[int, list[int]]]:
    """Sorted run indices as (offset, task indices) pairs, each task index at most
    SLURM_MAX_ARRAY_INDEX; a task runs run offset + its index. Offset 0 where the indices allow."""
    chunks: list[tuple[int, list[int]]] = []
    for i in indices:
        if chunks and i - chunks[-1][0] <= SLURM_MAX_ARRAY_INDEX:
            chunks[-1][1].append(i - chunks[-1][0])
        else:
            offset = 0 if i <= SLURM_MAX_ARRAY_INDEX else i
            chunks.append((offset, [i - offset]))
    return chunks


def dataset_environment() -> dict[str, str]:
    """The dataset variables to export to the tasks: Minari's folder always (as checked, absolute:
    a task may run without HOME), the others where this shell sets them."""
    env = {"MINARI_DATASETS_PATH": os.path.abspath(minari_root())}
    for name in DATASET_VARIABLES[1:]:
        if os.environ.get(name):
            value = os.environ[name]
            env[name] = os.path.abspath(os.path.expanduser(value)) if name.endswith("_DIR") else value
    return env


def write_slurm(runs: list[dict], out_dir: str, path: str, args, results_dir: str) -> None:
    """The array job of `runs`, which also submits itself when run by bash outside Slurm: one array
    per memory size, then the summary job after all of them."""
    threads = runs[0]["env"]["OMP_NUM_THREADS"]
    path = os.path.abspath(path)
    logs = os.path.join(ROOT, out_dir, "slurm-logs")  # Slurm does not create the log folder
    throttle = f"%{args.max_parallel}" if args.max_parallel else ""
    by_mem: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        by_mem.setdefault(run["mem"], []).append(i)
    resources = [f"--cpus-per-task={threads}"]
    resources += [f"--time={args.time}"] if args.time else []
    resources += [f"--partition={args.partition}"] if args.partition else []
    summary_command = (f"cd {shlex.quote(ROOT)} && exec {shlex.quote(sys.executable)} tools/summarize.py "
                       f"{shlex.quote(out_dir)} --out {shlex.quote(results_dir)}")
    summary = ["sbatch", "--parsable", "--job-name=offline-rl-summary", "--cpus-per-task=1",
               f"--mem={SLURM_SUMMARY_MEM}", *resources[1:], f"--output={logs}/summary-%j.log",
               f"--wrap={summary_command}"]
    log_path = f"{logs}/%A_%a.log"
    if re.search(r"\s", log_path):  # sbatch's parser keeps a quoted argument together
        log_path = f'"{log_path}"'
    lines = [
        "#!/usr/bin/env bash",
        "# Written by tools/benchmark.py --slurm: one array task per run, and a job that writes the summary",
        "# when they have ended. Submit both with",
        f"#   bash {path}",
        "# (`sbatch` on this file runs the array alone, without the summary"
        + ("; with more runs than Slurm's default MaxArraySize, 1001, only bash submits them all"
           if len(runs) > SLURM_MAX_ARRAY_INDEX + 1 else "") + "). To resubmit after a failure",
        "# or a cancel, run the same benchmark.sh --slurm command again: it writes the runs still to do.",
        "# The tasks run the Python this was written with and read the data from the folders exported",
        "# below, where the selection's datasets were found; they need nothing from the submitting shell.",
        "# Each run's output is appended to <run folder>/stdout.log, attempt after attempt.",
        "# A task stopped by a signal resumes from its checkpoint when it runs again: Slurm sends USR1",
        "# before the time limit (and, with PreemptParameters=send_user_signal, on preemption), the run",
        "# checkpoints and exits, and the task requeues itself. A SIGTERM also stops the run with a",
        "# checkpoint but does not requeue (it may be scancel); preemption by SIGTERM is requeued by",
        "# Slurm itself (--requeue, PreemptMode=REQUEUE).",
        "#SBATCH --job-name=offline-rl-benchmark",
        f"#SBATCH --array=0-{len(runs) - 1}{throttle}",
        *[f"#SBATCH {r}" for r in resources],
        f"#SBATCH --mem={max(by_mem, key=mem_mb)}",  # the largest; bash's submission asks each run's own
        *([f"#SBATCH --gres=gpu:{args.gpus}"] if args.gpus else []),
        "#SBATCH --requeue",
        # B: signals the batch shell only (python is not a job step): the trap below passes it on.
        # 300 s: time for an evaluation under way to end before the checkpoint is written.
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --open-mode=append",  # a requeued task adds to its log instead of replacing it
        f"#SBATCH --output={log_path}",  # sbatch reads it before the cd
        "set -euo pipefail",
        'if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then',
        "  # Run by bash: submit. --parsable prints the job id (and ';cluster' on a multi-cluster setup).",
        "  # A submission refused halfway cancels what it submitted: running this again submits it all.",
        "  arrays=()",
        "  trap 'if [ ${#arrays[@]} -gt 0 ]; then scancel \"${arrays[@]%%;*}\"; fi; "
        "echo \"submission refused: cancelled the ${#arrays[@]} array job(s) it had submitted\" >&2' ERR",
        # One array per memory size, split where a task index would pass Slurm's default limit: a
        # task then runs the run RUN_OFFSET + its index.
        *[line for mem, indices in by_mem.items() for offset, tasks in array_chunks(indices) for line in (
            f"  job=$(sbatch --parsable --array={index_ranges(tasks)}{throttle} --mem={mem} "
            + (f"--export=ALL,RUN_OFFSET={offset} " if offset else "") + f"{shlex.quote(path)})  # {len(tasks)} runs",
            '  arrays+=("$job")')],
        '  after=$(IFS=:; echo "${arrays[*]%%;*}")',
        f"  summary=$({shlex.join(summary[:2])} --dependency=afterany:\"$after\" {shlex.join(summary[2:])})",
        "  trap - ERR",
        '  arrays=("${arrays[@]%%;*}")',
        f"  echo \"submitted {len(runs)} runs as array job(s) ${{arrays[*]}} and the summary as job "
        f"${{summary%%;*}}, which writes \"{shlex.quote(os.path.join(results_dir, 'summary.md'))}\" when "
        f"they have ended\"",
        "  exit 0",
        "fi",
        f"cd {shlex.quote(ROOT)}",
        # The runs' environment (threads; quick mode's data folder), but not this machine's GPU choice.
        *[f"export {k}={shlex.quote(v)}" for k, v in runs[0]["env"].items() if k != "CUDA_VISIBLE_DEVICES"],
        *[f"export {k}={shlex.quote(v)}" for k, v in dataset_environment().items()],
        "RUN_NAMES=(",
        *[f"  {shlex.quote(r['name'])}" for r in runs],
        ")",
        "COMMANDS=(",
        *[f"  {shlex.quote(shlex.join([sys.executable, *r['argv'][1:]]))}" for r in runs],
        ")",
        "i=$((${RUN_OFFSET:-0} + SLURM_ARRAY_TASK_ID))",
        f"run_dir={shlex.quote(out_dir)}/\"${{RUN_NAMES[$i]}}\"",
        "# Resume: a run that already finished is skipped; an unfinished one continues from its checkpoint.",
        "if grep -qs '\"finished\": true' \"$run_dir/results.json\"; then",
        "  echo \"${RUN_NAMES[$i]} already finished\"; exit 0",
        "fi",
        "mkdir -p \"$run_dir\"",
        "echo \"${RUN_NAMES[$i]}: output in $run_dir/stdout.log\"",
        "exec >>\"$run_dir/stdout.log\" 2>&1",
        "echo \"[slurm] job ${SLURM_JOB_ID:-} (array task ${SLURM_ARRAY_JOB_ID:-}_$i) on ${SLURMD_NODENAME:-this node}\"",
        "# python runs in the background so that the shell handles signals while it runs: bash runs",
        "# a trap only between commands, and a foreground python would delay it until the end.",
        "child=",
        "forward() { if [ -n \"$child\" ]; then kill -s \"$1\" \"$child\" 2>/dev/null || true; fi; }",
        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
        "eval \"exec ${COMMANDS[$i]}\" &",  # exec: $! is python itself, not a subshell around it
        "child=$!",
        "status=0",
        "wait \"$child\" || status=$?",
        "# wait returns early when a trapped signal arrives: wait again until python has exited.",
        "while kill -0 \"$child\" 2>/dev/null; do status=0; wait \"$child\" || status=$?; done",
        "if [ \"$status\" -eq $((128 + $(kill -l USR1))) ]; then",
        "  echo \"${RUN_NAMES[$i]} stopped by USR1 with a checkpoint: requeueing\"",
        "  scontrol requeue \"${SLURM_JOB_ID}\"",
        "fi",
        "exit \"$status\"",
    ]
    os.makedirs(logs, exist_ok=True)
    atomic_write(path, ("\n".join(lines) + "\n").encode())


def write_quick_profile(out_abs: str, algos: list[str], steps_given: int | None) -> None:
    """What the quick profile changed from the files' defaults, for tools/summarize.py."""
    profile = {algo: {"flags": QUICK_FLAGS.get(algo, []),
                      "too_slow": QUICK_TOO_SLOW.get(algo) if steps_given is None else None} for algo in algos}
    os.makedirs(out_abs, exist_ok=True)
    write_json(os.path.join(out_abs, QUICK_PROFILE_FILE), profile)


def execute(runs: list[dict], out_dir: str, workers: int) -> list[str]:
    """Run with `workers` processes at a time; returns the names of the runs that failed."""
    def one(run):
        folder = os.path.join(ROOT, out_dir, run["name"])
        os.makedirs(folder, exist_ok=True)
        start = time.time()
        with open(os.path.join(folder, "stdout.log"), "a") as log:  # a resumed run adds to its log
            rc = subprocess.run([sys.executable, *run["argv"][1:]], cwd=ROOT, env={**os.environ, **run["env"]},
                                stdout=log, stderr=subprocess.STDOUT).returncode
        return run, rc, time.time() - start

    failed = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for done, future in enumerate(concurrent.futures.as_completed([pool.submit(one, r) for r in runs]), 1):
            run, rc, seconds = future.result()
            status = "ok" if rc == 0 else f"FAILED (exit {rc}), see {out_dir}/{run['name']}/stdout.log"
            print(f"[benchmark] {done}/{len(runs)} {run['name']}: {status} ({seconds:.0f} s)", flush=True)
            if rc != 0:
                failed.append(run["name"])
    return failed


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+",
                   help="algorithm files to run (default: all)")
    p.add_argument("--datasets", nargs="+", help="Minari ids or paper dataset names from benchmarks/datasets.csv "
                   "(default: every mapped dataset; --quick: " + ", ".join(QUICK_DATASETS) + ", with BC, TD3+BC and "
                   "IQL alone on the last two unless --algos or --datasets is given)")
    p.add_argument("--seeds", nargs="+", type=int, help=f"seeds (default: 0-{FULL_SEEDS - 1}; --quick: 0 1)")
    p.add_argument("--steps", type=int,
                   help=f"gradient steps of every run (default: {PAPER_STEPS}; --quick: per algorithm)")
    p.add_argument("--bc-steps", type=int,
                   help="behaviour phase of the files that have one: --bc-steps, or CQL's --bc-warmup-steps "
                        "(default: theirs; --quick: per algorithm)")
    p.add_argument("--eval-every", type=int,
                   help=f"(default: {FULL_EVAL_EVERY}; --quick: steps / {QUICK_EVALUATIONS})")
    p.add_argument("--eval-episodes", type=int,
                   help=f"(default: each file's paper's count, PAPER_EVAL_EPISODES in tools/benchmark.py, else "
                        f"{FULL_EVAL_EPISODES}; --quick: {QUICK_EVAL_EPISODES})")
    p.add_argument("--workers", type=int,
                   help="runs at a time on this machine, GPUs round-robin (default: 1; --quick: 2; --slurm: see "
                        "--max-parallel)")
    p.add_argument("--threads", type=int,
                   help="OMP_NUM_THREADS of each run (default: cores / workers; 1 with --quick or --slurm)")
    p.add_argument("--output-dir", help="where runs go (default: runs/benchmark; --quick: runs/benchmark-quick)")
    p.add_argument("--results-dir", help="where the summary goes (default: results; --quick: results/quick)")
    p.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32",
                   help="--precision of every run (default: fp32; tf32 and bf16 runs go to <default dirs>-tf32, -bf16)")
    p.add_argument("--quick", action="store_true",
                   help="offline, local datasets, CPU-sized budgets (15-30 min on 2 idle cores)")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the runs still to do, and stop")
    p.add_argument("--slurm", metavar="FILE", nargs="?", const="",
                   help="write an sbatch array job (default: <output-dir>/benchmark.sbatch) instead of running; "
                        "`bash FILE` submits it and the summary job after it")
    p.add_argument("--final-episodes", type=int,
                   help=f"episodes of each run's last evaluation, the final score (default: {FULL_FINAL_EPISODES}; "
                        f"--quick: --eval-episodes; 0: --eval-episodes)")
    p.add_argument("--fetch-only", action="store_true", help="download/build the datasets, and stop")
    slurm = p.add_argument_group("with --slurm")
    slurm.add_argument("--max-parallel", type=int, help="at most this many tasks of each array at once: one array per memory size (default: no cap)")
    slurm.add_argument("--time", help="sbatch --time of each task, e.g. 2-00:00:00 (default: the partition's)")
    slurm.add_argument("--mem", help=f"sbatch --mem of each task, e.g. 8G (default: {SLURM_MEM_GB['*']}G, "
                                     f"{SLURM_MEM_GB['adroit']}G on Adroit, more for 1000-episode evaluations)")
    slurm.add_argument("--partition", help="sbatch --partition (default: the cluster's)")
    slurm.add_argument("--gpus", help="GPUs per task, as N or TYPE:N (sbatch --gres=gpu:...; default: none)")
    args = p.parse_args(argv)
    for flag in ("steps", "bc_steps", "eval_every", "eval_episodes", "workers", "threads", "max_parallel"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.final_episodes is not None and args.final_episodes < 0:
        raise UserError(f"--final-episodes must be 0 or more, got {args.final_episodes}")
    slurm_flags = [f for f in ("max_parallel", "time", "mem", "partition", "gpus") if getattr(args, f) is not None]
    if slurm_flags and args.slurm is None:
        raise UserError(f"--{slurm_flags[0].replace('_', '-')} is an sbatch setting: it goes with --slurm")
    if args.slurm is not None and args.workers is not None:
        raise UserError("--workers is for runs on this machine; with --slurm, --max-parallel N caps the tasks "
                        "running at once")
    for flag, pattern, example in (("time", r"(\d+-)?\d+(:\d+){0,2}|(?i:unlimited|infinite)",
                                    "90, 12:00:00, 2-00:00:00 or UNLIMITED"),
                                   ("mem", r"\d+[KMGTkmgt]?", "8G or 16000M"),
                                   ("partition", r"[\w.,-]+", "gpu"),
                                   ("gpus", r"([\w.-]+:)?[1-9]\d*", "1 or a100:1")):
        value = getattr(args, flag)
        if value is not None and not re.fullmatch(pattern, value):
            raise UserError(f"--{flag} {value!r} is not a Slurm value (e.g. {example})")
    if args.seeds is not None and any(not 0 <= s < 2**32 for s in args.seeds):
        raise UserError(f"--seeds must be in [0, 4294967295], got {args.seeds}")  # numpy's and Gymnasium's
    if args.seeds is not None:
        args.seeds = list(dict.fromkeys(args.seeds))
    for flag in ("output_dir", "results_dir"):
        if getattr(args, flag) is not None:
            check_output_dir(getattr(args, flag), f"--{flag.replace('_', '-')}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.seeds is None:
        args.seeds = QUICK_SEEDS if args.quick else list(range(FULL_SEEDS))
    if args.workers is None:
        args.workers = 2 if args.quick else 1
    suffix = "" if args.precision == "fp32" else f"-{args.precision}"
    default_out = ("runs/benchmark-quick" if args.quick else "runs/benchmark") + suffix
    out_abs = os.path.abspath(args.output_dir or os.path.join(ROOT, default_out))
    # Commands run from the repository root; paths inside it are written relative, for the cluster.
    out_dir = os.path.relpath(out_abs, ROOT) if out_abs.startswith(ROOT + os.sep) else out_abs
    results_dir = args.results_dir or os.path.join(ROOT, ("results/quick" if args.quick else "results") + suffix)
    algos = resolve_algos(args.algos, args.quick, args.steps is not None)
    datasets = resolve_datasets(args.datasets, args.quick)
    runs = build_runs(args, algos, datasets, out_dir)

    statuses = {r["name"]: run_status(r, out_dir) for r in runs}
    conflicts = [s for s in statuses.values() if s not in ("finished", "todo")]
    if conflicts:
        raise UserError(conflicts[0] + (f" ({len(conflicts) - 1} more like it)" if len(conflicts) > 1 else ""))
    todo = [r for r in runs if statuses[r["name"]] == "todo"]
    skipped = len(runs) - len(todo)

    if args.dry_run:
        print(f"# {len(runs)} runs, {skipped} already finished, {len(todo)} to do")
        for run in todo:
            print(command_line(run))
        return 0
    if args.slurm is not None:
        if not todo:
            print(f"[benchmark] all {len(runs)} runs are finished: nothing to write")
            return 0
        # The tasks neither download nor build: a missing dataset would fail every task that reads it.
        missing = [d for d in dict.fromkeys(r["dataset"] for r in todo) if not dataset_present(d)]
        if missing:
            raise UserError(f"--slurm: {len(missing)} of the selection's datasets are not here yet "
                            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; Minari folder "
                            f"{minari_root()}): run the same command with --fetch-only instead of --slurm first")
        if args.quick:
            write_quick_profile(out_abs, algos, args.steps)
        path = os.path.abspath(args.slurm or os.path.join(out_abs, "benchmark.sbatch"))
        write_slurm(todo, out_dir, path, args, os.path.abspath(results_dir))
        print(f"[benchmark] wrote {path}: {len(todo)} array tasks ({skipped} runs already finished); submit "
              f"them and the summary after them with: bash {shlex.quote(path)}")
        return 0

    fetch_datasets(datasets, args.workers)
    if args.fetch_only:
        return 0
    if args.quick:
        write_quick_profile(out_abs, algos, args.steps)
    print(f"[benchmark] {len(runs)} runs: {skipped} already finished, {len(todo)} to do, {args.workers} at a time; "
          f"runs in {out_dir}", flush=True)
    failed = execute(todo, out_dir, args.workers) if todo else []

    import tools.summarize

    tools.summarize.main([out_abs, "--out", results_dir])
    if failed:
        print(f"[benchmark] {len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    install_user_error_hook()
    sys.exit(main())
