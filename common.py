"""What every file in algorithms/ needs while it trains, and nothing algorithmic: copy a file and
this one, and it runs. Nothing of this repository is imported (a local/* dataset that is not built
yet is built by tools/make_dataset.py where the repository is there). In order: errors and files
(a script's `UserError` is one line; checksummed torch files that load as weights only), flags,
devices and seeds, data (Minari ids, D4RL's HDF5 files, local/* builds; transforms; the replay
buffer), evaluation, the run folder (`Run`: tensorboard, results.json, checkpoints and resuming,
signals, model.pt), speed (--precision, --compile, --cuda-graphs: docs/speed.md) and the caches
of pretrained models.
"""

from __future__ import annotations

import contextlib
import copy
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
import tempfile
import time
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------
# Errors and files
# ----------------------------------------------------------------------------------------------
class UserError(Exception):
    """A problem with the user's input or files: printed as one line, without a traceback."""


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_writing_in = "the run folder"  # named when a write of tensorboard's is refused


def install_user_error_hook() -> None:
    """An uncaught UserError, or a write the disk refused, ends the script with one line."""
    import threading

    def hook(kind, exc, tb):
        if issubclass(kind, UserError):
            print(f"error: {exc}", file=sys.stderr)
        elif isinstance(exc, OSError) and exc.errno in _FULL:
            print(f"error: could not write {exc.filename or 'in ' + _writing_in}: {exc.strerror}",
                  file=sys.stderr)
        else:
            sys.__excepthook__(kind, exc, tb)

    sys.excepthook = hook  # tensorboard's thread: its error comes again in the main thread
    threading.excepthook = lambda a: None if getattr(a.exc_value, "errno", 0) in _FULL \
        else threading.__excepthook__(a)


def atomic_write(path: str, payload: bytes) -> None:
    """Write a temporary file beside `path`, then rename it: nobody sees half a file, and a
    failure keeps the old file and is one line naming it."""
    folder, tmp = os.path.dirname(os.path.abspath(path)), None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's files are private; results are for sharing
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
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
            for k, x in (v.items() if isinstance(v, dict) else enumerate(v)):
                h.update(repr(k).encode())
                walk(x)
        else:
            h.update(repr(v).encode())

    walk(value)
    return h.hexdigest()


def save_file(path: str, obj: dict) -> None:
    """torch.save of `obj` (tensors, numbers, strings, lists, dicts) and its checksum, atomically."""
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
                        f"{_first_line(exc)}); it is damaged or not a file of this library") from None
    if not isinstance(obj, dict) or "sha256" not in obj:
        raise UserError(f"{path} is not a file of this library (it has no checksum)")
    if digest({k: v for k, v in obj.items() if k != "sha256"}) != obj.pop("sha256"):
        raise UserError(f"{path} is damaged: its contents do not match their checksum")
    return obj


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:150]


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
    f.write(f"pid {os.getpid()} on {__import__('socket').gethostname()}")
    f.flush()
    return f


# ----------------------------------------------------------------------------------------------
# Flags (checked right after parsing: one line, not a traceback after the dataset loaded), devices
# ----------------------------------------------------------------------------------------------
def _given(args, names):
    for name in names:
        if getattr(args, name) is not None:  # None: a per-domain default, chosen later
            yield "--" + name.replace("_", "-"), getattr(args, name)


def check_positive(args, *names: str) -> None:
    """Counts, periods, sizes (at least 1) and rates, scales (above 0)."""
    for flag, v in _given(args, names):
        if v <= 0:
            raise UserError(f"{flag} must be {'at least 1' if isinstance(v, int) else 'above 0'}, "
                            f"got {v}")


def check_nonnegative(args, *names: str) -> None:
    for flag, v in _given(args, names):
        if v < 0:
            raise UserError(f"{flag} must be 0 or more, got {v}")


def check_interval(args, name: str, low: float, high: float, bounds: str = "[)") -> None:
    """low <= or < the value <= or < high, as `bounds` says ("[)": low included, high not)."""
    for flag, v in _given(args, (name,)):
        if not ((v >= low if bounds[0] == "[" else v > low)
                and (v <= high if bounds[1] == "]" else v < high)):
            raise UserError(f"{flag} must be in {bounds[0]}{low}, {high}{bounds[1]}, got {v}")


def check_seed(args, *names: str) -> None:
    for name in names:  # numpy's and Gymnasium's seeds are unsigned 32-bit
        check_interval(args, name, 0, 2**32 - 1, "[]")


