"""Behaviour policies and their rollouts: the SAC actor the snapshots hold, the policies built
from it (sampled, deterministic, freshly initialised) or uniform, whole-episode rollouts, and a
progress line for long loops. Every random stream comes from its own explicitly seeded generator.
"""

from __future__ import annotations

import difflib
import sys
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


# ----------------------------------------------------------------------------------------------
# Envs
# ----------------------------------------------------------------------------------------------
def make_env(env_id: str):
    """gym.make with the checks the dataset builder needs, as one-line UserErrors."""
    import gymnasium as gym
    from gymnasium import spaces

    try:
        env = gym.make(env_id)
    except (gym.error.Error, ImportError) as exc:  # a module:Env id whose module is not installed too
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


def to_env_action(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """[-1, 1] (tanh policy space) -> the env's Box, as float32."""
    return (low + (action + 1.0) * 0.5 * (high - low)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Policies
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



def load_actor(path: str, obs_dim: int, act_dim: int) -> Actor:
    actor = Actor(obs_dim, act_dim)
    try:
        actor.load_state_dict(torch.load(path, weights_only=True))
    except Exception as exc:  # missing, damaged, or another env's
        reason = (str(exc).strip().splitlines() or [""])[0][:150]
        raise UserError(f"the snapshot {path} is not an actor of {obs_dim}-dimensional states and "
                        f"{act_dim}-dimensional actions ({type(exc).__name__}: {reason}); restore it, or "
                        f"train the snapshots again with --train-steps") from None
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
    neither read nor advanced (the build may run inside a training script: recipe.build_local_dataset)."""
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
# Rollouts
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

