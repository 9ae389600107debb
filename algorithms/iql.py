"""IQL: Kostrikov, Nair & Levine, "Offline Reinforcement Learning with Implicit Q-Learning", ICLR 2022.

Implements the paper's three losses (eqs. 5-7), one gradient step each, in the order of the
official code (ikostrikov/implicit_q_learning): V first, then the actor and Q with the updated V:
    V:  L_V = E_(s,a)~D [ L2^tau( min_i Q_targ_i(s, a) - V(s) ) ],  L2^tau(u) = |tau - 1(u < 0)| u^2
    pi: L_pi = -E_(s,a)~D [ min(exp(beta * (min_i Q_targ_i(s, a) - V(s))), 100) * log pi(a|s) ]
    Q:  L_Q = E_(s,a,s')~D [ (r + gamma * (1 - d) * V(s') - Q_i(s, a))^2 ]   for both Q_i

Hyperparameters: 2x256 networks, Adam 3e-4 with cosine decay to 0 over --total-steps for the actor
only, tau 0.005, batch 256, 1M steps; Gaussian policy with tanh on the mean and a
state-independent log-std in [-5, 2], the mean action at evaluation. Per domain (paper appendix and
official code), from the dataset id:
    antmaze:                        tau 0.9, beta 10.0, rewards r - 1
    kitchen, adroit:                tau 0.7, beta 0.5,  actor dropout 0.1, rewards untouched
    halfcheetah, hopper, walker2d:  tau 0.7, beta 3.0,  rewards * 1000 / (max - min episode return)
    anything else:                  tau 0.7, beta 3.0,  rewards untouched (the code scales only those three)
Each can be overridden by its flag.

Deviations:
- PyTorch's default initialisation instead of the official orthogonal one (CORL does the same and
  reproduces the scores).
"""

import copy
import math
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
    # --- IQL ---
    expectile: Optional[float] = None
    """expectile tau of the value loss (default per domain: 0.9 antmaze, else 0.7)"""
    beta: Optional[float] = None
    """inverse temperature of the advantage weights (default: 10 antmaze, 0.5 kitchen/adroit, else 3)"""
    dropout: Optional[float] = None
    """dropout rate in the policy (default: 0.1 kitchen/adroit, else none)"""
    reward_transform: Optional[common.RewardTransform] = None
    """reward transform (default: minus-one antmaze, return-range hopper/walker2d/halfcheetah,
    else none)"""
    max_weight: float = 100.0
    """advantage weights are clipped at this value"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak step of the target critic"""
    lr: float = 3e-4
    """Adam learning rate of actor, critic and value network"""
    hidden_dim: int = 256
    """width of the two hidden layers of every network"""
    normalize_states: bool = False
    """standardise states with the dataset's mean and std (CORL's default; the official code feeds raw states)"""


def check_args(args: Args) -> None:
    """This file's own flags, right after parsing (common.check_args checks the shared ones)."""
    common.check_interval(args, "expectile", 0, 1, "()")
    common.check_interval(args, "dropout", 0, 1, "[)")
    common.check_positive(args, "beta", zero=True)
    common.check_positive(args, "max_weight", "lr", "hidden_dim")
    common.check_interval(args, "gamma", 0, 1, "[)")
    common.check_interval(args, "tau", 0, 1, "(]")


def domain_defaults(dataset_id: str) -> dict:
    """The paper's per-domain hyperparameters, chosen from the dataset id's task (common.dataset_task).

    Rewards follow the official train_offline.py: r - 1 for antmaze, * 1000 / (return range) for
    halfcheetah/hopper/walker2d only, untouched for everything else.
    Tasks the authors did not run (ant, pointmaze, pendulum, ...): the MuJoCo settings, rewards untouched."""
    task = common.dataset_task(dataset_id)
    if task == "antmaze":
        return {"expectile": 0.9, "beta": 10.0, "dropout": 0.0, "reward_transform": "minus-one"}
    if task in ("kitchen", "door", "hammer", "pen", "relocate"):
        return {"expectile": 0.7, "beta": 0.5, "dropout": 0.1, "reward_transform": "none"}
    transform = "return-range" if task in ("halfcheetah", "hopper", "walker2d") else "none"
    return {"expectile": 0.7, "beta": 3.0, "dropout": 0.0, "reward_transform": transform}


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
def mlp(in_dim: int, out_dim: int, hidden_dim: int, n_hidden: int, dropout: float = 0.0) -> nn.Sequential:
    """n_hidden ReLU layers of width hidden_dim (each followed by dropout if dropout > 0: the actor on
    kitchen and adroit), then a linear output layer (fp32 under --precision bf16)."""
    layers, d = [], in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(d, hidden_dim), nn.ReLU(), *([nn.Dropout(dropout)] if dropout > 0 else [])]
        d = hidden_dim
    return nn.Sequential(*layers, common.OutputLinear(d, out_dim))


