"""BRAC+ (algorithms/brac_plus.py): the KL bound, the multipliers and the gate on hand-made inputs,
and the script end to end."""

import json
import math
import os

import pytest
import torch

import common

from conftest import ROOT, check_curves, check_saved_model, load_algorithm, run_script


bp = load_algorithm("brac_plus")


def small_agent(**overrides):
    args = bp.Args(hidden_dim=16, actor_hidden_dim=16, vae_hidden_dim=16, n_ensembles=2, **overrides)
    torch.manual_seed(0)
    return bp.BRACPlus(args, obs_dim=3, act_dim=2, device=torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# The KL upper bound of eq. (7)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_kl_bound_is_above_a_monte_carlo_kl_to_the_vae_marginal(seed):
    """KL(pi || pi_b) with log pi_b(u|s) = log E_{z~N(0,I)} p(u|z,s) by importance sampling."""
    torch.manual_seed(seed)
    vae = bp.VAEEnsemble(obs_dim=2, act_dim=1, hidden_dim=32, n_ensembles=1)
    with torch.no_grad():  # a decoder whose mean depends strongly on z: a multi-modal-ish marginal
        vae.decoder[-1].weight.mul_(8.0)
    obs = torch.randn(1, 2)
    pi_mean, pi_std = torch.tensor([[0.3]]), torch.tensor([[0.4]])
    n_u, n_z = 4000, 4000
    u = pi_mean + pi_std * torch.randn(n_u, 1)
    with torch.no_grad():
        bound = vae.kl_upper_bound(obs.expand(n_u, -1), u, pi_mean.expand(n_u, -1), pi_std.expand(n_u, -1),
                                   n_latent=32).mean()
        z = torch.randn(1, n_z, 2)
        p_mean, p_std = vae.decode(obs.expand(n_z, -1), z)  # (1, n_z, 1)
        log_p = torch.distributions.Normal(p_mean[0, :, 0], p_std[0, :, 0]).log_prob(u)  # (n_u, n_z)
        log_pi_b = torch.logsumexp(log_p, 1) - math.log(n_z)
        log_pi = torch.distributions.Normal(pi_mean[0, 0], pi_std[0, 0]).log_prob(u[:, 0])
        kl_mc = (log_pi - log_pi_b).mean()
    assert kl_mc > 0.05  # a non-trivial KL, so the comparison means something
    assert bound > kl_mc + 0.05


class LinearDecoder(torch.nn.Module):
    """p(u|z,s) = N(W z + C s, diag(sigma^2)), W = [diag(w) 0]: latents >= |A| are unused."""

    def __init__(self, w, c, sigma):
        super().__init__()
        self.w, self.c, self.sigma = w, c, sigma

    def forward(self, x):  # x = cat(z, s), (B, N, 2|A| + obs_dim)
        act_dim = len(self.w)
        z, s = x[..., :act_dim], x[..., 2 * act_dim:]
        mean = self.w * z + s @ self.c.T
        return torch.cat([mean, torch.log(torch.expm1(self.sigma)).expand_as(mean)], -1)


class ExactEncoder(torch.nn.Module):
    """q(z|u,s) = the true posterior of LinearDecoder under the N(0, I) prior, in closed form."""

    def __init__(self, w, c, sigma):
        super().__init__()
        self.w, self.c, self.sigma = w, c, sigma

    def forward(self, x):  # x = cat(u, s), (B, N, |A| + obs_dim)
        act_dim = len(self.w)
        u, s = x[..., :act_dim], x[..., act_dim:]
        precision = 1.0 + self.w**2 / self.sigma**2
        mean = (self.w / self.sigma**2) * (u - s @ self.c.T) / precision
        std = precision.rsqrt().expand_as(mean)
        mean = torch.cat([mean, torch.zeros_like(mean)], -1)
        std = torch.cat([std, torch.ones_like(std)], -1)
        return torch.cat([mean, torch.log(torch.expm1(std))], -1)


def linear_gaussian_vae():
    w, c, sigma = torch.tensor([1.5, -0.7]), torch.tensor([[0.5, -1.0, 0.2], [0.0, 0.3, 1.0]]), torch.tensor([0.6, 0.9])
    vae = bp.VAEEnsemble(obs_dim=3, act_dim=2, hidden_dim=8, n_ensembles=1)
    vae.encoder, vae.decoder = ExactEncoder(w, c, sigma), LinearDecoder(w, c, sigma)
    return vae, w, c, sigma


def test_exact_posterior_makes_the_elbo_the_marginal_likelihood():
    """Checks the construction above (and neg_elbo, the VAE's training loss): with the true posterior,
    E_z[-log p(u|z,s)] + KL(q || prior) = -log pi_b(u|s) with pi_b = N(C s, diag(w^2 + sigma^2))."""
    vae, w, c, sigma = linear_gaussian_vae()
    torch.manual_seed(0)
    obs, u = torch.randn(1, 3), torch.tensor([[0.4, -1.2]])
    n = 200_000
    with torch.no_grad():
        nll, kl = vae.neg_elbo(obs.expand(n, -1), u.expand(n, -1))
    marginal = torch.distributions.Normal(obs @ c.T, (w**2 + sigma**2).sqrt())
    assert (nll + kl).mean().item() == pytest.approx(-marginal.log_prob(u).sum().item(), abs=5e-3)


@pytest.mark.parametrize("policy_std", [0.5, 0.1, 1e-3])
def test_kl_bound_with_the_exact_posterior(policy_std):
    """With q the true posterior the bound is the exact KL(pi || pi_b) plus the closed-form term that
    eq. (7)'s swap of u for a fresh u' ~ pi in the decoder term adds:
        sum_i s_i^2 w_i^2 / (sigma_i^2 (w_i^2 + sigma_i^2))  (s = policy std),
    which vanishes as the policy becomes deterministic: the bound is then tight."""
    vae, w, c, sigma = linear_gaussian_vae()
    torch.manual_seed(1)
    obs = torch.randn(1, 3)
    pi_mean, pi_std = torch.tensor([[0.8, -0.5]]), torch.full((1, 2), policy_std)
    n = 100_000
    u = pi_mean + pi_std * torch.randn(n, 2)
    with torch.no_grad():
        bound = vae.kl_upper_bound(obs.expand(n, -1), u, pi_mean.expand(n, -1), pi_std.expand(n, -1), n_latent=4)
    marginal = torch.distributions.Normal(obs @ c.T, (w**2 + sigma**2).sqrt())
    exact_kl = torch.distributions.kl_divergence(torch.distributions.Normal(pi_mean, pi_std), marginal).sum()
    swap_term = (pi_std**2 * w**2 / (sigma**2 * (w**2 + sigma**2))).sum()
    assert bound.mean().item() == pytest.approx((exact_kl + swap_term).item(), rel=2e-3, abs=2e-3)
    if policy_std < 0.01:
        assert bound.mean().item() == pytest.approx(exact_kl.item(), rel=1e-3)


def test_kl_bound_averages_the_ensemble_members():
    torch.manual_seed(0)
    vae = bp.VAEEnsemble(obs_dim=3, act_dim=2, hidden_dim=16, n_ensembles=3)
    obs, u = torch.randn(5, 3), torch.randn(5, 2)
    mean, std = torch.randn(5, 2), torch.rand(5, 2) + 0.2
    torch.manual_seed(7)
    with torch.no_grad():
        together = vae.kl_upper_bound(obs, u, mean, std, n_latent=2000)
        members = []
        for i in range(3):
            single = bp.VAEEnsemble(obs_dim=3, act_dim=2, hidden_dim=16, n_ensembles=1)
            for src, dst in zip(vae.parameters(), single.parameters()):
                dst.copy_(src[i:i + 1])
            members.append(single.kl_upper_bound(obs, u, mean, std, n_latent=2000))
    torch.testing.assert_close(together, torch.stack(members).mean(0), rtol=0.02, atol=0.02)


# ----------------------------------------------------------------------------------------------
# Lagrange multipliers and the gated gradient penalty
# ----------------------------------------------------------------------------------------------
def test_state_dependent_alpha_rises_where_kl_exceeds_the_threshold_and_falls_elsewhere():
    agent = small_agent()
    agent.kl_threshold.fill_(1.0)
    over, under = torch.full((16, 3), 2.0), torch.full((16, 3), -2.0)
    obs = torch.cat([over, under])
    # violations +1 and -1: zero on average, so a global multiplier would not move at all
    kl = torch.cat([torch.full((16,), 2.0), torch.full((16,), 0.0)])
    with torch.no_grad():
        before_over, before_under = agent.alpha(over).mean(), agent.alpha(under).mean()
    for _ in range(100):
        agent.update_alpha(obs, kl)
    with torch.no_grad():
        assert agent.alpha(over).mean() > before_over + 0.01
        assert agent.alpha(under).mean() < before_under - 0.01
    assert before_over.item() == pytest.approx(10.0, rel=1e-5)  # starts at --alpha-init everywhere


def test_state_dependent_alpha_recovers_after_a_long_stretch_without_violations():
    # Stepping alpha(s) itself (the earlier version) left it at ~1e-15 in the softplus tail after
    # 100 RL steps, and there it stayed while the KL bound grew to hundreds (local Hopper).
    torch.manual_seed(0)
    agent = bp.BRACPlus(bp.Args(alpha_init=1.0), obs_dim=3, act_dim=2, device=torch.device("cpu"))
    agent.kl_threshold.fill_(1.0)
    obs = torch.randn(32, 3)
    for _ in range(500):  # every state far inside the constraint
        agent.update_alpha(obs, torch.zeros(32))
    with torch.no_grad():
        assert 1e-6 < agent.alpha(obs).max().item() < 1e-3  # near the floor of 1e-4, not far below it
    for _ in range(200):  # every state violates it
        agent.update_alpha(obs, torch.full((32,), 3.0))
    with torch.no_grad():
        assert agent.alpha(obs).min().item() > 1.0


@pytest.mark.parametrize("kl_value, rises", [(3.0, True), (0.2, False)])
def test_global_alpha_follows_the_mean_violation(kl_value, rises):
    agent = small_agent(alpha_mode="global")
    agent.kl_threshold.fill_(1.0)
    obs = torch.randn(8, 3)
    before = agent.alpha(obs)[0].item()
    agent.update_alpha(obs, torch.full((8,), kl_value))
    after = agent.alpha(obs)[0].item()
    assert (after > before) == rises and after != before


def test_entropy_multiplier_keeps_an_upper_bound():
    agent = small_agent()
    agent.target_entropy = 0.0
    before = agent.beta().item()
    agent.update_beta(torch.full((4, 5), -2.0))  # entropy 2 > H_0: beta rises
    assert agent.beta().item() > before
    before = agent.beta().item()
    agent.update_beta(torch.full((4, 5), 2.0))  # entropy -2 < H_0: beta falls
    assert agent.beta().item() < before


@pytest.mark.parametrize("alpha_mode", ["state", "global"])
def test_alpha_and_beta_start_at_their_own_initial_values(alpha_mode):
    agent = small_agent(alpha_mode=alpha_mode, alpha_init=10.0, beta_init=1.0)
    assert agent.alpha(torch.randn(5, 3)).tolist() == pytest.approx([10.0] * 5, rel=1e-4)
    assert agent.beta().item() == pytest.approx(1.0, rel=1e-4)


class KnownCritic(torch.nn.Module):
    """Q_1 = 3 sum(a) + sum(s), Q_2 = sum(a^2); given (2, N, A) actions, Q_i reads act[i], as bp.Critic does."""

    def forward(self, obs, act):
        a1, a2 = act.expand(2, *act.shape[-2:])
        return 3.0 * a1.sum(-1) + obs.sum(-1), (a2**2).sum(-1)


def test_gradient_penalty_is_applied_only_where_kl_exceeds_the_threshold():
    act = torch.tensor([[0.5, -1.0], [0.0, 2.0], [1.0, 1.0], [0.2, 0.1]])
    kl = torch.tensor([2.0, 0.5, 1.0, 1.5])  # above, below, equal (not above), above
    gp = bp.gated_gradient_penalty(KnownCritic(), torch.zeros(4, 1), act, kl, 1.0, "paper")
    # ||grad Q_1||^2 = 9 * 2 = 18; ||grad Q_2||^2 = 4 * sum a^2
    expected = torch.tensor([18 + 4 * 1.25, 0.0, 0.0, 18 + 4 * 0.05])
    torch.testing.assert_close(gp, expected)


def test_gradient_penalty_reaches_the_critic_only_through_gated_states():
    torch.manual_seed(0)
    critic = bp.Critic(obs_dim=3, act_dim=2, hidden_dim=8)
    obs, act = torch.randn(6, 3), torch.randn(6, 2)
    kl = torch.tensor([5.0, 0.0, 5.0, 0.0, 0.0, 5.0])

    def grads(o, a, k):
        critic.zero_grad()
        bp.gated_gradient_penalty(critic, o, a, k, 1.0, "paper").sum().backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in critic.parameters()]

    gated = kl > 1.0
    for g_all, g_sub in zip(grads(obs, act, kl), grads(obs[gated], act[gated], kl[gated])):
        torch.testing.assert_close(g_all, g_sub)
    assert all((g == 0).all() for g in grads(obs, act, torch.zeros(6)))