def check_output_dir(path: str, flag: str = "--output-dir") -> None:
    """`path` is a folder this process can write in, or can make."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} cannot be a folder written here: {existing} is "
                        f"{'a file' if not os.path.isdir(existing) else 'not writable'}")


def check_args(args) -> None:
    """The flags every file shares, and every float (finite)."""
    for field in dataclasses.fields(args):
        v = getattr(args, field.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"--{field.name.replace('_', '-')} must be a finite number, got {v}")
    check_positive(args, "total_steps", "batch_size", "eval_every", "eval_episodes", "log_every",
                   "video_every")
    if args.video_every is not None and not args.capture_video:
        raise UserError("--video-every says which evaluations --capture-video records; add "
                        "--capture-video")
    check_seed(args, "seed")
    if args.run_name is not None and (args.run_name in ("", ".", "..") or "/" in args.run_name):
        raise UserError(f"--run-name {args.run_name!r} must be one folder name, without '/'")
    check_output_dir(args.output_dir)


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" \
            else torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device torch knows; use auto, cpu, cuda or "
                        f"cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s), numbered from 0")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def flush_denormals() -> None:
    """Denormal floats count as zero on the CPU: a temperature decaying towards zero (~1e-40)
    would make every matmul it touches ten times slower (docs/results.md, "Speed")."""
    torch.set_flush_denormal(True)


# ----------------------------------------------------------------------------------------------
# Data (docs/datasets.md; conventions in docs/implementation_notes.md)
# ----------------------------------------------------------------------------------------------
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
    ref_scores_source: str  # "dataset", "D4RL constants (v2 envs)", "D4RL constants" or "none"
    make_env: Callable  # make_env(render_mode=None): the evaluation env
    antmaze: bool  # Dict observations flattened with achieved_goal first (flatten_obs)
    source: str  # where the data came from
    eval_env: str | None
    fingerprint: str = ""  # sha256 of the states, actions and episode lengths as read (cache keys)
    obs_normalized: bool = False

    obs_dim = property(lambda self: self.observations.shape[1])
    act_dim = property(lambda self: self.actions.shape[1])
    __len__ = lambda self: self.observations.shape[0]  # noqa: E731


# D4RL's reference returns (random, expert), measured on the v2 MuJoCo envs and Adroit v0
D4RL_REF_SCORES = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3),
                   "walker2d": (1.629008, 4592.3), "ant": (-325.6, 3879.7),
                   "pen": (96.262799, 3076.8331017826877), "door": (-56.512833, 2880.5693087298737),
                   "hammer": (-274.856578, 12794.134825156867),
                   "relocate": (-6.425911, 4233.877797728884)}
# The envs D4RL's files are evaluated in, with D4RL's time limits: v4 has D4RL's MuJoCo models
# and observations (v5 changed rewards and Walker2d's friction); Adroit's reward differs from D4RL's
D4RL_EVAL_ENVS = {"halfcheetah": ("HalfCheetah-v4", 1000), "hopper": ("Hopper-v4", 1000),
                  "walker2d": ("Walker2d-v4", 1000), "pen": ("AdroitHandPen-v1", 100),
                  "hammer": ("AdroitHandHammer-v1", 200), "door": ("AdroitHandDoor-v1", 200),
                  "relocate": ("AdroitHandRelocate-v1", 200)}


def d4rl_files() -> dict[str, str]:
    """D4RL dataset name -> its file's path below rail.eecs.berkeley.edu/datasets/offline_rl/."""
    paths = {}
    for task in ("halfcheetah", "hopper", "walker2d"):
        for kind in ("random", "medium", "expert", "medium_replay", "medium_expert", "full_replay"):
            name = f"{task}-{kind.replace('_', '-')}"
            paths[name + "-v2"] = f"gym_mujoco_v2/{task}_{kind}-v2.hdf5"
            if kind != "full_replay":  # v0's medium-replay is "<task>_mixed", "walker_mixed"
                mixed = task.replace("walker2d", "walker") + "_mixed"
                paths[name + "-v0"] = f"gym_mujoco/{mixed if kind == 'medium_replay' else task + '_' + kind}.hdf5"
    for task in ("pen", "hammer", "door", "relocate"):
        paths |= {f"{task}-human-v0": f"hand_dapg/{task}-v0_demos_clipped.hdf5",
                  f"{task}-cloned-v0": f"hand_dapg/{task}-demos-v0-bc-combined.hdf5",
                  f"{task}-expert-v0": f"hand_dapg/{task}-v0_expert_clipped.hdf5"}
        paths |= {f"{task}-{k}-v1": f"hand_dapg_v1/{task}-{k}-v1.hdf5" for k in ("human", "cloned",
                                                                                 "expert")}
    return paths


def d4rl_name(dataset_id: str) -> str | None:
    """D4RL's name of `d4rl/<name>` or of a path to one of its files ("" for another .hdf5 file);
    None for other ids (Minari's `D4RL/<task>/<name>` ports have two slashes)."""
    if dataset_id.endswith(".hdf5"):
        return {p.rsplit("/", 1)[1]: n for n, p in d4rl_files().items()}.get(
            os.path.basename(dataset_id), "")
    if dataset_id.lower().startswith("d4rl/") and dataset_id.count("/") == 1:
        return dataset_id.split("/", 1)[1]
    return None


def dataset_task(dataset_id: str) -> str:
    """The task of an id, lower-cased: 'D4RL/pen/human-v2' -> 'pen', 'd4rl/hopper-medium-v2' ->
    'hopper'. Per-domain settings match it exactly, so that 'pendulum' is not 'pen'."""
    name, parts = d4rl_name(dataset_id), dataset_id.lower().split("/")
    return name.split("-")[0].lower() if name else parts[-2] if len(parts) > 1 else parts[0].split("-")[0]


def is_antmaze(dataset_id: str) -> bool:
    return dataset_task(dataset_id) == "antmaze"


def _read_d4rl(dataset_id: str):
    """One of D4RL's files, with h5py, as d4rl.qlearning_dataset made transitions: the next state
    from the file's next_observations, or else from the next row, dropping the timeouts' and the
    last row's transitions; without timeouts in the file, one every time limit."""
    import gymnasium as gym
    import h5py

    name, files = d4rl_name(dataset_id), d4rl_files()
    task = name.split("-")[0]
    if name not in files:
        raise UserError(f"'{dataset_id}' is not a D4RL dataset read here: d4rl/<name> (or a file "
                        f"named as D4RL names it) takes {{halfcheetah,hopper,walker2d}}-<kind>-v0/v2 "
                        f"and {{pen,hammer,door,relocate}}-{{human,cloned,expert}}-v0/v1; for antmaze "
                        f"and kitchen use Minari's ports (D4RL/antmaze/..., D4RL/kitchen/...)")
    dirs = [os.path.expanduser(d) for d in (os.environ.get("D4RL_DATASET_DIR"), "~/.d4rl/datasets") if d]
    path = dataset_id if dataset_id.endswith(".hdf5") else next(
        (p for p in (os.path.join(d, files[name].rsplit("/", 1)[1]) for d in dirs) if os.path.isfile(p)),
        os.path.join(dirs[0], files[name].rsplit("/", 1)[1]))
    url = "http://rail.eecs.berkeley.edu/datasets/offline_rl/" + files[name]
    if dataset_id.endswith(".hdf5") and not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    if not os.path.isfile(path):
        raise UserError(f"D4RL's file for '{dataset_id}' is not in {' or '.join(dirs)}: download "
                        f"{url} there (or set D4RL_DATASET_DIR)")
    try:
        with h5py.File(path, "r") as f:
            get = {k: np.asarray(f[k]) for k in ("observations", "actions", "rewards", "terminals",
                                                   "timeouts", "next_observations") if k in f}
        obs, actions = get["observations"].astype(np.float32), get["actions"].astype(np.float32)
        rewards, terminals = get["rewards"].reshape(-1), get["terminals"].reshape(-1).astype(bool)
    except (OSError, KeyError, ValueError, MemoryError) as exc:
        raise UserError(f"{path} is not a whole D4RL file ({type(exc).__name__}: {_first_line(exc)}); "
                        f"download it again from {url}") from None
    n, (env_id, limit) = len(rewards), D4RL_EVAL_ENVS[task]
    first = np.maximum.accumulate(np.where(np.r_[True, terminals[:-1]], np.arange(n), 0))
    timeouts = get["timeouts"].reshape(-1).astype(bool) if "timeouts" in get else \
        (np.arange(n) - first) % limit == limit - 1
    next_obs = get.get("next_observations")
    if not len(obs) == len(actions) == len(terminals) == len(timeouts) == n or next_obs is not None \
            and next_obs.shape != obs.shape:
        raise UserError(f"{path} holds {n} rewards but {len(obs)} observations, {len(actions)} "
                        f"actions and {len(terminals)} terminals")
    keep = np.ones(n, dtype=bool)
    if next_obs is None:
        keep, next_obs = ~timeouts, np.concatenate([obs[1:], obs[-1:]])
        keep[-1] = False
    i = np.flatnonzero(keep)
    if not len(i):
        raise UserError(f"{path} holds no transitions")
    # episodes end at terminals, timeouts, dropped rows and next states that are not the next row's
    ends = np.r_[terminals[i[:-1]] | timeouts[i[:-1]] | (i[1:] != i[:-1] + 1)
                 | np.any(next_obs[i[:-1]] != obs[i[:-1] + 1], axis=1), True]
    at = np.flatnonzero(ends)
    states = np.empty((len(i) + len(at), obs.shape[1]), dtype=np.float32)
    states[np.arange(len(i)) + np.cumsum(ends) - ends] = obs[i]
    states[at + np.arange(len(at)) + 1] = next_obs[i[at]]
    if task in ("pen", "hammer", "door", "relocate"):
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)

    def make_env(render_mode=None):
        import warnings

        with warnings.catch_warnings():  # "v4 is out of date": chosen on purpose
            warnings.filterwarnings("ignore", message=".*out of date.*")
            return gym.make(env_id, max_episode_steps=limit, render_mode=render_mode)

    arrays = {"observations": states, "actions": actions[i], "rewards": rewards[i],
              "terminals": terminals[i], "timeouts": ends & ~terminals[i], "lengths": np.diff(np.r_[-1, at])}
    return arrays, make_env, (*D4RL_REF_SCORES[task], "D4RL constants"), env_id, f"D4RL file {path}"


