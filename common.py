"""What every file in algorithms/ needs while it trains, and nothing algorithmic: copy a file and
this one, and it runs. A local/* or d4rl/* id not yet in Minari's storage is built by the
repository's tools/make_dataset.py, the only code of the repository used here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import random
import signal
import sys
import threading
import time
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch


# --- Errors and files -------------------------------------------------------------------------
class UserError(Exception):
    """A problem with the user's input or files: printed as one line, without a traceback."""


_writing_in = "the run folder"  # a Run names its folder: a refused write of tensorboard's has none
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def install_user_error_hook() -> None:
    """An uncaught UserError, or a write the disk refused (tensorboard's too), is one line."""
    def hook(kind, exc, tb):
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            exc = UserError(f"could not write {exc.filename or 'in ' + _writing_in}: "
                            f"{exc.strerror}")
        if not isinstance(exc, UserError):
            return sys.__excepthook__(kind, exc, tb)
        print(f"error: {exc}", file=sys.stderr)

    sys.excepthook = hook  # tensorboard's thread: its error comes again in the main thread
    threading.excepthook = lambda a: None if getattr(a.exc_value, "errno", 0) in _DISK_FULL \
        else threading.__excepthook__(a)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:150]


def atomic_write(path: str, payload: bytes) -> None:
    """A temporary file beside `path`, renamed over it: nobody sees half a file, and a failure keeps
    the old file and is one line naming it."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise UserError(f"could not write {path}: {exc.strerror or exc}") from None
        raise


def write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2).encode())


def digest(value) -> str:
    """sha256 of nested dicts, lists, tensors and plain values: of what they hold, not of their
    bytes on disk, so that it is the same on every device and torch version."""
    h = hashlib.sha256()

    def walk(v):
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().contiguous()
            h.update(f"T{v.dtype}{tuple(v.shape)}".encode())
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, (dict, list, tuple)):
            h.update(f"{type(v).__name__}{len(v)}".encode())
            for k, x in v.items() if isinstance(v, dict) else enumerate(v):
                h.update(repr(k).encode())
                walk(x)
        else:
            h.update(repr(v).encode())

    walk(value)
    return h.hexdigest()


def save_file(path: str, obj: dict) -> None:
    """torch.save of `obj` (tensors, numbers, strings, lists, dicts) and a checksum, atomically."""
    buffer = io.BytesIO()
    torch.save({**obj, "sha256": digest(obj)}, buffer)
    atomic_write(path, buffer.getvalue())


def load_file(path: str, device="cpu") -> dict:
    """What save_file wrote, read as weights only (a pickle that would run code is refused) and
    checked against its checksum; anything else is a one-line UserError."""
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise UserError(f"{path} cannot be read as weights only ({type(exc).__name__}: "
                        f"{_first_line(exc)}); it is damaged or not a file of this library"
                        ) from None
    if not isinstance(obj, dict) or "sha256" not in obj:
        raise UserError(f"{path} is not a file of this library (it has no checksum)")
    if digest({k: v for k, v in obj.items() if k != "sha256"}) != obj.pop("sha256"):
        raise UserError(f"{path} is damaged: its contents do not match their checksum")
    return obj


def lock_folder(folder: str, what_to_do: str):
    """An exclusive flock on <folder>/.lock for this process's life (a kill releases it): a second
    process is refused in one line. Where locks do not work, the folder is used unlocked."""
    try:
        import fcntl

        f = open(os.path.join(folder, ".lock"), "a+")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"{folder} is in use by another process ({holder}); {what_to_do}") from None
    except (ImportError, OSError):
        return contextlib.nullcontext()
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {os.uname().nodename}")
    f.flush()
    return f


# --- Flags (checked right after parsing: one line, before the dataset loads), devices, seeds ---
def check_interval(args, name: str, low: float, high: float, bounds: str = "[)") -> None:
    """low <= or < the value <= or < high, as `bounds` says ("[)": low included, high not); a
    value of None (a per-domain default, chosen later) is not checked."""
    v = getattr(args, name)
    if v is not None and not ((v >= low if bounds[0] == "[" else v > low)
                              and (v <= high if bounds[1] == "]" else v < high)):
        raise UserError(f"--{name.replace('_', '-')} must be in {bounds[0]}{low}, {high}"
                        f"{bounds[1]}, got {v}")


def check_positive(args, *names: str, zero: bool = False) -> None:
    """Counts, periods, sizes (at least 1) and rates, scales (above 0); with `zero`, 0 or more."""
    for name in names:
        v = getattr(args, name)
        if v is not None and (v < 0 or v == 0 and not zero):
            least = "0 or more" if zero else "at least 1" if isinstance(v, int) else "above 0"
            raise UserError(f"--{name.replace('_', '-')} must be {least}, got {v}")


def check_seed(args, *names: str) -> None:
    for name in names:  # numpy's and Gymnasium's seeds are unsigned 32-bit
        check_interval(args, name, 0, 2**32 - 1, "[]")


def check_args(args) -> None:
    """The flags every file shares, and every float (finite, of float32's range)."""
    for field in dataclasses.fields(args):
        v = getattr(args, field.name)
        if isinstance(v, float) and not abs(v) <= torch.finfo(torch.float32).max:  # NaN too
            name = field.name.replace("_", "-")
            raise UserError(f"--{name} must be a finite number of float32's range, got {v}")
    check_positive(args, "total_steps", "batch_size", "eval_every", "eval_episodes", "log_every",
                   "final_episodes")
    check_seed(args, "seed")
    if args.run_name is not None and (args.run_name in ("", ".", "..") or "/" in args.run_name):
        raise UserError(f"--run-name {args.run_name!r} must be one folder name, without '/'")
    check_output_dir(args.output_dir)


def check_output_dir(path: str, flag: str = "--output-dir") -> None:
    """`path` is a folder this process can write in, or can make."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        what = "not writable" if os.path.isdir(existing) else "a file"
        raise UserError(f"{flag} {path} cannot be a folder written here: {existing} is {what}")


def resolve_device(name: str) -> torch.device:
    cuda = torch.cuda.is_available()
    try:
        device = torch.device(name if name != "auto" else "cuda" if cuda else "cpu")
    except RuntimeError:
        raise UserError(f"--device {name} is not a device torch knows; use auto, cpu, cuda or "
                        f"cuda:<index>") from None
    if device.type == "cuda" and not cuda:
        raise UserError(f"--device {name} was asked for but CUDA is not available; use --device "
                        f"cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s), numbered from 0")
    return device


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's streams; and denormal floats count as zero on the CPU, where a
    temperature decaying towards ~1e-40 makes every matmul it touches ten times slower."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)


# --- Data (docs/datasets.md; conventions in docs/implementation_notes.md) ----------------------
@dataclasses.dataclass
class OfflineData:
    dataset_id: str
    observations: torch.Tensor  # (N, obs_dim)
    actions: torch.Tensor  # (N, act_dim), rescaled to [-1, 1]
    rewards: torch.Tensor  # (N,)
    next_observations: torch.Tensor  # (N, obs_dim)
    terminals: torch.Tensor  # (N,) 1 where the episode terminated: not bootstrapped
    timeouts: torch.Tensor  # (N,) 1 where it was cut (a time limit): bootstrapped
    episode_starts: np.ndarray  # (E,) row of each episode's first transition
    episode_lengths: np.ndarray  # (E,)
    episode_returns: np.ndarray  # (E,) undiscounted, of the rewards as read
    action_low: np.ndarray
    action_high: np.ndarray
    ref_min_score: float | None
    ref_max_score: float | None
    ref_scores_source: str  # "dataset", "D4RL constants (v2 envs)" or "none"
    make_env: Callable  # make_env(render_mode=None): the evaluation env
    antmaze: bool  # Dict observations flattened with achieved_goal first (flatten_obs)
    eval_env: str | None
    fingerprint: str = ""  # sha256 of the states, actions and episode lengths (cache keys)
    obs_normalized: bool = False

    obs_dim = property(lambda self: self.observations.shape[1])
    act_dim = property(lambda self: self.actions.shape[1])
    __len__ = lambda self: self.observations.shape[0]  # noqa: E731


# D4RL's reference returns (random, expert), measured on the v2 MuJoCo envs and Adroit v0: the
# normalised scores of Minari's mujoco/* datasets and of D4RL's files
D4RL_REF_SCORES = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3),
                   "walker2d": (1.629008, 4592.3), "ant": (-325.6, 3879.7),
                   "pen": (96.262799, 3076.8331017826877), "door": (-56.512833, 2880.5693087298737),
                   "hammer": (-274.856578, 12794.134825156867),
                   "relocate": (-6.425911, 4233.877797728884)}


def dataset_task(dataset_id: str) -> str:
    """The task of an id, lower-cased: 'D4RL/pen/human-v2' -> 'pen', 'd4rl/hopper-medium-v2' ->
    'hopper'. Per-domain settings match it exactly, so that 'pendulum' is not 'pen'."""
    parts = dataset_id.lower().split("/")
    if len(parts) == 1 or len(parts) == 2 and parts[0] == "d4rl":  # the task opens D4RL's name
        return parts[-1].split("-")[0]
    return parts[-2]


def flatten_obs(obs, antmaze: bool = False) -> np.ndarray:
    """A goal-conditioned Dict observation as concat(observation, desired_goal); for AntMaze
    achieved_goal first: its torso x, y, which D4RL's antmaze states started with, are there."""
    if isinstance(obs, dict):
        keys = ("achieved_goal",) * antmaze + ("observation", "desired_goal")
        obs = np.concatenate([obs[k] for k in keys], axis=-1)
    return np.asarray(obs, dtype=np.float32)


def _built(dataset_id: str) -> bool:
    """A local/* or d4rl/<name> id is built into Minari's storage by tools/make_dataset.py (which
    checks, under a lock); True if that happened, or it is there and the tools are not."""
    import minari

    stored = os.path.isdir(os.path.join(minari.storage.get_dataset_path(dataset_id), "data"))
    tools = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools")
    kind = dataset_id.split("/")[0].lower()
    if dataset_id.endswith(".hdf5"):
        raise UserError(f"a D4RL file is read under its id: `python tools/make_dataset.py --id "
                        f"d4rl/<name> --d4rl-file {dataset_id}` once, then --env d4rl/<name>")
    if kind not in ("local", "d4rl") or kind == "d4rl" and dataset_id.count("/") != 1:
        return stored
    if not os.path.isfile(os.path.join(tools, "make_dataset.py")):
        if stored:
            return True
        raise UserError(f"dataset '{dataset_id}' is not built here: build it with `python "
                        f"tools/make_dataset.py --id {dataset_id}` in the library's repository")
    if tools not in sys.path:
        sys.path.append(tools)
    from make_dataset import build_local_dataset

    build_local_dataset(dataset_id)
    return True


def load_dataset(dataset_id: str, device="cpu") -> OfflineData:
    """A Minari dataset (the local copy, else a download) as flat float32 tensors on `device`,
    checked: values that are not finite are refused and actions beyond the Box clipped, each with
    one line; actions are rescaled from the Box to [-1, 1]."""
    import minari
    from gymnasium import spaces

    stored = _built(dataset_id)
    try:
        dataset = minari.load_dataset(dataset_id, download=not stored)
        episodes = list(dataset.storage.get_episodes(dataset.episode_indices))
    except Exception as exc:  # json's, h5py's, pyarrow's, the network's
        import difflib

        close = [] if stored else \
            difflib.get_close_matches(dataset_id, minari.list_local_datasets())
        raise UserError(f"dataset '{dataset_id}' could not be read ({type(exc).__name__}: "
                        f"{_first_line(exc)}); " + (
                            f"it is damaged: delete {minari.storage.get_dataset_path(dataset_id)} "
                            f"and build or download it again" if stored else
                            "without network, run `minari download <id>` elsewhere and copy it "
                            "into MINARI_DATASETS_PATH; `minari list local` lists what is here")
                        + (f"; close local ids: {', '.join(close)}" if close else "")) from None
    space, obs_space, spec = dataset.action_space, dataset.observation_space, dataset.env_spec
    antmaze = spec.name.startswith("AntMaze") if spec is not None else \
        dataset_task(dataset_id) == "antmaze"
    keys = ("achieved_goal",) * antmaze + ("observation", "desired_goal")
    if not isinstance(space, spaces.Box) or len(space.shape) != 1 or not np.all(
            np.isfinite(space.low) & np.isfinite(space.high) & (space.high > space.low)):
        raise UserError(f"dataset '{dataset_id}' has action space {space}; these algorithms need "
                        f"a 1-D Box with finite bounds (continuous control)")
    if not (isinstance(obs_space, spaces.Box) and len(obs_space.shape) == 1
            or isinstance(obs_space, spaces.Dict) and set(keys) <= set(obs_space.spaces)):
        raise UserError(f"dataset '{dataset_id}' has observation space {obs_space}; only flat Box "
                        f"or goal-conditioned Dict observations ({', '.join(keys)}) are supported")
    empty = [i for i, e in enumerate(episodes) if len(e["rewards"]) == 0]
    if empty:  # the reset observation alone: no transition to learn from
        episodes = [e for e in episodes if len(e["rewards"])]
        print(f"dataset '{dataset_id}': dropped {len(empty)} episode(s) of length zero (episode "
              f"{', '.join(map(str, empty[:5]))}{', ...' if len(empty) > 5 else ''})", flush=True)
    obs = [flatten_obs(e["observations"], antmaze) for e in episodes]
    if not episodes:
        raise UserError(f"dataset '{dataset_id}' contains no transitions")
    if any(len(o) != len(e["rewards"]) + 1 for o, e in zip(obs, episodes)):
        raise UserError(f"dataset '{dataset_id}' is malformed: an episode does not hold one more "
                        f"observation than actions")
    lengths = np.array([len(e["rewards"]) for e in episodes], dtype=np.int64)
    actions = np.concatenate([np.asarray(e["actions"], np.float32).reshape(n, -1)
                              for e, n in zip(episodes, lengths)])
    rewards, states = np.concatenate([e["rewards"] for e in episodes]), np.concatenate(obs)
    for k, x, extra in (("observations", states, 1), ("actions", actions, 0),
                        ("rewards", rewards, 0)):
        ok = np.isfinite(x).reshape(len(x), -1).all(1)
        if not ok.all():  # observations hold one more row per episode than the others
            e = int(np.searchsorted(np.cumsum(lengths + extra), int(np.argmin(ok)), side="right"))
            raise UserError(f"dataset '{dataset_id}' holds values that are not finite (NaN or inf):"
                            f" {int((~ok).sum())} rows of {k}, the first in episode {e}. Repair or "
                            f"drop those episodes")
    low, high = space.low.astype(np.float32), space.high.astype(np.float32)
    excess = np.maximum(actions - high, low - actions)
    outside = (excess > 1e-3 * (high - low) / 2).any(1)  # within 0.1%: rounding, clipped silently
    if outside.any():
        print(f"dataset '{dataset_id}': {int(outside.sum())} of {len(outside)} actions lie outside "
              f"the action space's bounds, by up to {float(excess.max()):.3g}; they are clipped",
              flush=True)
    actions = np.clip((actions - (high + low) / 2) / ((high - low) / 2), -1.0, 1.0)
    # Episode e owns rows starts[e] + e .. starts[e] + e + lengths[e] of the (N + E) states:
    # without each episode's last row they are obs[t], without its first obs[t + 1].
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    last = np.zeros(len(states), dtype=bool)
    last[starts + np.arange(len(lengths)) + lengths] = True
    fingerprint = hashlib.sha256()
    for x in (states, actions, lengths):
        fingerprint.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    meta, task = dataset.storage.metadata, dataset_task(dataset_id)
    if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
        ref = (float(meta["ref_min_score"]), float(meta["ref_max_score"]), "dataset")
    elif dataset_id.startswith("mujoco/") and task in D4RL_REF_SCORES:
        ref = (*D4RL_REF_SCORES[task], "D4RL constants (v2 envs)")
    else:
        ref = (None, None, "none")
    spec_json = meta.get("eval_env_spec")
    eval_env = json.loads(spec_json)["id"] if isinstance(spec_json, str) else spec and spec.id

    def make_env(render_mode=None):
        return dataset.recover_environment(eval_env=True, render_mode=render_mode)

    def t(x):
        return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32, device=device)

    flags = [np.concatenate([e[k] for e in episodes]) for k in ("terminations", "truncations")]
    return OfflineData(dataset_id, t(states[~last]), t(actions), t(rewards),
                       t(states[~np.roll(last, 1)]), t(flags[0]), t(flags[1]), starts, lengths,
                       np.add.reduceat(rewards.astype(np.float64), starts), low, high, *ref,
                       make_env, antmaze, eval_env, fingerprint.hexdigest())


