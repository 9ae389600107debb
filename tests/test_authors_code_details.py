"""Details where the files follow the authors' public code: checked on hand-made inputs (CQL's
max-Q backup, update order and log-std bounds, BRAC+'s multiplier caps and TD scale, ARQ's likelihood
of unclipped samples, iTRPO's parameter names, log-std bounds, update order, initialisation and
rewards, Fisher-BRC's temperature loss, IQL's learning-rate schedule)."""

import math
import types

import pytest
import torch

from conftest import load_algorithm


# ----------------------------------------------------------------------------------------------
# CQL (aviralkumar2907/CQL, d4rl/rlkit/torch/sac/cql.py)
# ----------------------------------------------------------------------------------------------
def test_cql_max_q_backup_takes_each_critics_max_then_the_min():
    cql = load_algorithm("cql")
    q1 = torch.tensor([[0.0, 10.0], [1.0, 2.0]])
    q2 = torch.tensor([[10.0, 0.0], [3.0, 0.5]])
    # max over actions of min over critics would give 0 and 1
    torch.testing.assert_close(cql.max_q_backup(q1, q2), torch.tensor([10.0, 2.0]))


def test_cql_draws_the_critic_losss_samples_before_the_actor_is_stepped():
    """The official step (cql.py at 0787a29f, the revision that runs under PyTorch >= 1.5) computes
    every loss with the current policy, then steps the temperature, the policy and the critics."""
    cql = load_algorithm("cql")
    agent = cql.CQL(cql.Args(hidden_dim=16, n_actions=3, bc_warmup_steps=0, max_q_backup=True), 3, 2, torch.device("cpu"))
    events = []
    sample = agent.actor.sample
    agent.actor.sample = lambda obs, n=1: (events.append(("sample", len(obs) * n)), sample(obs, n))[1]
    for name in ("alpha_optimizer", "actor_optimizer", "critic_optimizer"):
        opt = getattr(agent, name)
        opt.step = (lambda step, name: lambda *a, **k: (events.append((name, None)), step(*a, **k))[1])(opt.step, name)
    batch = cql.common.Batch(torch.randn(8, 3), torch.rand(8, 2) * 2 - 1, torch.randn(8), torch.randn(8, 3),
                             torch.zeros(8))
    agent.train(batch)
    actor_step = events.index(("actor_optimizer", None))
    assert events.index(("alpha_optimizer", None)) < actor_step < events.index(("critic_optimizer", None))
    # the target (3 per next state), the CQL samples at s and s' (3 each), then the actor's own sample
    assert [n for e, n in events[:actor_step] if e == "sample"] == [24, 24, 24, 8]
    assert all(e != "sample" for e, _ in events[actor_step:])


def test_cql_policy_log_std_is_bounded_as_in_the_official_policies():
    """d4rl/rlkit/torch/sac/policies.py: LOG_SIG_MIN = -5, LOG_SIG_MAX = 2."""
    cql = load_algorithm("cql")
    actor = cql.Actor(2, 1, 8)
    with torch.no_grad():
        actor.net[-1].weight.zero_()
        actor.net[-1].bias.copy_(torch.tensor([0.0, -8.0]))
    assert actor(torch.zeros(1, 2))[1].item() == -5.0
    with torch.no_grad():
        actor.net[-1].bias.copy_(torch.tensor([0.0, 8.0]))
    assert actor(torch.zeros(1, 2))[1].item() == 2.0


# ----------------------------------------------------------------------------------------------
# BRAC+ (vermouth1992/bracp, bracp.py: LagrangeLayer, _update_q_nets)
# ----------------------------------------------------------------------------------------------
def brac_agent(**overrides):
    bp = load_algorithm("brac_plus")
    args = bp.Args(hidden_dim=16, actor_hidden_dim=16, vae_hidden_dim=16, n_ensembles=2, **overrides)
    torch.manual_seed(0)
    return bp, bp.BRACPlus(args, obs_dim=3, act_dim=2, device=torch.device("cpu"))