def _read_minari(dataset_id: str):
    """A Minari dataset: the local copy (a local/* id is built on first use where the repository's
    tools/ are), else a download."""
    import minari

    stored = os.path.isdir(os.path.join(minari.storage.get_dataset_path(dataset_id), "data"))
    tools = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools")
    builder = os.path.isfile(os.path.join(tools, "make_dataset.py"))
    if dataset_id.startswith("local/") and (builder or not stored):  # it checks, under a lock
        if not builder:
            raise UserError(f"dataset '{dataset_id}' is not built here: build it with `python tools/"
                            f"make_dataset.py --id {dataset_id}` in the library's repository")
        if tools not in sys.path:
            sys.path.append(tools)
        from make_dataset import build_local_dataset  # under a lock: waits for another builder

        build_local_dataset(dataset_id)
        stored = True
    try:
        dataset = minari.load_dataset(dataset_id, download=not stored)
        episodes = list(dataset.storage.get_episodes(dataset.episode_indices))
    except Exception as exc:  # json's, h5py's, pyarrow's, the network's
        import difflib

        close = [] if stored else difflib.get_close_matches(dataset_id, list(minari.list_local_datasets()))
        raise UserError(f"dataset '{dataset_id}' could not be read ({type(exc).__name__}: "
                        f"{_first_line(exc)}); " + (
                            f"it is damaged: delete {minari.storage.get_dataset_path(dataset_id)} and "
                            f"build or download it again" if stored
                            else "without network, run `minari download <id>` elsewhere and copy it "
                                 "into MINARI_DATASETS_PATH; `minari list local` lists what is here")
                        + (f"; close local ids: {', '.join(close)}" if close else "")) from None
    spec = dataset.env_spec
    antmaze = spec.name.startswith("AntMaze") if spec is not None else is_antmaze(dataset_id)
    if any(len(flatten_obs(e["observations"], antmaze)) != len(e["rewards"]) + 1 for e in episodes):
        raise UserError(f"dataset '{dataset_id}' is malformed: an episode does not hold one more "
                        f"observation than actions")
    arrays = {"observations": [flatten_obs(e["observations"], antmaze) for e in episodes],
              "actions": [np.asarray(e["actions"], np.float32).reshape(len(e["rewards"]), -1)
                          for e in episodes],
              **{k: [e[m] for e in episodes] for k, m in (("rewards", "rewards"), ("terminals",
                 "terminations"), ("timeouts", "truncations"))}}
    arrays = {k: np.concatenate(v) if v else np.zeros((0, 1)) for k, v in arrays.items()}
    arrays["lengths"] = np.array([len(e["rewards"]) for e in episodes], dtype=np.int64)
    meta = dataset.storage.metadata
    if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
        ref = (float(meta["ref_min_score"]), float(meta["ref_max_score"]), "dataset")
    elif dataset_id.startswith("mujoco/") and dataset_task(dataset_id) in D4RL_REF_SCORES:
        ref = (*D4RL_REF_SCORES[dataset_task(dataset_id)], "D4RL constants (v2 envs)")
    else:
        ref = (None, None, "none")
    eval_env = json.loads(meta["eval_env_spec"])["id"] if isinstance(meta.get("eval_env_spec"), str) \
        else spec and spec.id

    def make_env(render_mode=None):
        return dataset.recover_environment(eval_env=True, render_mode=render_mode)

    return arrays, make_env, ref, eval_env, "minari", dataset, antmaze


def flatten_obs(obs, antmaze: bool = False) -> np.ndarray:
    """A goal-conditioned Dict observation as concat(observation, desired_goal); for AntMaze
    achieved_goal first: its torso x, y, which D4RL's antmaze states started with, are only there."""
    if isinstance(obs, dict):
        keys = ("achieved_goal",) * antmaze + ("observation", "desired_goal")
        obs = np.concatenate([obs[k] for k in keys], axis=-1)
    return np.asarray(obs, dtype=np.float32)


