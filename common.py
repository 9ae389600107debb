"""Shared plumbing for the single-file algorithms in `algorithms/`: checks of flags, state
normalisation and reward transforms, batches, evaluation, seeding, devices, precision, the run
folder (logs, results.json, checkpoints) and the pretraining caches. Data comes from the data layer
(`offline_data/`) through `load_dataset`. No algorithmic code: every loss lives in its algorithm's file.

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
  log_every steps (where device scalars are synced), `Run.checkpoint(step, agent)` after each
  evaluation and `Run.stop_if_signalled(step, agent)` after each step. A checkpoint holds whatever
  `training_state(agent)` finds on the agent object, the random streams and the evaluations.
The data conventions and those the files share (names, per-domain defaults, caches) are described
in docs/implementation_notes.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import signal
import time
from typing import Callable, Literal, NamedTuple, get_args

import numpy as np
import torch

import offline_data
# The scripts use OfflineData, UserError, install_user_error_hook, dataset_task and is_antmaze as common.<name>.
from offline_data import OfflineData  # noqa: F401
from offline_data.errors import (UserError, atomic_write_bytes, atomic_write_json,  # noqa: F401
                                 install_user_error_hook, save_checkpoint)
from offline_data.tasks import dataset_task, flatten_obs, goal_obs_keys, is_antmaze  # noqa: F401


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
    check_positive(args, "total_steps", "batch_size", "eval_every", "eval_episodes", "log_every")
    check_seed(args, "seed")
    check_output_dir(args.output_dir)


def check_batch_sizes(args, data: OfflineData) -> None:
    """Every *batch_size flag is at most the number of transitions. Minibatches are drawn with
    replacement, so a larger one would run, but it only repeats transitions within each step at a
    higher cost: it means a typo or the wrong dataset (and at 1e8, an allocation that fails)."""
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if field.name.endswith("batch_size") and value is not None and value > len(data):
            raise UserError(f"{_flag(field.name)} {value} is larger than the dataset '{data.dataset_id}' "
                            f"({len(data)} transitions); use at most {len(data)}")


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
# Evaluation
# ----------------------------------------------------------------------------------------------
def normalized_score(returns: np.ndarray, ref_min: float | None, ref_max: float | None):
    if ref_min is None or ref_max is None:
        return None
    return 100.0 * (np.asarray(returns, dtype=np.float64) - ref_min) / (ref_max - ref_min)


@torch.no_grad()
def evaluate(data: OfflineData, policy: Callable[[torch.Tensor], torch.Tensor], n_episodes: int, seed: int,
             obs_mean: torch.Tensor | None = None, obs_std: torch.Tensor | None = None) -> dict:
    """Run `n_episodes` at once in a vector env of the dataset's eval env, one batched policy call
    per step. `policy` maps (normalised) observations to actions in [-1, 1] and should be
    deterministic. Returns raw return mean/std and the normalised score (None without references)."""
    import gymnasium as gym

    dataset = data.minari_dataset
    keys = goal_obs_keys(dataset, data.dataset_id)
    envs = gym.vector.SyncVectorEnv([lambda: dataset.recover_environment(eval_env=True)] * n_episodes)
    device = data.observations.device
    low, high = data.action_low, data.action_high
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(n_episodes)
    done = np.zeros(n_episodes, dtype=bool)
    while not done.all():
        o = torch.as_tensor(flatten_obs(obs, keys), device=device)
        if obs_mean is not None:
            o = (o - obs_mean) / obs_std
        a = policy(o).clamp(-1.0, 1.0).cpu().numpy()
        obs, reward, terminated, truncated, _ = envs.step(low + (a + 1.0) * 0.5 * (high - low))
        returns += np.where(done, 0.0, reward)
        done |= terminated | truncated
    envs.close()
    scores = normalized_score(returns, data.ref_min_score, data.ref_max_score)
    return {
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "normalized_score_mean": None if scores is None else float(scores.mean()),
        "normalized_score_std": None if scores is None else float(scores.std()),
    }


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
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return step
    if device.type == "cuda" and not native_bf16(device):
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no native bfloat16 support "
                        "(before Ampere, bf16 is emulated and slower than fp32); use --precision fp32.")

    def bf16_step(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return step(*args, **kwargs)

    return bf16_step


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
# Run bookkeeping: run folder, tensorboard, console, results.json, checkpoint
# ----------------------------------------------------------------------------------------------
def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


CHECKPOINT, PREVIOUS_CHECKPOINT = "checkpoint.pt", "checkpoint.prev.pt"
# Flags that may differ between a run and its resumption: none of them changes what is trained.
RESUME_FREE_FLAGS = {"run_name", "output_dir", "resume", "track", "wandb_project", "log_every", "save_model",
                     "total_steps", "compile"}


class Run:
    """One training run: `<output_dir>/<run_name>/` with tensorboard events, results.json and a
    checkpoint. Losses that are not finite stop the run with one line instead of training on NaNs.
    With --resume auto (the default) a folder that holds a finished run ends the script at once, and
    one that holds a checkpoint is continued from it (docs/usage.md, "Resuming")."""

    def __init__(self, args, algorithm: str, data: OfflineData, phases: tuple[str, ...] = ()):
        """`phases`: the file's pretraining phases in the order they run (they checkpoint as the main
        loop does, see `resume`); the main loop, None, comes after them."""
        from torch.utils.tensorboard import SummaryWriter

        self.args, self.algorithm, self.data = args, algorithm, data
        self.phases = (*phases, None)
        run_name = args.run_name or f"{args.env.replace('/', '__')}__{algorithm}__{args.seed}__{int(time.time())}"
        self.dir = os.path.join(args.output_dir, run_name)
        check_batch_sizes(args, data)
        self.saved = None
        if args.resume == "auto":
            if _finished(os.path.join(self.dir, "results.json")):
                print(f"[{algorithm}] {self.dir} holds a finished run: nothing to do (--resume never starts it over)")
                raise SystemExit(0)
            self.saved = self._read_checkpoint()
        else:
            _remove_checkpoints(self.dir)
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the run folder {self.dir}: {exc.strerror or exc}") from None
        # a resumed run drops the events logged after its checkpoint, which it is about to log again
        self.writer = SummaryWriter(self.dir, purge_step=None if self.saved is None else self.saved["step"] + 1)
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{k}|{v}|" for k, v in vars(args).items()))
        self.wandb = None
        if args.track:
            try:
                import wandb
            except ImportError:
                raise UserError("--track needs wandb: pip install wandb") from None
            self.wandb = wandb.init(project=args.wandb_project, name=run_name, config=vars(args),
                                    sync_tensorboard=True, dir=self.dir)
        self.results = {
            "algorithm": algorithm,
            "env": args.env,
            "seed": args.seed,
            "args": {k: v for k, v in vars(args).items()},
            "dataset": {"transitions": len(data), "episodes": len(data.episode_lengths),
                        "ref_min_score": data.ref_min_score, "ref_max_score": data.ref_max_score,
                        "ref_scores_source": data.ref_scores_source, "source": data.source,
                        "eval_env": data.eval_env, "episode_return_mean": float(data.episode_returns.mean())},
            "evaluations": [], "final_normalized_score": None, "final_return": None, "finished": False,
        }
        self.last_metrics: dict[str, float] = {}
        self.start = time.time()
        self.signalled: int | None = None
        self.handlers_installed = False
        self.train_seconds_before = 0.0
        self.reset_clock()
        print(f"[{algorithm}] {args.env}: {len(data)} transitions, {len(data.episode_lengths)} episodes, "
              f"obs {data.obs_dim}, act {data.act_dim}, device {data.observations.device}; run dir {self.dir}")
        if data.ref_scores_source == "D4RL constants (v2 envs)":
            print(f"[{algorithm}] normalised scores use D4RL's reference returns "
                  f"({data.ref_min_score}, {data.ref_max_score}), measured on the v2 MuJoCo envs")
        elif data.ref_scores_source == "none":
            print(f"[{algorithm}] the dataset has no reference scores: raw returns only")

    def log(self, step: int, metrics: dict, phase: str | None = None) -> None:
        """Write scalars; with `phase` (a pretraining phase such as "behaviour model"), also print
        one progress line, since such phases have no evaluations to report on."""
        values = {k: float(v) for k, v in metrics.items()}
        bad = [k for k, v in values.items() if not np.isfinite(v)]
        if bad:
            raise UserError(
                f"{', '.join(bad)} became {values[bad[0]]} at step {step}: training diverged. Try a "
                f"lower learning rate or another --seed."
            )
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        sps = (step - self.clock_step) / max(time.time() - self.clock - self.eval_time, 1e-9)
        if phase is None:
            self.writer.add_scalar("charts/SPS", sps, step)
            self.last_metrics = values
        else:
            print(f"{phase} step {step} | {sps:.0f} SPS | " + " ".join(
                f"{k.split('/')[-1]} {v:.3g}" for k, v in values.items()), flush=True)

    def reset_clock(self, step: int = 0) -> None:
        """Start SPS and ETA afresh at `step`, e.g. after a pretraining phase."""
        self.clock, self.clock_step = time.time(), step
        self.eval_time = 0.0

    # -- checkpoints ---------------------------------------------------------------------------
    def _read_checkpoint(self) -> dict | None:
        for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
            path = os.path.join(self.dir, name)
            if not os.path.exists(path):
                continue
            try:  # our own file: it holds numpy and python random states, hence weights_only=False
                saved = torch.load(path, map_location="cpu", weights_only=False)
                saved["step"], saved["agent"], saved["rng"]
            except Exception as exc:
                print(f"[{self.algorithm}] {path} is unreadable ({type(exc).__name__}); trying the previous "
                      f"checkpoint", flush=True)
                continue
            now = vars(self.args)
            # a flag added to the file after the checkpoint was written ran at its default
            then = {**{f.name: f.default for f in dataclasses.fields(self.args)
                       if f.default is not dataclasses.MISSING and f.name not in saved["args"]}, **saved["args"]}
            differ = [k for k in sorted(set(then) | set(now))
                      if k not in RESUME_FREE_FLAGS and then.get(k) != now.get(k)]
            if differ:
                flags = ", ".join(f"--{k.replace('_', '-')} {then.get(k)} (now {now.get(k)})" for k in differ)
                raise UserError(f"{path} was written with other flags: {flags}. Pass another --run-name, or "
                                f"--resume never to start this run over.")
            saved["path"] = path
            return saved
        return None

    def resume(self, agent, phase: str | None = None, steps: int = 0) -> int:
        """Restore `agent`, the random streams and the evaluations from the checkpoint if it was
        written in `phase` (None: the main loop). Returns the step to continue after (0: from the
        start). A checkpoint of a later phase holds this phase's result: `agent` takes its state and
        `steps`, the phase's length, is returned, so that the phase's loop is skipped. One of an
        earlier phase is left alone (that phase was read from its cache)."""
        saved = self.saved
        if saved is None:
            return 0
        mine = self.phases.index(phase)
        theirs = self.phases.index(saved.get("phase")) if saved.get("phase") in self.phases else -1
        if theirs < mine:
            return 0
        if theirs > mine:
            load_training_state(agent, saved["agent"])
            return steps
        load_training_state(agent, saved["agent"])
        set_rng_states(saved["rng"])
        step = saved["step"]
        self.start -= saved["wall_time"]
        if phase is None:
            self.results["evaluations"] = saved["evaluations"]
            self.train_seconds_before = saved["train_seconds"]
        self.reset_clock(step)
        print(f"[{self.algorithm}] resuming{f' the {phase} phase' if phase else ''} from step {step} ({saved['path']})",
              flush=True)
        self.saved = None
        return step

    def train_seconds(self) -> float:
        return self.train_seconds_before + time.time() - self.clock - self.eval_time

    def checkpoint(self, step: int, agent, phase: str | None = None) -> None:
        """Write everything needed to continue after `step` of `phase` (None: the main loop); the
        previous checkpoint is kept until the new one is whole (a reader falls back to it)."""
        state = {"step": step, "phase": phase, "args": dict(vars(self.args)), "agent": training_state(agent),
                 "rng": rng_states(),
                 "evaluations": self.results["evaluations"], "train_seconds": self.train_seconds(),
                 "wall_time": time.time() - self.start}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        path = os.path.join(self.dir, CHECKPOINT)
        if os.path.exists(path):
            os.replace(path, os.path.join(self.dir, PREVIOUS_CHECKPOINT))
        atomic_write_bytes(path, buffer.getvalue())

    def stop_if_signalled(self, step: int, agent, phase: str | None = None) -> None:
        """Called after every training step. Its first call makes SIGTERM, SIGINT and SIGUSR1 set a
        flag instead of killing the process; once one has come, checkpoint at `step` and exit
        (status 128 + signal number)."""
        if not self.handlers_installed:
            def handler(signum, frame):
                self.signalled = signum

            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                signal.signal(signum, handler)
            self.handlers_installed = True
        if self.signalled is None:
            return
        self.checkpoint(step, agent, phase)
        self.writer.close()
        print(f"[{self.algorithm}] stopped by {signal.Signals(self.signalled).name} after step {step}"
              f"{f' of the {phase} phase' if phase else ''}; "
              f"checkpoint written: the same command resumes the run", flush=True)
        raise SystemExit(128 + self.signalled)

    def pretraining_step(self, step: int, agent, phase: str) -> None:
        """Called after every step of a pretraining phase: a checkpoint every --eval-every steps and
        the stop on a signal, as in the main loop, since a behaviour model can take hours."""
        if step % self.args.eval_every == 0:
            self.checkpoint(step, agent, phase)
        self.stop_if_signalled(step, agent, phase)

    def evaluate(self, step: int, policy: Callable[[torch.Tensor], torch.Tensor],
                 obs_mean: torch.Tensor | None = None, obs_std: torch.Tensor | None = None) -> dict:
        """Evaluate `policy` (see `evaluate`), log it, and rewrite results.json atomically."""
        t0 = time.time()
        evaluation = evaluate(self.data, policy, self.args.eval_episodes, self.args.seed,
                              obs_mean, obs_std)
        self.eval_time += time.time() - t0
        entry = {"step": step, **evaluation, "wall_time": time.time() - self.start}
        self.results["evaluations"].append(entry)
        self.writer.add_scalar("eval/return", evaluation["return_mean"], step)
        if evaluation["normalized_score_mean"] is not None:
            self.writer.add_scalar("eval/normalized_score", evaluation["normalized_score_mean"], step)
        atomic_write_json(os.path.join(self.dir, "results.json"), self.results)

        train_time = max(time.time() - self.clock - self.eval_time, 1e-9)
        sps = (step - self.clock_step) / train_time
        eta = (self.args.total_steps - step) / max(sps, 1e-9)
        losses = " ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in self.last_metrics.items()
                          if k.startswith("losses/"))
        score = evaluation["normalized_score_mean"]
        score_txt = "" if score is None else f" | score {score:.1f} ± {evaluation['normalized_score_std']:.1f}"
        print(f"step {step}/{self.args.total_steps} | {sps:.0f} SPS | ETA {_fmt_time(eta)} | {losses} "
              f"| return {evaluation['return_mean']:.1f} ± {evaluation['return_std']:.1f}{score_txt}",
              flush=True)
        return evaluation

    def finish(self, checkpoint: dict | None = None) -> None:
        evals = self.results["evaluations"]
        if evals:
            self.results["final_return"] = evals[-1]["return_mean"]
            self.results["final_normalized_score"] = evals[-1]["normalized_score_mean"]
        self.results["finished"] = True
        self.results["train_seconds"] = self.train_seconds()
        if checkpoint is not None and self.args.save_model:
            save_checkpoint(os.path.join(self.dir, "model.pt"), {
                "algorithm": self.algorithm, "args": vars(self.args),
                "action_low": self.data.action_low, "action_high": self.data.action_high,
                **checkpoint})
        atomic_write_json(os.path.join(self.dir, "results.json"), self.results)
        _remove_checkpoints(self.dir)  # a finished run is never resumed; results.json says it finished
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        print(f"[{self.algorithm}] done: final return {self.results['final_return']}, "
              f"normalised score {self.results['final_normalized_score']}; results in {self.dir}")


def _finished(results_path: str) -> bool:
    try:
        with open(results_path) as f:
            return bool(json.load(f).get("finished"))
    except (OSError, ValueError):
        return False


def _remove_checkpoints(folder: str) -> None:
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def training_state(agent) -> dict:
    """What training changes in an agent object: the state dicts of its networks, optimisers and
    schedulers (also in lists), its tensors (multipliers, in place), generators and numbers."""
    state = {}
    for name, value in vars(agent).items():
        if hasattr(value, "state_dict"):
            state[name] = value.state_dict()
        elif isinstance(value, list) and value and all(hasattr(v, "state_dict") for v in value):
            state[name] = [v.state_dict() for v in value]
        elif isinstance(value, torch.Tensor):
            state[name] = value.detach().clone()
        elif isinstance(value, torch.Generator):
            state[name] = value.get_state()
        elif isinstance(value, (bool, int, float)):
            state[name] = value
    return state


def load_training_state(agent, state: dict) -> None:
    for name, saved in state.items():
        value = getattr(agent, name)
        if hasattr(value, "load_state_dict"):
            value.load_state_dict(saved)
        elif isinstance(value, list):
            for item, item_state in zip(value, saved):
                item.load_state_dict(item_state)
        elif isinstance(value, torch.Tensor):
            with torch.no_grad():  # in place: the optimisers hold these very tensors
                value.copy_(saved)
        elif isinstance(value, torch.Generator):
            value.set_state(saved)
        else:
            setattr(agent, name, saved)


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ----------------------------------------------------------------------------------------------
# Pretraining cache (behaviour models that take an hour are trained once, not once per seed)
# ----------------------------------------------------------------------------------------------
def pretraining_key(args, fields: tuple[str, ...], data: OfflineData, recipe: tuple = ()) -> str:
    """Hash of what a pretrained model depends on: the dataset id, the bytes of the (normalised)
    states and actions it is trained on, the named fields of `args`, and `recipe`, the file's words
    for how it trains the model (so that a model trained another way is not taken for it). --seed is
    not one of them, so every seed and every setting of the later phases shares the model."""
    digest = hashlib.sha256(args.env.encode())
    digest.update(data.observations.cpu().numpy().tobytes())
    digest.update(data.actions.cpu().numpy().tobytes())
    digest.update(repr([(f, getattr(args, f)) for f in fields]).encode())
    if recipe:
        digest.update(repr(recipe).encode())
    if getattr(args, "precision", "fp32") != "fp32":  # fp32 models keep the keys they had without the flag
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
