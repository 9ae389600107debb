"""BC: behaviour cloning, the baseline every offline RL table is read against (Fujimoto & Gu,
"A Minimalist Approach to Offline Reinforcement Learning", NeurIPS 2021, use exactly this as their
BC row).

Implements a deterministic tanh policy fitted to the dataset's actions by mean squared error:
    pi = argmin_pi E_(s,a)~D [ (pi(s) - a)^2 ]
which is TD3+BC with the Q term removed.

Hyperparameters: 2x256 actor, Adam 3e-4, batch 256, 1M steps, states standardised (TD3+BC's).

Deviations:
- none. The whole dataset is cloned (CORL's "10% BC", which keeps only the best trajectories, is a
  different baseline).
"""

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
    # --- BC ---
    lr: float = 3e-4
    """Adam learning rate"""
    hidden_dim: int = 256
    """width of the two hidden layers"""
    normalize_states: bool = True
    """standardise states with the dataset's mean and std"""


def check_args(args: Args) -> None:
    """This file's own flags, right after parsing (common.check_args checks the shared ones)."""
    common.check_positive(args, "lr", "hidden_dim")


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


# ----------------------------------------------------------------------------------------------
# Algorithm
# ----------------------------------------------------------------------------------------------
class BC:
    def __init__(self, args: Args, obs_dim: int, act_dim: int, device: torch.device):
        self.args = args
        self.actor = Actor(obs_dim, act_dim, args.hidden_dim).to(device)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.lr, fused=True)
        self.actor_loss = common.compiled(self.actor_loss, args.compile)
        self.train = common.autocast(self.train, args.precision, device)

    def actor_loss(self, batch: common.Batch) -> torch.Tensor:
        return F.mse_loss(self.actor(batch.observations), batch.actions)

    def train(self, batch: common.Batch) -> dict:
        loss = self.actor_loss(batch)
        self.actor_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.actor_optimizer.step()
        return {"losses/actor_loss": loss.detach()}

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(obs)

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict()}


def make_policy(args: Args, obs_dim: int, act_dim: int) -> common.Policy:
    """`BC.act` apart from training, with the networks it reads (untrained): tools/evaluate.py
    loads a model.pt into it."""
    return common.Policy(BC.act, args, actor=Actor(obs_dim, act_dim, args.hidden_dim))


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

    agent = BC(args, data.obs_dim, data.act_dim, device)
    run = common.Run(args, "bc", data)
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
