"""Shared plumbing for the single-file algorithms in `algorithms/`.

Only infrastructure lives here: loading a Minari dataset into flat tensors, state normalisation,
reward transforms, batch sampling, evaluation, seeding, logging and atomic file writing.
No algorithmic code: every loss lives in its algorithm's file.

What the algorithm files can rely on:
- Importing this module has no side effects. A script calls `install_user_error_hook()` first (an
  uncaught `UserError` then ends it with one line, not a traceback) and `flush_denormals()` before
  it trains.
- Flags are checked right after parsing, before any work: `check_args(args)` the shared ones, then
  the file's own `check_args(args)` its own, with `check_positive`, `check_nonnegative`,
  `check_interval` and `check_seed`. Flags left None (per-domain defaults) are not checked. `Run`
  refuses a batch size larger than the dataset, the first point where both are known.
- `load_dataset(id)` is the only way data comes in: a local Minari dataset; a `local/...` id, built
  on first use from the snapshots shipped in tools/ (by tools/make_dataset.py, leaving the global
  random streams as they were); a known remote id, downloaded; or D4RL's own HDF5 file
  (`d4rl/<name>` or its path, read by d4rl_files.py into the same flat arrays).
- Actions are in [-1, 1]: rescaled from the dataset's Box on loading, and `evaluate` maps the
  policy's actions back to the Box before stepping the env, so a tanh policy needs no bounds.
- Whatever their source, `load_dataset` checks the flat arrays once: values that are not finite are
  refused, episodes of length zero dropped and actions beyond the Box clipped, each with one line. A
  damaged dataset file is one line that says how to rebuild or re-download it; a damaged or stale
  cache (flat arrays, pretrained models) is rebuilt with a notice.
- Of the functions given an `OfflineData`, only `normalize_obs` (observations, next_observations)
  and `transform_rewards` (rewards) change it, in place; `episode_returns` stays raw.
- `Run(args, algorithm, data)` takes the script's `Args` with the fields every file shares. It reads
  env, seed, total_steps, eval_episodes, output_dir, run_name, save_model, track, wandb_project and
  resume; the script's loop uses batch_size, eval_every, device and log_every (call `Run.log` every
  log_every steps: it is where device scalars are synced). All fields go into results.json.
- Resuming: the loop starts at `Run.resume(agent)`, calls `Run.checkpoint(step, agent)` after each
  evaluation and `Run.stop_if_signalled(step, agent)` after each step. A checkpoint holds whatever
  `training_state(agent)` finds on the agent object (networks, optimisers, schedulers, tensors,
  generators, numbers), the random streams and the evaluations.
The conventions the algorithm files share (names, per-domain defaults, caches) are described in
docs/implementation_notes.md.

Data conventions:
- A Minari episode stores T+1 observations and T of everything else. Transition t is
  (obs[t], actions[t], rewards[t], obs[t+1]).
- `terminals` come from `terminations` only; time-limit truncations are kept as ordinary
  transitions with terminal 0 (Minari stores the true final observation, so bootstrapping from it
  is correct). `timeouts` marks them.
- Goal-conditioned Dict observations are flattened to concat(observation, desired_goal), and for
  AntMaze to concat(achieved_goal, observation, desired_goal) (see `goal_obs_keys`).
- For the usual MuJoCo tasks the action bounds already are [-1, 1], so the rescaling is the identity.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import math
import os
import random
import time
import warnings
from typing import Any, Callable, Literal, NamedTuple, get_args

import numpy as np
import torch

import d4rl_files
# These live in basics.py because tools/make_dataset.py, which resolve_dataset runs to build a local/*
# dataset on first use, needs them too and must not import this module. Scripts use them as common.<name>.
from basics import (  # noqa: F401
    D4RL_REF_SCORES,
    UserError,
    atomic_write_bytes,
    atomic_write_json,
    install_user_error_hook,
    save_checkpoint,
)

# Remote Minari datasets with continuous actions that we know of. An id that is neither local nor
# listed here is reported as unknown (with close matches) instead of waiting on the network.
_MUJOCO_TASKS = {
    "halfcheetah": ("simple", "medium", "expert"),
    "hopper": ("simple", "medium", "expert"),
    "walker2d": ("simple", "medium", "expert"),
    "ant": ("simple", "medium", "expert"),
    "humanoid": ("simple", "medium", "expert"),
    "humanoidstandup": ("simple", "medium", "expert"),
    "swimmer": ("medium", "expert"),
    "pusher": ("medium", "expert"),
    "reacher": ("medium", "expert"),
    "invertedpendulum": ("medium", "expert"),
    "inverteddoublependulum": ("medium", "expert"),
}
KNOWN_REMOTE_DATASETS = sorted(
    [f"mujoco/{task}/{kind}-v0" for task, kinds in _MUJOCO_TASKS.items() for kind in kinds]
    + [f"D4RL/antmaze/{m}-v1" for m in ("umaze", "umaze-diverse", "medium-play", "medium-diverse",
                                        "large-play", "large-diverse")]
    + [f"D4RL/{t}/{k}-v2" for t in ("door", "hammer", "pen", "relocate")
       for k in ("human", "cloned", "expert")]
    + [f"D4RL/kitchen/{k}-v2" for k in ("complete", "partial", "mixed")]
    + [f"D4RL/pointmaze/{m}-v2" for m in ("umaze", "umaze-dense", "medium", "medium-dense",
                                          "large", "large-dense", "open", "open-dense")]
    + ["D4RL/minigrid/fourrooms-v0", "D4RL/minigrid/fourrooms-random-v0"]
)


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
# Dataset loading
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class OfflineData:
    """A Minari dataset flattened to transitions (float32 tensors on `device`, one row each)."""

    dataset_id: str
    observations: torch.Tensor  # (N, obs_dim)
    actions: torch.Tensor  # (N, act_dim), rescaled to [-1, 1]
    rewards: torch.Tensor  # (N,)
    next_observations: torch.Tensor  # (N, obs_dim)
    terminals: torch.Tensor  # (N,) 1.0 where the episode terminated (no bootstrap)
    timeouts: torch.Tensor  # (N,) 1.0 where the episode was truncated (bootstrap kept)
    episode_starts: np.ndarray  # (E,) index of each episode's first transition
    episode_lengths: np.ndarray  # (E,)
    episode_returns: np.ndarray  # (E,) undiscounted return of each episode (raw rewards)
    action_low: np.ndarray
    action_high: np.ndarray
    ref_min_score: float | None
    ref_max_score: float | None
    ref_scores_source: str  # "dataset", "D4RL constants (v2 envs)", "D4RL constants (infos.py)" or "none"
    # the minari.MinariDataset, for recovering the eval env; for a D4RL file, a d4rl_files.D4RLFile,
    # which offers the same env_spec and recover_environment
    minari_dataset: Any
    source: str = "minari"  # or "D4RL file <path>; <where the next observations came from>"
    eval_env: str | None = None  # the id of the env evaluations run in

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]

    def __len__(self) -> int:
        return self.observations.shape[0]


def _suggest(dataset_id: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(dataset_id, candidates, n=5, cutoff=0.5)
    return ("; close matches: " + ", ".join(close)) if close else ""


def resolve_dataset(dataset_id: str):
    """Return a `minari.MinariDataset`: the local copy if there is one, else download it."""
    import minari

    with warnings.catch_warnings():  # a misconfigured folder is reported below if it is the one asked for
        warnings.simplefilter("ignore")
        local = sorted(minari.list_local_datasets().keys())
    folder = str(minari.storage.get_dataset_path(dataset_id))
    if dataset_id in local or os.path.isdir(os.path.join(folder, "data")):
        try:
            return minari.load_dataset(dataset_id)
        except Exception as exc:  # json's, h5py's and pyarrow's own errors, among others
            metadata = os.path.join(folder, "data", "metadata.json")
            try:
                with open(metadata) as f:
                    json.load(f)
            except (OSError, ValueError):
                raise _damaged_dataset(dataset_id, folder, metadata, exc) from None
            raise _damaged_dataset(dataset_id, folder, folder, exc) from None
    if dataset_id.startswith("local/"):
        # local/* ids are never remote: they are built offline from the snapshots in tools/.
        import tools.make_dataset

        # The build comes after the script's seed_everything and draws from the global generators
        # (network initialisation), so it must leave them as it found them: otherwise the run that
        # builds the dataset and every later run with the same seed start from different weights.
        with preserved_global_rngs():
            tools.make_dataset.build_local_dataset(dataset_id)
        return minari.load_dataset(dataset_id)
    if dataset_id not in KNOWN_REMOTE_DATASETS:
        raise UserError(
            f"unknown dataset id '{dataset_id}'{_suggest(dataset_id, local + KNOWN_REMOTE_DATASETS)}"
            f". Local datasets are listed by `minari list local`; a remote dataset not known here "
            f"can be fetched first with `minari download {dataset_id}`."
        )
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as exc:  # network errors come from several libraries (httpx, requests, HF)
        raise UserError(
            f"could not download '{dataset_id}' ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})."
            f" Without network access, run `minari download {dataset_id}` on a machine with one and "
            f"copy the folder into {minari.storage.get_dataset_path()} (or set MINARI_DATASETS_PATH)."
        ) from None


def goal_obs_keys(dataset, dataset_id: str) -> tuple[str, ...]:
    """The keys of a goal-conditioned Dict observation, in the order they are concatenated.

    Gymnasium-Robotics' AntMaze keeps the torso's x, y only in `achieved_goal`; its `observation` is
    the other 27 numbers. D4RL's antmaze state (29 numbers) had x, y first, so AntMaze is flattened
    to concat(achieved_goal, observation, desired_goal). PointMaze's `observation` starts with x, y
    already and stays concat(observation, desired_goal). Keyed on the env spec (AntMaze_*), which
    fixes the observation layout whatever the dataset is called; on the dataset id's task when the
    dataset records no env."""
    spec = dataset.env_spec
    antmaze = spec.name.startswith("AntMaze") if spec is not None else is_antmaze(dataset_id)
    return ("achieved_goal", "observation", "desired_goal") if antmaze else ("observation", "desired_goal")


def _flatten_obs_space(space, dataset_id: str, keys: tuple[str, ...]) -> int:
    from gymnasium import spaces

    if isinstance(space, spaces.Box) and len(space.shape) == 1:
        return space.shape[0]
    if isinstance(space, spaces.Dict) and set(keys) <= set(space.spaces):
        return sum(_flatten_obs_space(space[k], dataset_id, keys) for k in keys)
    raise UserError(
        f"dataset '{dataset_id}' has observation space {space}; only flat Box observations or Dict "
        f"observations with {', '.join(repr(k) for k in keys)} (goal-conditioned) are supported."
    )


def flatten_obs(obs, keys: tuple[str, ...] = ("observation", "desired_goal")) -> np.ndarray:
    """Dict observations (goal-conditioned) -> the concatenation of `keys` (`goal_obs_keys`), as float32."""
    if isinstance(obs, dict):
        obs = np.concatenate([obs[k] for k in keys], axis=-1)
    return np.asarray(obs, dtype=np.float32)


def load_dataset(dataset_id: str, device: str | torch.device = "cpu") -> OfflineData:
    """Load a Minari dataset id into flat float32 tensors on `device` (one pass over episodes)."""
    from gymnasium import spaces

    d4rl_file = d4rl_files.open_file(dataset_id) if d4rl_files.dataset_name(dataset_id) is not None else None
    dataset = d4rl_file or resolve_dataset(dataset_id)
    action_space = dataset.action_space
    if not isinstance(action_space, spaces.Box):
        raise UserError(
            f"dataset '{dataset_id}' has a {type(action_space).__name__} action space; these "
            f"algorithms are for continuous control and need a Box action space."
        )
    if len(action_space.shape) != 1 or not (
        np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))
    ):
        raise UserError(
            f"dataset '{dataset_id}' has action space {action_space}; a 1-D Box with finite bounds "
            f"is needed (actions are rescaled to [-1, 1])."
        )
    keys = goal_obs_keys(dataset, dataset_id)
    obs_dim = _flatten_obs_space(dataset.observation_space, dataset_id, keys)

    arrays = d4rl_file.read() if d4rl_file else _read_flat_cache(dataset, obs_dim)
    if arrays is None:
        arrays = _read_episodes(dataset, dataset_id, obs_dim, keys)
        _write_flat_cache(dataset, arrays)
    arrays = _check_arrays(arrays, dataset_id, action_space.low, action_space.high)
    # Episode e owns rows [starts[e] + e, starts[e] + e + lengths[e]] of the (N + E)-row observation
    # array; dropping each episode's last row gives obs[t], dropping its first gives obs[t+1].
    lengths = arrays["lengths"]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    is_last = np.zeros(len(arrays["observations"]), dtype=bool)
    is_last[starts + np.arange(len(lengths)) + lengths] = True
    is_first = np.roll(is_last, 1)
    rewards = arrays["rewards"]
    low, high = action_space.low.astype(np.float32), action_space.high.astype(np.float32)
    actions = np.clip((arrays["actions"] - (high + low) / 2) / ((high - low) / 2), -1.0, 1.0)

    ref_min, ref_max, source = _reference_scores(dataset, dataset_id)

    def t(x):
        return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32, device=device)

    return OfflineData(
        dataset_id=dataset_id,
        observations=t(arrays["observations"][~is_last]),
        actions=t(actions),
        rewards=t(rewards),
        next_observations=t(arrays["observations"][~is_first]),
        terminals=t(arrays["terminals"]),
        timeouts=t(arrays["timeouts"]),
        episode_starts=starts,
        episode_lengths=lengths,
        episode_returns=np.add.reduceat(rewards.astype(np.float64), starts),
        action_low=low,
        action_high=high,
        ref_min_score=ref_min,
        ref_max_score=ref_max,
        ref_scores_source=source,
        minari_dataset=dataset,
        source=d4rl_file.source if d4rl_file else "minari",
        eval_env=d4rl_file.eval_env_id if d4rl_file else _eval_env_id(dataset),
    )


def _eval_env_id(dataset) -> str | None:
    spec = dataset.storage.metadata.get("eval_env_spec")
    if isinstance(spec, str):
        try:
            return json.loads(spec)["id"]
        except (ValueError, KeyError, TypeError):
            pass
    return dataset.env_spec.id if dataset.env_spec is not None else None


def _read_episodes(dataset, dataset_id: str, obs_dim: int, keys: tuple[str, ...]) -> dict:
    """One pass over the episodes; observations keep their T+1 rows per episode."""
    obs, acts, rews, terms, truncs, lengths = [], [], [], [], [], []
    for ep in _episodes(dataset, dataset_id):
        o = flatten_obs(ep["observations"], keys)
        steps = len(ep["rewards"])
        if o.shape != (steps + 1, obs_dim):
            raise UserError(
                f"dataset '{dataset_id}', episode {ep['id']}: observations have shape {o.shape}, "
                f"expected ({steps + 1}, {obs_dim}) (T+1 rows for T steps); the dataset is malformed."
            )
        obs.append(o)
        acts.append(np.asarray(ep["actions"], dtype=np.float32).reshape(steps, -1))
        rews.append(ep["rewards"])
        terms.append(ep["terminations"])
        truncs.append(ep["truncations"])
        lengths.append(steps)
    if not lengths or sum(lengths) == 0:
        raise UserError(f"dataset '{dataset_id}' contains no transitions.")
    return {
        "observations": np.concatenate(obs),
        "actions": np.concatenate(acts),
        "rewards": np.concatenate(rews).astype(np.float32),
        "terminals": np.concatenate(terms).astype(np.float32),
        "timeouts": np.concatenate(truncs).astype(np.float32),
        "lengths": np.asarray(lengths, dtype=np.int64),
    }


def _damaged_dataset(dataset_id: str, folder: str, path: str, exc: Exception) -> UserError:
    """The one line for a dataset file that cannot be read: which file, why, and how to replace it."""
    if dataset_id.startswith("local/"):
        fix = f"delete {folder} and it is rebuilt on first use"
    elif dataset_id in KNOWN_REMOTE_DATASETS:
        fix = f"download it again with `minari download --force {dataset_id}`"
    else:
        fix = f"rebuild it, or download it again with `minari download --force {dataset_id}` if it is on the hub"
    reason = (str(exc).strip().splitlines() or [""])[0][:160]
    return UserError(f"dataset '{dataset_id}' is damaged: {path} could not be read "
                     f"({type(exc).__name__}: {reason}); {fix}")


def _episodes(dataset, dataset_id: str):
    """The dataset's episodes, one at a time; a data file that cannot be read is a `_damaged_dataset`."""
    folder = os.path.dirname(os.path.abspath(dataset.storage.data_path))
    path = getattr(dataset.storage, "_file_path", dataset.storage.data_path)  # HDF5: main_data.hdf5
    episodes = None
    while True:
        try:
            if episodes is None:
                episodes = iter(dataset.storage.get_episodes(dataset.episode_indices))
            episode = next(episodes)
        except StopIteration:
            return
        except Exception as exc:  # h5py's, pyarrow's and numpy's own errors, among others
            raise _damaged_dataset(dataset_id, folder, str(path), exc) from None
        yield episode