class Actor(nn.Module):
    """Gaussian policy: tanh on the mean, state-independent log-std in [-5, 2]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.mean = mlp(obs_dim, act_dim, hidden_dim, 2, dropout)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def log_prob(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        mean = torch.tanh(self.mean(obs))
        std = self.log_std.clamp(-5.0, 2.0).exp()
        # validate_args=False: the distribution's argument checks would sync the device on every call
        return torch.distributions.Normal(mean, std, validate_args=False).log_prob(act).sum(-1)


class Critic(nn.Module):
    """Twin Q networks as a 2-member ensemble: every layer is one batched matmul for both."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = common.ensemble_mlp(2, obs_dim + act_dim, 1, hidden_dim, 2)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """(2, N): Q1(s, a) and Q2(s, a), which unpack as `q1, q2 = critic(obs, act)`."""
        x = torch.cat([obs, act], dim=-1)
        return self.net(x.expand(2, -1, -1)).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Algorithm
# ----------------------------------------------------------------------------------------------
def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """Asymmetric L2 of diff = Q - V: weight tau where V under-estimates Q, 1 - tau where it over-estimates."""
    weight = torch.where(diff > 0, expectile, 1.0 - expectile)
    return (weight * diff**2).mean()


class IQL:
    def __init__(self, args: Args, obs_dim: int, act_dim: int, device: torch.device):
        self.args = args
        self.actor = Actor(obs_dim, act_dim, args.hidden_dim, args.dropout).to(device)
        self.critic = Critic(obs_dim, act_dim, args.hidden_dim).to(device)
        self.critic_target = copy.deepcopy(self.critic)
        self.value = mlp(obs_dim, 1, args.hidden_dim, 2).to(device)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.lr, fused=True)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=args.lr, fused=True)
        self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=args.lr, fused=True)
        # optax.cosine_decay_schedule of the official code: lr * (1 + cos(pi * min(t, T) / T)) / 2 after t updates
        self.actor_scheduler = torch.optim.lr_scheduler.LambdaLR(self.actor_optimizer, lambda t: 0.5 * (
            1.0 + math.cos(math.pi * min(t, args.total_steps) / args.total_steps)))
        self.value_loss = common.compiled(self.value_loss, args.compile)
        self.actor_loss = common.compiled(self.actor_loss, args.compile)
        self.critic_loss = common.compiled(self.critic_loss, args.compile)
        self.train = common.autocast(self.train, args.precision, device)

    def value_loss(self, batch: common.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Expectile regression of V(s) on min Q_target(s, a); and that target."""
        with torch.no_grad():
            target_q = torch.min(*self.critic_target(batch.observations, batch.actions))
        v = self.value(batch.observations).squeeze(-1)
        return expectile_loss(target_q - v, self.args.expectile), target_q

    def actor_loss(self, batch: common.Batch, target_q: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Advantage-weighted log-likelihood with the updated V; and V(s), V(s') and the weights."""
        obs, actions = batch.observations, batch.actions
        with torch.no_grad():
            # the updated V at s (actor weights) and at s' (critic target), in one call
            v, next_v = self.value(torch.cat([obs, batch.next_observations])).squeeze(-1).chunk(2)
            weights = torch.exp(self.args.beta * (target_q - v)).clamp(max=self.args.max_weight)
        return -(weights * self.actor.log_prob(obs, actions)).mean(), v, next_v, weights

    def critic_loss(self, batch: common.Batch, next_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TD loss of both critics towards r + gamma V(s'); and Q1(s, a)."""
        args = self.args
        target = batch.rewards + args.gamma * (1.0 - batch.terminals) * next_v
        q1, q2 = self.critic(batch.observations, batch.actions)
        return F.mse_loss(q1, target) + F.mse_loss(q2, target), q1

    def train(self, batch: common.Batch) -> dict:
        args = self.args

        value_loss, target_q = self.value_loss(batch)
        self.value_optimizer.zero_grad(set_to_none=True)
        value_loss.backward()
        self.value_optimizer.step()

        actor_loss, v, next_v, weights = self.actor_loss(batch, target_q)
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()
        self.actor_scheduler.step()

        critic_loss, q1 = self.critic_loss(batch, next_v)
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()

        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), args.tau)

        return {"losses/value_loss": value_loss.detach(), "losses/actor_loss": actor_loss.detach(),
                "losses/critic_loss": critic_loss.detach(), "losses/q1": q1.mean().detach(),
                "losses/v": v.mean(), "charts/weight": weights.mean()}

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        self.actor.eval()  # no dropout at evaluation
        action = torch.tanh(self.actor.mean(obs))
        self.actor.train()
        return action

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "value": self.value.state_dict()}


def make_policy(args: Args, obs_dim: int, act_dim: int) -> common.Policy:
    """`IQL.act` apart from training, with the networks it reads (untrained): tools/evaluate.py
    loads a model.pt into it."""
    return common.Policy(IQL.act, args, actor=Actor(obs_dim, act_dim, args.hidden_dim, args.dropout))


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
    chosen = {k: v for k, v in domain_defaults(args.env).items() if getattr(args, k) is None}
    for k, v in chosen.items():
        setattr(args, k, v)
    if chosen:
        print(f"[iql] per-domain defaults for {args.env}: {chosen}")

    data = common.load_dataset(args.env, device)
    common.transform_rewards(data, args.reward_transform)
    obs_mean, obs_std = common.normalize_obs(data) if args.normalize_states else (None, None)
    buffer = common.ReplayBuffer(data)

    agent = IQL(args, data.obs_dim, data.act_dim, device)
    run = common.Run(args, "iql", data)
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
