"""Shared plumbing for the single-file algorithms in `algorithms/`: checks of flags, state
normalisation and reward transforms, batches, seeding, devices, precision and the layers that carry
it, and the pretraining caches; evaluation (offline_data/evaluation.py) and the run folder
(run_folder.py: logs, results.json, checkpoints) are used through it as `common.evaluate` and
`common.Run`. Data comes from the data layer (`offline_data/`) through `load_dataset`. No
algorithmic code: every loss lives in its algorithm's file.

What the algorithm files can rely on:
- Importing this module has no side effects. A script calls `install_user_error_hook()` first (an
  uncaught `UserError` then ends it with one line, not a traceback) and `flush_denormals()` before
  it trains.
- Flags are checked right after parsing, before any work: `check_args(args)` the shared ones, then
  the file's own `check_args(args)` its own, with `check_positive`, `check_nonnegative`,
  `check_interval` and `check_seed`. Flags left None (per-domain defaults) are not checked. `Run`
  refuses a batch size larger than the dataset, the first point where both are known.
- `load_dataset(id)` is the only way data comes in (see offline_data/dataset.py for the ids it
  takes). Actions are in [-1, 1], and `evaluate` maps the policy's actions back to the dataset's Box.
- Of the functions given an `OfflineData`, only `normalize_obs` (observations, next_observations)
  and `transform_rewards` (rewards) change it, in place; `episode_returns` stays raw.
- `Run(args, algorithm, data)` takes the script's `Args` with the fields every file shares (all of
  them go into results.json). The loop starts at `Run.resume(agent)`, calls `Run.log` every
  log_every steps (where device scalars are synced), `Run.evaluate` and `Run.checkpoint(step, agent)`
  every eval_every steps and `Run.stop_if_signalled(step, agent)` after each step. A checkpoint holds
  whatever networks, optimisers, tensors and numbers it finds on the agent object, the random
  streams and the evaluations.
The data conventions and those the files share (names, per-domain defaults, caches) are described
in docs/implementation_notes.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import math
import os
import random
from typing import Callable, Literal, NamedTuple, get_args

import numpy as np
import torch

import offline_data
# The scripts use these as common.<name>.
from offline_data import OfflineData  # noqa: F401
from offline_data.errors import UserError, atomic_write_bytes, install_user_error_hook  # noqa: F401
from offline_data.evaluation import evaluate, normalized_score  # noqa: F401
from offline_data.tasks import dataset_task, is_antmaze  # noqa: F401
from run_folder import Run  # noqa: F401

# ----------------------------------------------------------------------------------------------
# Checking flags: right after parsing, so that a bad value is one line before any work, not a
# traceback (or a silently useless run) after the dataset has loaded
# ----------------------------------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _given(args, names: tuple[str, ...]):
    for name in names:
        value = getattr(args, name)
        if value is not None:  # None: a per-domain default, chosen later
            yield name, value


def check_positive(args, *names: str) -> None:
    """Counts, periods, sizes (at least 1) and rates, scales (above 0)."""
    for name, value in _given(args, names):
        if value <= 0:
            raise UserError(f"{_flag(name)} must be {'at least 1' if isinstance(value, int) else 'above 0'}, "
                            f"got {value}")


def check_nonnegative(args, *names: str) -> None:
    """Weights, noise scales and step counts for which 0 means "off"."""
    for name, value in _given(args, names):
        if value < 0:
            raise UserError(f"{_flag(name)} must be 0 or more, got {value}")


def check_interval(args, name: str, low: float, high: float, bounds: str = "[)") -> None:
    """`low` <= or < the value <= or < `high`, as `bounds` says ("[)": low included, high not)."""
    for name, value in _given(args, (name,)):
        above = value >= low if bounds[0] == "[" else value > low
        below = value <= high if bounds[1] == "]" else value < high
        if not (above and below):
            raise UserError(f"{_flag(name)} must be in {bounds[0]}{low}, {high}{bounds[1]}, got {value}")


def check_seed(args, *names: str) -> None:
    """Seeds are unsigned 32-bit numbers for numpy and Gymnasium."""
    for name in names:
        check_interval(args, name, 0, 2**32 - 1, "[]")


def check_output_dir(path: str, flag: str = "--output-dir") -> None:
    """`path` is a folder this process can write in, or can be created as one."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path} cannot be a folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} is not writable: no permission to write in {existing}")


def check_args(args) -> None:
    """The checks of the flags every file shares (and of every float: finite), before any work."""
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{_flag(field.name)} must be a finite number, got {value}")
    check_positive(args, "total_steps", "batch_size", "eval_every", "eval_episodes", "log_every", "video_every")
    if args.video_every is not None and not args.capture_video:
        raise UserError("--video-every says which evaluations --capture-video records; add --capture-video")
    check_seed(args, "seed")
    check_output_dir(args.output_dir)




# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def load_dataset(dataset_id: str, device: str | torch.device = "cpu") -> OfflineData:
    """The dataset `dataset_id` as flat float32 tensors on `device` (offline_data.load)."""
    return offline_data.load(dataset_id, device)


def compute_obs_stats(data: OfflineData, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (+eps, as in TD3+BC and CORL) of the dataset's states."""
    return data.observations.mean(0), data.observations.std(0) + eps


def normalize_obs(data: OfflineData, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Normalise observations and next observations in place; evaluation must use the same stats."""
    data.observations = (data.observations - mean) / std
    data.next_observations = (data.next_observations - mean) / std
    data.obs_normalized = True


RewardTransform = Literal["none", "return-range", "minus-one", "cql-antmaze", "min-max", "plus-five"]
REWARD_TRANSFORMS = get_args(RewardTransform)


def transform_rewards(data: OfflineData, name: str) -> None:
    """Apply one of the papers' reward transforms in place.

    none:         r
    return-range: r * 1000 / (max episode return - min episode return)   (IQL, ARQ locomotion)
    minus-one:    r - 1                                                   (IQL, ARQ, iTRPO before its bonus, antmaze)
    cql-antmaze:  (r - 0.5) * 4                                           (CQL antmaze)
    min-max:      (r - min r) / (max r - min r), into [0, 1]              (BRAC+)
    plus-five:    r + 5, the "survival bonus"                             (Fisher-BRC)
    """
    r = data.rewards
    if name == "none":
        return
    if name == "return-range":
        spread = float(data.episode_returns.max() - data.episode_returns.min())
        data.rewards = r * (1000.0 / max(spread, 1e-6))
    elif name == "minus-one":
        data.rewards = r - 1.0
    elif name == "cql-antmaze":
        data.rewards = (r - 0.5) * 4.0
    elif name == "min-max":
        data.rewards = (r - r.min()) / torch.clamp(r.max() - r.min(), min=1e-6)
    elif name == "plus-five":
        data.rewards = r + 5.0
    else:
        raise UserError(f"unknown reward transform '{name}'; choose one of {', '.join(REWARD_TRANSFORMS)}")


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------
class Batch(NamedTuple):
    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_observations: torch.Tensor
    terminals: torch.Tensor


class ReplayBuffer:
    """Uniform minibatches from the dataset; everything stays on the device.

    The transition fields are copied into one (N, D) table when the buffer is built, so that a batch
    is one gather instead of five and its fields are column views of it. The copy costs the dataset's
    memory once more, and changes made to `data` after the buffer is built are not seen by it."""

    def __init__(self, data: OfflineData):
        self.data = data
        self.size = len(data)
        self.table = torch.cat([data.observations, data.actions, data.rewards[:, None], data.next_observations,
                                data.terminals[:, None]], 1)
        self.widths = [data.obs_dim, data.act_dim, 1, data.obs_dim, 1]

    def sample(self, batch_size: int) -> Batch:
        idx = torch.randint(0, self.size, (batch_size,), device=self.table.device)
        obs, actions, rewards, next_obs, terminals = self.table[idx].split(self.widths, dim=1)
        return Batch(obs, actions, rewards.squeeze(1), next_obs, terminals.squeeze(1))


# ----------------------------------------------------------------------------------------------
# A trained policy on its own (tools/evaluate.py)
# ----------------------------------------------------------------------------------------------
class Policy(torch.nn.Module):
    """A trained policy apart from its agent, as tools/evaluate.py rebuilds it from a model.pt: the
    networks that the algorithm's `act` reads, under the names the agent gives them (and its
    `state_dict` saves them under), the run's args, and `act` itself, the agent's own method called
    on this object. Each file's `make_policy(args, obs_dim, act_dim)` builds one."""

    def __init__(self, act: Callable, args, **networks: torch.nn.Module | None):
        super().__init__()
        self.act_function, self.args = act, args
        for name, network in networks.items():
            setattr(self, name, network)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.act_function(self, obs)

    def load(self, saved: dict) -> Policy:
        """Load each network from saved[name], the agent's `state_dict` (as model.pt holds it)."""
        for name, network in self.named_children():
            network.load_state_dict(saved[name])
        return self


# ----------------------------------------------------------------------------------------------
# Seeding, devices
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def flush_denormals() -> None:
    """Treat denormal floats as zero on the CPU (CUDA is unaffected). A multiplier that decays
    towards zero, such as a behaviour model's entropy temperature (~1e-40 after ~90k steps), would
    otherwise make every matmul it touches about ten times slower (docs/results.md, "Speed")."""
    torch.set_flush_denormal(True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available; use --device cpu.")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device torch knows; use auto, cpu, cuda or cuda:<index>.") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0.")
    return device


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
        with torch.autocast(device.type, dtype=torch.bfloat16):
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
def no_cuda_graphs(args, why: str) -> None:
    """A file's check_args refuses --cuda-graphs with this when its training step cannot be captured."""
    if args.cuda_graphs:
        raise UserError(f"--cuda-graphs: {why}; run without it")


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
    return {k: v for k, v in vars(agent).items() if isinstance(v, (bool, int, float))}


class CapturedStep:
    """`step` (agent.train on a sampled batch) as CUDA graphs. A file whose train() takes one of
    several Python paths (TD3+BC's delayed actor, CQL's behaviour-cloning warm-up) says which the next
    call takes with `agent.branch()`; each path is one graph. A path's first WARMUP calls run eagerly
    on a side stream (they train as any step does, and build the optimisers' state), the next one
    captures it and every later one replays it. A captured train() may change the agent's Python
    numbers only by adding to integer counters (TD3+BC's total_it): each replay adds the same, so that
    a checkpoint holds what an eager run's would. If a capture raises, one line says why and every
    later step runs eagerly. `capture` and `side_stream` are cuda_graph and cuda_side_stream on a GPU;
    tests/test_cuda_graphs.py runs this on the CPU with a stand-in that calls the step again."""

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
                for name, value in before.items():
                    setattr(self.agent, name, value)
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
        after = python_numbers(self.agent)
        increments = {}
        for name, value in after.items():
            if value == before.get(name):
                continue
            if type(value) is not int or type(before.get(name)) is not int:
                raise ValueError(f"train() sets the Python value {name} on every step, which a graph would freeze")
            increments[name] = value - before[name]
        for name, value in before.items():
            setattr(self.agent, name, value)
        return replay, metrics, increments


# ----------------------------------------------------------------------------------------------
# Pretraining cache (behaviour models that take an hour are trained once, not once per seed)
# ----------------------------------------------------------------------------------------------
def pretraining_key(args, fields: tuple[str, ...], data: OfflineData, recipe: tuple = ()) -> str:
    """Hash of what a pretrained model depends on: the dataset id, the dataset's states and actions as
    loaded (`data.fingerprint`) and whether states are normalised, the named fields of `args`, and
    `recipe`, the file's words for how it trains the model (so that a model trained another way is not
    taken for it). --seed is not one of them, so every seed and every setting of the later phases
    shares the model. Nothing computed on the device enters it (the normalised states round
    differently on a GPU), so a model trained on one device is found on another."""
    digest = hashlib.sha256(args.env.encode())
    digest.update(f"{data.fingerprint} normalised={data.obs_normalized}".encode())
    digest.update(repr([(f, getattr(args, f)) for f in fields]).encode())
    if recipe:
        digest.update(repr(recipe).encode())
    if getattr(args, "precision", "fp32") != "fp32":  # fp32 keys name no precision
        digest.update(f"precision={args.precision}".encode())
    return digest.hexdigest()[:20]


@contextlib.contextmanager
def separate_rng(seed: int, device: torch.device):
    """A block with its own torch random stream, seeded with `seed`; the run's stream is restored
    afterwards. A pretraining phase run inside it draws the same numbers whether or not the run
    later loads it from the cache, so cached and uncached runs continue identically."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def load_pretrained(path: str, modules: dict, device: torch.device) -> bool:
    """Load the state dicts of `modules` from a cache file; False (with a notice) if it is absent
    or unreadable, in which case the caller trains them and calls `save_pretrained`."""
    if not os.path.exists(path):
        return False
    try:
        load_state_dicts(modules, torch.load(path, map_location=device, weights_only=True))
    except Exception as exc:  # a truncated or foreign file is only a cache miss
        print(f"cache {path} is unreadable or does not fit ({type(exc).__name__}); training it again", flush=True)
        return False
    print(f"reusing the cached pretrained model {path}", flush=True)
    return True


def load_state_dicts(modules: dict, state: dict) -> None:
    """Load state[name] into each of `modules`; if one does not fit, raise and leave all of them as
    they were, so that training them again starts where a run without the cache starts."""
    before = {name: copy.deepcopy(module.state_dict()) for name, module in modules.items()}
    try:
        for name, module in modules.items():
            module.load_state_dict(state[name])
    except Exception:
        for name, module in modules.items():
            module.load_state_dict(before[name])
        raise


def save_cache(path: str, payload: bytes) -> None:
    """Write a cache file atomically. One that cannot be written (a read-only or full disk) only
    costs the next run the time to build it again, so it is a notice, not the end of this run."""
    try:
        atomic_write_bytes(path, payload)
    except UserError as exc:
        print(f"{exc}; continuing without caching it", flush=True)


def save_pretrained(path: str, modules: dict) -> None:
    buffer = io.BytesIO()
    torch.save({name: module.state_dict() for name, module in modules.items()}, buffer)
    save_cache(path, buffer.getvalue())
