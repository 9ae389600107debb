"""ARQ: Goo & Niekum, "Know Your Boundaries: The Necessity of Explicit Behavioral Cloning in Offline
RL" (Action-Restricted Q-learning), arXiv 2206.00695, 2022.

Implements Algorithm 1, in four stages:
1. Score model s_psi(a|s) ~ grad_a log beta(a|s) (appendix A.2, after Song et al. 2021): VP-SDE
   dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw, beta(t) = 0.1 + t (20 - 0.1), on standardised actions
   conditioned on standardised states; it predicts the noise, s_psi = -eps_hat / sigma(t), trained by
   E_(t ~ U(1e-5, 1)) ||eps_hat(x_t, s, t) - z||^2, with an EMA of the weights used afterwards.
2. Support set: for every dataset state, N actions a ~ beta_psi(.|s) with their log-likelihoods from
   the probability-flow ODE, log p0(x0) = log N(x1; 0, I) + int div f~(x(t), t) dt (in the
   standardised action space, as the code). A sample is kept if its log-likelihood > -5; the
   dataset's own action is always kept (the code's never_filter_gt_acs). Samples are stored,
   scored and given to Q as sampled, unclipped, even where they leave the action box [-1, 1]
   (code: sampling.py stores the sampler's output, train_arq.py feeds it to Q). Samplers (--sampler):
     pc:  the paper's predictor-corrector, reverse-SDE Euler-Maruyama steps on t in [1e-3, 1], each
          after one Langevin corrector step of size 2 (snr ||z|| / ||s_psi||)^2;
     ode: the probability-flow ODE solved exactly to first order (DDIM, eta = 0), far fewer calls.
3. Q-learning, eq. (5), twin Q with a target network:
     y = r + gamma (1 - d) max( K-th_(a' in supp(s')) min_i Q_targ_i(s', a'),  min_i Q_targ_i(s', a'_D) )
   a'_D the dataset's action at s'; K-th largest over the kept support (its smallest member when
   fewer than K survive); the max with the dataset action is the code's floor.
4. Policy (--policy):
     awr:      L = -E_(s,a)~D[min(exp(alpha A(s,a)), 100) log pi(a|s)], A(s,a) = Q(s,a) minus the mean
               of Q(s,.) over the kept support (dataset action included), Q = min of the target Qs;
               IQL's Gaussian policy (tanh on the mean, state-independent log-std, mean action at
               evaluation); on antmaze a deterministic policy, the mean network without tanh, with
               L = 1/2 E[w mean_j (mu_j(s) - a_j)^2] (the code's DeterministicPolicy,
               squash_output=False), its output clipped to [-1, 1] at evaluation.
     implicit: eq. (6): at every evaluation step N actions are sampled for each visited state,
               clipped to the action box, filtered by the likelihood of the clipped action as in
               stage 2, scored with the first target Q (the code's q0, Q_targ_1 here), and one is
               drawn from softmax(alpha A), A = Q minus its mean over the kept samples. It costs
               eval_episodes * N samples per environment step (docs/results.md, "Speed").

Hyperparameters (paper tables A.1-A.3 and hiwonjoon/ARQ-public): state and action std floored at
0.05; score network concat(x, s) -> 256, 3 residual blocks of two Dense(256) with swish, a Gaussian
Fourier time embedding (scale 30) added before every activation; Adam 1e-4, batch 512, EMA 0.999,
--bc-steps 1M (300k kitchen, adroit); N 30; pc 500 steps, snr 0.16; Hutchinson divergence with 10
Rademacher vectors above --exact-divergence-max-dim; K 9 (3 antmaze); Q and policy 2x256 ReLU, critic
Adam 3e-4 (1e-4 kitchen, adroit), policy Adam 3e-4, tau 0.005; alpha 1 (locomotion, kitchen), 10
(adroit, antmaze); rewards * 1000 / (max - min episode return) on halfcheetah/hopper/walker2d,
r - 1 on antmaze, else untouched. Every layer starts as a Keras Dense layer (the code is TF2):
Glorot-uniform weights, zero biases. The score model and the support are cached in --cache-dir
(keyed by the data, their flags and --score-seed, not --seed), so seeds and runs share them; the
support's progress is saved every 5% and on a stop signal, and the same command goes on from there.

Deviations:
- Policy and Q are trained together, each Q step followed by one AWR step with the current target
  Qs (the code does this when given a policy; Algorithm 1 runs them one after the other).
- Fixed-step RK4 (--likelihood-steps, grid quadratic in t) instead of the code's scipy RK45
  (tools/diagnostics/bench_arq_sampler.py measures the difference); exact divergence for small |A|.
- pc's Langevin step averages the norms over the N samples of one state (the code: per sample,
  which diverges where the score vanishes; Song et al.: over the whole batch, coupling states).
- The adroit/robomimic score-model ensembles (3 members) are not implemented.
- --batch-size stays the shared default 256 (paper: 512 for Q and policy).
- States at which a time-limit truncation ends an episode have no dataset action: they get a
  support of their own and keep their most likely sample if none passes the threshold.
- The critic loss is MSE(Q1, y) + MSE(Q2, y), the code's is half of it (0.5 (q - y)^2 per Q); Adam
  makes the step the same up to its epsilon (docs/implementation_notes.md, "Adam's epsilon").
- Fourier time features use 2 pi, the code 2 * 3.1415: frequencies 3e-5 (relative) larger here, a
  feature differs by at most 0.02 over t in [0, 1]. sigma(t) = sqrt(-expm1(-int beta)) is exact in
  float32 at small t, where the code's sqrt(1 - exp(-int beta)) is off by 0.6% at t = 1e-5 (0.1% at
  1e-4, 1e-4 at 1e-3).
- torch's Adam (epsilon 1e-8 after bias correction) for Keras' (epsilon 1e-7 on the uncorrected
  sqrt(v)): docs/implementation_notes.md, "Adam's epsilon".
"""

