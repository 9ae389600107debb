"""PyTorch operations per eager training step of each file, counted on the CPU: on a GPU each one is
at least one kernel launch from Python, which is what a small network's step waits on.

    OMP_NUM_THREADS=1 python tools/diagnostics/op_count.py
    OMP_NUM_THREADS=1 python tools/diagnostics/op_count.py --algorithms td3_bc iql

Each file's agent is built by tools/diagnostics/compile_report.py's agent_of (small networks: the count
does not depend on the widths), without --compile, and each training step runs 4 times, then 4 more under
torch.profiler. Counted: the outermost aten operations (those not called by another one), without the
views and metadata operations that launch nothing (VIEWS). Batch sampling, outside train(), adds 2 (an
index draw and one gather from the buffer's table; ARQ's adds 11).
"""

import collections
import os
import sys
from dataclasses import dataclass

import torch
import tyro
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_report import STEPS, agent_of, batch_for  # noqa: E402

VIEWS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::t", "aten::transpose",
         "aten::expand", "aten::expand_as", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice",
         "aten::permute", "aten::alias", "aten::detach", "aten::unbind", "aten::split", "aten::split_with_sizes",
         "aten::chunk", "aten::narrow", "aten::flatten", "aten::unflatten", "aten::view_as", "aten::_unsafe_view",
         "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::result_type", "aten::contiguous",
         "aten::empty", "aten::empty_like", "aten::empty_strided"}
CALLS = 4


@dataclass
class Args:
    algorithms: tuple[str, ...] = tuple(STEPS)
    """files to count"""
    show: int = 0
    """also list this many of each step's most frequent operations"""


def operations(step, batch) -> collections.Counter:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(CALLS):
            step(batch)
    found = collections.Counter()
    for event in prof.events():
        if not event.name.startswith("aten::") or event.name in VIEWS:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            found[event.name] += 1
    return found


def count(name: str, show: int) -> None:
    module, agent = agent_of(name, compile=False)
    for step in STEPS[name][1]:
        if step == "train":
            for pretrained in ("behavior", "score"):  # frozen after their phase, as in the scripts
                if hasattr(agent, pretrained):
                    getattr(agent, pretrained).requires_grad_(False)
        batch = batch_for(module, step)
        for _ in range(CALLS):
            getattr(agent, step)(batch)
        found = operations(getattr(agent, step), batch)
        print(f"{name}.{step}: {sum(found.values()) / CALLS:.0f} operations per call", flush=True)
        for op, n in found.most_common(show):
            print(f"    {n / CALLS:g} x {op}")
        if step == "train_initial_policy" and hasattr(agent, "set_thresholds"):
            agent.set_thresholds(batch.observations)


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(1)
    for name in args.algorithms:
        count(name, args.show)
