"""The algorithm files: key math on hand-made inputs, and each one end to end as a user runs it."""

import dataclasses
import json
import math
import os

import pytest
import torch
import tyro

import common
from conftest import ROOT, check_curves, check_saved_model, load_algorithm, run_script
from tools.pretraining import BC_WARMUP, PRETRAINING, shrink_flags

ALGORITHMS = ["bc", "td3_bc", "awr", "iql", "cql", "fisher_brc", "itrpo"]




# ----------------------------------------------------------------------------------------------
# Math on hand-made inputs
# ----------------------------------------------------------------------------------------------
def test_expectile_loss_weights_the_two_sides_asymmetrically():
    iql = load_algorithm("iql")
    diff = torch.tensor([2.0, -2.0])  # Q - V: V too low on the first, too high on the second
    assert iql.expectile_loss(diff[:1], 0.7).item() == pytest.approx(0.7 * 4.0)
    assert iql.expectile_loss(diff[1:], 0.7).item() == pytest.approx(0.3 * 4.0)
    assert iql.expectile_loss(diff, 0.7).item() == pytest.approx((0.7 * 4 + 0.3 * 4) / 2)
    # tau = 0.5 is half the mean squared error
    d = torch.randn(100)
    assert iql.expectile_loss(d, 0.5).item() == pytest.approx(0.5 * (d**2).mean().item(), rel=1e-6)


def test_expectile_regression_finds_the_expectile():
    """Minimising the loss over a constant V gives the tau-expectile: above the mean for tau > 0.5."""
    iql = load_algorithm("iql")
    q = torch.tensor([0.0, 1.0, 2.0, 10.0])
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.1)
    for _ in range(2000):
        opt.zero_grad()
        iql.expectile_loss(q - v, 0.9).backward()
        opt.step()
    # the 0.9-expectile v solves 0.9 * sum_(q>v)(q - v) = 0.1 * sum_(q<v)(v - q)
    above, below = q[q > v], q[q <= v]
    assert 0.9 * (above - v).sum().item() == pytest.approx(0.1 * (v - below).sum().item(), rel=1e-3)
    assert v.item() > q.mean().item()


def test_td3_bc_lambda_normalises_by_mean_absolute_q():
    td3_bc = load_algorithm("td3_bc")
    q = torch.tensor([1.0, -3.0, 2.0], requires_grad=True)
    pi = torch.tensor([[0.5], [0.0], [-0.5]], requires_grad=True)
    a = torch.tensor([[0.0], [0.0], [0.0]])
    loss, lmbda = td3_bc.bc_regularised_loss(q, pi, a, alpha=2.5)
    assert lmbda.item() == pytest.approx(2.5 / 2.0)  # mean |Q| = 2
    assert loss.item() == pytest.approx(-1.25 * 0.0 + (0.25 + 0 + 0.25) / 3)
    loss.backward()
    # lambda is a constant: the gradient wrt Q is -lambda / N, not affected by |Q|
    torch.testing.assert_close(q.grad, torch.full((3,), -1.25 / 3))


def test_awr_weights_are_exponentiated_and_clipped():
    awr = load_algorithm("awr")
    adv = torch.tensor([0.0, 1.0, -1.0, 10.0])
    w = awr.awr_weights(adv, awr_lambda=0.5, max_weight=100.0)
    torch.testing.assert_close(w, torch.tensor([1.0, torch.e**2, torch.e**-2, 100.0]))
    assert (awr.awr_weights(torch.randn(1000) * 50, 1 / 3, 100.0) <= 100.0).all()


def test_iql_picks_per_domain_defaults_from_the_dataset_id():
    iql = load_algorithm("iql")
    assert iql.domain_defaults("D4RL/antmaze/umaze-v1") == {
        "expectile": 0.9, "beta": 10.0, "dropout": 0.0, "reward_transform": "minus-one"}
    assert iql.domain_defaults("D4RL/pen/human-v2")["dropout"] == 0.1
    assert iql.domain_defaults("D4RL/kitchen/mixed-v2")["beta"] == 0.5
    assert iql.domain_defaults("mujoco/hopper/medium-v0") == {
        "expectile": 0.7, "beta": 3.0, "dropout": 0.0, "reward_transform": "return-range"}