def test_official_gate_is_a_normalised_softplus_on_the_norm_of_grad_min_q():
    act = torch.tensor([[-1.0, -1.0], [3.0, 1.0]])  # Q_1 < Q_2 on the first row, Q_2 < Q_1 on the second
    obs = torch.zeros(2, 1)
    kl = torch.tensor([3.0, 0.0])
    gp = bp.gated_gradient_penalty(KnownCritic(), obs, act, kl, 1.0, "official")
    gate = torch.nn.functional.softplus(kl - 1.0)
    gate = gate / gate.max()
    # grad of min: Q_1 on row 0 -> (3, 3); Q_2 on row 1 -> 2a = (6, 2)
    expected = torch.tensor([math.sqrt(18.0), math.sqrt(40.0)]) * gate
    torch.testing.assert_close(gp, expected)


def test_critic_target_mean_or_max_of_the_min_over_critics():
    rewards, terminals = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    q1 = torch.tensor([[1.0, 4.0], [5.0, 5.0]])
    q2 = torch.tensor([[2.0, 3.0], [9.0, 9.0]])  # min per sample: (1, 3) and (5, 5)
    torch.testing.assert_close(bp.critic_target(rewards, terminals, q1, q2, 0.5, False), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(bp.critic_target(rewards, terminals, q1, q2, 0.5, True), torch.tensor([2.5, 2.0]))


def test_per_task_settings_come_from_the_dataset_id():
    """examples/d4rl_bracp.py of the official code: KL margins, and halfcheetah's gradient-norm target."""
    def margin(dataset_id):
        return bp.domain_defaults(dataset_id)["kl_margin"]
    assert margin("mujoco/hopper/medium-v0") == 0.2
    assert margin("mujoco/walker2d/medium-v0") == 1.0
    assert margin("mujoco/halfcheetah/medium-v0") == 7.0
    assert margin("D4RL/halfcheetah/medium-expert-v2") == 0.2
    assert margin("D4RL/walker2d/medium-replay-v2") == 3.0
    assert margin("test/hopper/random-v0") == 3.0
    assert margin("mujoco/ant/expert-v0") == bp.DEFAULT_KL_MARGIN
    # D4RL's own files, sized local builds and the warm-up control name their kind inside a longer name
    assert margin("d4rl/hopper-medium-replay-v2") == 3.0 and margin("d4rl/hopper-medium-v2") == 0.2
    assert margin("local/hopper/medium-replay-50k-v0") == 3.0
    assert margin("local/hopper/medium-replay-no-warmup-v0") == 3.0
    assert margin("d4rl/walker2d-medium-expert-v2") == 0.2
    assert bp.domain_defaults("D4RL/halfcheetah/medium-replay-v2")["gp_target"] == 0.1
    assert bp.domain_defaults("D4RL/hopper/medium-replay-v2")["gp_target"] == 0.01


def test_thresholds_from_the_per_state_kl():
    """delta_KL from one policy sample per state (the code's compute_pi_pib_distance), eps_GP from K,
    as every later epoch's."""
    agent = small_agent(kl_margin=0.5)
    obs = torch.randn(50, 3)
    torch.manual_seed(3)
    delta, eps = agent.set_thresholds(obs)
    torch.manual_seed(3)
    kl_one = agent.state_kl(obs, k=1)
    kl = agent.state_kl(obs)
    assert delta == pytest.approx(kl_one.mean().item() + 0.5, rel=1e-5)
    assert eps == pytest.approx((kl.mean() + kl.std(correction=0)).item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [[], ["--alpha-mode", "global", "--gp-mode", "official", "--max-q-backup"],
                                     ["--regularizer", "mmd", "--gp-mode", "official", "--gp-gate", "hard"]])
def test_brac_plus_end_to_end(variant, datasets_path, tmp_path):
    out = tmp_path / "runs"
    result = run_script(
        [os.path.join(ROOT, "algorithms", "brac_plus.py"), "--env", "test/hopper/random-v0",
         "--bc-steps", "20", "--pretrain-steps", "20", "--total-steps", "40", "--eval-every", "20",
         "--log-every", "10", "--epoch-steps", "10", "--kl-states", "64", "--eval-episodes", "2",
         "--batch-size", "16", "--hidden-dim", "32", "--actor-hidden-dim", "32", "--vae-hidden-dim", "32",
         "--n-samples", "2", "--n-latent", "2", "--output-dir", str(out), "--run-name", "r", "--save-model",
         *variant],
        datasets_path, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "r" / "results.json").read_text())
    assert results["finished"] and results["algorithm"] == "brac_plus"
    assert [e["step"] for e in results["evaluations"]] == [20, 40]
    assert results["args"]["kl_margin"] == 3.0  # the random-dataset default
    for phase in ("behaviour model step 20", "initial policy step 20", "Q initialisation step 20", "step 40/40"):
        assert phase in result.stdout
    check_saved_model(out / "r")  # tools/evaluate.py gives the final evaluation again
    check_curves(out / "r", 40, phases=("behaviour model", "initial policy", "Q initialisation"))  # Q_0's q1 is apart