def test_brac_plus_global_alpha_at_its_cap_comes_back_down_when_the_constraint_is_met():
    bp, agent = brac_agent(alpha_mode="global", alpha_max=100.0)
    with torch.no_grad():
        agent.alpha_raw.fill_(bp.inverse_softplus(100.0) + 5.0)  # beyond the cap
    obs = torch.randn(16, 3)
    assert agent.alpha(obs)[0].item() == pytest.approx(100.0, rel=1e-4)
    before = agent.alpha_raw.item()
    agent.kl_threshold.fill_(10.0)
    agent.update_alpha(obs, torch.zeros(16))  # KL below the threshold everywhere: alpha should fall
    assert agent.alpha_raw.item() < before


def test_brac_plus_beta_at_its_cap_keeps_its_gradient():
    bp, agent = brac_agent(alpha_max=100.0)
    with torch.no_grad():
        agent.beta_raw.fill_(bp.inverse_softplus(100.0) + 5.0)
    assert agent.beta().item() == pytest.approx(100.0, rel=1e-4)
    agent.target_entropy = 0.0
    before = agent.beta_raw.item()
    agent.update_beta(torch.full((16, 5), 3.0))  # H = -3 < H_0 = 0: beta should fall
    assert agent.beta_raw.item() < before


def test_brac_plus_official_gp_mode_halves_the_td_loss():
    bp, paper = brac_agent(gp_mode="paper")
    _, official = brac_agent(gp_mode="official")
    official.critic.load_state_dict(paper.critic.state_dict())
    official.critic_target.load_state_dict(paper.critic_target.state_dict())
    official.actor.load_state_dict(paper.actor.state_dict())
    batch = bp.common.Batch(torch.randn(8, 3), torch.rand(8, 2) * 2 - 1, torch.randn(8), torch.randn(8, 3),
                            torch.zeros(8))
    torch.manual_seed(1)
    loss_paper, _ = paper.td_loss(batch)
    torch.manual_seed(1)
    loss_official, _ = official.td_loss(batch)
    torch.testing.assert_close(loss_official, 0.5 * loss_paper)


# ----------------------------------------------------------------------------------------------
# ARQ (hiwonjoon/ARQ-public): the support keeps the sample as drawn (arq/scripts/sampling.py), the
# implicit policy clips it before scoring it (build_pi in arq/algo/sde_conditional.py)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clip", [False, True])
def test_arq_support_samples_are_unclipped_and_implicit_policy_samples_clipped_before_scoring(clip):
    arq = load_algorithm("arq")
    args = arq.Args(score_hidden_dim=16, score_blocks=1, sampler="ode", sampler_steps=2, likelihood_steps=2)
    model = arq.ScoreModel(2, 1, args)
    x = torch.tensor([[3.0], [-4.0], [0.2]])  # standardised space: mean 0, std 1, so 3 and -4 leave [-1, 1]
    model.sample = lambda s, *a, **k: x
    seen = []
    model.log_likelihood = lambda s, x_in, *a, **k: (seen.append(x_in), torch.zeros(len(x_in)))[1]
    act, _ = model.sample_with_likelihood(torch.zeros(3, 2), 1, args, torch.Generator().manual_seed(0), clip=clip)
    want = torch.tensor([[1.0], [-1.0], [0.2]]) if clip else x
    torch.testing.assert_close(seen[0], want)  # scored as returned
    torch.testing.assert_close(act.view(-1, 1), want)


# ----------------------------------------------------------------------------------------------
# iTRPO (JackZhangY/offorRL, ikl_trainer.py and ikl.yaml; the code's tau/alpha are swapped)
# ----------------------------------------------------------------------------------------------
def test_itrpo_defaults_are_the_codes_values_in_the_papers_names():
    itrpo = load_algorithm("itrpo")
    args = itrpo.Args()
    assert args.alpha == 0.9  # the code's `tau`: weight of the KL terms
    assert args.shaping_tau == 0.03  # the code's `alpha`: the shaping term's extra factor
    assert args.tau == 0.005  # the Polyak step, named as in every other file
    assert args.shaping_tau * args.alpha == pytest.approx(0.027)