def load_dataset(dataset_id: str, device="cpu") -> OfflineData:
    """Any dataset id as flat float32 tensors on `device`, checked: values that are not finite are
    refused, empty episodes dropped and actions beyond the Box clipped, each with one line; actions
    are rescaled from the Box to [-1, 1] (evaluate maps them back)."""
    from gymnasium import spaces

    if d4rl_name(dataset_id) is not None:
        arrays, make_env, ref, eval_env, source = _read_d4rl(dataset_id)
        env, antmaze = make_env(), False
        space, obs_space = env.action_space, env.observation_space
        env.close()
        if (arrays["observations"].shape[1], arrays["actions"].shape[1]) != (obs_space.shape[0],
                                                                         space.shape[0]):
            raise UserError(f"{source} does not fit {eval_env} ({obs_space.shape[0]} observations, "
                            f"{space.shape[0]} actions): it holds {arrays['observations'].shape[1]} "
                            f"and {arrays['actions'].shape[1]}")
    else:
        arrays, make_env, ref, eval_env, source, dataset, antmaze = _read_minari(dataset_id)
        space, obs_space = dataset.action_space, dataset.observation_space
    keys = ("achieved_goal",) * antmaze + ("observation", "desired_goal")
    if not isinstance(space, spaces.Box) or len(space.shape) != 1 or not np.all(
            np.isfinite(space.low) & np.isfinite(space.high) & (space.high > space.low)):
        raise UserError(f"dataset '{dataset_id}' has action space {space}; these algorithms need a "
                        f"1-D Box with finite bounds (continuous control)")
    if not (isinstance(obs_space, spaces.Box) and len(obs_space.shape) == 1
            or isinstance(obs_space, spaces.Dict) and set(keys) <= set(obs_space.spaces)):
        raise UserError(f"dataset '{dataset_id}' has observation space {obs_space}; only flat Box or "
                        f"goal-conditioned Dict observations ({', '.join(keys)}) are supported")
    lengths = arrays["lengths"]

    def where(row, extra):  # episode and step of a row (observations have one more per episode)
        ends = np.cumsum(lengths + extra)
        e = int(np.searchsorted(ends, row, side="right"))
        return f"episode {e}, step {row - (ends[e] - lengths[e] - extra)}"

    bad = [f"{int((~ok).sum())} rows of {k} (first at {where(int(np.argmin(ok)), k == 'observations')})"
           for k in ("observations", "actions", "rewards")
           for ok in [np.isfinite(arrays[k]).reshape(len(arrays[k]), -1).all(1)] if not ok.all()]
    if bad:
        raise UserError(f"dataset '{dataset_id}' holds values that are not finite (NaN or inf): "
                        f"{'; '.join(bad)}. Repair or drop those episodes")
    if (lengths == 0).any():
        empty, rows = np.flatnonzero(lengths == 0), np.ones(len(arrays["observations"]), dtype=bool)
        rows[(np.cumsum(lengths + 1) - 1)[empty]] = False
        arrays["observations"], lengths = arrays["observations"][rows], lengths[lengths > 0]
        print(f"dataset '{dataset_id}': dropped {len(empty)} episode(s) of length zero (episode "
              f"{', '.join(map(str, empty[:5]))}{', ...' if len(empty) > 5 else ''})", flush=True)
    if not len(lengths):
        raise UserError(f"dataset '{dataset_id}' contains no transitions")
    low, high = space.low.astype(np.float32), space.high.astype(np.float32)
    excess = np.maximum(arrays["actions"] - high, low - arrays["actions"])
    outside = (excess > 1e-3 * (high - low) / 2).any(1)  # within 0.1%: rounding, clipped silently
    if outside.any():
        print(f"dataset '{dataset_id}': {int(outside.sum())} of {len(outside)} actions lie outside the "
              f"action space's bounds, by up to {float(excess.max()):.3g} (first at "
              f"{where(int(np.argmax(outside)), 0)}); they are clipped", flush=True)
    actions = np.clip((arrays["actions"] - (high + low) / 2) / ((high - low) / 2), -1.0, 1.0)
    # Episode e owns rows starts[e] + e .. starts[e] + e + lengths[e] of the (N + E) observations:
    # without each episode's last row they are obs[t], without its first obs[t + 1].
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    last = np.zeros(len(arrays["observations"]), dtype=bool)
    last[starts + np.arange(len(lengths)) + lengths] = True
    fingerprint = hashlib.sha256()
    for x in (arrays["observations"], actions, lengths):
        fingerprint.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    rewards = arrays["rewards"].astype(np.float32)

    def t(x):
        return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32, device=device)

    return OfflineData(dataset_id, t(arrays["observations"][~last]), t(actions), t(rewards),
                       t(arrays["observations"][~np.roll(last, 1)]), t(arrays["terminals"]),
                       t(arrays["timeouts"]), starts, lengths,
                       np.add.reduceat(rewards.astype(np.float64), starts), low, high, *ref, make_env,
                       antmaze, source, eval_env, fingerprint.hexdigest())


