"""AWR in its offline actor-critic form (AWAC): Peng, Kumar, Zhang & Levine, "Advantage-Weighted
Regression", 2019, with the critic of Nair, Gupta, Dalal & Levine, "AWAC: Accelerating Online
Reinforcement Learning with Offline Datasets", 2020, as configured for offline data by CORL.

Implements the AWR policy step (weighted behaviour cloning),
    pi = argmax_pi E_(s,a)~D [ min(exp(A(s,a) / lambda), w_max) * log pi(a|s) ],
with the advantage from a learned Q function instead of Monte-Carlo returns (the original AWR
regresses V on returns of on-policy rollouts, which offline data does not have):
    A(s, a) = min_i Q_i(s, a) - min_i Q_i(s, a~pi(s))            (V(s) from one policy sample)
    Q_i <- r + gamma * (1 - d) * min_j Q_targ_j(s', a'~pi(s'))    (no entropy term)

Hyperparameters (CORL's AWAC): lambda 1/3, w_max 100, 3x256 networks, Adam 3e-4, tau 0.005, batch
256, 1M steps. Gaussian policy with a state-independent log-std in [-20, 2] and an unsquashed mean;
sampled actions are clamped to [-1, 1]; evaluation uses the mean. States standardised (std + 1e-3),
as CORL's AWAC does.

Deviations:
- none from CORL's AWAC.
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
    # --- AWR ---
    awr_lambda: float = 1.0 / 3.0
    """temperature lambda: weights are exp(A / lambda); smaller means greedier"""
    max_weight: float = 100.0
    """advantage weights are clipped at this value"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak step of the target critic"""
    actor_lr: float = 3e-4
    """Adam learning rate of the policy"""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics"""
    hidden_dim: int = 256
    """width of the three hidden layers of every network"""
    normalize_states: bool = True
    """standardise states with the dataset's mean and std"""


def check_args(args: Args) -> None:
    """This file's own flags, right after parsing (common.check_args checks the shared ones)."""
    common.check_positive(args, "awr_lambda", "max_weight", "actor_lr", "critic_lr", "hidden_dim")
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
    """Gaussian policy: MLP mean, state-independent log-std."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.mean = mlp(obs_dim, act_dim, hidden_dim, 3)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def distribution(self, obs: torch.Tensor) -> torch.distributions.Normal:
        std = self.log_std.clamp(-20.0, 2.0).exp()
        # validate_args=False: the distribution's argument checks would sync the device on every call
        return torch.distributions.Normal(self.mean(obs), std, validate_args=False)

    @staticmethod
    def draw(pi: torch.distributions.Normal) -> torch.Tensor:
        """A sample of pi, clipped to the action box, without gradient. Drawn as mean + std * noise
        (the same numbers as pi.sample()): Normal.sample() checks std >= 0 on the host, a device sync."""
        with torch.no_grad():
            return (pi.loc + pi.scale * torch.randn_like(pi.loc)).clamp(-1.0, 1.0)

    def sample(self, obs: torch.Tensor) -> torch.Tensor:
        return self.draw(self.distribution(obs))


class Critic(nn.Module):
    """Twin Q networks as a 2-member ensemble: every layer is one batched matmul for both."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = common.ensemble_mlp(2, obs_dim + act_dim, 1, hidden_dim, 3)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """(2, N): Q1(s, a) and Q2(s, a), which unpack as `q1, q2 = critic(obs, act)`."""
        x = torch.cat([obs, act], dim=-1)
        return self.net(x.expand(2, -1, -1)).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Algorithm
# ----------------------------------------------------------------------------------------------
def awr_weights(advantages: torch.Tensor, awr_lambda: float, max_weight: float) -> torch.Tensor:
    """exp(A / lambda), clipped above at max_weight (AWR's weight clipping)."""
    return torch.exp(advantages / awr_lambda).clamp(max=max_weight)


class AWR:
    def __init__(self, args: Args, obs_dim: int, act_dim: int, device: torch.device):
        self.args = args
        self.actor = Actor(obs_dim, act_dim, args.hidden_dim).to(device)
        self.critic = Critic(obs_dim, act_dim, args.hidden_dim).to(device)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr, fused=True)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr, fused=True)
        self.critic_loss = common.compiled(self.critic_loss, args.compile)
        self.actor_loss = common.compiled(self.actor_loss, args.compile)
        self.train = common.autocast(self.train, args.precision, device)

    def critic_loss(self, batch: common.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """TD loss of both critics towards min Q_target(s', a' ~ pi); and Q1(s, a)."""
        args = self.args
        obs, actions, rewards, next_obs, terminals = batch
        with torch.no_grad():
            next_actions = self.actor.sample(next_obs)
            target_q = torch.min(*self.critic_target(next_obs, next_actions))
            target_q = rewards + args.gamma * (1.0 - terminals) * target_q
        q1, q2 = self.critic(obs, actions)
        return F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q), q1

    def actor_loss(self, batch: common.Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advantage-weighted log-likelihood of the dataset's actions; and the advantages and weights."""
        args = self.args
        obs, actions = batch.observations, batch.actions
        pi = self.actor.distribution(obs)  # one forward serves the value's sample and the log-likelihood
        with torch.no_grad():
            # V(s) from one policy action and Q(s, a) at the dataset action, in one critic call
            q = torch.min(*self.critic(obs.repeat(2, 1), torch.cat([self.actor.draw(pi), actions])))
            v, q_data = q.chunk(2)
            advantages = q_data - v
            weights = awr_weights(advantages, args.awr_lambda, args.max_weight)
        return -(weights * pi.log_prob(actions).sum(-1)).mean(), advantages, weights

    def train(self, batch: common.Batch) -> dict:
        args = self.args

        critic_loss, q1 = self.critic_loss(batch)
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()

        actor_loss, advantages, weights = self.actor_loss(batch)
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()

        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), args.tau)

        return {"losses/critic_loss": critic_loss.detach(), "losses/actor_loss": actor_loss.detach(),
                "losses/q1": q1.mean().detach(), "charts/advantage": advantages.mean(),
                "charts/weight": weights.mean()}

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor.mean(obs).clamp(-1.0, 1.0)

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict()}


def make_policy(args: Args, obs_dim: int, act_dim: int) -> common.Policy:
    """`AWR.act` apart from training, with the networks it reads (untrained): tools/evaluate.py
    loads a model.pt into it."""
    return common.Policy(AWR.act, args, actor=Actor(obs_dim, act_dim, args.hidden_dim))


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

    agent = AWR(args, data.obs_dim, data.act_dim, device)
    run = common.Run(args, "awr", data)
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
