"""Time every algorithm file's main-loop step on a prebuilt dataset: eager and --compile, each after
warm-up (tools/gpu_check.sh runs it; docs/speed.md, "GPU").

    python tools/gpu_timing.py --out results/gpu_check                 # MINARI_DATASETS_PATH holds the dataset
    python tools/gpu_timing.py --build-only --transitions 20000        # builds it (tools/gpu_prepare.sh)

Each row: steps/s of `agent.train(buffer.sample(batch_size))` (batch sampling included, as the files' loops run it),
GPU minutes per 1M steps, device kernels per step and the GPU's time in them (torch.profiler), the
host's time to issue one step into an idle queue (near the step's time when the host is the bound,
GPU busy time near it when the GPU is), peak GPU memory (the dataset on the device included). The
header gives the commit and the wall time of one launch of the smallest kernel. The agents are
bench_cpu.py's: default sizes, the RL updates alone, behaviour models frozen. Modes run in turn
over all files (eager first, then graphs: --compile with CUDA graphs, then --compile; the compiled
modes are the slowest to warm up), and a measurement that would start past --deadline is marked
skipped, so that the table always comes back within the time a device call has. --small, --device
cpu and --compile-backend eager make the CPU dry run (tools/gpu_check.sh --cpu-dry-run).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import tyro
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from tools.diagnostics.bench_cpu import ALGORITHMS, build, prepare, sync  # noqa: E402

DATASET_ID = "gpu-check/halfcheetah/synthetic-v0"
MODES = ("eager", "graphs", "compile")  # graphs before compile: its numbers are the newer
# Network sizes of the dry run (tests/test_precision.py's SMALL): seconds on a CPU, the same code.
SMALL = {"bc": dict(hidden_dim=32), "td3_bc": dict(hidden_dim=32), "awr": dict(hidden_dim=32),
         "iql": dict(hidden_dim=32), "cql": dict(hidden_dim=32, n_actions=4), "fisher_brc": dict(hidden_dim=32),
         "itrpo": dict(hidden_dim=32, n_samples=4),
         "brac_plus": dict(hidden_dim=16, actor_hidden_dim=16, vae_hidden_dim=16, n_samples=3, n_latent=2),
         "arq": dict(hidden_dim=32, score_hidden_dim=8, score_blocks=1, n_support=4)}


@dataclass
class Args:
    out: str = "results/gpu_check"
    """folder of timing.json and timing.md"""
    algorithms: tuple[str, ...] = ALGORITHMS
    modes: tuple[str, ...] = MODES
    steps: int = 300
    """timed steps per file and mode"""
    warmup: int = 30
    """untimed steps before them (compiles)"""
    profile_steps: int = 10
    """steps under torch.profiler for the kernel count"""
    device: str = "cuda"
    deadline: float = 0.0
    """unix time after which no measurement starts (0: none)"""
    small: bool = False
    """small networks (the CPU dry run)"""
    compile_backend: str = "inductor"
    """torch.compile's backend; eager: Dynamo alone (the CPU dry run, seconds instead of minutes)"""
    transitions: int = 20_000
    """size of the synthetic dataset, built if MINARI_DATASETS_PATH lacks it"""
    build_only: bool = False
    """build the dataset and exit"""


def main_loop_step(name: str, data: common.OfflineData, device: torch.device, mode: str, small: bool):
    """The file's main-loop step, as its __main__ runs it: eager, with --compile, or (graphs) with
    --compile in torch.compile's mode="reduce-overhead", each update's graph replayed as a CUDA graph
    (docs/usage.md, "CUDA graphs"; each step marked as a new one, so that a replay may reuse the
    memory of the step before)."""
    compile_ = torch.compile
    if mode == "graphs" and not isinstance(compile_, functools.partial):  # the dry run's eager backend takes no mode
        torch.compile = functools.partial(compile_, mode="reduce-overhead")
    try:
        agent, buffer, batch_size = prepare(name, data, device, compile=mode != "eager", **(SMALL[name] if small else {}))
    finally:
        torch.compile = compile_
    if mode == "graphs":
        return lambda: (torch.compiler.cudagraph_mark_step_begin(), agent.train(buffer.sample(batch_size)))[1]
    return lambda: agent.train(buffer.sample(batch_size))


