"""BRAC+: Zhang, Kuppannagari & Prasanna, "BRAC+: Improved Behavior Regularized Actor Critic for
Offline Reinforcement Learning", ACML 2021 (arXiv: "BRAC+: Going Deeper with Behavior Regularized
Offline Reinforcement Learning").

Implements Algorithm 1, in four phases:
1. Behaviour model pi_b: an ensemble of B = 3 conditional VAEs over the pre-tanh action u = atanh(a),
   Gaussian encoder q(z|u,s) and decoder p(u|z,s), prior N(0, I), trained by the ELBO (appendix C).
2. Initial policy pi_0 = argmin_pi KL(pi || pi_b) (line 2), under the entropy bound below.
3. Initial critic Q^{pi_0} by TD learning with the frozen pi_0 (line 3, eq. 2).
4. Per step (lines 6-10): critic (eq. 10), policy (eq. 8 with eq. 7), alpha(s), beta, target.
KL upper bound, eq. (7), with u ~ pi(.|s) reparameterised and z_l ~ q(z|u,s), l = 1..L:
    KL(pi || pi_b)(s) <= mean_l [ KL(pi(.|s) || p(.|z_l,s)) + KL(q(z|u,s) || N(0, I)) ],
closed-form Gaussian KLs in pre-tanh space (tanh is a bijection), averaged over the ensemble.
(Eq. 7 swaps the sampled u for a fresh sample inside the decoder term, an identity only when z is
independent of u; tests/test_brac_plus.py checks the resulting gap in closed form.)
Policy, eq. (8), with K policy samples and the entropy bound of appendix F:
    min E_s [ -mean_k min_i Q_i(s, a_k) + alpha(s) * (KL(s) - delta_KL) - beta * mean_k log pi(a_k|s) ]
    alpha(s) <- alpha(s) + lr * (KL(s) - delta_KL)     (line 8)
    beta     <- beta + lr * (H(pi(.|s)) - H_0)        (line 9: an upper bound H <= H_0)
Critic, eq. (10), f the Heaviside step, lambda 0.1:
    min (Q_i(s,a) - y)^2 + lambda * 1[KL(s) > eps_GP] * ||grad_a Q_i(s, a~pi(s))||^2
    y = r + gamma * (1 - d) * mean_k min_j Q_targ_j(s', a'_k),  a'_k ~ pi(s')
    eps_GP = mean + std of the per-state KL at the end of the previous epoch (section 3.3).
Paper by default, the official code (vermouth1992/bracp) behind flags:
    --alpha-mode state (alpha(s) network, paper) | global (one scalar, code);
    --gp-mode paper | official (gate softplus(KL(s) - eps_GP) normalised by its batch maximum, or the
      hard gate of --gp-gate hard, on the unsquared norm of grad_a min_j Q_j, lambda a multiplier never
      below --gp-weight driving the mean gated norm to --gp-target, and the code's
      0.5 * sum_i (Q_i - y)^2 TD loss);
    --max-q-backup (the code's max over the K samples instead of eq. 10's mean).
--regularizer mmd (the default on Adroit: "we use MMD with Laplacian kernel for Adroit tasks", section
5.1) replaces the KL bound everywhere it is used (policy loss, pi_0, delta_KL, the gate and eps_GP) by
    MMD(s) = sqrt(mean k(a, a') + mean k(b, b') - 2 mean k(a, b) + 1e-6),
    k(x, y) = exp(-|x - y|_1 / (2 sigma)) (Laplacian kernel, --mmd-sigma),
over K policy samples a and B * K behaviour samples b (each member's decoder mean at K latents
z ~ N(0, I) clipped to [-0.5, 0.5]), both tanh(clip(u, -3, 3)) in action space, as the code's
_compute_mmd; the entropy bound is then a lower bound H >= H_0 (the paper's Adroit table: "Minimum
entropy H_0"; the code flips the signs of both entropy terms).

Hyperparameters (the code's values where the paper gives none): VAE latent 2|A|, scales
softplus(clip(x, -10, 5)) in the VAEs and the policy; L = K = 5; the pi_0 loss, delta_KL and the
gradient penalty with its gate use one policy sample per state (K with MMD); alpha and beta start at
10 (--alpha-init, --beta-init; 1 is the code's agent-class default for beta), capped at 1e4 by
clipping the raw value with its gradient kept (the code's clip_by_value_preserve_gradient), Adam
1e-3, beta's Adam state started afresh for the RL phase; delta_KL = mean KL(pi_0 || pi_b) + a
per-dataset margin and halfcheetah's gradient-norm target 0.1 (the code's run script; --kl-margin,
--gp-target); H_0 = NLL_b - |A| log 4, NLL_b the dataset's negative ELBO in action space; an "epoch"
is --epoch-steps 2000 (Figure 2); VAE 400k steps (paper), pi_0 and Q_0 100k each; VAE and pi_0 Adam
1e-3 x (1, 0.5, 0.1, 0.05, 0.01) over the fifths of their phase (Keras' PiecewiseConstantDecay);
policy Adam 5e-6 in the RL phase, critic 3e-4, tau 1e-3, batch 256 (code: 100); Adroit (the run
script's human-dataset settings): MMD, sigma 120, margin 0.001, policy Adam 5e-8, gradient-norm
target 0.005, hard gate, H_0 = NLL_b. Networks: two hidden layers each (the paper's "3-layer network"
is the code's build_mlp(num_layers=3)), policy 512, VAEs 512 (paper; code: 256), critic and alpha(s)
256; kernels Glorot-uniform, biases 0, the policy's and critics' output kernels U(+-1e-3) (the code's
Keras layers). Rewards min-max scaled into [0, 1]. The VAE ensemble is cached like Fisher-BRC's
behaviour model (--cache-dir, --bc-seed, --no-reuse-cache).

Deviations:
- alpha(s)'s dual step (line 8) is taken on its pre-softplus output x(s), as SAC steps log alpha,
  with alpha(s) kept in [1 / alpha_max, alpha_max] by regressing x(s) on clip(x(s) + KL(s) - delta_KL)
  (--multiplier-lr): a step on alpha(s) itself vanishes in the softplus tail once alpha(s) is small
  (docs/results.md, BRAC+). The paper gives neither this detail nor a learning rate.
- The per-state KL statistics (delta_KL, eps_GP, H_0) use a fixed random subset of --kl-states 10k
  states; eps_GP is recomputed on it with K samples per state (the code: the batch KLs logged over
  the epoch); the first epoch's eps_GP comes from pi_0 (the code starts at delta_KL + margin).
- The entropy bound also applies while pretraining pi_0, as in the code; with beta 10 and a short
  pi_0 phase the policy collapses (docs/results.md), so short runs use --beta-init 1.
- The decoder is one Gaussian (section 3.1 "in practice"; the appendix's mixture would break the
  closed-form KL). Q_0 is a separate phase of --pretrain-steps (the code has none).
- Not followed from the code: training the VAEs during the RL phase (the paper trains them once),
  evaluating with the best of 20 clipped samples under Q (here: tanh of the mean).
- The code's Adroit settings (listed for the human datasets, the only ones the paper reports) are the
  defaults on every Adroit dataset.
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
    # --- BRAC+ ---
    regularizer: Optional[Literal["kl", "mmd"]] = None
    """divergence from the behaviour model: kl (the bound of eq. 7) or mmd (Laplacian kernel) (default: mmd on Adroit, else kl)"""
    mmd_sigma: float = 120.0
    """--regularizer mmd: sigma of the kernel exp(-|x - y|_1 / (2 sigma)) (the code's run script for Adroit)"""
    kl_margin: Optional[float] = None
    """delta_KL = mean KL(pi_0 || pi_b) + this margin, or the same of the MMD (default: per task from the dataset id)"""
    alpha_mode: Literal["state", "global"] = "state"
    """state: Lagrange multiplier network alpha(s) (paper); global: one scalar (official code)"""
    alpha_init: float = 10.0
    """initial value of the KL multiplier alpha (official code)"""
    beta_init: float = 10.0
    """initial value of the entropy multiplier beta (official code; use 1 when --pretrain-steps is short)"""
    alpha_max: float = 1e4
    """upper clip of alpha, beta and --gp-mode official's lambda (official code); alpha(s) is pulled back into [1 / this, this]"""
    multiplier_lr: float = 1e-3
    """Adam learning rate of alpha and beta (official code)"""
    gp_mode: Literal["paper", "official"] = "paper"
    """paper: indicator gate, fixed lambda, squared norms; official: softplus gate, tuned lambda"""
    gp_weight: float = 0.1
    """lambda of eq. (10); with --gp-mode official its initial value and lower bound"""
    gp_target: Optional[float] = None
    """--gp-mode official: lambda rises while the mean gated gradient norm exceeds this (default: 0.1 halfcheetah, 0.005 Adroit, else 0.01)"""
    gp_gate: Optional[Literal["softplus", "hard"]] = None
    """--gp-mode official: softplus(KL(s) - eps_GP) over its batch maximum, or 1[KL(s) > eps_GP] (default: hard on Adroit, else softplus)"""
    max_q_backup: bool = False
    """target: max over the K samples of min_j Q_targ_j (official code) instead of the mean (eq. 10)"""
    n_samples: int = 5
    """K: policy samples per state in the policy loss and the target (official code)"""
    n_latent: int = 5
    """L: latent samples per policy sample in the KL bound (appendix F)"""
    n_ensembles: int = 3
    """B: VAEs in the behaviour ensemble (appendix F)"""
    entropy_std_scale: Optional[float] = None
    """H_0 = NLL_b - |A| log(this): the behaviour std shrunk by this factor (default: 1 on Adroit, else 4; official code)"""
    epoch_steps: int = 2_000
    """gradient steps per epoch; eps_GP is recomputed after each (paper Figure 2)"""
    kl_states: int = 10_000
    """size of the fixed random subset of dataset states for the per-state KL statistics"""
    bc_steps: int = 400_000
    """gradient steps of the VAE ensemble (paper: 400k)"""
    pretrain_steps: int = 100_000
    """gradient steps of each initialisation phase: pi_0 (min KL), then Q_0 (TD on pi_0)"""
    bc_lr: float = 1e-3
    """initial Adam learning rate of the VAEs and of pi_0 (x0.5, 0.1, 0.05, 0.01 at each fifth)"""
    bc_seed: int = 0
    """seed of the VAE ensemble's initialisation and training (not --seed, so that seeds share the cache)"""
    cache_dir: Optional[str] = None
    """where trained VAE ensembles are cached (default <output_dir>/pretrained_cache)"""
    reuse_cache: bool = True
    """load the VAE ensemble from the cache when one was trained with the same data and flags"""
    reward_transform: common.RewardTransform = "min-max"
    """reward transform; min-max is the paper's scaling into [0, 1]"""
    gamma: float = 0.99
    """discount"""
    tau: float = 1e-3
    """Polyak step of the target critic (official code)"""
    actor_lr: Optional[float] = None
    """Adam learning rate of the policy in the RL phase (default: 5e-8 on Adroit, else 5e-6; official code)"""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics"""
    hidden_dim: int = 256
    """width of the 2 hidden layers of the critics and of alpha(s) (appendix F)"""
    actor_hidden_dim: int = 512
    """width of the policy's 2 hidden layers (appendix F; the official code: 256)"""
    vae_hidden_dim: int = 512
    """width of the 2 hidden layers of each encoder and decoder (appendix F; the official code: 256)"""
    normalize_states: bool = False
    """standardise states with the dataset's mean and std (the authors' code feeds raw states)"""


def check_args(args: Args) -> None:
    """This file's own flags, right after parsing (common.check_args checks the shared ones)."""
    if args.alpha_max <= 1.0:
        raise common.UserError(f"--alpha-max must be above 1 (alpha(s) is kept in [1/alpha_max, alpha_max]), "
                               f"got {args.alpha_max}")
    if args.gp_mode == "official" and args.gp_weight >= args.alpha_max:
        raise common.UserError(f"--gp-weight must be below --alpha-max with --gp-mode official (lambda is clipped to "
                               f"[gp_weight, alpha_max]), got {args.gp_weight}")
    common.check_positive(args, "mmd_sigma", "alpha_init", "beta_init", "multiplier_lr", "gp_weight", "gp_target",
                          "n_samples",
                          "n_latent", "n_ensembles", "entropy_std_scale", "epoch_steps", "kl_states", "bc_steps",
                          "bc_lr", "actor_lr", "critic_lr", "hidden_dim", "actor_hidden_dim", "vae_hidden_dim")
    common.check_positive(args, "kl_margin", "pretrain_steps", zero=True)
    common.check_seed(args, "bc_seed")
    common.check_interval(args, "gamma", 0, 1, "[)")
    common.check_interval(args, "tau", 0, 1, "(]")


# Per-dataset settings of the official run script (d4rl_bracp.py): the KL margin
# (generalization_threshold; 0.1 for any other dataset) and, on halfcheetah, a gradient-norm
# target (max_ood_grad_norm) of 0.1 instead of 0.01. Its Adroit entries (the human datasets, the only
# Adroit ones the paper reports) switch to MMD with their own margin, target, gate, policy learning
# rate and H_0 (std_scale 1); here they apply to every Adroit dataset.
KL_MARGINS = {"medium-expert": 0.2, "medium-replay": 3.0, "random": 3.0,
              "hopper/medium": 0.2, "walker2d/medium": 1.0, "halfcheetah/medium": 7.0}
DEFAULT_KL_MARGIN = 0.1
ADROIT_TASKS = ("door", "hammer", "pen", "relocate")
ADROIT_DEFAULTS = {"regularizer": "mmd", "kl_margin": 0.001, "gp_target": 0.005, "gp_gate": "hard",
                   "actor_lr": 5e-8, "entropy_std_scale": 1.0}


def domain_defaults(dataset_id: str) -> dict:
    name = dataset_id.lower().split("/")[-1]  # medium-replay-v0, hopper-medium-replay-v2 (D4RL's), medium-replay-50k-v0
    kind = next((k for k in ("medium-expert", "medium-replay", "random", "medium", "expert") if k in name), name)
    task = common.dataset_task(dataset_id)
    if task in ADROIT_TASKS:
        return dict(ADROIT_DEFAULTS)
    margin = next((KL_MARGINS[k] for k in (kind, f"{task}/{kind}") if k in KL_MARGINS), DEFAULT_KL_MARGIN)
    return {"regularizer": "kl", "kl_margin": margin, "gp_target": 0.1 if task == "halfcheetah" else 0.01,
            "gp_gate": "softplus", "actor_lr": 5e-6, "entropy_std_scale": 4.0}


def fill_domain_defaults(args: Args) -> dict:
    """Set the flags left at None to their per-dataset defaults; returns those it set."""
    chosen = {k: v for k, v in domain_defaults(args.env).items() if getattr(args, k) is None}
    for k, v in chosen.items():
        setattr(args, k, v)
    return chosen


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def keras_init_(layer: nn.Module, bound: Optional[float] = None) -> nn.Module:
    """The code's initialisation (Keras Dense layers via rlutils' build_mlp, per ensemble member):
    kernel U(+-bound), bound = sqrt(6 / (fan_in + fan_out)) (Glorot uniform) unless given (the code's
    output layers of the policy and the critics: 1e-3); bias 0."""
    fan_in, fan_out = (layer.in_features, layer.out_features) if isinstance(layer, nn.Linear) else layer.weight.shape[-2:]
    bound = math.sqrt(6.0 / (fan_in + fan_out)) if bound is None else bound
    layer.weight.uniform_(-bound, bound)
    layer.bias.zero_()
    return layer


def mlp(in_dim: int, out_dim: int, hidden_dim: int, n_hidden: int, out_bound: Optional[float] = None) -> nn.Sequential:
    """n_hidden ReLU layers of width hidden_dim, then a linear output layer (fp32 under --precision bf16),
    initialised by keras_init_ (output kernel U(+-out_bound) if given)."""
    layers, d = [], in_dim
    for _ in range(n_hidden):
        layers += [keras_init_(nn.Linear(d, hidden_dim)), nn.ReLU()]
        d = hidden_dim
    return nn.Sequential(*layers, keras_init_(common.OutputLinear(d, out_dim), out_bound))


def tanh_log_det(u: torch.Tensor) -> torch.Tensor:
    """log |d tanh(u) / du| = log(1 - tanh(u)^2), in a form that stays finite for large |u|."""
    return 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))


