"""ARQ (algorithms/arq.py): the score model on a one-dimensional conditional toy in the spirit of the
paper's Figure A.1, the support-set and K-th-largest bookkeeping on hand-made inputs, the caches, and
the script end to end."""

import itertools
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT, check_curves, check_saved_model, load_algorithm, run_script


arq = load_algorithm("arq")

# beta(a|s): two uniform modes of width 0.3 whose positions jump at s = 0 (bimodal, discontinuous in s).
MODES = {-1: ((-0.8, -0.5), (0.3, 0.6)), 1: ((-0.3, 0.0), (0.6, 0.9))}


def toy_batch(n: int, gen: torch.Generator):
    s = torch.rand(n, 1, generator=gen) * 2 - 1
    first = torch.rand(n, 1, generator=gen) < 0.5
    lo = torch.where(s < 0, torch.where(first, MODES[-1][0][0], MODES[-1][1][0]),
                     torch.where(first, MODES[1][0][0], MODES[1][1][0]))
    return s, lo + 0.3 * torch.rand(n, 1, generator=gen)


def in_mode(act: torch.Tensor, side: int, k: int) -> torch.Tensor:
    lo, hi = MODES[side][k]
    return (act > lo) & (act < hi)


@pytest.fixture(scope="module")
def toy_model():
    """A small score model after a short training (a few seconds on one core). From the Glorot
    initialisation 3000 steps at 1e-3 leave 60-70% of the samples in the modes, at 3e-3 85-90%."""
    args = arq.Args(score_hidden_dim=64, score_blocks=2, score_lr=3e-3, ema=0.99)
    torch.manual_seed(0)
    model = arq.ScoreModel(1, 1, args)
    gen = torch.Generator().manual_seed(0)
    s, a = toy_batch(20_000, gen)
    model.set_normalization(s, a)
    opt = torch.optim.Adam(model.net.parameters(), lr=args.score_lr)
    for _ in range(3000):
        idx = torch.randint(0, len(s), (256,), generator=gen)
        loss = model.loss(s[idx], a[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_ema(args.ema)
    return model


def log_likelihood(model, state: float, actions: torch.Tensor, steps: int = 20) -> torch.Tensor:
    s = model.condition(torch.full((len(actions), 1), state))
    return model.log_likelihood(s, model.to_x(actions[:, None]), steps, 10, 10, torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------
# Score model on the toy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", [-1, 1])
def test_log_likelihood_is_higher_in_support_than_out_of_support(toy_model, side):
    inside = torch.tensor([(lo + hi) / 2 for lo, hi in MODES[side]])
    (lo0, hi0), (lo1, hi1) = MODES[side]
    outside = torch.tensor([-1.0, -0.97, (hi0 + lo1) / 2, 0.97, 1.0])
    ll_in, ll_out = log_likelihood(toy_model, 0.5 * side, inside), log_likelihood(toy_model, 0.5 * side, outside)
    assert ll_in.min() > ll_out.max() + 1.0, (ll_in, ll_out)
    assert ll_in.mean() > ll_out.mean() + 3.0, (ll_in, ll_out)


def test_log_likelihood_follows_the_discontinuity_in_the_state(toy_model):
    """-0.65 is in support for s < 0 only, 0.75 for s > 0 only."""
    a = torch.tensor([-0.65, 0.75])
    left, right = log_likelihood(toy_model, -0.5, a), log_likelihood(toy_model, 0.5, a)
    assert left[0] > right[0] + 2.0 and right[1] > left[1] + 2.0, (left, right)


def test_likelihood_ode_converges_in_few_steps(toy_model):
    a = torch.linspace(-1.0, 1.0, 21)
    fine, coarse = log_likelihood(toy_model, -0.5, a, steps=200), log_likelihood(toy_model, -0.5, a, steps=20)
    assert (fine - coarse).abs().max() < 0.5


@pytest.mark.parametrize("sampler,steps", [("pc", 500), ("ode", 20)])
@pytest.mark.parametrize("side", [-1, 1])
def test_samplers_produce_both_modes(toy_model, sampler, steps, side):
    s = toy_model.condition(torch.full((400, 1), 0.5 * side))
    x = toy_model.sample(s, sampler, steps, 0.16, 400, torch.Generator().manual_seed(1))
    act = toy_model.to_action(x)[:, 0]
    first, second = in_mode(act, side, 0).float().mean(), in_mode(act, side, 1).float().mean()
    assert first + second > 0.65, (first, second)  # the modes cover 30% of [-1, 1]
    assert first > 0.15 and second > 0.15, (first, second)  # a lost mode gets ~0


def test_exact_divergence_equals_hutchinson_over_all_sign_vectors():
    """Averaging z^T J z over all 2^d Rademacher vectors cancels the off-diagonal terms exactly."""
    args = arq.Args(score_hidden_dim=32, score_blocks=1)
    torch.manual_seed(0)
    model = arq.ScoreModel(2, 3, args)
    x, s, t = torch.randn(5, 3), torch.randn(5, 2), torch.rand(5) * 0.9 + 0.05
    probes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)))[:, None, :].expand(-1, 5, -1)
    drift, exact = model._drift_and_divergence(x, s, t, None)
    drift_h, hutchinson = model._drift_and_divergence(x, s, t, probes)
    torch.testing.assert_close(exact, hutchinson, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(drift, drift_h)


# ----------------------------------------------------------------------------------------------
# Support set and backup on hand-made values
# ----------------------------------------------------------------------------------------------
def test_kth_largest_over_the_valid_entries():
    values = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0],
                           [5.0, 1.0, 4.0, 3.0, 2.0],
                           [0.0, 9.0, 8.0, 7.0, 6.0],
                           [2.0, 1.0, 4.0, 3.0, 5.0]])
    valid = torch.tensor([[True] * 5,
                          [True, True, False, True, False],  # 5, 1, 3 survive
                          [True, False, False, True, True],  # 0, 7, 6 survive
                          [True, False, False, False, False]])  # only the dataset action
    torch.testing.assert_close(arq.kth_largest(values, valid, 1), torch.tensor([5.0, 5.0, 7.0, 2.0]))
    torch.testing.assert_close(arq.kth_largest(values, valid, 3), torch.tensor([3.0, 1.0, 0.0, 2.0]))
    # fewer than K survive: the smallest survivor
    torch.testing.assert_close(arq.kth_largest(values, valid, 4), torch.tensor([2.0, 1.0, 0.0, 2.0]))
    torch.testing.assert_close(arq.kth_largest(values, valid, 9), torch.tensor([1.0, 1.0, 0.0, 2.0]))