import contextlib
import copy
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

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
    # --- ARQ: score model ---
    bc_steps: Optional[int] = None
    """score-model training steps (default per domain: 300k kitchen/adroit, else 1M)"""
    score_lr: float = 1e-4
    """Adam learning rate of the score model"""
    score_batch_size: int = 512
    """(state, action) pairs per score-model step"""
    score_hidden_dim: int = 256
    """width of the score network"""
    score_blocks: int = 3
    """residual blocks (two Dense layers each) of the score network"""
    fourier_scale: float = 30.0
    """std of the random Gaussian Fourier frequencies of the time embedding"""
    ema: float = 0.999
    """decay of the exponential moving average of the score-model weights"""
    beta_min: float = 0.1
    """beta(0) of the VP-SDE"""
    beta_max: float = 20.0
    """beta(1) of the VP-SDE"""
    score_seed: int = 0
    """seed of the score model and the support set (not --seed, so that seeds share the cache)"""
    # --- ARQ: support set ---
    n_support: int = 30
    """N, actions sampled per dataset state"""
    log_likelihood_threshold: float = -5.0
    """log epsilon: samples with log-likelihood <= this are dropped (standardised action space)"""
    sampler: Literal["pc", "ode"] = "pc"
    """pc (the paper's predictor-corrector) or ode (probability-flow ODE, DDIM solver; fast)"""
    sampler_steps: Optional[int] = None
    """time steps of the sampler (default: 500 pc, 20 ode)"""
    snr: float = 0.16
    """signal-to-noise ratio of the Langevin corrector (pc)"""
    likelihood_steps: int = 20
    """RK4 steps of the likelihood ODE"""
    exact_divergence_max_dim: int = 10
    """exact divergence up to this action dimension, Hutchinson above"""
    hutchinson_probes: int = 10
    """Rademacher vectors of the Hutchinson divergence estimate"""
    sample_batch_states: int = 256
    """states sampled at once (times N actions) while generating the support"""
    cache_dir: Optional[str] = None
    """where the score model and the support are cached (default <output_dir>/arq_support_cache)"""
    # --- ARQ: Q-learning and policy ---
    kth: Optional[int] = None
    """K of the K-th largest backup (default per domain: 3 antmaze, else 9)"""
    policy: Literal["awr", "implicit"] = "awr"
    """awr (a policy network) or implicit (resample the support with softmax(alpha * A))"""
    alpha: Optional[float] = None
    """inverse temperature of AWR and of the implicit policy (default: 10 adroit/antmaze, else 1)"""
    deterministic_policy: Optional[bool] = None
    """AWR with a deterministic policy and weighted squared error (default: antmaze only)"""
    reward_transform: Optional[common.RewardTransform] = None
    """reward transform (default: minus-one antmaze, return-range hopper/walker2d/halfcheetah,
    else none)"""
    max_weight: float = 100.0
    """advantage weights are clipped at this value"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak step of the target critic (paper: polyak coefficient 0.995)"""
    critic_lr: Optional[float] = None
    """Adam learning rate of the critic (default: 1e-4 kitchen/adroit, else 3e-4)"""
    actor_lr: float = 3e-4
    """Adam learning rate of the AWR policy"""
    hidden_dim: int = 256
    """width of the two hidden layers of critic and policy"""
    normalize_states: bool = False
    """standardise the Q and policy networks' states with the dataset's mean and std (the code feeds them raw states)"""


def check_args(args: Args) -> None:
    """This file's own flags, right after parsing (common.check_args checks the shared ones)."""
    common.check_positive(args, "bc_steps", "score_lr", "score_batch_size", "score_hidden_dim", "score_blocks",
                          "fourier_scale", "beta_min", "n_support", "sampler_steps", "likelihood_steps",
                          "hutchinson_probes", "sample_batch_states", "kth", "max_weight", "critic_lr", "actor_lr",
                          "hidden_dim")
    common.check_positive(args, "snr", "exact_divergence_max_dim", "alpha", zero=True)
    common.check_interval(args, "ema", 0, 1, "[)")
    if args.beta_max < args.beta_min:
        raise common.UserError(f"--beta-max must be at least --beta-min ({args.beta_min}), got {args.beta_max}")
    common.check_seed(args, "score_seed")
    common.check_interval(args, "gamma", 0, 1, "[)")
    common.check_interval(args, "tau", 0, 1, "(]")


