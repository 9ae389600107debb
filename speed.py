"""The speed mechanics every algorithm file uses the same way, documented once (docs/speed.md):
the network layers that carry --precision bf16 (OutputLinear, computing a network's output in fp32)
and batched ensembles (EnsembleLinear, ensemble_mlp: several networks as one batched matmul per
layer); --precision (autocast); --compile (compiled: one graph per network update's loss); and
--cuda-graphs (training_step: the whole step captured and replayed). The algorithm files use them as
common.<name>; nothing here is algorithmic, and with fp32, without --compile and --cuda-graphs every
one of them is plain PyTorch."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Literal

import torch

from offline_data.errors import UserError


# ----------------------------------------------------------------------------------------------
# Network layers that carry the speed mechanics: batched ensembles and --precision
# ----------------------------------------------------------------------------------------------
Precision = Literal["fp32", "tf32", "bf16"]


def autocast(step: Callable, precision: str, device: torch.device) -> Callable:
    """`step` (a training step) as it is for fp32; for bf16, run under torch.autocast(bfloat16): the
    matrix products of the hidden layers take bf16 inputs, while parameters, gradients and optimiser
    states stay fp32 and every network's output layer computes in fp32 (OutputLinear and
    EnsembleLinear(output=True)), so that Q values, log-stds and logits are not rounded to bf16's
    8-bit mantissa. Only the training steps: evaluation runs in fp32.

    tf32: `step` as it is, with TF32 allowed for the fp32 matrix products and convolutions of CUDA
    GPUs from Ampere on (10-bit mantissa inputs, fp32 accumulation), for the whole process, evaluation
    included. It is torch.set_float32_matmul_precision("high") for CUDA alone: in torch 2.13 that call
    also lets oneDNN use TF32 for CPU products, while on a CPU --precision tf32 changes nothing."""
    if precision == "fp32":
        return step
    if precision == "tf32":
        allow_tf32()
        return step
    if device.type == "cuda" and not native_bf16(device):
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no native bfloat16 support "
                        "(before Ampere, bf16 is emulated and slower than fp32); use --precision fp32.")

    def bf16_step(*args, **kwargs):
        # Inside a CUDA graph capture (--cuda-graphs) without autocast's cache of casted weights, as
        # PyTorch's CUDA graphs documentation asks: the graph must redo the casts on every replay.
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not capturing):
            return step(*args, **kwargs)

    return bf16_step


def allow_tf32() -> None:
    """TF32 for the fp32 matrix products and convolutions of CUDA GPUs, process-wide (--precision tf32)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def native_bf16(device: torch.device) -> bool:
    """Whether the CUDA device `device` (that of --device cuda:N, not the current device) does bf16
    arithmetic in hardware; torch.cuda.is_bf16_supported() alone also counts the emulation of
    V100s and T4s."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def _autocasting(x: torch.Tensor) -> bool:
    device = x.device.type
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


class OutputLinear(torch.nn.Linear):
    """nn.Linear for a network's output layer: under --precision bf16 (autocast) it computes in fp32
    from the bf16 hidden activations; without autocast it is nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _autocasting(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(x.float(), self.weight, self.bias)


class EnsembleLinear(torch.nn.Module):
    """E independent linear layers applied to an (E, N, in) batch as one batched matmul, so that twin
    critics or an ensemble cost one kernel per layer. Each member is initialised as nn.Linear(in, out)
    would be; weight is (E, in, out), i.e. each member's nn.Linear weight transposed. With
    `member=i` the layer maps (N, in) through member i alone (an actor's loss that needs only Q1).
    `output=True`: a network's output layer, in fp32 under --precision bf16 as OutputLinear."""

    def __init__(self, n: int, in_dim: int, out_dim: int, output: bool = False):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = torch.nn.Parameter(torch.empty(n, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = torch.nn.Parameter(torch.empty(n, 1, out_dim).uniform_(-bound, bound))
        self.output = output

    def forward(self, x: torch.Tensor, member: int | None = None) -> torch.Tensor:
        product, bias, weight = torch.baddbmm, self.bias, self.weight
        if member is not None:
            product, bias, weight = torch.addmm, self.bias[member], self.weight[member]
        if self.output and _autocasting(x):
            with torch.autocast(x.device.type, enabled=False):
                return product(bias, x.float(), weight)
        return product(bias, x, weight)


class EnsembleMLP(torch.nn.Sequential):
    """EnsembleLinear and ReLU layers; `forward(x, member=i)` runs member i alone on (N, in) inputs."""

    def forward(self, x: torch.Tensor, member: int | None = None) -> torch.Tensor:
        for layer in self:
            x = layer(x, member) if isinstance(layer, EnsembleLinear) else layer(x)
        return x


def ensemble_mlp(n: int, in_dim: int, out_dim: int, hidden_dim: int, n_hidden: int) -> EnsembleMLP:
    """n independent networks of n_hidden ReLU layers of width hidden_dim and a linear output layer,
    evaluated together on (n, N, in_dim) inputs (expand one batch to give every member the same)."""
    layers, d = [], in_dim
    for _ in range(n_hidden):
        layers += [EnsembleLinear(n, d, hidden_dim), torch.nn.ReLU()]
        d = hidden_dim
    return EnsembleMLP(*layers, EnsembleLinear(n, d, out_dim, output=True))


# ----------------------------------------------------------------------------------------------
# --compile: each network update's forward passes and loss as one compiled graph
# ----------------------------------------------------------------------------------------------
def compiled(loss: Callable, enabled: bool) -> Callable:
    """`loss` (a method that runs one network update's forward passes and returns its loss and the
    values it logs) compiled as one graph with --compile, itself without. fullgraph: a break inside
    is an error, not a silent split. Its backward pass is compiled with it. The training step that
    calls it stays Python, so that its counters, periodic branches and thresholds compile nothing;
    the optimiser steps stay fused Adam (one kernel; Dynamo does not trace into fused optimisers)."""
    return torch.compile(loss, fullgraph=True) if enabled else loss


# ----------------------------------------------------------------------------------------------
# --cuda-graphs: the whole training step, batch sampling included, captured and replayed on CUDA
# ----------------------------------------------------------------------------------------------
def training_step(agent, buffer, args, device: torch.device) -> Callable[[], dict]:
    """The main loop's step: `train_step()` trains the agent on one batch and returns its metrics.
    It is agent.train(buffer.sample(args.batch_size)); with --cuda-graphs on a CUDA device the same
    call captured as CUDA graphs and replayed (CapturedStep). On another device --cuda-graphs is a
    notice and the step runs eagerly, as --precision tf32 is on a CPU."""
    def eager() -> dict:
        return agent.train(buffer.sample(args.batch_size))

    if not args.cuda_graphs:
        return eager
    if device.type != "cuda":
        print(f"--cuda-graphs: {device} is not a CUDA device; training eagerly", flush=True)
        return eager
    for optimizer in (v for v in vars(agent).values() if isinstance(v, torch.optim.Optimizer)):
        for group in optimizer.param_groups:
            group["capturable"] = True  # fused Adam's arithmetic is the same; capture needs the flag
    return CapturedStep(eager, agent, cuda_graph, cuda_side_stream)


def cuda_graph(function: Callable[[], dict]) -> tuple[Callable[[], None], dict]:
    """Capture `function` as one CUDA graph (recorded, not run); its replay and its static outputs."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = function()
    return graph.replay, outputs


@contextlib.contextmanager
def cuda_side_stream():
    """The warm-up steps before a capture run on a side stream (PyTorch's CUDA graphs documentation)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


def python_numbers(agent) -> dict:
    """The Python numbers that a train() call could change and a replay would not: the agent's own
    (counters), its optimisers' settings (a learning rate that a scheduler writes) and those of its
    other plain objects (a scheduler's step count), as name -> (object or dict, key, value)."""
    def numbers_of(label: str, owner) -> dict:
        items = owner.items() if isinstance(owner, dict) else vars(owner).items()
        return {f"{label}.{k}": (owner, k, v) for k, v in items if isinstance(v, (bool, int, float))}

    numbers = {}
    for name, value in vars(agent).items():
        if isinstance(value, (bool, int, float)):
            numbers[name] = (agent, name, value)
        elif isinstance(value, torch.optim.Optimizer):
            for i, group in enumerate(value.param_groups):
                numbers.update(numbers_of(f"{name}.param_groups[{i}]", group))
        elif hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, torch.Tensor)):
            numbers.update(numbers_of(name, value))
    return numbers


def restore_numbers(numbers: dict) -> None:
    for owner, key, value in numbers.values():
        if isinstance(owner, dict):
            owner[key] = value
        else:
            setattr(owner, key, value)


class CapturedStep:
    """`step` (agent.train on a sampled batch) as CUDA graphs. A file whose train() takes one of
    several Python paths (TD3+BC's delayed actor, CQL's behaviour-cloning warm-up) says which the next
    call takes with `agent.branch()`; each path is one graph. A path's first WARMUP calls run eagerly
    on a side stream (they train as any step does, and build the optimisers' state), the next one
    captures it and every later one replays it. A captured train() may change the agent's Python
    numbers only by adding to integer counters (TD3+BC's total_it): each replay adds the same, so that
    a checkpoint holds what an eager run's would. Any other Python number it changes (a learning rate
    that torch's schedulers write, their step counts) a graph would freeze, so that step is not
    captured. If a capture raises, one line says why and every later step runs eagerly. `capture`
    and `side_stream` are cuda_graph and cuda_side_stream on a GPU; tests/test_cuda_graphs.py runs
    this on the CPU with a stand-in that calls the step again."""

    WARMUP = 3

    def __init__(self, step: Callable[[], dict], agent, capture: Callable, side_stream: Callable):
        self.step, self.agent, self.capture, self.side_stream = step, agent, capture, side_stream
        self.graphs: dict = {}  # path -> (replay, static metrics, counter increments)
        self.eager_calls: dict = {}
        self.failed = False

    def __call__(self) -> dict:
        path = self.agent.branch() if hasattr(self.agent, "branch") else None
        if self.failed:
            return self.step()
        if self.eager_calls.get(path, 0) < self.WARMUP:
            self.eager_calls[path] = self.eager_calls.get(path, 0) + 1
            with self.side_stream():
                return self.step()
        if path not in self.graphs:
            before = python_numbers(self.agent)
            try:
                self.graphs[path] = self.captured(before)
            except Exception as exc:
                restore_numbers(before)
                reason = (str(exc).strip().splitlines() or [""])[0]
                print(f"--cuda-graphs: capturing the training step failed ({type(exc).__name__}: {reason}); "
                      "training eagerly", flush=True)
                self.failed = True
                return self.step()
        replay, metrics, increments = self.graphs[path]
        replay()
        for name, increment in increments.items():
            setattr(self.agent, name, getattr(self.agent, name) + increment)
        return metrics

    def captured(self, before: dict) -> tuple:
        replay, metrics = self.capture(self.step)
        increments = {}
        for name, (owner, key, value) in python_numbers(self.agent).items():
            was = before.get(name, (None, None, None))[2]
            if value == was:
                continue
            if owner is not self.agent or type(value) is not int or type(was) is not int:
                raise ValueError(f"train() sets the Python value {name} on every step, which a graph would freeze")
            increments[key] = value - was
        restore_numbers(before)
        return replay, metrics, increments
