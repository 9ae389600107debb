"""Every file on a CUDA GPU (marked `cuda`; skipped where there is none): a few hundred eager steps
and its model.pt evaluated on the CPU by tools/evaluate.py; a checkpoint written on the GPU resumed
on the CPU and the reverse; --compile; --precision tf32 and bf16; no host sync in a step.

tools/gpu_check.sh runs them on the GPU. Its --cpu-dry-run runs them with GPU_CHECK_DEVICE=cpu (the
CPU in the GPU's place, the CUDA-only tests skipped), GPU_CHECK_FILES (some files) and
GPU_CHECK_COMPILE_BACKEND=eager (Dynamo without code generation)."""

import concurrent.futures
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch
from torch._dynamo.utils import counters
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

import common
from conftest import ROOT, build_dataset, load_algorithm
from test_gpu_ready import CPU_ONLY_READS
from test_layout import ALGORITHMS
from test_layout import SMALL as PHASES
from test_precision import ACT, N, OBS, SMALL, batch_for, networks

DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
FILES = [f for f in os.environ.get("GPU_CHECK_FILES", "").split(",") if f] or ALGORITHMS
ON_GPU = DEVICE == "cuda"
DEV = torch.device(DEVICE)
ENV = "cuda/pendulum/random-v0"  # no termination: a return moves as little as the actions do
E = 100 if ON_GPU else 20  # steps between evaluations (and checkpoints) of the runs
# On the CPU both sides of a resumption are the CPU: one direction says all there is.
DIRECTIONS = [("gpu", "cpu"), ("cpu", "gpu")] if ON_GPU else [("gpu", "cpu")]

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                                                   reason="no CUDA device (tools/gpu_check.sh runs these on a GPU)")]
assert set(FILES) <= set(ALGORITHMS), f"GPU_CHECK_FILES names no algorithm file: {FILES}"


@pytest.fixture(scope="module")
def pendulum(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("minari"))
    with mock.patch.dict(os.environ, {"MINARI_DATASETS_PATH": path}):
        build_dataset(ENV, "Pendulum-v1", n_episodes=8, max_steps=50)
    return path


# ----------------------------------------------------------------------------------------------
# Runs of the files: all files' processes at once, in two waves (the GPU and 16 cores take them)
# ----------------------------------------------------------------------------------------------
def command(name: str, device: str, out, run: str, steps: int, *extra) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "algorithms", f"{name}.py"), "--env", ENV, "--device", device,
            "--total-steps", str(steps), "--eval-every", str(E), "--eval-episodes", "2", "--batch-size", "32",
            "--output-dir", str(out), "--run-name", run, *PHASES.get(name, []), *extra]


def launch(jobs: dict, datasets: str) -> dict:
    """key -> (cmd, on_cpu, kill_at_checkpoint): each command in a process of its own, all at once;
    on_cpu hides the GPU (--device auto is then the CPU); kill_at_checkpoint kills it once it has
    written its first checkpoint. key -> (return code, stdout, stderr)."""
    def one(job):
        cmd, on_cpu, kill = job
        env = {**os.environ, "MINARI_DATASETS_PATH": datasets, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        if on_cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        folder = os.path.join(cmd[cmd.index("--output-dir") + 1], cmd[cmd.index("--run-name") + 1])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "stdout"), "w+") as out, open(os.path.join(folder, "stderr"), "w+") as err:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
            deadline = time.time() + 600
            while kill and proc.poll() is None and time.time() < deadline:
                if os.path.exists(os.path.join(folder, "checkpoint.pt")):
                    proc.kill()
                time.sleep(0.05)
            code = proc.wait(timeout=600)
            out.seek(0), err.seek(0)
            return code, out.read(), err.read()

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        return dict(zip(jobs, pool.map(one, jobs.values())))