def test_alpha_max_must_leave_room_for_the_floor_of_alpha():
    import common
    with pytest.raises(common.UserError, match="--alpha-max"):
        small_agent(alpha_max=0.5)


# ----------------------------------------------------------------------------------------------
# The authors' code (vermouth1992/bracp's bracp.py, d4rl_bracp.py and its rlutils, vermouth1992/rl-util)
# ----------------------------------------------------------------------------------------------
def test_policy_scale_is_softplus_of_the_clipped_head_output():
    """actors.py: std = softplus(clip(x, -10, 5)), and the log-densities and KLs use that std."""
    torch.manual_seed(0)
    actor = bp.TanhGaussian(obs_dim=2, act_dim=3, hidden_dim=8)
    raw = torch.tensor([-15.0, 8.0, 0.3])
    with torch.no_grad():
        actor.net[-1].weight.zero_()
        actor.net[-1].bias.copy_(torch.cat([torch.tensor([0.1, -0.2, 0.5]), raw]))
    obs = torch.randn(4, 2)
    mean, std = actor(obs)
    expected = torch.nn.functional.softplus(raw.clamp(-10.0, 5.0))
    torch.testing.assert_close(std, expected.expand(4, 3))
    assert std.min().item() == pytest.approx(4.54e-5, rel=1e-3) and std.max().item() == pytest.approx(5.0067, rel=1e-4)
    actions, log_pi, u, mean_k, std_k = actor.sample(obs, 2)
    torch.testing.assert_close(std_k, expected.expand(8, 3))
    want = torch.distributions.Normal(mean_k, std_k).log_prob(u) - bp.tanh_log_det(u)
    torch.testing.assert_close(log_pi, want.sum(-1))


