"""Summarise benchmark runs next to the papers' numbers.

    python tools/summarize.py RUNS_DIR [RUNS_DIR ...] [--out results]

Reads every results.json under the folders and writes, in --out:
- summary.md: the protocol (final policy, not best; no tuning); per algorithm, the IQM of its runs'
  final normalised scores over every task it ran, with a stratified bootstrap interval; for each
  paper table (benchmarks/paper_scores.csv), paper dataset x algorithm, our mean +- std of the
  normalised score computed with that paper's rule and number of seeds and a bootstrap interval over
  seeds, next to the paper's number, flagged when outside the paper's range; which data each cell
  used (D4RL's own file `d4rl/<paper dataset>` where there are runs on it, else the stand-in of
  benchmarks/datasets.csv); and the runs on datasets no paper reports.
- runs.csv: one row per run, with its torch version, device and training hours per 1M steps.
- performance_profile.png: per algorithm, the fraction of runs above each score, over its tasks.
- curves/<dataset>.png: learning curves, every algorithm on one figure (mean +- std over seeds).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import UserError, atomic_write, check_output_dir, install_user_error_hook  # noqa: E402

BENCHMARKS = os.path.join(ROOT, "benchmarks")

# How a run's evaluations become its score, per the papers' "final_score_rule".
RULES = {
    "last": "the last evaluation of each seed (mean ± std over seeds)",
    "mean_last_10": "the mean of the last 10 evaluations of each seed (mean ± std over seeds)",
}
# A cell is flagged when our mean lies outside paper mean +- max(2 x paper std, 5 points): the papers'
# stds are over few seeds (and absent for borrowed columns), so a floor keeps noise from flagging.
FLAG_STDS, FLAG_MIN_POINTS = 2.0, 5.0
MISSING = "n/a"
# Intervals: percentile bootstrap, 95%, with a fixed generator so that the same runs give the same
# summary. Cells resample seeds; the aggregate resamples runs within each task (stratified, as
# rliable does: Agarwal et al. 2021), so that every task keeps its weight.
CONFIDENCE, RESAMPLES, BOOTSTRAP_SEED = 0.95, 2000, 0
PROFILE_FILE = "performance_profile.png"
UNKNOWN = "unknown"


def load_runs(folders: list[str]) -> list[dict]:
    import json

    runs = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise UserError(f"no such folder of runs: {folder}")
        for root, _, files in os.walk(folder):
            if "results.json" in files:
                path = os.path.join(root, "results.json")
                try:
                    with open(path) as f:
                        results = json.load(f)
                    results["run_dir"] = os.path.relpath(root, folder)
                    if not ({"env", "algorithm"} <= results.keys() and isinstance(results["seed"], int)
                            and isinstance(results["evaluations"], list)):
                        raise TypeError
                except (OSError, ValueError, TypeError, KeyError) as exc:
                    print(f"skipping {path}: not the results.json of a run ({type(exc).__name__})", flush=True)
                    continue
                runs.append(results)
    return sorted(runs, key=lambda r: (r["env"], r["algorithm"], r["seed"]))


def final_score(run: dict) -> float | None:
    """The normalised score of a run's final policy: its last evaluation's per-episode returns (over
    --final-episodes where the run had it), normalised and averaged; None without reference scores."""
    if not run["evaluations"]:
        return None
    last, info = run["evaluations"][-1], run["dataset"]
    returns = last.get("episode_returns")
    if not returns or info.get("ref_min_score") is None or info.get("ref_max_score") is None:
        return last["normalized_score_mean"]
    low, high = info["ref_min_score"], info["ref_max_score"]
    return float(np.mean(100 * (np.asarray(returns, dtype=float) - low) / (high - low)))


def final_episodes(run: dict) -> int | None:
    """Episodes of a run's last evaluation, where results.json keeps them."""
    returns = run["evaluations"][-1].get("episode_returns") if run["evaluations"] else None
    return len(returns) if returns else None


def scores(run: dict, rule: str) -> list[float]:
    """The normalised scores a run contributes under `rule` (empty without reference scores)."""
    values = [e["normalized_score_mean"] for e in run["evaluations"] if e["normalized_score_mean"] is not None]
    if not values or len(values) < len(run["evaluations"]):
        return []
    return [final_score(run)] if rule == "last" else values[-10:-1] + [final_score(run)]


