"""Measure dataset load time and gradient steps per second (SPS) of each algorithm.

    python tools/bench_cpu.py                       # 1M transitions, every algorithm, 2000 steps
    python tools/bench_cpu.py --algorithms iql --steps 5000 --device cuda

Builds a synthetic Minari dataset with Hopper-v5's spaces (random numbers: only its size matters)
in a temporary MINARI_DATASETS_PATH, times `common.load_dataset` on it twice (the first load reads
the episodes and writes the flat cache, the second reads the cache), then runs each algorithm
file with its default network sizes and batch size for `--steps` gradient steps and reports
steps / training seconds (evaluation time excluded) from the run's results.json.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from tools.pretraining import shrink_flags  # noqa: E402


@dataclass
class Args:
    transitions: int = 1_000_000
    """size of the synthetic dataset"""
    episode_length: int = 1000
    """steps per episode (the last one of each is a truncation)"""
    algorithms: tuple[str, ...] = ("bc", "td3_bc", "awr", "iql")
    """algorithm files to time (an empty tuple times only the loading)"""
    steps: int = 2000
    """gradient steps per algorithm"""
    device: str = "auto"
    """--device passed to the algorithms"""
    bc_steps: int = 100
    """steps of every phase besides the RL updates (tools/pretraining.py), which are what is timed"""


def build(dataset_id: str, transitions: int, episode_length: int) -> None:
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    env = gym.make("Hopper-v5")
    ref_min, ref_max = common.D4RL_REF_SCORES["hopper"]
    rng = np.random.default_rng(0)
    buffers = []
    for i in range(transitions // episode_length):
        n = episode_length
        truncations = np.zeros(n, dtype=bool)
        truncations[-1] = True
        buffers.append(EpisodeBuffer(
            id=i, observations=rng.standard_normal((n + 1, 11)), actions=rng.uniform(-1, 1, (n, 3)).astype(np.float32),
            rewards=rng.standard_normal(n), terminations=np.zeros(n, dtype=bool), truncations=truncations))
    minari.create_dataset_from_buffers(dataset_id, buffers, env=env, eval_env=env.spec, author="bench",
                                       author_email="bench@localhost", algorithm_name="synthetic",
                                       ref_min_score=ref_min, ref_max_score=ref_max)


if __name__ == "__main__":
    common.install_user_error_hook()
    args = tyro.cli(Args)
    available = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "algorithms")) if f.endswith(".py"))
    unknown = [a for a in args.algorithms if a not in available]
    if unknown:
        raise common.UserError(f"unknown algorithm '{unknown[0]}'; choose from {', '.join(available)}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MINARI_DATASETS_PATH"] = tmp
        dataset_id = "bench/hopper/synthetic-v0"
        t0 = time.time()
        build(dataset_id, args.transitions, args.episode_length)
        print(f"built {args.transitions} transitions in {time.time() - t0:.1f}s")
        for what in ("first load (reads the episodes, writes the flat cache)", "second load (cache)"):
            t0 = time.time()
            data = common.load_dataset(dataset_id)
            print(f"{what}: {len(data)} transitions, {len(data.episode_lengths)} episodes "
                  f"in {time.time() - t0:.2f}s")
            del data
        for algorithm in args.algorithms:
            out = os.path.join(tmp, "runs")
            subprocess.run(
                [sys.executable, os.path.join(ROOT, "algorithms", f"{algorithm}.py"), "--env", dataset_id,
                 "--total-steps", str(args.steps), "--eval-every", str(args.steps), "--eval-episodes", "1",
                 "--log-every", str(args.steps), "--device", args.device, "--output-dir", out,
                 "--run-name", algorithm,
                 *shrink_flags(algorithm, args.bc_steps)],
                check=True, capture_output=True)
            with open(os.path.join(out, algorithm, "results.json")) as f:
                results = json.load(f)
            print(f"{algorithm}: {args.steps / results['train_seconds']:.0f} SPS "
                  f"({args.steps} steps, batch {results['args']['batch_size']})", flush=True)
