"""--compile: each network update's forward passes and loss are one graph without a break
(common.compiled, fullgraph), and once each path through a training step has been taken (warm-up),
nothing is compiled again, whatever the step counters and the thresholds that change during a run say."""

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


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_training_step_runs_compiled_and_compiles_nothing_after_warm_up(dynamo_only, name):
    """fullgraph: a graph break inside a loss would raise here."""
    module, agent = compiled_agent(name)
    if name == "brac_plus":
        agent.kl_threshold.fill_(1.0), agent.gp_threshold.fill_(0.5)
    for step in SMALL[name][1]:
        if step == "train":
            for pretrained in ("behavior", "score"):  # frozen after their phase, as in the scripts
                if hasattr(agent, pretrained):
                    getattr(agent, pretrained).requires_grad_(False)
        batch = batch_for(module, step)
        for _ in range(2):
            getattr(agent, step)(batch)
        warm = graphs()
        assert warm > 0, step  # compiled, not silently eager
        for _ in range(3):
            getattr(agent, step)(batch)
        assert graphs() == warm, step


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_loss_of_an_agent_is_compiled_with_compile(dynamo_only, name):
    """Each of the agent's *_loss methods is replaced by its compiled form: a loss left eager would
    pass the graph count above as long as another loss of the step compiled."""
    module, agent = compiled_agent(name)
    losses = [n for n, v in vars(type(agent)).items() if n.endswith("_loss") and callable(v)]
    assert losses
    for loss in losses:
        assert hasattr(vars(agent).get(loss), "_torchdynamo_orig_callable"), loss


@pytest.mark.parametrize("name", ["arq", "bc"])
def test_steps_compile_where_dynamo_cannot_trace_the_autocast_availability_check(dynamo_only, monkeypatch,
                                                                                 name):
    """torch 2.11's Dynamo cannot trace torch.amp.is_autocast_available; the output layers
    (OutputLinear, EnsembleLinear(output=True)) must not call it inside a compiled loss."""
    available = torch.amp.is_autocast_available

    def untraceable(kind):
        if torch.compiler.is_compiling():
            raise RuntimeError("torch.amp.is_autocast_available traced")
        return available(kind)

    monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)
    module, agent = compiled_agent(name)
    for step in SMALL[name][1]:
        getattr(agent, step)(batch_for(module, step))
    assert graphs() > 0


def test_td3_bc_compiles_nothing_after_one_critic_step_and_one_actor_step(dynamo_only):
    module, agent = compiled_agent("td3_bc", policy_freq=2)
    batch = batch_for(module, "train")
    for _ in range(2):  # a critic update alone, then critic and actor
        agent.train(batch)
    warm = graphs()
    for _ in range(6):
        agent.train(batch)
    assert graphs() == warm


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