# Reading a Minari HDF5 file costs ~1 ms per episode (h5py's per-dataset overhead), a minute for a
# random-policy dataset of 50k short episodes. The flat arrays are therefore cached once beside the
# dataset, keyed by the names, sizes and mtimes of its data files, and later loads take seconds.
_CACHE_NAME = "flat_transitions_v1.npz"


def _cache_key(dataset) -> str:
    data_dir = dataset.storage.data_path  # the folder of the data files, whatever the format
    entries = []
    for root, _, files in os.walk(data_dir):
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            entries.append(f"{os.path.relpath(os.path.join(root, name), data_dir)}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(sorted(entries))


def _cache_path(dataset) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(dataset.storage.data_path)), _CACHE_NAME)


def _read_flat_cache(dataset, obs_dim: int) -> dict | None:
    """The cached arrays, or None when there is no cache; a stale or damaged one is only a cache
    miss, with a notice (it is then written again)."""
    path = _cache_path(dataset)
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as f:
            if str(f["key"]) != _cache_key(dataset):
                print(f"the flat-array cache {path} is stale (the dataset's files changed); rebuilding it",
                      flush=True)
                return None
            arrays = {k: f[k] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "lengths")}
        n, episodes, act_dim = int(arrays["lengths"].sum()), len(arrays["lengths"]), dataset.action_space.shape[0]
        expected = {"observations": (n + episodes, obs_dim), "actions": (n, act_dim), "rewards": (n,),
                    "terminals": (n,), "timeouts": (n,)}
        for name, shape in expected.items():
            if arrays[name].shape != shape:
                raise ValueError(f"{name} have shape {arrays[name].shape}, not {shape}")
        return arrays
    except Exception as exc:  # zipfile's, numpy's and the checks' errors: whatever it is, rebuild it
        reason = (str(exc).strip().splitlines() or [""])[0][:120]
        print(f"the flat-array cache {path} is damaged ({type(exc).__name__}: {reason}); rebuilding it", flush=True)
        return None


