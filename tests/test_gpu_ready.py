"""What a GPU run needs, checked on the CPU: a training step of every file reads nothing back to the
host (each read is a device sync that stalls the GPU's queue)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

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
