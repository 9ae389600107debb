"""Shared plumbing for the single-file algorithms in `algorithms/`: checks of flags, state
normalisation and reward transforms, batches, seeding, devices and the pretraining caches.
Evaluation (offline_data/evaluation.py), the run folder (run_folder.py: logs, results.json,
checkpoints) and the speed mechanics (speed.py: precision, the ensemble and output layers,
--compile, --cuda-graphs) are used through it, as `common.evaluate`, `common.Run` and so on. Data
comes from the data layer (`offline_data/`) through `load_dataset`. No algorithmic code: every loss
lives in its algorithm's file.

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
from speed import (EnsembleLinear, EnsembleMLP, OutputLinear, Precision, autocast, compiled,  # noqa: F401
                   ensemble_mlp, training_step)

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
