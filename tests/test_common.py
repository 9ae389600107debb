"""common.py: loading and flattening data, normalisation, reward transforms, evaluation, files."""

import dataclasses
import json
import os

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch

import common
from conftest import ROOT


def test_flattening_aligns_transitions_within_episodes(datasets_path):
    raw = minari.load_dataset("test/hopper/random-v0")
    data = common.load_dataset("test/hopper/random-v0")
    episodes = list(raw.iterate_episodes())
    assert len(data) == sum(len(ep.rewards) for ep in episodes) == data.episode_lengths.sum()
    for ep, start in zip(episodes, data.episode_starts):
        n = len(ep.rewards)
        obs = ep.observations.astype(np.float32)
        np.testing.assert_allclose(data.observations[start:start + n].numpy(), obs[:-1])
        np.testing.assert_allclose(data.next_observations[start:start + n].numpy(), obs[1:])
        np.testing.assert_allclose(data.actions[start:start + n].numpy(), ep.actions, atol=1e-6)
        np.testing.assert_allclose(data.rewards[start:start + n].numpy(), ep.rewards, rtol=1e-6)
    # episode returns are the raw (untransformed) sums
    np.testing.assert_allclose(data.episode_returns, [ep.rewards.sum() for ep in episodes], rtol=1e-5)
    assert data.observations.dtype == torch.float32


def test_terminals_come_from_terminations_and_truncations_are_kept(datasets_path):
    raw = minari.load_dataset("test/hopper/random-v0")
    data = common.load_dataset("test/hopper/random-v0")
    terms = np.concatenate([ep.terminations for ep in raw.iterate_episodes()])
    truncs = np.concatenate([ep.truncations for ep in raw.iterate_episodes()])
    assert terms.any() and truncs.any(), "the test dataset must contain both kinds of episode end"
    np.testing.assert_array_equal(data.terminals.numpy(), terms.astype(np.float32))
    np.testing.assert_array_equal(data.timeouts.numpy(), truncs.astype(np.float32))
    # a truncated transition is a normal transition: bootstrapped (terminal 0), last of its episode
    last = data.episode_starts + data.episode_lengths - 1
    truncated_last = last[data.timeouts.numpy()[last] == 1]
    assert len(truncated_last) > 0 and (data.terminals.numpy()[truncated_last] == 0).all()


def test_dict_observations_concatenate_observation_and_goal(datasets_path):
    raw = minari.load_dataset("test/pointmaze/random-v0")
    data = common.load_dataset("test/pointmaze/random-v0")
    ep = next(iter(raw.iterate_episodes()))
    expected = np.concatenate([ep.observations["observation"], ep.observations["desired_goal"]], axis=1)
    assert data.obs_dim == expected.shape[1] == 6
    n = len(ep.rewards)
    np.testing.assert_allclose(data.observations[:n].numpy(), expected[:-1], rtol=1e-6)
    np.testing.assert_allclose(data.next_observations[:n].numpy(), expected[1:], rtol=1e-6)


@pytest.fixture(scope="module")
def antmaze(datasets_path):
    """A tiny AntMaze dataset (v4: a 27-number `observation`, as in Minari's D4RL/antmaze)."""
    from conftest import build_dataset

    build_dataset("test/antmaze/random-v0", "AntMaze_UMaze-v4", n_episodes=3, max_steps=12)
    return "test/antmaze/random-v0"


def test_antmaze_observations_lead_with_the_position(antmaze):
    """AntMaze's `observation` lacks the torso's x, y (only `achieved_goal` has them): the flat state
    is concat(achieved_goal, observation, desired_goal), D4RL's order."""
    raw = minari.load_dataset(antmaze)
    data = common.load_dataset(antmaze)
    assert data.obs_dim == 2 + 27 + 2
    for ep, start in zip(raw.iterate_episodes(), data.episode_starts):
        n, o = len(ep.rewards), ep.observations
        expected = np.concatenate([o["achieved_goal"], o["observation"], o["desired_goal"]], axis=1)
        np.testing.assert_allclose(data.observations[start:start + n].numpy(), expected[:-1], rtol=1e-6)
        np.testing.assert_allclose(data.next_observations[start:start + n].numpy(), expected[1:], rtol=1e-6)