def test_dataset_action_survives_filtering_and_rows_without_one_keep_their_best_sample():
    dataset_actions = torch.tensor([[0.1], [0.2]])
    samples = torch.tensor([[[0.5], [0.6], [0.7]], [[0.5], [0.6], [0.7]], [[-0.5], [-0.6], [-0.7]]])
    ll = torch.tensor([[-9.0, -9.0, -9.0], [-1.0, -6.0, -4.0], [-8.0, -7.0, -9.0]])
    support = arq.build_support(dataset_actions, samples, ll, -5.0, torch.tensor([1, 2]))
    assert support.valid.tolist() == [[True, False, False, False], [True, True, False, True],
                                      [False, False, True, False]]
    torch.testing.assert_close(support.actions[:2, 0], dataset_actions)
    torch.testing.assert_close(support.actions[:, 1:], samples)


def test_support_rows_of_next_states():
    """Two episodes: 3 transitions ending in a truncation, 2 ending in a termination."""
    obs = torch.arange(5.0)[:, None]
    data = SimpleNamespace(observations=obs, next_observations=obs + 0.5,
                           terminals=torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]),
                           episode_starts=np.array([0, 3]), episode_lengths=np.array([3, 2]))
    states, next_row = arq.support_states(data)
    assert next_row.tolist() == [1, 2, 5, 4, 4]  # truncated end: extra row 5; terminal: itself
    torch.testing.assert_close(states[5], obs[2] + 0.5)