def compute_obs_stats(data: OfflineData, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (+eps, as TD3+BC and CORL) of the dataset's states."""
    return data.observations.mean(0), data.observations.std(0) + eps


def normalize_obs(data: OfflineData, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Standardise observations and next observations in place; evaluate with the same stats."""
    data.observations = (data.observations - mean) / std
    data.next_observations = (data.next_observations - mean) / std
    data.obs_normalized = True


RewardTransform = Literal["none", "return-range", "minus-one", "cql-antmaze", "min-max", "plus-five"]


def transform_rewards(data: OfflineData, name: str) -> None:
    """The papers' reward transforms, in place (episode_returns stay as read): return-range
    r * 1000 / (max - min episode return) (IQL, ARQ locomotion), minus-one r - 1 (antmaze),
    cql-antmaze (r - 0.5) * 4, min-max into [0, 1] (BRAC+), plus-five r + 5 (Fisher-BRC)."""
    r = data.rewards
    data.rewards = {"none": lambda: r, "return-range": lambda: r * (1000.0 / max(float(
                        data.episode_returns.max() - data.episode_returns.min()), 1e-6)),
                    "minus-one": lambda: r - 1.0, "cql-antmaze": lambda: (r - 0.5) * 4.0,
                    "min-max": lambda: (r - r.min()) / torch.clamp(r.max() - r.min(), min=1e-6),
                    "plus-five": lambda: r + 5.0}[name]()


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


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def normalized_score(returns, ref_min: float | None, ref_max: float | None):
    if ref_min is None or ref_max is None:
        return None
    return 100.0 * (np.asarray(returns, dtype=np.float64) - ref_min) / (ref_max - ref_min)


@torch.no_grad()
def evaluate(data: OfflineData, policy: Callable, n_episodes: int, seed: int, obs_mean=None,
             obs_std=None, video: str | None = None) -> dict:
    """`n_episodes` at once in a vector env of the eval env, episode i from reset(seed + i), one
    batched call of `policy` (standardised states -> actions in [-1, 1]) per step. A sampling policy
    draws from torch's CPU stream, seeded with `seed` and given back to the run as it was. With
    `video` (a path) the first episode is written there as an MP4 (where frames render: MuJoCo's
    EGL backend is chosen where MUJOCO_GL is unset); this changes no return."""
    import gymnasium as gym

    make = [data.make_env] * n_episodes
    if video is not None:
        if sys.platform.startswith("linux"):
            os.environ.setdefault("MUJOCO_GL", "egl")
        make[0] = lambda: data.make_env(render_mode="rgb_array")
    hook = sys.unraisablehook
    if video is not None:  # a MuJoCo viewer that failed to start complains again as it is freed
        sys.unraisablehook = lambda unraisable: None
    envs, writer, tmp = gym.vector.SyncVectorEnv(make), None, None
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
                obs, reward, terminated, truncated, _ = envs.step(low + (a + 1) * 0.5 * (high - low))
                if video is not None and not done[0]:
                    try:  # a frame that fails ends the video, with one line; the episode goes on
                        frame = envs.envs[0].render()
                        if writer is None:
                            import imageio.v2 as imageio

                            folder = os.path.dirname(os.path.abspath(video))
                            os.makedirs(folder, exist_ok=True)
                            tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".mp4")[1]
                            writer = imageio.get_writer(tmp, format="FFMPEG", codec="libx264", fps=
                                                        envs.envs[0].metadata.get("render_fps") or 30)
                        writer.append_data(frame[:frame.shape[0] // 2 * 2, :frame.shape[1] // 2 * 2])
                    except Exception as exc:
                        print(f"no video {video}: {type(exc).__name__}: {_first_line(exc)}", flush=True)
                        video = None
                returns += np.where(done, 0.0, reward)
                lengths += ~done
                done |= terminated | truncated
        if writer is not None and video is not None:
            writer.close()
            os.chmod(tmp, 0o644)
            os.replace(tmp, video)
    finally:
        if writer is not None and os.path.exists(tmp):
            with contextlib.suppress(Exception):
                writer.close()
            os.remove(tmp)
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


# ----------------------------------------------------------------------------------------------
# The run folder, <output_dir>/<run_name>/: tensorboard events, results.json, checkpoints
# ----------------------------------------------------------------------------------------------
# Flags that may differ between a run and its resumption: none changes what is trained.
RESUME_FREE_FLAGS = {"run_name", "output_dir", "resume", "track", "wandb_project", "log_every",
                     "save_model", "total_steps", "compile", "cuda_graphs", "capture_video",
                     "video_every"}


class Run:
    """One run's folder. The loop starts at `resume(agent)` and calls `log` every log_every steps
    (the only device syncs), `evaluate` and `checkpoint(step, agent)` every eval_every steps,
    `stop_if_signalled(step, agent)` after every step and `finish` at the end. With --resume auto
    the same command continues a run from its checkpoint, and a pretraining phase ("behaviour
    model", in `phases`) is checkpointed and resumed the same way; a finished run is not re-run."""

    def __init__(self, args, algorithm: str, data: OfflineData, phases: tuple[str, ...] = ()):
        from torch.utils.tensorboard import SummaryWriter

        global _writing_in
        self.args, self.algorithm, self.data, self.phases = args, algorithm, data, (*phases, None)
        name = args.run_name or f"{args.env.replace('/', '__')}__{algorithm}__{args.seed}__{int(time.time())}"
        self.dir = _writing_in = os.path.join(args.output_dir, name)
        for flag, v in _given(args, [f.name for f in dataclasses.fields(args) if f.name.endswith("batch_size")]):
            if v > len(data):
                raise UserError(f"{flag} {v} is larger than the dataset '{data.dataset_id}' ({len(data)} "
                                f"transitions); use at most {len(data)}")
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the run folder {self.dir}: {exc.strerror}") from None
        self.lock = lock_folder(self.dir, "wait for it to end, or pass another --run-name")
        for f in os.listdir(self.dir):  # what a killed write left
            if f.startswith(".tmp-"):
                os.remove(os.path.join(self.dir, f))
        if args.resume == "never":
            self.remove_checkpoints()
        done = _read_json(os.path.join(self.dir, "results.json"))
        if args.resume == "auto" and isinstance(done, dict) and done.get("finished"):
            self.refuse_other_flags(done.get("args"), os.path.join(self.dir, "results.json"))
            self.remove_checkpoints()  # a kill after the final results.json left them
            print(f"[{algorithm}] {self.dir} holds a finished run: nothing to do (--resume never "
                  f"starts it over)")
            raise SystemExit(0)
        self.saved = self.read_checkpoint() if args.resume == "auto" else None
        self.resumed_at = self.saved and (self.saved["phase"], self.saved["step"])
        self.writer = SummaryWriter(self.dir, purge_step=self.purge_step(None))
        self.phase_writers: dict = {}
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{k}|{v}|" for k, v in vars(args).items()))
        self.wandb = None
        if args.track:
            try:
                import wandb
            except ImportError:
                raise UserError("--track needs wandb: pip install wandb") from None
            self.wandb = wandb.init(project=args.wandb_project, name=name, config=vars(args),
                                    sync_tensorboard=True, dir=self.dir)
        self.results = {"algorithm": algorithm, "env": args.env, "seed": args.seed, "args": vars(args),
                        "dataset": {"transitions": len(data), "episodes": len(data.episode_lengths),
                                    "ref_min_score": data.ref_min_score, "ref_max_score": data.ref_max_score,
                                    "ref_scores_source": data.ref_scores_source, "source": data.source,
                                    "eval_env": data.eval_env,
                                    "episode_return_mean": float(data.episode_returns.mean())},
                        "evaluations": [], "final_normalized_score": None, "final_return": None,
                        "finished": False}
        self.last_metrics, self.start, self.signalled, self.renders = {}, time.time(), None, True
        self.train_seconds_before = 0.0
        self.reset_clock()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, lambda s, frame: setattr(self, "signalled", s))
        print(f"[{algorithm}] {args.env}: {len(data)} transitions, {len(data.episode_lengths)} episodes, "
              f"obs {data.obs_dim}, act {data.act_dim}, device {data.observations.device}; run dir "
              f"{self.dir}; normalised scores: {data.ref_scores_source}")

    def refuse_other_flags(self, then: dict, path: str) -> None:
        now, then = vars(self.args), then if isinstance(then, dict) else {}
        then = {**{f.name: f.default for f in dataclasses.fields(self.args)  # flags added since
                   if f.default is not dataclasses.MISSING}, **then}
        differ = [k for k in sorted(set(then) | set(now)) if k not in RESUME_FREE_FLAGS and then.get(k) != now.get(k)]
        if differ:
            flags = ", ".join(f"--{k.replace('_', '-')} {then.get(k)} (now {now.get(k)})" for k in differ)
            raise UserError(f"{path} was written with other flags: {flags}. Pass another --run-name, or "
                            f"--resume never to start this run over.")

    def remove_checkpoints(self) -> None:
        for name in ("checkpoint.pt", "checkpoint.prev.pt"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.dir, name))

    def read_checkpoint(self) -> dict | None:
        for name in ("checkpoint.pt", "checkpoint.prev.pt"):
            path = os.path.join(self.dir, name)
            if os.path.exists(path):
                try:
                    saved = load_file(path)
                    saved["step"], saved["phase"], saved["agent"], saved["rng"], saved["args"]
                except (UserError, KeyError, TypeError) as exc:
                    print(f"[{self.algorithm}] {exc if isinstance(exc, UserError) else path + ' is no checkpoint'}"
                          f"; trying the previous one", flush=True)
                    continue
                self.refuse_other_flags(saved["args"], path)
                return {**saved, "path": path}
        return None

    def purge_step(self, phase: str | None) -> int | None:
        """A resumed run drops the events logged after its checkpoint: it logs them again."""
        return self.resumed_at[1] + 1 if self.resumed_at and self.resumed_at[0] == phase else None

    def phase_writer(self, phase: str):
        """A pretraining phase's events go to <run dir>/<phase>/, a tensorboard run of their own:
        their steps count from 1 and may carry the main loop's names (BRAC+'s Q_0: losses/q1)."""
        if phase not in self.phase_writers:
            from torch.utils.tensorboard import SummaryWriter

            self.phase_writers[phase] = SummaryWriter(os.path.join(self.dir, phase.lower().replace(" ", "_")),
                                                      purge_step=self.purge_step(phase))
        return self.phase_writers[phase]

    def reset_clock(self, step: int = 0) -> None:
        """Steps per second and ETA count afresh from `step` (after a pretraining phase)."""
        self.clock, self.clock_step, self.eval_time = time.time(), step, 0.0

    def sps(self, step: int) -> float:
        return (step - self.clock_step) / max(time.time() - self.clock - self.eval_time, 1e-9)

    def train_seconds(self) -> float:
        return self.train_seconds_before + time.time() - self.clock - self.eval_time

    def log(self, step: int, metrics: dict, phase: str | None = None) -> None:
        """Write the scalars (a device sync); a pretraining phase's also as a console line."""
        values = {k: float(v) for k, v in metrics.items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            self.diverged(step, f"{', '.join(bad)} became {values[bad[0]]}", phase)
        writer = self.writer if phase is None else self.phase_writer(phase)
        for k, v in values.items():
            writer.add_scalar(k, v, step)
        if phase is None:
            self.writer.add_scalar("charts/SPS", self.sps(step), step)
            self.last_metrics = values
        else:
            print(f"{phase} step {step} | {self.sps(step):.0f} SPS | " + " ".join(
                f"{k.split('/')[-1]} {v:.3g}" for k, v in values.items()), flush=True)

    def diverged(self, step: int, what: str, phase: str | None) -> None:
        raise UserError(f"{what} at step {step}{f' of the {phase} phase' if phase else ''}: training diverged. "
                        f"Its last checkpoint is kept, and resuming repeats it: start over with other flags "
                        f"(a lower learning rate, another --seed) and another --run-name")

    def evaluate(self, step: int, policy: Callable, obs_mean=None, obs_std=None) -> dict:
        """Evaluate `policy`, log it and rewrite results.json. --capture-video records the first
        episode of the last evaluation and of every --video-every-th in <run dir>/videos/."""
        t0, args = time.time(), self.args
        video = os.path.join(self.dir, "videos", f"step_{step}.mp4") if args.capture_video and self.renders and (
            step == args.total_steps or args.video_every and (len(self.results["evaluations"]) + 1) % args.video_every == 0) else None
        evaluation = evaluate(self.data, policy, args.eval_episodes, args.seed, obs_mean, obs_std, video)
        if video is not None and not os.path.exists(video):
            self.renders = False  # said once by evaluate; later evaluations do not try
            print(f"[{self.algorithm}] --capture-video: the eval env did not render here; training goes on "
                  f"without video (MUJOCO_GL=egl or osmesa renders MuJoCo without a display)", flush=True)
        if not math.isfinite(evaluation["return_mean"]):
            self.diverged(step, f"the evaluation's return became {evaluation['return_mean']}", None)
        self.eval_time += time.time() - t0
        entry = {"step": step, **evaluation, "wall_time": time.time() - self.start}
        if video is not None and self.renders:
            entry["video"] = os.path.relpath(video, self.dir)
        self.results["evaluations"].append(entry)
        self.results["train_seconds"] = self.train_seconds()
        self.writer.add_scalar("eval/return", evaluation["return_mean"], step)
        score = evaluation["normalized_score_mean"]
        if score is not None:
            self.writer.add_scalar("eval/normalized_score", score, step)
        write_json(os.path.join(self.dir, "results.json"), self.results)
        eta = int((args.total_steps - step) / max(self.sps(step), 1e-9))
        losses = " ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in self.last_metrics.items() if k.startswith("losses/"))
        print(f"step {step}/{args.total_steps} | {self.sps(step):.0f} SPS | ETA {eta // 3600}:{eta % 3600 // 60:02d}:"
              f"{eta % 60:02d} | {losses} | return {evaluation['return_mean']:.1f} ± {evaluation['return_std']:.1f}"
              + ("" if score is None else f" | score {score:.1f} ± {evaluation['normalized_score_std']:.1f}"), flush=True)
        return evaluation

    def checkpoint(self, step: int, agent, phase: str | None = None) -> None:
        """All that continuing after `step` of `phase` (None: the main loop) needs, with a checksum,
        atomically; the previous one is kept (a reader falls back to it). Weights that are not finite
        are never written: the run stops, keeping the last good one."""
        state = training_state(agent)
        floats = [t for t in _tensors(state) if t.is_floating_point()]
        if floats and not torch.stack([t.isfinite().all() for t in floats]).all():
            self.diverged(step, "the weights stopped being finite", phase)
        path = os.path.join(self.dir, "checkpoint.pt")
        payload = {"step": step, "phase": phase, "args": dict(vars(self.args)), "agent": state,
                   "rng": rng_states(self.data.observations.device), "evaluations": self.results["evaluations"],
                   "train_seconds": self.train_seconds(), "wall_time": time.time() - self.start}
        if os.path.exists(path):
            os.replace(path, os.path.join(self.dir, "checkpoint.prev.pt"))
        save_file(path, payload)

    def resume(self, agent, phase: str | None = None, steps: int = 0) -> int:
        """Restore `agent`, the random streams and the evaluations from a checkpoint of `phase`, and
        return the step to continue after (0: the start). One of a later phase holds this phase's
        result: the agent takes it and `steps` (the phase's length) is returned, so that the phase is
        skipped; one of an earlier phase is left alone."""
        saved = self.saved
        if saved is None:
            return 0
        mine = self.phases.index(phase)
        theirs = self.phases.index(saved["phase"]) if saved["phase"] in self.phases else -1
        if theirs < mine:
            return 0
        load_training_state(agent, saved["agent"])
        if theirs > mine:
            return steps
        set_rng_states(saved["rng"], self.data.observations.device)
        self.start -= saved["wall_time"]
        if phase is None:
            self.results["evaluations"], self.train_seconds_before = saved["evaluations"], saved["train_seconds"]
        self.reset_clock(saved["step"])
        print(f"[{self.algorithm}] resuming{f' the {phase} phase' if phase else ''} from step {saved['step']} "
              f"({saved['path']})", flush=True)
        self.saved = None
        return saved["step"]

    def stop_if_signalled(self, step: int, agent, phase: str | None = None) -> None:
        """After every step: once SIGTERM, SIGINT or SIGUSR1 has come, checkpoint and exit."""
        if self.signalled is not None:
            self.checkpoint(step, agent, phase)
            self.exit(f"step {step}{f' of the {phase} phase' if phase else ''}; checkpoint written")

    def exit(self, what: str) -> None:
        """End the process after a signal, once `what` (what was saved) is said: status 128 + signal."""
        self.close()
        print(f"[{self.algorithm}] stopped by {signal.Signals(self.signalled).name} after {what}; the same "
              f"command resumes the run", flush=True)
        raise SystemExit(128 + self.signalled)

    def pretraining_step(self, step: int, agent, phase: str) -> None:
        """After every step of a pretraining phase: a checkpoint every --eval-every steps, the stop on
        a signal."""
        if step % self.args.eval_every == 0:
            self.checkpoint(step, agent, phase)
        self.stop_if_signalled(step, agent, phase)

    def close(self) -> None:
        for writer in (self.writer, *self.phase_writers.values()):
            writer.close()

    def finish(self, model: dict | None = None) -> None:
        """results.json says finished; with --save-model, model.pt holds `model` with the args, the
        sizes and the action bounds, as CPU tensors and plain values, with a checksum."""
        evals = self.results["evaluations"]
        if evals:
            self.results["final_return"] = evals[-1]["return_mean"]
            self.results["final_normalized_score"] = evals[-1]["normalized_score_mean"]
        self.results["finished"], self.results["train_seconds"] = True, self.train_seconds()
        if model is not None and self.args.save_model:
            save_file(os.path.join(self.dir, "model.pt"), portable({
                "algorithm": self.algorithm, "args": dict(vars(self.args)), "obs_dim": self.data.obs_dim,
                "act_dim": self.data.act_dim, "action_low": self.data.action_low,
                "action_high": self.data.action_high, **model}))
        write_json(os.path.join(self.dir, "results.json"), self.results)
        self.remove_checkpoints()
        self.close()
        if self.wandb is not None:
            self.wandb.finish()
        print(f"[{self.algorithm}] done: final return {self.results['final_return']}, normalised score "
              f"{self.results['final_normalized_score']}; results in {self.dir}")


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (dict, list, tuple)):
        for v in (value.values() if isinstance(value, dict) else value):
            yield from _tensors(v)


def portable(value):
    """`value` with its tensors on the CPU and numpy values as lists and numbers."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, (dict, list, tuple)):
        return type(value)((k, portable(v)) for k, v in value.items()) if isinstance(value, dict) else \
            type(value)(portable(v) for v in value)
    return value


def training_state(agent) -> dict:
    """What training changes in an agent: its networks', optimisers' and schedulers' state dicts
    (also in lists), its tensors and its numbers."""
    state = {}
    for name, v in vars(agent).items():
        if hasattr(v, "state_dict"):
            state[name] = v.state_dict()
        elif isinstance(v, list) and v and all(hasattr(x, "state_dict") for x in v):
            state[name] = [x.state_dict() for x in v]
        elif isinstance(v, torch.Tensor):
            state[name] = v.detach().clone()
        elif isinstance(v, (bool, int, float)):
            state[name] = v
    return state


def load_training_state(agent, state: dict) -> None:
    unknown = [name for name in state if not hasattr(agent, name)]
    if unknown:
        print(f"the checkpoint's {', '.join(unknown)} has no place in this file's agent; not restored",
              flush=True)
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
    reads, under the agent's names, and `act` called on this object; a file's make_policy builds it
    and `load(saved)` fills it from a model.pt's state dicts."""

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


# ----------------------------------------------------------------------------------------------
# Speed (docs/speed.md). With fp32 and without --compile or --cuda-graphs each is plain PyTorch.
# ----------------------------------------------------------------------------------------------
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
                raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no native "
                                f"bfloat16 support (emulated, slower than fp32); use --precision fp32")

    def bf16_step(*args, **kwargs):  # in a CUDA graph capture without the weight cache: replays recast
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not capturing):
            return step(*args, **kwargs)

    return bf16_step


