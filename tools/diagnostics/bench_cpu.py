"""Speed of each algorithm's training step: steps/s, FLOPs per step, achieved GFLOP/s, the fraction
of this machine's fp32 matmul peak, measured in the same run, and the steps/s that peak would give.

    OMP_NUM_THREADS=2 python tools/diagnostics/bench_cpu.py --threads 2 --steps 500
    OMP_NUM_THREADS=1 python tools/diagnostics/bench_cpu.py --threads 1 --algorithms cql itrpo --steps 50
    python tools/diagnostics/bench_cpu.py --algorithms td3_bc --compile --warmup 50
    OMP_NUM_THREADS=2 python tools/diagnostics/bench_cpu.py --threads 2 --precision bf16 --algorithms cql brac_plus

Builds a synthetic Minari dataset with HalfCheetah-v5's dimensions (17 / 6) and 200k transitions in a
temporary MINARI_DATASETS_PATH (random numbers: only the sizes matter), and times `common.load_dataset`
on it (it reads the episodes; there is no cache of the flat arrays).
The peak is the best of a few 2048 x 2048 x 2048 fp32 matmuls. Then, for each file: its agent with the
default settings (per-domain defaults for halfcheetah), batches from `common.ReplayBuffer`, `--warmup`
untimed steps, then `--steps` timed ones. FLOPs are counted by torch.utils.flop_counter.FlopCounterMode
over two more steps of an eager copy of the agent, averaged (TD3+BC steps its actor every second step);
it counts matrix products only, which is what the peak measures too.

Only the RL updates are timed: behaviour models, VAEs and score models keep their initial weights,
frozen as after their phase, CQL's behaviour-cloning warm-up is skipped, and ARQ's support set is random
actions. That changes the values computed, not the work.
"""

import importlib.util
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from tools.pretraining import BC_WARMUP  # noqa: E402

ALGORITHMS = tuple(sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "algorithms")) if f.endswith(".py")))
DATASET_ID = "bench/halfcheetah/synthetic-v0"


@dataclass
class Args:
    algorithms: tuple[str, ...] = ALGORITHMS
    """algorithm files to time (an empty tuple times only the loading and the peak)"""
    steps: int = 200
    """timed gradient steps per algorithm"""
    warmup: int = 20
    """untimed steps before them (with --compile, enough for every graph to be compiled)"""
    threads: int = 0
    """torch threads (0: PyTorch's default, i.e. OMP_NUM_THREADS); set OMP_NUM_THREADS to the same"""
    transitions: int = 200_000
    """size of the synthetic dataset"""
    episode_length: int = 1000
    """steps per episode (the last one of each is a truncation)"""
    device: str = "cpu"
    """torch device of the agents and the peak matmul"""
    compile: bool = False
    """time the agents with --compile"""
    precision: common.Precision = "fp32"
    """time the agents with --precision (fp32, tf32 or bf16; tf32 is fp32 on a CPU); the peak is then a matmul
    under the same autocast"""