class StopAfter:
    """Stands in for common.Run: a stop signal arrives after `calls` batches."""

    def __init__(self, calls: int):
        self.calls = calls

    @property
    def signalled(self):  # as Run.signalled: None until a signal came
        self.calls -= 1
        return 15 if self.calls < 0 else None

    def exit(self, what: str) -> None:
        raise SystemExit(143)


def test_support_generation_stopped_twice_goes_on_to_the_uninterrupted_result(tmp_path, capsys):
    """10 states in batches of 3: stopped after the first batch, then after the second, then run to
    the end; each start seeds its generator afresh, as the script does. A damaged progress file
    starts over."""
    args = arq.Args(score_hidden_dim=16, score_blocks=1, n_support=4, sampler_steps=3, likelihood_steps=2,
                    sample_batch_states=3)
    torch.manual_seed(0)
    model = arq.ScoreModel(2, 2, args)
    states = torch.randn(10, 2)
    partial = str(tmp_path / "support.partial.pt")
    quiet = lambda *a, **k: None  # noqa: E731
    whole = arq.generate_support(model, states, args, torch.Generator().manual_seed(7), partial, None, quiet)
    assert torch.load(partial)["rows"] == 9  # saved with the progress line at 90%, removed by the script
    os.remove(partial)

    for calls in (0, 0):
        with pytest.raises(SystemExit):
            arq.generate_support(model, states, args, torch.Generator().manual_seed(7), partial, StopAfter(calls),
                                 quiet)
    assert torch.load(partial)["rows"] == 6
    resumed = arq.generate_support(model, states, args, torch.Generator().manual_seed(7), partial,
                                   StopAfter(99), quiet)
    for a, b in zip(whole, resumed):
        assert torch.equal(a, b)

    with open(partial, "wb") as f:
        f.write(b"not a checkpoint")
    lines = []
    again = arq.generate_support(model, states, args, torch.Generator().manual_seed(7), partial, None,
                                 lambda line, **k: lines.append(line))
    assert "cannot be read" in capsys.readouterr().out and "going on from" not in " ".join(lines)
    for a, b in zip(whole, again):
        assert torch.equal(a, b)

    # progress made with other batches draws other noise from the stream: it is not continued
    os.remove(partial)
    with pytest.raises(SystemExit):
        arq.generate_support(model, states, args, torch.Generator().manual_seed(7), partial, StopAfter(0), quiet)
    args.sample_batch_states, lines = 4, []
    by_four = arq.generate_support(model, states, args, torch.Generator().manual_seed(7), partial, None,
                                   lambda line, **k: lines.append(line))
    assert "made with --sample-batch-states 3" in lines[0]
    os.remove(partial)
    fresh = arq.generate_support(model, states, args, torch.Generator().manual_seed(7), partial, None, quiet)
    for a, b in zip(fresh, by_four):
        assert torch.equal(a, b)


def test_backup_is_floored_by_the_dataset_action_and_ignores_dropped_samples():
    args = arq.Args(hidden_dim=8, kth=2, policy="implicit", gamma=0.5, tau=0.0, critic_lr=3e-4)
    agent = arq.ARQ(args, obs_dim=1, act_dim=1, device=torch.device("cpu"))

    class FixedQ(arq.Critic):  # Q(s, a) = 10 a for both twins; its unused weights take the Polyak step
        def forward(self, obs, act):
            return 10 * act[..., 0], 10 * act[..., 0]

    agent.critic_target = FixedQ(obs_dim=1, act_dim=1, hidden_dim=8)
    sup = torch.tensor([[[0.3], [0.9], [0.5], [0.1]], [[0.8], [0.2], [0.4], [0.6]]])
    valid = torch.tensor([[True, False, True, True], [True, True, True, True]])
    batch = arq.SupportBatch(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2), torch.zeros(2, 1),
                             torch.zeros(2), sup, valid, sup, valid)
    metrics = agent.train(batch)
    # row 0: kept 3, 5, 1 -> 2nd largest 3 (= the dataset action's 3); row 1: 2nd largest 6 < floor 8
    assert metrics["charts/backup"].item() == pytest.approx((3.0 + 8.0) / 2)