def test_itrpo_log_std_is_bounded_as_in_rlkit():
    itrpo = load_algorithm("itrpo")
    policy = itrpo.TanhGaussian(2, 1, 8, n_hidden=1)
    with torch.no_grad():
        policy.net[-1].bias.copy_(torch.tensor([0.0, -50.0]))
        policy.net[-1].weight.zero_()
    assert policy(torch.zeros(1, 2))[1].item() == -5.0


@pytest.mark.parametrize("order", ["actor-first", "critic-first"])
def test_itrpo_update_order(order):
    itrpo = load_algorithm("itrpo")
    agent = itrpo.ITRPO(itrpo.Args(hidden_dim=16, n_samples=2, bc_steps=10, update_order=order), 3, 2,
                        torch.device("cpu"))
    events = []
    for name in ("actor_optimizer", "critic_optimizer"):
        opt = getattr(agent, name)
        opt.step = (lambda step, name: lambda *a, **k: (events.append(name), step(*a, **k))[1])(opt.step, name)
    batch = itrpo.common.Batch(torch.randn(8, 3), torch.rand(8, 2) * 2 - 1, torch.randn(8), torch.randn(8, 3),
                               torch.zeros(8))
    metrics = agent.train(batch)
    expected = ["actor_optimizer", "critic_optimizer"]
    assert events == (expected if order == "actor-first" else expected[::-1])
    assert {"losses/actor_loss", "losses/critic_loss", "charts/kl"} <= set(metrics)


def test_itrpo_networks_start_from_rlkits_initialisation():
    """rlkit's Mlp: hidden weights U(+-1/sqrt(out_features)) (fanin_init reads weight.size(0)), zero
    hidden biases, output weights U(+-3e-3) for Q and U(+-1e-3) for the policies; the policy's separate
    log-std layer draws its bias from U(+-1e-3), its mean layer's bias is zero."""
    itrpo = load_algorithm("itrpo")
    torch.manual_seed(0)
    obs_dim, act_dim, hidden = 200, 6, 64  # first layers: 1/sqrt(out) = 0.125, PyTorch's 1/sqrt(in) is smaller

    def check_uniform(w, bound):
        assert w.abs().max().item() <= bound
        assert w.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)

    for policy in (itrpo.TanhGaussian(obs_dim, act_dim, hidden, n_hidden=3),
                   itrpo.TanhGaussian(obs_dim, act_dim, hidden, n_hidden=2)):  # actor, behaviour model
        *hidden_layers, out = [m for m in policy.net if isinstance(m, torch.nn.Linear)]
        for layer in hidden_layers:
            check_uniform(layer.weight, 1 / hidden**0.5)
            assert (layer.bias == 0).all()
        assert out.weight.abs().max().item() <= 1e-3 and out.weight.std().item() > 4e-4
        assert (out.bias[:act_dim] == 0).all()
        assert out.bias[act_dim:].abs().max().item() <= 1e-3 and (out.bias[act_dim:] != 0).all()
    critic = itrpo.Critic(obs_dim, act_dim, hidden)
    *hidden_layers, out = [m for m in critic.net if isinstance(m, itrpo.common.EnsembleLinear)]
    for layer in hidden_layers:
        for w in layer.weight:
            check_uniform(w, 1 / hidden**0.5)
        assert (layer.bias == 0).all()
    assert out.weight.abs().max().item() <= 3e-3 and out.weight.std().item() > 1e-3 and (out.bias == 0).all()


def test_itrpo_rewards_are_the_codes_buffer_transform_then_its_trainers_bonus():
    """offorRL: the replay buffer subtracts 1 on antmaze (env_replay_buffer.py), the trainer adds
    reward_bonus 5 to every reward (ikl_trainer.py, ikl.yaml): r + 4 on antmaze, r + 5 elsewhere."""
    itrpo = load_algorithm("itrpo")
    for dataset_id, expected in (("D4RL/antmaze/umaze-v1", [4.0, 5.0]), ("mujoco/hopper/medium-v0", [5.0, 6.0]),
                                 ("local/hopper/medium-replay-v0", [5.0, 6.0])):
        args = itrpo.Args(env=dataset_id, **itrpo.domain_defaults(dataset_id))
        data = types.SimpleNamespace(rewards=torch.tensor([0.0, 1.0]))
        itrpo.transform_rewards(data, args)
        torch.testing.assert_close(data.rewards, torch.tensor(expected), msg=dataset_id)