def test_dataset_task_is_the_task_component_of_the_id():
    import common

    for dataset_id, task in [("D4RL/pen/human-v2", "pen"), ("mujoco/hopper/medium-v0", "hopper"),
                             ("local/pendulum/medium-v0", "pendulum"), ("D4RL/antmaze/umaze-v1", "antmaze"),
                             ("D4RL/kitchen/mixed-v2", "kitchen"), ("hopper/medium-v0", "hopper"),
                             ("D4RL/pointmaze/open-dense-v2", "pointmaze")]:
        assert common.dataset_task(dataset_id) == task, dataset_id
    assert common.dataset_task("test/notantmaze/x-v0") != "antmaze"


ADROIT_IDS = ["D4RL/door/human-v2", "D4RL/hammer/cloned-v2", "D4RL/pen/expert-v2", "D4RL/relocate/human-v2"]
NOT_ADROIT_IDS = ["local/pendulum/medium-v0", "D4RL/pointmaze/open-v2", "D4RL/pointmaze/open-dense-v2",
                  "mujoco/invertedpendulum/medium-v0", "mujoco/hopper/medium-v0", "D4RL/antmaze/umaze-v1"]


@pytest.mark.parametrize("algorithm, adroit", [("iql", {"beta": 0.5, "dropout": 0.1}),
                                               ("arq", {"alpha": 10.0, "bc_steps": 300_000, "critic_lr": 1e-4})])
def test_adroit_settings_go_to_the_adroit_tasks_only(algorithm, adroit):
    """'pen' is a task, not a substring: pendulum and pointmaze/open* are not Adroit."""
    module = load_algorithm(algorithm)
    for dataset_id in ADROIT_IDS:
        chosen = module.domain_defaults(dataset_id)
        assert {k: chosen[k] for k in adroit} == adroit, dataset_id
    for dataset_id in NOT_ADROIT_IDS:
        chosen = module.domain_defaults(dataset_id)
        assert {k: chosen[k] for k in adroit} != adroit, dataset_id


@pytest.mark.parametrize("algorithm", ["iql", "arq"])
def test_reward_scaling_follows_the_authors_per_domain(algorithm):
    """ikostrikov/implicit_q_learning train_offline.py and ARQ's offline_dataset.py scale by the return
    range only halfcheetah, hopper and walker2d, subtract 1 on antmaze, and leave the rest untouched."""
    module = load_algorithm(algorithm)
    expected = {"mujoco/halfcheetah/medium-v0": "return-range", "mujoco/hopper/expert-v0": "return-range",
                "local/walker2d/medium-replay-v0": "return-range", "D4RL/antmaze/umaze-v1": "minus-one",
                "mujoco/ant/medium-v0": "none", "D4RL/pointmaze/umaze-v2": "none",
                "local/pendulum/medium-v0": "none", "D4RL/kitchen/mixed-v2": "none", "D4RL/pen/human-v2": "none"}
    for dataset_id, transform in expected.items():
        assert module.domain_defaults(dataset_id)["reward_transform"] == transform, dataset_id


