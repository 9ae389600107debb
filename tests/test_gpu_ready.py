"""What a GPU run needs, checked on the CPU: a training step of every file reads nothing back to the
host (each read is a device sync that stalls the GPU's queue) and makes no tensor on the CPU."""

import os
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from conftest import ROOT, load_algorithm
from test_precision import SMALL, agent_of, batch_for

# Ops that read a value back on the CPU but not on CUDA: the fused Adam kernel reads its step count,
# which lives on the device there; _assert_async (torch.multinomial's check) is a device-side assert.
CPU_ONLY_READS = {"aten::_fused_adam_", "aten::_assert_async"}


def host_reads(step, batch, calls: int = 2) -> list[str]:
    """The ops under which `step(batch)` read a tensor's value back to the host, once per read."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step(batch)
    reads = []
    for event in prof.events():
        if event.name != "aten::_local_scalar_dense":
            continue
        chain, parent = [], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if not CPU_ONLY_READS & set(chain):
            reads.append(" <- ".join(chain[:3]))
    return reads


@pytest.mark.parametrize("name", sorted(SMALL))
def test_training_steps_read_nothing_back_to_the_host(name):
    module, agent = agent_of(name, "fp32")
    for step in SMALL[name][1]:
        batch = batch_for(module, step)
        for _ in range(3):  # past the first steps (delayed actor updates, lazily built state)
            getattr(agent, step)(batch)
        assert host_reads(getattr(agent, step), batch) == [], f"{name}.{step}"


def agent_on(name: str, device: torch.device):
    module = load_algorithm(name)
    cls = next(v for v in vars(module).values()
               if isinstance(v, type) and v.__module__ == module.__name__ and hasattr(v, "act"))
    args = module.Args(**SMALL[name][0])
    for k, v in (module.domain_defaults(args.env).items() if hasattr(module, "domain_defaults") else ()):
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.manual_seed(0)
    return module, cls(args, 5, 3, device)


def unfused(agent) -> None:
    """The agent's optimisers unfused and not capturable, for the meta device, which has neither fused
    nor capturable Adam."""
    for optimizer in (v for v in vars(agent).values() if isinstance(v, torch.optim.Optimizer)):
        for group in optimizer.param_groups:
            group["fused"], group["capturable"] = False, False


def steps_on_meta(name: str):
    """(training step, batch) of each of the file's phases, agent and batches on the meta device, the
    optimisers unfused."""
    meta = torch.device("meta")
    module, agent = agent_on(name, meta)
    unfused(agent)
    for step in SMALL[name][1]:
        batch = batch_for(module, step)
        yield getattr(agent, step), type(batch)(*(t.to(meta) for t in batch))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_training_steps_run_with_agent_and_data_on_another_device(name):
    """PyTorch's meta device stands in for CUDA: a tensor made on the CPU inside a step (a
    torch.tensor(...) without device=) meets the batch's tensors there and raises, as on a GPU."""
    for step, batch in steps_on_meta(name):
        for _ in range(2):
            step(batch)


def test_arq_holds_no_random_generator_of_its_own_so_a_checkpoint_resumes_on_any_device():
    """The implicit policy draws its noise from torch's CPU stream, which evaluation seeds."""
    _, agent = agent_on("arq", torch.device("meta"))
    assert not [name for name, value in vars(agent).items() if isinstance(value, torch.Generator)]


class CpuFactories(torch.overrides.TorchFunctionMode):
    """Records the tensor factories that the files' own code (algorithms/, common.py) calls inside a
    training step and that make a tensor on the CPU. (Unfused Adam keeps its step count on the CPU;
    the fused Adam the files use keeps it on the device.)"""

    FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
                 torch.linspace, torch.randn, torch.rand, torch.randint, torch.eye}

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        caller = sys._getframe(1).f_code.co_filename
        ours = caller.startswith(os.path.join(ROOT, "algorithms")) or caller == os.path.join(ROOT, "common.py")
        if ours and func in self.FACTORIES and isinstance(out, torch.Tensor) and out.device.type == "cpu":
            self.made.append(f"{func.__name__} at {os.path.basename(caller)}:{sys._getframe(1).f_lineno}")
        return out