def normalize_obs(data: OfflineData, mean=None, std=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise states and next states in place, by the data's mean and std (+1e-3, as TD3+BC
    and CORL) unless given; returns the two, with which the policy is evaluated."""
    if mean is None:
        mean, std = data.observations.mean(0), data.observations.std(0) + 1e-3
    data.observations = (data.observations - mean) / std
    data.next_observations = (data.next_observations - mean) / std
    data.obs_normalized = True
    return mean, std


RewardTransform = Literal["none", "return-range", "minus-one", "cql-antmaze", "min-max",
                          "plus-five"]


def transform_rewards(data: OfflineData, name: str) -> None:
    """The papers' reward transforms, in place (episode_returns stay as read): return-range
    r * 1000 / (max - min episode return) (IQL, ARQ locomotion), minus-one r - 1 (antmaze),
    cql-antmaze (r - 0.5) * 4, min-max into [0, 1] (BRAC+), plus-five r + 5 (Fisher-BRC)."""
    r, returns = data.rewards, lambda: data.episode_returns
    data.rewards = {
        "none": lambda: r, "minus-one": lambda: r - 1.0, "plus-five": lambda: r + 5.0,
        "return-range": lambda: r * (1000.0 / max(float(returns().max() - returns().min()), 1e-6)),
        "cql-antmaze": lambda: (r - 0.5) * 4.0,
        "min-max": lambda: (r - r.min()) / torch.clamp(r.max() - r.min(), min=1e-6)}[name]()


class Batch(NamedTuple):
    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_observations: torch.Tensor
    terminals: torch.Tensor


class ReplayBuffer:
    """Uniform minibatches, drawn with replacement on the data's device. The fields are one (N, D)
    table, so that a batch is one gather; later changes to `data` are not seen."""

    def __init__(self, data: OfflineData):
        self.data, self.size = data, len(data)
        self.table = torch.cat([data.observations, data.actions, data.rewards[:, None],
                                data.next_observations, data.terminals[:, None]], 1)
        self.widths = [data.obs_dim, data.act_dim, 1, data.obs_dim, 1]

    def sample(self, batch_size: int) -> Batch:
        idx = torch.randint(0, self.size, (batch_size,), device=self.table.device)
        obs, actions, rewards, next_obs, terminals = self.table[idx].split(self.widths, dim=1)
        return Batch(obs, actions, rewards.squeeze(1), next_obs, terminals.squeeze(1))


# --- Evaluation -------------------------------------------------------------------------------
def normalized_score(returns, ref_min: float | None, ref_max: float | None):
    if ref_min is None or ref_max is None:
        return None
    return 100.0 * (np.asarray(returns, dtype=np.float64) - ref_min) / (ref_max - ref_min)


@torch.no_grad()
def evaluate(data: OfflineData, policy: Callable, n_episodes: int, seed: int, obs_mean=None,
             obs_std=None, video: str | None = None) -> dict:
    """`n_episodes` at once in a vector env, episode i from reset(seed + i), one batched call of
    `policy` (standardised states -> actions in [-1, 1]) per step, on torch's CPU stream seeded with
    `seed` (the run's comes back after it). `video`: the first episode as an MP4 at that path."""
    import gymnasium as gym

    make, hook, frames = [data.make_env] * n_episodes, sys.unraisablehook, []
    if video is not None:
        with contextlib.suppress(FileNotFoundError):  # an earlier run's, not this evaluation's
            os.remove(video)
        if sys.platform.startswith("linux"):
            os.environ.setdefault("MUJOCO_GL", "egl")
        make[0] = lambda: data.make_env(render_mode="rgb_array")
        sys.unraisablehook = lambda unraisable: None  # a failed viewer complains when it is freed
    envs = gym.vector.SyncVectorEnv(make)
    returns, lengths = np.zeros(n_episodes), np.zeros(n_episodes, dtype=np.int64)
    done = np.zeros(n_episodes, dtype=bool)
    low, high, device = data.action_low, data.action_high, data.observations.device
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            obs, _ = envs.reset(seed=seed)
            while not done.all():
                o = torch.as_tensor(flatten_obs(obs, data.antmaze), device=device)
                o = o if obs_mean is None else (o - obs_mean) / obs_std
                a = policy(o).clamp(-1.0, 1.0).cpu().numpy()
                action = np.clip(low + (a + 1) / 2 * (high - low), low, high)  # float32 overshoots
                obs, reward, terminated, truncated, _ = envs.step(action)
                if video is not None and not done[0]:
                    try:  # a frame that fails ends the video, with one line; the episode goes on
                        frame = envs.envs[0].render()
                        frames.append(frame[:frame.shape[0] // 2 * 2, :frame.shape[1] // 2 * 2])
                    except Exception as exc:
                        print(f"no video {video}: {type(exc).__name__}: {_first_line(exc)}",
                              flush=True)
                        video = None
                returns += np.where(done, 0.0, reward)
                lengths += ~done
                done |= terminated | truncated
        if video is not None:  # H.264 through imageio's ffmpeg, written beside it and renamed
            import imageio.v2 as imageio

            tmp = os.path.join(os.path.dirname(video), f".tmp-{os.path.basename(video)}")
            os.makedirs(os.path.dirname(video), exist_ok=True)
            fps = envs.envs[0].metadata.get("render_fps") or 30
            imageio.mimwrite(tmp, frames, format="FFMPEG", codec="libx264", fps=fps)
            os.replace(tmp, video)
    finally:
        envs.close()
        if hook is not sys.unraisablehook:
            del envs
            __import__("gc").collect()
            sys.unraisablehook = hook
    scores = normalized_score(returns, data.ref_min_score, data.ref_max_score)
    return {"return_mean": float(returns.mean()), "return_std": float(returns.std()),
            "normalized_score_mean": None if scores is None else float(scores.mean()),
            "normalized_score_std": None if scores is None else float(scores.std()),
            "episode_returns": returns.tolist(), "episode_lengths": lengths.tolist()}


# --- The run folder, <output_dir>/<run_name>/: tensorboard events, results.json, checkpoints ---
# Flags that may differ between a run and its resumption: none changes the steps already trained;
# --total-steps stops or continues the run elsewhere (IQL's actor schedule follows it).
RESUME_FREE_FLAGS = {"run_name", "output_dir", "resume", "track", "wandb_project", "log_every",
                     "save_model", "total_steps", "compile", "capture_video"}


class Run:
    """One run's folder: the same command continues a run from its checkpoint (--resume auto), a
    pretraining phase (in `phases`) too; a finished run is not re-run."""

    def __init__(self, args, algorithm: str, data: OfflineData, phases: tuple[str, ...] = ()):
        from torch.utils.tensorboard import SummaryWriter

        self.args, self.algorithm, self.data, self.phases = args, algorithm, data, (*phases, None)
        name = args.run_name or \
            f"{args.env.replace('/', '__')}__{algorithm}__{args.seed}__{int(time.time())}"
        global _writing_in
        self.dir = _writing_in = os.path.join(args.output_dir, name)
        for f in dataclasses.fields(args):
            v = getattr(args, f.name)
            if f.name.endswith("batch_size") and v is not None and v > len(data):
                raise UserError(f"--{f.name.replace('_', '-')} {v} is larger than the dataset "
                                f"'{data.dataset_id}' ({len(data)} transitions); use at most "
                                f"{len(data)}")
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the run folder {self.dir}: {exc.strerror}") from None
        self.lock = lock_folder(self.dir, "wait for it to end, or pass another --run-name")
        for f in os.listdir(self.dir):  # what a killed write left
            if f.startswith(".tmp-"):
                os.remove(os.path.join(self.dir, f))
        path = os.path.join(self.dir, "results.json")
        try:
            with open(path) as f:
                done = json.load(f)
        except (OSError, ValueError):
            done = None
        finished = isinstance(done, dict) and done.get("finished")
        if args.resume == "never" or finished:
            self.remove_checkpoints()  # a kill after the final results.json left them
        if args.resume == "auto" and finished:
            self.refuse_other_flags(done.get("args"), path)
            print(f"[{algorithm}] {self.dir} holds a finished run: nothing to do (--resume never "
                  f"starts it over)")
            raise SystemExit(0)
        self.saved = self.read_checkpoint() if args.resume == "auto" else None
        self.resumed_at = self.saved and (self.saved["phase"], self.saved["step"])
        phase, at = self.resumed_at or ("", 0)
        if phase is None and at > args.total_steps:  # the main loop's checkpoint: past the end
            raise UserError(f"{self.saved['path']} is at step {at}, past --total-steps "
                            f"{args.total_steps}: pass --total-steps {at} or more")
        self.writers, self.wandb = {}, None
        self.writer = self.writers[None] = SummaryWriter(self.dir, purge_step=self.purge(None))
        if self.saved is None:
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
                f"|{k}|{v}|" for k, v in vars(args).items()))
        if args.track:
            try:
                import wandb
            except ImportError:
                raise UserError("--track needs wandb: pip install wandb") from None
            self.wandb = wandb.init(project=args.wandb_project, name=name, config=vars(args),
                                    sync_tensorboard=True, dir=self.dir)
        device = data.observations.device
        self.results = {
            "algorithm": algorithm, "env": args.env, "seed": args.seed, "args": vars(args),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dataset": {"transitions": len(data), "episodes": len(data.episode_lengths),
                        "ref_min_score": data.ref_min_score, "ref_max_score": data.ref_max_score,
                        "ref_scores_source": data.ref_scores_source, "eval_env": data.eval_env,
                        "episode_return_mean": float(data.episode_returns.mean())},
            "evaluations": [], "final_normalized_score": None, "final_return": None,
            "finished": False, "train_seconds": 0.0}
        if self.saved is None and os.path.exists(path):  # starting over: the last run's results go
            write_json(path, self.results)
        self.last_metrics, self.start, self.signalled = {}, time.time(), None
        self.reset_clock()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, lambda s, frame: setattr(self, "signalled", s))
        print(f"[{algorithm}] {args.env}: {len(data)} transitions, {len(data.episode_lengths)} "
              f"episodes, obs {data.obs_dim}, act {data.act_dim}, device {device}; run dir "
              f"{self.dir}; normalised scores: {data.ref_scores_source}")

    def refuse_other_flags(self, then: dict, path: str) -> None:
        """Flags added since `then` count as their defaults; flags this file no longer has, not."""
        now, then = vars(self.args), then if isinstance(then, dict) else {}
        then = {f.name: then.get(f.name, f.default) for f in dataclasses.fields(self.args)}
        differ = [k for k in now if k not in RESUME_FREE_FLAGS and then[k] != now[k]]
        if differ:
            flags = ", ".join(f"--{k.replace('_', '-')} {then[k]} (now {now[k]})" for k in differ)
            raise UserError(f"{path} was written with other flags: {flags}. Pass another "
                            f"--run-name, or --resume never to start this run over.")

    def remove_checkpoints(self) -> None:
        for name in ("checkpoint.pt", "checkpoint.prev.pt", "checkpoint.damaged.pt"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.dir, name))

    def read_checkpoint(self) -> dict | None:
        damaged = None
        for path in (os.path.join(self.dir, n) for n in ("checkpoint.pt", "checkpoint.prev.pt")):
            try:
                saved = load_file(path) if os.path.exists(path) else None
                saved and (saved["step"], saved["phase"], saved["agent"], saved["rng"])
            except (UserError, KeyError) as exc:
                why = exc if isinstance(exc, UserError) else f"{path} is no checkpoint"
                print(f"[{self.algorithm}] {why}; trying the previous one", flush=True)
                damaged = damaged or path
                continue
            if saved:
                self.refuse_other_flags(saved.get("args"), path)
                if damaged:  # set aside: the next checkpoint would rotate it over this good one
                    os.replace(damaged, os.path.join(self.dir, "checkpoint.damaged.pt"))
                return {**saved, "path": path}
        return None

    def purge(self, phase: str | None) -> int | None:
        """The events this run logs again are dropped: the resumed phase's after its checkpoint,
        every later phase's, and a run that starts over all of them."""
        if not self.resumed_at or self.resumed_at[0] not in self.phases:
            return 0
        (resumed, step), order = self.resumed_at, self.phases.index
        return step + 1 if phase == resumed else 0 if order(phase) > order(resumed) else None

    def log(self, step: int, metrics: dict, phase: str | None = None) -> None:
        """Write the scalars (a device sync); a pretraining phase's also as a console line, and to
        <run dir>/<phase>/, a tensorboard run of its own (its steps count from 1)."""
        from torch.utils.tensorboard import SummaryWriter

        values = {k: float(v) for k, v in metrics.items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            self.diverged(step, f"{', '.join(bad)} became {values[bad[0]]}", phase)
        if phase not in self.writers:
            folder = os.path.join(self.dir, phase.lower().replace(" ", "_"))
            self.writers[phase] = SummaryWriter(folder, purge_step=self.purge(phase))
        for k, v in values.items():
            self.writers[phase].add_scalar(k, v, step)
        if phase is None:
            self.writer.add_scalar("charts/SPS", self.sps(step), step)
            self.last_metrics = values
        else:
            print(f"{phase} step {step} | {self.sps(step):.0f} SPS | " + " ".join(
                f"{k.split('/')[-1]} {v:.3g}" for k, v in values.items()), flush=True)

    def reset_clock(self, step: int = 0) -> None:
        """Steps per second, ETA and training time count afresh from `step`."""
        self.train_before = self.results["train_seconds"]
        self.clock, self.clock_step, self.eval_time = time.time(), step, 0.0

    def sps(self, step: int) -> float:
        return (step - self.clock_step) / max(time.time() - self.clock - self.eval_time, 1e-9)

    def train_seconds(self) -> float:
        return self.train_before + time.time() - self.clock - self.eval_time

    def diverged(self, step: int, what: str, phase: str | None) -> None:
        where = f" of the {phase} phase" if phase else ""
        raise UserError(f"{what} at step {step}{where}: training diverged. Its last checkpoint is "
                        f"kept, and resuming repeats it: start over with other flags (a lower "
                        f"learning rate, another --seed) and another --run-name")

    def evaluate(self, step: int, policy: Callable, obs_mean=None, obs_std=None) -> dict:
        """Evaluate `policy` (the last time over --final-episodes where given), log it and rewrite
        results.json. --capture-video records the last evaluation's first episode in videos/."""
        t0, args, last = time.time(), self.args, step == self.args.total_steps
        video = os.path.join(self.dir, "videos", f"step_{step}.mp4") \
            if args.capture_video and last else None
        episodes = args.final_episodes if last and args.final_episodes else args.eval_episodes
        evaluation = evaluate(self.data, policy, episodes, args.seed, obs_mean, obs_std, video)
        if video is not None and not os.path.exists(video):
            video = None
            print(f"[{self.algorithm}] --capture-video: the eval env did not render here; training "
                  f"goes on without video (MUJOCO_GL=egl or osmesa renders MuJoCo without a "
                  f"display)", flush=True)
        if not math.isfinite(evaluation["return_mean"]):
            self.diverged(step, f"the evaluation's return became {evaluation['return_mean']}", None)
        self.eval_time += time.time() - t0
        video = {"video": os.path.relpath(video, self.dir)} if video else {}
        self.results["evaluations"].append({"step": step, **evaluation, **video,
                                            "wall_time": time.time() - self.start})
        self.results["train_seconds"] = self.train_seconds()
        write_json(os.path.join(self.dir, "results.json"), self.results)
        score, eta = evaluation["normalized_score_mean"], int((args.total_steps - step)
                                                              / max(self.sps(step), 1e-9))
        self.writer.add_scalar("eval/return", evaluation["return_mean"], step)
        line = [f"step {step}/{args.total_steps}", f"{self.sps(step):.0f} SPS",
                f"ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}",
                " ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in self.last_metrics.items()
                         if k.startswith("losses/")),
                f"return {evaluation['return_mean']:.1f} ± {evaluation['return_std']:.1f}"]
        if score is not None:
            self.writer.add_scalar("eval/normalized_score", score, step)
            line.append(f"score {score:.1f} ± {evaluation['normalized_score_std']:.1f}")
        print(" | ".join(x for x in line if x), flush=True)
        return evaluation

    def checkpoint(self, step: int, agent, phase: str | None = None) -> None:
        """All that continuing after `step` of `phase` (None: the main loop) needs, with a checksum,
        atomically; the previous one is kept (a reader falls back to it). Weights that are not
        finite are never written: the run stops, keeping the last good one."""
        state, path = training_state(agent), os.path.join(self.dir, "checkpoint.pt")
        floats = [t for t in _tensors(state) if t.is_floating_point()]
        if floats and not torch.stack([t.isfinite().all() for t in floats]).all():
            self.diverged(step, "the weights stopped being finite", phase)
        payload = {"step": step, "phase": phase, "args": dict(vars(self.args)), "agent": state,
                   "rng": rng_states(self.data.observations.device),
                   "evaluations": self.results["evaluations"],
                   "train_seconds": self.train_seconds(), "wall_time": time.time() - self.start}
        if os.path.exists(path):
            os.replace(path, os.path.join(self.dir, "checkpoint.prev.pt"))
        save_file(path, payload)

    def resume(self, agent, phase: str | None = None, steps: int = 0) -> int:
        """Restore `agent`, the random streams and the evaluations from a checkpoint of `phase`, and
        return the step to continue after (0: the start). One of a later phase holds this phase's
        result: the agent takes it and `steps` (the phase's length) is returned, so that the phase
        is skipped; one of an earlier phase is left alone."""
        saved = self.saved
        theirs = self.phases.index(saved["phase"]) if saved and saved["phase"] in self.phases \
            else -1
        if theirs < self.phases.index(phase):
            return 0
        load_training_state(agent, saved["agent"])
        if theirs > self.phases.index(phase):
            return steps
        set_rng_states(saved["rng"], self.data.observations.device)
        self.start -= saved["wall_time"]
        if phase is None:
            self.results["evaluations"] = saved["evaluations"]
            self.results["train_seconds"] = saved["train_seconds"]
        self.reset_clock(saved["step"])
        print(f"[{self.algorithm}] resuming{f' the {phase} phase' if phase else ''} from step "
              f"{saved['step']} ({saved['path']})", flush=True)
        self.saved = None
        return saved["step"]

    def stop_if_signalled(self, step: int, agent, phase: str | None = None) -> None:
        """After every step: once SIGTERM, SIGINT or SIGUSR1 has come, checkpoint and exit."""
        if self.signalled is not None:
            self.checkpoint(step, agent, phase)
            self.exit(f"step {step}{f' of the {phase} phase' if phase else ''}; checkpoint written")

    def exit(self, what: str) -> None:
        """End the process after a signal, once `what` (what was saved) is said: 128 + signal."""
        self.close()
        print(f"[{self.algorithm}] stopped by {signal.Signals(self.signalled).name} after {what}; "
              f"the same command resumes the run", flush=True)
        raise SystemExit(128 + self.signalled)

    def pretraining_step(self, step: int, agent, phase: str) -> None:
        """After every step of a pretraining phase: a checkpoint every --eval-every steps, the
        stop on a signal."""
        if step % self.args.eval_every == 0:
            self.checkpoint(step, agent, phase)
        self.stop_if_signalled(step, agent, phase)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def finish(self, model: dict | None = None) -> None:
        """results.json says finished; with --save-model, model.pt holds `model` with the args, the
        sizes and the action bounds, as CPU tensors and plain values, with a checksum."""
        data, last = self.data, (self.results["evaluations"] or [{}])[-1]
        self.results.update(final_return=last.get("return_mean"), finished=True,
                            final_normalized_score=last.get("normalized_score_mean"),
                            train_seconds=self.train_seconds())
        if model is not None and self.args.save_model:
            save_file(os.path.join(self.dir, "model.pt"), _on_cpu({
                "algorithm": self.algorithm, "args": dict(vars(self.args)), "obs_dim": data.obs_dim,
                "act_dim": data.act_dim, "action_low": data.action_low.tolist(),
                "action_high": data.action_high.tolist(), **model}))
        write_json(os.path.join(self.dir, "results.json"), self.results)
        self.remove_checkpoints()
        self.close()
        if self.wandb is not None:
            self.wandb.finish()
        print(f"[{self.algorithm}] done: final return {self.results['final_return']}, normalised "
              f"score {self.results['final_normalized_score']}; results in {self.dir}")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (dict, list, tuple)):
        for v in value.values() if isinstance(value, dict) else value:
            yield from _tensors(v)


