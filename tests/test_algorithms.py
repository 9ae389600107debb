"""The algorithm files: key math on hand-made inputs, and each one end to end as a user runs it."""

import importlib.util
import json
import math
import os

import pytest
import torch

from conftest import ROOT, run_script

ALGORITHMS = ["bc", "td3_bc", "awr", "iql", "cql"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "algorithms", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# Math on hand-made inputs
# ----------------------------------------------------------------------------------------------
def test_expectile_loss_weights_the_two_sides_asymmetrically():
    iql = load("iql")
    diff = torch.tensor([2.0, -2.0])  # Q - V: V too low on the first, too high on the second
    assert iql.expectile_loss(diff[:1], 0.7).item() == pytest.approx(0.7 * 4.0)
    assert iql.expectile_loss(diff[1:], 0.7).item() == pytest.approx(0.3 * 4.0)
    assert iql.expectile_loss(diff, 0.7).item() == pytest.approx((0.7 * 4 + 0.3 * 4) / 2)
    # tau = 0.5 is half the mean squared error
    d = torch.randn(100)
    assert iql.expectile_loss(d, 0.5).item() == pytest.approx(0.5 * (d**2).mean().item(), rel=1e-6)


def test_expectile_regression_finds_the_expectile():
    """Minimising the loss over a constant V gives the tau-expectile: above the mean for tau > 0.5."""
    iql = load("iql")
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
    td3_bc = load("td3_bc")
    q = torch.tensor([1.0, -3.0, 2.0], requires_grad=True)
    pi = torch.tensor([[0.5], [0.0], [-0.5]], requires_grad=True)
    a = torch.tensor([[0.0], [0.0], [0.0]])
    loss, lmbda = td3_bc.actor_loss(q, pi, a, alpha=2.5)
    assert lmbda.item() == pytest.approx(2.5 / 2.0)  # mean |Q| = 2
    assert loss.item() == pytest.approx(-1.25 * 0.0 + (0.25 + 0 + 0.25) / 3)
    loss.backward()
    # lambda is a constant: the gradient wrt Q is -lambda / N, not affected by |Q|
    torch.testing.assert_close(q.grad, torch.full((3,), -1.25 / 3))


def test_awr_weights_are_exponentiated_and_clipped():
    awr = load("awr")
    adv = torch.tensor([0.0, 1.0, -1.0, 10.0])
    w = awr.awr_weights(adv, awr_lambda=0.5, max_weight=100.0)
    torch.testing.assert_close(w, torch.tensor([1.0, torch.e**2, torch.e**-2, 100.0]))
    assert (awr.awr_weights(torch.randn(1000) * 50, 1 / 3, 100.0) <= 100.0).all()


def test_iql_picks_per_domain_defaults_from_the_dataset_id():
    iql = load("iql")
    assert iql.domain_defaults("D4RL/antmaze/umaze-v1") == {
        "expectile": 0.9, "beta": 10.0, "dropout": 0.0, "reward_transform": "minus-one"}
    assert iql.domain_defaults("D4RL/pen/human-v2")["dropout"] == 0.1
    assert iql.domain_defaults("D4RL/kitchen/mixed-v2")["beta"] == 0.5
    assert iql.domain_defaults("mujoco/hopper/medium-v0") == {
        "expectile": 0.7, "beta": 3.0, "dropout": 0.0, "reward_transform": "return-range"}


def test_awr_critic_target_uses_policy_actions_and_masks_terminals():
    """One train step on a batch where every transition is terminal: the target is the reward."""
    awr = load("awr")
    args = awr.Args(hidden_dim=16)
    torch.manual_seed(0)
    agent = awr.AWR(args, obs_dim=3, act_dim=2, device=torch.device("cpu"))
    batch = (torch.randn(8, 3), torch.rand(8, 2) * 2 - 1, torch.full((8,), 5.0), torch.randn(8, 3),
             torch.ones(8))
    q1_before, q2_before = agent.critic(batch[0], batch[1])
    expected = ((q1_before - 5.0) ** 2).mean() + ((q2_before - 5.0) ** 2).mean()
    metrics = agent.train(batch)
    assert metrics["losses/critic_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_cql_logsumexp_divides_each_sample_by_its_proposal_density():
    cql = load("cql")
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
    cql = load("cql")
    args = cql.Args(hidden_dim=32, n_actions=4, **overrides)
    torch.manual_seed(0)
    return cql, cql.CQL(args, obs_dim=3, act_dim=2, device=torch.device("cpu"))


def random_batch(n=16):
    torch.manual_seed(1)
    return (torch.randn(n, 3), torch.rand(n, 2) * 1.8 - 0.9, torch.randn(n), torch.randn(n, 3), torch.zeros(n))


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
    _, agent = cql_agent(bc_steps=10**9)
    batch = random_batch(32)
    obs, actions = batch[0], batch[1]
    for _ in range(300):
        agent.train(batch)
    with torch.no_grad():
        q_data = torch.min(*agent.critic(obs, actions)).mean()
        q_rand = torch.min(*agent.critic(obs, torch.rand(32, 2) * 2 - 1)).mean()
    assert q_data > q_rand + 0.5


def test_cql_actor_clones_behaviour_during_bc_steps():
    """During the BC phase the actor's loss ignores Q: scaling the critic changes nothing."""
    _, agent = cql_agent(bc_steps=5)
    batch = random_batch()
    torch.manual_seed(3)
    loss_a = agent.train(batch)["losses/actor_loss"]
    _, agent2 = cql_agent(bc_steps=5)
    with torch.no_grad():
        for p in agent2.critic.parameters():
            p.mul_(3.0)
    torch.manual_seed(3)
    loss_b = agent2.train(batch)["losses/actor_loss"]
    assert loss_a.item() == pytest.approx(loss_b.item())
    _, agent3 = cql_agent(bc_steps=0)
    torch.manual_seed(3)
    loss_c = agent3.train(batch)["losses/actor_loss"]
    assert loss_c.item() != pytest.approx(loss_a.item())


# ----------------------------------------------------------------------------------------------
# End to end, as a user runs them (a fresh process, from another directory)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_end_to_end(algorithm, datasets_path, tmp_path):
    out = tmp_path / "runs"
    result = run_script(
        [os.path.join(ROOT, "algorithms", f"{algorithm}.py"), "--env", "test/hopper/random-v0",
         "--total-steps", "300", "--eval-every", "150", "--log-every", "50", "--eval-episodes", "2",
         "--batch-size", "32", "--output-dir", str(out), "--run-name", "r", "--save-model"],
        datasets_path, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "r" / "results.json").read_text())
    assert results["algorithm"] == algorithm and results["env"] == "test/hopper/random-v0"
    assert results["seed"] == 0 and results["args"]["total_steps"] == 300 and results["finished"]
    assert [e["step"] for e in results["evaluations"]] == [150, 300]
    for e in results["evaluations"]:
        assert set(e) >= {"step", "return_mean", "return_std", "normalized_score_mean",
                          "normalized_score_std", "wall_time"}
    assert results["final_return"] == results["evaluations"][-1]["return_mean"]
    assert results["final_normalized_score"] == pytest.approx(results["final_return"])  # refs (0, 100)
    checkpoint = torch.load(out / "r" / "model.pt", weights_only=False)
    assert checkpoint["algorithm"] == algorithm and "actor" in checkpoint
    assert checkpoint["obs_mean"].shape == (11,) and checkpoint["args"]["env"] == "test/hopper/random-v0"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "r"))
    assert "step 300/300" in result.stdout


def test_help_lists_the_shared_flags(datasets_path):
    for algorithm in ALGORITHMS:
        result = run_script([os.path.join("algorithms", f"{algorithm}.py"), "--help"], datasets_path)
        assert result.returncode == 0
        for flag in ("--env", "--seed", "--total-steps", "--batch-size", "--eval-every",
                     "--eval-episodes", "--device", "--output-dir", "--save-model", "--track"):
            assert flag in result.stdout, (algorithm, flag)


def test_dict_observation_dataset_trains(datasets_path, tmp_path):
    result = run_script(
        [os.path.join(ROOT, "algorithms", "iql.py"), "--env", "test/pointmaze/random-v0",
         "--total-steps", "20", "--eval-every", "20", "--eval-episodes", "2", "--batch-size", "16",
         "--output-dir", str(tmp_path), "--run-name", "r"], datasets_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "results.json").read_text())["finished"]