def domain_defaults(dataset_id: str) -> dict:
    """The paper's per-domain hyperparameters (tables A.1-A.3), chosen from the dataset id's task
    (common.dataset_task).

    Rewards follow the official offline_dataset.py: r - 1 for antmaze, * 1000 / (return range) for
    hopper/walker2d/halfcheetah only, untouched for everything else.
    Tasks the authors did not run (ant, pointmaze, pendulum, ...): locomotion settings, rewards untouched."""
    task = common.dataset_task(dataset_id)
    if task == "antmaze":
        return {"bc_steps": 1_000_000, "kth": 3, "alpha": 10.0, "deterministic_policy": True,
                "reward_transform": "minus-one", "critic_lr": 3e-4}
    if task == "kitchen":
        return {"bc_steps": 300_000, "kth": 9, "alpha": 1.0, "deterministic_policy": False,
                "reward_transform": "none", "critic_lr": 1e-4}
    if task in ("door", "hammer", "pen", "relocate"):
        return {"bc_steps": 300_000, "kth": 9, "alpha": 10.0, "deterministic_policy": False,
                "reward_transform": "none", "critic_lr": 1e-4}
    transform = "return-range" if task in ("halfcheetah", "hopper", "walker2d") else "none"
    return {"bc_steps": 1_000_000, "kth": 9, "alpha": 1.0, "deterministic_policy": False,
            "reward_transform": transform, "critic_lr": 3e-4}


DEFAULT_SAMPLER_STEPS = {"pc": 500, "ode": 20}


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def glorot_(weight: torch.Tensor, bias: torch.Tensor, fan_in: int, fan_out: int) -> None:
    """Keras' Dense defaults, kept by every network of the authors' TF2 code (arq/modules/mlp.py,
    ScoreNet in arq/algo/sde_conditional.py): weights U(+-sqrt(6 / (fan_in + fan_out))), biases 0."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    weight.uniform_(-bound, bound)
    bias.zero_()


def dense(in_dim: int, out_dim: int, output: bool = False) -> nn.Linear:
    """A linear layer initialised as a Keras Dense layer; output=True: fp32 under --precision bf16."""
    layer = (common.OutputLinear if output else nn.Linear)(in_dim, out_dim)
    glorot_(layer.weight, layer.bias, in_dim, out_dim)
    return layer


def mlp(in_dim: int, out_dim: int, hidden_dim: int, n_hidden: int) -> nn.Sequential:
    """n_hidden ReLU layers of width hidden_dim, then a linear output layer (fp32 under --precision bf16)."""
    layers, d = [], in_dim
    for _ in range(n_hidden):
        layers += [dense(d, hidden_dim), nn.ReLU()]
        d = hidden_dim
    return nn.Sequential(*layers, dense(d, out_dim, output=True))


class Actor(nn.Module):
    """Gaussian policy: tanh on the mean, state-independent log-std in [-5, 2]. The deterministic
    policy (antmaze) is `mean` alone, without tanh."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.mean = mlp(obs_dim, act_dim, hidden_dim, 2)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def log_prob(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        mean = torch.tanh(self.mean(obs))
        std = self.log_std.clamp(-5.0, 2.0).exp()
        # validate_args=False: the distribution's argument checks would sync the device on every call
        return torch.distributions.Normal(mean, std, validate_args=False).log_prob(act).sum(-1)


def ensemble_mlp(n: int, in_dim: int, out_dim: int, hidden_dim: int, n_hidden: int) -> common.EnsembleMLP:
    """common.ensemble_mlp with every layer initialised as a Keras Dense layer (glorot_)."""
    net = common.ensemble_mlp(n, in_dim, out_dim, hidden_dim, n_hidden)
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, common.EnsembleLinear):
                glorot_(layer.weight, layer.bias, *layer.weight.shape[1:])
    return net