def _on_cpu(value):
    if isinstance(value, (dict, list, tuple)):
        return {k: _on_cpu(v) for k, v in value.items()} if isinstance(value, dict) else \
            [_on_cpu(v) for v in value]
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def training_state(agent) -> dict:
    """What training changes in an agent: its networks', optimisers' and schedulers' state dicts
    (also in lists), its tensors and its numbers."""
    state = {}
    for name, v in vars(agent).items():
        if hasattr(v, "state_dict"):
            state[name] = v.state_dict()
        elif isinstance(v, list) and v and all(hasattr(x, "state_dict") for x in v):
            state[name] = [x.state_dict() for x in v]
        elif isinstance(v, (torch.Tensor, bool, int, float)):
            state[name] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return state


def load_training_state(agent, state: dict) -> None:
    unknown = [name for name in state if not hasattr(agent, name)]
    if unknown:
        print(f"the checkpoint's {', '.join(unknown)} has no place in this file's agent; not "
              f"restored", flush=True)
    for name in set(state) - set(unknown):
        v, saved = getattr(agent, name), state[name]
        if hasattr(v, "load_state_dict"):
            v.load_state_dict(saved)
        elif isinstance(v, list):
            for item, item_state in zip(v, saved):
                item.load_state_dict(item_state)
        elif isinstance(v, torch.Tensor):
            with torch.no_grad():  # in place: the optimisers hold these very tensors
                v.copy_(saved)
        else:
            setattr(agent, name, saved)