def _fp32_output(x: torch.Tensor) -> bool:
    return torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)


class OutputLinear(torch.nn.Linear):
    """nn.Linear for a network's output layer: in fp32 under --precision bf16 (Q values, log-stds)."""

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


def training_step(agent, buffer: ReplayBuffer, args, device: torch.device, branch: Callable | None = None):
    """The main loop's step, agent.train(buffer.sample(args.batch_size)); it returns the latest value
    of every metric a step returned. With --cuda-graphs on CUDA each path of train() (the value of
    `branch()`: whether this step updates the actor) is a CUDA graph (CapturedStep)."""
    def step() -> dict:
        return agent.train(buffer.sample(args.batch_size))

    if args.cuda_graphs and device.type != "cuda":
        print(f"--cuda-graphs: {device} is not a CUDA device; training eagerly", flush=True)
    elif args.cuda_graphs:
        step = CapturedStep(step, agent, branch, _capture, _side_stream)
    metrics = {}
    return lambda: metrics.update(step()) or metrics


def _capture(function: Callable) -> tuple[Callable, dict]:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = function()  # recorded, not run
    return graph.replay, outputs


@contextlib.contextmanager
def _side_stream():  # warm-up steps before a capture run on a side stream (PyTorch's docs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


class CapturedStep:
    """The step as CUDA graphs, one per path: a path's first WARMUP calls run eagerly (on a side
    stream), the next captures it, later ones replay it. Python does not run in a replay: an integer
    counter that train() adds to (TD3+BC's total_it) gets the same increment after each, a learning
    rate scheduler that train() steps is stepped after each (the graph reads the rate as a tensor),
    and a step that changes any other Python number, which a graph would freeze, is not captured.
    A capture that fails says why in one line, and the steps run eagerly."""

    WARMUP = 3

    def __init__(self, step, agent, branch, capture, side_stream):
        self.step, self.agent, self.branch, self.capture, self.side_stream = step, agent, branch, capture, side_stream
        self.graphs, self.calls, self.failed = {}, {}, False
        self.schedulers = [v for v in vars(agent).values() if isinstance(v, torch.optim.lr_scheduler.LRScheduler)]
        for opt in (v for v in vars(agent).values() if isinstance(v, torch.optim.Optimizer)):
            for group in opt.param_groups:
                group["capturable"] = True  # the same arithmetic; a capture needs it
                if any(s.optimizer is opt for s in self.schedulers):
                    device = group["params"][0].device  # fused CUDA Adam reads a float32 rate
                    group["lr"] = torch.tensor(float(group["lr"]), device=device, dtype=torch.float32
                                               if device.type == "cuda" else torch.float64)

    def numbers(self) -> dict:
        """The agent's Python numbers and its optimisers' settings."""
        found = {("agent", k): v for k, v in vars(self.agent).items() if isinstance(v, (bool, int, float))}
        for name, v in vars(self.agent).items():
            if isinstance(v, torch.optim.Optimizer):
                found |= {(name, i, k): x for i, g in enumerate(v.param_groups) for k, x in g.items()
                          if isinstance(x, (bool, int, float))}
        return found

    def captured(self) -> tuple:
        before, stepped = self.numbers(), []
        for s in self.schedulers:
            s.step = lambda s=s: stepped.append(s)  # replayed after each replay instead
        try:
            replay, metrics = self.capture(self.step)
        finally:
            for s in self.schedulers:
                del s.step
            after = self.numbers()
            for key, v in before.items():  # the capture ran the Python once and the device nothing
                if key[0] == "agent":
                    setattr(self.agent, key[1], v)
                else:
                    getattr(self.agent, key[0]).param_groups[key[1]][key[2]] = v
        changed = [k for k in set(before) | set(after) if before.get(k) != after.get(k)]
        frozen = [k for k in changed if k[0] != "agent" or type(before.get(k)) is not int or type(after.get(k)) is not int]
        if frozen:
            raise ValueError(f"train() sets the Python value {frozen[0]}, which a graph would freeze")
        return replay, metrics, {k[1]: after[k] - before[k] for k in changed}, stepped

    def __call__(self) -> dict:
        path = self.branch() if self.branch else None
        if self.failed:
            return self.step()
        if self.calls.get(path, 0) < self.WARMUP:
            self.calls[path] = self.calls.get(path, 0) + 1
            with self.side_stream():
                return self.step()
        if path not in self.graphs:
            try:
                self.graphs[path] = self.captured()
            except Exception as exc:
                print(f"--cuda-graphs: capturing the training step failed ({type(exc).__name__}: "
                      f"{_first_line(exc)}); training eagerly", flush=True)
                self.failed = True
                return self.step()
        replay, metrics, increments, stepped = self.graphs[path]
        replay()
        for name, n in increments.items():
            setattr(self.agent, name, getattr(self.agent, name) + n)
        for s in stepped:
            s.step()
        return metrics


