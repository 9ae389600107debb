"""Fisher-BRC: Kostrikov, Fergus, Tompson & Nachum, "Offline Reinforcement Learning with Fisher
Divergence Critic Regularization", ICML 2021.

Implements Algorithm 1:
1. Behaviour model mu(a|s) by entropy-regularised maximum likelihood (appendix A): per action
   dimension an independent mixture of 5 tanh-squashed Gaussians; loss
   -E_D[log mu(a|s)] - alpha_mu * H(mu(.|s)), alpha_mu tuned to a target entropy of -|A|.
   H ~ -log mu(a~mu|s) at one sample whose component is drawn without gradient and whose Gaussian
   draw is reparameterised (TFP's mixture sample in the official code). Frozen afterwards.
2. Critic as an offset on the log behaviour density, eq. (5), Q_i(s,a) = O_i(s,a) + log mu(a|s),
   trained with eq. (7):
     L(O_i) = E[(O_i(s,a) + log mu(a|s) - y)^2] + lambda * E_(s~D, a~pi(s)) ||grad_a O_i(s,a)||^2
     y = (r + 5) + gamma * (1 - d) * min_i (O_targ_i(s',a') + log mu(a'|s')),  a' ~ pi(s')
   with no entropy term in the target and the survival bonus +5 of appendix A. --gp-on-data takes
   the penalty at dataset actions (the alternative of section 4.2).
3. Actor (SAC): min E[alpha * log pi(a|s) - min_i(O_i(s,a) + log mu(a|s))], a ~ pi(s)
   reparameterised so that the gradient flows through log mu, eq. (6); alpha tuned to -|A| with
   the loss alpha * (-log pi - target).

Hyperparameters: lambda 0.1; actor and offsets 3x256 (appendix A), behaviour model 2x256, orthogonal
initialisation (gain sqrt 2, output 1e-2), actions clipped to +-(1 - 1e-6) before any log mu, both
temperatures trained with the loss alpha * (H - target) (all from the official code, google-research
fisher_brc); Adam 3e-4, tau 0.005, batch 256, 1M steps; behaviour model and its temperature Adam
1e-3, both x0.1 after 80% and 90% of --bc-steps (the code's PiecewiseConstantDecay([800k, 900k]):
updates 800,002 and 900,002 of 1M are the first at the lower rates). Raw states, as the official
d4rl_utils.py feeds them (--normalize-states standardises them). The behaviour model is trained in
every run from --seed, as the official train_eval_offline.py does after seeding (--bc-seed S trains
one model from S for every --seed); it runs on a random stream of its own and is cached in
--cache-dir, keyed by the data, its flags and its seed, so a run with another lambda reuses it.

Deviations:
- The behaviour model has 2 hidden layers, as in the code; appendix A says 3.
- Minibatches are drawn with replacement, each phase from its own stream; the code draws them
  without replacement from one stream of reshuffled epochs that both phases share.
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
    # --- Fisher-BRC ---
    bc_steps: int = 1_000_000
    """gradient steps of the behaviour model before the actor-critic phase (paper: 1M)"""
    bc_lr: float = 1e-3
    """initial Adam learning rate of the behaviour model and its temperature (x0.1 after 80% and 90% of bc_steps)"""
    bc_seed: Optional[int] = None
    """seed of the behaviour model's initialisation and training (default: --seed, as the authors' code; one value shares one model across seeds)"""
    cache_dir: Optional[str] = None
    """where trained behaviour models are cached (default <output_dir>/pretrained_cache)"""
    reuse_cache: bool = True
    """load the behaviour model from the cache when one was trained with the same data and flags"""
    n_components: int = 5
    """Gaussian components per action dimension of the behaviour mixture"""
    gp_weight: float = 0.1
    """lambda of eq. (7): weight of the gradient penalty on the offsets (at 0.1 it needs the full --bc-steps; on local/hopper/medium-replay-v0 it collapses at 40k-53k steps: docs/results.md)"""
    gp_on_data: bool = False
    """take the gradient penalty at dataset actions instead of a ~ pi(s)"""
    reward_transform: common.RewardTransform = "plus-five"
    """reward transform; plus-five is the paper's survival bonus r + 5"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak step of the target offsets"""
    lr: float = 3e-4
    """Adam learning rate of actor, offsets and entropy temperature"""
    hidden_dim: int = 256
    """width of the hidden layers (3 in actor and offsets, 2 in the behaviour model)"""
    normalize_states: bool = False
    """standardise states with the dataset's mean and std (the official code feeds raw states)"""


def check_args(args: Args) -> None:
    """This file's own flags, right after parsing (common.check_args checks the shared ones)."""
    common.check_positive(args, "bc_steps", "bc_lr", "n_components", "lr", "hidden_dim")
    common.check_positive(args, "gp_weight", zero=True)
    common.check_seed(args, "bc_seed")
    common.check_interval(args, "gamma", 0, 1, "[)")
    common.check_interval(args, "tau", 0, 1, "(]")