def test_awr_critic_target_uses_policy_actions_and_masks_terminals():
    """One train step: the target is r + gamma (1 - done) min Q_target(s', a' ~ pi(s')), on a batch of
    terminal and non-terminal transitions; a' from the data would give another loss."""
    awr = load_algorithm("awr")
    args = awr.Args(hidden_dim=16)
    torch.manual_seed(0)
    agent = awr.AWR(args, obs_dim=3, act_dim=2, device=torch.device("cpu"))
    terminals = (torch.arange(8) % 2).float()
    batch = common.Batch(torch.randn(8, 3), torch.rand(8, 2) * 2 - 1, torch.full((8,), 5.0), torch.randn(8, 3),
                         terminals)
    rng = torch.get_rng_state()
    with torch.no_grad():
        q1, q2 = agent.critic(batch.observations, batch.actions)

        def loss(next_actions):
            target = 5.0 + args.gamma * (1 - terminals) * torch.min(*agent.critic_target(batch.next_observations,
                                                                                          next_actions))
            return (((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()).item()

        expected, with_data_actions = loss(agent.actor.sample(batch.next_observations)), loss(batch.actions)
    torch.set_rng_state(rng)  # the step draws the same a'
    metrics = agent.train(batch)
    assert metrics["losses/critic_loss"].item() == pytest.approx(expected, rel=1e-5)
    assert with_data_actions != pytest.approx(expected, rel=1e-5)  # the check above tells them apart


def test_cql_logsumexp_divides_each_sample_by_its_proposal_density():
    cql = load_algorithm("cql")
    torch.manual_seed(0)
    q_rand, q_pi, q_next = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    log_pi, log_next = torch.randn(4, 3), torch.randn(4, 3)
    act_dim = 2
    got = cql.cql_logsumexp(q_rand, act_dim * math.log(0.5), q_pi, log_pi, q_next, log_next)
    # independent: log of the sum of exp(Q) / density, with the uniform density 0.5^2 = 1/4
    ratios = torch.cat([q_rand.exp() * 4.0, q_pi.exp() / log_pi.exp(), q_next.exp() / log_next.exp()], 1)
    torch.testing.assert_close(got, ratios.sum(1).log())
    # as an estimator: with Q = 0 and exact uniform proposals, exp(lse) / 3M = integral over [-1, 1]^2 = 4
    zeros = torch.zeros(1, 5)
    estimate = cql.cql_logsumexp(zeros, act_dim * math.log(0.5), zeros, torch.full((1, 5), math.log(0.25)),
                                 zeros, torch.full((1, 5), math.log(0.25)))
    assert (estimate.exp() / 15).item() == pytest.approx(4.0)


def cql_agent(**overrides):
    cql = load_algorithm("cql")
    args = cql.Args(hidden_dim=32, n_actions=4, **overrides)
    torch.manual_seed(0)
    return cql, cql.CQL(args, obs_dim=3, act_dim=2, device=torch.device("cpu"))


def random_batch(n=16):
    torch.manual_seed(1)
    return common.Batch(torch.randn(n, 3), torch.rand(n, 2) * 1.8 - 0.9, torch.randn(n), torch.randn(n, 3), torch.zeros(n))


def test_cql_lagrange_multiplier_grows_while_the_gap_exceeds_the_threshold():
    _, agent = cql_agent(lagrange_threshold=-1e3)  # any gap is above this threshold
    before = agent.log_alpha_prime.item()
    agent.train(random_batch())
    assert agent.log_alpha_prime.item() > before
    _, agent = cql_agent(lagrange_threshold=1e3)  # and below this one
    agent.train(random_batch())
    assert agent.log_alpha_prime.item() < before


def test_cql_conservative_term_pushes_down_out_of_data_actions():
    """Critic-only training on a fixed batch: Q at the data actions ends above Q at random actions."""
    _, agent = cql_agent(bc_warmup_steps=10**9, init="torch")  # rlkit's tiny output layer moves slower
    batch = random_batch(32)
    obs, actions = batch[0], batch[1]
    for _ in range(300):
        agent.train(batch)
    with torch.no_grad():
        q_data = torch.min(*agent.critic(obs, actions)).mean()
        q_rand = torch.min(*agent.critic(obs, torch.rand(32, 2) * 2 - 1)).mean()
    assert q_data > q_rand + 0.5


def test_cql_actor_clones_behaviour_during_the_warmup():
    """During the BC phase the actor's loss ignores Q: scaling the critic changes nothing."""
    _, agent = cql_agent(bc_warmup_steps=5)
    batch = random_batch()
    torch.manual_seed(3)
    loss_a = agent.train(batch)["losses/actor_loss"]
    _, agent2 = cql_agent(bc_warmup_steps=5)
    with torch.no_grad():
        for p in agent2.critic.parameters():
            p.mul_(3.0)
    torch.manual_seed(3)
    loss_b = agent2.train(batch)["losses/actor_loss"]
    assert loss_a.item() == pytest.approx(loss_b.item())
    _, agent3 = cql_agent(bc_warmup_steps=0)
    torch.manual_seed(3)
    loss_c = agent3.train(batch)["losses/actor_loss"]
    assert loss_c.item() != pytest.approx(loss_a.item())


def test_fisher_brc_mixture_log_density_matches_torch_distributions():
    fbrc = load_algorithm("fisher_brc")
    torch.manual_seed(0)
    model = fbrc.BehaviorModel(obs_dim=4, act_dim=3, hidden_dim=16, n_components=5)
    with torch.no_grad():  # the output layer starts near zero; make the components distinct
        model.net[-1].weight.normal_(0, 1.0)
    obs, act = torch.randn(8, 4), torch.rand(8, 3) * 1.8 - 0.9
    log_w, mean, log_std = model.components(obs)
    per_dim = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=log_w), torch.distributions.Normal(mean, log_std.exp()))
    squashed = torch.distributions.TransformedDistribution(
        per_dim, [torch.distributions.transforms.TanhTransform()])
    expected = torch.distributions.Independent(squashed, 1).log_prob(act)
    torch.testing.assert_close(model.log_prob(obs, act), expected, rtol=1e-4, atol=1e-4)