def bootstrap(strata: list[np.ndarray], statistic):
    """CONFIDENCE percentile interval (low, high) of `statistic` over resamples that draw, within each
    stratum, as many entries as it has, with replacement. `statistic` maps a (RESAMPLES, n) array of
    the resampled entries, strata side by side, to RESAMPLES values (or rows of values: the interval
    is then one per column)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    drawn = np.concatenate([s[rng.integers(0, len(s), (RESAMPLES, len(s)))] for s in strata], axis=1)
    low, high = np.percentile(statistic(drawn), [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)], axis=0)
    return (float(low), float(high)) if np.ndim(low) == 0 else (low, high)


def iqm(values: np.ndarray) -> np.ndarray:
    """Interquartile mean along the last axis: the mean of the middle half, a quarter cut from each
    end (scipy.stats.trim_mean(values, 0.25, axis=-1), rliable's IQM)."""
    values = np.sort(values, axis=-1)
    cut = int(0.25 * values.shape[-1])
    return values[..., cut:values.shape[-1] - cut].mean(axis=-1)


def seed_interval(per_seed: list[list[float]]) -> tuple[float, float] | None:
    """Bootstrap interval over seeds of the mean of all their values (each seed's values drawn
    together); None with fewer than two seeds."""
    if len(per_seed) < 2:
        return None
    sums = np.array([np.sum(v) for v in per_seed], dtype=float)
    counts = np.array([len(v) for v in per_seed], dtype=float)
    order = np.arange(len(per_seed))
    return bootstrap([order], lambda idx: sums[idx].sum(1) / counts[idx].sum(1))


def seed_std(per_seed: list[list[float]]) -> float:
    """The std over seeds of each seed's mean (of its last 10 evaluations, or its one score)."""
    return float(np.std([np.mean(v) for v in per_seed]))


def cell(per_seed: list[list[float]]) -> str:
    """mean of the seeds' values pooled ± std over seeds (none with one seed), and the interval over seeds."""
    values = [v for seed_values in per_seed for v in seed_values]
    interval = seed_interval(per_seed)
    return fmt(float(np.mean(values)), seed_std(per_seed) if len(per_seed) > 1 else None) + \
        ("" if interval is None else f" [{interval[0]:.1f}, {interval[1]:.1f}]")


def read_csv(name: str) -> list[dict]:
    with open(os.path.join(BENCHMARKS, name), newline="") as f:
        return list(csv.DictReader(f))


def fmt(mean: float, std: float | None) -> str:
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def paper_cell(row: dict) -> str:
    """The paper's number as the paper printed it (ARQ prints integers); "n/a" where the paper has a
    number that our copy of its text lost (empty score_mean)."""
    if not row["score_mean"]:
        return MISSING
    return row["score_mean"] + (f" ± {row['score_std']}" if row["score_std"] else "")


def out_of_range(ours: float, row: dict) -> str:
    if not row["score_mean"]:
        return ""  # nothing to compare with
    paper = float(row["score_mean"])
    half_width = max(FLAG_STDS * float(row["score_std"] or 0.0), FLAG_MIN_POINTS)
    if ours < paper - half_width:
        return " ⚠ low"
    if ours > paper + half_width:
        return " ⚠ high"
    return ""


def aggregate(runs: list[dict], rule: str, n_seeds: int) -> dict | None:
    """Our cell: the paper's rule over the first `n_seeds` finished seeds."""
    chosen = sorted((r for r in runs if r.get("finished")), key=lambda r: r["seed"])[:n_seeds]
    per_seed = [scores(r, rule) for r in chosen]
    if not chosen or not all(per_seed):
        return None
    values = [v for seed_values in per_seed for v in seed_values]
    return {"mean": float(np.mean(values)), "std": seed_std(per_seed), "seeds": len(chosen), "text": cell(per_seed),
            "steps": sorted({r["args"]["total_steps"] for r in chosen}),
            "short": rule == "mean_last_10" and any(len(s) < 10 for s in per_seed)}


def table_protocol(rows: list[dict]) -> tuple[str, int, int]:
    """(rule, seeds, steps) of the paper's own runs in a table; borrowed columns don't count."""
    own = [r for r in rows if r["final_score_rule"] in RULES]
    rules = {r["final_score_rule"] for r in own}
    if len(rules) != 1:
        raise UserError(f"table {rows[0]['paper']} {rows[0]['table']} has final_score_rule {sorted(rules)}: "
                        f"expected exactly one of {', '.join(RULES)} among its own methods")
    return rules.pop(), max(int(r["seeds"]) for r in own), max(int(r["steps"]) for r in own)


def inferred_notes(rows: list[dict]) -> list[str]:
    """'methods: why' for the table's own methods whose rule (or seeds, steps) the paper implies
    without stating it (rule_basis "inferred: why")."""
    by_reason: dict[str, list[str]] = {}
    for r in rows:
        if r["final_score_rule"] in RULES and r["rule_basis"].startswith("inferred"):
            by_reason.setdefault(r["rule_basis"].split(":", 1)[1].strip(), []).append(r["method"])
    return [f"{', '.join(dict.fromkeys(methods))}: {why}" for why, methods in by_reason.items()]


def data_candidates(mapping_row: dict) -> list[str]:
    """The data that can stand for a paper dataset, preferred first: D4RL's own file of it (the same
    data), the full stand-in, the quick one."""
    ids = (f"d4rl/{mapping_row['paper_dataset']}", mapping_row["minari_id"], mapping_row["quick_id"])
    return list(dict.fromkeys(d for d in ids if d))


def relation(mapping_row: dict, dataset: str) -> str:
    return "same data: D4RL's file" if dataset.startswith("d4rl/") else mapping_row["relation"]


def pick_dataset(mapping_row: dict, by_dataset: dict, algo: str | None = None) -> str | None:
    """The data that stood in for a paper dataset (in `algo`'s runs, if given): the first of
    `data_candidates` with runs."""
    for dataset in data_candidates(mapping_row):
        if dataset in by_dataset and (algo is None or algo in by_dataset[dataset]):
            return dataset
    return None


def table_markdown(rows: list[dict], mapping: dict, by_dataset: dict, algo_order: list[str]) -> list[str]:
    paper, table = rows[0]["paper"], rows[0]["table"]
    rule, seeds, steps = table_protocol(rows)
    datasets = list(dict.fromkeys(r["paper_dataset"] for r in rows))
    used = {ds: pick_dataset(mapping[ds], by_dataset) for ds in datasets if ds in mapping}
    with_runs = [ds for ds in datasets if used.get(ds)]
    inferred = inferred_notes(rows)
    out = [f"### {paper}: {table}", "",
           f"Paper protocol: {seeds} seeds, {steps:,} steps, score = {RULES[rule]}"
           + (f" (inferred, not stated by the paper: {'; '.join(inferred)})" if inferred else "")
           + f". Our cells use the same rule over our first {seeds} seeds. Cell: ours, paper's number in brackets."]
    if not with_runs:
        return out + ["", f"No runs on this table's {len(datasets)} datasets yet.", ""]
    ours_algos = {a for ds in with_runs for d in data_candidates(mapping[ds]) for a in by_dataset.get(d, {})}
    mapped = list(dict.fromkeys(r["algo"] for r in rows if r["algo"]))
    algos = [a for a in algo_order if a in ours_algos or a in mapped]
    reference = list(dict.fromkeys(r["method"] for r in rows if not r["algo"]))
    header = ["paper dataset", "our data"] + algos + [f"{m} (paper)" for m in reference]
    out += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = set()
    for ds in with_runs:
        # Each cell takes its algorithm's runs on the preferred data that has them; a row whose cells
        # used different data names it in each cell.
        cell_data = {algo: pick_dataset(mapping[ds], by_dataset, algo) for algo in algos}
        row_data = list(dict.fromkeys(d for d in cell_data.values() if d)) or [used[ds]]
        cells = [ds, ", ".join(f"`{d}` ({relation(mapping[ds], d)})" for d in row_data)]
        for algo in algos:
            paper_row = next((r for r in rows if r["paper_dataset"] == ds and r["algo"] == algo), None)
            data = cell_data[algo]
            ours = aggregate(by_dataset[data].get(algo, []) if data else [], rule, seeds)
            text = "—" if ours is None else ours["text"]
            if ours is not None:
                if paper_row is not None:
                    text += out_of_range(ours["mean"], paper_row)
                if ours["seeds"] < seeds or ours["steps"][-1] < steps or ours["short"]:
                    text += " †"
                    notes.add(f"{algo}: {ours['seeds']} seeds, {', '.join(f'{s:,}' for s in ours['steps'])} steps"
                              + (", fewer than 10 evaluations" if ours["short"] else ""))
            if paper_row is not None:
                text += f" ({paper_cell(paper_row)})"
            if ours is not None and len(row_data) > 1:
                text += f" on `{data}`"
            cells.append(text)
        for method in reference:
            paper_row = next((r for r in rows if r["paper_dataset"] == ds and r["method"] == method), None)
            cells.append(paper_cell(paper_row) if paper_row else "")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", f"Rows: {len(with_runs)} of the table's {len(datasets)} datasets (the others have no runs)."]
    if any(not r["score_mean"] for r in rows if r["paper_dataset"] in with_runs):
        out.append(f"{MISSING}: the paper has a number here that our copy of its text lost "
                   "(benchmarks/TRANSCRIPTION.md).")
    if notes:
        out.append("† fewer seeds, steps or evaluations than the paper: " + "; ".join(sorted(notes)) + ".")
    return out + [""]


def run_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for run in runs:
        last10 = scores(run, "mean_last_10")
        rows.append({
            "run": run["run_dir"], "algorithm": run["algorithm"], "dataset": run["env"], "seed": run["seed"],
            "finished": run.get("finished", False), "total_steps": run["args"].get("total_steps"),
            "bc_steps": run["args"].get("bc_steps", ""), "evaluations": len(run["evaluations"]),
            "final_normalized_score": run.get("final_normalized_score"),
            "mean_last_10_normalized_score": float(np.mean(last10)) if last10 else None,
            "final_return": run.get("final_return"), "final_episodes": final_episodes(run),
            "train_seconds": run.get("train_seconds"),
            # wall-clock of training, evaluations excluded, per 1M gradient steps
            "train_hours_per_1M_steps": per_million(run),
            "torch": run.get("torch") or UNKNOWN, "device": run.get("device") or UNKNOWN,
            "transitions": run["dataset"]["transitions"], "ref_scores_source": run["dataset"]["ref_scores_source"],
            "data_source": run["dataset"].get("source", ""), "eval_env": run["dataset"].get("eval_env", ""),
        })
    return rows


def per_million(run: dict) -> float | None:
    seconds, steps = run.get("train_seconds"), run["args"].get("total_steps")
    return round(seconds / steps * 1e6 / 3600, 3) if seconds and steps else None


def final_scores_by_task(runs: list[dict]) -> dict[str, dict[str, np.ndarray]]:
    """algorithm -> dataset -> the final normalised scores of its finished runs there (datasets with
    reference scores only)."""
    out: dict[str, dict[str, list]] = {}
    for run in runs:
        score = final_score(run) if run.get("finished") else None
        if score is not None:
            out.setdefault(run["algorithm"], {}).setdefault(run["env"], []).append(score)
    return {a: {d: np.array(v) for d, v in sorted(by.items())} for a, by in sorted(out.items())}


def aggregate_markdown(runs: list[dict], by_task: dict, profile_file: str | None) -> list[str]:
    """Per algorithm: the IQM of its runs' final scores over every task it ran, with a stratified
    bootstrap interval, and the performance profile."""
    if not by_task:
        return []
    out = ["## Aggregate over tasks", "",
           "Per algorithm, every finished run's final normalised score on every task it ran (datasets with "
           "reference scores): the interquartile mean (IQM: the mean of the middle 50% of runs, robust to a "
           "task or seed far off; scipy's trim_mean(x, 0.25), as rliable) and the plain mean, with a 95% stratified bootstrap interval (runs "
           f"resampled within each task, {RESAMPLES:,} resamples). Algorithms that ran different tasks are "
           "not compared by these numbers.", "",
           "| algorithm | tasks | runs | final evaluation (episodes per run) | IQM [95% CI] | mean [95% CI] |",
           "|---|---|---|---|---|---|"]
    for algo, tasks in by_task.items():
        strata = list(tasks.values())
        pooled = np.concatenate(strata)
        low, high = bootstrap(strata, iqm)
        mean_low, mean_high = bootstrap(strata, lambda drawn: drawn.mean(axis=1))
        episodes = sorted({final_episodes(r) for r in runs if r["algorithm"] == algo and r.get("finished")
                           and r["env"] in tasks}, key=lambda n: -1 if n is None else n)
        out.append(f"| {algo} | {len(tasks)} | {len(pooled)} | {', '.join('?' if n is None else str(n) for n in episodes)} | "
                   f"{float(iqm(pooled)):.1f} [{low:.1f}, {high:.1f}] | "
                   f"{pooled.mean():.1f} [{mean_low:.1f}, {mean_high:.1f}] |")
    if profile_file:
        out += ["", "Performance profile: the fraction of runs whose final score exceeds τ, averaged over the "
                "tasks each algorithm ran (shaded: 95% stratified bootstrap interval).", "",
                f"![performance profile]({profile_file})"]
    return out + [""]


def plot_profile(by_task: dict, path: str) -> None:
    """Performance profiles (Agarwal et al. 2021, fig. 2): per algorithm, the fraction of runs
    scoring above tau, averaged over its tasks, with a stratified bootstrap band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = np.concatenate([v for tasks in by_task.values() for v in tasks.values()])
    taus = np.linspace(min(0.0, every.min()), max(100.0, every.max()), 201)
    fig, ax = plt.subplots(figsize=(6, 4))
    for algo, tasks in by_task.items():
        strata = list(tasks.values())
        widths = np.cumsum([0] + [len(s) for s in strata])

        def profile(drawn):  # (R, n) -> (R, taus): each task's fraction above tau, then their mean
            above = drawn[:, :, None] > taus
            return np.mean([above[:, a:b].mean(axis=1) for a, b in zip(widths[:-1], widths[1:])], axis=0)

        curve = profile(np.concatenate(strata)[None])[0]
        ax.plot(taus, curve, label=f"{algo} ({len(strata)} tasks, {widths[-1]} runs)")
        ax.fill_between(taus, *bootstrap(strata, profile), alpha=0.2)
    ax.set_xlabel("normalised score τ")
    ax.set_ylabel("fraction of runs with score > τ")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def plot_curves(runs: list[dict], folder: str) -> dict[str, str]:
    """One PNG per dataset; returns dataset -> file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    files = {}
    for dataset in sorted({r["env"] for r in runs}):
        fig, ax = plt.subplots(figsize=(6, 4))
        normalised = all(e["normalized_score_mean"] is not None for r in runs if r["env"] == dataset
                         for e in r["evaluations"])
        key = "normalized_score_mean" if normalised else "return_mean"
        for algo in sorted({r["algorithm"] for r in runs if r["env"] == dataset}):
            curves = [{e["step"]: e[key] for e in r["evaluations"]}
                      for r in runs if r["env"] == dataset and r["algorithm"] == algo and r["evaluations"]]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))  # steps every seed reached
            values = np.array([[c[s] for s in steps] for c in curves])
            mean, std = values.mean(0), values.std(0)
            ax.plot(steps, mean, label=f"{algo} ({len(curves)} seeds)")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("gradient steps")
        ax.set_ylabel("normalised score" if normalised else "return")
        ax.set_title(dataset)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = dataset.replace("/", "-") + ".png"
        fig.savefig(os.path.join(folder, name), dpi=100)
        plt.close(fig)
        files[dataset] = name
    return files