def behavior_seed(args: Args) -> int:
    """The behaviour model's seed: --bc-seed, else --seed (the authors train it in every run)."""
    return args.seed if args.bc_seed is None else args.bc_seed


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


def orthogonal_init(net: nn.Sequential) -> nn.Sequential:
    """The official code's initialisation: orthogonal weights (gain sqrt 2, output layer 1e-2), zero
    biases; each member of an ensemble layer gets its own orthogonal matrix."""
    linears = [m for m in net if isinstance(m, (nn.Linear, common.EnsembleLinear))]
    with torch.no_grad():
        for i, layer in enumerate(linears):
            for weight in layer.weight if isinstance(layer, common.EnsembleLinear) else [layer.weight]:
                nn.init.orthogonal_(weight, gain=1e-2 if i == len(linears) - 1 else math.sqrt(2.0))
            nn.init.zeros_(layer.bias)
    return net


def tanh_log_det(u: torch.Tensor) -> torch.Tensor:
    """log |d tanh(u) / du| = log(1 - tanh(u)^2), in a form that stays finite for large |u|."""
    return 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))


def clipped_atanh(act: torch.Tensor) -> torch.Tensor:
    return torch.atanh(act.clamp(-1.0 + 1e-6, 1.0 - 1e-6))


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy (SAC), state-dependent log-std in [-20, 2]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = orthogonal_init(mlp(obs_dim, 2 * act_dim, hidden_dim, 3))

    def forward(self, obs: torch.Tensor):
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(-20.0, 2.0)

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised action in (-1, 1) and its log-density."""
        mean, log_std = self(obs)
        std = log_std.exp()
        u = mean + std * torch.randn_like(mean)
        # validate_args=False: the distribution's argument checks would sync the device on every call
        log_prob = torch.distributions.Normal(mean, std, validate_args=False).log_prob(u) - tanh_log_det(u)
        return torch.tanh(u), log_prob.sum(-1)


class BehaviorModel(nn.Module):
    """mu(a|s): for every action dimension an independent mixture of K tanh-squashed Gaussians."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, n_components: int):
        super().__init__()
        self.act_dim, self.k = act_dim, n_components
        self.net = orthogonal_init(mlp(obs_dim, 3 * act_dim * n_components, hidden_dim, 2))

    def components(self, obs: torch.Tensor):
        """Per action dimension: mixture log-weights, means and log-stds, each (N, |A|, K)."""
        logits, mean, log_std = self.net(obs).view(-1, self.act_dim, 3 * self.k).chunk(3, dim=-1)
        return torch.log_softmax(logits, -1), mean, log_std.clamp(-20.0, 2.0)

    @staticmethod
    def mixture_log_prob(log_w, mean, log_std, act: torch.Tensor) -> torch.Tensor:
        """log mu(a|s), summed over the independent action dimensions."""
        u = clipped_atanh(act)
        log_normal = torch.distributions.Normal(mean, log_std.exp(), validate_args=False).log_prob(u.unsqueeze(-1))
        return (torch.logsumexp(log_w + log_normal, -1) - tanh_log_det(u)).sum(-1)

    @staticmethod
    def mixture_sample(log_w, mean, log_std) -> torch.Tensor:
        """a ~ mu(.|s): the component is drawn without gradient, its Gaussian draw is reparameterised,
        so the gradient reaches the chosen component's mean and scale (as TFP's mixture sample)."""
        k = torch.distributions.Categorical(logits=log_w.detach(), validate_args=False).sample().unsqueeze(-1)
        u = mean.gather(-1, k) + log_std.gather(-1, k).exp() * torch.randn_like(k, dtype=mean.dtype)
        return torch.tanh(u.squeeze(-1))

    def log_prob(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.mixture_log_prob(*self.components(obs), act)

    def sample(self, obs: torch.Tensor) -> torch.Tensor:
        return self.mixture_sample(*self.components(obs))


class Offsets(nn.Module):
    """Twin offset networks O_1, O_2 (the critic minus log mu) as a 2-member ensemble: every layer is
    one batched matmul for both."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = orthogonal_init(common.ensemble_mlp(2, obs_dim + act_dim, 1, hidden_dim, 3))

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """(2, N): O_1(s, a) and O_2(s, a), which unpack as `o1, o2 = offsets(obs, act)`. `act` is
        (N, A), or (2, N, A) to give each network its own copy: the gradient penalty then gets both
        networks' action gradients from one backward pass."""
        x = torch.cat([obs.expand(*act.shape[:-1], -1), act], dim=-1)
        return self.net(x.expand(2, -1, -1)).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Algorithm
# ----------------------------------------------------------------------------------------------
# Compiled graphs cannot be differentiated twice: under --compile the penalty runs eagerly.
@torch.compiler.disable
def gradient_penalty(offsets: Offsets, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """E ||grad_a O_1(s,a)||^2 + E ||grad_a O_2(s,a)||^2 (squared norms, eq. 7), differentiable in O.
    Each network differentiates its own copy of the actions, so one backward pass gives both gradients."""
    act = act.detach().repeat(2, 1, 1).requires_grad_(True)
    o1, o2 = offsets(obs, act)
    g1, g2 = torch.autograd.grad(o1.sum() + o2.sum(), act, create_graph=True)[0]
    return (g1.pow(2).sum(-1) + g2.pow(2).sum(-1)).mean()


def regression_slope(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Least-squares slope of y on x over a batch. Logged for O(s, a) on log mu(a|s) at dataset
    actions: near -1 when the offsets cancel the behaviour density instead of correcting it."""
    xc = x - x.mean()
    return (xc * (y - y.mean())).mean() / xc.pow(2).mean().clamp(min=1e-12)


class FisherBRC:
    def __init__(self, args: Args, obs_dim: int, act_dim: int, device: torch.device):
        self.args = args
        self.target_entropy = -float(act_dim)
        with common.separate_rng(behavior_seed(args), device):  # a stream of its own: the model is cached
            self.behavior = BehaviorModel(obs_dim, act_dim, args.hidden_dim, args.n_components).to(device)
        self.behavior_log_alpha = torch.zeros((), device=device, requires_grad=True)
        self.behavior_optimizer = torch.optim.Adam(self.behavior.parameters(), lr=args.bc_lr, fused=True)
        self.behavior_alpha_optimizer = torch.optim.Adam([self.behavior_log_alpha], lr=args.bc_lr, fused=True)
        # Keras' PiecewiseConstantDecay(boundaries) gives update n the rate of step n - 1 and lowers it
        # only past a boundary b, i.e. from update b + 2; MultiStepLR lowers it from update milestone + 1.
        milestones = [int(0.8 * args.bc_steps) + 1, int(0.9 * args.bc_steps) + 1]
        self.behavior_schedulers = [torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
                                    for opt in (self.behavior_optimizer, self.behavior_alpha_optimizer)]
        self.actor = Actor(obs_dim, act_dim, args.hidden_dim).to(device)
        self.offsets = Offsets(obs_dim, act_dim, args.hidden_dim).to(device)
        self.offsets_target = copy.deepcopy(self.offsets)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.lr, fused=True)
        self.offsets_optimizer = torch.optim.Adam(self.offsets.parameters(), lr=args.lr, fused=True)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=args.lr, fused=True)
        self.behavior_loss = common.compiled(self.behavior_loss, args.compile)
        self.td_loss = common.compiled(self.td_loss, args.compile)
        self.actor_loss = common.compiled(self.actor_loss, args.compile)
        self.train_behavior = common.autocast(self.train_behavior, args.precision, device)
        self.train = common.autocast(self.train, args.precision, device)

    def behavior_loss(self, batch: common.Batch) -> tuple[torch.Tensor, ...]:
        """Step 1's loss: entropy-regularised maximum likelihood, H(mu(.|s)) ~ -log mu(a~mu|s) with the
        sample's reparameterised gradient; and log mu(a|s), that entropy and the temperature."""
        obs, actions = batch.observations, batch.actions
        components = self.behavior.components(obs)  # one forward for both terms, as the official code
        log_prob = self.behavior.mixture_log_prob(*components, actions)
        entropy = -self.behavior.mixture_log_prob(*components, self.behavior.mixture_sample(*components))
        alpha = self.behavior_log_alpha.exp().detach()
        return -(log_prob + alpha * entropy).mean(), log_prob, entropy, alpha

    def train_behavior(self, batch: common.Batch) -> dict:
        """Step 1; the temperature's loss alpha * (H - target) is the official code's (its gradient
        is scaled by alpha, not the log alpha form)."""
        loss, log_prob, entropy, alpha = self.behavior_loss(batch)
        self.behavior_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.behavior_optimizer.step()
        alpha_loss = (self.behavior_log_alpha.exp() * (entropy.detach() - self.target_entropy)).mean()
        self.behavior_alpha_optimizer.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.behavior_alpha_optimizer.step()
        for scheduler in self.behavior_schedulers:
            scheduler.step()
        return {"losses/behavior_nll": -log_prob.mean().detach(), "charts/behavior_entropy": entropy.mean().detach(),
                "charts/behavior_alpha": alpha}

    def td_loss(self, batch: common.Batch) -> tuple:
        """Eq. (7)'s TD loss of the offsets; mu is frozen, so log mu enters the targets as a constant.
        Also O_1(s, a), log mu(a|s), mu's components at s and the actions of the gradient penalty."""
        args = self.args
        obs, actions, rewards, next_obs, terminals = batch
        with torch.no_grad():
            next_actions, _ = self.actor.sample(next_obs)
            target_q = torch.min(*self.offsets_target(next_obs, next_actions)) + self.behavior.log_prob(next_obs, next_actions)
            target_q = rewards + args.gamma * (1.0 - terminals) * target_q
            mu_components = self.behavior.components(obs)  # mu is frozen: one forward serves a and pi(s)
            log_mu_data = self.behavior.mixture_log_prob(*mu_components, actions)
            gp_actions = actions if args.gp_on_data else self.actor.sample(obs)[0]
        o1, o2 = self.offsets(obs, actions)
        td_loss = F.mse_loss(o1 + log_mu_data, target_q) + F.mse_loss(o2 + log_mu_data, target_q)
        return td_loss, o1, log_mu_data, mu_components, gp_actions

    def actor_loss(self, obs: torch.Tensor, mu_components: tuple) -> tuple[torch.Tensor, ...]:
        """SAC's actor loss with Q = min O + log mu (gradients reach a through both); and log pi and
        the temperature."""
        pi, log_pi = self.actor.sample(obs)
        q_pi = torch.min(*self.offsets(obs, pi)) + self.behavior.mixture_log_prob(*mu_components, pi)
        alpha = self.log_alpha.exp().detach()
        return (alpha * log_pi - q_pi).mean(), log_pi, alpha

    def train(self, batch: common.Batch) -> dict:
        args = self.args
        obs = batch.observations

        # Step 2: offsets, eq. (7), with the gradient penalty.
        td_loss, o1, log_mu_data, mu_components, gp_actions = self.td_loss(batch)
        gp = gradient_penalty(self.offsets, obs, gp_actions)
        offsets_loss = td_loss + args.gp_weight * gp
        self.offsets_optimizer.zero_grad(set_to_none=True)
        offsets_loss.backward()
        self.offsets_optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.offsets_target.parameters()), list(self.offsets.parameters()), args.tau)

        # Step 3: actor and its entropy temperature (SAC).
        self.offsets.requires_grad_(False)  # the actor's loss moves the actor only: no offset weight gradients
        actor_loss, log_pi, alpha = self.actor_loss(obs, mu_components)
        self.offsets.requires_grad_(True)
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()
        # the official code's form, as the behaviour model's: its gradient in log alpha is scaled by alpha
        alpha_loss = (self.log_alpha.exp() * (-log_pi.detach() - self.target_entropy)).mean()
        self.alpha_optimizer.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_optimizer.step()

        return {"losses/offsets_loss": offsets_loss.detach(), "losses/td_loss": td_loss.detach(),
                "losses/gradient_penalty": gp.detach(), "losses/actor_loss": actor_loss.detach(),
                "losses/q1": (o1 + log_mu_data).mean().detach(), "charts/log_mu_data": log_mu_data.mean(),
                "charts/offset_vs_log_mu_slope": regression_slope(o1.detach(), log_mu_data),
                "charts/alpha": alpha, "charts/entropy": -log_pi.mean().detach()}

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.actor(obs)[0])

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "offsets": self.offsets.state_dict(),
                "behavior": self.behavior.state_dict()}