def test_fisher_brc_mixture_density_integrates_to_one():
    fbrc = load_algorithm("fisher_brc")
    torch.manual_seed(1)
    model = fbrc.BehaviorModel(obs_dim=2, act_dim=1, hidden_dim=16, n_components=5)
    with torch.no_grad():
        model.net[-1].weight.normal_(0, 1.0)
    grid = torch.linspace(-1 + 1e-6, 1 - 1e-6, 200_001).unsqueeze(-1)
    density = model.log_prob(torch.ones(len(grid), 2) * 0.3, grid).exp()
    assert torch.trapezoid(density, grid.squeeze(-1)).item() == pytest.approx(1.0, abs=2e-3)


def test_fisher_brc_behaviour_samples_follow_the_density():
    """Samples from mu land where mu says they should (histogram vs density, one action dim)."""
    fbrc = load_algorithm("fisher_brc")
    torch.manual_seed(2)
    model = fbrc.BehaviorModel(obs_dim=2, act_dim=1, hidden_dim=16, n_components=5)
    with torch.no_grad():
        model.net[-1].weight.normal_(0, 1.0)
    obs = torch.ones(200_000, 2) * -0.4
    samples = model.sample(obs).squeeze(-1)
    edges = torch.linspace(-1, 1, 11)
    frequency = torch.histc(samples, bins=10, min=-1, max=1) / len(samples)
    grid = torch.linspace(-1 + 1e-6, 1 - 1e-6, 100_001)
    density = model.log_prob(torch.ones(len(grid), 2) * -0.4, grid.unsqueeze(-1)).exp()
    for i in range(10):
        inside = (grid >= edges[i]) & (grid < edges[i + 1])
        mass = torch.trapezoid(density[inside], grid[inside]).item()
        assert frequency[i].item() == pytest.approx(mass, abs=0.01)


def test_fisher_brc_gradient_penalty_of_known_functions():
    fbrc = load_algorithm("fisher_brc")

    class Known(torch.nn.Module):
        """O_1 = 3 * sum(a), O_2 = sum(a^2); given (2, N, A) actions, O_i reads act[i], as Offsets does."""

        def forward(self, obs, act):
            a1, a2 = act.expand(2, *act.shape[-2:])
            return 3.0 * a1.sum(-1) + obs.sum(-1), (a2**2).sum(-1)

    act = torch.tensor([[0.5, -1.0], [0.0, 2.0]])
    gp = fbrc.gradient_penalty(Known(), torch.zeros(2, 1), act)
    # ||grad O_1||^2 = 9 * 2 = 18 per row; ||grad O_2||^2 = 4 * sum a^2 = 5 and 16
    assert gp.item() == pytest.approx(((18 + 5) + (18 + 16)) / 2)


def test_fisher_brc_gradient_penalty_reaches_the_offset_parameters():
    fbrc = load_algorithm("fisher_brc")
    torch.manual_seed(0)
    offsets = fbrc.Offsets(obs_dim=3, act_dim=2, hidden_dim=8)
    gp = fbrc.gradient_penalty(offsets, torch.randn(5, 3), torch.randn(5, 2))
    gp.backward()
    # every weight matrix of both networks shapes grad_a O (the output bias cannot, and gets no gradient)
    weights = [m.weight.grad[i] for m in offsets.net if isinstance(m, fbrc.common.EnsembleLinear) for i in range(2)]
    assert len(weights) == 8 and all(w.abs().sum() > 0 for w in weights)


