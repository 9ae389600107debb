"""Build D4RL-style Minari datasets offline for any Gymnasium env with a Box action space.

    python tools/make_dataset.py --env Hopper-v5 --kind medium-replay        # from shipped snapshots
    python tools/make_dataset.py --env Hopper-v5 --kind medium expert --transitions 200000
    python tools/make_dataset.py --env Hopper-v5 --train-steps 200000 --snapshot-every 10000  # rerun to resume
    python tools/make_dataset.py --env Pendulum-v1 --train-steps 15000 --kind medium-replay
    python tools/make_dataset.py --env Hopper-v5 --kind random --random-policy uniform

Writes `local/<env>/<kind>-v0` (env id lower-cased without its `-vN` suffix; with --transitions N,
`local/<env>/<kind>-<N/1000>k-v0`, e.g. `local/hopper/medium-200k-v0`, so that each id names one
dataset) into MINARI_DATASETS_PATH (default ~/.minari/datasets). The recipe follows D4RL:

- random:        rollouts of a randomly initialised policy (a fresh actor of this tool's SAC, PyTorch's
                 default initialisation, seeded from its own stream), sampling from its stochastic
                 policy, as D4RL did with a randomly initialised SAC actor. `--random-policy uniform`
                 draws uniform random actions over the action Box instead.
- medium:        rollouts of a SAC snapshot at about one third of the expert return (for
                 halfcheetah/hopper/walker2d/ant: of D4RL's expert return, normalised score ~33).
- expert:        rollouts of the best SAC snapshot (the final policy of a converged run). For
                 halfcheetah/hopper/walker2d/ant it must score at least EXPERT_MIN_SCORE (90)
                 D4RL-normalised; below that the expert kinds are refused (train further, or name a
                 snapshot with --expert-snapshot).
- medium-expert: the medium rollouts followed by the expert rollouts (twice --transitions).
- medium-replay: the SAC agent's replay buffer up to the medium snapshot. When this tool trains the
                 agent in the same call, that is the real buffer. From shipped snapshots (the buffer
                 is too large to ship) it is approximated: the uniform-random warm-up, then for each
                 snapshot interval the snapshot at its end, sampled from its stochastic policy
                 (the agent's own exploration noise), for as many steps as the interval had.

medium and expert rollouts sample from the stochastic SAC policy, as D4RL did. Datasets have
`--transitions` transitions (D4RL: 1M; the last episode is cut and marked truncated to hit the size
exactly); medium-replay defaults to the size of the buffer it stands for.

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

Reference scores: halfcheetah/hopper/walker2d/ant use D4RL's constants (basics.D4RL_REF_SCORES) so
that scores are on the familiar scale; other envs use the uniform random policy's mean return and
the expert snapshot's mean evaluation return.

Same seed and same snapshots give byte-identical arrays: every episode resets its env with its own
seed, and every random stream (numpy and torch) comes from its own explicitly seeded generator.
"""

from __future__ import annotations

