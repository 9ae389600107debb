"""The folder of one training run, `<output_dir>/<run_name>/`: tensorboard events, a console line per
evaluation, results.json, checkpoints (resuming, stopping on a signal) and model.pt. The algorithm
files use it as `common.Run`; common.py's docstring lists the calls their loops make."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import signal
import time
from typing import Callable

import numpy as np
import torch

from offline_data import OfflineData
from offline_data.errors import UserError, atomic_write_bytes, atomic_write_json, lock_folder, save_checkpoint
from offline_data.evaluation import evaluate, render_problem


def check_batch_sizes(args, data: OfflineData) -> None:
    """Every *batch_size flag is at most the number of transitions. Minibatches are drawn with
    replacement, so a larger one would run, but it only repeats transitions within each step at a
    higher cost: it means a typo or the wrong dataset (and at 1e8, an allocation that fails)."""
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if field.name.endswith("batch_size") and value is not None and value > len(data):
            raise UserError(f"--{field.name.replace('_', '-')} {value} is larger than the dataset '{data.dataset_id}' "
                            f"({len(data)} transitions); use at most {len(data)}")


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


CHECKPOINT, PREVIOUS_CHECKPOINT = "checkpoint.pt", "checkpoint.prev.pt"
# Flags that may differ between a run and its resumption: none of them changes what is trained.
RESUME_FREE_FLAGS = {"run_name", "output_dir", "resume", "track", "wandb_project", "log_every", "save_model",
                     "total_steps", "compile", "cuda_graphs", "capture_video", "video_every"}


class Run:
    """One training run: `<output_dir>/<run_name>/` with tensorboard events, results.json and a
    checkpoint. Losses that are not finite stop the run with one line instead of training on NaNs.
    With --resume auto (the default) a folder that holds a finished run ends the script at once, and
    one that holds a checkpoint is continued from it (docs/usage.md, "Resuming")."""

    def __init__(self, args, algorithm: str, data: OfflineData, phases: tuple[str, ...] = ()):
        """`phases`: the file's pretraining phases in the order they run (they checkpoint as the main
        loop does, see `resume`); the main loop, None, comes after them."""
        from torch.utils.tensorboard import SummaryWriter

        self.args, self.algorithm, self.data = args, algorithm, data
        self.phases = (*phases, None)
        run_name = args.run_name or f"{args.env.replace('/', '__')}__{algorithm}__{args.seed}__{int(time.time())}"
        self.dir = os.path.join(args.output_dir, run_name)
        check_batch_sizes(args, data)
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the run folder {self.dir}: {exc.strerror or exc}") from None
        self.lock = lock_folder(self.dir, "wait for it to end, or pass another --run-name")
        self.saved = None
        if args.resume == "auto":
            if _finished(os.path.join(self.dir, "results.json")):
                print(f"[{algorithm}] {self.dir} holds a finished run: nothing to do (--resume never starts it over)")
                raise SystemExit(0)
            self.saved = self._read_checkpoint()
        else:
            _remove_checkpoints(self.dir)
        # a resumed run drops the events logged after its checkpoint, which it is about to log again;
        # a pretraining phase has a writer of its own (`phase_writer`), with its own steps to drop
        self.resumed_at = None if self.saved is None else (self.saved.get("phase"), self.saved["step"])
        self.writer = SummaryWriter(self.dir, purge_step=self._purge_step(None))
        self.phase_writers: dict = {}
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{k}|{v}|" for k, v in vars(args).items()))
        self.wandb = None
        if args.track:
            try:
                import wandb
            except ImportError:
                raise UserError("--track needs wandb: pip install wandb") from None
            self.wandb = wandb.init(project=args.wandb_project, name=run_name, config=vars(args),
                                    sync_tensorboard=True, dir=self.dir)
        self.results = {
            "algorithm": algorithm,
            "env": args.env,
            "seed": args.seed,
            "args": {k: v for k, v in vars(args).items()},
            "dataset": {"transitions": len(data), "episodes": len(data.episode_lengths),
                        "ref_min_score": data.ref_min_score, "ref_max_score": data.ref_max_score,
                        "ref_scores_source": data.ref_scores_source, "source": data.source,
                        "eval_env": data.eval_env, "episode_return_mean": float(data.episode_returns.mean())},
            "evaluations": [], "final_normalized_score": None, "final_return": None, "finished": False,
        }
        self.last_metrics: dict[str, float] = {}
        self.start = time.time()
        self.signalled: int | None = None
        self.handlers_installed = False
        self.train_seconds_before = 0.0
        self.reset_clock()
        print(f"[{algorithm}] {args.env}: {len(data)} transitions, {len(data.episode_lengths)} episodes, "
              f"obs {data.obs_dim}, act {data.act_dim}, device {data.observations.device}; run dir {self.dir}")
        if data.ref_scores_source == "D4RL constants (v2 envs)":
            print(f"[{algorithm}] normalised scores use D4RL's reference returns "
                  f"({data.ref_min_score}, {data.ref_max_score}), measured on the v2 MuJoCo envs")
        elif data.ref_scores_source == "none":
            print(f"[{algorithm}] the dataset has no reference scores: raw returns only")

    def log(self, step: int, metrics: dict, phase: str | None = None) -> None:
        """Write scalars; with `phase` (a pretraining phase such as "behaviour model"), to that
        phase's writer, and print one progress line, since such phases have no evaluations."""
        values = {k: float(v) for k, v in metrics.items()}
        bad = [k for k, v in values.items() if not np.isfinite(v)]
        if bad:
            raise UserError(
                f"{', '.join(bad)} became {values[bad[0]]} at step {step}: training diverged. Try a "
                f"lower learning rate or another --seed."
            )
        writer = self.writer if phase is None else self.phase_writer(phase)
        for k, v in values.items():
            writer.add_scalar(k, v, step)
        sps = (step - self.clock_step) / max(time.time() - self.clock - self.eval_time, 1e-9)
        if phase is None:
            self.writer.add_scalar("charts/SPS", sps, step)
            self.last_metrics = values
        else:
            print(f"{phase} step {step} | {sps:.0f} SPS | " + " ".join(
                f"{k.split('/')[-1]} {v:.3g}" for k, v in values.items()), flush=True)

    def _purge_step(self, phase: str | None) -> int | None:
        return self.resumed_at[1] + 1 if self.resumed_at and self.resumed_at[0] == phase else None

    def phase_writer(self, phase: str):
        """A pretraining phase's events go to `<run dir>/<phase>/` (`q_initialisation/`), a run of
        their own in tensorboard: their steps count from 1 again and may carry the main loop's
        names (BRAC+'s Q_0 logs losses/q1), which in one run would interleave with its curves."""
        if phase not in self.phase_writers:
            from torch.utils.tensorboard import SummaryWriter

            self.phase_writers[phase] = SummaryWriter(os.path.join(self.dir, phase.lower().replace(" ", "_")),
                                                      purge_step=self._purge_step(phase))
        return self.phase_writers[phase]

    def close_writers(self) -> None:
        for writer in (self.writer, *self.phase_writers.values()):
            writer.close()

    def reset_clock(self, step: int = 0) -> None:
        """Start SPS and ETA afresh at `step`, e.g. after a pretraining phase."""
        self.clock, self.clock_step = time.time(), step
        self.eval_time = 0.0

    # -- checkpoints ---------------------------------------------------------------------------
    def _read_checkpoint(self) -> dict | None:
        for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
            path = os.path.join(self.dir, name)
            if not os.path.exists(path):
                continue
            try:  # our own file: it holds numpy and python random states, hence weights_only=False
                saved = torch.load(path, map_location="cpu", weights_only=False)
                saved["step"], saved["agent"], saved["rng"]
            except Exception as exc:
                print(f"[{self.algorithm}] {path} is unreadable ({type(exc).__name__}); trying the previous "
                      f"checkpoint", flush=True)
                continue
            now = vars(self.args)
            # a flag added to the file after the checkpoint was written ran at its default
            then = {**{f.name: f.default for f in dataclasses.fields(self.args)
                       if f.default is not dataclasses.MISSING and f.name not in saved["args"]}, **saved["args"]}
            differ = [k for k in sorted(set(then) | set(now))
                      if k not in RESUME_FREE_FLAGS and then.get(k) != now.get(k)]
            if differ:
                flags = ", ".join(f"--{k.replace('_', '-')} {then.get(k)} (now {now.get(k)})" for k in differ)
                raise UserError(f"{path} was written with other flags: {flags}. Pass another --run-name, or "
                                f"--resume never to start this run over.")
            saved["path"] = path
            return saved
        return None

    def resume(self, agent, phase: str | None = None, steps: int = 0) -> int:
        """Restore `agent`, the random streams and the evaluations from the checkpoint if it was
        written in `phase` (None: the main loop). Returns the step to continue after (0: from the
        start). A checkpoint of a later phase holds this phase's result: `agent` takes its state and
        `steps`, the phase's length, is returned, so that the phase's loop is skipped. One of an
        earlier phase is left alone (that phase was read from its cache)."""
        saved = self.saved
        if saved is None:
            return 0
        mine = self.phases.index(phase)
        theirs = self.phases.index(saved.get("phase")) if saved.get("phase") in self.phases else -1
        if theirs < mine:
            return 0
        if theirs > mine:
            load_training_state(agent, saved["agent"])
            return steps
        load_training_state(agent, saved["agent"])
        set_rng_states(saved["rng"], self.data.observations.device)
        step = saved["step"]
        self.start -= saved["wall_time"]
        if phase is None:
            self.results["evaluations"] = saved["evaluations"]
            self.train_seconds_before = saved["train_seconds"]
        self.reset_clock(step)
        print(f"[{self.algorithm}] resuming{f' the {phase} phase' if phase else ''} from step {step} ({saved['path']})",
              flush=True)
        self.saved = None
        return step

    def train_seconds(self) -> float:
        return self.train_seconds_before + time.time() - self.clock - self.eval_time

    def checkpoint(self, step: int, agent, phase: str | None = None) -> None:
        """Write everything needed to continue after `step` of `phase` (None: the main loop); the
        previous checkpoint is kept until the new one is whole (a reader falls back to it)."""
        state = {"step": step, "phase": phase, "args": dict(vars(self.args)), "agent": training_state(agent),
                 "rng": rng_states(self.data.observations.device),
                 "evaluations": self.results["evaluations"], "train_seconds": self.train_seconds(),
                 "wall_time": time.time() - self.start}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        path = os.path.join(self.dir, CHECKPOINT)
        if os.path.exists(path):
            os.replace(path, os.path.join(self.dir, PREVIOUS_CHECKPOINT))
        atomic_write_bytes(path, buffer.getvalue())

    def signal_received(self) -> bool:
        """Its first call makes SIGTERM, SIGINT and SIGUSR1 set a flag instead of killing the process;
        whether one of them has come since."""
        if not self.handlers_installed:
            def handler(signum, frame):
                self.signalled = signum

            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                signal.signal(signum, handler)
            self.handlers_installed = True
        return self.signalled is not None

    def exit_on_signal(self, what: str) -> None:
        """End the process after a signal, once `what` (what was saved) is said (status 128 + signal)."""
        self.close_writers()
        print(f"[{self.algorithm}] stopped by {signal.Signals(self.signalled).name} after {what}; "
              f"the same command resumes the run", flush=True)
        raise SystemExit(128 + self.signalled)

    def stop_if_signalled(self, step: int, agent, phase: str | None = None) -> None:
        """Called after every training step: once a signal has come (see signal_received), checkpoint
        at `step` and exit."""
        if not self.signal_received():
            return
        self.checkpoint(step, agent, phase)
        self.exit_on_signal(f"step {step}{f' of the {phase} phase' if phase else ''}; checkpoint written")

    def pretraining_step(self, step: int, agent, phase: str) -> None:
        """Called after every step of a pretraining phase: a checkpoint every --eval-every steps and
        the stop on a signal, as in the main loop, since a behaviour model can take hours."""
        if step % self.args.eval_every == 0:
            self.checkpoint(step, agent, phase)
        self.stop_if_signalled(step, agent, phase)

    renders: bool | None = None  # with --capture-video: whether the eval env renders here (found once)

    def video_path(self, step: int) -> str | None:
        """Where the evaluation at `step` records its first episode, or None. With --capture-video:
        the last evaluation and every --video-every-th, `<run dir>/videos/step_<step>.mp4`. The first
        evaluation finds out whether the eval env renders here; if not, it says so in one line and
        the run goes on without video."""
        args = self.args
        if not args.capture_video:
            return None
        if self.renders is None:
            problem = render_problem(self.data)
            self.renders = problem is None
            if problem is not None:
                print(f"[{self.algorithm}] --capture-video: the eval env does not render on this machine "
                      f"({problem}); training goes on without video (MUJOCO_GL=egl or osmesa renders MuJoCo "
                      f"without a display)", flush=True)
        number = len(self.results["evaluations"]) + 1  # this evaluation's
        if not self.renders or not (step == args.total_steps or args.video_every and number % args.video_every == 0):
            return None
        return os.path.join(self.dir, "videos", f"step_{step}.mp4")

    def evaluate(self, step: int, policy: Callable[[torch.Tensor], torch.Tensor],
                 obs_mean: torch.Tensor | None = None, obs_std: torch.Tensor | None = None) -> dict:
        """Evaluate `policy` (see `evaluate`), log it, and rewrite results.json atomically; with
        --capture-video, record the first episode where `video_path` says."""
        t0 = time.time()
        video = self.video_path(step)
        evaluation = evaluate(self.data, policy, self.args.eval_episodes, self.args.seed,
                              obs_mean, obs_std, video)
        self.eval_time += time.time() - t0
        entry = {"step": step, **evaluation, "wall_time": time.time() - self.start}
        if video is not None and os.path.exists(video):
            entry["video"] = os.path.relpath(video, self.dir)
        self.results["evaluations"].append(entry)
        self.results["train_seconds"] = self.train_seconds()  # so far; the final figure at finish()
        self.writer.add_scalar("eval/return", evaluation["return_mean"], step)
        if evaluation["normalized_score_mean"] is not None:
            self.writer.add_scalar("eval/normalized_score", evaluation["normalized_score_mean"], step)
        atomic_write_json(os.path.join(self.dir, "results.json"), self.results)

        train_time = max(time.time() - self.clock - self.eval_time, 1e-9)
        sps = (step - self.clock_step) / train_time
        eta = (self.args.total_steps - step) / max(sps, 1e-9)
        losses = " ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in self.last_metrics.items()
                          if k.startswith("losses/"))
        score = evaluation["normalized_score_mean"]
        score_txt = "" if score is None else f" | score {score:.1f} ± {evaluation['normalized_score_std']:.1f}"
        print(f"step {step}/{self.args.total_steps} | {sps:.0f} SPS | ETA {_fmt_time(eta)} | {losses} "
              f"| return {evaluation['return_mean']:.1f} ± {evaluation['return_std']:.1f}{score_txt}",
              flush=True)
        if "video" in entry:
            print(f"[{self.algorithm}] video of the first episode: {video}", flush=True)
        return evaluation

    def finish(self, checkpoint: dict | None = None) -> None:
        evals = self.results["evaluations"]
        if evals:
            self.results["final_return"] = evals[-1]["return_mean"]
            self.results["final_normalized_score"] = evals[-1]["normalized_score_mean"]
        self.results["finished"] = True
        self.results["train_seconds"] = self.train_seconds()
        if checkpoint is not None and self.args.save_model:
            save_checkpoint(os.path.join(self.dir, "model.pt"), portable({
                "algorithm": self.algorithm, "args": dict(vars(self.args)),
                "obs_dim": self.data.obs_dim, "act_dim": self.data.act_dim,
                "action_low": self.data.action_low, "action_high": self.data.action_high,
                **checkpoint}))
        atomic_write_json(os.path.join(self.dir, "results.json"), self.results)
        _remove_checkpoints(self.dir)  # a finished run is never resumed; results.json says it finished
        self.close_writers()
        if self.wandb is not None:
            self.wandb.finish()
        print(f"[{self.algorithm}] done: final return {self.results['final_return']}, "
              f"normalised score {self.results['final_normalized_score']}; results in {self.dir}")