QUICK_PROFILE_FILE = "quick_profile.json"  # written by tools/benchmark.py --quick into its output folder
QUICK_ORDER = ["bc", "td3_bc", "awr", "iql", "cql", "fisher_brc", "itrpo", "brac_plus", "arq"]


def read_quick_profile(folders: list[str]) -> dict:
    import json

    profile = {}
    for folder in folders:
        path = os.path.join(folder, QUICK_PROFILE_FILE)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    profile.update(json.load(f))
            except (OSError, ValueError, TypeError) as exc:
                print(f"skipping {path}: not a quick profile ({type(exc).__name__})", flush=True)
    return profile


def used_cache(run: dict, folders: list[str]) -> bool:
    """Whether the run read a pretrained model or ARQ's support set from the cache (its stdout.log)."""
    for folder in folders:
        try:
            with open(os.path.join(folder, run["run_dir"], "stdout.log")) as f:
                return any(line.startswith(("reusing the cached", "[arq] reusing cached")) for line in f)
        except OSError:
            continue
    return False


def second_half(run: dict) -> float | None:
    """Mean normalised score over the second half of a run's evaluations (the last one if it has one)."""
    values = [e["normalized_score_mean"] for e in run["evaluations"]]
    if not values or any(v is None for v in values):
        return None
    return float(np.mean(values[len(values) // 2:]))


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def quick_table(runs: list[dict], profile: dict, folders: list[str]) -> list[str]:
    """The quick profile's table: one row per dataset, one column per file, each run's second-half
    mean (mean ± std over seeds); a file too slow for the profile says so instead."""
    algos = [a for a in QUICK_ORDER if a in profile] + sorted(set(profile) - set(QUICK_ORDER))
    finished = [r for r in runs if r.get("finished") and r["algorithm"] in profile and r["evaluations"]]
    datasets = sorted({r["env"] for r in finished})
    if not datasets:
        return []
    header = ["data", "transitions", "behaviour"] + algos
    out = ["## Quick profile", "",
           "Normalised score, mean over the second half of each run's evaluations (one evaluation of a few "
           "episodes swings by several points on its own), then mean ± std over seeds; behaviour = the "
           "dataset's mean episode return, normalised; in brackets, the 95% bootstrap interval over seeds. "
           "Budgets are minutes of training, not the papers' 1M steps: this shows the files learning, not "
           "their final scores.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for dataset in datasets:
        of = {a: [r for r in finished if r["env"] == dataset and r["algorithm"] == a] for a in algos}
        info = next(r for r in finished if r["env"] == dataset)["dataset"]
        behaviour = info.get("episode_return_mean")
        score = None if behaviour is None or info["ref_min_score"] is None else \
            100 * (behaviour - info["ref_min_score"]) / (info["ref_max_score"] - info["ref_min_score"])
        cells = [f"`{dataset}`", f"{info['transitions']:,}", "—" if score is None else f"{score:.1f}"]
        for algo in algos:
            values = [second_half(r) for r in of[algo]]
            if profile[algo].get("too_slow") and of[algo]:
                cells.append(f"too slow for quick: {of[algo][0]['args']['total_steps']:,} steps")
            elif not of[algo]:
                cells.append("not run")
            elif not values or any(v is None for v in values):
                cells.append("—")
            else:
                cells.append(cell([[v] for v in values]))
        out.append("| " + " | ".join(cells) + " |")
    # The budgets, as each run had them: RL steps, behaviour steps, minutes of training (seed 0).
    budget = ["budget", "", ""]
    for algo in algos:
        mine = sorted((r for r in finished if r["algorithm"] == algo), key=lambda r: r["seed"])
        if not mine:
            budget.append("—")
            continue
        a = mine[0]["args"]
        bc = a.get("bc_steps") or a.get("bc_warmup_steps")
        budget.append(f"{a['total_steps']:,} steps" + (f" ({bc:,} behaviour)" if bc else "")
                      + f", {minutes(mine[0]['train_seconds'])}")
    out += ["| " + " | ".join(budget) + " |", ""]
    bc_mean = {d: np.mean([second_half(r) for r in finished
                           if r["env"] == d and r["algorithm"] == "bc"] or [np.nan]) for d in datasets}
    for dataset in datasets:
        if np.isnan(bc_mean[dataset]):
            continue
        below = [a for a in algos if a != "bc" and not profile[a].get("too_slow")
                 and (vals := [second_half(r) for r in finished
                               if r["env"] == dataset and r["algorithm"] == a])
                 and np.mean(vals) < bc_mean[dataset]]
        out.append(f"On `{dataset}`, below BC ({bc_mean[dataset]:.1f}): {', '.join(below) or 'none'}.")
    flags = [f"{a}: `{' '.join(profile[a]['flags'])}`" for a in algos if profile[a].get("flags")]
    if flags:
        out.append("Settings other than the files' defaults (see tools/benchmark.py, QUICK_FLAGS): "
                   + "; ".join(flags) + ".")
    precisions = sorted({r["args"].get("precision", "fp32") for r in finished})
    if precisions != ["fp32"]:
        out.append(f"Precision (--precision): {', '.join(precisions)}.")
    slow = [f"{a}: {profile[a]['too_slow']}" for a in algos if profile[a].get("too_slow")]
    if slow:
        out.append("Too slow for the quick profile: " + "; ".join(slow) + ".")
    cached = [r["run_dir"] for r in finished if used_cache(r, folders)]
    if cached:
        out.append("Read their behaviour model (ARQ: score model and support set) from the cache of an "
                   "earlier run with the same data and settings: " + ", ".join(f"`{c}`" for c in cached) + ".")
    return out + [""]


def plot_quick(runs: list[dict], profile: dict, folder: str) -> dict[str, str]:
    """One figure per dataset, one panel per file: its learning curve (mean ± std over seeds) with
    BC's value in the quick table as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = [a for a in QUICK_ORDER if a in profile] + sorted(set(profile) - set(QUICK_ORDER))
    files = {}
    for dataset in sorted({r["env"] for r in runs if r["algorithm"] in profile}):
        mine = [r for r in runs if r["env"] == dataset and r["evaluations"] and r.get("finished")]
        bc = [second_half(r) for r in mine if r["algorithm"] == "bc"]
        here = [a for a in algos if any(r["algorithm"] == a for r in mine)]  # a panel per file run on it
        if not here:
            continue
        cols = min(3, len(here))
        rows = -(-len(here) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), sharey=True, squeeze=False)
        for ax, algo in zip(axes.flat, here):
            curves = [{e["step"]: e["normalized_score_mean"] for e in r["evaluations"]}
                      for r in mine if r["algorithm"] == algo]
            ax.set_title(algo, fontsize=9)
            if bc:
                ax.axhline(float(np.mean(bc)), color="gray", ls="--", lw=1, label="BC")
            if not curves or any(v is None for c in curves for v in c.values()):
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            values = np.array([[c[s] for s in steps] for c in curves])
            minutes_ = np.mean([r["train_seconds"] for r in mine if r["algorithm"] == algo]) / 60
            ax.plot(steps, values.mean(0), color="C0")
            ax.fill_between(steps, values.mean(0) - values.std(0), values.mean(0) + values.std(0), alpha=0.2)
            ax.set_title(f"{algo} ({minutes_:.1f} min)", fontsize=9)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(here):]:
            ax.axis("off")
        for ax in axes[:, 0]:
            ax.set_ylabel("normalised score", fontsize=8)
        for ax in axes[-1]:
            ax.set_xlabel("gradient steps", fontsize=8)
        fig.suptitle(f"{dataset}: each file's curve (mean ± std over seeds); dashed: BC (table's value)",
                     fontsize=10)
        fig.tight_layout()
        name = "quick-" + dataset.replace("/", "-") + ".png"
        fig.savefig(os.path.join(folder, name), dpi=100)
        plt.close(fig)
        files[dataset] = name
    return files


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="folders of runs (searched recursively for results.json)")
    p.add_argument("--out", default=os.path.join(ROOT, "results"), help="output folder (default: results)")
    args = p.parse_args(argv)

    runs = load_runs(args.runs)
    if not runs:
        raise UserError(f"no results.json under {', '.join(args.runs)}")
    check_output_dir(args.out, "--out")
    os.makedirs(args.out, exist_ok=True)
    rows = run_rows(runs)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(os.path.join(args.out, "runs.csv"), table.getvalue().encode())
    curves = plot_curves(runs, os.path.join(args.out, "curves"))

    by_dataset: dict[str, dict[str, list]] = {}
    for run in runs:
        by_dataset.setdefault(run["env"], {}).setdefault(run["algorithm"], []).append(run)
    mapping = {r["paper_dataset"]: r for r in read_csv("datasets.csv")}
    paper_rows = read_csv("paper_scores.csv")
    tables: dict[tuple, list] = {}
    for row in paper_rows:
        tables.setdefault((row["paper"], row["table"]), []).append(row)
    algo_order = list(dict.fromkeys([r["algo"] for r in paper_rows if r["algo"]]
                                    + sorted({r["algorithm"] for r in runs})))

    unfinished = sum(not r.get("finished") for r in runs)
    md = ["# Benchmark summary", "",
          f"{len(runs)} runs from {', '.join(args.runs)} ({unfinished} unfinished, left out of the tables). "
          f"Normalised scores: 100 = the dataset's expert reference, 0 = random. "
          f"⚠ low / ⚠ high: our mean is outside the paper's mean ± max({FLAG_STDS:g} × paper std, "
          f"{FLAG_MIN_POINTS:g} points). Our data is rarely the paper's: see the data section.", "",
          "Protocol. Final, not best: every score in the paper tables and the aggregate is of the policy at "
          "the end of training, its last "
          "evaluation (over --final-episodes where the run had it; each run's count is in runs.csv), or the "
          "mean of its last 10 evaluations where a paper's rule says so; no number is the best evaluation "
          "along the way. No hyperparameter was tuned: every file runs its paper's settings, the same on "
          "every dataset (the quick profile's departures, for its budget, are listed under its table). "
          f"Cells are mean ± std over seeds, then the {CONFIDENCE:.0%} percentile bootstrap interval of the "
          f"mean over seeds in brackets (none with one seed); bootstraps use {RESAMPLES:,} resamples of "
          f"numpy's generator with seed {BOOTSTRAP_SEED}.", ""]
    setups = {}
    for run in runs:
        key = (run.get("device") or UNKNOWN, run.get("torch") or UNKNOWN)
        setups[key] = setups.get(key, 0) + 1
    md += ["Ran on: " + "; ".join(f"{n} runs on {device}, torch {version}" for (device, version), n in
                                  sorted(setups.items())) + "."]
    if any(UNKNOWN in key for key in setups):
        md[-1] += (" Unknown: their results.json does not name the device and torch version (written by a "
                   "common.py without those keys).")
    md.append("")
    by_task = final_scores_by_task(runs)
    if by_task:
        plot_profile(by_task, os.path.join(args.out, PROFILE_FILE))
    md += aggregate_markdown(runs, by_task, PROFILE_FILE if by_task else None)
    profile = read_quick_profile(args.runs)
    if profile:
        quick_curves = plot_quick(runs, profile, os.path.join(args.out, "curves"))
        md += quick_table(runs, profile, args.runs)
        md += [f"![{d}](curves/{f})" for d, f in quick_curves.items()] + [""]
    md += ["## Paper tables", ""]
    for rows_of_table in tables.values():
        md += table_markdown(rows_of_table, mapping, by_dataset, algo_order)

    md += ["## Data", "", "| dataset | stands in for | relation | transitions | reference scores | evaluated in | note |",
           "|---|---|---|---|---|---|---|"]
    for dataset, by_algo in sorted(by_dataset.items()):
        info = next(iter(by_algo.values()))[0]["dataset"]
        papers = [r for r in mapping.values() if dataset in data_candidates(r)]
        note = next((r["note"] if dataset == r["minari_id"] else r["quick_note"] for r in papers), "")
        if dataset.startswith("d4rl/"):
            note = info.get("source", "D4RL's own file")
        elif not note and dataset.startswith("local/"):
            note = "built by tools/make_dataset.py from the shipped snapshots"
        md.append(f"| `{dataset}` | {', '.join(r['paper_dataset'] for r in papers) or '(no paper dataset)'} | "
                  f"{relation(papers[0], dataset) if papers else '—'} | {info['transitions']:,} | "
                  f"{info['ref_scores_source']} | {info.get('eval_env') or '—'} | {note} |")

    others = [d for d in sorted(by_dataset) if not any(d in data_candidates(r) for r in mapping.values())]
    if others:
        md += ["", "## Runs on datasets without paper numbers", "",
               "Last evaluation, mean ± std over seeds [95% bootstrap interval] (normalised score, or return "
               "without reference scores).", "",
               "| dataset | algorithm | seeds | score |", "|---|---|---|---|"]
        for dataset in others:
            for algo, algo_runs in sorted(by_dataset[dataset].items()):
                finished = [r for r in algo_runs if r.get("finished") and r["evaluations"]]
                if not finished:
                    continue
                has_ref = final_score(finished[0]) is not None
                values = [final_score(r) if has_ref else r["evaluations"][-1]["return_mean"] for r in finished]
                md.append(f"| `{dataset}` | {algo} | {len(finished)} | {cell([[v] for v in values])}"
                          f"{'' if has_ref else ' (return)'} |")

    md += ["", "## Learning curves", ""] + [f"![{d}](curves/{f})" for d, f in curves.items()]
    md += ["", "Every run: [runs.csv](runs.csv)."]
    atomic_write(os.path.join(args.out, "summary.md"), ("\n".join(md) + "\n").encode())
    print(f"[summarize] {len(runs)} runs -> {os.path.join(args.out, 'summary.md')}, runs.csv, {len(curves)} plots"
          + (f", {PROFILE_FILE}" if by_task else ""))


if __name__ == "__main__":
    install_user_error_hook()
    main()
