"""D4RL's own HDF5 files, read with h5py alone (no d4rl, mujoco-py or gym): `--env d4rl/<name>`
(e.g. `d4rl/hopper-medium-replay-v2`) or `--env <path to one of D4RL's .hdf5 files>`.

`offline_data.load` opens the file with `open_file` and takes from `D4RLFile` what it takes from
a MinariDataset (action and observation spaces, the eval env) and, from `read()`, the flat arrays
it builds from Minari episodes, so normalisation, reward transforms and episode returns work the
same. Readable: halfcheetah, hopper and walker2d v0/v2 (evaluated in Gymnasium's v4 envs) and
Adroit pen, hammer, door, relocate v0/v1 (Gymnasium-Robotics' AdroitHand*-v1). AntMaze and
Kitchen files are refused (see REFUSED) in favour of Minari's ports.

Facts taken from D4RL's code: the file names (the last component of each dataset's URL in
d4rl/infos.py, d4rl/gym_mujoco/__init__.py and d4rl/hand_manipulation_suite/__init__.py), the
reference returns (infos.REF_MIN_SCORE / REF_MAX_SCORE: v0 and v2 locomotion share each env's
values, Adroit v1 reuses v0's), the episode limits, the dataset folder (D4RL_DATASET_DIR, default
~/.d4rl/datasets) and how `d4rl.qlearning_dataset` made transitions.
"""

from __future__ import annotations

import os
import re

import numpy as np

from offline_data.errors import UserError

# D4RL's reference returns (random and expert policies on the v2 MuJoCo envs). Minari's
# `mujoco/*-v0` datasets carry no reference scores, so these are the usual fallback; they were
# measured on older environment versions, which is why the log flags their use.
D4RL_REF_SCORES = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}
DATASET_DIR_VARIABLE = "D4RL_DATASET_DIR"
DEFAULT_DATASET_DIR = os.path.join("~", ".d4rl", "datasets")
_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/"

LOCOMOTION_EVAL_ENVS = {"halfcheetah": "HalfCheetah-v4", "hopper": "Hopper-v4", "walker2d": "Walker2d-v4"}
ADROIT_EVAL_ENVS = {"pen": "AdroitHandPen-v1", "hammer": "AdroitHandHammer-v1", "door": "AdroitHandDoor-v1",
                    "relocate": "AdroitHandRelocate-v1"}
MAX_EPISODE_STEPS = {"halfcheetah": 1000, "hopper": 1000, "walker2d": 1000,
                     "pen": 100, "hammer": 200, "door": 200, "relocate": 200}
ADROIT_REF_SCORES = {  # (random, expert) returns in D4RL's v0 Adroit envs
    "pen": (96.262799, 3076.8331017826877),
    "hammer": (-274.856578, 12794.134825156867),
    "door": (-56.512833, 2880.5693087298737),
    "relocate": (-6.425911, 4233.877797728884),
}
# Why an evaluation in today's envs would not measure the same thing as D4RL's; printed at loading.
EVAL_NOTES = {
    "locomotion": "D4RL recorded and scored it in gym's mujoco-py {task} env; Gymnasium's {eval_env} has the same "
                  "model file and observation layout on the maintained mujoco bindings (v5 changed the healthy "
                  "reward and Walker2d's foot friction, hence v4)",
    "pen": "same observations as D4RL's pen-v0, but D4RL ended an episode with -5 when the pen dropped and "
           "{eval_env} goes on (-5 per step): normalised scores are not D4RL's",
    "adroit": "same observations as D4RL's {task}-v0, but {eval_env}'s dense reward starts with +0.1 x the hand's "
              "distance where D4RL's has -0.1 x: normalised scores are not D4RL's",
}
REFUSED = {
    "antmaze": "D4RL's antmaze states are 29 numbers in D4RL's own maze frame (origin at the start cell) without "
               "the goal, and Gymnasium-Robotics' AntMaze has another frame, ant model and goal radius, so a "
               "policy trained on them cannot be evaluated consistently",
    "kitchen": "D4RL's kitchen states are 60 numbers (robot and object positions, then a 30-number goal), while "
               "Gymnasium-Robotics' FrankaKitchen-v1 observes 59 positions and velocities with the goals as "
               "dicts, so a policy trained on them cannot be evaluated there",
}


