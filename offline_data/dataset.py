"""`load(dataset_id, device)`: any dataset id to an `OfflineData` of flat float32 tensors.

The sources: D4RL's own HDF5 files (`d4rl/<name>` or a path, d4rl.py), `local/...` ids built on
first use from the shipped snapshots (recipe.py), and Minari datasets, local or downloaded
(minari_datasets.py). Whatever the source, the flat arrays are checked once (flat.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import numpy as np
import torch

from offline_data import d4rl, flat, minari_datasets, recipe
from offline_data.errors import UserError, waiting_lock
from offline_data.tasks import flat_obs_dim, goal_obs_keys


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
    # the minari.MinariDataset, for recovering the eval env; for a D4RL file, a d4rl.D4RLFile,
    # which offers the same env_spec and recover_environment
    minari_dataset: Any
    source: str = "minari"  # or "D4RL file <path>; <where the next observations came from>"
    eval_env: str | None = None  # the id of the env evaluations run in
    # sha256 of the loaded states and actions as read (before any device, normalisation or reward
    # transform): the same on every machine, so pretrained models are cached under it
    fingerprint: str = ""
    obs_normalized: bool = False  # set by common.normalize_obs

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]

    def __len__(self) -> int:
        return self.observations.shape[0]


def open_source(dataset_id: str):
    """The dataset behind an id: a `d4rl.D4RLFile` for D4RL's files; else a `minari.MinariDataset`,
    the local copy, a `local/...` id built from the shipped snapshots on first use, or a download."""
    if d4rl.dataset_name(dataset_id) is not None:
        return d4rl.open_file(dataset_id)
    if dataset_id.startswith("local/"):
        # Runs started together on a new machine (benchmark.sh, two seeds) would build it at once,
        # and all but one would fail: the first builds, the others wait for it and load its copy.
        # A copy being written already looks stored, so the check waits for the lock too.
        lock = os.path.join(minari_datasets.datasets_root(), ".build-" + dataset_id.replace("/", "-") + ".lock")
        with waiting_lock(lock, f"[{dataset_id}] another process is building it: waiting for that copy"):
            if not minari_datasets.stored(dataset_id):
                recipe.build_local_dataset(dataset_id)  # local/* ids are never remote
    return minari_datasets.open_dataset(dataset_id)


def load(dataset_id: str, device: str | torch.device = "cpu") -> OfflineData:
    """Load a dataset id into flat float32 tensors on `device` (one pass over episodes)."""
    from gymnasium import spaces

    dataset = open_source(dataset_id)
    d4rl_file = dataset if isinstance(dataset, d4rl.D4RLFile) else None
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
    obs_dim = flat_obs_dim(dataset.observation_space, dataset_id, keys)

    arrays = d4rl_file.read() if d4rl_file else flat.read_cache(dataset, obs_dim)
    if arrays is None:
        arrays = minari_datasets.read_episodes(dataset, dataset_id, obs_dim, keys)
        flat.write_cache(dataset, arrays)
    arrays = flat.check_arrays(arrays, dataset_id, action_space.low, action_space.high)
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

    if d4rl_file:
        ref_min, ref_max, source = *d4rl_file.ref_scores, "D4RL constants (infos.py)"
    else:
        ref_min, ref_max, source = minari_datasets.reference_scores(dataset, dataset_id)

    def t(x):
        return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32, device=device)

    fingerprint = hashlib.sha256()
    for x in (arrays["observations"], actions, lengths):
        fingerprint.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())

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
        eval_env=d4rl_file.eval_env_id if d4rl_file else minari_datasets.eval_env_id(dataset),
        fingerprint=fingerprint.hexdigest(),
    )