import difflib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Not common: common.load_dataset imports this file to build local/* datasets on first use.
from basics import (  # noqa: E402
    D4RL_REF_SCORES,
    UserError,
    atomic_write_json,
    install_user_error_hook,
    save_checkpoint,
)

Kind = Literal["random", "medium", "medium-replay", "expert", "medium-expert"]
KINDS: tuple[str, ...] = Kind.__args__
RandomPolicy = Literal["init", "uniform"]
SNAPSHOTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "snapshots")
D4RL_TRANSITIONS = 1_000_000
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0

# Independent random streams, so that adding an episode to one kind never shifts another.
STREAM_TRAIN, STREAM_RANDOM, STREAM_MEDIUM, STREAM_EXPERT, STREAM_EVAL, STREAM_RANDOM_REF = range(6)
STREAM_REPLAY_WARMUP, STREAM_REPLAY_SEGMENT = 10, 100


@dataclass
class Args:
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
    among the warm-up and the snapshot intervals in proportion to their lengths); a size given here
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
# Envs, seeds, names
# ----------------------------------------------------------------------------------------------
def env_name(env_id: str) -> str:
    """'Hopper-v5' -> 'hopper', the middle part of the dataset id."""
    return re.sub(r"-v\d+$", "", env_id).lower().replace("/", "-")


def dataset_id_for(env_id: str, kind: str, transitions: Optional[int] = None) -> str:
    """`local/<env>/<kind>-v0` at the default size; a build of another size has its own id,
    `local/<env>/<kind>-<size>-v0` (size 50k for 50,000 transitions), so that an id names one dataset."""
    size = "" if transitions is None else f"-{transitions // 1000}k" if transitions % 1000 == 0 else f"-{transitions}"
    return f"local/{env_name(env_id)}/{kind}{size}-v0"


def parse_local_id(dataset_id: str) -> Optional[tuple[str, str, Optional[int]]]:
    """(env name, kind, transitions or None for the default size) of a `local/` id, or None."""
    match = re.fullmatch(r"local/([^/]+)/(.+)-v0", dataset_id)
    if match is None:
        return None
    sized = re.fullmatch(r"(.+)-([1-9][0-9]*)(k?)", match[2])
    if sized and sized[1] in KINDS:
        return match[1], sized[1], int(sized[2]) * (1000 if sized[3] else 1)
    return (match[1], match[2], None) if match[2] in KINDS else None


def make_env(env_id: str):
    """gym.make with the checks this tool needs, as one-line UserErrors."""
    import gymnasium as gym
    from gymnasium import spaces

    try:
        env = gym.make(env_id)
    except gym.error.Error as exc:
        close = difflib.get_close_matches(env_id, list(gym.registry.keys()), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise UserError(f"Gymnasium does not know env id '{env_id}' ({exc}){hint}") from None
    act, obs = env.action_space, env.observation_space
    if not isinstance(act, spaces.Box):
        env.close()
        raise UserError(f"env '{env_id}' has a {type(act).__name__} action space; make_dataset needs "
                        f"a Box (continuous) action space.")
    if len(act.shape) != 1 or not (np.all(np.isfinite(act.low)) and np.all(np.isfinite(act.high))):
        env.close()
        raise UserError(f"env '{env_id}' has action space {act}; a 1-D Box with finite bounds is needed.")
    if not isinstance(obs, spaces.Box) or len(obs.shape) != 1:
        env.close()
        raise UserError(f"env '{env_id}' has observation space {obs}; make_dataset needs flat Box "
                        f"observations.")
    return env


def sub_seed(seed: int, *stream: int) -> int:
    """A 32-bit seed for one random stream, derived from the user's seed."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])


def to_env_action(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """[-1, 1] (tanh policy space) -> the env's Box, as float32."""
    return (low + (action + 1.0) * 0.5 * (high - low)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# SAC
# ----------------------------------------------------------------------------------------------
class Actor(nn.Module):
    """Tanh-squashed Gaussian policy with a state-dependent std."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden_dim), nn.ReLU(),
                                   nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
        self.mean = nn.Linear(hidden_dim, act_dim)
        self.log_std = nn.Linear(hidden_dim, act_dim)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(obs)
        return self.mean(h), self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None):
        """Reparameterised action in [-1, 1] and its log-probability."""
        mean, log_std = self(obs)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        pre_tanh = mean + log_std.exp() * noise
        gaussian_log_prob = (-0.5 * noise.pow(2) - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
        # log(1 - tanh(u)^2) written with softplus, which stays finite where tanh saturates.
        squash_correction = (2.0 * (np.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))).sum(-1)
        return torch.tanh(pre_tanh), gaussian_log_prob - squash_correction

    def mode(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self(obs)[0])


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


def load_actor(path: str, obs_dim: int, act_dim: int) -> Actor:
    actor = Actor(obs_dim, act_dim)
    actor.load_state_dict(torch.load(path, weights_only=True))
    actor.eval()
    return actor


def stochastic_policy(actor: Actor, low, high, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        a = actor.sample(torch.as_tensor(obs, dtype=torch.float32)[None], generator)[0][0]
        return to_env_action(a.numpy(), low, high)

    return act


def deterministic_policy(actor: Actor, low, high) -> Callable[[np.ndarray], np.ndarray]:
    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        return to_env_action(actor.mode(torch.as_tensor(obs, dtype=torch.float32)[None])[0].numpy(), low, high)

    return act


def random_init_actor(obs_dim: int, act_dim: int, seed: int) -> Actor:
    """A freshly initialised actor whose weights come from `seed` alone: the global torch stream is
    neither read nor advanced (the build may run inside a training script, common.resolve_dataset)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        actor = Actor(obs_dim, act_dim)
    return actor.eval()


def uniform_policy(low, high, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    return lambda obs: rng.uniform(low, high).astype(np.float32)


def mean_return(env, act: Callable[[np.ndarray], np.ndarray], episodes: int, seed: int) -> tuple[float, float]:
    """Mean and std of the return over `episodes` episodes with seeds seed, seed+1, ..."""
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=(seed + ep) % 2**32)
        total, done = 0.0, False
        while not done:
            obs, r, term, trunc, _ = env.step(act(obs))
            total += float(r)
            done = term or trunc
        returns.append(total)
    return float(np.mean(returns)), float(np.std(returns))


# ----------------------------------------------------------------------------------------------
# Snapshots and their manifest
# ----------------------------------------------------------------------------------------------
def default_snapshot_dir(env_id: str) -> str:
    return os.path.join(SNAPSHOTS_DIR, env_id.replace("/", "_"))


def load_manifest(snapshot_dir: str, env_id: str) -> dict:
    path = os.path.join(snapshot_dir, "manifest.json")
    if not os.path.exists(path):
        raise UserError(f"no snapshots for '{env_id}' in {snapshot_dir} (no manifest.json); train them with "
                        f"`python tools/make_dataset.py --env {env_id} --train-steps N`"
                        f"{shipped_envs_hint()}")
    with open(path) as f:
        return json.load(f)


def shipped_manifests() -> dict[str, tuple[str, str]]:
    """env name ('hopper') -> (env id, snapshot folder) for every shipped manifest."""
    found = {}
    if os.path.isdir(SNAPSHOTS_DIR):
        for entry in sorted(os.listdir(SNAPSHOTS_DIR)):
            path = os.path.join(SNAPSHOTS_DIR, entry, "manifest.json")
            if os.path.exists(path):
                with open(path) as f:
                    env_id = json.load(f)["env_id"]
                found[env_name(env_id)] = (env_id, os.path.join(SNAPSHOTS_DIR, entry))
    return found


def shipped_envs_hint() -> str:
    envs = [env_id for env_id, _ in shipped_manifests().values()]
    return f"; shipped snapshots exist for: {', '.join(envs)}" if envs else "; no snapshots are shipped"


def choose_snapshots(snapshots: list[dict], random_return: float, env_id: str) -> dict:
    """Expert = best evaluated snapshot; medium = the one closest to a third of the way from the
    floor to the top (D4RL's "about one third of expert"), i.e. a normalised score of about 33.
    Where D4RL's constants are used (halfcheetah, hopper, walker2d, ant), floor and top are D4RL's
    random and expert returns, so that medium means the same level whatever the agent reached; else
    the floor is this env's random return and the top the best snapshot's, which keeps "a third"
    meaningful for negative-return envs such as Pendulum."""
    best = max(snapshots, key=lambda s: s["eval_return"])
    top, floor, reached = best["eval_return"], random_return, None
    if env_name(env_id) in D4RL_REF_SCORES:
        floor, top = D4RL_REF_SCORES[env_name(env_id)]
        reached = best["eval_return"] >= top
    target = floor + (top - floor) / 3.0
    medium = min(snapshots, key=lambda s: (abs(s["eval_return"] - target), s["step"]))
    choice = {"medium": medium["step"], "expert": best["step"], "medium_target_return": target,
              "expert_is_final": best["step"] == snapshots[-1]["step"], "reached_d4rl_expert": reached}
    if reached is False:
        score = d4rl_normalized(env_id, best["eval_return"])
        use = (f"the expert kinds use this best snapshot (D4RL-normalised {score:.1f})" if score >= EXPERT_MIN_SCORE
               else f"the expert kinds are refused until a snapshot scores at least {EXPERT_MIN_SCORE:.0f} "
                    f"D4RL-normalised (this one: {score:.1f})")
        choice["expert_note"] = (f"not expert level: the best return reached, {best['eval_return']:.1f}, is below "
                                 f"D4RL's expert return {top:.1f}; {use}")
    return choice


# The expert and medium-expert kinds of an env with D4RL's constants are built only from a snapshot
# that scores at least this (D4RL-normalised): below it "expert" would name a medium-level policy.
EXPERT_MIN_SCORE = 90.0


def d4rl_normalized(env_id: str, ret: float) -> Optional[float]:
    if env_name(env_id) not in D4RL_REF_SCORES:
        return None
    low, high = D4RL_REF_SCORES[env_name(env_id)]
    return 100.0 * (ret - low) / (high - low)


def check_expert_level(manifest: dict, expert: dict, dataset_id: str) -> None:
    """One-line refusal of an expert-kind build whose best snapshot is below expert level."""
    env_id = manifest["env_id"]
    score = d4rl_normalized(env_id, expert["eval_return"])
    if score is not None and score < EXPERT_MIN_SCORE:
        raise UserError(
            f"'{dataset_id}' needs an expert policy, and the best {env_id} snapshot (step {expert['step']} of "
            f"{manifest['steps_completed']} trained, return {expert['eval_return']:.0f}) scores {score:.0f} "
            f"D4RL-normalised, below expert level ({EXPERT_MIN_SCORE:.0f}); train further (`python "
            f"tools/make_dataset.py --env {env_id} --train-steps N`, see tools/SNAPSHOTS.md) or build it from "
            f"a snapshot you name (`python tools/make_dataset.py --env {env_id} --kind <kind> --expert-snapshot STEP`)")


def snapshot_by_step(manifest: dict, step: int) -> dict:
    for snap in manifest["snapshots"]:
        if snap["step"] == step:
            return snap
    steps = ", ".join(str(s["step"]) for s in manifest["snapshots"])
    raise UserError(f"no snapshot at step {step} for '{manifest['env_id']}'; snapshots: {steps}")


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


def lock_folder(folder: str):
    """Hold a lock on `folder` for this process (released when it exits, killed or not), so that the
    same command started again while the first still runs is refused instead of both writing."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        return None
    handle = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserError(f"another process is training into {os.path.dirname(folder)}; wait for it or stop it "
                        f"(it writes a checkpoint on SIGTERM)") from None
    return handle


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
    os.makedirs(checkpoint_dir, exist_ok=True)
    # The checkpoints (hundreds of MB for 1M steps) must never be committed with the snapshots.
    with open(os.path.join(checkpoint_dir, ".gitignore"), "w") as f:
        f.write("*\n")
    lock = lock_folder(checkpoint_dir)
    try:
        with StopSignals() as signals:
            return _train_agent(args, snapshot_dir, checkpoint_dir, signals)
    finally:
        if lock is not None:
            lock.close()


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
            atomic_write_json(os.path.join(snapshot_dir, "manifest.json"), manifest)
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
            save_checkpoint(os.path.join(snapshot_dir, file), agent.actor.state_dict())
            manifest["snapshots"].append({"step": done_steps, "file": file, "eval_return": ret,
                                          "eval_return_std": std,
                                          "wall_time_s": round(wall_before + time.time() - start, 1)})
            manifest["steps_completed"] = done_steps
            manifest.update(choose_snapshots(manifest["snapshots"], manifest["random_return"], args.env))
            atomic_write_json(os.path.join(snapshot_dir, "manifest.json"), manifest)
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


# ----------------------------------------------------------------------------------------------
# Collection
# ----------------------------------------------------------------------------------------------
class Progress:
    """One line for a long loop: redrawn in place on a terminal; elsewhere (a log file) printed at
    each tenth of the way, so that a build of 1M transitions writes ten lines, not thousands. The
    line ends when `total` is reached. `note` adds the loop's own figures (called when drawing).
    `start` is where a resumed loop begins: the rate counts only the steps done since."""

    def __init__(self, label: str, total: int, unit: str = "transitions",
                 note: Optional[Callable[[], str]] = None, start: int = 0):
        self.label, self.total, self.unit, self.note = label, max(total, 1), unit, note
        self.done, self.first, self.start = start, start, time.time()
        self.tenths = start * 10 // self.total
        self.live = sys.stdout.isatty()
        self.drawn_at, self.width = 0.0, 0  # width > 0: a live line is on screen

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        if self.live:
            # five redraws a second at most: a print costs as much as a rollout step
            if self.done >= self.total or time.time() - self.drawn_at > 0.2:
                text = self.text()
                print("\r" + text.ljust(self.width), end="", flush=True)
                self.drawn_at, self.width = time.time(), len(text)
                if self.done >= self.total:
                    print(flush=True)
                    self.width = 0
        elif self.done * 10 // self.total > self.tenths:
            self.tenths = self.done * 10 // self.total
            print(self.text(), flush=True)

    def text(self) -> str:
        elapsed = time.time() - self.start
        rate = (self.done - self.first) / max(elapsed, 1e-9)
        eta = int((self.total - self.done) / max(rate, 1e-9))
        text = (f"{self.label} {self.done}/{self.total} {self.unit} ({self.done / self.total:.0%}) | "
                f"{rate:.0f}/s | ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}")
        return text + (f" | {self.note()}" if self.note else "")

    def print(self, line: str) -> None:
        """Print a line of its own (an evaluation) over the live line, which the next update draws below it."""
        print("\r" + line.ljust(self.width) if self.width else line, flush=True)
        self.width = 0


def rollout(env, act: Callable[[np.ndarray], np.ndarray], n_transitions: int, seed: int,
            progress: Progress) -> list[dict]:
    """Whole episodes until `n_transitions`; the last one is cut (and marked truncated) to fit."""
    episodes, total = [], 0
    while total < n_transitions:
        obs, _ = env.reset(seed=(seed + len(episodes)) % 2**32)
        observations, actions, rewards, terms, truncs = [obs], [], [], [], []
        while True:
            a = act(obs)
            obs, r, term, trunc, _ = env.step(a)
            total += 1
            progress.advance()
            trunc = trunc or (total == n_transitions and not term)
            observations.append(obs)
            actions.append(a)
            rewards.append(r)
            terms.append(term)
            truncs.append(trunc)
            if term or trunc:
                break
        episodes.append({"observations": np.stack(observations), "actions": np.stack(actions),
                         "rewards": np.asarray(rewards, dtype=np.float64),
                         "terminations": np.asarray(terms, dtype=bool),
                         "truncations": np.asarray(truncs, dtype=bool)})
    return episodes


def episodes_from_buffer(buf: dict, start: int, stop: int) -> list[dict]:
    """Split buffer rows [start, stop) into episodes; a piece cut off at `stop` is marked truncated."""
    ends = np.flatnonzero(buf["terminations"][start:stop] | buf["truncations"][start:stop]) + start + 1
    if not len(ends) or ends[-1] != stop:
        ends = np.append(ends, stop)
    episodes, first = [], start
    for end in ends:
        truncs = buf["truncations"][first:end].copy()
        truncs[-1] |= not buf["terminations"][end - 1]
        episodes.append({
            "observations": np.concatenate([buf["observations"][first:end], buf["next_observations"][end - 1:end]]),
            "actions": buf["actions"][first:end], "rewards": buf["rewards"][first:end],
            "terminations": buf["terminations"][first:end].copy(), "truncations": truncs})
        first = end
    return episodes


def split_quota(lengths: list[int], total: Optional[int]) -> list[int]:
    """Share `total` transitions among segments in proportion to their lengths (largest remainder)."""
    if total is None or total >= sum(lengths):
        return list(lengths)
    exact = np.asarray(lengths, dtype=np.float64) * total / sum(lengths)
    quota = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quota), kind="stable")[: total - quota.sum()]:
        quota[i] += 1
    return quota.tolist()


def replay_segments(manifest: dict, medium_step: int) -> list[tuple[Optional[dict], int, int]]:
    """(snapshot or None for the uniform warm-up, first step, length) of the buffer up to medium."""
    warmup = min(manifest["warmup_steps"], medium_step)
    segments, previous = [(None, 0, warmup)], warmup
    for snap in manifest["snapshots"]:
        if snap["step"] > medium_step:
            break
        if snap["step"] > previous:
            segments.append((snap, previous, snap["step"] - previous))
            previous = snap["step"]
    return segments


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------
def build_datasets(env_id: str, kinds: tuple[str, ...], seed: int = 0, transitions: Optional[int] = None,
                   snapshot_dir: Optional[str] = None, medium_step: Optional[int] = None,
                   expert_step: Optional[int] = None, training_buffer: Optional[dict] = None,
                   force: bool = False, random_policy: str = "init") -> list[str]:
    """Write one Minari dataset per kind; returns their ids."""
    if random_policy not in RandomPolicy.__args__:
        raise UserError(f"unknown random policy '{random_policy}'; choose one of "
                        f"{', '.join(RandomPolicy.__args__)}")
    # Rollouts call a small network on one row at a time: one thread is fastest, and more threads
    # spin-wait against any other process on the cores. The caller's setting comes back after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_datasets(env_id, kinds, seed, transitions, snapshot_dir, medium_step, expert_step,
                               training_buffer, force, random_policy)
    finally:
        torch.set_num_threads(threads)


def _build_datasets(env_id, kinds, seed, transitions, snapshot_dir, medium_step, expert_step,
                    training_buffer, force, random_policy) -> list[str]:
    import minari

    env = make_env(env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    name = env_name(env_id)
    ids = [dataset_id_for(env_id, kind, transitions) for kind in kinds]
    existing = set(minari.list_local_datasets())
    for dataset_id in ids:
        if dataset_id in existing and not force:
            raise UserError(f"dataset '{dataset_id}' already exists in {minari.storage.get_dataset_path()}; "
                            f"pass --force to replace it")

    # Random data needs no snapshots, but their manifest (when there is one) gives its ref scores.
    snapshot_dir = snapshot_dir or default_snapshot_dir(env_id)
    manifest, medium, expert = None, None, None
    if any(kind != "random" for kind in kinds) or os.path.exists(os.path.join(snapshot_dir, "manifest.json")):
        manifest = load_manifest(snapshot_dir, env_id)
        medium = snapshot_by_step(manifest, medium_step or manifest["medium"])
        expert = snapshot_by_step(manifest, expert_step or manifest["expert"])
        if expert_step is None:
            for kind, dataset_id in zip(kinds, ids):
                if kind in ("expert", "medium-expert"):
                    check_expert_level(manifest, expert, dataset_id)
    size = transitions or D4RL_TRANSITIONS

    if name in D4RL_REF_SCORES:
        ref_min, ref_max = D4RL_REF_SCORES[name]
        ref_note = "D4RL's reference constants (measured on the v2 envs)"
    elif manifest is not None:
        ref_min, ref_max = manifest["random_return"], expert["eval_return"]
        ref_note = ("the uniform random policy's and the expert snapshot's mean returns "
                    f"({manifest['eval_episodes']} episodes each)")
    else:
        ref_min = ref_max = None
        ref_note = "none (no snapshots for this env, so no expert return)"

    cache: dict[str, list[dict]] = {}
    replay_how = ""
    random_name = "uniform random" if random_policy == "uniform" else "randomly initialised SAC actor"

    def policy_rollouts(snap: dict, stream: int, n: int, progress: Progress) -> list[dict]:
        actor = load_actor(os.path.join(snapshot_dir, snap["file"]), obs_dim, act_dim)
        return rollout(env, stochastic_policy(actor, low, high, sub_seed(seed, stream, 1)), n,
                       sub_seed(seed, stream), progress)

    def medium_episodes(label):
        if "medium" not in cache:
            cache["medium"] = policy_rollouts(medium, STREAM_MEDIUM, size, Progress(f"[{label}]", size))
        return cache["medium"]

    def expert_episodes(label):
        if "expert" not in cache:
            cache["expert"] = policy_rollouts(expert, STREAM_EXPERT, size, Progress(f"[{label}]", size))
        return cache["expert"]

    def medium_replay_episodes(label):
        segments = replay_segments(manifest, medium["step"])
        quotas = split_quota([length for _, _, length in segments], transitions)
        # The kind's description is built here, where the quotas are known.
        nonlocal replay_how
        replay_how = replay_description(segments, medium["step"], training_buffer is not None, sum(quotas))
        episodes, progress = [], Progress(f"[{label}]", sum(quotas))  # one line for all the segments
        for i, ((snap, first, _), quota) in enumerate(zip(segments, quotas)):
            if quota == 0:
                continue
            if training_buffer is not None:
                episodes += episodes_from_buffer(training_buffer, first, first + quota)
            elif snap is None:
                episodes += rollout(env, uniform_policy(low, high, sub_seed(seed, STREAM_REPLAY_WARMUP, 1)),
                                    quota, sub_seed(seed, STREAM_REPLAY_WARMUP), progress)
            else:
                episodes += policy_rollouts(snap, STREAM_REPLAY_SEGMENT + i, quota, progress)
        return episodes

    for kind, dataset_id in zip(kinds, ids):
        label = dataset_id
        print(f"[collect] {dataset_id}: {kind} data for {env_id}", flush=True)
        if kind == "random" and random_policy == "uniform":
            episodes = rollout(env, uniform_policy(low, high, sub_seed(seed, STREAM_RANDOM, 1)), size,
                               sub_seed(seed, STREAM_RANDOM), Progress(f"[{label}]", size))
            how = "uniform random actions over the action Box (--random-policy uniform)"
        elif kind == "random":
            actor = random_init_actor(obs_dim, act_dim, sub_seed(seed, STREAM_RANDOM, 2))
            act = stochastic_policy(actor, low, high, sub_seed(seed, STREAM_RANDOM, 1))
            episodes = rollout(env, act, size, sub_seed(seed, STREAM_RANDOM), Progress(f"[{label}]", size))
            how = ("rollouts sampling from a randomly initialised policy (a fresh SAC actor, PyTorch's "
                   "default initialisation; D4RL's recipe)")
        elif kind == "medium":
            episodes = medium_episodes(label)
            how = "rollouts sampling from the stochastic medium policy"
        elif kind == "expert":
            episodes = expert_episodes(label)
            how = "rollouts sampling from the stochastic expert policy"
        elif kind == "medium-expert":
            episodes = medium_episodes(label + " medium half") + expert_episodes(label + " expert half")
            how = "the medium rollouts followed by the expert rollouts, each sampling from its stochastic policy"
        else:
            episodes = medium_replay_episodes(label)
            how = replay_how

        parts = [f"D4RL-style '{kind}' dataset for {env_id}, built offline by tools/make_dataset.py "
                 f"with seed {seed}: {how}."]
        if manifest is not None:
            parts.append(
                f"Behaviour agent: SAC trained online by the same tool (seed {manifest['seed']}, "
                f"{manifest['steps_completed']} env steps); medium snapshot = step {medium['step']} "
                f"(mean eval return {medium['eval_return']:.1f}), expert snapshot = step {expert['step']} "
                f"(mean eval return {expert['eval_return']:.1f}"
                + ("" if manifest.get("reached_d4rl_expert") in (None, True)
                   else ", the best this agent reached: below D4RL's expert level")
                + ").")
        n_steps = sum(len(ep["rewards"]) for ep in episodes)
        parts.append(f"{n_steps} transitions in {len(episodes)} episodes; reference scores: {ref_note}.")
        buffers = [_episode_buffer(i, ep) for i, ep in enumerate(episodes)]
        refs = {} if ref_min is None else {"ref_min_score": ref_min, "ref_max_score": ref_max}
        if dataset_id in existing:
            minari.delete_dataset(dataset_id)
        minari.create_dataset_from_buffers(
            dataset_id, buffers, env=env, eval_env=env_id,
            algorithm_name=random_name if kind == "random" else "SAC (tools/make_dataset.py)",
            author="offline-rl tools/make_dataset.py", author_email="offline-rl@localhost",
            code_permalink="tools/make_dataset.py (this repository)", description=" ".join(parts), **refs)
        print(f"[collect] wrote {dataset_id}: {n_steps} transitions, {len(episodes)} episodes, mean "
              f"episode return {np.mean([ep['rewards'].sum() for ep in episodes]):.1f}", flush=True)
    env.close()
    return ids


def replay_description(segments: list, medium_step: int, real_buffer: bool, kept: int) -> str:
    thinned = ("" if kept == medium_step else
               f"; {kept} of those {medium_step} transitions kept, the start of every segment (warm-up and "
               f"snapshot intervals) in proportion to its length")
    if real_buffer:
        return (f"the SAC agent's own replay buffer up to the medium snapshot (its first {medium_step} env "
                f"steps, {segments[0][2]} uniform-random warm-up steps included){thinned}")
    steps = [snap["step"] for snap, _, _ in segments[1:]]
    return (f"an approximation of the SAC agent's replay buffer up to the medium snapshot (step {medium_step}), "
            f"which is too large to ship: {segments[0][2]} uniform-random warm-up "
            f"steps as in training, then for each interval between training snapshots (steps "
            f"{', '.join(map(str, steps))}) rollouts of the snapshot at its end, sampling from its stochastic "
            f"policy (the exploration noise the agent used), as many steps as the interval had{thinned}")


def _episode_buffer(index: int, episode: dict):
    from minari.data_collector import EpisodeBuffer

    return EpisodeBuffer(id=index, observations=episode["observations"], actions=episode["actions"],
                         rewards=episode["rewards"], terminations=episode["terminations"],
                         truncations=episode["truncations"])


def build_local_dataset(dataset_id: str) -> None:
    """Build a `local/<env>/<kind>[-<size>]-v0` id from the shipped snapshots (used by common.load_dataset)."""
    import minari

    parsed = parse_local_id(dataset_id)
    shipped = shipped_manifests()
    if parsed is None or parsed[0] not in shipped:
        ids = [dataset_id_for(env_id, "<kind>") for env_id, _ in shipped.values()]
        raise UserError(f"cannot build '{dataset_id}': buildable ids are {', '.join(ids) or '(none)'} with "
                        f"<kind> one of {', '.join(KINDS)}, optionally sized (e.g. medium-50k-v0 for 50,000 "
                        f"transitions){shipped_envs_hint()}")
    name, kind, transitions = parsed
    env_id, snapshot_dir = shipped[name]
    print(f"'{dataset_id}' is not in {minari.storage.get_dataset_path()}: building it from the shipped "
          f"snapshots in {snapshot_dir} ({transitions or 'the default number of'} transitions); "
          f"this happens once", flush=True)
    build_datasets(env_id, (kind,), transitions=transitions, snapshot_dir=snapshot_dir)


def main(args: Args) -> None:
    if args.train_steps <= 0 and not args.kind:
        raise UserError("nothing to do: pass --kind (one or more of " + ", ".join(KINDS)
                        + ") and/or --train-steps N")
    if args.transitions is not None and args.transitions <= 0:
        raise UserError(f"--transitions must be positive, got {args.transitions}")
    make_env(args.env).close()  # fail fast on a bad env, before any training
    # Small networks and single-row rollouts: one thread is faster than several fighting over 2 cores.
    torch.set_num_threads(1)
    snapshot_dir = args.snapshot_dir or default_snapshot_dir(args.env)
    training_buffer = None
    if args.train_steps > 0:
        _, training_buffer = train_agent(args, snapshot_dir)
    if args.kind:
        build_datasets(args.env, tuple(args.kind), args.seed, args.transitions, snapshot_dir,
                       args.medium_snapshot, args.expert_snapshot, training_buffer, args.force,
                       args.random_policy)


if __name__ == "__main__":
    install_user_error_hook()
    main(tyro.cli(Args))