class Critic(nn.Module):
    """Twin Q networks as a 2-member ensemble: every layer is one batched matmul for both."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = ensemble_mlp(2, obs_dim + act_dim, 1, hidden_dim, 2)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """(2, N): Q1(s, a) and Q2(s, a), which unpack as `q1, q2 = critic(obs, act)`."""
        x = torch.cat([obs, act], dim=-1)
        return self.net(x.expand(2, -1, -1)).squeeze(-1)


class ScoreNet(nn.Module):
    """eps_hat(x, s, t): residual MLP with a Gaussian Fourier time embedding added before every swish."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, n_blocks: int, fourier_scale: float):
        super().__init__()
        self.register_buffer("freqs", torch.randn(hidden_dim // 2) * fourier_scale)  # fixed, not trained
        self.time = dense(2 * (hidden_dim // 2), hidden_dim)
        self.inp = dense(act_dim + obs_dim, hidden_dim)
        self.blocks = nn.ModuleList(nn.ModuleList([dense(hidden_dim, hidden_dim), dense(hidden_dim, hidden_dim)])
                                    for _ in range(n_blocks))
        self.out = dense(hidden_dim, act_dim, output=True)

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        phase = 2.0 * math.pi * t.unsqueeze(-1) * self.freqs
        emb = self.time(torch.cat([phase.sin(), phase.cos()], -1))
        h = self.inp(torch.cat([x, s], -1))
        for l1, l2 in self.blocks:
            h = h + l2(F.silu(l1(F.silu(h + emb)) + emb))
        return self.out(h)


def drawn(sample, shape, device: torch.device, gen: torch.Generator, *args) -> torch.Tensor:
    """sample(*args, shape) from `gen` on `device`, drawn on the generator's own device: the support
    is generated with a generator on the training device, evaluation with one on the CPU."""
    return sample(*args, shape, generator=gen, device=gen.device).to(device)


class ScoreModel(nn.Module):
    """Conditional VP-SDE model of beta(a|s) on standardised states and actions (stage 1).
    Sampling and likelihood use the EMA network and work in the standardised action space."""

    T_SAMPLE_MIN = 1e-3  # smallest time of the samplers (Song et al.; appendix A.2)
    T_LIKELIHOOD_MIN = 1e-5  # start of the likelihood ODE (official code)

    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        self.act_dim, self.beta_min, self.beta_max = act_dim, args.beta_min, args.beta_max
        self.net = ScoreNet(obs_dim, act_dim, args.score_hidden_dim, args.score_blocks, args.fourier_scale)
        self.ema_net = copy.deepcopy(self.net).requires_grad_(False)
        for name, dim in (("obs", obs_dim), ("act", act_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))

    def set_normalization(self, obs: torch.Tensor, act: torch.Tensor) -> None:
        """Mean and std (floored at 0.05) of the states and actions it models, as the official code:
        numpy's std, which divides by n (torch's default divides by n - 1)."""
        for name, x in (("obs", obs), ("act", act)):
            getattr(self, f"{name}_mean").copy_(x.mean(0))
            getattr(self, f"{name}_std").copy_(x.std(0, correction=0).clamp(min=0.05))

    def to_x(self, act: torch.Tensor) -> torch.Tensor:
        return (act - self.act_mean) / self.act_std

    def to_action(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.act_std + self.act_mean

    def condition(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_mean) / self.obs_std

    # VP-SDE: beta(t) linear; x_t | x_0 ~ N(alpha(t) x_0, sigma(t)^2 I).
    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_alpha = -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return log_alpha.exp(), (-torch.expm1(2.0 * log_alpha)).sqrt()

    def loss(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Denoising score matching with epsilon-prediction, t ~ U(1e-5, 1)."""
        x0, s = self.to_x(act), self.condition(obs)
        t = torch.rand(len(x0), device=x0.device) * (1.0 - self.T_LIKELIHOOD_MIN) + self.T_LIKELIHOOD_MIN
        alpha, sigma = self.alpha_sigma(t)
        z = torch.randn_like(x0)
        eps = self.net(alpha[:, None] * x0 + sigma[:, None] * z, s, t)
        return (eps - z).pow(2).sum(-1).mean()

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        torch._foreach_lerp_(list(self.ema_net.parameters()), list(self.net.parameters()), 1.0 - decay)

    def score(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -self.ema_net(x, s, t) / self.alpha_sigma(t)[1][:, None]

    @torch.no_grad()
    def sample_pc(self, s: torch.Tensor, steps: int, snr: float, group: int, gen: torch.Generator) -> torch.Tensor:
        """Predictor-corrector: one Langevin step, then one reverse-SDE Euler-Maruyama step, per time.
        The Langevin step size uses norms averaged over each `group` of consecutive rows (the samples
        of one state): per-sample norms (the official configs) make the step unbounded wherever the
        score vanishes, which in one dimension throws samples far out; per-batch norms (Song et al.)
        would make a state's samples depend on the other states in the batch."""
        x = drawn(torch.randn, (len(s), self.act_dim), s.device, gen)
        x_mean = x
        times = torch.linspace(1.0, self.T_SAMPLE_MIN, steps, device=s.device)
        dt = (1.0 - self.T_SAMPLE_MIN) / max(steps - 1, 1)

        def group_norm(v):
            return v.norm(dim=-1).view(-1, group).mean(1).repeat_interleave(group)[:, None]

        for t in times:
            tt = t.expand(len(s))
            grad = self.score(x, s, tt)
            noise = drawn(torch.randn, x.shape, s.device, gen)
            step = 2.0 * (snr * group_norm(noise) / group_norm(grad)) ** 2
            x = x + step * grad + (2.0 * step).sqrt() * noise
            beta = self.beta(t)
            x_mean = x + (0.5 * beta * x + beta * self.score(x, s, tt)) * dt
            x = x_mean + (beta * dt) ** 0.5 * drawn(torch.randn, x.shape, s.device, gen)
        return x_mean

    @torch.no_grad()
    def sample_ode(self, s: torch.Tensor, steps: int, gen: torch.Generator) -> torch.Tensor:
        """Probability-flow ODE, DDIM (eta = 0) steps: x' = alpha' x0_hat + sigma' eps_hat."""
        x = drawn(torch.randn, (len(s), self.act_dim), s.device, gen)
        times = torch.linspace(1.0, self.T_SAMPLE_MIN, steps, device=s.device)
        for i, t in enumerate(times):
            alpha, sigma = self.alpha_sigma(t)
            eps = self.ema_net(x, s, t.expand(len(s)))
            x0 = (x - sigma * eps) / alpha
            if i + 1 == steps:
                return x0
            alpha_next, sigma_next = self.alpha_sigma(times[i + 1])
            x = alpha_next * x0 + sigma_next * eps
        return x

    def sample(self, s: torch.Tensor, sampler: str, steps: int, snr: float, group: int,
               gen: torch.Generator) -> torch.Tensor:
        if sampler == "pc":
            return self.sample_pc(s, steps, snr, group, gen)
        return self.sample_ode(s, steps, gen)

    def _drift_and_divergence(self, x, s, t, probes):
        """Probability-flow drift f~ = -1/2 beta (x + s_psi) and its divergence in x; exact with
        probes None (one backward pass per dimension), else Hutchinson with the given probes."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            eps = self.ema_net(x, s, t)
            if probes is None:
                div_eps = sum(torch.autograd.grad(eps[:, i].sum(), x, retain_graph=i + 1 < self.act_dim)[0][:, i]
                              for i in range(self.act_dim))
            else:
                div_eps = sum((torch.autograd.grad((eps * z).sum(), x, retain_graph=k + 1 < len(probes))[0] * z).sum(-1)
                              for k, z in enumerate(probes)) / len(probes)
        beta, sigma = self.beta(t)[:, None], self.alpha_sigma(t)[1][:, None]
        drift = -0.5 * beta * (x.detach() - eps.detach() / sigma)
        div = -0.5 * beta[:, 0] * (self.act_dim - div_eps.detach() / sigma[:, 0])
        return drift, div

    def log_likelihood(self, s: torch.Tensor, x: torch.Tensor, steps: int, exact_max_dim: int,
                       n_probes: int, gen: torch.Generator) -> torch.Tensor:
        """log p_0(x) of standardised actions x: RK4 on (x, int div) from t = 1e-5 to 1, `steps` steps."""
        probes = None
        if self.act_dim > exact_max_dim:
            probes = drawn(torch.randint, (n_probes, *x.shape), x.device, gen, 0, 2).float() * 2 - 1
        # Quadratic time grid: the drift's eps_hat / sigma(t) term is stiff near t = 0; on the toy of
        # tests/test_arq.py 20 steps are within 0.2 nats of 400, a uniform grid is off by up to 6.
        u = torch.linspace(0.0, 1.0, steps + 1, device=x.device)
        times = self.T_LIKELIHOOD_MIN + (1.0 - self.T_LIKELIHOOD_MIN) * u**2
        integral = torch.zeros(len(x), device=x.device)
        for t0, t1 in zip(times[:-1], times[1:]):
            h = t1 - t0
            k1, d1 = self._drift_and_divergence(x, s, t0.expand(len(x)), probes)
            k2, d2 = self._drift_and_divergence(x + 0.5 * h * k1, s, (t0 + 0.5 * h).expand(len(x)), probes)
            k3, d3 = self._drift_and_divergence(x + 0.5 * h * k2, s, (t0 + 0.5 * h).expand(len(x)), probes)
            k4, d4 = self._drift_and_divergence(x + h * k3, s, t1.expand(len(x)), probes)
            x = x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
            integral = integral + h / 6.0 * (d1 + 2 * d2 + 2 * d3 + d4)
        prior = -0.5 * (x.pow(2).sum(-1) + self.act_dim * math.log(2.0 * math.pi))
        return prior + integral

    def sample_with_likelihood(self, obs: torch.Tensor, n: int, args: Args, gen: torch.Generator,
                               clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """n actions per state and their log-likelihoods (standardised space): (B, n, A), (B, n).
        clip False (the support, arq/scripts/sampling.py): the sample as drawn, possibly outside
        [-1, 1], and its likelihood. clip True (the implicit policy, build_pi in
        arq/algo/sde_conditional.py): clipped to [-1, 1] first, and the likelihood of the clipped action."""
        s = self.condition(obs).repeat_interleave(n, 0)
        x = self.sample(s, args.sampler, args.sampler_steps, args.snr, n, gen)
        act = self.to_action(x)
        if clip:
            act = act.clamp(-1.0, 1.0)
            x = self.to_x(act)
        ll = self.log_likelihood(s, x, args.likelihood_steps, args.exact_divergence_max_dim,
                                 args.hutchinson_probes, gen)
        return act.view(len(obs), n, -1), ll.view(len(obs), n)


# ----------------------------------------------------------------------------------------------
# Support set (stage 2)
# ----------------------------------------------------------------------------------------------
class Support(NamedTuple):
    """Per support row: slot 0 holds the dataset action (invalid on rows without one), slots 1..N
    the samples; `next_row[i]` is the row of transition i's next state."""

    actions: torch.Tensor  # (S, N + 1, A)
    valid: torch.Tensor  # (S, N + 1) bool
    next_row: torch.Tensor  # (num transitions,) long


def support_states(data: common.OfflineData) -> tuple[torch.Tensor, torch.Tensor]:
    """The states that need a support: every dataset state (rows 0..n-1, in transition order) and the
    final state of every episode that did not terminate (rows n..); plus each transition's next row."""
    n = len(data.observations)
    last = torch.as_tensor(data.episode_starts + data.episode_lengths - 1, device=data.observations.device)
    open_end = last[data.terminals[last] == 0]
    next_row = torch.arange(1, n + 1, device=last.device)
    next_row[last] = last  # terminal transitions: never bootstrapped, any row will do
    next_row[open_end] = n + torch.arange(len(open_end), device=last.device)
    return torch.cat([data.observations, data.next_observations[open_end]]), next_row


def build_support(dataset_actions: torch.Tensor, samples: torch.Tensor, log_likelihoods: torch.Tensor,
                  threshold: float, next_row: torch.Tensor) -> Support:
    """Keep samples with log-likelihood > threshold; the dataset action (rows < len(dataset_actions))
    always; on rows without a dataset action, the most likely sample if none passes."""
    n_rows, n_data = samples.shape[0], dataset_actions.shape[0]
    keep = log_likelihoods > threshold
    has_data = torch.arange(n_rows, device=samples.device) < n_data
    best = F.one_hot(log_likelihoods.argmax(1), samples.shape[1]).bool()
    keep |= best & ~has_data[:, None] & ~keep.any(1, keepdim=True)
    data_slot = torch.zeros(n_rows, 1, samples.shape[2], device=samples.device)
    data_slot[:n_data, 0] = dataset_actions
    return Support(torch.cat([data_slot, samples], 1), torch.cat([has_data[:, None], keep], 1), next_row)


def kth_largest(values: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """K-th largest of the valid entries of each row (the smallest valid one if fewer than K are);
    every row must have one valid entry. Pure tensor ops: no host sync."""
    k = min(k, values.shape[1])
    top = torch.where(valid, values, -torch.inf).topk(k, dim=1).values
    idx = valid.sum(1, keepdim=True).clamp(max=k) - 1
    return top.gather(1, idx).squeeze(1)


class SupportBatch(NamedTuple):
    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_observations: torch.Tensor
    terminals: torch.Tensor
    support_actions: torch.Tensor  # (B, N + 1, A) at s
    support_valid: torch.Tensor
    next_support_actions: torch.Tensor  # (B, N + 1, A) at s'
    next_support_valid: torch.Tensor


class SupportReplayBuffer(common.ReplayBuffer):
    """Uniform minibatches with the support of s and of s' gathered on the device."""

    def __init__(self, data: common.OfflineData, support: Support):
        super().__init__(data)
        self.support = support

    def sample(self, batch_size: int) -> SupportBatch:
        d, sup = self.data, self.support
        idx = torch.randint(0, self.size, (batch_size,), device=d.observations.device)
        nxt = sup.next_row[idx]
        return SupportBatch(d.observations[idx], d.actions[idx], d.rewards[idx], d.next_observations[idx],
                            d.terminals[idx], sup.actions[idx], sup.valid[idx], sup.actions[nxt], sup.valid[nxt])


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
        h.update(b"|")
    return h.hexdigest()[:24]


def score_model_key(args: Args, data: common.OfflineData) -> str:
    """The dataset as loaded (not its normalised states, which round differently on each device) and
    the score model's flags."""
    fields = ("bc_steps", "score_lr", "score_batch_size", "score_hidden_dim", "score_blocks", "fourier_scale",
              "ema", "beta_min", "beta_max", "score_seed")
    precision = () if args.precision == "fp32" else (("precision", args.precision),)  # fp32 keys name none
    return _sha(args.env, data.fingerprint, data.obs_normalized, ("init", "glorot"), ("std", "1/n"),
                *[(f, getattr(args, f)) for f in fields], *precision)


def support_key(args: Args, score_digest: str, n_rows: int) -> str:
    fields = ("n_support", "sampler", "sampler_steps", "snr", "likelihood_steps", "exact_divergence_max_dim",
              "hutchinson_probes", "score_seed")
    return _sha(args.env, score_digest, n_rows, ("samples", "unclipped"),
                *[(f, getattr(args, f)) for f in fields])


def generate_support(model: ScoreModel, states: torch.Tensor, args: Args, gen: torch.Generator, partial_path: str,
                     run: common.Run | None = None, log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """N samples and log-likelihoods for every state, in batches, with a progress line every 5%.
    Hours of work on a CPU, so the rows done and `gen`'s state go to `partial_path` with every line
    and when `run` receives a stop signal: the same command goes on from there, and the result
    equals an uninterrupted generation's (another --sample-batch-states starts over)."""
    samples, lls, first = [], [], 0
    part = common.load_cache(partial_path, "cpu")  # a damaged or foreign file: from the first state
    if part is not None:
        try:
            rows, done_samples, done_lls = part["rows"], part["samples"], part["log_likelihoods"]
            if part["batch_states"] != args.sample_batch_states:  # other batches draw other noise
                raise ValueError(f"made with --sample-batch-states {part['batch_states']}")
            if not 0 < rows <= len(states) or done_samples.shape != (rows, args.n_support, model.act_dim) or \
                    done_lls.shape != (rows, args.n_support):
                raise ValueError(f"samples of shape {tuple(done_samples.shape)}")
            done_samples, done_lls = done_samples.to(states.device), done_lls.to(states.device)
            gen.set_state(part["generator"])
            samples, lls, first = [done_samples], [done_lls], rows
            log(f"[arq] support: going on from state {first} of {len(states)} ({partial_path})", flush=True)
        except Exception as exc:
            log(f"[arq] {partial_path} is unreadable or does not fit ({type(exc).__name__}: {exc}); "
                f"starting the support from the first state", flush=True)

    def save_progress(rows: int) -> None:
        samples[:], lls[:] = [torch.cat(samples)], [torch.cat(lls)]
        common.save_cache(partial_path, {"rows": rows, "batch_states": args.sample_batch_states,
                                         "samples": samples[0].cpu(), "log_likelihoods": lls[0].cpu(),
                                         "generator": gen.get_state()})

    start, next_report = time.time(), math.floor(first / len(states) / 0.05) * 0.05 + 0.05
    for i in range(first, len(states), args.sample_batch_states):
        act, ll = model.sample_with_likelihood(states[i:i + args.sample_batch_states], args.n_support, args, gen)
        samples.append(act)
        lls.append(ll)
        rows = min(i + args.sample_batch_states, len(states))
        done = rows / len(states)
        if done >= next_report or done == 1.0:
            elapsed = time.time() - start
            log(f"[arq] support {done:6.1%} of {len(states)} states | "
                f"{(rows - first) * args.n_support / max(elapsed, 1e-9) * 3600:,.0f} samples/h | "
                f"ETA {elapsed / (rows - first) * (len(states) - rows):.0f} s", flush=True)
            next_report = math.floor(done / 0.05) * 0.05 + 0.05
            if rows < len(states) and not (run is not None and run.signalled is not None):
                save_progress(rows)
        if run is not None and rows < len(states) and run.signalled is not None:
            save_progress(rows)
            run.exit(f"{rows} of {len(states)} support states; saved to {partial_path}")
    return torch.cat(samples), torch.cat(lls)


# ----------------------------------------------------------------------------------------------
# Algorithm
# ----------------------------------------------------------------------------------------------
class ARQ:
    def __init__(self, args: Args, obs_dim: int, act_dim: int, device: torch.device):
        self.args = args
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.score_seed)  # the score model must not depend on --seed (shared cache)
            self.score = ScoreModel(obs_dim, act_dim, args).to(device)
        self.score_optimizer = torch.optim.Adam(self.score.net.parameters(), lr=args.score_lr, fused=True)
        self.critic = Critic(obs_dim, act_dim, args.hidden_dim).to(device)
        self.critic_target = copy.deepcopy(self.critic)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr, fused=True)
        self.actor = None
        if args.policy == "awr":
            self.actor = Actor(obs_dim, act_dim, args.hidden_dim).to(device)
            self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr, fused=True)
        self.score_loss = common.compiled(self.score_loss, args.compile)
        self.critic_loss = common.compiled(self.critic_loss, args.compile)
        self.actor_loss = common.compiled(self.actor_loss, args.compile)
        self.train_score = common.autocast(self.train_score, args.precision, device)
        self.train = common.autocast(self.train, args.precision, device)

    def score_loss(self, batch: common.Batch) -> torch.Tensor:
        return self.score.loss(batch.observations, batch.actions)

    def train_score(self, batch: common.Batch) -> dict:
        loss = self.score_loss(batch)
        self.score_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.score_optimizer.step()
        self.score.update_ema(self.args.ema)
        return {"losses/score_loss": loss.detach()}

    def target_q(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min_i Q_targ_i(s, a) for every action of a (B, M, A) set."""
        batch_size, m = actions.shape[:2]
        q = self.critic_target(obs.repeat_interleave(m, 0), actions.flatten(0, 1))
        return torch.min(*q).view(batch_size, m)

    def critic_loss(self, batch: SupportBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """TD loss towards the k-th largest target Q over the support at s'; and Q1(s, a) and that backup."""
        args = self.args
        with torch.no_grad():
            next_q = self.target_q(batch.next_observations, batch.next_support_actions)
            backup = kth_largest(next_q, batch.next_support_valid, args.kth)
            # Official code's floor: never back up less than the dataset action's value at s'.
            backup = torch.maximum(backup, torch.where(batch.next_support_valid[:, 0], next_q[:, 0], -torch.inf))
            target = batch.rewards + args.gamma * (1.0 - batch.terminals) * backup
        q1, q2 = self.critic(batch.observations, batch.actions)
        return F.mse_loss(q1, target) + F.mse_loss(q2, target), q1, backup

    def actor_loss(self, batch: SupportBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """--policy awr: the dataset action's log-likelihood (or squared error) weighted by
        exp(alpha * its advantage over the support); and the weights."""
        args = self.args
        with torch.no_grad():
            q = self.target_q(batch.observations, batch.support_actions)  # slot 0: the dataset action
            mean_q = (q * batch.support_valid).sum(1) / batch.support_valid.sum(1)
            weights = torch.exp(args.alpha * (q[:, 0] - mean_q)).clamp(max=args.max_weight)
        if args.deterministic_policy:
            # arq/modules/policy.py, DeterministicPolicy (squash_output=False in experiments/pi.gin):
            # no tanh, half the weighted mean over the batch of the mean over the action dimensions
            error = self.actor.mean(batch.observations) - batch.actions
            return 0.5 * (weights * error.pow(2).mean(-1)).mean(), weights
        return -(weights * self.actor.log_prob(batch.observations, batch.actions)).mean(), weights

    def train(self, batch: SupportBatch) -> dict:
        args = self.args
        critic_loss, q1, backup = self.critic_loss(batch)
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), args.tau)
        metrics = {"losses/critic_loss": critic_loss.detach(), "losses/q1": q1.mean().detach(),
                   "charts/backup": backup.mean(),
                   "charts/support_kept": batch.next_support_valid.float().sum(1).mean()}
        if self.actor is None:
            return metrics

        actor_loss, weights = self.actor_loss(batch)
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()
        return {**metrics, "losses/actor_loss": actor_loss.detach(), "charts/weight": weights.mean()}

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        if self.actor is not None:
            if self.args.deterministic_policy:  # clipped to the box, as the code's Policy.__call__
                return self.actor.mean(obs).clamp(-1.0, 1.0)
            return torch.tanh(self.actor.mean(obs))
        # Implicit policy, eq. (6): a fresh support for the visited states, clipped to the box and
        # scored as the code's build_pi, then softmax(alpha * A). Its noise comes from torch's CPU
        # stream on any device (common.evaluate seeds it with the evaluation's seed).
        args, gen = self.args, torch.default_generator
        actions, ll = self.score.sample_with_likelihood(obs, args.n_support, args, gen, clip=True)
        keep = ll > args.log_likelihood_threshold
        keep |= F.one_hot(ll.argmax(1), ll.shape[1]).bool() & ~keep.any(1, keepdim=True)
        # One Q, as the code's grader (arq/algo/penalty.py): q0 loaded from q0.tf and called with its
        # default use_target=True, i.e. the first twin's target network.
        q = self.critic_target(obs.repeat_interleave(args.n_support, 0), actions.flatten(0, 1))[0]
        q = q.view(len(obs), args.n_support)
        adv = q - (q * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True)
        logits = torch.where(keep, args.alpha * adv, -torch.inf)
        # a draw from softmax(logits) by the Gumbel-max trick, from the CPU generator's uniform noise
        u = drawn(torch.rand, logits.shape, logits.device, gen).clamp_min(1e-20)
        choice = (logits - torch.log(-torch.log(u))).argmax(1)
        return actions[torch.arange(len(obs), device=obs.device), choice]

    def state_dict(self) -> dict:
        return {"actor": None if self.actor is None else self.actor.state_dict(),
                "critic": self.critic.state_dict(), "critic_target": self.critic_target.state_dict(),
                "score": self.score.state_dict()}


def make_policy(args: Args, obs_dim: int, act_dim: int) -> common.Policy:
    """`ARQ.act` apart from training, with the networks it reads (untrained): tools/evaluate.py
    loads a model.pt into it. The implicit policy reads the score model and the target critic."""
    if args.policy == "awr":
        return common.Policy(ARQ.act, args, actor=Actor(obs_dim, act_dim, args.hidden_dim))
    return common.Policy(ARQ.act, args, actor=None, score=ScoreModel(obs_dim, act_dim, args),
                         critic_target=Critic(obs_dim, act_dim, args.hidden_dim))


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
        print(f"[arq] per-domain defaults for {args.env}: {chosen}")
    args.sampler_steps = args.sampler_steps or DEFAULT_SAMPLER_STEPS[args.sampler]
    cache_dir = args.cache_dir or os.path.join(args.output_dir, "arq_support_cache")

    data = common.load_dataset(args.env, device)
    common.transform_rewards(data, args.reward_transform)
    obs_mean, obs_std = common.normalize_obs(data) if args.normalize_states else (None, None)
    buffer = common.ReplayBuffer(data)

    agent = ARQ(args, data.obs_dim, data.act_dim, device)
    run = common.Run(args, "arq", data, phases=("score model",))
    score_path = os.path.join(cache_dir, f"score_{score_model_key(args, data)}.pt")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.score_seed)  # the score model and the support do not depend on --seed
        if not common.load_pretrained(score_path, {"score": agent.score}, device):
            agent.score.set_normalization(data.observations, data.actions)
            for step in range(run.resume(agent, "score model", args.bc_steps) + 1, args.bc_steps + 1):
                metrics = agent.train_score(buffer.sample(args.score_batch_size))
                if step % args.log_every == 0 or step == args.bc_steps:
                    run.log(step, metrics, phase="score model")
                run.pretraining_step(step, agent, "score model")
            common.save_pretrained(score_path, {"score": agent.score})

        states, next_row = support_states(data)
        score_digest = common.digest(agent.score.state_dict())
        support_path = os.path.join(cache_dir, f"support_{support_key(args, score_digest, len(states))}.pt")
        cached = common.load_cache(support_path, device)  # a damaged or foreign file is only a cache miss
        if cached is not None:
            try:
                samples, log_likelihoods = cached["samples"], cached["log_likelihoods"]
                if samples.shape != (len(states), args.n_support, data.act_dim) or \
                        log_likelihoods.shape != samples.shape[:2]:
                    raise ValueError(f"samples of shape {tuple(samples.shape)}")
                print(f"[arq] reusing cached support {support_path}")
            except Exception as exc:
                print(f"[arq] cache {support_path} is unreadable or does not fit ({type(exc).__name__}); "
                      f"generating the support again", flush=True)
                cached = None
        if cached is None:
            print(f"[arq] generating the support: {len(states)} states x {args.n_support} samples, sampler "
                  f"{args.sampler} ({args.sampler_steps} steps), likelihood RK4 ({args.likelihood_steps} steps)",
                  flush=True)
            gen = torch.Generator(device).manual_seed(args.score_seed)
            partial_path = support_path.removesuffix(".pt") + ".partial.pt"
            samples, log_likelihoods = generate_support(agent.score, states, args, gen, partial_path, run)
            common.save_cache(support_path, {"samples": samples.cpu(), "log_likelihoods": log_likelihoods.cpu()})
            with contextlib.suppress(FileNotFoundError):  # another seed's run may share the cache
                os.remove(partial_path)
    support = build_support(data.actions, samples, log_likelihoods, args.log_likelihood_threshold, next_row)
    kept = support.valid[:, 1:].float().mean().item()
    print(f"[arq] support: {kept:.1%} of the samples have log-likelihood > {args.log_likelihood_threshold}")
    agent.score.requires_grad_(False)
    buffer = SupportReplayBuffer(data, support)

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
