"""--cuda-graphs, checked on the CPU: what a captured training step needs (no host read, no tensor made
on the CPU, batch sampling on the device, Python state that a replay can carry) and that the captured
step, its graphs replaced by a stand-in that reruns the step, trains as the eager step does, bit for
bit, on both sides of the files' Python branches. No GPU runs here: tests/test_cuda.py captures on one."""

import contextlib
import dataclasses
from unittest import mock

import pytest
import torch

import common
from conftest import load_algorithm
from test_gpu_ready import CpuFactories, host_reads, unfused
from test_precision import SMALL, batch_for
from tools.gpu_timing import file_branch

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


def python_numbers(agent) -> list:
    """The agent's Python numbers and its optimisers' settings, as (owner, key, value)."""
    numbers = [(agent, k, v) for k, v in vars(agent).items() if isinstance(v, (bool, int, float))]
    for v in list(vars(agent).values()):
        if isinstance(v, torch.optim.Optimizer):
            numbers += [(g, k, x) for g in v.param_groups for k, x in g.items() if isinstance(x, (bool, int, float))]
    return numbers


def restore_numbers(numbers: list) -> None:
    for owner, key, value in numbers:
        if isinstance(owner, dict):
            owner[key] = value
        else:
            setattr(owner, key, value)


def rerun(agent):
    """A CUDA graph's contract on the CPU: capturing records the step (here: runs it once, so that the
    first replay has nothing left to do), a replay redoes its tensor work into the captured output
    tensors and leaves the Python state as it was. A scheduler's step, which CapturedStep records
    during the capture instead of running it, is not in the graph: a replay does not run it either."""
    def capture(function):
        outputs, pending = function(), [True]

        def replay():
            if pending:
                pending.clear()
                return
            numbers = python_numbers(agent)
            schedulers = [v for v in vars(agent).values() if isinstance(v, torch.optim.lr_scheduler.LRScheduler)]
            for s in schedulers:
                s.step = lambda: None
            try:
                for k, v in function().items():
                    outputs[k].copy_(v)
            finally:
                for s in schedulers:
                    del s.step
                restore_numbers(numbers)

        return replay, outputs

    return capture


def captured_step(name, args, agent, buffer, capture=None):
    """common.training_step with --cuda-graphs on a CUDA device, as the file calls it (its branch), its
    capture and side stream the CPU stand-ins; the step, and the CapturedStep inside it."""
    made = []

    class Recorded(common.CapturedStep):
        def __init__(self, *a):
            super().__init__(*a)
            made.append(self)

    with mock.patch.object(common, "_capture", capture or rerun(agent)), \
            mock.patch.object(common, "_side_stream", contextlib.nullcontext), \
            mock.patch.object(common, "CapturedStep", Recorded):
        step = common.training_step(agent, buffer, dataclasses.replace(args, cuda_graphs=True),
                                    torch.device("cuda"), branch=file_branch(name, agent, args))
    assert len(made) == 1
    return step, made[0]


def learning_rates(agent) -> dict:
    """Each optimiser's learning rates, as numbers (a scheduled one is a tensor once captured)."""
    return {f"{name}.param_groups[{i}].lr": float(g["lr"]) for name, v in vars(agent).items()
            if isinstance(v, torch.optim.Optimizer) for i, g in enumerate(v.param_groups)}


def trained(agent) -> dict:
    state = {}
    for name, value in vars(agent).items():
        if isinstance(value, torch.nn.Module):
            state.update({f"{name}.{k}": v for k, v in value.state_dict().items()})
        elif isinstance(value, torch.optim.Optimizer):
            for i, s in enumerate(value.state.values()):
                state.update({f"{name}.{i}.{k}": v for k, v in s.items()})
        elif isinstance(value, torch.optim.lr_scheduler.LRScheduler):
            state[f"{name}.last_epoch"] = value.last_epoch
        elif isinstance(value, torch.Tensor):
            state[name] = value
        elif isinstance(value, (bool, int, float)):
            state[name] = value
    return state


