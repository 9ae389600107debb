"""D4RL's own HDF5 files as Minari datasets: `--env d4rl/<name>` (e.g. d4rl/hopper-medium-replay-v2)
reads D4RL's file of that name from $D4RL_DATASET_DIR or ~/.d4rl/datasets and, on first use, writes
it into Minari's storage under the same id (common.load_dataset asks tools/make_dataset.py, which
calls this). The transitions are those of d4rl.qlearning_dataset; the eval env is the v4 MuJoCo env
(D4RL's models and observations) or Adroit v1, with D4RL's time limit and reference scores.

    python tools/make_dataset.py --id d4rl/hopper-medium-replay-v2
    python tools/make_dataset.py --id d4rl/hopper-medium-replay-v2 --d4rl-file ~/hopper_mixed.hdf5

A file replaced later is not read again: delete the Minari copy (`minari delete <id>`) first.
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import D4RL_REF_SCORES, UserError, _first_line  # noqa: E402

URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/"
ADROIT = ("pen", "hammer", "door", "relocate")
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
            v0 = task.replace("walker2d", "walker") + "_mixed" if kind == "medium_replay" \
                else f"{task}_{kind}"  # v0's medium-replay is "<task>_mixed", "walker_mixed"
            if kind != "full_replay":
                paths[name + "-v0"] = f"gym_mujoco/{v0}.hdf5"
    for task in ADROIT:
        for kind, v0 in (("human", "-v0_demos_clipped"), ("cloned", "-demos-v0-bc-combined"),
                         ("expert", "-v0_expert_clipped")):
            paths[f"{task}-{kind}-v0"] = f"hand_dapg/{task}{v0}.hdf5"
            paths[f"{task}-{kind}-v1"] = f"hand_dapg_v1/{task}-{kind}-v1.hdf5"
    return paths


def d4rl_name(dataset_id: str) -> str | None:
    """D4RL's name in `d4rl/<name>`; None for other ids (Minari's `D4RL/<task>/<name>` ports have
    two slashes)."""
    if dataset_id.lower().startswith("d4rl/") and dataset_id.count("/") == 1:
        return dataset_id.split("/", 1)[1]
    return None


def check_name(dataset_id: str) -> None:
    name, files = d4rl_name(dataset_id), d4rl_files()
    if name not in files:
        raise UserError(f"'{dataset_id}' is not a D4RL dataset read here: d4rl/<name> takes "
                        f"{{halfcheetah,hopper,walker2d}}-<kind>-v0/v2 and "
                        f"{{pen,hammer,door,relocate}}-{{human,cloned,expert}}-v0/v1; for antmaze "
                        f"and kitchen use Minari's ports (D4RL/antmaze/..., D4RL/kitchen/...)")


def find_file(dataset_id: str) -> str:
    """Where D4RL's file of `dataset_id` is, or a one-line error saying where to put it."""
    check_name(dataset_id)
    name, files = d4rl_name(dataset_id), d4rl_files()
    file = files[name].rsplit("/", 1)[1]
    dirs = [os.path.expanduser(d) for d in (os.environ.get("D4RL_DATASET_DIR"), "~/.d4rl/datasets")
            if d]
    found = [p for p in (os.path.join(d, file) for d in dirs) if os.path.isfile(p)]
    if not found:
        raise UserError(f"D4RL's file for '{dataset_id}' is not in {' or '.join(dirs)}: download "
                        f"{URL + files[name]} there (or set D4RL_DATASET_DIR)")
    return found[0]


