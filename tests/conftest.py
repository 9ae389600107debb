"""Tiny Minari datasets built on the fly in a temporary MINARI_DATASETS_PATH.

Each dataset is a few short episodes of random actions. The envs get a small time limit so that
episodes end by truncation (the case D4RL used to drop) and evaluation is fast."""

import importlib.util
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The networks in the tests are tiny: one thread is fastest, and PyTorch's OpenMP threads spin-wait
# so badly when the 2 cores are shared with another process that a run can be 30x slower.
torch.set_num_threads(1)


def load_algorithm(name: str):
    """Import algorithms/<name>.py as a module (the files are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "algorithms", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # torch.compile looks a traced function's globals up by module name
    spec.loader.exec_module(module)
    return module


def make_buffers(env: gym.Env, n_episodes: int, seed: int):
    from minari.data_collector import EpisodeBuffer

    rng = np.random.default_rng(seed)
    env.action_space.seed(seed)
    buffers = []
    for ep in range(n_episodes):
        obs, _ = env.reset(seed=seed + ep)
        observations, actions, rewards, terms, truncs = [obs], [], [], [], []
        while True:
            if isinstance(env.action_space, gym.spaces.Box):
                a = rng.uniform(env.action_space.low, env.action_space.high).astype(np.float32)
            else:
                a = env.action_space.sample()
            obs, r, term, trunc, _ = env.step(a)
            observations.append(obs)
            actions.append(a)
            rewards.append(r)
            terms.append(term)
            truncs.append(trunc)
            if term or trunc:
                break
        if isinstance(obs, dict):
            observations = {k: np.stack([o[k] for o in observations]) for k in obs}
        else:
            observations = np.stack(observations)
        buffers.append(EpisodeBuffer(id=ep, observations=observations, actions=np.stack(actions),
                                     rewards=np.asarray(rewards, dtype=np.float64),
                                     terminations=np.asarray(terms), truncations=np.asarray(truncs)))
    return buffers


def build_dataset(dataset_id: str, env_id: str, n_episodes: int, max_steps: int, seed: int = 0,
                  ref_scores=(0.0, 100.0)):
    import minari

    env = gym.make(env_id, max_episode_steps=max_steps)
    buffers = make_buffers(env, n_episodes, seed)
    kwargs = {}
    if ref_scores is not None:
        kwargs = {"ref_min_score": ref_scores[0], "ref_max_score": ref_scores[1]}
    minari.create_dataset_from_buffers(dataset_id, buffers, env=env, eval_env=env.spec,
                                       algorithm_name="random", author="tests",
                                       author_email="tests@localhost", description="test dataset",
                                       **kwargs)
    env.close()


@pytest.fixture(scope="session")
def datasets_path(tmp_path_factory):
    """A MINARI_DATASETS_PATH with the test datasets, shared by the whole session."""
    path = str(tmp_path_factory.mktemp("minari"))
    os.environ["MINARI_DATASETS_PATH"] = path
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)
    build_dataset("test/hopper/random-v0", "Hopper-v5", n_episodes=6, max_steps=40)
    build_dataset("test/pendulum/random-v0", "Pendulum-v1", n_episodes=4, max_steps=30)
    build_dataset("test/pointmaze/random-v0", "PointMaze_UMaze-v3", n_episodes=3, max_steps=25)
    build_dataset("test/pendulum/noref-v0", "Pendulum-v1", n_episodes=2, max_steps=10, ref_scores=None)
    build_dataset("test/cartpole/random-v0", "CartPole-v1", n_episodes=2, max_steps=10, ref_scores=None)
    return path


def run_script(args: list[str], datasets_path: str, cwd: str | None = None, timeout: int = 300):
    """Run a script of the repository as a user would, in a fresh process."""
    env = {**os.environ, "MINARI_DATASETS_PATH": datasets_path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def check_curves(run_dir, total_steps: int, phases: tuple[str, ...] = ()) -> None:
    """The run folder's tensorboard curves are the main loop's, each step once, up to `total_steps`;
    each pretraining phase's are in a folder of their own (`q_initialisation/`), whose steps also
    count from 1, so that a name both log (BRAC+'s losses/q1) is two curves, not one mixed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for folder in ("", *(p.lower().replace(" ", "_") for p in phases)):
        events = EventAccumulator(os.path.join(run_dir, folder), size_guidance={"scalars": 0})
        events.Reload()
        tags = events.Tags()["scalars"]
        assert tags and all(t.split("/")[0] in ("losses", "charts", "eval") for t in tags), (folder, tags)
        assert ("eval/normalized_score" in tags) == (folder == ""), (folder, tags)
        for tag in tags:
            steps = [e.step for e in events.Scalars(tag)]
            assert steps == sorted(set(steps)), (folder, tag, steps)
            assert folder or steps[-1] == total_steps, (tag, steps)
    subfolders = {f for f in os.listdir(run_dir) if os.path.isdir(os.path.join(run_dir, f))}
    assert subfolders == {p.lower().replace(" ", "_") for p in phases}, subfolders


def check_saved_model(run_dir) -> None:
    """The run's model.pt loads as weights only, holds tensors on the CPU alone (no numpy), and
    tools/evaluate.py's evaluation of it, with the run's seed and episodes, is the run's final one."""
    import json

    from tools.evaluate import evaluate_model

    path = os.path.join(run_dir, "model.pt")
    saved = torch.load(path, weights_only=True)
    tensors, others = [], []

    def walk(value):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif value is not None and not isinstance(value, (str, bool, int, float)):
            others.append(type(value).__name__)

    walk(saved)
    assert tensors and all(t.device.type == "cpu" for t in tensors) and not others, others
    with open(os.path.join(run_dir, "results.json")) as f:
        final = json.load(f)["evaluations"][-1]
    try:
        evaluation = evaluate_model(path)
    finally:
        torch.set_flush_denormal(False)  # as the tool sets it for its process; the other tests run without
    episodes = saved["args"].get("final_episodes") or saved["args"]["eval_episodes"]  # the final evaluation's
    assert evaluation["seed"] == saved["args"]["seed"] and evaluation["episodes"] == episodes
    for key in ("return_mean", "return_std", "normalized_score_mean", "normalized_score_std"):
        assert evaluation[key] == final[key], (key, evaluation[key], final[key])
