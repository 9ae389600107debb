"""What a dataset id and its observation space say: the task, and how observations are flattened.

Goal-conditioned Dict observations are flattened to concat(observation, desired_goal), and for
AntMaze to concat(achieved_goal, observation, desired_goal) (see `goal_obs_keys`).
"""

from __future__ import annotations

import numpy as np

from offline_data import d4rl
from offline_data.errors import UserError


def dataset_task(dataset_id: str) -> str:
    """The task component of a dataset id, lower-cased: 'D4RL/pen/human-v2' -> 'pen'.

    Minari ids are `namespace/task/name-vN` (or `task/name-vN`); per-domain settings match this
    component exactly, so that 'pendulum' is not 'pen'. An id without '/' (Minari's older
    'task-name-vN' form), and a D4RL file's name ('d4rl/hopper-medium-v2' or its path), give the
    part before its first '-'."""
    d4rl_name = d4rl.dataset_name(dataset_id)
    if d4rl_name:
        return d4rl_name.split("-")[0].lower()
    parts = dataset_id.lower().split("/")
    return parts[-2] if len(parts) > 1 else parts[0].split("-")[0]


def is_antmaze(dataset_id: str) -> bool:
    return dataset_task(dataset_id) == "antmaze"


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


def flat_obs_dim(space, dataset_id: str, keys: tuple[str, ...]) -> int:
    """The length of a flattened observation of `space`; a one-line UserError for any other space."""
    from gymnasium import spaces

    if isinstance(space, spaces.Box) and len(space.shape) == 1:
        return space.shape[0]
    if isinstance(space, spaces.Dict) and set(keys) <= set(space.spaces):
        return sum(flat_obs_dim(space[k], dataset_id, keys) for k in keys)
    raise UserError(
        f"dataset '{dataset_id}' has observation space {space}; only flat Box observations or Dict "
        f"observations with {', '.join(repr(k) for k in keys)} (goal-conditioned) are supported."
    )


def flatten_obs(obs, keys: tuple[str, ...] = ("observation", "desired_goal")) -> np.ndarray:
    """Dict observations (goal-conditioned) -> the concatenation of `keys` (`goal_obs_keys`), as float32."""
    if isinstance(obs, dict):
        obs = np.concatenate([obs[k] for k in keys], axis=-1)
    return np.asarray(obs, dtype=np.float32)