def _file_paths() -> dict[str, str]:
    """D4RL dataset name -> its URL's path below _URL (the file name is its last component)."""
    paths = {}
    for env in LOCOMOTION_EVAL_ENVS:
        for kind in ("random", "medium", "expert", "medium-replay", "medium-expert", "full-replay"):
            paths[f"{env}-{kind}-v2"] = f"gym_mujoco_v2/{env}_{kind.replace('-', '_')}-v2.hdf5"
            if kind != "full-replay":  # v0's medium-replay files are "<env>_mixed", walker2d's "walker_mixed"
                v0 = (env.replace("walker2d", "walker") + "_mixed" if kind == "medium-replay"
                      else f"{env}_{kind.replace('-', '_')}")
                paths[f"{env}-{kind}-v0"] = f"gym_mujoco/{v0}.hdf5"
    for task in ADROIT_EVAL_ENVS:
        paths[f"{task}-human-v0"] = f"hand_dapg/{task}-v0_demos_clipped.hdf5"
        paths[f"{task}-cloned-v0"] = f"hand_dapg/{task}-demos-v0-bc-combined.hdf5"
        paths[f"{task}-expert-v0"] = f"hand_dapg/{task}-v0_expert_clipped.hdf5"
        for kind in ("human", "cloned", "expert"):
            paths[f"{task}-{kind}-v1"] = f"hand_dapg_v1/{task}-{kind}-v1.hdf5"
    return paths


FILE_PATHS = _file_paths()
FILE_NAMES = {name: path.rsplit("/", 1)[1] for name, path in FILE_PATHS.items()}
_NAMES_BY_FILE = {file: name for name, file in FILE_NAMES.items()}


def dataset_name(dataset_id: str) -> str | None:
    """The D4RL dataset name of `d4rl/<name>` or of a path to a .hdf5 file named as D4RL names it
    ("" for a .hdf5 file D4RL does not name so); None for anything else (Minari ids, including
    Minari's `D4RL/<task>/<name>` ports, which have two slashes)."""
    if dataset_id.endswith(".hdf5"):
        file = os.path.basename(dataset_id)
        if file in _NAMES_BY_FILE:
            return _NAMES_BY_FILE[file]
        # D4RL's antmaze (Ant_maze_*) and kitchen (*kitchen*) files: named by their task, to be refused
        lowered = file.lower()
        return "antmaze" if lowered.startswith("ant_maze") else "kitchen" if "kitchen" in lowered else ""
    if dataset_id.lower().startswith("d4rl/") and dataset_id.count("/") == 1:
        return dataset_id.split("/", 1)[1]
    return None


def search_dirs() -> list[str]:
    dirs = [os.environ[DATASET_DIR_VARIABLE]] if os.environ.get(DATASET_DIR_VARIABLE) else []
    return [os.path.expanduser(d) for d in dirs + [DEFAULT_DATASET_DIR]]


def find_file(name: str) -> str | None:
    """The path of D4RL's file for dataset `name`, if it is in one of `search_dirs()`."""
    for folder in search_dirs():
        path = os.path.join(folder, FILE_NAMES.get(name, "?"))
        if os.path.isfile(path):
            return path
    return None


def _check_readable(dataset_id: str, name: str) -> None:
    task = name.split("-")[0]
    if task in REFUSED:
        match = re.fullmatch(rf"{task}-(.+)-v\d+", name)
        minari_id = f"D4RL/{task}/{match[1] if match else '<kind>'}-{'v1' if task == 'antmaze' else 'v2'}"
        raise UserError(f"'{dataset_id}' is not read here: {REFUSED[task]}; use Minari's port {minari_id} instead.")
    if name not in FILE_PATHS:
        if dataset_id.endswith(".hdf5"):
            raise UserError(f"{dataset_id}: not a file name D4RL uses for a dataset read here (e.g. "
                            f"{FILE_NAMES['hopper-medium-replay-v2']}); pass --env d4rl/<name> with the file in "
                            f"{' or '.join(search_dirs())}, under D4RL's name.")
        import difflib

        close = difflib.get_close_matches(name, list(FILE_PATHS), n=3)
        hint = f" (did you mean {', '.join('d4rl/' + c for c in close)}?)" if close else ""
        raise UserError(f"'{dataset_id}' is not a D4RL dataset read here{hint}: d4rl/ takes "
                        f"{{halfcheetah,hopper,walker2d}}-<kind>-v0/v2 and {{pen,hammer,door,relocate}}-"
                        f"{{human,cloned,expert}}-v0/v1.")


