"""What `--compile` makes of each file's training steps: the graphs Dynamo captures, the graph
breaks (with their reasons) and the graphs compiled again after warm-up.

    OMP_NUM_THREADS=1 python tools/diagnostics/compile_report.py
    OMP_NUM_THREADS=1 python tools/diagnostics/compile_report.py --algorithms td3_bc brac_plus --backend inductor

Each file's agent is built small (the sizes do not change what is compiled) with --compile, on the
CPU, and each of its training steps (pretraining phases first) runs `--warmup` times on one random
batch, then `--steps` more times; BRAC+'s thresholds are set after its initial policy and eps_GP
again every second step after warm-up, as its epochs do. The eager backend (the default) runs
Dynamo's graphs as they are instead of generating code: the same graphs, breaks and recompiles in
seconds.
"""

import collections
import functools
import importlib.util
import os
import sys
from dataclasses import dataclass

import torch
import tyro
from torch._dynamo.utils import counters

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import common  # noqa: E402

OBS, ACT, N = 5, 3, 48
# small settings of each file, and its training steps in the order they run
STEPS = {
    "bc": (dict(hidden_dim=32), ("train",)),
    "td3_bc": (dict(hidden_dim=32), ("train",)),
    "awr": (dict(hidden_dim=32), ("train",)),
    "iql": (dict(hidden_dim=32), ("train",)),
    "cql": (dict(hidden_dim=32, n_actions=4, bc_warmup_steps=0), ("train",)),
    "fisher_brc": (dict(hidden_dim=32, n_components=3), ("train_behavior", "train")),
    "itrpo": (dict(hidden_dim=32, n_samples=4, bc_steps=1000), ("train_behavior", "train")),
    "brac_plus": (dict(hidden_dim=16, actor_hidden_dim=16, vae_hidden_dim=16, n_ensembles=2, n_samples=3,
                       n_latent=2, kl_margin=0.1, gp_target=0.01),
                  ("train_behavior", "train_initial_policy", "train_initial_critic", "train")),
    "arq": (dict(hidden_dim=32, kth=3, alpha=1.0, score_hidden_dim=8, score_blocks=1), ("train_score", "train")),
}


@dataclass
class Args:
    algorithms: tuple[str, ...] = tuple(STEPS)
    """files to report on"""
    warmup: int = 2
    """calls of each training step before counting recompiles (every path taken once: TD3+BC's
    actor is updated every second step)"""
    steps: int = 6
    """calls after warm-up"""
    backend: str = "eager"
    """torch.compile backend: eager (Dynamo alone, fast) or inductor (what --compile uses)"""


def load_algorithm(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "algorithms", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # torch.compile looks a traced function's globals up by module name
    spec.loader.exec_module(module)
    return module


def agent_of(name: str, compile: bool = True):
    module = load_algorithm(name)
    cls = next(v for v in vars(module).values()
               if isinstance(v, type) and v.__module__ == module.__name__ and hasattr(v, "act"))
    args = module.Args(**STEPS[name][0])
    args.compile = compile
    for k, v in (module.domain_defaults(args.env).items() if hasattr(module, "domain_defaults") else ()):
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.manual_seed(0)
    return module, cls(args, OBS, ACT, torch.device("cpu"))


def batch_for(module, step: str):
    g = torch.Generator().manual_seed(11)
    batch = common.Batch(torch.randn(N, OBS, generator=g), torch.rand(N, ACT, generator=g) * 1.8 - 0.9,
                         torch.randn(N, generator=g), torch.randn(N, OBS, generator=g),
                         (torch.arange(N) % 7 == 0).float())
    if step == "train" and hasattr(module, "SupportBatch"):  # ARQ's RL step reads the support set
        support = torch.rand(N, 6, ACT, generator=g) * 2 - 1
        valid = torch.rand(N, 6, generator=g) > 0.3
        valid[:, 0] = True
        batch = module.SupportBatch(*batch, support, valid, support.flip(0), valid.flip(0))
    return batch


def breaks() -> collections.Counter:
    """Dynamo's graph breaks so far, by the first line of their reason and the function named in it."""
    found = collections.Counter()
    for reason, n in counters["graph_break"].items():
        lines = reason.splitlines()
        named = next((line.strip() for line in lines if "Explanation" in line), "")
        found[f"{lines[0]} ({named[:160]})" if named else lines[0]] += n
    return found


def report(name: str, warmup: int, steps: int) -> None:
    module, agent = agent_of(name)
    for step in STEPS[name][1]:
        if step == "train":
            for pretrained in ("behavior", "score"):  # frozen after their phase, as in the scripts
                if hasattr(agent, pretrained):
                    getattr(agent, pretrained).requires_grad_(False)
        counters.clear()
        batch = batch_for(module, step)
        for _ in range(warmup):
            getattr(agent, step)(batch)
        graphs, found = counters["stats"]["unique_graphs"], breaks()
        for i in range(steps):
            if step == "train" and hasattr(agent, "update_gp_threshold") and i % 2 == 0:
                agent.update_gp_threshold(batch.observations)
            getattr(agent, step)(batch)
        again = counters["stats"]["unique_graphs"] - graphs
        print(f"{name}.{step}: {graphs} graphs and {sum(found.values())} graph breaks compiled in {warmup} calls; "
              f"{again} graphs compiled again in the {steps} calls after them")
        for reason, n in found.most_common():
            print(f"    {n} x {reason}")
        if step == "train_initial_policy" and hasattr(agent, "set_thresholds"):
            agent.set_thresholds(batch.observations)


def main(args: Args) -> None:
    torch.set_num_threads(1)
    compile = torch.compile
    torch.compile = functools.partial(compile, backend=args.backend)
    for name in args.algorithms:
        torch._dynamo.reset()
        report(name, args.warmup, args.steps)


if __name__ == "__main__":
    main(tyro.cli(Args))