# ----------------------------------------------------------------------------------------------
# Fisher-BRC (google-research fisher_brc: fisher_brc.py, behavioral_cloning.py)
# ----------------------------------------------------------------------------------------------
def test_fisher_brc_actor_temperature_step_is_scaled_by_alpha_as_in_the_official_code():
    """fisher_brc.py fit_actor: alpha_loss = mean(alpha * (-log pi - target_entropy)), so its gradient
    in log alpha is alpha * (H - target)."""
    fbrc = load_algorithm("fisher_brc")
    agent = fbrc.FisherBRC(fbrc.Args(hidden_dim=16, n_components=3), 3, 2, torch.device("cpu"))
    agent.behavior.requires_grad_(False)
    with torch.no_grad():
        agent.log_alpha.fill_(-3.0)
    obs = torch.randn(32, 3)
    metrics = agent.train(fbrc.common.Batch(obs, torch.rand(32, 2) * 2 - 1, torch.zeros(32), obs, torch.zeros(32)))
    expected = torch.exp(torch.tensor(-3.0)) * (metrics["charts/entropy"] - agent.target_entropy)
    torch.testing.assert_close(agent.log_alpha.grad, expected, rtol=1e-4, atol=1e-7)  # .grad stays after the step


def test_fisher_brc_regression_slope():
    fbrc = load_algorithm("fisher_brc")
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    torch.testing.assert_close(fbrc.regression_slope(-x + 5.0, x), torch.tensor(-1.0))
    torch.testing.assert_close(fbrc.regression_slope(2.0 * x, x), torch.tensor(2.0))


# ----------------------------------------------------------------------------------------------
# IQL (ikostrikov/implicit_q_learning, learner.py: optax.cosine_decay_schedule(-actor_lr, max_steps))
# ----------------------------------------------------------------------------------------------
def iql_agent(total_steps: int):
    iql = load_algorithm("iql")
    args = iql.Args(hidden_dim=8, total_steps=total_steps, expectile=0.7, beta=3.0, dropout=0.0,
                    reward_transform="none")
    return iql.IQL(args, 3, 2, torch.device("cpu"))


def test_iql_actor_learning_rate_is_optaxs_cosine_decay_and_stays_at_zero_after_the_last_step():
    agent = iql_agent(10)
    rates = []
    for _ in range(13):
        rates.append(float(agent.actor_optimizer.param_groups[0]["lr"]))
        agent.actor_scheduler.step()
    want = [3e-4 * 0.5 * (1 + math.cos(math.pi * min(t, 10) / 10)) for t in range(13)]
    assert rates == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert agent.critic_optimizer.param_groups[0]["lr"] == 3e-4  # the critic and V keep a constant rate


def test_iql_learning_rate_resumes_from_its_checkpoint():
    import common

    trained = iql_agent(10)
    for _ in range(4):
        trained.actor_scheduler.step()
    resumed = iql_agent(10)
    common.load_training_state(resumed, common.training_state(trained))
    for agent in (trained, resumed):
        agent.actor_scheduler.step()
        lr = float(agent.actor_optimizer.param_groups[0]["lr"])
        assert lr == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_arq_support_is_generated_from_unclipped_samples(tmp_path):
    """generate_support asks sample_with_likelihood for the sample as drawn (clip False), as the
    authors' sampling script stores it."""
    arq = load_algorithm("arq")
    args = arq.Args(score_hidden_dim=16, score_blocks=1, n_support=2, sampler="ode", sampler_steps=2,
                    likelihood_steps=2, sample_batch_states=4)
    model, asked = arq.ScoreModel(2, 1, args), []

    def sample_with_likelihood(obs, n, args, gen, clip=False):
        asked.append(clip)
        return torch.zeros(len(obs), n, 1), torch.zeros(len(obs), n)

    model.sample_with_likelihood = sample_with_likelihood
    arq.generate_support(model, torch.zeros(6, 2), args, torch.Generator().manual_seed(0),
                         str(tmp_path / "partial.pt"), None, lambda *a, **k: None)
    assert asked == [False, False]