def read_d4rl(dataset_id: str, path: str) -> dict:
    """D4RL's file at `path`, with h5py, as d4rl.qlearning_dataset made transitions: the next state
    from the file's next_observations, or else from the next row, dropping the timeouts' and the
    last row's transitions; without timeouts in the file, one every time limit. Episodes as
    Minari's: each with one more observation than actions."""
    import h5py

    name = d4rl_name(dataset_id)
    url = URL + d4rl_files()[name]
    try:
        with h5py.File(path, "r") as f:
            get = {k: np.asarray(f[k]) for k in ("observations", "actions", "rewards", "terminals",
                                                   "timeouts", "next_observations") if k in f}
        obs, actions = get["observations"].astype(np.float32), get["actions"].astype(np.float32)
        rewards = get["rewards"].reshape(-1).astype(np.float32)
        terminals = get["terminals"].reshape(-1).astype(bool)
        timeouts = get["timeouts"].reshape(-1).astype(bool) if "timeouts" in get else None
    except (OSError, KeyError, ValueError, MemoryError) as exc:
        raise UserError(f"{path} is not a whole D4RL file ({type(exc).__name__}: "
                        f"{_first_line(exc)}); download it again from {url}") from None
    n, limit, next_obs = len(rewards), D4RL_EVAL_ENVS[name.split("-")[0]][1], get.get("next_observations")
    if obs.ndim != 2 or actions.ndim != 2 or not n or not len(obs) == len(actions) == len(terminals) == n \
            or timeouts is not None and len(timeouts) != n or next_obs is not None and next_obs.shape != obs.shape:
        shapes = ", ".join(f"{k} {v.shape}" for k, v in get.items())
        raise UserError(f"{path} is not a D4RL file of transitions (one row each: {shapes}); download it "
                        f"again from {url}")
    if timeouts is None:
        first = np.maximum.accumulate(np.where(np.r_[True, terminals[:-1]], np.arange(n), 0))
        timeouts = (np.arange(n) - first) % limit == limit - 1
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
    return {"observations": states, "actions": actions[i], "rewards": rewards[i],
            "terminations": terminals[i], "truncations": ends & ~terminals[i],
            "lengths": np.diff(np.r_[-1, at])}


def make_eval_env(name: str):
    import gymnasium as gym

    task = name.split("-")[0]
    if task in ADROIT:
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)
    env_id, limit = D4RL_EVAL_ENVS[task]
    with warnings.catch_warnings():  # "v4 is out of date": chosen on purpose
        warnings.filterwarnings("ignore", message=".*out of date.*")
        return gym.make(env_id, max_episode_steps=limit)


def build_d4rl_dataset(dataset_id: str, path: str | None = None) -> None:
    """Write D4RL's file of `dataset_id` (or the file at `path`) as the Minari dataset
    `dataset_id`, with the eval env and D4RL's reference scores."""
    import minari
    from minari.data_collector import EpisodeBuffer

    check_name(dataset_id)
    path = path or find_file(dataset_id)
    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    name = d4rl_name(dataset_id)
    arrays, env = read_d4rl(dataset_id, path), make_eval_env(name)
    widths = (arrays["observations"].shape[1], arrays["actions"].shape[1])
    if widths != (env.observation_space.shape[0], env.action_space.shape[0]):
        raise UserError(f"D4RL file {path} does not fit {env.spec.id} ("
                        f"{env.observation_space.shape[0]} observations, "
                        f"{env.action_space.shape[0]} actions): it holds {widths[0]} and {widths[1]}")
    bounds = np.cumsum(np.r_[0, arrays["lengths"]])
    buffers = [EpisodeBuffer(id=e, observations=arrays["observations"][a + e:b + e + 1],
                             actions=arrays["actions"][a:b], rewards=arrays["rewards"][a:b],
                             terminations=arrays["terminations"][a:b],
                             truncations=arrays["truncations"][a:b])
               for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    ref_min, ref_max = D4RL_REF_SCORES[name.split("-")[0]]
    print(f"'{dataset_id}': writing D4RL file {path} into Minari's storage "
          f"({minari.storage.get_dataset_path(dataset_id)}); this happens once", flush=True)
    minari.create_dataset_from_buffers(
        dataset_id, buffers, env=env, eval_env=env.spec, algorithm_name="D4RL",
        author="D4RL (Fu et al. 2020)", author_email="-", code_permalink=URL + d4rl_files()[name],
        description=f"D4RL file {path} as d4rl.qlearning_dataset reads it",
        ref_min_score=ref_min, ref_max_score=ref_max)
    env.close()