def _write_flat_cache(dataset, arrays: dict) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(_cache_key(dataset)), **arrays)
    try:
        atomic_write_bytes(_cache_path(dataset), buffer.getvalue())
    except UserError as exc:  # e.g. a read-only dataset folder: no cache, every load reads the episodes
        print(f"{exc}; the dataset's episodes will be read again on every load", flush=True)


# Actions beyond the Box by float rounding are clipped silently; beyond this fraction of the Box's
# half-width they are the data's, and clipping them changes the data, so it is said.
ACTION_BOUNDS_TOLERANCE = 1e-3


def _locate(row: int, lengths: np.ndarray, extra: int) -> str:
    """Which episode and step a row of the flat arrays is (observations have extra=1 row per episode)."""
    ends = np.cumsum(lengths + extra)
    episode = int(np.searchsorted(ends, row, side="right"))
    return f"episode {episode}, step {row - (ends[episode] - lengths[episode] - extra)}"


def _check_arrays(arrays: dict, dataset_id: str, low: np.ndarray, high: np.ndarray) -> dict:
    """The checks of the flat arrays, whatever their source, each with one line: values that are
    not finite are refused (they would only give NaN losses); episodes of length zero are dropped
    (they hold no transition and would break the per-episode sums); actions beyond the action
    space's bounds are clipped to them (a tanh policy cannot produce them)."""
    lengths = arrays["lengths"]
    bad = []
    for name, extra in (("observations", 1), ("actions", 0), ("rewards", 0)):
        finite = np.isfinite(arrays[name])
        if not finite.all():
            rows = finite.reshape(len(finite), -1).all(1)
            first = _locate(int(np.argmin(rows)), lengths, extra)
            bad.append(f"{finite.size - int(finite.sum())} in {name} (first at {first})")
    if bad:
        raise UserError(f"dataset '{dataset_id}' holds values that are not finite (NaN or inf): "
                        f"{'; '.join(bad)}. Training on them gives NaN losses: repair or drop those episodes.")
    if (lengths == 0).any():
        empty = np.flatnonzero(lengths == 0)
        obs_rows = np.ones(len(arrays["observations"]), dtype=bool)
        obs_rows[(np.cumsum(lengths + 1) - 1)[empty]] = False  # an empty episode's one observation
        arrays = {**arrays, "observations": arrays["observations"][obs_rows], "lengths": lengths[lengths > 0]}
        shown = ", ".join(str(e) for e in empty[:5]) + (", ..." if len(empty) > 5 else "")
        print(f"dataset '{dataset_id}': dropped {len(empty)} episode(s) of length zero (episode {shown}), which "
              f"hold no transitions", flush=True)
    if not len(arrays["lengths"]):
        raise UserError(f"dataset '{dataset_id}' contains no transitions.")
    if np.any(high <= low):
        raise UserError(f"dataset '{dataset_id}' has an action space with no width in some dimension "
                        f"(low {low}, high {high}); actions cannot be rescaled to [-1, 1].")
    actions = arrays["actions"]
    excess = np.maximum(actions - high, low - actions)  # > 0 outside the bounds, in the dataset's units
    outside = (excess > ACTION_BOUNDS_TOLERANCE * (high - low) / 2).any(1)
    if outside.any():
        print(f"dataset '{dataset_id}': {int(outside.sum())} of {len(actions)} actions lie outside the action "
              f"space's bounds, by up to {float(excess.max()):.3g} (first at "
              f"{_locate(int(np.argmax(outside)), lengths, 0)}); they are clipped to the bounds", flush=True)
    return arrays