def open_file(dataset_id: str) -> D4RLFile:
    """A D4RLFile for `d4rl/<name>` or a path; a one-line UserError when the dataset is refused or
    its file is missing."""
    name = dataset_name(dataset_id)
    _check_readable(dataset_id, name)
    if dataset_id.endswith(".hdf5"):
        if not os.path.isfile(dataset_id):
            raise UserError(f"no such file: {dataset_id}")
        return D4RLFile(name, dataset_id)
    path = find_file(name)
    if path is None:
        dirs = search_dirs()
        where = f"in neither {dirs[0]} nor {dirs[1]}" if len(dirs) == 2 else (
            f"not in {dirs[0]} (${DATASET_DIR_VARIABLE} is not set)")
        raise UserError(
            f"D4RL's file {FILE_NAMES[name]} for '{dataset_id}' is {where}. Get it with `python -c \"import "
            f"d4rl, gym; gym.make('{name}').get_dataset()\"` on a machine with d4rl (it saves it in "
            f"~/.d4rl/datasets), or download {_URL}{FILE_PATHS[name]}, and copy it into {search_dirs()[0]}.")
    return D4RLFile(name, path)


class D4RLFile:
    """One D4RL file, with what `offline_data.load` and `common.evaluate` use of a MinariDataset:
    `action_space`, `observation_space`, `env_spec` and `recover_environment()` (the closest
    Gymnasium env, with D4RL's episode limit)."""

    def __init__(self, name: str, path: str):
        import gymnasium as gym

        self.name, self.path = name, os.path.abspath(path)
        self.task = name.split("-")[0]
        if self.task in ADROIT_EVAL_ENVS:
            import gymnasium_robotics

            gym.register_envs(gymnasium_robotics)
            self.eval_env_id = ADROIT_EVAL_ENVS[self.task]
            self.ref_scores = ADROIT_REF_SCORES[self.task]
            note = EVAL_NOTES["pen" if self.task == "pen" else "adroit"]
        else:
            self.eval_env_id = LOCOMOTION_EVAL_ENVS[self.task]
            self.ref_scores = D4RL_REF_SCORES[self.task]
            note = EVAL_NOTES["locomotion"]
        self.eval_note = note.format(task=self.task, eval_env=self.eval_env_id)
        self.env_spec = gym.spec(self.eval_env_id)
        env = self.recover_environment()
        self.action_space, self.observation_space = env.action_space, env.observation_space
        env.close()
        self.source = f"D4RL file {self.path}"  # read() adds where the next observations came from

    def recover_environment(self, eval_env: bool = True):
        import warnings

        import gymnasium as gym

        with warnings.catch_warnings():  # "v4 is out of date": chosen on purpose, and said so at loading
            warnings.filterwarnings("ignore", message=".*out of date.*")
            return gym.make(self.eval_env_id, max_episode_steps=MAX_EPISODE_STEPS[self.task])

    def read(self) -> dict:
        """The flat arrays of `minari_datasets.read_episodes` (T + 1 observations per episode).

        Transitions as the papers used them: the next observation comes from the file's
        `next_observations` when it has them (every transition kept); otherwise from the next row,
        and, as d4rl.qlearning_dataset does, a transition marked as a timeout (its next row starts
        another episode) and the file's last row are dropped. Files without `timeouts` get them
        every episode limit, counted from each terminal, again as qlearning_dataset does."""
        import h5py

        try:
            with h5py.File(self.path, "r") as f:
                missing = [k for k in ("observations", "actions", "rewards", "terminals") if k not in f]
                if missing:
                    raise UserError(f"{self.path} is not a D4RL dataset file: it has no {', '.join(missing)}.")
                obs = np.asarray(f["observations"], dtype=np.float32)
                actions = np.asarray(f["actions"], dtype=np.float32)
                rewards = np.asarray(f["rewards"], dtype=np.float32).reshape(-1)
                terminals = np.asarray(f["terminals"]).reshape(-1).astype(bool)
                timeouts = np.asarray(f["timeouts"]).reshape(-1).astype(bool) if "timeouts" in f else None
                next_obs = np.asarray(f["next_observations"], dtype=np.float32) if "next_observations" in f else None
        except (OSError, KeyError) as exc:  # h5py's errors for a truncated or corrupted file
            reason = (str(exc).strip().splitlines() or [""])[0][:160]
            raise UserError(f"{self.path} is damaged: it could not be read ({type(exc).__name__}: {reason}); "
                            f"download it again from {_URL}{FILE_PATHS[self.name]}") from None
        n, obs_dim, act_dim = len(rewards), self.observation_space.shape[0], self.action_space.shape[0]
        expected = {"observations": (n, obs_dim), "actions": (n, act_dim), "terminals": (n,)}
        found = {"observations": obs.shape, "actions": actions.shape, "terminals": terminals.shape}
        if next_obs is not None:
            expected["next_observations"], found["next_observations"] = (n, obs_dim), next_obs.shape
        if timeouts is not None:
            expected["timeouts"], found["timeouts"] = (n,), timeouts.shape
        wrong = [f"{k} {found[k]} (expected {v})" for k, v in expected.items() if found[k] != v]
        if wrong:
            raise UserError(f"{self.path} does not fit {self.eval_env_id} ({obs_dim} observations, {act_dim} actions) "
                            f"for {n} rewards: {', '.join(wrong)}.")
        if timeouts is None:
            timeouts = _counted_timeouts(terminals, MAX_EPISODE_STEPS[self.task])
            how_timeouts = f"; timeouts every {MAX_EPISODE_STEPS[self.task]} steps (the file has none)"
        else:
            how_timeouts = ""
        if next_obs is None:
            keep = ~timeouts
            keep[-1] = False
            next_obs = np.concatenate([obs[1:], obs[-1:]])
            how = (f"next observations from the next row, as d4rl.qlearning_dataset (the file has no "
                   f"next_observations): {n - int(keep.sum())} transitions cut by a timeout or the file's end dropped")
        else:
            keep = np.ones(n, dtype=bool)
            how = "next observations from the file's next_observations, every transition kept"
        idx = np.flatnonzero(keep)
        if len(idx) == 0:
            raise UserError(f"{self.path} contains no transitions.")
        # A transition ends its episode at a terminal or timeout, before a dropped row, or where its
        # next observation is not the next row's: the T + 1 layout then reproduces every pair exactly.
        ends = np.ones(len(idx), dtype=bool)
        this, following = idx[:-1], idx[1:]
        ends[:-1] = (terminals[this] | timeouts[this] | (following != this + 1)
                     | np.any(next_obs[this] != obs[this + 1], axis=1))
        end_at = np.flatnonzero(ends)
        episode = np.cumsum(ends) - ends
        observations = np.empty((len(idx) + len(end_at), obs_dim), dtype=np.float32)
        observations[np.arange(len(idx)) + episode] = obs[idx]
        observations[end_at + np.arange(len(end_at)) + 1] = next_obs[idx[end_at]]
        self.source += f"; {how}{how_timeouts}"
        print(f"[d4rl] {self.name}: {self.path}; {how}{how_timeouts}", flush=True)
        print(f"[d4rl] evaluated in {self.eval_env_id}: {self.eval_note}", flush=True)
        return {
            "observations": observations,
            "actions": actions[idx],
            "rewards": rewards[idx],
            "terminals": terminals[idx].astype(np.float32),
            # every episode that does not terminate is cut: a timeout, bootstrapped from its next observation
            "timeouts": (ends & ~terminals[idx]).astype(np.float32),
            "lengths": np.diff(np.concatenate([[-1], end_at])).astype(np.int64),
        }


def _counted_timeouts(terminals: np.ndarray, limit: int) -> np.ndarray:
    """True at every `limit`-th step of an episode, the step count restarting after each terminal."""
    n = len(terminals)
    starts = np.concatenate([[True], terminals[:-1]])
    episode_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    return (np.arange(n) - episode_start) % limit == limit - 1