def run(name: str, captured: bool, capture=None, steps: int = STEPS):
    args, agent, buffer = setup(name)
    inner = None
    if captured:
        step, inner = captured_step(name, args, agent, buffer, capture)
    else:
        step = common.training_step(agent, buffer, args, torch.device("cpu"), branch=file_branch(name, agent, args))
    torch.manual_seed(1)
    metrics = [{k: v.clone() for k, v in step().items()} for _ in range(steps)]
    return inner, agent, metrics


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
def test_the_captured_step_keeps_the_eager_learning_rates(name):
    """IQL's scheduled rate included; BRAC+'s pretraining optimisers (scheduled, not by train()) too."""
    _, agent, _ = run(name, captured=True)
    _, eager_agent, _ = run(name, captured=False)
    assert learning_rates(agent) == learning_rates(eager_agent)


def test_the_branches_the_files_pass_are_the_paths_their_train_takes():
    """TD3+BC's next train() updates the actor, CQL's clones the data's actions, when branch() says so."""
    for name, taken in (("td3_bc", lambda agent, m: "losses/actor_loss" in m),
                        ("cql", lambda agent, m: agent.total_it <= agent.args.bc_warmup_steps)):
        args, agent, buffer = setup(name)
        branch = file_branch(name, agent, args)
        assert branch is not None, name
        said = []
        for _ in range(STEPS):
            said.append(branch())
            assert taken(agent, agent.train(buffer.sample(args.batch_size))) == said[-1], (name, len(said))
        assert len(set(said)) == 2, (name, said)


def test_a_critic_only_step_returns_the_latest_actor_metrics():
    """TD3+BC's delayed actor: every step's metrics hold the actor's, from the latest step that updated
    it, eagerly and captured alike."""
    for captured in (False, True):
        _, _, metrics = run("td3_bc", captured=captured)
        assert all("losses/actor_loss" in m for m in metrics[1:]), captured
        for i in range(2, STEPS, 2):  # policy_freq 2: steps 2, 4, ... update the actor, odd ones do not
            assert torch.equal(metrics[i]["losses/actor_loss"], metrics[i - 1]["losses/actor_loss"]), (captured, i)


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_the_captured_step_reads_nothing_back_to_the_host(name):
    args, agent, buffer = setup(name)
    step, _ = captured_step(name, args, agent, buffer)
    for _ in range(STEPS):
        step()
    assert host_reads(lambda _: step(), None, calls=4) == []


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_the_captured_step_samples_and_trains_with_no_tensor_made_on_the_cpu(name):
    """On the meta device (which stands in for CUDA), batch sampling included; unfused Adam there."""
    args, agent, buffer = setup(name, torch.device("meta"))
    step = common.CapturedStep(lambda: agent.train(buffer.sample(args.batch_size)), agent,
                               file_branch(name, agent, args), lambda f: (lambda: None, f()), contextlib.nullcontext)
    unfused(agent)
    with CpuFactories() as probe:
        for _ in range(STEPS):
            step()
    assert step.graphs and not step.failed
    assert probe.made == []


def test_a_step_that_sets_a_python_float_is_not_captured(capsys):
    args, agent, buffer = setup("bc")
    train = agent.train

    def drifting(batch):
        agent.lr_now = getattr(agent, "lr_now", 1.0) * 0.5
        return train(batch)

    agent.train = drifting
    step, inner = captured_step("bc", args, agent, buffer)
    for _ in range(5):
        step()
    out = capsys.readouterr().out.strip().splitlines()
    assert inner.failed and len(out) == 1 and "lr_now" in out[0]
    assert agent.lr_now == 0.5 ** 5  # the failed capture's call undone: five steps, five halvings


