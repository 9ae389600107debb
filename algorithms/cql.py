"""CQL: Kumar, Zhou, Tucker & Levine, "Conservative Q-Learning for Offline Reinforcement Learning",
NeurIPS 2020; the CQL(H) variant with SAC of the official code (aviralkumar2907/CQL).

Implements, for each critic Q_i, eq. (4) with the importance-sampled log-sum-exp of appendix F:
    L(Q_i) = E_D[(Q_i(s,a) - y)^2]
             + w * ( E_s[ log sum_j exp(Q_i(s, a_j) - log q(a_j)) ] - E_(s,a)~D[Q_i(s,a)] ),
over 3M actions a_j (M = 10 of each): uniform on [-1, 1]^|A| (log q = |A| log 0.5), from pi(.|s)
and from pi(.|s') (both evaluated at s; log q = log pi, detached). The dataset action is not inside
the log-sum-exp. Target (deterministic backup, no entropy term):
    y = r + gamma * (1 - d) * min_i Q_targ_i(s', a'),  a' ~ pi(s')
or, with --max-q-backup, min_i max_j Q_targ_i(s', a'_j) over M samples a'_j (each critic's max first).
Lagrange variant (eq. 30, antmaze): the gap, weighted by w as above, is multiplied by
alpha' = exp(log alpha') in [0, 1e6], trained to hold w * gap at --lagrange-threshold (the code's). Actor: SAC with automatic entropy (target -|A|); during the
first --bc-warmup-steps it maximises log pi(a|s) of dataset actions instead of Q (the code's
policy_eval_start). A step draws every sample the critic loss needs from the current policy, then
steps the temperature, the actor (with the updated temperature) and the critics: every loss is taken
at the step's starting parameters, as in the code's revision that runs under PyTorch >= 1.5 (its
first revision stepped the critics before the actor; docs/implementation_notes.md).

Hyperparameters (official MuJoCo settings): w 5.0 (the paper also reports 10.0), 3x256 networks,
policy log-std in [-5, 2], critic Adam 3e-4, actor Adam 1e-4, tau 0.005, batch 256, warm-up 40k
steps, rewards untouched, 1M steps; raw states and rlkit's initialisation (rlkit_init), as the
official code (--normalize-states and --init torch for CORL's choices). Antmaze, from the dataset id: Lagrange threshold 5.0, rewards
(r - 0.5) * 4.

Deviations:
- The tanh log-density is exact; the code adds 1e-6 inside log(1 - a^2).
- --bc-warmup-steps 40000 clones for 40,000 steps; the code's policy_eval_start 40000 for 39,999.
- The target critics start as copies of the critics; the code's launcher initialises them separately.
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
    # --- CQL ---
    cql_weight: float = 5.0
    """w: weight of the conservative term (official MuJoCo 5.0; the paper also reports 10.0)"""
    lagrange_threshold: Optional[float] = None
    """scale the w-weighted gap by alpha', tuned by dual gradient descent to hold w * gap at this value (default: 5.0 antmaze, else off)"""
    n_actions: int = 10
    """M: actions of each kind (uniform, pi(s), pi(s')) in the log-sum-exp"""
    max_q_backup: bool = False
    """target = min_i max_j Q_targ_i(s', a'_j) over n_actions sampled a'_j (each critic's max first)"""
    bc_warmup_steps: int = 40_000
    """first steps of the joint loop in which the actor does behaviour cloning (max log pi(a|s)) instead of max Q"""
    reward_transform: Optional[common.RewardTransform] = None
    """reward transform (default: cql-antmaze on antmaze, else none)"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak step of the target critic"""
    actor_lr: float = 1e-4
    """Adam learning rate of the policy and the entropy temperature"""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics and of the Lagrange multiplier"""
    hidden_dim: int = 256
    """width of the three hidden layers of every network"""
    normalize_states: bool = False
    """standardise states with the dataset's mean and std (CORL's option; the official code feeds raw states)"""
    init: Literal["rlkit", "torch"] = "rlkit"
    """rlkit: the official code's initialisation (rlkit_init); torch: PyTorch's default (CORL's)"""


def check_args(args: Args) -> None:
    """This file's own flags, right after parsing (common.check_args checks the shared ones)."""
    common.check_positive(args, "cql_weight", "lagrange_threshold", "bc_warmup_steps", zero=True)
    common.check_positive(args, "n_actions", "actor_lr", "critic_lr", "hidden_dim")
    common.check_interval(args, "gamma", 0, 1, "[)")
    common.check_interval(args, "tau", 0, 1, "(]")


def domain_defaults(dataset_id: str) -> dict:
    """The official code's per-domain settings, chosen from the dataset id."""
    if common.dataset_task(dataset_id) == "antmaze":
        return {"lagrange_threshold": 5.0, "reward_transform": "cql-antmaze"}
    return {"reward_transform": "none"}


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


def rlkit_init(net: nn.Sequential, output_bound: float) -> nn.Sequential:
    """rlkit's Mlp initialisation, the official code's: hidden weights U(+-1/sqrt(fan)), where
    fanin_init reads fan from weight.size(0), an nn.Linear's *output* width; hidden biases 0.1; output
    weights and biases U(+-output_bound) (3e-3 for the critics, 1e-3 for the policy's mean and log-std
    heads). EnsembleLinear weights are (E, in, out), each member's nn.Linear weight transposed."""
    layers = [m for m in net if hasattr(m, "weight")]
    with torch.no_grad():
        for layer in layers[:-1]:
            fan = layer.weight.shape[-1] if layer.weight.dim() == 3 else layer.weight.shape[0]
            layer.weight.uniform_(-1.0 / math.sqrt(fan), 1.0 / math.sqrt(fan))
            layer.bias.fill_(0.1)
        layers[-1].weight.uniform_(-output_bound, output_bound)
        layers[-1].bias.uniform_(-output_bound, output_bound)
    return net


def tanh_log_det(u: torch.Tensor) -> torch.Tensor:
    """log |d tanh(u) / du| = log(1 - tanh(u)^2), in a form that stays finite for large |u|."""
    return 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy (SAC), state-dependent log-std in [-5, 2] (the official policies.py)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, init: str = "torch"):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim, hidden_dim, 3)
        if init == "rlkit":  # rlkit's TanhGaussianPolicy
            rlkit_init(self.net, output_bound=1e-3)

    def forward(self, obs: torch.Tensor):
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(-5.0, 2.0)

    def sample(self, obs: torch.Tensor, n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """n reparameterised actions in (-1, 1) per state (rows i * n .. i * n + n - 1 for state i) and
        their log-densities; the network runs once per state, not once per action."""
        mean, log_std = (x.repeat_interleave(n, 0) for x in self(obs))
        std = log_std.exp()
        u = mean + std * torch.randn_like(mean)
        # validate_args=False: the distribution's argument checks would sync the device on every call
        log_prob = torch.distributions.Normal(mean, std, validate_args=False).log_prob(u) - tanh_log_det(u)
        return torch.tanh(u), log_prob.sum(-1)

    def log_prob(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        mean, log_std = self(obs)
        u = torch.atanh(act.clamp(-1.0 + 1e-6, 1.0 - 1e-6))
        log_prob = torch.distributions.Normal(mean, log_std.exp(), validate_args=False).log_prob(u)
        return (log_prob - tanh_log_det(u)).sum(-1)


class Critic(nn.Module):
    """Twin Q networks as a 2-member ensemble: every layer is one batched matmul for both."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, init: str = "torch"):
        super().__init__()
        self.net = common.ensemble_mlp(2, obs_dim + act_dim, 1, hidden_dim, 3)
        if init == "rlkit":  # rlkit's FlattenMlp
            rlkit_init(self.net, output_bound=3e-3)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """(2, N): Q1(s, a) and Q2(s, a), which unpack as `q1, q2 = critic(obs, act)`."""
        x = torch.cat([obs, act], dim=-1)
        return self.net(x.expand(2, -1, -1)).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Algorithm
# ----------------------------------------------------------------------------------------------
def cql_logsumexp(q_rand: torch.Tensor, log_density_rand: float, q_pi: torch.Tensor, log_pi: torch.Tensor,
                  q_next_pi: torch.Tensor, log_next_pi: torch.Tensor) -> torch.Tensor:
    """Importance-sampled log integral of exp Q(s, a) over actions, one value per state (appendix F).

    Inputs are (B, M): Q at M uniform actions (proposal log-density `log_density_rand`), at M
    actions from pi(s) and at M actions from pi(s'), with their log pi. Each sample is divided by its
    proposal density. The constant -log(3M) of the mean is left out, as in the official code."""
    return torch.logsumexp(torch.cat([q_rand - log_density_rand, q_pi - log_pi, q_next_pi - log_next_pi], 1), 1)


def max_q_backup(next_q1: torch.Tensor, next_q2: torch.Tensor) -> torch.Tensor:
    """min_i max_j Q_targ_i(s', a'_j) from (B, M) values: each critic's max first (official code)."""
    return torch.min(next_q1.max(1).values, next_q2.max(1).values)


class CQL:
    def __init__(self, args: Args, obs_dim: int, act_dim: int, device: torch.device):
        self.args = args
        self.actor = Actor(obs_dim, act_dim, args.hidden_dim, args.init).to(device)
        self.critic = Critic(obs_dim, act_dim, args.hidden_dim, args.init).to(device)
        self.critic_target = copy.deepcopy(self.critic)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)
        self.log_alpha_prime = torch.zeros((), device=device, requires_grad=True)
        self.target_entropy = -float(act_dim)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr, fused=True)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=args.actor_lr, fused=True)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr, fused=True)
        self.alpha_prime_optimizer = torch.optim.Adam([self.log_alpha_prime], lr=args.critic_lr, fused=True)
        self.total_it = 0
        self.critic_samples = common.compiled(self.critic_samples, args.compile)
        self.policy_sample = common.compiled(self.policy_sample, args.compile)
        self.actor_loss = common.compiled(self.actor_loss, args.compile)
        self.critic_loss = common.compiled(self.critic_loss, args.compile)
        self.train = common.autocast(self.train, args.precision, device)

    @torch.no_grad()
    def critic_samples(self, batch: common.Batch) -> tuple[torch.Tensor, ...]:
        """The TD target and the M actions per state of the conservative term (uniform, pi(s),
        pi(s')) with their log-densities, all from the current policy, drawn before the actor's update."""
        args = self.args
        obs, actions, rewards, next_obs, terminals = batch
        batch_size, act_dim = actions.shape
        m = args.n_actions
        if args.max_q_backup:
            next_actions = self.actor.sample(next_obs, m)[0]
            next_q1, next_q2 = self.critic_target(next_obs.repeat_interleave(m, 0), next_actions)
            target_q = max_q_backup(next_q1.view(batch_size, m), next_q2.view(batch_size, m))
        else:
            target_q = torch.min(*self.critic_target(next_obs, self.actor.sample(next_obs)[0]))
        target_q = rewards + args.gamma * (1.0 - terminals) * target_q
        rand_actions = torch.rand(batch_size * m, act_dim, device=obs.device) * 2.0 - 1.0
        pi_actions, log_pi_rep = self.actor.sample(obs, m)
        next_pi_actions, log_next_pi_rep = self.actor.sample(next_obs, m)
        return target_q, rand_actions, pi_actions, log_pi_rep, next_pi_actions, log_next_pi_rep

    def policy_sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.actor.sample(obs)

    def actor_loss(self, batch: common.Batch, pi: torch.Tensor, log_pi: torch.Tensor, alpha: torch.Tensor,
                   clone: bool) -> torch.Tensor:
        """SAC's actor loss; with `clone` (the first bc_warmup_steps) behaviour cloning instead of Q."""
        if clone:
            return (alpha * log_pi - self.actor.log_prob(batch.observations, batch.actions)).mean()
        return (alpha * log_pi - torch.min(*self.critic(batch.observations, pi))).mean()

    def critic_loss(self, batch: common.Batch, samples: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The TD loss, each critic's weighted gap (logsumexp over the 3M actions minus Q at the data)
        and Q1(s, a)."""
        args = self.args
        obs, actions = batch.observations, batch.actions
        batch_size, act_dim = actions.shape
        m = args.n_actions
        target_q, rand_actions, pi_actions, log_pi_rep, next_pi_actions, log_next_pi_rep = samples
        q1, q2 = self.critic(obs, actions)
        td_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)

        # Conservative term: all 3M actions per state go through both critics in one call.
        obs_rep = obs.repeat_interleave(m, 0)
        q1_all, q2_all = self.critic(obs_rep.repeat(3, 1), torch.cat([rand_actions, pi_actions, next_pi_actions]))
        log_density_rand = act_dim * math.log(0.5)
        gaps = []
        for q_all, q_data in ((q1_all, q1), (q2_all, q2)):
            q_rand, q_pi, q_next_pi = (q.view(batch_size, m) for q in q_all.chunk(3))
            lse = cql_logsumexp(q_rand, log_density_rand, q_pi, log_pi_rep.view(batch_size, m),
                                q_next_pi, log_next_pi_rep.view(batch_size, m))
            gaps.append(args.cql_weight * (lse.mean() - q_data.mean()))
        return td_loss, gaps[0], gaps[1], q1

    def train(self, batch: common.Batch) -> dict:
        args = self.args
        self.total_it += 1

        # The critic loss's samples come from the current policy, drawn before the actor's update.
        samples = self.critic_samples(batch)

        # Entropy temperature, then the actor (SAC; behaviour cloning during the first bc_warmup_steps).
        pi, log_pi = self.policy_sample(batch.observations)
        self.alpha_optimizer.zero_grad(set_to_none=True)
        alpha_loss = -(self.log_alpha * (log_pi.detach() + self.target_entropy)).mean()
        alpha_loss.backward()
        self.alpha_optimizer.step()
        alpha = self.log_alpha.exp().detach()
        clone = self.total_it <= args.bc_warmup_steps
        self.critic.requires_grad_(False)  # the actor's loss moves the actor only: no critic weight gradients
        actor_loss = self.actor_loss(batch, pi, log_pi, alpha, clone)
        self.critic.requires_grad_(True)
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()

        td_loss, gap1, gap2, q1 = self.critic_loss(batch, samples)
        if args.lagrange_threshold is None:
            conservative_loss = gap1 + gap2
            alpha_prime = torch.full((), args.cql_weight, device=q1.device)  # made on the device: no host copy
        else:
            # Dual ascent on alpha' >= 0: it grows while the weighted gap exceeds the threshold.
            self.alpha_prime_optimizer.zero_grad(set_to_none=True)
            alpha_prime = self.log_alpha_prime.exp().clamp(0.0, 1e6)
            slack = [gap.detach() - args.lagrange_threshold for gap in (gap1, gap2)]
            alpha_prime_loss = -0.5 * alpha_prime * (slack[0] + slack[1])
            alpha_prime_loss.backward()
            self.alpha_prime_optimizer.step()
            alpha_prime = alpha_prime.detach()
            conservative_loss = alpha_prime * (gap1 + gap2 - 2.0 * args.lagrange_threshold)
        critic_loss = td_loss + conservative_loss
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()

        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), args.tau)

        return {"losses/critic_loss": critic_loss.detach(), "losses/td_loss": td_loss.detach(),
                "losses/cql_gap": (gap1 + gap2).detach() / 2, "losses/actor_loss": actor_loss.detach(),
                "losses/q1": q1.mean().detach(), "charts/alpha": alpha, "charts/alpha_prime": alpha_prime,
                "charts/entropy": -log_pi.mean().detach()}

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.actor(obs)[0])

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict()}


def make_policy(args: Args, obs_dim: int, act_dim: int) -> common.Policy:
    """`CQL.act` apart from training, with the networks it reads (untrained): tools/evaluate.py
    loads a model.pt into it."""
    return common.Policy(CQL.act, args, actor=Actor(obs_dim, act_dim, args.hidden_dim))


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
        print(f"[cql] per-domain defaults for {args.env}: {chosen}")

    data = common.load_dataset(args.env, device)
    common.transform_rewards(data, args.reward_transform)
    obs_mean, obs_std = common.normalize_obs(data) if args.normalize_states else (None, None)
    buffer = common.ReplayBuffer(data)

    agent = CQL(args, data.obs_dim, data.act_dim, device)
    run = common.Run(args, "cql", data)
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