# ----------------------------------------------------------------------------------------------
# Policies and initialisation as in the authors' code (hiwonjoon/ARQ-public)
# ----------------------------------------------------------------------------------------------
class HandMadeQ(arq.Critic):
    """Q_i(s, a) = f_i(a_1); its unused weights take the Polyak step."""

    def __init__(self, f1, f2, act_dim=1):
        super().__init__(obs_dim=1, act_dim=act_dim, hidden_dim=8)
        self.f1, self.f2 = f1, f2

    def forward(self, obs, act):
        return torch.stack([self.f1(act[..., 0]), self.f2(act[..., 0])])


def implicit_choice(samples, target_q1, target_q2, online_q):
    """The implicit policy's action at one state whose N samples are `samples` (standardised space
    = action space here), with log-likelihood -2 x^2 (threshold -5: |x| < 1.58 is kept); alpha so
    large that the choice is the argmax."""
    args = arq.Args(hidden_dim=8, policy="implicit", alpha=1e4, kth=2, critic_lr=3e-4, n_support=len(samples))
    agent = arq.ARQ(args, obs_dim=1, act_dim=1, device=torch.device("cpu"))
    agent.score.sample = lambda s, *a, **k: torch.tensor(samples)[:, None]
    agent.score.log_likelihood = lambda s, x, *a, **k: -2.0 * x[:, 0] ** 2
    agent.critic_target = HandMadeQ(target_q1, target_q2)
    agent.critic = HandMadeQ(online_q, online_q)
    return agent.act(torch.zeros(1, 1)).item()


def test_implicit_policy_scores_the_clipped_sample():
    """The sample 3.0 is out of support as drawn (log-likelihood -18) and in it once clipped to 1
    (-2), where Q = -(a - 1)^2 is highest."""
    q = lambda a: -(a - 1.0) ** 2  # noqa: E731
    assert implicit_choice([3.0, 0.9, -0.5], q, q, q) == 1.0


def test_implicit_policy_scores_with_the_first_target_q_alone():
    """The code's grader is q0's target network: Q_targ_1 = a picks 0.9; min(Q_targ_1, Q_targ_2) =
    -|a| would pick 0.2, the online critic (-a) -0.5."""
    assert implicit_choice([0.9, -0.5, 0.2], lambda a: a, lambda a: -a, lambda a: -a) == pytest.approx(0.9)


def test_deterministic_policy_has_no_tanh_and_halves_the_weighted_mean_squared_error():
    """arq/modules/policy.py, DeterministicPolicy with squash_output=False: a = net(s), loss
    0.5 * mean(w * mean_j (a_j - a_D,j)^2); the action is clipped to the box only when acting."""
    args = arq.Args(hidden_dim=8, kth=2, alpha=10.0, deterministic_policy=True, critic_lr=3e-4, actor_lr=0.0)
    agent = arq.ARQ(args, obs_dim=1, act_dim=2, device=torch.device("cpu"))
    agent.critic_target = HandMadeQ(torch.zeros_like, torch.zeros_like, act_dim=2)  # A = 0, every weight 1
    with torch.no_grad():
        agent.actor.mean[-1].weight.zero_()
        agent.actor.mean[-1].bias.copy_(torch.tensor([2.0, -0.5]))  # mu(s) = (2, -0.5) everywhere
    actions = torch.tensor([[0.5, 0.5], [1.0, -1.0]])
    sup = torch.zeros(2, 3, 2)
    valid = torch.ones(2, 3, dtype=torch.bool)
    batch = arq.SupportBatch(torch.zeros(2, 1), actions, torch.zeros(2), torch.zeros(2, 1), torch.zeros(2),
                             sup, valid, sup, valid)
    metrics = agent.train(batch)
    # rows: (1.5^2 + 1^2) / 2 = 1.625 and (1^2 + 0.5^2) / 2 = 0.625; half their mean
    assert metrics["losses/actor_loss"].item() == pytest.approx(0.5 * (1.625 + 0.625) / 2)
    torch.testing.assert_close(agent.act(torch.zeros(1, 1)), torch.tensor([[1.0, -0.5]]))