def decaying_actor_lr(agent):
    """A learning rate that train() writes itself, not through a torch scheduler: a graph would freeze it."""
    train = agent.train

    def decaying(batch):
        metrics = train(batch)
        for group in agent.actor_optimizer.param_groups:
            group["lr"] *= 0.5
        return metrics

    agent.train = decaying


def test_a_step_that_sets_an_optimiser_setting_is_not_captured(capsys):
    args, agent, buffer = setup("bc")
    decaying_actor_lr(agent)
    step, inner = captured_step("bc", args, agent, buffer)
    for _ in range(5):
        step()
    out = capsys.readouterr().out.strip().splitlines()
    assert inner.failed and not inner.graphs
    assert len(out) == 1 and "actor_optimizer" in out[0] and "'lr'" in out[0], out


def test_a_refused_capture_leaves_the_optimiser_settings_as_an_eager_run_has_them(capsys):
    args, agent, buffer = setup("bc")
    decaying_actor_lr(agent)
    step, inner = captured_step("bc", args, agent, buffer)
    for _ in range(5):
        step()
    assert inner.failed
    assert agent.actor_optimizer.param_groups[0]["lr"] == args.lr * 0.5 ** 5  # five steps, five halvings


def with_cosine_schedule(agent):
    """torch's CosineAnnealingLR on BC's optimiser, stepped by train() after each update."""
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(agent.actor_optimizer, 10)
    train = agent.train

    def scheduled(batch):
        metrics = train(batch)
        scheduler.step()
        return metrics

    agent.train, agent.scheduler = scheduled, scheduler


def test_a_step_whose_learning_rate_a_torch_scheduler_sets_is_captured(capsys):
    args, agent, buffer = setup("bc")
    with_cosine_schedule(agent)
    step, inner = captured_step("bc", args, agent, buffer)
    for _ in range(STEPS):
        step()
    assert "failed" not in capsys.readouterr().out
    assert inner.graphs and not inner.failed and inner.schedulers == [agent.scheduler]
    assert isinstance(agent.actor_optimizer.param_groups[0]["lr"], torch.Tensor)
    assert agent.scheduler.last_epoch == STEPS  # one scheduler step per training step, replays included



def test_a_step_whose_learning_rate_a_torch_scheduler_sets_is_captured_with_the_eager_rates(capsys):
    """The scheduled optimiser's rate is a tensor that the graph reads, and the scheduler, recorded
    during the capture, is stepped after each replay: the eager run's learning rates and weights."""
    lrs = {}
    for captured in (True, False):
        args, agent, buffer = setup("bc")
        with_cosine_schedule(agent)
        step = captured_step("bc", args, agent, buffer)[0] if captured else \
            common.training_step(agent, buffer, args, torch.device("cpu"))
        torch.manual_seed(1)
        lrs[captured] = []
        for _ in range(STEPS):
            step()
            lrs[captured].append(float(agent.actor_optimizer.param_groups[0]["lr"]))
        lrs[captured, "state"] = trained(agent)
    assert "failed" not in capsys.readouterr().out
    assert lrs[True] == lrs[False] and len(set(lrs[False])) > 5
    assert_same(lrs[True, "state"], lrs[False, "state"])


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
    made = []
    with mock.patch.object(common, "CapturedStep", lambda *a: made.append(a)):
        step = common.training_step(agent, buffer, args, torch.device("cpu"))
    assert capsys.readouterr().out == "--cuda-graphs: cpu is not a CUDA device; training eagerly\n"
    assert made == []
    assert not any(g.get("capturable") or isinstance(g["lr"], torch.Tensor)
                   for o in vars(agent).values() if isinstance(o, torch.optim.Optimizer) for g in o.param_groups)
    assert "losses/actor_loss" in step()


def test_every_file_has_the_flag_off_by_default():
    for name in SUPPORTED:
        fields = {f.name: f for f in dataclasses.fields(load_algorithm(name).Args)}
        assert fields["cuda_graphs"].default is False