@pytest.mark.parametrize("name", sorted(SMALL))
def test_training_steps_make_no_tensor_on_the_cpu(name):
    """A 0-dim CPU tensor mixes with CUDA tensors without an error, but it is a host value inside the
    step: a host-to-device copy in eager mode, and it keeps a compiled step out of CUDA graphs."""
    for step, batch in steps_on_meta(name):
        with CpuFactories() as probe:
            for _ in range(2):
                step(batch)
        assert probe.made == [], f"{name}.{step.__name__}"


def test_a_checkpoint_keeps_the_cuda_random_state_of_the_run_device_only(monkeypatch, tmp_path):
    """A run on cuda:3 requeued on a one-GPU job (its device now cuda:0) must resume: the checkpoint
    holds one CUDA state, that of the run's device, not one per GPU visible when it was written; and
    the states, written with save_file, read back as weights only."""
    import common

    written = torch.arange(16, dtype=torch.uint8)
    read_from, restored = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [written] * 4)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": read_from.append(device) or written)

    def set_all(states):
        if len(states) > 1:  # what torch does with four states and one GPU visible
            raise IndexError("list index out of range")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    common.save_file(str(tmp_path / "checkpoint.pt"), {"rng": common.rng_states(torch.device("cuda", 3))})
    assert read_from == [torch.device("cuda", 3)]
    states = common.load_file(str(tmp_path / "checkpoint.pt"))["rng"]
    common.set_rng_states(states, torch.device("cuda", 0))
    assert len(restored) == 1 and torch.equal(restored[0][0], written) and restored[0][1] == torch.device("cuda", 0)
    restored.clear()
    common.set_rng_states(states, torch.device("cpu"))  # a GPU run resumed on a CPU: no CUDA stream to restore
    assert restored == []


def test_the_random_streams_resume_from_a_file_read_as_weights_only(tmp_path):
    """Python's, numpy's and torch's streams, saved with save_file and read with load_file (weights
    only), continue where they were."""
    import random

    import numpy as np

    import common

    common.seed_everything(7)
    random.random(), np.random.rand(3), np.random.randn(), torch.rand(2)  # numpy with a cached Gaussian too
    path = str(tmp_path / "rng.pt")
    common.save_file(path, {"rng": common.rng_states(torch.device("cpu"))})
    draws = lambda: (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())  # noqa: E731
    want = draws()
    common.seed_everything(8)
    common.set_rng_states(common.load_file(path)["rng"], torch.device("cpu"))
    assert draws() == want


def test_a_checkpoint_with_state_the_agent_no_longer_keeps_resumes_with_a_notice(capsys, tmp_path):
    """A checkpoint of ARQ that still holds the evaluation generator the file no longer has."""
    import common

    _, agent = agent_on("arq", torch.device("cpu"))
    state = common.training_state(agent)
    state["eval_gen"] = torch.Generator().get_state()
    common.save_file(str(tmp_path / "checkpoint.pt"), {"agent": state})
    common.load_training_state(agent, common.load_file(str(tmp_path / "checkpoint.pt"))["agent"])
    assert "eval_gen has no place in this file's agent" in capsys.readouterr().out


def test_pretrained_models_are_cached_under_a_key_the_device_does_not_change(datasets_path):
    """The behaviour models' cache key must not hash the normalised states: their mean and std are
    computed on the device, and a GPU's sums round differently from a CPU's (here: one ulp), so a
    model trained on one would be trained again on the other."""
    import common

    tmp_dataset = "test/hopper/random-v0"
    data = common.load_dataset(tmp_dataset, "cpu")
    other = common.load_dataset(tmp_dataset, "cpu")
    mean, std = common.normalize_obs(data)
    common.normalize_obs(other, mean, torch.nextafter(std, torch.full_like(std, float("inf"))))
    assert not torch.equal(data.observations, other.observations)
    args = load_algorithm("fisher_brc").Args(env=tmp_dataset)
    fields = ("bc_steps", "hidden_dim")
    assert common.pretraining_key(args, fields, data) == common.pretraining_key(args, fields, other)
    raw = common.load_dataset(tmp_dataset, "cpu")  # states not normalised: another model
    assert common.pretraining_key(args, fields, raw) != common.pretraining_key(args, fields, data)
    arq = load_algorithm("arq")
    arq_args = arq.Args(env=tmp_dataset)
    assert arq.score_model_key(arq_args, data) == arq.score_model_key(arq_args, other)
    bf16 = arq.Args(env=tmp_dataset, precision="bf16")  # a score model trained in bf16 is another model
    assert arq.score_model_key(bf16, data) != arq.score_model_key(arq_args, data)