def test_every_layer_starts_as_a_keras_dense_layer():
    """Glorot-uniform weights (bound sqrt(6 / (fan_in + fan_out)), std bound / sqrt(3)) and zero biases
    in the critic, the policy and the score network (Keras' defaults, which the code keeps)."""
    args = arq.Args(critic_lr=3e-4, score_blocks=1)
    torch.manual_seed(0)
    agent = arq.ARQ(args, obs_dim=17, act_dim=6, device=torch.device("cpu"))
    layers = [(m.weight, m.bias, m.in_features, m.out_features)
              for net in (agent.actor, agent.score.net, agent.score.ema_net)
              for m in net.modules() if isinstance(m, torch.nn.Linear)]
    layers += [(m.weight, m.bias, *m.weight.shape[1:]) for m in agent.critic.modules()
               if isinstance(m, arq.common.EnsembleLinear)]
    assert len(layers) == 3 + 2 * 5 + 3
    for weight, bias, fan_in, fan_out in layers:
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        assert (bias == 0).all()
        assert weight.abs().max() <= bound and weight.abs().max() > 0.95 * bound, (fan_in, fan_out)
        assert weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.1), (fan_in, fan_out)


# ----------------------------------------------------------------------------------------------
# End to end, and the caches
# ----------------------------------------------------------------------------------------------
TINY = ["--bc-steps", "30", "--n-support", "4", "--sampler-steps", "4", "--likelihood-steps", "2",
        "--score-hidden-dim", "16", "--score-blocks", "1", "--score-batch-size", "64", "--hidden-dim", "16",
        "--batch-size", "32", "--total-steps", "20", "--eval-every", "20", "--log-every", "10",
        "--eval-episodes", "2", "--device", "cpu"]


def test_arq_end_to_end_and_the_caches_are_reused(datasets_path, tmp_path):
    common_args = [os.path.join(ROOT, "algorithms", "arq.py"), "--env", "test/hopper/random-v0",
                   "--output-dir", str(tmp_path), "--save-model", *TINY]
    first = run_script([*common_args, "--seed", "0", "--run-name", "first"], datasets_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "score model step 30" in first.stdout and "[arq] support 100.0%" in first.stdout
    check_curves(tmp_path / "first", 20, phases=("score model",))
    cache = os.listdir(tmp_path / "arq_support_cache")
    assert sorted(name.split("_")[0] for name in cache) == ["score", "support"]

    # another seed and the implicit policy: nothing is trained or generated again (two evaluations:
    # the second draws the same noise as a lone one, which tools/evaluate.py replays)
    second = run_script([*common_args, "--seed", "1", "--run-name", "second", "--policy", "implicit",
                         "--eval-every", "10"], datasets_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing the cached pretrained model" in second.stdout and "reusing cached support" in second.stdout
    assert "score model step" not in second.stdout and "generating the support" not in second.stdout
    assert sorted(os.listdir(tmp_path / "arq_support_cache")) == sorted(cache)
    for name in ("first", "second"):
        results = json.load(open(tmp_path / name / "results.json"))
        assert results["finished"] and np.isfinite(results["final_return"])
        check_saved_model(tmp_path / name)  # the AWR and the implicit policy, from model.pt alone

    # another sampler is another support, from the same score model
    third = run_script([*common_args, "--run-name", "third", "--sampler", "ode"], datasets_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "reusing the cached pretrained model" in third.stdout and "generating the support" in third.stdout