# ----------------------------------------------------------------------------------------------
# Pretrained models: behaviour models that take an hour are cached, not trained again
# ----------------------------------------------------------------------------------------------
def pretraining_key(args, fields: tuple[str, ...], data: OfflineData, recipe: tuple = ()) -> str:
    """A hash of what a pretrained model depends on: the dataset id and contents as read, whether
    states are standardised, the named flags and `recipe` (the file's words for how it is trained).
    Nothing computed on the device enters it: a model trained on one device is found on another."""
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


def load_state_dicts(modules: dict, state: dict) -> None:
    """state[name] into each module; if one does not fit, all stay as they were, and it raises."""
    before = {name: copy.deepcopy(m.state_dict()) for name, m in modules.items()}
    try:
        for name, m in modules.items():
            m.load_state_dict(state[name])
    except Exception:
        for name, m in modules.items():
            m.load_state_dict(before[name])
        raise


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
    """The modules' state dicts from a cache file; False (the caller trains them) if there is none
    or it does not fit."""
    state = load_cache(path, device)
    try:
        state is None or load_state_dicts(modules, state)
    except Exception as exc:
        print(f"cache {path} does not fit ({type(exc).__name__}); training it again", flush=True)
        return False
    if state is not None:
        print(f"reusing the cached pretrained model {path}", flush=True)
    return state is not None


def save_pretrained(path: str, modules: dict) -> None:
    save_cache(path, {name: m.state_dict() for name, m in modules.items()})