@pytest.fixture(scope="module")
def runs(pendulum, tmp_path_factory):
    """Per file: `eager`, 300 steps on the device with --save-model; `from_gpu` and `from_cpu`, killed
    after their first checkpoint, each resumed on the other device twice: to the checkpoint's own
    step with --save-model (`to_cpu`, `to_gpu`), and E steps further (`on_cpu`, `on_gpu`)."""
    out = tmp_path_factory.mktemp("runs")
    first = {}
    for name in FILES:
        first[name, "eager"] = (command(name, DEVICE, out, f"{name}-eager", 3 * E, "--save-model"), False, False)
        for side, _ in DIRECTIONS:
            first[name, f"from_{side}"] = (command(name, "auto", out, f"{name}-from_{side}", 10**6), side == "cpu", True)
    done = launch(first, pendulum)
    second, checkpoints = {}, {}
    for name in FILES:
        for side, other in DIRECTIONS:
            folder = out / f"{name}-from_{side}"
            if not any((folder / f).exists() for f in ("checkpoint.pt", "checkpoint.prev.pt")):
                continue  # the test of this file says why
            latest = folder / "checkpoint.pt"  # or the one before, if the kill came as it was replaced
            checkpoints[name, side] = common.load_file(str(latest if latest.exists() else folder / "checkpoint.prev.pt"))
            step = checkpoints[name, side]["step"]
            shutil.copytree(folder, out / f"{name}-on_{other}")
            folder.rename(out / f"{name}-to_{other}")
            second[name, f"to_{other}"] = (command(name, "auto", out, f"{name}-to_{other}", step, "--save-model"),
                                           other == "cpu", False)
            second[name, f"on_{other}"] = (command(name, "auto", out, f"{name}-on_{other}", step + E), other == "cpu", False)
    done |= launch(second, pendulum)
    return out, done, checkpoints


def results(out, name: str, run: str) -> dict:
    with open(out / f"{name}-{run}" / "results.json") as f:
        return json.load(f)


def evaluated(path, device: str, datasets: str) -> dict:
    """tools/evaluate.py's evaluation of a model.pt, with the run's seed and episodes."""
    from tools.evaluate import evaluate_model

    try:
        with mock.patch.dict(os.environ, {"MINARI_DATASETS_PATH": datasets}):
            return evaluate_model(str(path), device=device)
    finally:
        torch.set_flush_denormal(False)  # as the tool sets it for its process; the other tests run without


def assert_evaluates_to(evaluation: dict, want: dict, exact: bool) -> None:
    """The same numbers where the device is the one the evaluation was made on; else to within what
    another device's rounding of the policy's outputs moves a return (Pendulum: no episode ends early)."""
    for key in ("return_mean", "return_std", "normalized_score_mean"):
        assert evaluation[key] == (want[key] if exact else pytest.approx(want[key], rel=1e-3, abs=1e-3)), key


def assert_ran(done: dict, name: str, run: str) -> None:
    code, stdout, stderr = done[name, run]
    assert code == 0, f"{run}: {stdout[-1500:]}{stderr[-3000:]}"


@pytest.mark.parametrize("name", FILES)
def test_a_few_hundred_eager_steps_train_and_the_model_evaluates_on_the_cpu(name, runs, pendulum):
    out, done, _ = runs
    assert_ran(done, name, "eager")
    assert f"device {DEVICE}" in done[name, "eager"][1]
    run = results(out, name, "eager")
    assert run["finished"] and [e["step"] for e in run["evaluations"]] == [E, 2 * E, 3 * E]
    assert all(math.isfinite(e["return_mean"]) for e in run["evaluations"])
    model = out / f"{name}-eager" / "model.pt"
    assert all(t.device.type == "cpu" for t in common._tensors(torch.load(model, weights_only=True)))
    final = run["evaluations"][-1]
    assert_evaluates_to(evaluated(model, DEVICE, pendulum), final, exact=True)
    on_cpu = evaluated(model, "cpu", pendulum)
    assert on_cpu["episodes"] == 2 and on_cpu["seed"] == 0
    assert_evaluates_to(on_cpu, final, exact=not ON_GPU)


