"""iTRPO: Zhang & Tan, "An Implicit Trust Region Approach to Behavior Regularized Offline
Reinforcement Learning", AAAI 2024.

Implements BRAC with a value penalty (Wu, Tucker & Nachum 2019) plus the reward shaping of eq. (5):
    pi_{k+1} = argmax_pi < pi, Q_k - alpha log(pi / pi_beta) >
    Q_{k+1}  = r + tau * alpha * log(pi_{k+1} / pi_beta)(a|s)
               + gamma * P < pi_{k+1}, Q_k - alpha log(pi_{k+1} / pi_beta) >
With samples, for a transition (s, a, r, s') and a'_k ~ pi(s'), k = 1..K:
    y = r + tau * alpha * [log pi(a|s) - log pi_beta(a|s)]
          + gamma * (1 - d) * ( min_i mean_k Q_targ_i(s', a'_k) - alpha * KL_hat(s') ),
    KL_hat(s) = mean_k [log pi(a_k|s) - log pi_beta(a_k|s)],
    actor: min E_s [ alpha * KL_hat(s) - min_i mean_k Q_i(s, a_k) ],  a_k ~ pi(s) reparameterised.
By Theorem 1 this is BRAC with a KL to the previous policy (weight tau * alpha) and to pi_beta
(weight (1 - tau) * alpha); --shaping-tau 0 is the paper's "without reshaping" ablation.
--update-order actor-first (default) is eq. (5)'s order: the critic's target uses pi_{k+1}.

Hyperparameters, from the candidate public code (JackZhangY/offorRL, "IKL": ikl_trainer.py and
ikl.yaml; not confirmed to be the AAAI code; our copy of the paper lacks its hyperparameter
appendix). The code's names are swapped relative to the paper's (its `tau` is the paper's alpha and
its `alpha` the paper's tau); in the paper's names: alpha 0.9 (--alpha), tau 0.03 (--shaping-tau),
so the shaping coefficient is 0.027; K 10; rewards: 1 subtracted on antmaze (its replay buffer),
then its trainer's reward_bonus 5 added to every reward, so r + 5, and r + 4 on antmaze; critic
gradient penalty 0.1 * ||grad_a Q_i(s, a~pi(s))||^2 for both critics; shaping log-ratio clipped
below at -1; policy and behaviour log-std in [-5, 2]; actor and critics 3x256, Adam 3e-4, tau 0.005,
batch 256, 1M steps; rlkit's initialisation (rlkit_init). Behaviour model: tanh-Gaussian 2x256,
maximum likelihood with a tuned entropy bonus (target -|A|; the temperature is stepped first and
its new value weights the step's entropy term), Adam 1e-3 for it and its temperature, both x0.1 at
80% and 90% of --bc-steps; one model for every --seed (--bc-seed), as the code loads one checkpoint
in every run, cached like Fisher-BRC's (--cache-dir, --no-reuse-cache). Raw states, as the code's
obs_norm False (--normalize-states standardises them).

Deviations:
- The shaping log-ratio's clip at -1 is the code's, not eq. (5)'s (--shaping-clip None removes it).
- Actor before critic by default (eq. 5); the code updates the critic first (--update-order critic-first).
- The target critics start as copies of the critics; the code's launcher (rlkit's convention)
  initialises them separately and never copies.
- The gradient penalty is the squared norm of the action gradient; the code adds float32's machine
  epsilon to every entry of the gradient first.
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
    # --- iTRPO ---
    alpha: float = 0.9
    """alpha of eq. (5): weight of the KL terms (the candidate code's `tau`: 0.9)"""
    shaping_tau: float = 0.03
    """tau of eq. (5): extra factor of the shaping term, tau * alpha (the code's `alpha`: 0.03); 0 = plain BRAC"""
    shaping_clip: Optional[float] = -1.0
    """clip the shaping log-ratio below at this value (candidate code: -1); None: the unclipped eq. (5)"""
    update_order: Literal["actor-first", "critic-first"] = "actor-first"
    """actor-first: eq. (5), the critic uses pi_{k+1}; critic-first: the candidate code's order"""
    n_samples: int = 10
    """K: policy samples per state for the KL estimate and the expected next Q"""
    gp_weight: float = 0.1
    """weight of the critic gradient penalty ||grad_a Q(s, a~pi)||^2 (candidate code)"""
    bc_steps: int = 1_000_000
    """gradient steps of the behaviour model before the actor-critic phase"""
    bc_lr: float = 1e-3
    """initial Adam learning rate of the behaviour model and its temperature (x0.1 at 80% and 90% of bc_steps)"""
    bc_seed: int = 0
    """seed of the behaviour model's initialisation and training (not --seed, so that seeds share the cache)"""
    cache_dir: Optional[str] = None
    """where trained behaviour models are cached (default <output_dir>/pretrained_cache)"""
    reuse_cache: bool = True
    """load the behaviour model from the cache when one was trained with the same data and flags"""
    reward_transform: Optional[common.RewardTransform] = None
    """reward transform before --reward-bonus (default: minus-one on antmaze, else none; the code's replay buffer)"""
    reward_bonus: float = 5.0
    """added to every reward after --reward-transform (the code's trainer): r + 5, and r + 4 on antmaze"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak step of the target critic"""
    lr: float = 3e-4
    """Adam learning rate of actor and critics"""
    hidden_dim: int = 256
    """width of the hidden layers (3 in actor and critics, 2 in the behaviour model)"""
    normalize_states: bool = False
    """standardise states with the dataset's mean and std (the code's obs_norm is False)"""


def check_args(args: Args) -> None:
    """This file's own flags, right after parsing (common.check_args checks the shared ones)."""
    common.check_positive(args, "alpha", "shaping_tau", "gp_weight", zero=True)
    common.check_positive(args, "n_samples", "bc_steps", "bc_lr", "lr", "hidden_dim")
    common.check_seed(args, "bc_seed")
    common.check_interval(args, "gamma", 0, 1, "[)")
    common.check_interval(args, "tau", 0, 1, "(]")


def domain_defaults(dataset_id: str) -> dict:
    """The candidate code's replay buffer subtracts 1 from antmaze rewards and leaves the others."""
    if common.dataset_task(dataset_id) == "antmaze":
        return {"reward_transform": "minus-one"}
    return {"reward_transform": "none"}


def transform_rewards(data: common.OfflineData, args: Args) -> None:
    """The replay buffer's transform, then the trainer's bonus: r + 5, and (r - 1) + 5 on antmaze."""
    common.transform_rewards(data, args.reward_transform)
    data.rewards = data.rewards + args.reward_bonus


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
    """rlkit's Mlp initialisation, which the candidate code's networks use: hidden weights
    U(+-1/sqrt(fan)), where rlkit's fanin_init reads fan from weight.size(0), i.e. an nn.Linear's
    *output* width; zero hidden biases; output weights U(+-output_bound) and a zero output bias.
    EnsembleLinear weights are (E, in, out), each member's nn.Linear weight transposed."""
    layers = [m for m in net if hasattr(m, "weight")]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            fan = layer.weight.shape[-1] if layer.weight.dim() == 3 else layer.weight.shape[0]
            bound = output_bound if i == len(layers) - 1 else 1.0 / math.sqrt(fan)
            layer.weight.uniform_(-bound, bound)
            layer.bias.zero_()
    return net


def tanh_log_det(u: torch.Tensor) -> torch.Tensor:
    """log |d tanh(u) / du| = log(1 - tanh(u)^2), in a form that stays finite for large |u|."""
    return 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))


