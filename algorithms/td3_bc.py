"""TD3+BC: Fujimoto & Gu, "A Minimalist Approach to Offline Reinforcement Learning", NeurIPS 2021.

Implements TD3 (clipped double-Q target with target-policy smoothing, delayed actor and target
updates) with the paper's one change to the actor, eq. (3):
    pi = argmax_pi  E_(s,a)~D [ lambda * Q1(s, pi(s)) - (pi(s) - a)^2 ],
    lambda = alpha / ( (1/N) sum_i |Q1(s_i, pi(s_i))| )          (detached, per batch)
and state normalisation (mean and std over the dataset, std + 1e-3).

Hyperparameters (the paper's and sfujim/TD3_BC's): alpha 2.5, 2x256 networks, Adam 3e-4, batch 256,
gamma 0.99, tau 0.005, policy noise 0.2 clipped at 0.5, actor and targets every 2 steps, rewards
untouched, 1M steps.

Deviations:
- none. Actions are in [-1, 1] (the data layer rescales them), so max_action is 1.
"""

import copy
import os
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


@dataclass
class Args:
    # --- shared by every algorithm ---
    env: str = "local/hopper/medium-replay-v0"
    """Minari dataset id: local first, else downloaded; local/* ids are built offline on first use"""
    seed: int = 0
    """seed of python, numpy, torch and the evaluation envs"""
    total_steps: int = 1_000_000
    """gradient steps"""
    batch_size: int = 256
    """transitions per gradient step, drawn with replacement; at most the dataset's size"""
    eval_every: int = 5_000
    """evaluate every this many steps (and at the last step)"""
    eval_episodes: int = 10
    """episodes per evaluation, run at once in a vector env"""
    final_episodes: Optional[int] = None
    """episodes of the last evaluation, the final score (default: --eval-episodes)"""
    log_every: int = 1_000
    """write training scalars every this many steps (the only device syncs of the loop)"""
    device: str = "auto"
    """torch device: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    output_dir: str = "runs"
    """runs are written to <output_dir>/<run_name>/"""
    run_name: Optional[str] = None
    """folder name of this run (default: <env>__<algorithm>__<seed>__<unix time>)"""
    save_model: bool = False
    """write model.pt (networks, normalisation statistics, args) at the end; tools/evaluate.py evaluates it"""
    capture_video: bool = False
    """record the first episode of the last evaluation to <run dir>/videos/step_<step>.mp4"""
    track: bool = False
    """also log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project: str = "offline-rl"
    """wandb project name, with --track"""
    resume: Literal["auto", "never"] = "auto"
    """auto: a run folder with a checkpoint continues from it, a finished one is not re-run (needs --run-name); never: start over"""
    compile: bool = False
    """torch.compile each network update's forward passes and loss (the first steps are slow while it compiles)"""
    precision: common.Precision = "fp32"
    """fp32; tf32: fp32 with TF32 matrix products on CUDA GPUs from Ampere on (no effect on a CPU); bf16: training steps under torch.autocast(bfloat16) with fp32 output layers (docs/usage.md, Precision)"""
    # --- TD3+BC ---
    alpha: float = 2.5
    """alpha of eq. 3: lambda = alpha / mean|Q|; larger means less behaviour cloning"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak step of the target networks"""
    lr: float = 3e-4
    """Adam learning rate of actor and critic"""
    policy_noise: float = 0.2
    """std of the Gaussian noise on the target action (target-policy smoothing)"""
    noise_clip: float = 0.5
    """the target noise is clipped to +-noise_clip"""
    policy_freq: int = 2
    """actor and target networks are updated every policy_freq critic steps"""
    hidden_dim: int = 256
    """width of the two hidden layers of every network"""
    normalize_states: bool = True
    """standardise states with the dataset's mean and std"""


def check_args(args: Args) -> None:
    """This file's own flags, right after parsing (common.check_args checks the shared ones)."""
    common.check_positive(args, "lr", "policy_freq", "hidden_dim")
    common.check_positive(args, "alpha", "policy_noise", "noise_clip", zero=True)
    common.check_interval(args, "gamma", 0, 1, "[)")
    common.check_interval(args, "tau", 0, 1, "(]")


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
def mlp(in_dim: int, out_dim: int, hidden_dim: int, n_hidden: int) -> nn.Sequential:
    """n_hidden ReLU layers of width hidden_dim, then a linear output layer (fp32 under --precision bf16)."""
    layers, d = [], in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(d, hidden_dim), nn.ReLU()]
        d = hidden_dim
    return nn.Sequential(*layers, common.OutputLinear(d, out_dim))


class Actor(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = mlp(obs_dim, act_dim, hidden_dim, 2)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))