def rng_states(device: torch.device) -> dict:
    """Python's, numpy's and torch's random streams (on CUDA the run device's alone), as types that
    load as weights only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_states(states: dict, device: torch.device) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


class Policy(torch.nn.Module):
    """A trained policy apart from its agent (tools/evaluate.py): the networks the file's `act`
    reads, under the agent's names, and `act` called on this object; a file's make_policy builds
    it and `load(saved)` fills it from a model.pt's state dicts."""

    def __init__(self, act: Callable, args, **networks):
        super().__init__()
        self.act_function, self.args = act, args
        for name, network in networks.items():
            setattr(self, name, network)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.act_function(self, obs)

    def load(self, saved: dict) -> Policy:
        for name, network in self.named_children():
            network.load_state_dict(saved[name])
        return self


# --- Speed (docs/speed.md): --precision, --compile, ensembles --------------------------------
Precision = Literal["fp32", "tf32", "bf16"]


def autocast(step: Callable, precision: str, device: torch.device) -> Callable:
    """A training step under --precision. tf32: TF32 matrix products on CUDA GPUs from Ampere on,
    process-wide (nothing changes on a CPU). bf16: the step under torch.autocast(bfloat16), where
    weights, gradients and optimiser states stay fp32 and output layers compute in fp32."""
    if precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if precision != "bf16":
        return step
    if device.type == "cuda":
        with torch.cuda.device(device):
            if not torch.cuda.is_bf16_supported(including_emulation=False):
                raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no "
                                f"native bfloat16 support; use --precision fp32")

    def bf16_step(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return step(*args, **kwargs)

    return bf16_step


def _fp32_output(x: torch.Tensor) -> bool:
    kind = x.device.type
    # the check that the device has autocast (the meta device has none) stays out of compiled
    # graphs: torch 2.11's Dynamo cannot trace it, and torch.compile runs on cuda or cpu
    available = torch.compiler.is_compiling() or torch.amp.is_autocast_available(kind)
    return available and torch.is_autocast_enabled(kind)


class OutputLinear(torch.nn.Linear):
    """nn.Linear for an output layer: in fp32 under --precision bf16 (Q values, log-stds)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fp32_output(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(x.float(), self.weight, self.bias)


class EnsembleLinear(torch.nn.Module):
    """E linear layers on an (E, N, in) batch as one batched matmul (twin critics cost one kernel
    per layer), each initialised as nn.Linear(in, out); weight is (E, in, out). `member=i` maps
    (N, in) through member i alone. `output=True`: in fp32 under --precision bf16."""

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
        if self.output and _fp32_output(x):
            with torch.autocast(x.device.type, enabled=False):
                return product(bias, x.float(), weight)
        return product(bias, x, weight)


class EnsembleMLP(torch.nn.Sequential):
    """EnsembleLinear and ReLU layers; `forward(x, member=i)` runs member i alone."""

    def forward(self, x: torch.Tensor, member: int | None = None) -> torch.Tensor:
        for layer in self:
            x = layer(x, member) if isinstance(layer, EnsembleLinear) else layer(x)
        return x


def ensemble_mlp(n: int, in_dim: int, out_dim: int, hidden_dim: int, n_hidden: int) -> EnsembleMLP:
    """n networks of n_hidden ReLU layers and a linear output, evaluated together on (n, N, in)."""
    layers, d = [], in_dim
    for _ in range(n_hidden):
        layers += [EnsembleLinear(n, d, hidden_dim), torch.nn.ReLU()]
        d = hidden_dim
    return EnsembleMLP(*layers, EnsembleLinear(n, d, out_dim, output=True))


def compiled(loss: Callable, enabled: bool) -> Callable:
    """With --compile, `loss` (one network update's forward passes and loss) as one graph, a break
    inside an error (fullgraph); the step around it and fused Adam stay eager."""
    return torch.compile(loss, fullgraph=True) if enabled else loss


# --- Pretrained models: behaviour models that take an hour are cached, not trained again -------
def pretraining_key(args, fields: tuple[str, ...], data: OfflineData, recipe: tuple = ()) -> str:
    """A hash of what a pretrained model depends on: the dataset id and contents, whether states
    are standardised, the named flags, `recipe` (the file's words for how it is trained) and a
    precision other than fp32; nothing the device changes."""
    h = hashlib.sha256(f"{args.env} {data.fingerprint} normalised={data.obs_normalized}".encode())
    h.update(repr([(f, getattr(args, f)) for f in fields]).encode())
    h.update(repr(recipe).encode() if recipe else b"")
    precision = getattr(args, "precision", "fp32")
    h.update(f"precision={precision}".encode() if precision != "fp32" else b"")
    return h.hexdigest()[:20]


@contextlib.contextmanager
def separate_rng(seed: int, device: torch.device):
    """A block with a torch random stream of its own, seeded with `seed`; the run's comes back after
    it, so that a run that reads the model from its cache goes on as one that trained it."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def load_cache(path: str, device) -> dict | None:
    """A cache file's contents; None if it is absent, damaged or foreign (with a notice)."""
    try:
        return load_file(path, device) if os.path.exists(path) else None
    except UserError as exc:
        print(f"cache: {exc}; building it again", flush=True)


def save_cache(path: str, obj: dict) -> None:
    """A cache that cannot be written only costs the next run the time to build it: a notice."""
    try:
        save_file(path, obj)
    except UserError as exc:
        print(f"{exc}; continuing without caching it", flush=True)


def load_pretrained(path: str, modules: dict, device) -> bool:
    """The modules' state dicts from a cache file; False (the caller trains them, and no module
    changed) if there is none or it does not fit."""
    state = load_cache(path, device)
    shapes = lambda sd: {k: getattr(v, "shape", None) for k, v in sd.items()}  # noqa: E731
    if state is not None and not all(isinstance(state.get(name), dict) and shapes(state[name])
                                     == shapes(m.state_dict()) for name, m in modules.items()):
        print(f"cache {path} does not fit these networks; training them again", flush=True)
        state = None
    if state is None:
        return False
    for name, m in modules.items():
        m.load_state_dict(state[name])
    print(f"reusing the cached pretrained model {path}", flush=True)
    return True


def save_pretrained(path: str, modules: dict) -> None:
    save_cache(path, {name: m.state_dict() for name, m in modules.items()})
