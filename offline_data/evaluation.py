"""`evaluate(data, policy, n_episodes, seed)`: a policy's returns and normalised score in the
dataset's evaluation env, all episodes at once in a vector env."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from offline_data.dataset import OfflineData
from offline_data.tasks import flatten_obs, goal_obs_keys


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