def portable(value):
    """`value` with every tensor on the CPU and numpy arrays and numbers as python lists and numbers
    (dicts, lists and tuples are walked): model.pt then loads with torch.load(weights_only=True) on
    any machine, with or without a GPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, dict):
        out = type(value)((k, portable(v)) for k, v in value.items())  # a state_dict stays an OrderedDict
        if hasattr(value, "_metadata"):
            out._metadata = value._metadata
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(portable(v) for v in value)
    return value


def _finished(results_path: str) -> bool:
    try:
        with open(results_path) as f:
            return bool(json.load(f).get("finished"))
    except (OSError, ValueError):
        return False


def _remove_checkpoints(folder: str) -> None:
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def training_state(agent) -> dict:
    """What training changes in an agent object: the state dicts of its networks, optimisers and
    schedulers (also in lists), its tensors (multipliers, in place), generators and numbers."""
    state = {}
    for name, value in vars(agent).items():
        if hasattr(value, "state_dict"):
            state[name] = value.state_dict()
        elif isinstance(value, list) and value and all(hasattr(v, "state_dict") for v in value):
            state[name] = [v.state_dict() for v in value]
        elif isinstance(value, torch.Tensor):
            state[name] = value.detach().clone()
        elif isinstance(value, torch.Generator):
            state[name] = value.get_state()
        elif isinstance(value, (bool, int, float)):
            state[name] = value
    return state


def load_training_state(agent, state: dict) -> None:
    unknown = [name for name in state if not hasattr(agent, name)]
    if unknown:  # state the file no longer keeps (e.g. a generator it dropped): nothing to restore it into
        print(f"the checkpoint's {', '.join(unknown)} has no place in this file's agent; not restored", flush=True)
    for name, saved in state.items():
        if name in unknown:
            continue
        value = getattr(agent, name)
        if hasattr(value, "load_state_dict"):
            value.load_state_dict(saved)
        elif isinstance(value, list):
            for item, item_state in zip(value, saved):
                item.load_state_dict(item_state)
        elif isinstance(value, torch.Tensor):
            with torch.no_grad():  # in place: the optimisers hold these very tensors
                value.copy_(saved)
        elif isinstance(value, torch.Generator):
            value.set_state(saved)
        else:
            setattr(agent, name, saved)


def rng_states(device: torch.device) -> dict:
    """The random streams a run draws from: Python's, numpy's, torch's CPU one and, on CUDA, that of
    the run's own device only (so that a run resumes with fewer or other GPUs visible)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_states(states: dict, device: torch.device) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if isinstance(cuda, list) and device.type == "cuda":  # one state per visible GPU: that of the run's
        cuda = cuda[device.index or 0] if (device.index or 0) < len(cuda) else None
    if isinstance(cuda, torch.Tensor) and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
