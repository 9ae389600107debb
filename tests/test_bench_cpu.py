"""tools/diagnostics/bench_cpu.py: its FLOP count on a step whose matmuls are known, and a run end to end."""

import os
import re

import torch

import common
from conftest import ROOT, run_script
from tools.diagnostics import bench_cpu


def test_flops_per_step_counts_the_forward_and_backward_matmuls_of_a_bc_step(datasets_path):
    data = common.load_dataset("test/hopper/random-v0")  # obs 11, act 3
    agent, buffer, batch_size = bench_cpu.prepare("bc", data, torch.device("cpu"), batch_size=64)
    flops = bench_cpu.flops_per_step(agent, buffer, batch_size)
    layers = [(11, 256), (256, 256), (256, 3)]
    forward = sum(2 * 64 * i * o for i, o in layers)
    # backward: a weight gradient for every layer, an input gradient for all but the first (the
    # states need none)
    assert flops == forward + forward + (forward - 2 * 64 * 11 * 256)


def test_flops_are_counted_through_the_gradient_penalties(datasets_path):
    """The penalties differentiate twice (autograd.grad with create_graph), which FlopCounterMode's
    own module hooks cannot follow."""
    data = common.load_dataset("test/hopper/random-v0")
    for name in ("fisher_brc", "itrpo", "brac_plus"):
        agent, buffer, batch_size = bench_cpu.prepare(name, data, torch.device("cpu"), hidden_dim=16, batch_size=32)
        assert bench_cpu.flops_per_step(agent, buffer, batch_size) > 0, name


def test_bench_cpu_reports_speed_flops_and_the_fraction_of_peak(datasets_path, tmp_path):
    result = run_script([os.path.join(ROOT, "tools", "diagnostics", "bench_cpu.py"), "--threads", "1", "--transitions",
                         "3000", "--steps", "3", "--warmup", "1", "--algorithms", "bc", "arq"], datasets_path,
                        cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "obs 17, act 6, 3000 transitions" in result.stdout  # HalfCheetah's dimensions
    peak = float(re.search(r"fp32 matmul peak ([\d.]+) GFLOP/s", result.stdout).group(1))
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^\| (\w+) \| 256 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)% \| (\d+) \|$", result.stdout, re.M)}
    assert set(rows) == {"bc", "arq"}
    for sps, gflop_step, gflops, fraction, ceiling in ((float(x) for x in row) for row in rows.values()):
        assert sps > 0 and gflop_step > 0
        assert abs(gflops - sps * gflop_step) <= 0.05 * gflops + 0.1
        assert abs(fraction / 100 - gflops / peak) <= 0.01
        # the steps/s the peak would give (GFLOP/step printed to 3 decimals)
        assert abs(ceiling - peak / gflop_step) <= 0.03 * ceiling + 1


def test_bench_cpu_times_the_agents_in_the_precision_it_is_given(datasets_path):
    """--precision bf16 reaches the timed agent (its step runs hidden layers in bf16) and the peak
    is a matmul under the same autocast; the FLOP count does not depend on it."""
    data = common.load_dataset("test/hopper/random-v0")
    seen = []
    for precision in ("fp32", "bf16"):
        agent, buffer, batch_size = bench_cpu.prepare("bc", data, torch.device("cpu"), precision=precision,
                                                      batch_size=32)
        assert agent.args.precision == precision
        hook = agent.actor.net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        agent.train(buffer.sample(batch_size))
        hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    from torch.overrides import TorchFunctionMode

    class Products(TorchFunctionMode):  # the dtype of every matmul the peak times
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm"):
                products.append(out.dtype)
            return out

    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        products = []
        with Products():
            assert bench_cpu.matmul_peak(torch.device("cpu"), n=64, repeats=1, precision=precision) > 0
        assert products and set(products) == {dtype}


def test_bench_cpu_compiles_an_agent_loaded_from_its_file_in_bf16(datasets_path):
    """--compile with --precision bf16: dynamo traces the file's step through common.autocast's
    wrapper and looks the step's globals up by its module's name, so the loaded file must be an
    importable module."""
    import torch._dynamo

    torch._dynamo.reset()
    data = common.load_dataset("test/hopper/random-v0")
    agent, buffer, batch_size = bench_cpu.prepare("bc", data, torch.device("cpu"), compile=True, precision="bf16",
                                                  hidden_dim=16, batch_size=32)
    metrics = agent.train(buffer.sample(batch_size))
    assert torch.isfinite(metrics["losses/actor_loss"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled, not silently eager