def linear_layers(net):
    return [m for m in net if isinstance(m, (torch.nn.Linear, bp.common.EnsembleLinear))]


def test_every_network_has_two_hidden_layers():
    """The code's build_mlp(num_layers=3) is two hidden layers and the output layer: the paper's
    "3-layer network" for the policy, the critics, the VAEs (and alpha(s))."""
    args = bp.Args(hidden_dim=16, actor_hidden_dim=24, vae_hidden_dim=20, n_ensembles=2)
    agent = bp.BRACPlus(args, obs_dim=3, act_dim=2, device=torch.device("cpu"))
    widths = {"actor": (agent.actor.net, 24), "critic": (agent.critic.net, 16), "alpha": (agent.alpha_net.net, 16),
              "encoder": (agent.behavior.encoder, 20), "decoder": (agent.behavior.decoder, 20)}
    for name, (net, width) in widths.items():
        layers = linear_layers(net)
        assert len(layers) == 3, name
        outs = [(m.out_features if isinstance(m, torch.nn.Linear) else m.weight.shape[-1]) for m in layers[:2]]
        assert outs == [width, width], name


def test_initialisation_is_the_codes_keras_scheme():
    """Kernels Glorot uniform, U(+-sqrt(6 / (fan_in + fan_out))) per member, biases 0; the output kernels
    of the policy and the critics U(+-1e-3) (rlutils' OUT_KERNEL_INIT), the VAEs' Glorot."""
    torch.manual_seed(0)
    agent = bp.BRACPlus(bp.Args(hidden_dim=64, actor_hidden_dim=64, vae_hidden_dim=64, n_ensembles=2),
                        obs_dim=5, act_dim=3, device=torch.device("cpu"))

    def fans(m):
        return (m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else tuple(m.weight.shape[-2:])

    nets = {"actor": (agent.actor.net, 1e-3), "critic": (agent.critic.net, 1e-3),
            "encoder": (agent.behavior.encoder, None), "decoder": (agent.behavior.decoder, None),
            "alpha": (agent.alpha_net.net, 0.0)}
    for name, (net, out_bound) in nets.items():
        layers = linear_layers(net)
        for i, m in enumerate(layers):
            output = i == len(layers) - 1
            bound = out_bound if output and out_bound is not None else math.sqrt(6.0 / sum(fans(m)))
            w = m.weight.detach().abs()
            assert w.max().item() <= bound, (name, i)
            if bound > 0:  # uniform over the whole interval, not a narrower one
                assert w.max().item() > 0.9 * bound and w.mean().item() == pytest.approx(bound / 2, rel=0.15), (name, i)
            if not (name == "alpha" and output):  # alpha(s)'s output bias holds alpha_init
                assert (m.bias == 0).all(), (name, i)


def recorded_sample_counts(agent):
    """Wrap the policy's sampler to record n (samples per state) of every call."""
    counts, sample = [], agent.actor.sample

    def recording(obs, n=1):
        counts.append(n)
        return sample(obs, n)

    agent.actor.sample = recording
    return counts


def a_batch(n=8, obs_dim=3, act_dim=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return bp.common.Batch(torch.randn(n, obs_dim, generator=g), torch.rand(n, act_dim, generator=g) * 2 - 1,
                           torch.randn(n, generator=g), torch.randn(n, obs_dim, generator=g), torch.zeros(n))


@pytest.mark.parametrize("overrides, one", [({}, 1), ({"regularizer": "mmd"}, 4)])
def test_policy_samples_per_state_in_each_use(overrides, one):
    """The code: one policy sample per state in pi_0's loss (update_actor_cloning), in delta_KL
    (compute_pi_pib_distance) and in the penalty's gate (_compute_q_net_gp); K in the RL-phase
    policy loss and the target. With the MMD each of these takes K."""
    k = 4
    agent = small_agent(n_samples=k, n_latent=2, **overrides)  # the KL bound by default
    agent.behavior.requires_grad_(False)
    counts = recorded_sample_counts(agent)
    agent.train_initial_policy(a_batch())
    assert counts == [one]
    counts.clear()
    agent.set_thresholds(torch.randn(20, 3))
    assert counts == [one, k]  # delta_KL, then eps_GP with K as every later epoch
    counts.clear()
    agent.train(a_batch())
    assert counts == [k, one, k]  # target, gate and penalty, policy loss


def test_beta_adam_state_starts_afresh_for_the_rl_phase():
    """The code's set_policy_net_optimizer gives log_beta a new Adam before the RL phase: the first
    RL-phase step of beta is a first Adam step (size lr), whatever pi_0's steps left in its moments."""
    agent = small_agent(n_samples=2, n_latent=2)
    agent.behavior.requires_grad_(False)
    agent.target_entropy = -100.0  # H > H_0 while pretraining: beta rises
    for _ in range(3):
        agent.train_initial_policy(a_batch())
    agent.kl_threshold.fill_(1.0), agent.gp_threshold.fill_(1.0)
    agent.target_entropy = 100.0  # H < H_0 in the RL phase: beta falls
    before = agent.beta_raw.item()
    agent.train(a_batch())
    assert agent.beta_raw.item() - before == pytest.approx(-agent.args.multiplier_lr, rel=1e-3)
    # both optimisers are in the checkpoint, so a resumed RL phase continues with beta's own state
    state = common.training_state(agent)
    assert {"pretrain_beta_optimizer", "beta_optimizer"} <= set(state)
    fresh = small_agent(n_samples=2, n_latent=2)
    common.load_training_state(fresh, state)
    assert fresh.beta_optimizer.state_dict()["state"][0]["step"] == 1
    assert fresh.pretrain_beta_optimizer.state_dict()["state"][0]["step"] == 3


def test_gp_multiplier_loss_uses_the_clipped_value_with_its_gradient():
    """The code's LagrangeLayer clips its raw value to [inverse_softplus(gp_weight), inverse_softplus(1e4)]
    with the gradient kept, in the critic's loss and in lambda's own loss."""
    agent = small_agent(gp_mode="official", gp_target=0.01, alpha_max=100.0, n_samples=2, n_latent=2)
    agent.behavior.requires_grad_(False)
    agent.kl_threshold.fill_(1.0), agent.gp_threshold.fill_(0.0)
    floor = bp.inverse_softplus(agent.args.gp_weight)
    with torch.no_grad():
        agent.gp_raw.fill_(floor - 4.0)  # below the floor
    metrics = agent.train(a_batch())
    assert metrics["charts/gp_weight"].item() == pytest.approx(agent.args.gp_weight, rel=1e-5)
    gp = metrics["losses/gradient_penalty"].item()
    # d/d raw of -softplus(clip(raw)) * (gp - target) = -sigmoid(clip(raw)) * (gp - target)
    want = -torch.sigmoid(torch.tensor(floor)).item() * (gp - 0.01)
    assert agent.gp_raw.grad.item() == pytest.approx(want, rel=1e-4)
    with torch.no_grad():
        agent.gp_raw.fill_(bp.inverse_softplus(100.0) + 3.0)  # above the cap
    assert agent.gp_multiplier().item() == pytest.approx(100.0, rel=1e-5)
    assert agent.gp_weight().item() == pytest.approx(100.0, rel=1e-5)


def test_logged_actor_loss_is_the_lagrangian_with_delta():
    """The code's policy loss has alpha(s) * (KL(s) - delta_KL): the logged value moves with delta_KL,
    the gradient does not."""
    agents = [small_agent(n_samples=2, n_latent=2) for _ in range(2)]
    losses = []
    for agent, delta in zip(agents, (1.0, 3.0)):
        agent.behavior.requires_grad_(False)
        agent.kl_threshold.fill_(delta), agent.gp_threshold.fill_(1.0)
        torch.manual_seed(4)
        losses.append(agent.train(a_batch())["losses/actor_loss"].item())
    assert losses[0] - losses[1] == pytest.approx(10.0 * 2.0, rel=1e-4)  # alpha(s) = 10 everywhere
    for p, q in zip(agents[0].actor.parameters(), agents[1].actor.parameters()):
        torch.testing.assert_close(p, q)


def test_pretraining_schedule_switches_as_keras_piecewise_constant_decay():
    """PiecewiseConstantDecay(boundaries=[I, 2I, 3I, 4I]) at the optimiser's iteration count t (updates
    taken): the factor of update t + 1 changes once t exceeds a boundary. steps = 10: I = 2."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    scheduler = bp.piecewise_decay(opt, 10)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5, 0.1, 0.1, 0.05, 0.05, 0.01, 0.01, 0.01])


# ----------------------------------------------------------------------------------------------
# MMD (--regularizer mmd, the default on Adroit)
# ----------------------------------------------------------------------------------------------
def test_laplacian_mmd_by_hand():
    sigma = 0.7
    x = torch.tensor([[[0.0, 0.0]]])
    y = torch.tensor([[[1.0, -2.0]]])
    # one sample each: k(x, x) = k(y, y) = 1, k(x, y) = exp(-3 / (2 sigma))
    want = math.sqrt(2.0 - 2.0 * math.exp(-3.0 / (2 * sigma)) + 1e-6)
    assert bp.laplacian_mmd(x, y, sigma).item() == pytest.approx(want, rel=1e-6)
    # identical sample sets: only the 1e-6 inside the square root is left
    s = torch.randn(3, 5, 4)
    torch.testing.assert_close(bp.laplacian_mmd(s, s.clone(), sigma), torch.full((3,), 1e-3))
    # two samples against three, every pair (self-pairs included) by loops
    x, y = torch.randn(1, 2, 3), torch.randn(1, 3, 3)

    def mean_k(a, b):
        return sum(math.exp(-(ai - bj).abs().sum().item() / (2 * sigma)) for ai in a[0] for bj in b[0]) / (
            a.shape[1] * b.shape[1])

    want = math.sqrt(mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y) + 1e-6)
    assert bp.laplacian_mmd(x, y, sigma).item() == pytest.approx(want, rel=1e-5)


def test_mmd_divergence_is_the_codes_tiled_computation():
    """_compute_mmd tiles the K policy samples B times against B x K behaviour samples (each member's
    decoder mean at K latents clipped to [-0.5, 0.5]), both tanh(clip(u, -3, 3)): the same number as
    K policy samples against the B x K."""
    k, sigma = 3, 1.5
    agent = small_agent(regularizer="mmd", n_samples=k, mmd_sigma=sigma)
    obs = torch.randn(4, 3)
    torch.manual_seed(2)
    mmd, _, _ = agent.policy_kl(obs, k)
    torch.manual_seed(2)
    _, _, u, _, _ = agent.actor.sample(obs, k)
    b = agent.behavior
    z = torch.randn(b.n, len(obs) * k, b.latent_dim).clamp(-0.5, 0.5)
    with torch.no_grad():
        means, _ = b.decode(obs.repeat_interleave(k, 0), z)  # (B, N * k, A)
    pi = torch.tanh(u.clamp(-3, 3)).view(len(obs), k, -1).repeat(1, b.n, 1)  # tiled B times: (N, B * k, A)
    pi_b = torch.tanh(means.clamp(-3, 3)).view(b.n, len(obs), k, -1).transpose(0, 1).flatten(1, 2)

    def code_mmd(s1, s2):  # mmd_loss_laplacian, samples on the first axis
        s1, s2 = s1.transpose(0, 1), s2.transpose(0, 1)

        def mean_k(a, c):
            return torch.exp(-(a.unsqueeze(0) - c.unsqueeze(1)).abs().sum(-1) / (2.0 * sigma)).mean((0, 1))
        return torch.sqrt(mean_k(s1, s1) + mean_k(s2, s2) - 2.0 * mean_k(s1, s2) + 1e-6)

    torch.testing.assert_close(mmd, code_mmd(pi, pi_b).detach())


def test_adroit_datasets_default_to_mmd_with_the_run_scripts_settings():
    """d4rl_bracp.py's {pen,hammer,door,relocate}-human-v0 entries: reg_type mmd, sigma 120, policy_lr 5e-8,
    gp_type hard, max_ood_grad_norm 0.005, generalization_threshold 0.001, std_scale 1."""
    for dataset in ("D4RL/pen/human-v2", "D4RL/door/expert-v2", "D4RL/relocate/cloned-v2", "D4RL/hammer/human-v2"):
        d = bp.domain_defaults(dataset)
        assert d == {"regularizer": "mmd", "kl_margin": 0.001, "gp_target": 0.005, "gp_gate": "hard",
                     "actor_lr": 5e-8, "entropy_std_scale": 1.0}, dataset
    assert bp.Args().mmd_sigma == 120.0
    d = bp.domain_defaults("D4RL/hopper/medium-v2")
    assert (d["regularizer"], d["gp_gate"], d["actor_lr"], d["entropy_std_scale"]) == ("kl", "softplus", 5e-6, 4.0)
    args = bp.Args(env="D4RL/pen/human-v2", regularizer="kl")  # a flag given is kept
    assert bp.fill_domain_defaults(args) == {k: v for k, v in bp.ADROIT_DEFAULTS.items() if k != "regularizer"}
    assert args.regularizer == "kl" and args.actor_lr == 5e-8


def test_mmd_entropy_bound_is_a_lower_bound():
    """The code (reg_type mmd) and the paper's Adroit table ("Minimum entropy H_0"): beta rises while H < H_0."""
    agent = small_agent(regularizer="mmd")
    agent.target_entropy = 0.0
    before = agent.beta().item()
    agent.update_beta(torch.full((4, 5), 2.0))  # entropy -2 < H_0: beta rises
    assert agent.beta().item() > before
    before = agent.beta().item()
    agent.update_beta(torch.full((4, 5), -2.0))  # entropy 2 > H_0: beta falls
    assert agent.beta().item() < before


def test_official_hard_gate_is_the_indicator_on_the_norm_of_grad_min_q():
    act = torch.tensor([[-1.0, -1.0], [3.0, 1.0], [0.5, 0.5]])
    kl = torch.tensor([3.0, 0.0, 1.5])
    gp = bp.gated_gradient_penalty(KnownCritic(), torch.zeros(3, 1), act, kl, 1.0, "official", "hard")
    # grad of min: Q_1 on row 0 -> (3, 3); Q_2 on row 2 -> 2a = (1, 1); row 1 is not above the threshold
    torch.testing.assert_close(gp, torch.tensor([math.sqrt(18.0), 0.0, math.sqrt(2.0)]))


def test_a_checkpoint_that_holds_the_thresholds_as_numbers_still_resumes():
    """Checkpoints written while delta_KL and eps_GP were Python floats load into the tensors."""
    agent = small_agent()
    state = common.training_state(agent)
    state["kl_threshold"], state["gp_threshold"] = 0.25, 1.5
    common.load_training_state(agent, state)
    assert agent.kl_threshold.item() == 0.25 and agent.gp_threshold.item() == 1.5
    assert isinstance(agent.kl_threshold, torch.Tensor)


def test_gp_threshold_is_mean_plus_the_population_std_of_the_per_state_kl():
    """eps_GP = mean + std of the per-state KL, the std over n as the code's logger computes it
    (statistics_scalar), so that one state gives its own KL rather than NaN."""
    agent = small_agent(n_samples=2, n_latent=2)
    obs = torch.randn(7, 3)
    torch.manual_seed(3)
    kl = agent.state_kl(obs)
    torch.manual_seed(3)
    got = agent.update_gp_threshold(obs)
    assert got == pytest.approx((kl.mean() + (kl - kl.mean()).pow(2).mean().sqrt()).item(), rel=1e-5)
    torch.manual_seed(4)
    one = agent.state_kl(obs[:1])
    torch.manual_seed(4)
    assert agent.update_gp_threshold(obs[:1]) == pytest.approx(one.item(), rel=1e-5)