def make_policy(args: Args, obs_dim: int, act_dim: int) -> common.Policy:
    """`FisherBRC.act` apart from training, with the networks it reads (untrained): tools/evaluate.py
    loads a model.pt into it."""
    return common.Policy(FisherBRC.act, args, actor=Actor(obs_dim, act_dim, args.hidden_dim))


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------
if __name__ == "__main__":
    common.install_user_error_hook()
    args = tyro.cli(Args)
    common.check_args(args)
    check_args(args)
    args.bc_seed = behavior_seed(args)  # recorded in results.json and the cache key
    device = common.resolve_device(args.device)
    common.seed_everything(args.seed)

    data = common.load_dataset(args.env, device)
    common.transform_rewards(data, args.reward_transform)
    obs_mean, obs_std = common.normalize_obs(data) if args.normalize_states else (None, None)
    buffer = common.ReplayBuffer(data)

    agent = FisherBRC(args, data.obs_dim, data.act_dim, device)
    run = common.Run(args, "fisher_brc", data, phases=("behaviour model",))
    key = common.pretraining_key(args, ("bc_steps", "bc_lr", "bc_seed", "n_components", "hidden_dim", "batch_size"), data,
                                 recipe=("keras learning-rate boundaries",))
    cache_path = os.path.join(args.cache_dir or os.path.join(args.output_dir, "pretrained_cache"),
                              f"fisher_brc_behavior_{key}.pt")
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