@pytest.mark.parametrize("side, other", DIRECTIONS)
@pytest.mark.parametrize("name", FILES)
def test_a_checkpoint_resumes_on_the_other_device_to_the_same_evaluations(name, side, other, runs, pendulum):
    """Resumed at the checkpoint's own step, the run ends there: its evaluations are the checkpoint's
    and its model.pt, the checkpoint's weights through the other device, evaluates as they did. Resumed
    further, it trains on the other device from there."""
    out, done, checkpoints = runs
    code, stdout, stderr = done[name, f"from_{side}"]
    assert (name, side) in checkpoints, f"no checkpoint written on the {side}: {stdout[-1500:]}{stderr[-3000:]}"
    saved = checkpoints[name, side]
    assert saved["phase"] is None and saved["step"] % E == 0 and saved["evaluations"]
    assert (saved["rng"]["cuda"] is not None) == (side == "gpu" and ON_GPU)  # the CUDA stream, on a GPU only
    for run in (f"to_{other}", f"on_{other}"):
        assert_ran(done, name, run)
        assert f"resuming from step {saved['step']}" in done[name, run][1]
        assert f"device {'cpu' if other == 'cpu' or not ON_GPU else 'cuda'}" in done[name, run][1]
    ended = results(out, name, f"to_{other}")
    assert ended["finished"] and ended["evaluations"] == saved["evaluations"]
    model = out / f"{name}-to_{other}" / "model.pt"
    for device in {"cpu", DEVICE}:
        assert_evaluates_to(evaluated(model, device, pendulum), saved["evaluations"][-1], exact=not ON_GPU)
    further = results(out, name, f"on_{other}")
    assert further["finished"] and further["evaluations"][:-1] == saved["evaluations"]
    assert further["evaluations"][-1]["step"] == saved["step"] + E
    assert math.isfinite(further["evaluations"][-1]["return_mean"])


# ----------------------------------------------------------------------------------------------
# Training steps in this process
# ----------------------------------------------------------------------------------------------
def make(name: str, **flags):
    """An agent of the file with tests/test_precision.py's small settings on the device, as after its
    pretraining (behaviour and score models frozen, BRAC+'s thresholds set), and a batch of its RL step."""
    module = load_algorithm(name)
    cls = next(v for v in vars(module).values()
               if isinstance(v, type) and v.__module__ == module.__name__ and hasattr(v, "act"))
    args = module.Args(**{**SMALL[name][0], **flags})
    for k, v in (module.domain_defaults(args.env).items() if hasattr(module, "domain_defaults") else ()):
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.manual_seed(0)
    agent = cls(args, OBS, ACT, DEV)
    for pretrained in ("behavior", "score"):
        if hasattr(agent, pretrained):
            getattr(agent, pretrained).requires_grad_(False)
    if name == "brac_plus":
        agent.kl_threshold.fill_(1.0), agent.gp_threshold.fill_(0.5)
    batch = batch_for(module, "train")
    return agent, type(batch)(*(t.to(DEV) for t in batch))


def assert_close(got: dict, want: dict, tolerance: float, what: str = "") -> None:
    assert got.keys() == want.keys(), what
    for k in want:
        if isinstance(want[k], torch.Tensor):
            torch.testing.assert_close(got[k], want[k], rtol=tolerance, atol=tolerance, msg=f"{what} {k}")
        else:
            assert got[k] == want[k], f"{what} {k}"


def main_loop_step(name: str):
    """The file's main-loop step, agent.train(buffer.sample(batch_size)), with the batch's rows drawn
    on the device as common.ReplayBuffer draws them."""
    agent, batch = make(name)

    def step() -> dict:
        idx = torch.randint(0, N, (N,), device=DEV)
        return agent.train(type(batch)(*(t[idx] for t in batch)))

    return agent, step


@pytest.fixture
def compile_backend(monkeypatch):
    """torch.compile with GPU_CHECK_COMPILE_BACKEND (inductor unless set), whose random numbers are
    eager PyTorch's, so that a compiled step draws what the eager one does."""
    backend = os.environ.get("GPU_CHECK_COMPILE_BACKEND", "inductor")
    if backend != "inductor":
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# torch 2.11's inductor draws the two samples of iTRPO's TD loss (the next states' actions, the gradient
# penalty's actions) in the reverse order, with fallback_random, as seen on the CPU (the compiled penalty
# actions are eager's with the draws swapped, to 0.0): the same step on other noise, within the
# tolerance on the CPU and, likely for this reason, beyond it at step 4 on an H200 (2.2e-3). Seen with
# 2.11, not with 2.13; 2.12 not tried. There the steps are held to 5% instead of 0.1%.
REORDERS_DRAWS = {"itrpo"} if torch.__version__ < "2.13" else set()


