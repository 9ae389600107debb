"""--cuda-graphs, checked on the CPU: what a captured training step needs (no host read, no tensor made
on the CPU, batch sampling on the device, Python state that a replay can carry) and that the captured
step, its graphs replaced by a stand-in that reruns the step, trains as the eager step does, bit for
bit, on both sides of the files' Python branches. No GPU runs here: a capture itself is not tested."""

import contextlib
import dataclasses

import pytest
import torch

import common
import speed
from conftest import load_algorithm
from test_gpu_ready import CpuFactories, host_reads, unfused
from test_precision import SMALL, batch_for

# The files whose training step --cuda-graphs captures, with settings that reach both sides of their
# branches within STEPS steps (TD3+BC's delayed actor, CQL's behaviour-cloning warm-up).
SUPPORTED = {"bc": {}, "td3_bc": dict(policy_freq=2), "awr": {}, "iql": {}, "cql": dict(bc_warmup_steps=5),
             "fisher_brc": {}, "itrpo": {}, "brac_plus": {}, "arq": {}}
STEPS = 14


class Data:
    """ReplayBuffer.sample over a fixed batch's rows: indices drawn on the data's device."""

    def __init__(self, batch):
        self.batch = batch

    def sample(self, batch_size: int):
        idx = torch.randint(0, len(self.batch[0]), (batch_size,), device=self.batch[0].device)
        return type(self.batch)(*(t[idx] for t in self.batch))


def setup(name: str, device=torch.device("cpu"), **flags):
    module = load_algorithm(name)
    cls = next(v for v in vars(module).values()
               if isinstance(v, type) and v.__module__ == module.__name__ and hasattr(v, "act"))
    args = module.Args(**{**SMALL[name][0], **SUPPORTED.get(name, {}), **flags})
    for k, v in (module.domain_defaults(args.env).items() if hasattr(module, "domain_defaults") else ()):
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.manual_seed(0)
    agent = cls(args, 5, 3, device)
    batch = batch_for(module, "train")
    return args, agent, Data(type(batch)(*(t.to(device) for t in batch)))


def rerun(agent):
    """A CUDA graph's contract on the CPU: capturing records the step (here: runs it once, so that the
    first replay has nothing left to do), a replay redoes its tensor work into the captured output
    tensors and leaves the Python state as it was."""
    def capture(function):
        outputs, pending = function(), [True]

        def replay():
            if pending:
                pending.clear()
                return
            numbers = speed.python_numbers(agent)
            for k, v in function().items():
                outputs[k].copy_(v)
            speed.restore_numbers(numbers)

        return replay, outputs

    return capture


def captured_step(args, agent, buffer, capture=None):
    eager = common.training_step(agent, buffer, args, torch.device("cpu"))
    return speed.CapturedStep(eager, agent, capture or rerun(agent), contextlib.nullcontext)


def trained(agent) -> dict:
    state = {}
    for name, value in vars(agent).items():
        if isinstance(value, torch.nn.Module):
            state.update({f"{name}.{k}": v for k, v in value.state_dict().items()})
        elif isinstance(value, torch.optim.Optimizer):
            for i, s in enumerate(value.state.values()):
                state.update({f"{name}.{i}.{k}": v for k, v in s.items()})
        elif isinstance(value, torch.Tensor):
            state[name] = value
        elif isinstance(value, (bool, int, float)):
            state[name] = value
    return state


def run(name: str, captured: bool, capture=None, steps: int = STEPS):
    args, agent, buffer = setup(name)
    step = captured_step(args, agent, buffer, capture) if captured else common.training_step(
        agent, buffer, args, torch.device("cpu"))
    torch.manual_seed(1)
    metrics = [{k: v.clone() for k, v in step().items()} for _ in range(steps)]
    return step, agent, metrics


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_the_captured_step_trains_as_the_eager_step_bit_for_bit(name):
    step, agent, metrics = run(name, captured=True)
    _, eager_agent, eager_metrics = run(name, captured=False)
    assert step.graphs and not step.failed, "nothing was captured"
    if name in ("td3_bc", "cql"):
        assert len(step.graphs) == 2, "both sides of the branch captured"
    assert_same(trained(agent), trained(eager_agent))
    for got, want in zip(metrics, eager_metrics):
        assert_same(got, want)


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_the_captured_step_reads_nothing_back_to_the_host(name):
    step, _, _ = run(name, captured=True)
    assert host_reads(lambda _: step(), None, calls=4) == []


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_the_captured_step_samples_and_trains_with_no_tensor_made_on_the_cpu(name):
    """On the meta device (which stands in for CUDA), batch sampling included; unfused Adam there."""
    args, agent, buffer = setup(name, torch.device("meta"))
    unfused(agent)
    step = speed.CapturedStep(lambda: agent.train(buffer.sample(args.batch_size)), agent,
                               lambda f: (lambda: None, f()), contextlib.nullcontext)
    with CpuFactories() as probe:
        for _ in range(STEPS):
            step()
    assert probe.made == []


def test_a_step_that_sets_a_python_float_is_not_captured(capsys):
    args, agent, buffer = setup("bc")
    train = agent.train

    def drifting(batch):
        agent.lr_now = getattr(agent, "lr_now", 1.0) * 0.5
        return train(batch)

    agent.train = drifting
    step = captured_step(args, agent, buffer)
    for _ in range(5):
        step()
    assert step.failed and "lr_now" in capsys.readouterr().out


def test_a_step_whose_learning_rate_a_torch_scheduler_sets_is_not_captured(capsys):
    """torch's schedulers write a Python float into the optimiser, which a replay would not change
    (IQL's schedule lives on the device for this reason)."""
    args, agent, buffer = setup("bc")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(agent.actor_optimizer, 100)
    train = agent.train

    def scheduled(batch):
        metrics = train(batch)
        scheduler.step()
        return metrics

    agent.train, agent.scheduler = scheduled, scheduler
    step = captured_step(args, agent, buffer)
    for _ in range(5):
        step()
    assert step.failed and "actor_optimizer.param_groups[0].lr" in capsys.readouterr().out
    assert scheduler.last_epoch == 5  # the failed capture's call undone: four eager steps and the fallback


@pytest.mark.parametrize("name", ["bc", "td3_bc"])
def test_a_failed_capture_says_so_in_one_line_and_trains_eagerly(name, capsys):
    def broken(function):
        raise RuntimeError("operation not permitted when stream is capturing\n(the rest of a long message)")

    step, agent, metrics = run(name, captured=True, capture=broken)
    _, eager_agent, eager_metrics = run(name, captured=False)
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["--cuda-graphs: capturing the training step failed (RuntimeError: operation not permitted "
                   "when stream is capturing); training eagerly"]
    assert step.failed and not step.graphs
    assert_same(trained(agent), trained(eager_agent))
    for got, want in zip(metrics, eager_metrics):
        assert_same(got, want)


def test_on_a_cpu_it_is_a_notice_and_the_eager_step(capsys):
    args, agent, buffer = setup("bc", cuda_graphs=True)
    step = common.training_step(agent, buffer, args, torch.device("cpu"))
    assert capsys.readouterr().out == "--cuda-graphs: cpu is not a CUDA device; training eagerly\n"
    assert not isinstance(step, speed.CapturedStep)
    assert not any(g.get("capturable") for o in vars(agent).values() if isinstance(o, torch.optim.Optimizer)
                   for g in o.param_groups)


def test_every_file_has_the_flag_off_by_default():
    for name in SUPPORTED:
        fields = {f.name: f for f in dataclasses.fields(load_algorithm(name).Args)}
        assert fields["cuda_graphs"].default is False