def _reference_scores(dataset, dataset_id: str):
    if isinstance(dataset, d4rl_files.D4RLFile):
        return *dataset.ref_scores, "D4RL constants (infos.py)"
    meta = dataset.storage.metadata
    if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
        return float(meta["ref_min_score"]), float(meta["ref_max_score"]), "dataset"
    parts = dataset_id.split("/")
    if len(parts) == 3 and parts[0] == "mujoco" and parts[1] in D4RL_REF_SCORES:
        lo, hi = D4RL_REF_SCORES[parts[1]]
        return lo, hi, "D4RL constants (v2 envs)"
    return None, None, "none"


# ----------------------------------------------------------------------------------------------
# Normalisation and reward transforms
# ----------------------------------------------------------------------------------------------
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


def dataset_task(dataset_id: str) -> str:
    """The task component of a dataset id, lower-cased: 'D4RL/pen/human-v2' -> 'pen'.

    Minari ids are `namespace/task/name-vN` (or `task/name-vN`); per-domain settings match this
    component exactly, so that 'pendulum' is not 'pen'. An id without '/' (Minari's older
    'task-name-vN' form), and a D4RL file's name ('d4rl/hopper-medium-v2' or its path), give the
    part before its first '-'."""
    d4rl_name = d4rl_files.dataset_name(dataset_id)
    if d4rl_name:
        return d4rl_name.split("-")[0].lower()
    parts = dataset_id.lower().split("/")
    return parts[-2] if len(parts) > 1 else parts[0].split("-")[0]


