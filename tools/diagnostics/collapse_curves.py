"""The curves of the runs that settle Fisher-BRC's and iTRPO's collapses (docs/results.md, Long runs):
the same file, seed and dataset with one change at a time (the states, the update order, the warm-up).

    python tools/diagnostics/collapse_curves.py collect ~/long_runs/<run folder> --label "raw states"
    python tools/diagnostics/collapse_curves.py plot

`collect` keeps a run folder's evaluations in docs/long_runs/collapse/<folder>.json (finished or not;
again later, it replaces the record), `plot` draws every record there into docs/collapse.png, one
panel per file.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from common import UserError, atomic_write, install_user_error_hook, write_json  # noqa: E402

RECORDS = os.path.join(ROOT, "docs", "long_runs", "collapse")
FIGURE = os.path.join(ROOT, "docs", "collapse.png")


def collect(folder: str, label: str) -> str:
    """The record of one run folder; its path."""
    try:
        with open(os.path.join(folder, "results.json")) as f:
            results = json.load(f)
        evaluations = [[e["step"], e["normalized_score_mean"], e["normalized_score_std"]]
                       for e in results["evaluations"]]
        record = {"label": label, "algorithm": results["algorithm"], "env": results["env"],
                  "seed": results["seed"], "total_steps": results["args"]["total_steps"],
                  "finished": bool(results["finished"]), "evaluations": evaluations}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{folder} holds no results.json of a run ({type(exc).__name__}: {exc})") from None
    path = os.path.join(RECORDS, os.path.basename(os.path.normpath(folder)) + ".json")
    write_json(path, record)
    return path


def plot() -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = []
    for path in sorted(glob.glob(os.path.join(RECORDS, "*.json"))):
        with open(path) as f:
            records.append(json.load(f))
    if not records:
        raise UserError(f"no records in {os.path.relpath(RECORDS, ROOT)}/: collect a run folder first")
    algorithms = sorted({r["algorithm"] for r in records})
    labels = sorted({r["label"] for r in records}, key=lambda label: (not label.endswith("(the default)"), label))
    fig, axes = plt.subplots(1, len(algorithms), figsize=(5.5 * len(algorithms), 4.8), squeeze=False)
    for ax, algorithm in zip(axes[0], algorithms):
        for r in sorted((r for r in records if r["algorithm"] == algorithm), key=lambda r: labels.index(r["label"])):
            steps, scores = zip(*[(e[0], e[1]) for e in r["evaluations"]]) if r["evaluations"] else ((), ())
            unfinished = "" if r["finished"] else f", to {steps[-1] // 1000}k" if steps else ", no evaluation yet"
            ax.plot(steps, scores, marker=".", lw=1.2, color=f"C{labels.index(r['label'])}",
                    ls="-" if r["seed"] == 0 else "--",  # one colour per change, one line style per seed
                    label=f"{r['label']} (seed {r['seed']}{unfinished})")
        ax.set_title(f"{algorithm}: 10 episodes every 10,000 steps", fontsize=9)
        ax.set_xlabel("RL gradient steps")
        ax.set_ylabel("normalised score")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # under the axes: no curve hidden
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(FIGURE, buf.getvalue())
    return FIGURE


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="keep a run folder's evaluations in docs/long_runs/collapse/")
    c.add_argument("folder", help="a run folder (holding results.json)")
    c.add_argument("--label", required=True, help="what this run changes, as the figure's legend says it")
    sub.add_parser("plot", help="draw the collected records into docs/collapse.png")
    args = parser.parse_args(argv)
    if args.cmd == "collect":
        print(f"[collapse_curves] -> {os.path.relpath(collect(os.path.expanduser(args.folder), args.label), ROOT)}")
    else:
        print(f"[collapse_curves] -> {os.path.relpath(plot(), ROOT)}")


if __name__ == "__main__":
    install_user_error_hook()
    main()
