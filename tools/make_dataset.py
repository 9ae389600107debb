"""Build D4RL-style Minari datasets offline for any Gymnasium env with a Box action space: the
command line of tools/dataset_recipe.py (which describes the recipe and the ids it writes), and the
training of the SAC behaviour agent whose snapshots the datasets are rolled out from.

    python tools/make_dataset.py --env Hopper-v5 --kind medium-replay        # from shipped snapshots
    python tools/make_dataset.py --env Hopper-v5 --kind medium expert --transitions 200000
    python tools/make_dataset.py --env Hopper-v5 --train-steps 200000 --snapshot-every 10000  # rerun to resume
    python tools/make_dataset.py --env Pendulum-v1 --train-steps 15000 --kind medium-replay
    python tools/make_dataset.py --env Hopper-v5 --kind random --random-policy uniform

The behaviour agent is a compact SAC (2x256 MLPs, tanh-Gaussian actor, twin critics, automatic
entropy with target -|A|, lr 3e-4, batch 256, gamma 0.99, tau 0.005, one update per env step after
a uniform-random warm-up). Training saves the actor's state_dict every --snapshot-every steps with
its deterministic evaluation return, in `<snapshot-dir>/manifest.json`, rewritten after every
snapshot so that a run stopped early still leaves a usable manifest.

Training is resumable: `<snapshot-dir>/checkpoint/checkpoint.npz` holds everything the run needs to
go on (the SAC networks, target critics, optimisers and entropy temperature; the filled part of the
replay buffer; the env step and episode counters; the numpy and torch random streams; the manifest).
It is written every --checkpoint-every env steps, at the end of training and on SIGTERM or SIGINT
(which then stop the run), each time to a temporary file that is renamed into place once whole; the
one before is kept as `checkpoint.prev.npz` (read when the last one is damaged). Rerunning the same
command continues from it, and a higher --train-steps trains further. The episode in progress is
restored by resetting the env with its seed and replaying its actions from the buffer, so a resumed
run gives the same snapshots as an uninterrupted one (on the same machine and library versions).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TOOLS, os.path.dirname(TOOLS)]  # this folder's dataset_* modules and common.py
from common import (UserError, atomic_write, check_interval, check_output_dir, check_positive,  # noqa: E402
                    check_seed, install_user_error_hook, lock_folder, write_json)
import dataset_recipe  # noqa: E402
from dataset_recipe import (  # noqa: E402
    KINDS,
    STREAM_EVAL,
    STREAM_RANDOM_REF,
    STREAM_TRAIN,
    Kind,
    RandomPolicy,
    build_datasets,
    sub_seed,
)
from dataset_rollouts import (  # noqa: E402
    Actor,
    Progress,
    deterministic_policy,
    make_env,
    mean_return,
    to_env_action,
    uniform_policy,
)
from dataset_snapshots import choose_snapshots, default_snapshot_dir  # noqa: E402


@dataclass
class Args:
    id: Optional[str] = None
    """build this local/* id from the shipped snapshots, or write D4RL's file of this d4rl/<name> id
    into Minari's storage (as its first use does), and nothing else"""
    d4rl_file: Optional[str] = None
    """with --id d4rl/<name>: D4RL's file of that name at this path, not in $D4RL_DATASET_DIR"""
    env: str = "Hopper-v5"
    """Gymnasium env id (needs a Box action space and flat Box observations)"""
    kind: tuple[Kind, ...] = ()
    """dataset kinds to write (several allowed); empty with --train-steps trains only"""
    random_policy: RandomPolicy = "init"
    """policy of the random kind: init (a randomly initialised actor, sampled; D4RL's recipe) or
    uniform (uniform random actions over the action Box)"""
    seed: int = 0
    """seed of the agent, the envs and the rollouts"""
    transitions: Optional[int] = None
    """transitions per dataset (default 1M as in D4RL; medium-expert has this many of each half;
    medium-replay has the size of the buffer up to the medium snapshot, or fewer: this many, shared
    among the warm-up and the snapshot intervals in proportion to their lengths; medium-replay-no-warmup
    the same without the warm-up); a size given here
    is part of the id: local/<env>/<kind>-<size>-v0"""
    train_steps: int = 0
    """if > 0, first train the SAC behaviour agent for this many env steps, saving snapshots"""
    snapshot_every: int = 10_000
    """save and evaluate an actor snapshot every this many env steps"""
    checkpoint_every: int = 10_000
    """write a resumable checkpoint of the training (SAC state, replay buffer, random streams,
    manifest) into <snapshot-dir>/checkpoint every this many env steps, at the end and on
    SIGTERM/SIGINT; the same command continues from it, also with a higher --train-steps"""
    warmup_steps: int = 5_000
    """uniform-random env steps before SAC starts acting and updating"""
    eval_episodes: int = 10
    """episodes per snapshot evaluation (deterministic policy) and for the random reference return"""
    snapshot_dir: Optional[str] = None
    """folder of the snapshots and manifest.json (default tools/snapshots/<env id>)"""
    medium_snapshot: Optional[int] = None
    """training step of the snapshot used as medium (default: the manifest's choice)"""
    expert_snapshot: Optional[int] = None
    """training step of the snapshot used as expert (default: the manifest's choice)"""
    force: bool = False
    """replace datasets that already exist"""
    lr: float = 3e-4
    """Adam learning rate of actor, critics and entropy temperature"""
    batch_size: int = 256
    """SAC minibatch size"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak step of the target critics"""


# ----------------------------------------------------------------------------------------------
# SAC
# ----------------------------------------------------------------------------------------------
class TwinCritic(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int = 256):
        super().__init__()

        def q_net():
            return nn.Sequential(nn.Linear(obs_dim + act_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, 1))

        self.q1, self.q2 = q_net(), q_net()

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, act], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


class SAC:
    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        self.args = args
        self.actor = Actor(obs_dim, act_dim)
        self.critic = TwinCritic(obs_dim, act_dim)
        self.critic_target = TwinCritic(obs_dim, act_dim)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.log_alpha = torch.zeros(1, requires_grad=True)
        self.target_entropy = -float(act_dim)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=args.lr)

    def update(self, obs, act, rew, next_obs, term, generator: torch.Generator) -> None:
        args = self.args
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_act, next_log_prob = self.actor.sample(next_obs, generator)
            next_q = torch.min(*self.critic_target(next_obs, next_act)) - alpha * next_log_prob
            target = rew + args.gamma * (1.0 - term) * next_q
        q1, q2 = self.critic(obs, act)
        critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()

        pi_act, log_prob = self.actor.sample(obs, generator)
        actor_loss = (alpha * log_prob - torch.min(*self.critic(obs, pi_act))).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()

        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()

        with torch.no_grad():
            for p, tp in zip(self.critic.parameters(), self.critic_target.parameters()):
                tp.lerp_(p, args.tau)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
# Flags that change what training does: a checkpoint written with other values is refused. The
# others (--train-steps, --checkpoint-every, the dataset flags) may differ between a run and its resumption.
TRAINING_FLAGS = ("env", "seed", "warmup_steps", "snapshot_every", "eval_episodes", "lr", "batch_size", "gamma",
                  "tau")
CHECKPOINT_DIR, CHECKPOINT, PREVIOUS_CHECKPOINT = "checkpoint", "checkpoint.npz", "checkpoint.prev.npz"
BUFFER_KEYS = ("observations", "actions", "rewards", "terminations", "truncations")


def empty_buffer(n: int, obs_dim: int, act_dim: int, obs_dtype) -> dict:
    """Every transition the agent collects, in order: SAC's replay buffer and the real medium-replay
    data. Observations keep the env's dtype (float64 for MuJoCo), as Minari would."""
    return {"observations": np.zeros((n, obs_dim), obs_dtype),
            "next_observations": np.zeros((n, obs_dim), obs_dtype),
            "actions": np.zeros((n, act_dim), np.float32),  # policy space [-1, 1] until the end
            "rewards": np.zeros(n, np.float64),
            "terminations": np.zeros(n, bool),
            "truncations": np.zeros(n, bool)}


def buffer_arrays(buf: dict, step: int) -> dict:
    """The filled part of the buffer, without the next observations that repeat the following row's
    observation: only those of the rows that end an episode, and of the last row, are kept."""
    arrays = {k: buf[k][:step] for k in BUFFER_KEYS}
    ends = np.flatnonzero(buf["terminations"][:step] | buf["truncations"][:step])
    if not len(ends) or ends[-1] != step - 1:
        ends = np.append(ends, step - 1)
    arrays["next_observation_rows"] = ends.astype(np.int64)
    arrays["next_observations"] = buf["next_observations"][ends]
    return arrays


def restore_buffer(buf: dict, arrays: dict, step: int) -> None:
    for k in BUFFER_KEYS:
        buf[k][:step] = arrays[k]
    buf["next_observations"][:step - 1] = arrays["observations"][1:]
    buf["next_observations"][arrays["next_observation_rows"]] = arrays["next_observations"]


def write_checkpoint(folder: str, state: dict, arrays: dict) -> None:
    """Write the checkpoint whole to a temporary file, then rename the last one to the previous one
    and the new one into place: at every moment one whole checkpoint is on disk. A failure (a full
    disk) leaves the checkpoints as they were and is a one-line UserError."""
    import tempfile

    blob = io.BytesIO()
    torch.save(state, blob)
    path, tmp = os.path.join(folder, CHECKPOINT), None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=CHECKPOINT)
        with os.fdopen(fd, "wb") as f:
            # np.savez stores the arrays uncompressed: compressing hundreds of MB of floats costs
            # seconds per checkpoint for little gain.
            np.savez(f, state=np.frombuffer(blob.getbuffer(), np.uint8), **arrays)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            os.replace(path, os.path.join(folder, PREVIOUS_CHECKPOINT))
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)  # make the renames themselves survive a crash
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise UserError(f"could not write the checkpoint {path}: {exc.strerror or exc}") from None
        raise


def read_checkpoint(folder: str, args: Args) -> Optional[dict]:
    """The last readable checkpoint in `folder` (state and buffer arrays), or None if there is none.
    A damaged one is reported in one line and the previous one is read instead."""
    paths = [os.path.join(folder, name) for name in (CHECKPOINT, PREVIOUS_CHECKPOINT)]
    paths = [path for path in paths if os.path.exists(path)]
    for path in paths:
        try:
            with np.load(path) as npz:  # reading every member checks its CRC: a damaged file raises here
                arrays = {k: npz[k] for k in npz.files}
            state = torch.load(io.BytesIO(arrays.pop("state").tobytes()), weights_only=True)
            missing = {"step", "args", "sac", "rng", "manifest", "episode"} - set(state)
            if missing:
                raise KeyError(", ".join(sorted(missing)))
            if arrays["rewards"].shape != (state["step"],):
                raise ValueError(f"{arrays['rewards'].shape[0]} buffer rows for step {state['step']}")
        except Exception as exc:
            print(f"[train] {path} is unreadable ({type(exc).__name__}: {str(exc)[:100]}); "
                  f"{'using the previous checkpoint' if path != paths[-1] else 'no other checkpoint left'}",
                  flush=True)
            continue
        differ = [k for k in TRAINING_FLAGS if state["args"].get(k) != getattr(args, k)]
        if differ:
            flags = ", ".join(f"--{k.replace('_', '-')} {state['args'].get(k)} (now {getattr(args, k)})"
                              for k in differ)
            raise UserError(f"{path} was written with other flags: {flags}. Rerun with those to continue it, or "
                            f"pass another --snapshot-dir to train a new agent.")
        return {"path": path, "state": state, "arrays": arrays}
    if paths:
        raise UserError(f"no readable checkpoint in {folder}; delete it to train from the start")
    return None


def replay_episode(env, buf: dict, first: int, step: int, seed: int, low, high) -> Optional[np.ndarray]:
    """Bring `env` to where the episode in progress stood after `step` env steps: reset it with the
    episode's seed and step it through the episode's actions in the buffer (rows first..step-1).
    Returns the current observation, or None if the env did not give the stored transitions back."""
    obs, _ = env.reset(seed=seed)
    for i in range(first, step):
        if not np.array_equal(obs, buf["observations"][i]):
            return None
        obs, reward, term, trunc, _ = env.step(to_env_action(buf["actions"][i], low, high))
        if (np.float64(reward) != buf["rewards"][i] or term != buf["terminations"][i]
                or trunc != buf["truncations"][i]):
            return None
    if first < step and not np.array_equal(obs, buf["next_observations"][step - 1]):
        return None
    return obs


class StopSignals:
    """While active, SIGTERM and SIGINT only set `signum`: the training loop then writes a checkpoint
    and stops at the end of its step. A signal the process was started ignoring (SIGINT of a job
    started with `&` by a script) stays ignored. The previous handlers come back on exit."""

    def __enter__(self):
        import signal
        import threading

        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        import signal

        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def train_agent(args: Args, snapshot_dir: str) -> tuple[dict, dict]:
    """Train (or continue training) the SAC behaviour agent to --train-steps env steps; returns the
    manifest and the whole replay buffer (actions in the env's units)."""
    if args.checkpoint_every <= 0:
        raise UserError(f"--checkpoint-every must be positive, got {args.checkpoint_every}")
    checkpoint_dir = os.path.join(snapshot_dir, CHECKPOINT_DIR)
    check_output_dir(checkpoint_dir, "--snapshot-dir")
    os.makedirs(checkpoint_dir, exist_ok=True)
    # The checkpoints (hundreds of MB for 1M steps) must never be committed with the snapshots.
    with open(os.path.join(checkpoint_dir, ".gitignore"), "w") as f:
        f.write("*\n")
    with lock_folder(checkpoint_dir, "wait for it to end, or stop it (it writes a checkpoint on SIGTERM)"), \
            StopSignals() as signals:
        return _train_agent(args, snapshot_dir, checkpoint_dir, signals)


def _train_agent(args: Args, snapshot_dir: str, checkpoint_dir: str, signals: StopSignals) -> tuple[dict, dict]:
    import signal

    for name in os.listdir(checkpoint_dir):  # left by a run killed while writing (this process holds the lock)
        if name.startswith(".tmp-") and name.endswith(CHECKPOINT):
            os.remove(os.path.join(checkpoint_dir, name))
    env, eval_env = make_env(args.env), make_env(args.env)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    torch.manual_seed(sub_seed(args.seed, STREAM_TRAIN))  # network initialisation
    rng = np.random.default_rng(sub_seed(args.seed, STREAM_TRAIN))
    generator = torch.Generator().manual_seed(sub_seed(args.seed, STREAM_TRAIN))
    agent = SAC(obs_dim, act_dim, args)
    modules = {"actor": agent.actor, "critic": agent.critic, "critic_target": agent.critic_target,
               "actor_opt": agent.actor_opt, "critic_opt": agent.critic_opt, "alpha_opt": agent.alpha_opt}

    n = args.train_steps
    buf = empty_buffer(n, obs_dim, act_dim, env.observation_space.dtype)
    eval_seed = sub_seed(args.seed, STREAM_EVAL)
    saved = read_checkpoint(checkpoint_dir, args)
    if saved is None:
        random_return, _ = mean_return(eval_env, uniform_policy(low, high, sub_seed(args.seed, STREAM_RANDOM_REF)),
                                       args.eval_episodes, eval_seed)
        print(f"[train] {args.env}: SAC for {n} env steps ({args.warmup_steps} uniform-random warm-up), "
              f"snapshots every {args.snapshot_every} into {snapshot_dir}; random policy return "
              f"{random_return:.1f}", flush=True)
        manifest = {
            "env_id": args.env, "seed": args.seed, "command": "python " + " ".join(sys.argv),
            "train_steps_requested": n, "steps_completed": 0, "warmup_steps": args.warmup_steps,
            "snapshot_every": args.snapshot_every, "eval_episodes": args.eval_episodes,
            "eval": "deterministic (tanh of the mean) policy, env seeds from the run's seed",
            "hidden_dim": 256, "obs_dim": obs_dim, "act_dim": act_dim,
            "sac": {"lr": args.lr, "batch_size": args.batch_size, "gamma": args.gamma, "tau": args.tau,
                    "target_entropy": -act_dim},
            "random_return": random_return, "snapshots": [],
        }
        first_step, episode, episode_start, episode_return, recent_returns, wall_before = 0, 0, 0, 0.0, [], 0.0
        obs, _ = env.reset(seed=sub_seed(args.seed, STREAM_TRAIN, episode))
    else:
        state = saved["state"]
        first_step = state["step"]
        if first_step > n:
            raise UserError(f"{saved['path']} is at step {first_step}, past --train-steps {n}: pass --train-steps "
                            f"{first_step} or more to continue this run, or another --snapshot-dir")
        for name, module in modules.items():
            module.load_state_dict(state["sac"][name])
        with torch.no_grad():
            agent.log_alpha.copy_(state["sac"]["log_alpha"])  # in place: alpha_opt holds this tensor
        rng.bit_generator.state = state["rng"]["numpy"]
        generator.set_state(state["rng"]["torch"])
        torch.set_rng_state(state["rng"]["torch_global"])
        restore_buffer(buf, saved["arrays"], first_step)
        manifest, wall_before = state["manifest"], state["wall_time_s"]
        manifest["train_steps_requested"] = n
        episode, episode_start = state["episode"], state["episode_start"]
        episode_return, recent_returns = state["episode_return"], state["recent_returns"]
        if first_step < n:
            # Snapshots written after the checkpoint are trained again (to the same weights) and re-listed.
            write_json(os.path.join(snapshot_dir, "manifest.json"), manifest)
        obs = replay_episode(env, buf, episode_start, first_step, sub_seed(args.seed, STREAM_TRAIN, episode),
                             low, high)
        replay_note = f"episode {episode} replayed to its step {first_step - episode_start}"
        if obs is None:  # a nondeterministic env: its episode cannot be restored, so it ends here
            buf["truncations"][first_step - 1] = True
            episode, episode_start, episode_return = episode + 1, first_step, 0.0
            obs, _ = env.reset(seed=sub_seed(args.seed, STREAM_TRAIN, episode))
            replay_note = ("the env did not replay the episode in progress identically, so it ends at the "
                           "checkpoint and this run will differ from an uninterrupted one")
        print(f"[train] resuming {args.env} from {saved['path']} at step {first_step} of {n} (SAC state, replay "
              f"buffer, random streams and manifest restored; {replay_note})"
              if first_step < n else
              f"[train] {saved['path']} is at step {n} = --train-steps: nothing to train (a higher --train-steps "
              f"continues)", flush=True)

    def checkpoint(done_steps: int) -> None:
        write_checkpoint(checkpoint_dir, {
            "step": done_steps, "args": {k: getattr(args, k) for k in TRAINING_FLAGS},
            "sac": {**{name: module.state_dict() for name, module in modules.items()},
                    "log_alpha": agent.log_alpha.detach().clone()},
            "rng": {"numpy": rng.bit_generator.state, "torch": generator.get_state(),
                    "torch_global": torch.get_rng_state()},
            "episode": episode, "episode_start": episode_start, "episode_return": episode_return,
            "recent_returns": recent_returns, "manifest": manifest,
            "wall_time_s": wall_before + time.time() - start}, buffer_arrays(buf, done_steps))

    def stop_if_signalled(done_steps: int, checkpointed: bool) -> None:
        if signals.signum is None:
            return
        name = signal.Signals(signals.signum).name
        if done_steps == 0:
            print(f"[train] stopped by {name} before the first env step: nothing to continue from", flush=True)
        else:
            if not checkpointed:
                checkpoint(done_steps)
            print(f"[train] stopped by {name} at step {done_steps}: checkpoint in {checkpoint_dir}; the same "
                  f"command continues from it", flush=True)
        raise SystemExit(128 + signals.signum)

    start = time.time()
    progress = Progress("[train]", n, "env steps", start=first_step, note=lambda: (
        f"recent return (last {len(recent_returns)} episodes) {np.mean(recent_returns):.1f}"
        if recent_returns else "no episode finished yet"))
    stop_if_signalled(first_step, checkpointed=saved is not None)
    for step in range(first_step, n):
        if step < args.warmup_steps:
            action = rng.uniform(-1.0, 1.0, act_dim).astype(np.float32)
        else:
            with torch.no_grad():
                action = agent.actor.sample(torch.as_tensor(obs, dtype=torch.float32)[None], generator)[0][0].numpy()
        next_obs, reward, term, trunc, _ = env.step(to_env_action(action, low, high))
        buf["observations"][step], buf["next_observations"][step] = obs, next_obs
        buf["actions"][step], buf["rewards"][step] = action, reward
        buf["terminations"][step], buf["truncations"][step] = term, trunc
        episode_return += float(reward)
        obs = next_obs
        if term or trunc:
            recent_returns = (recent_returns + [episode_return])[-10:]
            episode, episode_start, episode_return = episode + 1, step + 1, 0.0
            obs, _ = env.reset(seed=sub_seed(args.seed, STREAM_TRAIN, episode))

        if step + 1 >= args.warmup_steps:
            idx = rng.integers(0, step + 1, args.batch_size)
            agent.update(*(torch.as_tensor(buf[k][idx], dtype=torch.float32) for k in
                           ("observations", "actions", "rewards", "next_observations", "terminations")),
                         generator)

        done_steps = step + 1
        progress.advance()
        if done_steps % args.snapshot_every == 0 or done_steps == n:
            ret, std = mean_return(eval_env, deterministic_policy(agent.actor, low, high),
                                   args.eval_episodes, eval_seed)
            file = f"actor_{done_steps:07d}.pt"
            blob = io.BytesIO()
            torch.save(agent.actor.state_dict(), blob)  # a plain state dict: read as weights only
            atomic_write(os.path.join(snapshot_dir, file), blob.getvalue())
            manifest["snapshots"].append({"step": done_steps, "file": file, "eval_return": ret,
                                          "eval_return_std": std,
                                          "wall_time_s": round(wall_before + time.time() - start, 1)})
            manifest["steps_completed"] = done_steps
            manifest.update(choose_snapshots(manifest["snapshots"], manifest["random_return"], args.env))
            write_json(os.path.join(snapshot_dir, "manifest.json"), manifest)
            progress.print(f"[train] snapshot {file}: eval return {ret:.1f} ± {std:.1f} | medium = step "
                           f"{manifest['medium']}, expert = step {manifest['expert']}")
        checkpointed = done_steps % args.checkpoint_every == 0 or done_steps == n
        if checkpointed:
            checkpoint(done_steps)
        stop_if_signalled(done_steps, checkpointed)
    env.close()
    eval_env.close()
    buf["actions"] = to_env_action(buf["actions"], low, high)
    return manifest, buf



@contextlib.contextmanager
def waiting_lock(path: str, waiting: str):
    """An exclusive flock on the file `path` for the block; while another process holds it, say
    `waiting` once and wait. Where locks do not work, the block runs unlocked."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def build_local_dataset(dataset_id: str, d4rl_file: Optional[str] = None) -> None:
    """Build a local/* id, or write a d4rl/* id's file as a Minari dataset, on its first use
    (common.load_dataset calls this). Runs started together on a new machine (two seeds) would all
    build it: the first builds, the others wait for it."""
    import minari

    from d4rl_files import build_d4rl_dataset, d4rl_name

    root = minari.storage.get_dataset_path()
    with waiting_lock(os.path.join(root, ".build-" + dataset_id.replace("/", "-") + ".lock"),
                      f"[{dataset_id}] another process is building it: waiting for that copy"):
        if os.path.isdir(os.path.join(minari.storage.get_dataset_path(dataset_id), "data")):
            return
        if d4rl_name(dataset_id) is not None:
            build_d4rl_dataset(dataset_id, d4rl_file)
        else:
            dataset_recipe.build_local_dataset(dataset_id)


def main(args: Args) -> None:
    if args.id is not None:
        return build_local_dataset(args.id, args.d4rl_file)
    if args.train_steps <= 0 and not args.kind:
        raise UserError("nothing to do: pass --kind (one or more of " + ", ".join(KINDS)
                        + ") and/or --train-steps N")
    check_positive(args, "transitions", "snapshot_every", "checkpoint_every", "eval_episodes", "batch_size")
    check_interval(args, "lr", 0, float("inf"), "()")
    check_positive(args, "train_steps", "warmup_steps", zero=True)
    check_seed(args, "seed")
    check_interval(args, "gamma", 0, 1)
    check_interval(args, "tau", 0, 1, "(]")
    make_env(args.env).close()  # fail fast on a bad env, before any training
    # Small networks and single-row rollouts: one thread is faster than several fighting over 2 cores.
    torch.set_num_threads(1)
    snapshot_dir = args.snapshot_dir or default_snapshot_dir(args.env)
    training_buffer = None
    if args.train_steps > 0:
        _, training_buffer = train_agent(args, snapshot_dir)
    if args.kind:
        build_datasets(args.env, tuple(dict.fromkeys(args.kind)), args.seed, args.transitions, snapshot_dir,
                       args.medium_snapshot, args.expert_snapshot, training_buffer, args.force,
                       args.random_policy)


if __name__ == "__main__":
    install_user_error_hook()
    main(tyro.cli(Args))