def is_antmaze(dataset_id: str) -> bool:
    return dataset_task(dataset_id) == "antmaze"


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
def evaluate(
    data: OfflineData,
    policy: Callable[[torch.Tensor], torch.Tensor],
    n_episodes: int,
    seed: int,
    obs_mean: torch.Tensor | None = None,
    obs_std: torch.Tensor | None = None,
) -> dict:
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
# Seeding, devices, files
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_global_rngs():
    """Run a block without changing the global python, numpy and torch (CPU) random streams.
    CUDA's are left out: forking them would initialise CUDA, and the dataset builder runs on the CPU."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


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
# Network layers that carry the speed mechanics: batched ensembles and --precision bf16
# ----------------------------------------------------------------------------------------------
Precision = Literal["fp32", "bf16"]


def autocast(step: Callable, precision: str, device: torch.device) -> Callable:
    """`step` (a training step) as it is for fp32; for bf16, run under torch.autocast(bfloat16): the
    matrix products of the hidden layers take bf16 inputs, while parameters, gradients and optimiser
    states stay fp32 and every network's output layer computes in fp32 (OutputLinear and
    EnsembleLinear(output=True)), so that Q values, log-stds and logits are not rounded to bf16's
    8-bit mantissa. Only the training steps: evaluation runs in fp32."""
    if precision == "fp32":
        return step
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                        "use --precision fp32.")

    def bf16_step(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return step(*args, **kwargs)

    return bf16_step


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
    """One training run: `<output_dir>/<run_name>/` with tensorboard events and results.json.

    `log()` takes a dict of (possibly device) scalars and is the only place they are synced, so
    call it every `log_every` steps, not every step. Losses that are not finite stop the run with a
    clear message instead of training on NaNs.

    Resuming (--resume auto, the default): a run folder that holds a finished results.json ends the
    script at once; one that holds a checkpoint is continued from it by `resume(agent)`, which also
    makes SIGTERM, SIGINT and SIGUSR1 (Slurm's warnings before preemption) write a checkpoint and
    stop at the next step. `checkpoint(step, agent)` is called at every evaluation."""

    def __init__(self, args, algorithm: str, data: OfflineData):
        from torch.utils.tensorboard import SummaryWriter

        self.args, self.algorithm, self.data = args, algorithm, data
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
            "evaluations": [],
            "final_normalized_score": None,
            "final_return": None,
            "finished": False,
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

    def resume(self, agent) -> int:
        """Restore `agent`, the random streams and the evaluations from the checkpoint, if there is
        one. Returns the step it was written at (0 for a fresh run): the loop continues after it."""
        if self.saved is None:
            return 0
        load_training_state(agent, self.saved["agent"])
        set_rng_states(self.saved["rng"])
        step = self.saved["step"]
        self.results["evaluations"] = self.saved["evaluations"]
        self.train_seconds_before = self.saved["train_seconds"]
        self.start -= self.saved["wall_time"]
        self.reset_clock(step)
        print(f"[{self.algorithm}] resuming from step {step} ({self.saved['path']})", flush=True)
        self.saved = None
        return step

    def train_seconds(self) -> float:
        return self.train_seconds_before + time.time() - self.clock - self.eval_time

    def checkpoint(self, step: int, agent) -> None:
        """Write everything needed to continue after `step`; the previous checkpoint is kept until
        the new one is whole (a reader falls back to it)."""
        import io

        state = {"step": step, "args": dict(vars(self.args)), "agent": training_state(agent), "rng": rng_states(),
                 "evaluations": self.results["evaluations"], "train_seconds": self.train_seconds(),
                 "wall_time": time.time() - self.start}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        path = os.path.join(self.dir, CHECKPOINT)
        if os.path.exists(path):
            os.replace(path, os.path.join(self.dir, PREVIOUS_CHECKPOINT))
        atomic_write_bytes(path, buffer.getvalue())

    def stop_if_signalled(self, step: int, agent) -> None:
        """Called after every training step. Its first call makes SIGTERM, SIGINT and SIGUSR1 set a
        flag instead of killing the process; once one has come, checkpoint at `step` and exit
        (status 128 + signal number)."""
        import signal

        if not self.handlers_installed:
            def handler(signum, frame):
                self.signalled = signum

            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                signal.signal(signum, handler)
            self.handlers_installed = True
        if self.signalled is None:
            return
        self.checkpoint(step, agent)
        self.writer.close()
        print(f"[{self.algorithm}] stopped by {signal.Signals(self.signalled).name} after step {step}; "
              f"checkpoint written: the same command resumes the run", flush=True)
        raise SystemExit(128 + self.signalled)

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
def pretraining_key(args, fields: tuple[str, ...], data: OfflineData) -> str:
    """Hash of what a pretrained model depends on: the dataset id, the bytes of the (normalised)
    states and actions it is trained on, and the named fields of `args`. --seed is not one of them,
    so every seed and every setting of the later phases shares the model."""
    import hashlib

    digest = hashlib.sha256(args.env.encode())
    digest.update(data.observations.cpu().numpy().tobytes())
    digest.update(data.actions.cpu().numpy().tobytes())
    digest.update(repr([(f, getattr(args, f)) for f in fields]).encode())
    if getattr(args, "precision", "fp32") != "fp32":  # fp32 models keep the keys they had without the flag
        digest.update(f"precision={args.precision}".encode())
    return digest.hexdigest()[:20]


def separate_rng(seed: int, device: torch.device):
    """A block with its own torch random stream, seeded with `seed`; the run's stream is restored
    afterwards. A pretraining phase run inside it draws the same numbers whether or not the run
    later loads it from the cache, so cached and uncached runs continue identically."""
    import contextlib

    @contextlib.contextmanager
    def block():
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

    return block()


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
    import io

    buffer = io.BytesIO()
    torch.save({name: module.state_dict() for name, module in modules.items()}, buffer)
    save_cache(path, buffer.getvalue())