def tanh_gaussian_sample(mean: torch.Tensor, log_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised action in (-1, 1) of the tanh-squashed Gaussian, and its log-density."""
    std = log_std.exp()
    u = mean + std * torch.randn_like(mean)
    # validate_args=False: the distribution's argument checks would sync the device on every call
    log_prob = torch.distributions.Normal(mean, std, validate_args=False).log_prob(u) - tanh_log_det(u)
    return torch.tanh(u), log_prob.sum(-1)


def tanh_gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Log-density of actions in [-1, 1] (clipped to +-(1 - 1e-6) first, where atanh is finite)."""
    u = torch.atanh(act.clamp(-1.0 + 1e-6, 1.0 - 1e-6))
    log_prob = torch.distributions.Normal(mean, log_std.exp(), validate_args=False).log_prob(u)
    return (log_prob - tanh_log_det(u)).sum(-1)


class TanhGaussian(nn.Module):
    """Tanh-squashed Gaussian with state-dependent log-std in [-5, 2] (the candidate code's rlkit
    bounds): the policy and pi_beta. With n > 1, `sample` and `log_prob` concern n actions per state
    (rows i * n .. i * n + n - 1 for state i), and the network still runs once per state."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, n_hidden: int):
        super().__init__()
        # rlkit's TanhGaussianPolicy (init_w 1e-3); its separate log-std layer draws its bias from U(+-1e-3) too
        self.net = rlkit_init(mlp(obs_dim, 2 * act_dim, hidden_dim, n_hidden), output_bound=1e-3)
        with torch.no_grad():
            self.net[-1].bias[act_dim:].uniform_(-1e-3, 1e-3)

    def forward(self, obs: torch.Tensor):
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(-5.0, 2.0)

    def sample(self, obs: torch.Tensor, n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return tanh_gaussian_sample(*(x.repeat_interleave(n, 0) for x in self(obs)))

    def log_prob(self, obs: torch.Tensor, act: torch.Tensor, n: int = 1) -> torch.Tensor:
        return tanh_gaussian_log_prob(*(x.repeat_interleave(n, 0) for x in self(obs)), act)


class Critic(nn.Module):
    """Twin Q networks as a 2-member ensemble: every layer is one batched matmul for both."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        # rlkit's ConcatMlp (init_w 3e-3)
        self.net = rlkit_init(common.ensemble_mlp(2, obs_dim + act_dim, 1, hidden_dim, 3), output_bound=3e-3)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """(2, N): Q1(s, a) and Q2(s, a), which unpack as `q1, q2 = critic(obs, act)`.
        `act` is (N, A), or (2, N, A) to give each network its own copy: a gradient penalty then gets
        both networks' action gradients from one backward pass."""
        x = torch.cat([obs.expand(*act.shape[:-1], -1), act], dim=-1)
        return self.net(x.expand(2, -1, -1)).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Algorithm
# ----------------------------------------------------------------------------------------------
def shaping_reward(log_pi: torch.Tensor, log_beta: torch.Tensor, alpha: float, tau: float,
                   clip: float | None) -> torch.Tensor:
    """tau * alpha * log(pi / pi_beta)(a|s) at dataset actions (eq. 5), optionally clipped below."""
    log_ratio = log_pi - log_beta
    if clip is not None:
        log_ratio = log_ratio.clamp(min=clip)
    return tau * alpha * log_ratio


def critic_target(rewards: torch.Tensor, shaping: torch.Tensor, terminals: torch.Tensor,
                  next_q1: torch.Tensor, next_q2: torch.Tensor, next_kl: torch.Tensor,
                  gamma: float, alpha: float) -> torch.Tensor:
    """y of eq. (5); next_q1/next_q2 are (B, K) target-critic values at K policy samples of s'."""
    next_v = torch.min(next_q1.mean(1), next_q2.mean(1)) - alpha * next_kl
    return rewards + shaping + gamma * (1.0 - terminals) * next_v


# Compiled graphs cannot be differentiated twice: under --compile the penalty runs eagerly.
@torch.compiler.disable
def gradient_penalty(critic: Critic, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """E ||grad_a Q_1(s,a)||^2 + E ||grad_a Q_2(s,a)||^2 at the given actions, differentiable in Q. Each
    critic differentiates its own copy of the actions, so one backward pass gives both gradients."""
    actions = actions.detach().repeat(2, 1, 1).requires_grad_(True)
    q1, q2 = critic(obs, actions)
    g1, g2 = torch.autograd.grad(q1.sum() + q2.sum(), actions, create_graph=True)[0]
    return (g1.pow(2).sum(-1) + g2.pow(2).sum(-1)).mean()


class ITRPO:
    def __init__(self, args: Args, obs_dim: int, act_dim: int, device: torch.device):
        self.args = args
        self.target_entropy = -float(act_dim)
        with common.separate_rng(args.bc_seed, device):  # independent of --seed: the model is cached
            self.behavior = TanhGaussian(obs_dim, act_dim, args.hidden_dim, n_hidden=2).to(device)
        self.behavior_log_alpha = torch.zeros((), device=device, requires_grad=True)
        self.behavior_optimizer = torch.optim.Adam(self.behavior.parameters(), lr=args.bc_lr, fused=True)
        self.behavior_alpha_optimizer = torch.optim.Adam([self.behavior_log_alpha], lr=args.bc_lr, fused=True)
        milestones = [int(0.8 * args.bc_steps), int(0.9 * args.bc_steps)]
        self.behavior_schedulers = [torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
                                    for opt in (self.behavior_optimizer, self.behavior_alpha_optimizer)]
        self.actor = TanhGaussian(obs_dim, act_dim, args.hidden_dim, n_hidden=3).to(device)
        self.critic = Critic(obs_dim, act_dim, args.hidden_dim).to(device)
        # a copy: the code's separately initialised targets are rlkit's launcher habit (docs/implementation_notes.md)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.lr, fused=True)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=args.lr, fused=True)
        self.behavior_terms = common.compiled(self.behavior_terms, args.compile)
        self.actor_loss = common.compiled(self.actor_loss, args.compile)
        self.td_loss = common.compiled(self.td_loss, args.compile)
        self.train_behavior = common.autocast(self.train_behavior, args.precision, device)
        self.train = common.autocast(self.train, args.precision, device)

    def behavior_terms(self, batch: common.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi_beta(a|s) at the dataset's actions and the entropy estimate -log pi_beta(a~pi_beta|s)."""
        params = self.behavior(batch.observations)  # one forward for both terms
        return tanh_gaussian_log_prob(*params, batch.actions), -tanh_gaussian_sample(*params)[1]

    def train_behavior(self, batch: common.Batch) -> dict:
        """Maximum likelihood of dataset actions plus a tuned entropy bonus (target -|A|). As in the
        code (bc_trainer.py), the temperature is stepped first and the loss uses its new value."""
        log_prob, entropy = self.behavior_terms(batch)
        self.behavior_alpha_optimizer.zero_grad(set_to_none=True)
        alpha_loss = (self.behavior_log_alpha.exp() * (entropy.detach() - self.target_entropy)).mean()
        alpha_loss.backward()
        self.behavior_alpha_optimizer.step()
        alpha = self.behavior_log_alpha.exp().detach()
        loss = -(log_prob + alpha * entropy).mean()
        self.behavior_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.behavior_optimizer.step()
        for scheduler in self.behavior_schedulers:
            scheduler.step()
        return {"losses/behavior_nll": -log_prob.mean().detach(), "charts/behavior_entropy": entropy.mean().detach(),
                "charts/behavior_alpha": alpha}

    def kl_and_q(self, obs: torch.Tensor, critic: Critic) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """KL_hat(s) and Q_i(s, a_k) of K reparameterised samples a_k ~ pi(s); Q values are (B, K)."""
        k = self.args.n_samples
        actions, log_pi = self.actor.sample(obs, k)
        kl = (log_pi - self.behavior.log_prob(obs, actions, k)).view(-1, k).mean(1)
        q1, q2 = critic(obs.repeat_interleave(k, 0), actions)
        return kl, q1.view(-1, k), q2.view(-1, k)

    def actor_loss(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-(Q - alpha * KL(pi || pi_beta)); and KL_hat(s)."""
        kl, q1_pi, q2_pi = self.kl_and_q(obs, self.critic)
        return (self.args.alpha * kl - torch.min(q1_pi.mean(1), q2_pi.mean(1))).mean(), kl

    def update_actor(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pi_{k+1}: maximise Q - alpha * KL(pi || pi_beta)."""
        self.critic.requires_grad_(False)  # the actor's loss moves the actor only: no critic weight gradients
        actor_loss, kl = self.actor_loss(obs)
        self.critic.requires_grad_(True)
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()
        return actor_loss.detach(), kl.detach()

    def td_loss(self, batch: common.Batch) -> tuple[torch.Tensor, ...]:
        """TD loss with the shaped reward at the dataset action and the KL value penalty at s'; and
        Q1(s, a), the shaping reward and the gradient penalty's actions a ~ pi(s)."""
        args = self.args
        obs, actions, rewards, next_obs, terminals = batch
        with torch.no_grad():
            pi_params = self.actor(obs)  # one forward serves the shaping term and the penalty's sample
            log_pi_data = tanh_gaussian_log_prob(*pi_params, actions)
            shaping = shaping_reward(log_pi_data, self.behavior.log_prob(obs, actions), args.alpha, args.shaping_tau,
                                     args.shaping_clip)
            next_kl, next_q1, next_q2 = self.kl_and_q(next_obs, self.critic_target)
            target_q = critic_target(rewards, shaping, terminals, next_q1, next_q2, next_kl, args.gamma, args.alpha)
            gp_actions = tanh_gaussian_sample(*pi_params)[0]
        q1, q2 = self.critic(obs, actions)
        return F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q), q1, shaping, gp_actions

    def update_critic(self, batch: common.Batch) -> dict:
        """Q_{k+1}: shaped reward at the dataset action, KL value penalty at s', gradient penalty."""
        args = self.args
        td_loss, q1, shaping, gp_actions = self.td_loss(batch)
        gp = gradient_penalty(self.critic, batch.observations, gp_actions)
        critic_loss = td_loss + args.gp_weight * gp
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), args.tau)
        return {"losses/critic_loss": critic_loss.detach(), "losses/td_loss": td_loss.detach(),
                "losses/gradient_penalty": gp.detach(), "losses/q1": q1.mean().detach(),
                "charts/shaping_reward": shaping.mean()}

    def train(self, batch: common.Batch) -> dict:
        if self.args.update_order == "actor-first":
            actor_loss, kl = self.update_actor(batch.observations)
            metrics = self.update_critic(batch)
        else:
            metrics = self.update_critic(batch)
            actor_loss, kl = self.update_actor(batch.observations)
        return {**metrics, "losses/actor_loss": actor_loss, "charts/kl": kl.mean()}

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.actor(obs)[0])

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "behavior": self.behavior.state_dict()}