def build(dataset_id: str, transitions: int, episode_length: int) -> None:
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    env = gym.make("HalfCheetah-v5")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    ref_min, ref_max = common.D4RL_REF_SCORES["halfcheetah"]
    rng = np.random.default_rng(0)
    buffers = []
    for i in range(max(transitions // episode_length, 1)):
        n = min(episode_length, transitions)
        truncations = np.zeros(n, dtype=bool)
        truncations[-1] = True
        buffers.append(EpisodeBuffer(
            id=i, observations=rng.standard_normal((n + 1, obs_dim)),
            actions=rng.uniform(-1, 1, (n, act_dim)).astype(np.float32), rewards=rng.standard_normal(n),
            terminations=np.zeros(n, dtype=bool), truncations=truncations))
    minari.create_dataset_from_buffers(dataset_id, buffers, env=env, eval_env=env.spec, author="bench",
                                       author_email="bench@localhost", algorithm_name="synthetic",
                                       description="random numbers with HalfCheetah-v5's dimensions",
                                       ref_min_score=ref_min, ref_max_score=ref_max)


def load_algorithm(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "algorithms", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # torch.compile looks a traced function's globals up by module name
    spec.loader.exec_module(module)
    return module


def agent_class(module):
    """The file's agent: the class defined there with an `act` method (networks have none)."""
    classes = [v for v in vars(module).values()
               if isinstance(v, type) and v.__module__ == module.__name__ and hasattr(v, "act")]
    assert len(classes) == 1, [c.__name__ for c in classes]
    return classes[0]


def prepare(name: str, data: common.OfflineData, device: torch.device, compile: bool = False,
            precision: str = "fp32", **overrides):
    """An agent of `name` with its default settings, ready for RL updates, and its replay buffer."""
    module = load_algorithm(name)
    args = module.Args(env=data.dataset_id, **overrides)
    args.compile = compile  # set, not passed: an Args without the field (another checkout's file) still works
    if precision != "fp32":
        args.precision = precision
    if hasattr(module, "domain_defaults"):
        for k, v in module.domain_defaults(data.dataset_id).items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    if name in BC_WARMUP:
        setattr(args, BC_WARMUP[name].lstrip("-").replace("-", "_"), 0)
    agent = agent_class(module)(args, data.obs_dim, data.act_dim, device)
    for pretrained in ("behavior", "score"):  # frozen after their phase, as in the scripts
        if hasattr(agent, pretrained):
            getattr(agent, pretrained).requires_grad_(False)
    buffer = common.ReplayBuffer(data)
    if hasattr(module, "SupportReplayBuffer"):  # ARQ: random actions in place of the sampled support
        states, next_row = module.support_states(data)
        gen = torch.Generator(device).manual_seed(0)
        samples = torch.rand(len(states), args.n_support, data.act_dim, device=device, generator=gen) * 2 - 1
        log_likelihoods = torch.zeros(len(states), args.n_support, device=device)
        support = module.build_support(data.actions, samples, log_likelihoods, args.log_likelihood_threshold, next_row)
        buffer = module.SupportReplayBuffer(data, support)
    return agent, buffer, args.batch_size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_per_second(agent, buffer, batch_size: int, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        agent.train(buffer.sample(batch_size))
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        agent.train(buffer.sample(batch_size))
    sync(device)
    return steps / (time.perf_counter() - start)


class GlobalTotalOnly:
    """Stands in for FlopCounterMode's module tracker: the tracker's per-module backward hooks make
    torch.autograd.grad(create_graph=True), which the gradient penalties call, fail; the total needs none."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def flops_per_step(agent, buffer, batch_size: int, steps: int = 2) -> float:
    """Matmul FLOPs of a training step (forward and backward), averaged over `steps` steps."""
    batches = [buffer.sample(batch_size) for _ in range(steps)]
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = GlobalTotalOnly()
    with counter:
        for batch in batches:
            agent.train(batch)
    return counter.get_total_flops() / steps


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 5, precision: str = "fp32") -> float:
    """FLOP/s of the fastest of `repeats` n x n x n matmuls of fp32 tensors (under the autocast of
    --precision bf16 for bf16), after one untimed."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        a @ b
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            a @ b
            sync(device)
            best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


if __name__ == "__main__":
    common.install_user_error_hook()
    args = tyro.cli(Args)
    unknown = [a for a in args.algorithms if a not in ALGORITHMS]
    if unknown:
        raise common.UserError(f"unknown algorithm '{unknown[0]}'; choose from {', '.join(ALGORITHMS)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    torch.set_flush_denormal(True)  # as common.seed_everything in the files
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MINARI_DATASETS_PATH"] = tmp
        t0 = time.time()
        build(DATASET_ID, args.transitions, args.episode_length)
        print(f"built {args.transitions} transitions in {time.time() - t0:.1f}s")
        t0 = time.time()
        data = common.load_dataset(DATASET_ID, device)
        print(f"load (reads the episodes): {len(data)} transitions, {len(data.episode_lengths)} episodes in "
              f"{time.time() - t0:.2f}s")
        peak = matmul_peak(device, precision=args.precision)
        print(f"\n{torch.get_num_threads()} threads, device {device}, {args.precision} matmul peak {peak / 1e9:.1f} "
              f"GFLOP/s; obs {data.obs_dim}, act {data.act_dim}, {len(data)} transitions; {args.steps} timed steps "
              f"after {args.warmup}{', --compile' if args.compile else ''}, --precision {args.precision}\n")
        # steps/s at peak: the rate if every matrix product ran at the peak and nothing else took time,
        # the ceiling of this file's step on this machine at this precision.
        print("| file | batch | steps/s | GFLOP/step | GFLOP/s | of peak | steps/s at peak |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name in args.algorithms:
            torch.manual_seed(0)
            agent, buffer, batch_size = prepare(name, data, device, compile=args.compile, precision=args.precision)
            sps = steps_per_second(agent, buffer, batch_size, args.steps, args.warmup, device)
            eager, buffer, batch_size = prepare(name, data, device)  # FlopCounterMode sees eager ops only
            flops = flops_per_step(eager, buffer, batch_size)
            print(f"| {name} | {batch_size} | {sps:.1f} | {flops / 1e9:.3f} | {flops * sps / 1e9:.1f} | "
                  f"{flops * sps / peak:.1%} | {peak / flops:.0f} |", flush=True)