def clipped_atanh(act: torch.Tensor) -> torch.Tensor:
    return torch.atanh(act.clamp(-1.0 + 1e-6, 1.0 - 1e-6))


def clip_preserve_gradient(x: torch.Tensor, low: float | None, high: float | None) -> torch.Tensor:
    """The value of clamp(x, low, high) with the gradient of x (TFP's clip_by_value_preserve_gradient,
    which the official code applies to its multipliers' raw values): a multiplier at its cap can
    still be pushed back down."""
    return x + (x.clamp(low, high) - x).detach()


def inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


def gaussian_kl(mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor, std_q: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, std_p^2) || N(mean_q, std_q^2)) of diagonal Gaussians, summed over the last dim."""
    return (torch.log(std_q / std_p) + (std_p.pow(2) + (mean_p - mean_q).pow(2)) / (2.0 * std_q.pow(2)) - 0.5).sum(-1)


def ensemble_mlp(n: int, in_dim: int, out_dim: int, hidden_dim: int, n_hidden: int,
                 out_bound: Optional[float] = None) -> common.EnsembleMLP:
    """common.ensemble_mlp initialised by keras_init_ (output kernel U(+-out_bound) if given)."""
    net = common.ensemble_mlp(n, in_dim, out_dim, hidden_dim, n_hidden)
    *hidden, out = [m for m in net if isinstance(m, common.EnsembleLinear)]
    for layer in hidden:
        keras_init_(layer)
    keras_init_(out, out_bound)
    return net


def gaussian_head(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std = softplus(clip(x, -10, 5)), std in [4.5e-5, 5.0]: the code's scale head of the
    VAEs (rlutils' behavior.py) and of the policy (actors.py, LOG_STD_RANGE)."""
    mean, raw_scale = out.chunk(2, dim=-1)
    return mean, F.softplus(raw_scale.clamp(-10.0, 5.0))