def test_itrpo_shaping_sign_scale_and_clip():
    itrpo = load_algorithm("itrpo")
    log_pi = torch.tensor([-1.0, -5.0, 0.0])
    log_beta = torch.tensor([-3.0, -1.0, 0.0])  # log ratios 2, -4, 0
    shaped = itrpo.shaping_reward(log_pi, log_beta, alpha=0.5, tau=0.8, clip=None)
    torch.testing.assert_close(shaped, torch.tensor([0.8, -1.6, 0.0]))  # tau * alpha * log ratio
    clipped = itrpo.shaping_reward(log_pi, log_beta, alpha=0.5, tau=0.8, clip=-1.0)
    torch.testing.assert_close(clipped, torch.tensor([0.8, -0.4, 0.0]))  # only the low side is clipped
    assert (itrpo.shaping_reward(log_pi, log_beta, alpha=0.5, tau=0.0, clip=None) == 0).all()


def test_itrpo_target_on_hand_made_values():
    itrpo = load_algorithm("itrpo")
    rewards, shaping, terminals = torch.tensor([1.0, 2.0]), torch.tensor([0.1, -0.2]), torch.tensor([0.0, 1.0])
    next_q1 = torch.tensor([[1.0, 3.0], [5.0, 5.0]])  # means 2 and 5
    next_q2 = torch.tensor([[0.0, 2.0], [9.0, 9.0]])  # means 1 and 9
    next_kl = torch.tensor([4.0, 4.0])
    y = itrpo.critic_target(rewards, shaping, terminals, next_q1, next_q2, next_kl, gamma=0.5, alpha=0.25)
    # first: 1 + 0.1 + 0.5 * (min(2, 1) - 0.25 * 4) = 1.1; second is terminal: 2 - 0.2
    torch.testing.assert_close(y, torch.tensor([1.1, 1.8]))


def test_itrpo_actor_loss_trades_q_against_kl():
    """With a critic that is constant in the action, the actor only minimises alpha * KL(pi || pi_beta)."""
    itrpo = load_algorithm("itrpo")
    torch.manual_seed(0)
    agent = itrpo.ITRPO(itrpo.Args(hidden_dim=16, n_samples=64, bc_steps=10), obs_dim=2, act_dim=1,
                        device=torch.device("cpu"))
    with torch.no_grad():  # pi_beta: mean pre-tanh action 1, std e^-1; far from the initial policy
        agent.behavior.net[-1].bias.copy_(torch.tensor([1.0, -1.0]))
    obs = torch.randn(32, 2)
    with torch.no_grad():
        kl_before = agent.kl_and_q(obs, agent.critic)[0].mean()
    batch = itrpo.common.Batch(obs, torch.zeros(32, 1), torch.zeros(32), obs, torch.ones(32))
    for _ in range(200):
        for p in agent.critic.parameters():  # keep Q constant: only the KL term remains
            torch.nn.init.zeros_(p)
        agent.train(batch)
    with torch.no_grad():
        kl_after = agent.kl_and_q(obs, agent.critic)[0].mean()
    assert kl_before > 0.5 and kl_after < 0.5 * kl_before