def device_work(step, steps: int, device: torch.device) -> tuple[float | None, float | None]:
    """Device kernels, copies and memsets per step, and the microseconds the GPU spends in them, as
    torch.profiler sees them (None, None on a CPU)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    if device.type != "cuda":
        return None, None
    # annotation spans (record_function ranges, each optimiser step's) lie over kernels counted already
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    return len(kernels) / steps, sum(e.time_range.elapsed_us() for e in kernels) / steps


def launch_us(device: torch.device, n: int = 500) -> float:
    """Wall time of one launch of the smallest kernel (an in-place add on one element), n launches
    into an idle queue (CUDA's holds about a thousand): the host's floor under every kernel."""
    x = torch.zeros(1, device=device)
    for _ in range(100):
        x.add_(1)
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    issued = time.perf_counter()
    sync(device)
    return (issued - start) / n * 1e6


def host_us(step, device: torch.device, n: int = 20) -> float:
    """Median wall time the host takes to issue one step into an idle queue (synced before each),
    so that a full launch queue cannot hold it back: near the step's time when the host is the bound."""
    times = []
    for _ in range(n):
        sync(device)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    sync(device)
    return sorted(times)[n // 2] * 1e6


def measure(name: str, mode: str, data, device: torch.device, args: Args) -> dict:
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    step = main_loop_step(name, data, device, mode, args.small)
    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    sps = args.steps / (time.perf_counter() - start)
    metrics = {k: float(v) for k, v in step().items()}
    bad = [k for k, v in metrics.items() if v != v or abs(v) == float("inf")]
    if bad:
        raise ValueError(f"{bad[0]} is {metrics[bad[0]]}")
    kernels, busy = device_work(step, args.profile_steps, device)
    row = {"file": name, "mode": mode, "steps_per_s": sps, "gpu_minutes_per_1m": 1e6 / sps / 60,
           "kernels_per_step": kernels, "gpu_busy_us_per_step": busy,
           "host_us_per_step": host_us(step, device),
           "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
    return row


def table(rows: list[dict], header: str) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [header, "", "| file | mode | steps/s | GPU minutes per 1M steps | kernels per step | GPU busy per step (µs) "
                         "| host time per step (µs) | peak GPU memory (MiB) |", "| --- " * 8 + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['file']} | {r['mode']} | {r['error']} | | | | | |")
        else:
            lines.append(f"| {r['file']} | {r['mode']} | {r['steps_per_s']:.1f} | {r['gpu_minutes_per_1m']:.2f} | "
                         f"{num(r['kernels_per_step'], '.1f')} | {num(r['gpu_busy_us_per_step'], '.0f')} | "
                         f"{r['host_us_per_step']:.0f} | {num(r['peak_mib'], '.0f')} |")
    return "\n".join(lines)


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "no git"
    except OSError:
        return "no git"


def environment(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU (CPU dry run)"
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    return f"torch {torch.__version__}{cuda}, {gpu}, commit {commit()}"


def write(out: str, rows: list[dict], header: str, device: torch.device) -> None:
    os.makedirs(out, exist_ok=True)
    common.write_json(os.path.join(out, "timing.json"), {"environment": environment(device), "header": header, "rows": rows})
    common.atomic_write(os.path.join(out, "timing.md"), (table(rows, header) + "\n").encode())


if __name__ == "__main__":
    common.install_user_error_hook()
    args = tyro.cli(Args)
    unknown = [a for a in args.algorithms if a not in ALGORITHMS] + [m for m in args.modes if m not in MODES]
    if unknown:
        raise common.UserError(f"unknown algorithm or mode '{unknown[0]}'; choose from {', '.join(ALGORITHMS + MODES)}")
    import minari

    if DATASET_ID not in minari.list_local_datasets():
        build(DATASET_ID, args.transitions, episode_length=1000)
    if args.build_only:
        raise SystemExit(0)
    if args.compile_backend != "inductor":
        torch.compile = functools.partial(torch.compile, backend=args.compile_backend)
    device = common.resolve_device(args.device)
    torch.set_flush_denormal(True)  # as common.seed_everything in the files
    data = common.load_dataset(DATASET_ID, device)
    header = (f"{environment(device)}; {len(data)} transitions of {data.obs_dim} / {data.act_dim} dims, "
              f"{args.steps} timed steps after {args.warmup}; one launch of the smallest kernel: "
              f"{launch_us(device):.1f} µs")
    print(header, flush=True)
    rows = []
    for mode in args.modes:
        for name in args.algorithms:
            if args.deadline and time.time() > args.deadline:
                rows.append({"file": name, "mode": mode, "error": "skipped: out of time"})
                continue
            t0 = time.time()
            try:
                rows.append(measure(name, mode, data, device, args))
            except Exception as exc:  # one file's failure is a row of the table, not the end of it
                rows.append({"file": name, "mode": mode, "error": f"{type(exc).__name__}: {common._first_line(exc)}"})
            rows[-1]["seconds"] = time.time() - t0
            print(f"{name} {mode}: {rows[-1].get('error') or format(rows[-1]['steps_per_s'], '.1f') + ' steps/s'} "
                  f"({rows[-1]['seconds']:.0f} s)", flush=True)
            write(args.out, rows, header, device)  # after each: a call cut short keeps what was measured
    print(f"table: {os.path.join(args.out, 'timing.md')}")
    raise SystemExit(any("error" in r and not r["error"].startswith("skipped") for r in rows))
