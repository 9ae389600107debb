"""--compile: once each path through a training step has been taken (warm-up), nothing is compiled
again, whatever the step counters and the thresholds that change during a run say."""

import functools

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import load_algorithm
from test_precision import ACT, OBS, SMALL, batch_for


@pytest.fixture
def dynamo_only(monkeypatch):
    """torch.compile with the eager backend: Dynamo captures the same graphs, breaks and recompiles
    as with inductor, and runs them without generating code (seconds instead of minutes)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compiled_agent(name: str, **overrides):
    module = load_algorithm(name)
    cls = next(v for v in vars(module).values()
               if isinstance(v, type) and v.__module__ == module.__name__ and hasattr(v, "act"))
    args = module.Args(compile=True, **{**SMALL[name][0], **overrides})
    for k, v in (module.domain_defaults(args.env).items() if hasattr(module, "domain_defaults") else ()):
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.manual_seed(0)
    return module, cls(args, OBS, ACT, torch.device("cpu"))


def graphs() -> int:
    """Graphs Dynamo has captured so far in this test, recompilations included."""
    return counters["stats"]["unique_graphs"]


def test_brac_plus_compiles_nothing_when_its_thresholds_change(dynamo_only):
    """eps_GP is set anew at the end of every epoch (update_gp_threshold) and delta_KL after the
    initial policy (set_thresholds); a value the step reads as a constant would make it recompile
    each time, and Dynamo gives up compiling a function after 8 recompiles."""
    module, agent = compiled_agent("brac_plus")
    batch = batch_for(module, "train")
    for step in ("train_behavior", "train_initial_policy"):
        for _ in range(2):
            getattr(agent, step)(batch)
    agent.set_thresholds(batch.observations)
    for _ in range(2):
        agent.train_initial_critic(batch)
    agent.behavior.requires_grad_(False)
    for _ in range(2):
        agent.train(batch)
    warm = graphs()
    for _ in range(3):  # three epochs of two steps
        agent.update_gp_threshold(batch.observations)
        for _ in range(2):
            agent.train(batch)
    assert graphs() == warm