def test_antmaze_evaluation_gives_the_policy_the_position(antmaze):
    data = common.load_dataset(antmaze)
    seen = []

    def policy(obs):
        seen.append(obs.clone())
        return torch.zeros(obs.shape[0], data.act_dim)

    common.evaluate(data, policy, n_episodes=2, seed=3)
    assert seen[0].shape == (2, 31)
    for i in range(2):  # the same rollout by hand: the first two columns are the env's x, y
        env = data.make_env()
        obs, _ = env.reset(seed=3 + i)
        for t in range(5):
            np.testing.assert_allclose(seen[t][i, :2].numpy(), obs["achieved_goal"], rtol=1e-6)
            np.testing.assert_allclose(seen[t][i, 29:].numpy(), obs["desired_goal"], rtol=1e-6)
            obs, *_ = env.step(np.zeros(data.act_dim, dtype=np.float32))
        env.close()


def test_actions_are_rescaled_to_unit_box(datasets_path):
    raw = minari.load_dataset("test/pendulum/random-v0")  # Pendulum's torque is in [-2, 2]
    data = common.load_dataset("test/pendulum/random-v0")
    actions = np.concatenate([ep.actions for ep in raw.iterate_episodes()])
    np.testing.assert_allclose(data.actions.numpy(), actions / 2.0, atol=1e-6)
    assert data.actions.abs().max() <= 1.0
    np.testing.assert_array_equal(data.action_low, [-2.0])


def test_normalisation_round_trip(datasets_path):
    data = common.load_dataset("test/hopper/random-v0")
    original = data.observations.clone()
    mean, std = common.normalize_obs(data)
    assert torch.allclose(data.observations.mean(0), torch.zeros(data.obs_dim), atol=1e-4)
    torch.testing.assert_close(data.observations * std + mean, original, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std, original.std(0) + 1e-3)


@pytest.mark.parametrize("name,expected", [
    ("none", lambda r, ret: r),
    ("return-range", lambda r, ret: r * 1000.0 / (ret.max() - ret.min())),
    ("minus-one", lambda r, ret: r - 1.0),
    ("cql-antmaze", lambda r, ret: (r - 0.5) * 4.0),
    ("min-max", lambda r, ret: (r - r.min()) / (r.max() - r.min())),
    ("plus-five", lambda r, ret: r + 5.0),
])
def test_reward_transforms(datasets_path, name, expected):
    data = common.load_dataset("test/hopper/random-v0")
    r = data.rewards.numpy().astype(np.float64).copy()
    common.transform_rewards(data, name)
    np.testing.assert_allclose(data.rewards.numpy(), expected(r, data.episode_returns), rtol=1e-5, atol=1e-5)


def test_normalized_score_arithmetic():
    np.testing.assert_allclose(common.normalized_score(np.array([-20.0, 3234.3 * 0.5]), -20.0, 3234.3 * 0.5),
                               [0.0, 100.0])
    np.testing.assert_allclose(common.normalized_score(np.array([50.0]), 0.0, 200.0), [25.0])
    assert common.normalized_score(np.array([1.0]), None, None) is None


def test_reference_scores_come_from_the_dataset_else_from_d4rls_constants_for_mujoco_ids(datasets_path):
    assert (common.load_dataset("test/hopper/random-v0").ref_scores_source, common.load_dataset(
        "test/pendulum/noref-v0").ref_min_score) == ("dataset", None)
    assert common.D4RL_REF_SCORES["hopper"] == (-20.272305, 3234.3)
    assert common.dataset_task("mujoco/hopper/medium-v0") in common.D4RL_REF_SCORES
    assert common.dataset_task("mujoco/swimmer/medium-v0") not in common.D4RL_REF_SCORES