class Critic(nn.Module):
    """Twin Q networks as a 2-member ensemble: every layer is one batched matmul for both."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = common.ensemble_mlp(2, obs_dim + act_dim, 1, hidden_dim, 2)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """(2, N): Q1(s, a) and Q2(s, a), which unpack as `q1, q2 = critic(obs, act)`."""
        x = torch.cat([obs, act], dim=-1)
        return self.net(x.expand(2, -1, -1)).squeeze(-1)

    def q1(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Q1(s, a) alone, from the first member (the actor's loss needs no Q2)."""
        return self.net(torch.cat([obs, act], dim=-1), member=0).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Algorithm
# ----------------------------------------------------------------------------------------------
def bc_regularised_loss(q_pi: torch.Tensor, pi_actions: torch.Tensor, data_actions: torch.Tensor,
               alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3: -lambda * mean Q1(s, pi(s)) + mean (pi(s) - a)^2, lambda = alpha / mean|Q1| (no grad)."""
    lmbda = alpha / q_pi.abs().mean().detach()
    return -lmbda * q_pi.mean() + F.mse_loss(pi_actions, data_actions), lmbda


class TD3BC:
    def __init__(self, args: Args, obs_dim: int, act_dim: int, device: torch.device):
        self.args = args
        self.actor = Actor(obs_dim, act_dim, args.hidden_dim).to(device)
        self.critic = Critic(obs_dim, act_dim, args.hidden_dim).to(device)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.lr, fused=True)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=args.lr, fused=True)
        self.total_it = 0
        self.critic_loss = common.compiled(self.critic_loss, args.compile)
        self.actor_loss = common.compiled(self.actor_loss, args.compile)
        self.train = common.autocast(self.train, args.precision, device)

    def critic_loss(self, batch: common.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Clipped double-Q TD loss with target-policy smoothing; and Q1(s, a)."""
        args = self.args
        obs, actions, rewards, next_obs, terminals = batch
        with torch.no_grad():
            noise = (torch.randn_like(actions) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
            next_actions = (self.actor_target(next_obs) + noise).clamp(-1.0, 1.0)
            target_q = torch.min(*self.critic_target(next_obs, next_actions))
            target_q = rewards + args.gamma * (1.0 - terminals) * target_q
        q1, q2 = self.critic(obs, actions)
        return F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q), q1

    def actor_loss(self, batch: common.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 3 at pi(s) (bc_regularised_loss); and lambda."""
        pi = self.actor(batch.observations)
        return bc_regularised_loss(self.critic.q1(batch.observations, pi), pi, batch.actions, self.args.alpha)

    def train(self, batch: common.Batch) -> dict:
        args = self.args
        self.total_it += 1

        critic_loss, q1 = self.critic_loss(batch)
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()
        metrics = {"losses/critic_loss": critic_loss.detach(), "losses/q1": q1.mean().detach()}

        if self.total_it % args.policy_freq == 0:
            self.critic.requires_grad_(False)  # the actor's loss moves the actor only: no critic weight gradients
            loss, lmbda = self.actor_loss(batch)
            self.critic.requires_grad_(True)
            self.actor_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.actor_optimizer.step()
            with torch.no_grad():
                for net, target in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                    torch._foreach_lerp_(list(target.parameters()), list(net.parameters()), args.tau)
            metrics |= {"losses/actor_loss": loss.detach(), "charts/lambda": lmbda}
        return metrics

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(obs)

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict()}


def make_policy(args: Args, obs_dim: int, act_dim: int) -> common.Policy:
    """`TD3BC.act` apart from training, with the networks it reads (untrained): tools/evaluate.py
    loads a model.pt into it."""
    return common.Policy(TD3BC.act, args, actor=Actor(obs_dim, act_dim, args.hidden_dim))


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------
if __name__ == "__main__":
    common.install_user_error_hook()
    args = tyro.cli(Args)
    common.check_args(args)
    check_args(args)
    device = common.resolve_device(args.device)
    common.seed_everything(args.seed)

    data = common.load_dataset(args.env, device)
    obs_mean, obs_std = common.normalize_obs(data) if args.normalize_states else (None, None)
    buffer = common.ReplayBuffer(data)

    agent = TD3BC(args, data.obs_dim, data.act_dim, device)
    run = common.Run(args, "td3_bc", data)
    start = run.resume(agent)
    metrics = {}  # the latest value of each metric (an actor's from its last update)
    for step in range(start + 1, args.total_steps + 1):
        metrics |= agent.train(buffer.sample(args.batch_size))
        if step % args.log_every == 0 or step == args.total_steps:
            run.log(step, metrics)
        if step % args.eval_every == 0 or step == args.total_steps:
            run.evaluate(step, agent.act, obs_mean, obs_std)
            run.checkpoint(step, agent)
        run.stop_if_signalled(step, agent)
    run.finish({"obs_mean": obs_mean, "obs_std": obs_std, **agent.state_dict()})