# ----------------------------------------------------------------------------------------------
# End to end, as a user runs them (a fresh process, from another directory)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_end_to_end(algorithm, datasets_path, tmp_path):
    out = tmp_path / "runs"
    result = run_script(
        [os.path.join(ROOT, "algorithms", f"{algorithm}.py"), "--env", "test/hopper/random-v0",
         "--total-steps", "300", "--eval-every", "150", "--log-every", "50", "--eval-episodes", "2",
         "--final-episodes", "3", "--batch-size", "32", "--output-dir", str(out), "--run-name", "r",
         "--save-model", *shrink_flags(algorithm, 100)],
        datasets_path, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "r" / "results.json").read_text())
    assert results["algorithm"] == algorithm and results["env"] == "test/hopper/random-v0"
    assert results["seed"] == 0 and results["args"]["total_steps"] == 300 and results["finished"]
    assert [e["step"] for e in results["evaluations"]] == [150, 300]
    # the final evaluation over --final-episodes, each episode's return kept
    assert [len(e["episode_returns"]) for e in results["evaluations"]] == [2, 3]
    assert results["torch"] == torch.__version__ and results["device"] == "cpu"
    for e in results["evaluations"]:
        assert set(e) >= {"step", "return_mean", "return_std", "normalized_score_mean",
                          "normalized_score_std", "wall_time"}
    assert results["final_return"] == results["evaluations"][-1]["return_mean"]
    assert results["final_normalized_score"] == pytest.approx(results["final_return"])  # refs (0, 100)
    checkpoint = torch.load(out / "r" / "model.pt", weights_only=True)
    assert checkpoint["algorithm"] == algorithm and "actor" in checkpoint
    assert checkpoint["args"]["env"] == "test/hopper/random-v0"
    if checkpoint["args"]["normalize_states"]:  # the raw-state files save None
        assert checkpoint["obs_mean"].shape == (11,)
    else:
        assert checkpoint["obs_mean"] is None and checkpoint["obs_std"] is None
    check_saved_model(out / "r")  # tools/evaluate.py gives the final evaluation again
    check_curves(out / "r", 300, phases=("behaviour model",) if algorithm in ("fisher_brc", "itrpo") else ())
    assert "step 300/300" in result.stdout


ALL_FILES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "algorithms")) if f.endswith(".py"))


def shared_args_block(algorithm: str) -> str:
    """The lines of Args from '# --- shared by every algorithm ---' to the algorithm's own section."""
    with open(os.path.join(ROOT, "algorithms", f"{algorithm}.py")) as f:
        text = f.read()
    start = text.index("    # --- shared by every algorithm ---")
    return text[start:text.index("    # --- ", start + 10)]


def test_every_file_has_the_same_shared_flags_block():
    """The README's promise that `diff td3_bc.py iql.py` shows only the algorithm rests on this."""
    assert len(ALL_FILES) == 9
    reference = shared_args_block("bc")
    for algorithm in ALL_FILES:
        assert shared_args_block(algorithm) == reference, algorithm


def test_the_pretraining_list_names_every_phase_and_only_real_flags():
    """tools/pretraining.py is how the benchmark, tools/bench_cpu.py and these tests size the phases
    besides the RL updates; a renamed flag would otherwise be passed to nothing, or not passed."""
    for algorithm in ALL_FILES:
        fields = {f.name for f in dataclasses.fields(load_algorithm(algorithm).Args)}
        flags = {"--" + name.replace("_", "-") for name in fields}
        phases = fields & {"bc_steps", "pretrain_steps"}
        assert set(PRETRAINING.get(algorithm, ())) == {"--" + name.replace("_", "-") for name in phases}, algorithm
        assert (algorithm in BC_WARMUP) == ("bc_warmup_steps" in fields), algorithm
        assert {x for x in shrink_flags(algorithm, 1) if x.startswith("--")} <= flags, algorithm


@pytest.mark.parametrize("algorithm", ALL_FILES)
def test_help_works_and_lists_the_shared_flags(algorithm, capsys):
    """The scripts parse with tyro.cli(Args), here in this process (end to end they run below)."""
    with pytest.raises(SystemExit) as exit:
        tyro.cli(load_algorithm(algorithm).Args, args=["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--env", "--seed", "--total-steps", "--batch-size", "--eval-every", "--eval-episodes",
                 "--log-every", "--device", "--output-dir", "--run-name", "--save-model", "--track",
                 "--wandb-project", "--capture-video"):
        assert flag in out, (algorithm, flag)


def test_dict_observation_dataset_trains(datasets_path, tmp_path):
    result = run_script(
        [os.path.join(ROOT, "algorithms", "iql.py"), "--env", "test/pointmaze/random-v0",
         "--total-steps", "20", "--eval-every", "20", "--eval-episodes", "2", "--batch-size", "16",
         "--output-dir", str(tmp_path), "--run-name", "r"], datasets_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "results.json").read_text())["finished"]