def laplacian_mmd(x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per row, sqrt(MMD^2 + 1e-6) between the samples x (N, n, A) and y (N, m, A), the biased
    (V-statistic) MMD^2 with every pair, self-pairs included, and the Laplacian kernel
    exp(-|x - y|_1 / (2 sigma)): the code's mmd_loss_laplacian. Returns (N,)."""
    def mean_kernel(a, b):
        return torch.exp(-(a.unsqueeze(2) - b.unsqueeze(1)).abs().sum(-1) / (2.0 * sigma)).mean((1, 2))

    return torch.sqrt(mean_kernel(x, x) + mean_kernel(y, y) - 2.0 * mean_kernel(x, y) + 1e-6)


class VAEEnsemble(nn.Module):
    """B conditional VAEs over pre-tanh actions u: q(z|u,s), p(u|z,s), prior N(0, I)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, n_ensembles: int):
        super().__init__()
        self.n, self.latent_dim = n_ensembles, 2 * act_dim
        self.encoder = ensemble_mlp(n_ensembles, act_dim + obs_dim, 2 * self.latent_dim, hidden_dim, 2)
        self.decoder = ensemble_mlp(n_ensembles, self.latent_dim + obs_dim, 2 * act_dim, hidden_dim, 2)

    def encode(self, obs: torch.Tensor, u: torch.Tensor):
        """q(z|u,s) of every member: (B, N, latent) means and stds for (N, .) inputs."""
        x = torch.cat([u, obs], -1).expand(self.n, -1, -1)
        return gaussian_head(self.encoder(x))

    def decode(self, obs: torch.Tensor, z: torch.Tensor):
        """p(u|z,s) for (B, M, latent) latents and (M, obs_dim) states."""
        return gaussian_head(self.decoder(torch.cat([z, obs.expand(self.n, -1, -1)], -1)))

    def sample_means(self, obs: torch.Tensor, n: int) -> torch.Tensor:
        """n decoder means per state and member at latents z ~ N(0, I) clipped to [-0.5, 0.5] (the
        code's EnsembleBehaviorPolicy.sample(full_path=False)): (N, B * n, A) pre-tanh actions."""
        z = torch.randn(self.n, len(obs) * n, self.latent_dim, device=obs.device).clamp(-0.5, 0.5)
        mean, _ = self.decode(obs.repeat_interleave(n, 0), z)  # (B, N * n, A)
        return mean.view(self.n, len(obs), n, -1).transpose(0, 1).flatten(1, 2)

    def neg_elbo(self, obs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-log p(u|z,s) at one z ~ q(z|u,s) and KL(q || prior), each (B, N)."""
        q_mean, q_std = self.encode(obs, u)
        z = q_mean + q_std * torch.randn_like(q_mean)
        p_mean, p_std = self.decode(obs, z)
        # validate_args=False: the distribution's argument checks would sync the device on every call
        nll = -torch.distributions.Normal(p_mean, p_std, validate_args=False).log_prob(u).sum(-1)
        return nll, gaussian_kl(q_mean, q_std, torch.zeros_like(q_mean), torch.ones_like(q_std))

    def kl_upper_bound(self, obs: torch.Tensor, u: torch.Tensor, pi_mean: torch.Tensor, pi_std: torch.Tensor,
                       n_latent: int) -> torch.Tensor:
        """Eq. (7) for each row: u ~ N(pi_mean, pi_std^2) reparameterised, averaged over n_latent
        samples z ~ q(z|u,s) and the members. Differentiable in u, pi_mean and pi_std."""
        q_mean, q_std = self.encode(obs, u)
        prior_kl = gaussian_kl(q_mean, q_std, torch.zeros_like(q_mean), torch.ones_like(q_std))
        z = q_mean.unsqueeze(1) + q_std.unsqueeze(1) * torch.randn(
            self.n, n_latent, *q_mean.shape[1:], device=q_mean.device)  # (B, L, N, latent)
        p_mean, p_std = self.decode(obs.repeat(n_latent, 1), z.flatten(1, 2))
        decoder_kl = gaussian_kl(pi_mean.repeat(n_latent, 1), pi_std.repeat(n_latent, 1), p_mean, p_std)
        return decoder_kl.view(self.n, n_latent, -1).mean((0, 1)) + prior_kl.mean(0)


class TanhGaussian(nn.Module):
    """Tanh-squashed Gaussian policy (appendix F) with the code's state-dependent scale
    std = softplus(clip(x, -10, 5)) (gaussian_head) and output kernel U(+-1e-3)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim, hidden_dim, 2, out_bound=1e-3)

    def forward(self, obs: torch.Tensor):
        """Mean and std of the pre-tanh Gaussian."""
        return gaussian_head(self.net(obs))

    def sample(self, obs: torch.Tensor, n: int = 1):
        """n reparameterised actions in (-1, 1) per state (rows i * n .. i * n + n - 1 for state i),
        their log-densities, the pre-tanh samples, means and stds; the network runs once per state."""
        mean, std = (x.repeat_interleave(n, 0) for x in self(obs))
        u = mean + std * torch.randn_like(mean)
        log_prob = torch.distributions.Normal(mean, std, validate_args=False).log_prob(u)
        log_prob = (log_prob - tanh_log_det(u)).sum(-1)
        return torch.tanh(u), log_prob, u, mean, std


class Critic(nn.Module):
    """Twin Q networks as a 2-member ensemble: every layer is one batched matmul for both; output
    kernels U(+-1e-3), as the code's EnsembleMinQNet."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = ensemble_mlp(2, obs_dim + act_dim, 1, hidden_dim, 2, out_bound=1e-3)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """(2, N): Q1(s, a) and Q2(s, a), which unpack as `q1, q2 = critic(obs, act)`.
        `act` is (N, A), or (2, N, A) to give each network its own copy: a gradient penalty then gets
        both networks' action gradients from one backward pass."""
        x = torch.cat([obs.expand(*act.shape[:-1], -1), act], dim=-1)
        return self.net(x.expand(2, -1, -1)).squeeze(-1)


class AlphaNet(nn.Module):
    """alpha(s) = softplus(MLP(s)) (section 3.2, appendix F), starting at alpha_init everywhere (the
    code has no such network: its hidden layers are initialised as the code's others)."""

    def __init__(self, obs_dim: int, hidden_dim: int, alpha_init: float):
        super().__init__()
        self.net = mlp(obs_dim, 1, hidden_dim, 2)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, inverse_softplus(alpha_init))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.net(obs).squeeze(-1))