@pytest.mark.parametrize("name", FILES)
def test_compile_trains_as_eager_and_compiles_nothing_after_warm_up(name, compile_backend):
    steps = {}
    for compiled in (False, True):
        agent, batch = make(name, compile=compiled)
        torch.manual_seed(5)
        steps[compiled] = [{k: v.detach().clone() for k, v in agent.train(batch).items()} for _ in range(2)]
        warm = counters["stats"]["unique_graphs"]
        steps[compiled] += [{k: v.detach().clone() for k, v in agent.train(batch).items()} for _ in range(3)]
        assert counters["stats"]["unique_graphs"] == warm and (warm > 0) == compiled
    # on failure, every step's largest difference per metric: rounding that grows step by step, or
    # one step that differs
    gaps = "; ".join(f"step {i + 1}: " + ", ".join(f"{k} {(got[k] - want[k]).abs().max().item():.1e}"
                                                   for k in want if isinstance(want[k], torch.Tensor))
                     for i, (got, want) in enumerate(zip(steps[True], steps[False])))
    other_noise = name in REORDERS_DRAWS and os.environ.get("GPU_CHECK_COMPILE_BACKEND", "inductor") == "inductor"
    for i, (got, want) in enumerate(zip(steps[True], steps[False])):
        assert_close(got, want, 5e-2 if other_noise else 1e-3, f"step {i + 1} ({gaps})")


@pytest.mark.parametrize("precision, tolerance", [("tf32", 0.01), ("bf16", 0.03)])
@pytest.mark.parametrize("name", FILES)
def test_precision_trains_as_fp32_to_within_its_rounding(name, precision, tolerance, monkeypatch):
    """From the same weights on the same batch: the fp32 metrics to within a few roundings of the
    precision (bf16 in the hidden layers), then 20 more steps that stay finite."""
    for flags in (torch.backends.cuda.matmul, torch.backends.cudnn):
        monkeypatch.setattr(flags, "allow_tf32", False)  # process-wide; restored after the test
    fp32, batch = make(name)
    torch.manual_seed(5)
    want = fp32.train(batch)  # before the tf32 agent allows TF32, for the whole process
    other, _ = make(name, precision=precision)
    assert torch.backends.cuda.matmul.allow_tf32 == (precision == "tf32")
    seen = set()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype)) for net in networks(other).values()
             for m in net.modules() if type(m).__name__ in ("Linear", "EnsembleLinear")]
    torch.manual_seed(5)
    got = other.train(batch)
    for hook in hooks:
        hook.remove()
    assert (torch.bfloat16 in seen) == (precision == "bf16")
    assert_close({k: v.float() for k, v in got.items()}, {k: v.float() for k, v in want.items()}, tolerance)
    for _ in range(20):
        metrics = other.train(batch)
    assert all(torch.isfinite(v).all() for v in metrics.values())


SYNCS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}


def host_syncs(function) -> list[str]:
    """The host syncs while `function` ran, as torch.profiler saw them: each read of a tensor's value
    on the host, and each CUDA call that waits for the device."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    with profile(activities=activities) as prof:
        with record_function("checked"):
            function()
    events = prof.events()
    span = next(e for e in events if e.name == "checked" and e.device_type == DeviceType.CPU).time_range
    found = []
    for e in events:
        inside = span.start <= e.time_range.start and e.time_range.end <= span.end
        chain, parent = [], e.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if inside and (e.name in SYNCS or e.name == "aten::_local_scalar_dense" and not CPU_ONLY_READS & set(chain)):
            found.append(" <- ".join([e.name, *chain[:3]]))
    return found


def test_the_sync_count_sees_a_host_read_and_a_device_wait():
    x = torch.ones(2, device=DEV)
    assert any("_local_scalar_dense" in s for s in host_syncs(lambda: x.sum().item()))
    if ON_GPU:
        assert any(s.startswith("cudaDeviceSynchronize") for s in host_syncs(torch.cuda.synchronize))


@pytest.mark.parametrize("name", FILES)
def test_a_main_loop_step_does_not_wait_for_the_device(name):
    """Ten steps past the warm-up: no host sync at all."""
    _, step = main_loop_step(name)
    for _ in range(12):
        step()
    assert host_syncs(lambda: [step() for _ in range(10)]) == []