def test_evaluate_matches_a_manual_rollout(datasets_path):
    """The vector-env evaluation gives the same returns as stepping each seeded env by hand."""
    data = common.load_dataset("test/pendulum/random-v0")
    mean, std = data.observations.mean(0), data.observations.std(0) + 1e-3
    weights = torch.tensor([0.3, -0.2, 0.5])

    def policy(obs):  # deterministic, depends on the (normalised) observation
        return torch.tanh(obs @ weights).unsqueeze(-1)

    result = common.evaluate(data, policy, n_episodes=3, seed=7, obs_mean=mean, obs_std=std)
    returns = []
    for i in range(3):
        env = data.make_env()
        obs, _ = env.reset(seed=7 + i)
        total, done = 0.0, False
        while not done:
            a = policy((torch.as_tensor(obs, dtype=torch.float32) - mean) / std).clamp(-1, 1).numpy()
            obs, r, term, trunc, _ = env.step(2.0 * a)  # back from [-1, 1] to Pendulum's [-2, 2]
            total += r
            done = term or trunc
        returns.append(total)
    assert result["return_mean"] == pytest.approx(np.mean(returns), rel=1e-5)
    assert result["return_std"] == pytest.approx(np.std(returns), rel=1e-4, abs=1e-6)
    assert result["episode_returns"] == pytest.approx(returns, rel=1e-5)  # each episode, in seed order
    # test datasets are built with reference scores (0, 100): the score equals the return
    assert result["normalized_score_mean"] == pytest.approx(result["return_mean"], rel=1e-6)


def test_evaluate_without_reference_scores_gives_raw_returns_only(datasets_path):
    data = common.load_dataset("test/pendulum/noref-v0")
    result = common.evaluate(data, lambda o: torch.zeros(o.shape[0], 1), n_episodes=2, seed=0)
    assert result["normalized_score_mean"] is None and np.isfinite(result["return_mean"])


def test_evaluate_handles_dict_observations(datasets_path):
    data = common.load_dataset("test/pointmaze/random-v0")
    seen = []

    def policy(obs):
        seen.append(obs.shape)
        return torch.zeros(obs.shape[0], 2)

    common.evaluate(data, policy, n_episodes=2, seed=0)
    assert seen[0] == (2, 6)