def make_policy(args: Args, obs_dim: int, act_dim: int) -> common.Policy:
    """`ITRPO.act` apart from training, with the networks it reads (untrained): tools/evaluate.py
    loads a model.pt into it."""
    return common.Policy(ITRPO.act, args, actor=TanhGaussian(obs_dim, act_dim, args.hidden_dim, n_hidden=3))


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
        print(f"[itrpo] per-domain defaults for {args.env}: {chosen}")

    data = common.load_dataset(args.env, device)
    transform_rewards(data, args)
    obs_mean, obs_std = common.normalize_obs(data) if args.normalize_states else (None, None)
    buffer = common.ReplayBuffer(data)

    agent = ITRPO(args, data.obs_dim, data.act_dim, device)
    run = common.Run(args, "itrpo", data, phases=("behaviour model",))
    key = common.pretraining_key(args, ("bc_steps", "bc_lr", "bc_seed", "hidden_dim", "batch_size"), data,
                                 recipe=("rlkit initialisation", "temperature stepped first"))
    cache_path = os.path.join(args.cache_dir or os.path.join(args.output_dir, "pretrained_cache"),
                              f"itrpo_behavior_{key}.pt")
    if not (args.reuse_cache and common.load_pretrained(cache_path, {"behavior": agent.behavior}, device)):
        with common.separate_rng(args.bc_seed, device):
            for step in range(run.resume(agent, "behaviour model", args.bc_steps) + 1, args.bc_steps + 1):
                metrics = agent.train_behavior(buffer.sample(args.batch_size))
                if step % args.log_every == 0 or step == args.bc_steps:
                    run.log(step, metrics, phase="behaviour model")
                run.pretraining_step(step, agent, "behaviour model")
        common.save_pretrained(cache_path, {"behavior": agent.behavior})
    agent.behavior.requires_grad_(False)
    run.reset_clock()
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