# ----------------------------------------------------------------------------------------------
# Algorithm
# ----------------------------------------------------------------------------------------------
def piecewise_decay(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The official code's pretraining schedule: lr x 1, 0.5, 0.1, 0.05, 0.01 over the fifths, as Keras'
    PiecewiseConstantDecay(boundaries=[I, 2I, 3I, 4I]), I = steps // 5, evaluated at the number t of
    updates already taken: the factor changes when t exceeds a boundary, i.e. from update I + 2 on."""
    factors, interval = (1.0, 0.5, 0.1, 0.05, 0.01), steps // 5
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: factors[sum(t > k * interval for k in range(1, 5))])


def critic_target(rewards: torch.Tensor, terminals: torch.Tensor, next_q1: torch.Tensor, next_q2: torch.Tensor,
                  gamma: float, max_backup: bool) -> torch.Tensor:
    """y of eq. (10); next_q1/next_q2 are (B, K) target-critic values at K policy samples of s'."""
    next_q = torch.min(next_q1, next_q2)
    next_v = next_q.max(1).values if max_backup else next_q.mean(1)
    return rewards + gamma * (1.0 - terminals) * next_v


# Compiled graphs cannot be differentiated twice: under --compile the penalty runs eagerly.
@torch.compiler.disable
def gated_gradient_penalty(critic: Critic, obs: torch.Tensor, actions: torch.Tensor, kl: torch.Tensor,
                           threshold: torch.Tensor, mode: str, gate: str = "softplus") -> torch.Tensor:
    """Per-state gradient penalty of eq. (10) at policy actions, differentiable in the critic.
    paper: 1[KL(s) > eps_GP] * (||grad_a Q_1||^2 + ||grad_a Q_2||^2);
    official: softplus(KL(s) - eps_GP) / max_batch(.) * ||grad_a min_j Q_j||, or with gate "hard"
    1[KL(s) > eps_GP] * ||grad_a min_j Q_j||."""
    if mode == "paper":
        # each critic differentiates its own copy of the actions: one backward pass gives both gradients
        actions = actions.detach().repeat(2, 1, 1).requires_grad_(True)
        q1, q2 = critic(obs, actions)
        g1, g2 = torch.autograd.grad(q1.sum() + q2.sum(), actions, create_graph=True)[0]
        return (g1.pow(2).sum(-1) + g2.pow(2).sum(-1)) * (kl > threshold).float()
    actions = actions.detach().requires_grad_(True)
    q1, q2 = critic(obs, actions)
    g = torch.autograd.grad(torch.min(q1, q2).sum(), actions, create_graph=True)[0]
    if gate == "hard":
        return torch.linalg.vector_norm(g, dim=-1) * (kl > threshold).float()
    weight = F.softplus(kl - threshold)
    return torch.linalg.vector_norm(g, dim=-1) * (weight / weight.max()).detach()


class BRACPlus:
    def __init__(self, args: Args, obs_dim: int, act_dim: int, device: torch.device):
        if args.alpha_max <= 1.0:
            raise common.UserError(f"--alpha-max must be above 1 (alpha(s) is kept in [1/alpha_max, alpha_max]), not {args.alpha_max}")
        fill_domain_defaults(args)  # flags left at None take their per-dataset defaults, as in the script
        self.args = args
        self.act_dim = act_dim
        # policy samples per state for the divergence outside the RL-phase policy loss (pi_0's loss,
        # delta_KL, the penalty's gate): the code takes one for the KL bound, K for the MMD (a
        # two-sample statistic)
        self.n_divergence = 1 if args.regularizer == "kl" else args.n_samples
        # the entropy bound: an upper bound H <= H_0 with the KL bound, a lower bound with the MMD
        self.entropy_sign = 1.0 if args.regularizer == "kl" else -1.0
        with common.separate_rng(args.bc_seed, device):  # independent of --seed: the model is cached
            self.behavior = VAEEnsemble(obs_dim, act_dim, args.vae_hidden_dim, args.n_ensembles).to(device)
        self.behavior_optimizer = torch.optim.Adam(self.behavior.parameters(), lr=args.bc_lr, fused=True)
        self.behavior_scheduler = piecewise_decay(self.behavior_optimizer, args.bc_steps)
        self.actor = TanhGaussian(obs_dim, act_dim, args.actor_hidden_dim).to(device)
        self.critic = Critic(obs_dim, act_dim, args.hidden_dim).to(device)
        self.critic_target = copy.deepcopy(self.critic)
        self.pretrain_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.bc_lr, fused=True)
        self.pretrain_scheduler = piecewise_decay(self.pretrain_optimizer, args.pretrain_steps)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr, fused=True)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr, fused=True)
        if args.alpha_mode == "state":
            self.alpha_net = AlphaNet(obs_dim, args.hidden_dim, args.alpha_init).to(device)
            alpha_params = list(self.alpha_net.parameters())
        else:
            self.alpha_raw = torch.tensor(inverse_softplus(args.alpha_init), device=device, requires_grad=True)
            alpha_params = [self.alpha_raw]
        self.alpha_optimizer = torch.optim.Adam(alpha_params, lr=args.multiplier_lr, fused=True)
        self.beta_raw = torch.tensor(inverse_softplus(args.beta_init), device=device, requires_grad=True)
        # beta's Adam state starts afresh for the RL phase, as the code's set_policy_net_optimizer
        self.pretrain_beta_optimizer = torch.optim.Adam([self.beta_raw], lr=args.multiplier_lr, fused=True)
        self.beta_optimizer = torch.optim.Adam([self.beta_raw], lr=args.multiplier_lr, fused=True)
        self.gp_raw = torch.tensor(inverse_softplus(args.gp_weight), device=device, requires_grad=True)
        self.gp_optimizer = torch.optim.Adam([self.gp_raw], lr=args.multiplier_lr, fused=True)
        self.target_entropy = 0.0
        # delta_KL and eps_GP as tensors: eps_GP changes every epoch, and a compiled step reads a new
        # tensor value without being compiled again (a new Python float would be)
        self.kl_threshold = torch.zeros((), device=device)
        self.gp_threshold = torch.zeros((), device=device)
        for name in ("behavior_loss", "initial_policy_loss", "td_loss", "gp_samples", "actor_loss", "alpha_loss"):
            setattr(self, name, common.compiled(getattr(self, name), args.compile))
        for name in ("train_behavior", "train_initial_policy", "train_initial_critic", "train"):
            setattr(self, name, common.autocast(getattr(self, name), args.precision, device))

    def alpha(self, obs: torch.Tensor) -> torch.Tensor:
        """alpha(s) per state, (N,); the global mode broadcasts its scalar."""
        raw = self.alpha_net.net(obs).squeeze(-1) if self.args.alpha_mode == "state" else self.alpha_raw.expand(obs.shape[0])
        return F.softplus(clip_preserve_gradient(raw, None, inverse_softplus(self.args.alpha_max)))

    def beta(self) -> torch.Tensor:
        return F.softplus(clip_preserve_gradient(self.beta_raw, None, inverse_softplus(self.args.alpha_max)))

    def gp_multiplier(self) -> torch.Tensor:
        """--gp-mode official's lambda: the raw value clipped to [--gp-weight, --alpha-max] with its
        gradient kept, in the critic's loss and in lambda's own (the code's LagrangeLayer, min_value)."""
        low, high = inverse_softplus(self.args.gp_weight), inverse_softplus(self.args.alpha_max)
        return F.softplus(clip_preserve_gradient(self.gp_raw, low, high))

    def gp_weight(self) -> torch.Tensor:
        """lambda in the critic's loss: --gp-weight (paper), or the multiplier (official)."""
        if self.args.gp_mode == "paper":
            return torch.full((), self.args.gp_weight, device=self.gp_raw.device)  # made on the device: no host copy
        return self.gp_multiplier().detach()

    def behavior_loss(self, batch: common.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' negative ELBOs, summed; and their KL terms."""
        nll, kl = self.behavior.neg_elbo(batch.observations, clipped_atanh(batch.actions))
        return (nll + kl).mean(1).sum(), kl

    def train_behavior(self, batch: common.Batch) -> dict:
        """Phase 1: maximise each member's ELBO on the same batch (the code does the same)."""
        loss, kl = self.behavior_loss(batch)
        self.behavior_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.behavior_optimizer.step()
        self.behavior_scheduler.step()
        return {"losses/behavior_neg_elbo": loss.detach() / self.behavior.n, "charts/behavior_kl": kl.mean().detach()}

    @torch.no_grad()
    def set_target_entropy(self, obs: torch.Tensor, actions: torch.Tensor, chunk: int = 1000) -> float:
        """H_0 = NLL_b - |A| log(std scale), NLL_b the dataset's negative ELBO in action space."""
        total = 0.0
        for o, a in zip(obs.split(chunk), actions.split(chunk)):
            u = clipped_atanh(a)
            nll, kl = self.behavior.neg_elbo(o, u)
            total += ((nll + kl).mean(0) + tanh_log_det(u).sum(-1)).sum().item()
        self.target_entropy = total / len(obs) - self.act_dim * math.log(self.args.entropy_std_scale)
        return self.target_entropy

    def policy_kl(self, obs: torch.Tensor, k: int):
        """k reparameterised samples per state: the divergence (N,) (the KL bound averaged over the
        samples, or the MMD between them and B * k behaviour samples), actions (N*k, A), log pi (N, k)."""
        actions, log_pi, u, mean, std = self.actor.sample(obs, k)
        if self.args.regularizer == "mmd":
            behavior = self.behavior.sample_means(obs, k)
            kl = laplacian_mmd(torch.tanh(u.clamp(-3.0, 3.0)).view(len(obs), k, -1),
                               torch.tanh(behavior.clamp(-3.0, 3.0)), self.args.mmd_sigma)
            return kl, actions, log_pi.view(-1, k)
        kl = self.behavior.kl_upper_bound(obs.repeat_interleave(k, 0), u, mean, std, self.args.n_latent)
        return kl.view(-1, k).mean(1), actions, log_pi.view(-1, k)

    @torch.no_grad()
    def state_kl(self, obs: torch.Tensor, k: Optional[int] = None, chunk: int = 1000) -> torch.Tensor:
        """Per-state divergence with k policy samples (default K) over a set of states, in chunks
        that bound the memory."""
        return torch.cat([self.policy_kl(o, k or self.args.n_samples)[0] for o in obs.split(chunk)])

    def update_beta(self, log_pi: torch.Tensor, optimizer: Optional[torch.optim.Optimizer] = None) -> torch.Tensor:
        """Line 9: with the KL bound beta rises while H(pi) > H_0, which keeps the entropy below H_0;
        with the MMD the signs flip (H >= H_0), as in the code. `optimizer`: the RL phase's by default."""
        beta_loss = self.entropy_sign * self.beta() * (log_pi.detach().mean() + self.target_entropy)
        optimizer = optimizer or self.beta_optimizer
        optimizer.zero_grad(set_to_none=True)
        beta_loss.backward()
        optimizer.step()
        return beta_loss.detach()

    def initial_policy_loss(self, batch: common.Batch) -> tuple[torch.Tensor, ...]:
        """KL(pi || pi_b) under the entropy bound; and the KL, log pi and beta."""
        kl, _, log_pi = self.policy_kl(batch.observations, self.n_divergence)
        beta = self.beta().detach()
        return (kl - self.entropy_sign * beta * log_pi.mean(1)).mean(), kl, log_pi, beta

    def train_initial_policy(self, batch: common.Batch) -> dict:
        """Phase 2 (line 2): pi_0 = argmin KL(pi || pi_b), under the entropy bound (code), with one
        policy sample per state (K with the MMD), as the code's update_actor_cloning."""
        loss, kl, log_pi, beta = self.initial_policy_loss(batch)
        self.pretrain_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.pretrain_optimizer.step()
        self.pretrain_scheduler.step()
        self.update_beta(log_pi, self.pretrain_beta_optimizer)
        return {"losses/actor_loss": loss.detach(), "charts/kl": kl.mean().detach(),
                "charts/entropy": -log_pi.mean().detach(), "charts/beta": beta}

    def set_thresholds(self, obs: torch.Tensor) -> tuple[float, float]:
        """After phase 2: delta_KL = mean KL(pi_0 || pi_b) + margin, with one policy sample per state
        (K with the MMD) as the code's compute_pi_pib_distance; eps_GP of the first epoch."""
        self.kl_threshold.fill_(self.state_kl(obs, self.n_divergence).mean().item() + self.args.kl_margin)
        return self.kl_threshold.item(), self.update_gp_threshold(obs)

    def update_gp_threshold(self, obs: torch.Tensor) -> float:
        """Section 3.3: eps_GP = mean + std of the per-state KL at the end of the epoch (the std over
        n, as the code's logger)."""
        kl = self.state_kl(obs)
        self.gp_threshold.copy_(kl.mean() + kl.std(correction=0))
        return self.gp_threshold.item()

    def td_loss(self, batch: common.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        obs, actions, rewards, next_obs, terminals = batch
        k = self.args.n_samples
        with torch.no_grad():
            next_q1, next_q2 = self.critic_target(next_obs.repeat_interleave(k, 0), self.actor.sample(next_obs, k)[0])
            target_q = critic_target(rewards, terminals, next_q1.view(-1, k), next_q2.view(-1, k),
                                     self.args.gamma, self.args.max_q_backup)
        q1, q2 = self.critic(obs, actions)
        # the official code's TD loss is 0.5 * sum_i (Q_i - y)^2; eq. (10) has no 1/2
        scale = 0.5 if self.args.gp_mode == "official" else 1.0
        return scale * (F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)), q1

    def update_target(self) -> None:
        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), self.args.tau)

    def train_initial_critic(self, batch: common.Batch) -> dict:
        """Phase 3 (line 3): Q_0 = Q^{pi_0} by TD learning with the frozen pi_0, eq. (2)."""
        td_loss, q1 = self.td_loss(batch)
        self.critic_optimizer.zero_grad(set_to_none=True)
        td_loss.backward()
        self.critic_optimizer.step()
        self.update_target()
        return {"losses/td_loss": td_loss.detach(), "losses/q1": q1.mean().detach()}

    def update_alpha(self, obs: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        """Line 8, dual gradient descent per state: alpha(s) rises where KL(s) > delta_KL.
        state mode: the step is taken on the pre-softplus output x(s) (as SAC steps log alpha, not
        alpha), projected so that alpha(s) stays in [1 / alpha_max, alpha_max]: x(s) is regressed on
        clip(x(s) + KL(s) - delta_KL), whose gradient inside the box is the dual step. A step on
        alpha(s) itself vanishes in the softplus tail (see the docstring)."""
        alpha_loss = self.alpha_loss(obs, kl)
        self.alpha_optimizer.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_optimizer.step()
        return alpha_loss.detach()

    def alpha_loss(self, obs: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        violation = kl.detach() - self.kl_threshold
        if self.args.alpha_mode == "state":
            x = self.alpha_net.net(obs).squeeze(-1)
            low, high = inverse_softplus(1.0 / self.args.alpha_max), inverse_softplus(self.args.alpha_max)
            return 0.5 * (x - (x.detach() + violation).clamp(low, high)).pow(2).mean()
        return -(self.alpha(obs) * violation).mean()

    @torch.no_grad()
    def gp_samples(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient penalty's n_divergence policy actions per state and the divergence that gates it."""
        gate_kl, gp_actions, _ = self.policy_kl(obs, self.n_divergence)
        return gate_kl, gp_actions

    def actor_loss(self, obs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Eq. (8): -(Q - alpha(s) (KL(s) - delta_KL)) under the entropy bound; and the KL, log pi,
        alpha(s) and beta."""
        args = self.args
        kl, actions, log_pi = self.policy_kl(obs, args.n_samples)
        q1_pi, q2_pi = self.critic(obs.repeat_interleave(args.n_samples, 0), actions)
        q_pi = torch.min(q1_pi, q2_pi).view(-1, args.n_samples).mean(1)
        alpha = self.alpha(obs).detach()
        beta = self.beta().detach()
        actor_loss = (-q_pi + alpha * (kl - self.kl_threshold) - self.entropy_sign * beta * log_pi.mean(1)).mean()
        return actor_loss, kl, log_pi, alpha, beta

    def train(self, batch: common.Batch) -> dict:
        args = self.args
        obs = batch.observations

        # Line 6, eq. (10): TD loss plus the KL-gated gradient penalty at a ~ pi(s), averaged over
        # the n_divergence samples per state whose divergence gates it.
        td_loss, q1 = self.td_loss(batch)
        k = self.n_divergence
        gate_kl, gp_actions = self.gp_samples(obs)
        gp = gated_gradient_penalty(self.critic, obs.repeat_interleave(k, 0), gp_actions, gate_kl.repeat_interleave(k),
                                    self.gp_threshold, args.gp_mode, args.gp_gate).view(-1, k).mean(1)
        gp_weight = self.gp_weight()
        critic_loss = td_loss + gp_weight * gp.mean()
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()
        if args.gp_mode == "official":
            gp_loss = -(self.gp_multiplier() * (gp.detach().mean() - args.gp_target))
            self.gp_optimizer.zero_grad(set_to_none=True)
            gp_loss.backward()
            self.gp_optimizer.step()

        # Line 7, eq. (8): maximise Q - alpha(s) (KL(s) - delta_KL) under the entropy bound; the
        # constant alpha(s) delta_KL changes the logged loss (the code's value), not the gradient.
        self.critic.requires_grad_(False)  # the actor's loss moves the actor only: no critic weight gradients
        actor_loss, kl, log_pi, alpha, beta = self.actor_loss(obs)
        self.critic.requires_grad_(True)
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()

        # Lines 8-10: multipliers, then the target critic.
        alpha_loss = self.update_alpha(obs, kl)
        self.update_beta(log_pi)
        self.update_target()

        return {"losses/critic_loss": critic_loss.detach(), "losses/td_loss": td_loss.detach(),
                "losses/gradient_penalty": gp.mean().detach(), "losses/actor_loss": actor_loss.detach(),
                "losses/alpha_loss": alpha_loss, "losses/q1": q1.mean().detach(),
                "charts/kl": kl.mean().detach(), "charts/kl_violation": (kl > self.kl_threshold).float().mean(),
                "charts/gp_fraction": (gate_kl > self.gp_threshold).float().mean(),
                "charts/gp_threshold": self.gp_threshold.clone(),
                "charts/alpha": alpha.mean(), "charts/beta": beta, "charts/gp_weight": gp_weight,
                "charts/entropy": -log_pi.mean().detach()}

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.actor(obs)[0])

    def state_dict(self) -> dict:
        multipliers = {"beta_raw": self.beta_raw.detach(), "gp_raw": self.gp_raw.detach()}
        if self.args.alpha_mode == "state":
            multipliers["alpha_net"] = self.alpha_net.state_dict()
        else:
            multipliers["alpha_raw"] = self.alpha_raw.detach()
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "behavior": self.behavior.state_dict(), **multipliers,
                "kl_threshold": self.kl_threshold.item(), "gp_threshold": self.gp_threshold.item(),
                "target_entropy": self.target_entropy}


def make_policy(args: Args, obs_dim: int, act_dim: int) -> common.Policy:
    """`BRACPlus.act` apart from training, with the networks it reads (untrained): tools/evaluate.py
    loads a model.pt into it."""
    return common.Policy(BRACPlus.act, args, actor=TanhGaussian(obs_dim, act_dim, args.actor_hidden_dim))


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
    chosen = fill_domain_defaults(args)
    if chosen:
        print(f"[brac_plus] per-domain defaults for {args.env}: {chosen}")

    data = common.load_dataset(args.env, device)
    common.transform_rewards(data, args.reward_transform)
    obs_mean, obs_std = common.normalize_obs(data) if args.normalize_states else (None, None)
    buffer = common.ReplayBuffer(data)
    # the fixed subset of states for the per-state KL statistics (see the docstring)
    subset = torch.randperm(len(data), device=device)[:args.kl_states]
    subset_obs = data.observations[subset]

    agent = BRACPlus(args, data.obs_dim, data.act_dim, device)
    run = common.Run(args, "brac_plus", data, phases=("behaviour model", "initial policy", "Q initialisation"))
    key = common.pretraining_key(args, ("bc_steps", "bc_lr", "bc_seed", "vae_hidden_dim", "n_ensembles", "batch_size"), data)
    cache_path = os.path.join(args.cache_dir or os.path.join(args.output_dir, "pretrained_cache"),
                              f"brac_plus_behavior_{key}.pt")
    if not (args.reuse_cache and common.load_pretrained(cache_path, {"behavior": agent.behavior}, device)):
        with common.separate_rng(args.bc_seed, device):
            for step in range(run.resume(agent, "behaviour model", args.bc_steps) + 1, args.bc_steps + 1):
                metrics = agent.train_behavior(buffer.sample(args.batch_size))
                if step % args.log_every == 0 or step == args.bc_steps:
                    run.log(step, metrics, phase="behaviour model")
                run.pretraining_step(step, agent, "behaviour model")
        common.save_pretrained(cache_path, {"behavior": agent.behavior})
    agent.behavior.requires_grad_(False)
    target_entropy = agent.set_target_entropy(subset_obs, data.actions[subset])
    print(f"[brac_plus] entropy {'upper' if args.regularizer == 'kl' else 'lower'} bound H_0 = {target_entropy:.3f}")
    start = run.resume(agent)  # a checkpoint of the main loop holds pi_0, Q_0 and the thresholds
    if start == 0:
        run.reset_clock()  # each phase's progress lines report that phase's own speed
        for step in range(run.resume(agent, "initial policy", args.pretrain_steps) + 1, args.pretrain_steps + 1):
            metrics = agent.train_initial_policy(buffer.sample(args.batch_size))
            if step % args.log_every == 0 or step == args.pretrain_steps:
                run.log(step, metrics, phase="initial policy")
            run.pretraining_step(step, agent, "initial policy")
        kl_threshold, gp_threshold = agent.set_thresholds(subset_obs)
        print(f"[brac_plus] KL threshold delta_KL = {kl_threshold:.3f}, first gradient-penalty threshold "
              f"eps_GP = {gp_threshold:.3f}")
        run.reset_clock()
        for step in range(run.resume(agent, "Q initialisation", args.pretrain_steps) + 1, args.pretrain_steps + 1):
            metrics = agent.train_initial_critic(buffer.sample(args.batch_size))
            if step % args.log_every == 0 or step == args.pretrain_steps:
                run.log(step, metrics, phase="Q initialisation")
            run.pretraining_step(step, agent, "Q initialisation")
        run.reset_clock()
    metrics = {}  # the latest value of each metric (an actor's from its last update)
    for step in range(start + 1, args.total_steps + 1):
        metrics |= agent.train(buffer.sample(args.batch_size))
        if step % args.epoch_steps == 0:
            agent.update_gp_threshold(subset_obs)
        if step % args.log_every == 0 or step == args.total_steps:
            run.log(step, metrics)
        if step % args.eval_every == 0 or step == args.total_steps:
            run.evaluate(step, agent.act, obs_mean, obs_std)
            run.checkpoint(step, agent)
        run.stop_if_signalled(step, agent)
    run.finish({"obs_mean": obs_mean, "obs_std": obs_std, **agent.state_dict()})