class Countdown(gym.Env):
    """Terminates after a number of steps drawn at reset (2 to 9; a time limit of 7 truncates the
    longer episodes), with a reward that depends on the step and the action."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.left, self.t = int(self.np_random.integers(2, 10)), 0
        return self._obs(), {}

    def _obs(self):
        return np.array([self.left, self.t], dtype=np.float32)

    def step(self, action):
        self.left, self.t = self.left - 1, self.t + 1
        return self._obs(), 1.0 + self.t + float(action[0]), self.left == 0, False, {}


def make_countdown():
    return gym.wrappers.TimeLimit(Countdown(), max_episode_steps=7)


def test_evaluate_counts_each_episode_once_when_they_end_at_different_steps(datasets_path):
    """Episodes that end (by termination or the time limit) at different steps each count once,
    with their own return: the vector env's autoreset must not add a next episode's rewards."""
    data = dataclasses.replace(common.load_dataset("test/pendulum/noref-v0"), dataset_id="test/countdown/v0",
                               make_env=lambda render_mode=None: make_countdown(), action_low=np.float32([-1.0]),
                               action_high=np.float32([1.0]))

    def policy(obs):
        return torch.tanh(0.3 * obs[:, :1] - 0.1 * obs[:, 1:])

    n, seed = 6, 11
    result = common.evaluate(data, policy, n_episodes=n, seed=seed)
    returns, lengths = [], []
    for i in range(n):
        env = make_countdown()
        obs, _ = env.reset(seed=seed + i)
        total, steps, done = 0.0, 0, False
        while not done:
            a = policy(torch.as_tensor(obs)[None])[0].numpy()
            obs, r, term, trunc, _ = env.step(a)
            total, steps, done = total + r, steps + 1, term or trunc
        returns.append(total)
        lengths.append(steps)
    assert len(set(lengths)) >= 3, lengths  # the seeds give episodes of different lengths
    assert result["return_mean"] == pytest.approx(np.mean(returns), rel=1e-6)
    assert result["return_std"] == pytest.approx(np.std(returns), rel=1e-6)
    assert result["episode_returns"] == pytest.approx(returns, rel=1e-6)
    assert result["episode_lengths"] == lengths  # each stops counting at its own end


def test_replay_buffer_samples_rows_of_the_dataset(datasets_path):
    data = common.load_dataset("test/hopper/random-v0")
    torch.manual_seed(0)
    batch = common.ReplayBuffer(data).sample(64)
    assert batch.observations.shape == (64, data.obs_dim) and batch.actions.shape == (64, data.act_dim)
    assert batch.rewards.shape == batch.terminals.shape == (64,)
    # every sampled row is a row of the dataset, with its fields kept together
    rows = torch.cat([data.observations, data.actions, data.rewards[:, None]], 1)
    sampled = torch.cat([batch.observations, batch.actions, batch.rewards[:, None]], 1)
    assert (sampled[:, None, :] == rows[None, :, :]).all(-1).any(1).all()


def test_atomic_writes_leave_no_partial_files(tmp_path):
    path = tmp_path / "sub" / "results.json"
    common.write_json(str(path), {"a": 1})
    common.write_json(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    common.save_file(str(tmp_path / "model.pt"), {"w": torch.ones(2)})
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["w"], torch.ones(2))
    assert torch.equal(common.load_file(str(tmp_path / "model.pt"))["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "sub"] and os.listdir(tmp_path / "sub") == ["results.json"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "results.json"
    common.write_json(str(path), {"a": 1})
    with pytest.raises(TypeError):
        common.write_json(str(path), {"a": object()})  # not serialisable
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["results.json"]


def test_seeding_makes_sampling_repeatable(datasets_path):
    data = common.load_dataset("test/hopper/random-v0")
    common.seed_everything(3)
    a = common.ReplayBuffer(data).sample(8).observations
    common.seed_everything(3)
    b = common.ReplayBuffer(data).sample(8).observations
    assert torch.equal(a, b)


def test_seeding_flushes_denormals_and_importing_common_has_no_side_effects():
    # a multiplier decaying into float32's denormal range slowed the behaviour models ~10x
    torch.set_flush_denormal(False)
    assert (torch.tensor(1e-39) * 1.0).item() != 0.0
    common.resolve_device("cpu")
    assert (torch.tensor(1e-39) * 1.0).item() != 0.0  # only when asked for
    common.seed_everything(0)
    assert (torch.tensor(1e-39) * 1.0).item() == 0.0
    import subprocess, sys
    # nor does importing common, the dataset builder or the tools that use it
    code = ("import sys, torch; torch.set_flush_denormal(False); hook = sys.excepthook; "
            "import common, tools.make_dataset, dataset_recipe; "
            "print(sys.excepthook is hook, (torch.tensor(1e-39) * 1.0).item() != 0.0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "True True", out.stderr


class _Strict(gym.Env):
    """Three steps of an env that asserts every action lies in its (asymmetric) Box."""
    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, low, high, render_mode=None):
        self.action_space = gym.spaces.Box(np.float32(low), np.float32(high), dtype=np.float32)
        self.render_mode, self.t = render_mode, 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        assert self.action_space.contains(np.asarray(action, np.float32)), action
        self.t += 1
        return np.zeros(1, np.float32), 1.0, self.t == 3, False, {}

    def render(self):
        raise RuntimeError("no display")


def _strict_data(low, high):
    low, high = np.float32(low), np.float32(high)
    return common.OfflineData("x", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.zeros(1, 1),
                              torch.zeros(1), torch.zeros(1), np.zeros(1), np.ones(1), np.zeros(1), low, high,
                              None, None, "none", lambda render_mode=None: _Strict(low, high, render_mode), False, None)


def test_evaluated_actions_stay_within_the_action_bounds_in_float32():
    """low + (a + 1) / 2 (high - low) at a = 1 can pass high by one float32 step: the env gets the bound."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        low, high = sorted(rng.uniform(-10, 10, 2))
        data = _strict_data([low], [high])
        for a in (1.0, -1.0):
            out = common.evaluate(data, lambda o, a=a: torch.full((len(o), 1), a), 1, seed=0)
            assert out["episode_lengths"] == [3]


def test_a_video_that_is_not_written_leaves_no_earlier_file_in_its_place(tmp_path, capsys):
    video = tmp_path / "videos" / "step_3.mp4"
    video.parent.mkdir()
    video.write_bytes(b"an earlier run's video")
    common.evaluate(_strict_data([-1.0], [1.0]), lambda o: torch.zeros(len(o), 1), 1, seed=0, video=str(video))
    assert "no video" in capsys.readouterr().out and not video.exists()
