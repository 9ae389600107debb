"""tools/make_dataset.py and its dataset_* modules: D4RL-style datasets built offline, at tiny sizes.

A few hundred SAC steps on Pendulum-v1 give real (if weak) snapshots to build every kind from."""

import io
import re
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import minari
import numpy as np
import pytest
import torch

from conftest import ROOT, run_script

import common
from tools import make_dataset as md  # puts tools/ on sys.path: its dataset_* modules import as such

import dataset_recipe as recipe  # noqa: E402
import dataset_rollouts as rollouts  # noqa: E402
import dataset_snapshots as snapshots  # noqa: E402

TRAIN_STEPS, WARMUP, EVERY = 300, 100, 100


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny networks: with the CPU shared, more threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread):
    """Snapshots of a tiny Pendulum SAC run and its training buffer."""
    snapshot_dir = str(tmp_path_factory.mktemp("snapshots"))
    args = md.Args(env="Pendulum-v1", train_steps=TRAIN_STEPS, warmup_steps=WARMUP, snapshot_every=EVERY,
                   eval_episodes=1, batch_size=32)
    manifest, buffer = md.train_agent(args, snapshot_dir)
    return snapshot_dir, manifest, buffer


@pytest.fixture
def minari_path(tmp_path, monkeypatch):
    path = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(path))
    return path


def episodes(dataset_id):
    dataset = minari.load_dataset(dataset_id)
    return dataset, list(dataset.iterate_episodes())


def test_training_writes_snapshots_and_manifest(trained):
    snapshot_dir, manifest, buffer = trained
    with open(os.path.join(snapshot_dir, "manifest.json")) as f:
        on_disk = json.load(f)
    assert on_disk == manifest
    assert [s["step"] for s in manifest["snapshots"]] == [100, 200, 300]
    assert manifest["steps_completed"] == TRAIN_STEPS
    for snap in manifest["snapshots"]:
        assert os.path.getsize(os.path.join(snapshot_dir, snap["file"])) < 400_000
        assert -2000 < snap["eval_return"] <= 0  # Pendulum returns are negative
    assert manifest["medium"] in (100, 200, 300) and manifest["expert"] in (100, 200, 300)
    best = max(manifest["snapshots"], key=lambda s: s["eval_return"])
    assert manifest["expert"] == best["step"]
    assert len(buffer["rewards"]) == TRAIN_STEPS
    # Pendulum never terminates; its 200-step time limit truncates the first episode.
    assert not buffer["terminations"].any() and buffer["truncations"][199]


def test_choose_snapshots_medium_is_a_third_of_the_way_up():
    snaps = [{"step": s, "eval_return": r} for s, r in [(10, 100.0), (20, 900.0), (30, 1400.0), (40, 3000.0)]]
    choice = snapshots.choose_snapshots(snaps, random_return=0.0, env_id="Swimmer-v5")
    assert (choice["medium"], choice["expert"]) == (20, 40)  # 1000 is the target
    assert choice["reached_d4rl_expert"] is None
    # Hopper's target is a third of the way from D4RL's random to D4RL's expert return ...
    snaps.append({"step": 50, "eval_return": 3500.0})
    choice = snapshots.choose_snapshots(snaps, random_return=0.0, env_id="Hopper-v5")
    hopper_min, hopper_max = common.D4RL_REF_SCORES["hopper"]
    assert choice["reached_d4rl_expert"]
    assert choice["medium_target_return"] == pytest.approx(hopper_min + (hopper_max - hopper_min) / 3)
    assert choice["medium"] == 20 and choice["expert"] == 50 and choice["expert_is_final"]
    assert "expert_note" not in choice


def test_medium_of_a_d4rl_env_is_a_third_of_d4rls_expert_whatever_the_agent_reached():
    """An agent far below D4RL's expert (here at a third of it) still has its medium at a normalised
    score of about 33, not at a third of its own best."""
    walker_min, walker_max = common.D4RL_REF_SCORES["walker2d"]
    snaps = [{"step": s, "eval_return": r} for s, r in [(10, 450.0), (20, 1000.0), (30, 1450.0), (40, 1300.0)]]
    choice = snapshots.choose_snapshots(snaps, random_return=0.0, env_id="Walker2d-v5")
    assert choice["medium_target_return"] == pytest.approx(walker_min + (walker_max - walker_min) / 3)
    assert choice["medium"] == 30 and choice["expert"] == 30 and not choice["reached_d4rl_expert"]
    assert "expert kinds are refused" in choice["expert_note"]


def test_expert_kinds_need_an_expert_level_snapshot(minari_path, tmp_path):
    """Below EXPERT_MIN_SCORE (D4RL-normalised) the expert kinds are refused in one line; medium builds;
    naming the snapshot builds it anyway."""
    snapshot_dir = tmp_path / "snaps"
    snapshot_dir.mkdir()
    actor = rollouts.Actor(11, 3)
    torch.save(actor.state_dict(), str(snapshot_dir / "actor_0000010.pt"))  # as training writes them
    hopper_min, hopper_max = common.D4RL_REF_SCORES["hopper"]
    snaps = [{"step": 10, "file": "actor_0000010.pt", "eval_return": hopper_min + 0.5 * (hopper_max - hopper_min)}]
    manifest = {"env_id": "Hopper-v5", "seed": 0, "steps_completed": 10, "warmup_steps": 5, "eval_episodes": 1,
                "random_return": 0.0, "snapshots": snaps, **snapshots.choose_snapshots(snaps, 0.0, "Hopper-v5")}
    (snapshot_dir / "manifest.json").write_text(json.dumps(manifest))
    for kind in ("expert", "medium-expert"):
        with pytest.raises(common.UserError, match=r"scores 50 D4RL-normalised, below expert level \(90\)") as err:
            recipe.build_datasets("Hopper-v5", (kind,), transitions=5, snapshot_dir=str(snapshot_dir))
        assert "\n" not in str(err.value) and "--expert-snapshot" in str(err.value)
    assert recipe.build_datasets("Hopper-v5", ("medium",), transitions=5, snapshot_dir=str(snapshot_dir))
    assert recipe.build_datasets("Hopper-v5", ("expert",), transitions=5, snapshot_dir=str(snapshot_dir), expert_step=10)


@pytest.mark.parametrize("kind, size", [("random", 250), ("medium", 250), ("expert", 250),
                                        ("medium-expert", 500)])
def test_kinds_shapes_and_sizes(trained, minari_path, kind, size):
    snapshot_dir, manifest, _ = trained
    [dataset_id] = recipe.build_datasets("Pendulum-v1", (kind,), transitions=250, snapshot_dir=snapshot_dir)
    assert dataset_id == f"local/pendulum/{kind}-250-v0"  # a size given is part of the id
    dataset, eps = episodes(dataset_id)
    assert dataset.total_steps == size
    assert sum(len(ep.rewards) for ep in eps) == size
    for ep in eps:
        steps = len(ep.rewards)
        assert ep.observations.shape == (steps + 1, 3)
        assert ep.actions.shape == (steps, 1)
        assert np.all(np.abs(ep.actions) <= 2.0)
        assert ep.terminations[-1] or ep.truncations[-1]
        assert not (ep.terminations[:-1] | ep.truncations[:-1]).any()
    # Pendulum's 200-step time limit, then the episode cut to make the size (once per half).
    assert [len(ep.rewards) for ep in eps] == [200, 50] * (size // 250)
    assert all(ep.truncations[-1] and not ep.terminations.any() for ep in eps)
    meta = dataset.storage.metadata
    expert = next(s for s in manifest["snapshots"] if s["step"] == manifest["expert"])
    assert meta["ref_min_score"] == pytest.approx(manifest["random_return"])
    assert meta["ref_max_score"] == pytest.approx(expert["eval_return"])
    assert kind in meta["description"] and "seed 0" in meta["description"]


def test_observations_follow_the_actions(trained, minari_path):
    """Replaying an episode's actions from its first state reproduces its observations."""
    snapshot_dir, _, _ = trained
    recipe.build_datasets("Pendulum-v1", ("medium",), transitions=40, snapshot_dir=snapshot_dir)
    dataset, [ep] = episodes("local/pendulum/medium-40-v0")
    env = dataset.recover_environment()
    env.reset()
    for t, action in enumerate(ep.actions):
        # Pendulum's state (angle, velocity) from observation t; float32 observations limit the
        # precision, hence one step at a time and a loose tolerance.
        cos, sin, velocity = ep.observations[t].astype(np.float64)
        env.unwrapped.state = np.array([np.arctan2(sin, cos), velocity])
        obs, reward, *_ = env.step(action)
        np.testing.assert_allclose(obs, ep.observations[t + 1], atol=1e-4)
        assert reward == pytest.approx(ep.rewards[t], abs=1e-4)
    env.close()


def test_medium_replay_from_the_real_buffer(trained, minari_path):
    snapshot_dir, manifest, buffer = trained
    recipe.build_datasets("Pendulum-v1", ("medium-replay",), snapshot_dir=snapshot_dir, training_buffer=buffer)
    dataset, eps = episodes("local/pendulum/medium-replay-v0")
    medium = manifest["medium"]
    assert dataset.total_steps == medium
    np.testing.assert_array_equal(np.concatenate([ep.observations[:-1] for ep in eps]),
                                  buffer["observations"][:medium])
    np.testing.assert_array_equal(np.concatenate([ep.actions for ep in eps]), buffer["actions"][:medium])
    np.testing.assert_array_equal(np.concatenate([ep.rewards for ep in eps]), buffer["rewards"][:medium])
    np.testing.assert_array_equal(eps[0].observations[-1], buffer["next_observations"][len(eps[0].rewards) - 1])
    assert eps[-1].truncations[-1]
    assert "own replay buffer" in dataset.storage.metadata["description"]


def test_medium_replay_approximation_from_snapshots(trained, minari_path):
    snapshot_dir, manifest, _ = trained
    medium_step = 200
    recipe.build_datasets("Pendulum-v1", ("medium-replay",), snapshot_dir=snapshot_dir, medium_step=medium_step)
    dataset, eps = episodes("local/pendulum/medium-replay-v0")
    assert dataset.total_steps == medium_step  # warm-up 100 + interval (100, 200]
    assert [len(ep.rewards) for ep in eps] == [WARMUP, medium_step - WARMUP]
    assert "approximation" in dataset.storage.metadata["description"]
    # A smaller size shares the transitions among the segments in proportion.
    assert recipe.split_quota([100, 100, 200], 100) == [25, 25, 50]
    assert recipe.split_quota([3, 3, 3], 4) == [2, 1, 1]


def test_medium_replay_without_its_warmup_holds_the_same_snapshot_rollouts(minari_path):
    """The control of the uniform warm-up: the same segments of snapshot rollouts, from the same
    streams, without the warm-up's episodes; replay_sources says which rows came from where."""
    shipped = os.path.join(snapshots.SNAPSHOTS_DIR, "Pendulum-v1")  # warm-up 1,000 steps, medium at 3,000
    recipe.build_datasets("Pendulum-v1", ("medium-replay", "medium-replay-no-warmup"), snapshot_dir=shipped)
    full, with_warmup = episodes("local/pendulum/medium-replay-v0")
    part, without = episodes("local/pendulum/medium-replay-no-warmup-v0")
    sources = recipe.replay_sources("local/pendulum/medium-replay-v0")
    assert sources == [("warm-up", 1000), ("step 2000", 1000), ("step 3000", 1000)]
    assert recipe.replay_sources("local/pendulum/medium-replay-no-warmup-v0") == sources[1:]
    assert recipe.replay_sources("local/pendulum/medium-v0") is None
    assert (full.total_steps, part.total_steps) == (3000, 2000)
    assert len(with_warmup) - len(without) == 5  # the warm-up's five 200-step episodes
    for a, b in zip(with_warmup[5:], without):
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)
    assert "without the 1000 uniform-random warm-up steps" in part.storage.metadata["description"]


def test_long_builds_print_a_line_per_tenth_when_not_on_a_terminal(minari_path, tmp_path, capsys):
    """A log file gets ten progress lines per loop however long it is, not one per thousand steps."""
    shipped = os.path.join(snapshots.SNAPSHOTS_DIR, "Pendulum-v1")  # medium-replay: 3 segments of rollouts
    recipe.build_datasets("Pendulum-v1", ("medium-replay",), transitions=300, snapshot_dir=shipped)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= 12 and sum("300/300 transitions (100%)" in line for line in lines) == 1, lines
    # 30k steps of SAC training (uniform warm-up, so no updates): the header, ten lines, the snapshot
    args = md.Args(env="Pendulum-v1", train_steps=30_000, warmup_steps=30_000, snapshot_every=30_000,
                   eval_episodes=1, batch_size=8)
    md.train_agent(args, str(tmp_path / "snapshots"))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= 12 and "[train] snapshot" in lines[-1], lines


def test_progress_on_a_terminal_is_one_line_redrawn_in_place(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    progress = rollouts.Progress("[x]", 1000)
    for _ in range(500):
        progress.advance()
    progress.print("[x] an evaluation")  # a line of its own, over the live line
    for _ in range(500):
        progress.advance()
    first, second, rest = sys.stdout.getvalue().split("\n")
    assert first.startswith("\r[x] ") and first.split("\r")[-1].rstrip() == "[x] an evaluation"
    assert second.startswith("\r[x] ") and "1000/1000 transitions (100%)" in second.split("\r")[-1]
    assert rest == ""


def _arrays(dataset_id):
    _, eps = episodes(dataset_id)
    return [(ep.observations, ep.actions, ep.rewards, ep.terminations, ep.truncations) for ep in eps]


def test_same_seed_same_bytes(trained, tmp_path, monkeypatch):
    snapshot_dir, _, _ = trained
    builds = {}
    for folder, seed in (("a", 0), ("b", 0), ("c", 1)):
        monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / folder))
        recipe.build_datasets("Pendulum-v1", ("random", "medium-replay", "expert"), seed=seed, transitions=230,
                          snapshot_dir=snapshot_dir)
        builds[folder] = {k: _arrays(f"local/pendulum/{k}-230-v0") for k in ("random", "medium-replay", "expert")}
    for kind in builds["a"]:
        a, b, c = builds["a"][kind], builds["b"][kind], builds["c"][kind]
        assert len(a) == len(b)
        for ep_a, ep_b in zip(a, b):
            for x, y in zip(ep_a, ep_b):
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
        assert a[0][1].tobytes() != c[0][1].tobytes()  # another seed, other actions


def test_hopper_random_uses_d4rl_reference_scores(tmp_path, minari_path):
    recipe.build_datasets("Hopper-v5", ("random",), transitions=120, snapshot_dir=str(tmp_path / "none"))
    dataset, eps = episodes("local/hopper/random-120-v0")
    assert dataset.total_steps == 120
    assert eps[0].observations.shape[1] == 11 and eps[0].observations.dtype == np.float64
    assert eps[0].terminations[-1]  # random hoppers fall over
    meta = dataset.storage.metadata
    assert (meta["ref_min_score"], meta["ref_max_score"]) == common.D4RL_REF_SCORES["hopper"]


def test_random_kind_rolls_out_a_randomly_initialised_policy(tmp_path, monkeypatch):
    """D4RL's random data: a freshly initialised SAC actor, sampled; uniform actions behind a flag."""
    actions, metadata = {}, {}
    for policy in ("init", "uniform"):
        monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / policy))
        torch_state = torch.get_rng_state()
        recipe.build_datasets("Pendulum-v1", ("random",), transitions=300, snapshot_dir=str(tmp_path / "none"),
                          random_policy=policy)
        assert torch.equal(torch.get_rng_state(), torch_state)  # the global stream is left alone
        dataset, eps = episodes("local/pendulum/random-300-v0")
        actions[policy] = np.concatenate([ep.actions for ep in eps])
        metadata[policy] = dataset.storage.metadata
    assert metadata["init"]["algorithm_name"] == "randomly initialised SAC actor"
    assert "randomly initialised policy" in metadata["init"]["description"]
    assert metadata["uniform"]["algorithm_name"] == "uniform random"
    assert "uniform random actions" in metadata["uniform"]["description"]
    assert not np.allclose(actions["init"], actions["uniform"])
    # The uniform build is the uniform policy's stream ...
    uniform = rollouts.uniform_policy(np.float32([-2.0]), np.float32([2.0]), recipe.sub_seed(0, recipe.STREAM_RANDOM, 1))
    np.testing.assert_array_equal(actions["uniform"], np.stack([uniform(None) for _ in range(300)]))
    # ... the default one is tanh(Gaussian) samples of the fresh actor, taken along the episodes' states.
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "init"))
    _, eps = episodes("local/pendulum/random-300-v0")
    actor = rollouts.random_init_actor(3, 1, recipe.sub_seed(0, recipe.STREAM_RANDOM, 2))
    act = rollouts.stochastic_policy(actor, np.float32([-2.0]), np.float32([2.0]), recipe.sub_seed(0, recipe.STREAM_RANDOM, 1))
    replayed = np.stack([act(obs) for ep in eps for obs in ep.observations[:-1]])
    np.testing.assert_allclose(actions["init"], replayed, atol=1e-6)
    assert np.all(np.abs(actions["init"]) < 2.0)
    mode = rollouts.deterministic_policy(actor, np.float32([-2.0]), np.float32([2.0]))
    assert not np.allclose(actions["init"], np.stack([mode(o) for ep in eps for o in ep.observations[:-1]]))


def test_random_policy_flag_on_the_command_line(minari_path, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_dataset.py"), "--env",
                             "Pendulum-v1", "--kind", "random", "--random-policy", "uniform", "--transitions",
                             "20", "--snapshot-dir", str(tmp_path / "none")],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    dataset, _ = episodes("local/pendulum/random-20-v0")
    assert dataset.storage.metadata["algorithm_name"] == "uniform random"


def test_existing_dataset_needs_force(trained, minari_path):
    snapshot_dir, _, _ = trained
    recipe.build_datasets("Pendulum-v1", ("random",), transitions=10, snapshot_dir=snapshot_dir)
    with pytest.raises(common.UserError, match="already exists"):
        recipe.build_datasets("Pendulum-v1", ("random",), transitions=10, snapshot_dir=snapshot_dir)
    first = _arrays("local/pendulum/random-10-v0")
    recipe.build_datasets("Pendulum-v1", ("random",), seed=1, transitions=10, snapshot_dir=snapshot_dir, force=True)
    assert minari.load_dataset("local/pendulum/random-10-v0").total_steps == 10
    assert not np.array_equal(_arrays("local/pendulum/random-10-v0")[0][0], first[0][0])  # rebuilt, seed 1


def test_loader_builds_local_dataset_on_first_use(minari_path, capsys):
    data = common.load_dataset("local/pendulum/medium-300-v0")
    assert "building it from the shipped snapshots" in capsys.readouterr().out
    assert len(data) == 300 and data.obs_dim == 3 and data.act_dim == 1
    with open(os.path.join(snapshots.SNAPSHOTS_DIR, "Pendulum-v1", "manifest.json")) as f:
        manifest = json.load(f)
    expert = next(s for s in manifest["snapshots"] if s["step"] == manifest["expert"])
    assert data.ref_scores_source == "dataset"
    assert data.ref_min_score == pytest.approx(manifest["random_return"])
    assert data.ref_max_score == pytest.approx(expert["eval_return"])
    # The shipped medium snapshot is well above random and well below expert.
    assert data.ref_min_score + 100 < data.episode_returns[0] < data.ref_max_score - 100
    again = common.load_dataset("local/pendulum/medium-300-v0")
    assert "building" not in capsys.readouterr().out and len(again) == 300


def stored(dataset_id):
    """Whether MINARI_DATASETS_PATH holds a copy of `dataset_id`, whole or being written."""
    return os.path.isdir(os.path.join(minari.storage.get_dataset_path(dataset_id), "data"))


def load_in_a_thread(dataset_id, results):
    """A second run's load_dataset, in a thread; its result (or UserError) lands in `results`."""
    def load():
        try:
            results.append(len(common.load_dataset(dataset_id)))
        except common.UserError as exc:
            results.append(exc)

    thread = threading.Thread(target=load)
    thread.start()
    return thread


def test_runs_that_need_one_new_local_dataset_at_once_build_it_once(minari_path, capsys):
    """Runs started together on a new machine: one builds the dataset, the others wait and load it."""
    dataset_id = "local/pendulum/random-300-v0"
    loaded = []
    minari_path.mkdir()
    with md.waiting_lock(str(minari_path / ".build-local-pendulum-random-300-v0.lock"), ""):  # the builder
        waiter = load_in_a_thread(dataset_id, loaded)
        time.sleep(1.0)
        assert waiter.is_alive() and not loaded, loaded  # waiting for the builder's lock
        recipe.build_local_dataset(dataset_id)
    waiter.join(60)
    assert loaded == [300]
    out = capsys.readouterr().out
    assert out.count("building it from the shipped snapshots") == 1
    assert f"[{dataset_id}] another process is building it: waiting for that copy" in out


def test_a_local_dataset_being_written_is_waited_for_not_read(minari_path, capsys):
    """A copy minari has begun to write already looks stored: a run that finds one must still wait for
    the builder's lock (and then load the whole copy), not read it half-written."""
    dataset_id = "local/pendulum/random-300-v0"
    being_written = minari_path / dataset_id / "data"
    loaded = []
    being_written.mkdir(parents=True)
    with md.waiting_lock(str(minari_path / ".build-local-pendulum-random-300-v0.lock"), ""):  # the builder
        waiter = load_in_a_thread(dataset_id, loaded)
        time.sleep(1.0)
        try:
            assert waiter.is_alive() and stored(dataset_id), loaded
        finally:
            being_written.rmdir()
            being_written.parent.rmdir()
        recipe.build_local_dataset(dataset_id)
    waiter.join(60)
    assert loaded == [300]
    assert capsys.readouterr().out.count("building it from the shipped snapshots") == 1


def test_a_sized_build_has_its_own_id(minari_path, capsys):
    """One id, one dataset: the size is part of the id, so builds of two sizes never share one."""
    assert recipe.parse_local_id("local/hopper/medium-replay-50k-v0") == ("hopper", "medium-replay", 50_000)
    assert recipe.parse_local_id("local/hopper/medium-replay-v0") == ("hopper", "medium-replay", None)
    assert recipe.parse_local_id("local/hopper/medium-300-v0") == ("hopper", "medium", 300)
    assert recipe.parse_local_id("local/hopper/bogus-5k-v0") is None
    assert recipe.dataset_id_for("Hopper-v5", "medium", 50_000) == "local/hopper/medium-50k-v0"
    assert recipe.dataset_id_for("Hopper-v5", "medium", 1234) == "local/hopper/medium-1234-v0"
    small = common.load_dataset("local/pendulum/random-200-v0")
    larger = common.load_dataset("local/pendulum/random-400-v0")
    assert (len(small), len(larger)) == (200, 400)
    assert "local/pendulum/random-v0" not in minari.list_local_datasets()
    assert len(common.load_dataset("local/pendulum/random-200-v0")) == 200


def test_first_use_build_leaves_the_run_seeded_stream_alone(minari_path, monkeypatch, tmp_path):
    """The run that builds its local dataset and a later run that finds it built, same seed: same
    initial weights and batches, hence the same evaluations."""
    evaluations = []
    for name in ("builds", "cached"):
        result = run_script([os.path.join(ROOT, "algorithms", "bc.py"), "--env", "local/pendulum/medium-300-v0",
                             "--total-steps", "30", "--eval-every", "15", "--eval-episodes", "2",
                             "--batch-size", "16", "--device", "cpu", "--output-dir", str(tmp_path),
                             "--run-name", name], str(minari_path))
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("building it from the shipped snapshots" in result.stdout) == (name == "builds")
        with open(tmp_path / name / "results.json") as f:
            results = json.load(f)["evaluations"]
        evaluations.append([{k: v for k, v in e.items() if k != "wall_time"} for e in results])
    assert len(evaluations[0]) == 2 and evaluations[0] == evaluations[1]


@pytest.mark.parametrize("task, env_id", [("halfcheetah", "HalfCheetah-v5"), ("walker2d", "Walker2d-v5")])
def test_the_new_locomotion_tasks_build_offline_from_the_shipped_snapshots(minari_path, capsys, task, env_id):
    """local/{halfcheetah,walker2d}/{random,medium,medium-replay}-v0 build on first use, scored with
    D4RL's references, medium at about a third of D4RL's expert; the expert kinds are refused."""
    name, manifest_dir = snapshots.shipped_manifests()[task]
    assert name == env_id
    with open(os.path.join(manifest_dir, "manifest.json")) as f:
        manifest = json.load(f)
    medium = snapshots.snapshot_by_step(manifest, manifest["medium"])
    assert 25 < snapshots.d4rl_normalized(env_id, medium["eval_return"]) < 40
    for kind in ("random", "medium", "medium-replay"):
        data = common.load_dataset(f"local/{task}/{kind}-300-v0")
        assert len(data) == 300 and (data.obs_dim, data.act_dim) == (17, 6)
        assert (data.ref_min_score, data.ref_max_score) == pytest.approx(common.D4RL_REF_SCORES[task])
    assert "building it from the shipped snapshots" in capsys.readouterr().out
    for kind in ("expert", "medium-expert"):
        with pytest.raises(common.UserError, match="below expert level"):
            common.load_dataset(f"local/{task}/{kind}-300-v0")


def test_id_flag_builds_one_local_dataset_as_its_first_use_would(minari_path):
    """`make_dataset.py --id <local id>` builds it from the shipped snapshots, once; an id it cannot
    build is one line."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "make_dataset.py"), "--id"]
    first = subprocess.run(cmd + ["local/pendulum/random-20-v0"], env=cli_env(minari_path), capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "building it from the shipped snapshots" in first.stdout
    assert minari.load_dataset("local/pendulum/random-20-v0").total_steps == 20
    again = subprocess.run(cmd + ["local/pendulum/random-20-v0"], env=cli_env(minari_path), capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "building" not in again.stdout, again.stdout + again.stderr[-2000:]
    bad = subprocess.run(cmd + ["local/nosuchenv/medium-v0"], env=cli_env(minari_path), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot build 'local/nosuchenv/medium-v0'"), lines
    assert "Pendulum-v1" in lines[0]


def test_common_copied_alone_says_how_to_build_a_local_id(minari_path, tmp_path):
    """common.py copied without the repository's tools/ cannot build a local/* id: one line naming the
    command that does, in the repository."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(ROOT, "common.py"), alone / "common.py")
    env = {k: v for k, v in cli_env(minari_path).items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", "import common; assert common.__file__.startswith("
                             f"{str(alone)!r}); common.install_user_error_hook(); "
                             "common.load_dataset('local/pendulum/random-20-v0')"],
                            cwd=alone, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: dataset 'local/pendulum/random-20-v0' is not built here: build it with `python "
                     "tools/make_dataset.py --id local/pendulum/random-20-v0` in the library's repository"], lines
    assert not os.path.exists(minari_path / "local")  # nothing was built


@pytest.mark.parametrize("dataset_id", ["local/nosuchenv/medium-v0", "local/pendulum/bogus-v0"])
def test_unbuildable_local_id(minari_path, dataset_id):
    with pytest.raises(common.UserError, match="HalfCheetah-v5.*Hopper-v5.*Pendulum-v1.*Walker2d-v5"):
        common.load_dataset(dataset_id)


def test_discrete_action_space_is_refused():
    with pytest.raises(common.UserError, match="'CartPole-v1' has a Discrete action space"):
        md.main(md.Args(env="CartPole-v1", kind=("random",)))


def test_unknown_env_is_one_line_error(tmp_path):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path)}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_dataset.py"), "--env",
                             "Hoper-v5", "--kind", "random"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: Gymnasium does not know env id 'Hoper-v5'"), result.stderr
    assert "Hopper-v5" in lines[-1]  # close match


# ----------------------------------------------------------------------------------------------
# Resumable training
# ----------------------------------------------------------------------------------------------
RESUME_FLAGS = dict(env="Pendulum-v1", warmup_steps=100, snapshot_every=100, checkpoint_every=150, eval_episodes=1,
                    batch_size=32)


def resume_args(train_steps, **changes):
    return md.Args(train_steps=train_steps, **{**RESUME_FLAGS, **changes})


def cli(snapshot_dir, train_steps, *extra):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in RESUME_FLAGS.items()]
    return [sys.executable, os.path.join(ROOT, "tools", "make_dataset.py"), *flags, f"--train-steps={train_steps}",
            f"--snapshot-dir={snapshot_dir}", *extra]


def cli_env(datasets_path):
    return {**os.environ, "MINARI_DATASETS_PATH": str(datasets_path), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, one_torch_thread):
    """An uninterrupted 800-step run. Training does not depend on --train-steps, only stops there, so
    its first 600 steps are also what an uninterrupted 600-step run gives."""
    snapshot_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    manifest, buffer = md.train_agent(resume_args(800), snapshot_dir)
    return snapshot_dir, manifest, buffer


def snapshot_returns(manifest):
    return [(s["step"], s["eval_return"], s["eval_return_std"]) for s in manifest["snapshots"]]


def manifest_of(snapshot_dir):
    with open(os.path.join(snapshot_dir, "manifest.json")) as f:
        return json.load(f)


def assert_same_actors(dir_a, dir_b, steps):
    for step in steps:
        a, b = (torch.load(os.path.join(d, f"actor_{step:07d}.pt"), weights_only=True) for d in (dir_a, dir_b))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"actor at step {step} differs"


def start_and_signal(cmd, datasets_path, snapshot_dir, sig):
    """Start a training and send `sig` as soon as its first checkpoint is on disk."""
    proc = subprocess.Popen(cmd, env=cli_env(datasets_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    checkpoint = os.path.join(snapshot_dir, "checkpoint", "checkpoint.npz")
    while proc.poll() is None and not os.path.exists(checkpoint):
        time.sleep(0.01)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0, "the training finished before the signal: make it longer"
    return proc.returncode, stdout, stderr


def checkpoint_state(snapshot_dir, name="checkpoint.npz"):
    with np.load(os.path.join(snapshot_dir, "checkpoint", name)) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return torch.load(io.BytesIO(arrays.pop("state").tobytes()), weights_only=True), arrays


def test_killed_training_resumes_to_the_same_snapshots(uninterrupted, tmp_path, minari_path):
    ref_dir, ref_manifest, ref_buffer = uninterrupted
    snapshot_dir = tmp_path / "killed"
    cmd = cli(snapshot_dir, 600, "--kind", "medium-replay")
    code, _, _ = start_and_signal(cmd, minari_path, snapshot_dir, signal.SIGKILL)
    assert code == -signal.SIGKILL
    again = subprocess.run(cmd, env=cli_env(minari_path), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    [line] = [line for line in again.stdout.splitlines() if "resuming" in line]
    assert "checkpoint.npz at step " in line and " of 600 " in line, line
    manifest = manifest_of(snapshot_dir)
    assert snapshot_returns(manifest) == snapshot_returns(ref_manifest)[:6]
    assert_same_actors(ref_dir, snapshot_dir, range(100, 700, 100))
    # The medium-replay dataset of the same call is the agent's real buffer, restored from the checkpoint.
    dataset, eps = episodes("local/pendulum/medium-replay-v0")
    assert dataset.total_steps == manifest["medium"]
    for key in ("observations", "actions", "rewards"):
        got = np.concatenate([getattr(ep, key)[:len(ep.rewards)] for ep in eps])
        np.testing.assert_array_equal(got, ref_buffer[key][:manifest["medium"]])
    # The buffer is stored compactly: the filled rows, and next observations only where episodes end.
    state, arrays = checkpoint_state(snapshot_dir)
    assert state["step"] == 600 and arrays["observations"].shape == (600, 3)
    assert arrays["next_observation_rows"].tolist() == [199, 399, 599]


def test_sigterm_writes_a_checkpoint_and_stops_in_one_line(uninterrupted, tmp_path):
    ref_dir, ref_manifest, _ = uninterrupted
    snapshot_dir = tmp_path / "stopped"
    cmd = cli(snapshot_dir, 600)
    code, stdout, stderr = start_and_signal(cmd, tmp_path / "minari", snapshot_dir, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-2000:]
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("[train] stopped by SIGTERM at step ") and "the same command continues" in last
    stopped_at = int(last.split(" at step ")[1].split(":")[0])
    assert checkpoint_state(snapshot_dir)[0]["step"] == stopped_at
    again = subprocess.run(cmd, env=cli_env(tmp_path / "minari"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"at step {stopped_at} of 600" in again.stdout, again.stderr[-2000:]
    assert snapshot_returns(manifest_of(snapshot_dir)) == snapshot_returns(ref_manifest)[:6]
    assert_same_actors(ref_dir, snapshot_dir, range(100, 700, 100))


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(uninterrupted, tmp_path, capsys):
    ref_dir, ref_manifest, _ = uninterrupted
    snapshot_dir = str(tmp_path / "damaged")
    md.train_agent(resume_args(600), snapshot_dir)  # checkpoints at 150, 300, 450 and 600
    latest = tmp_path / "damaged" / "checkpoint" / "checkpoint.npz"
    payload = bytearray(latest.read_bytes())
    payload[len(payload) // 2] ^= 0xFF  # one flipped byte: the zip members' CRCs find it
    latest.write_bytes(bytes(payload))
    capsys.readouterr()
    md.train_agent(resume_args(600), snapshot_dir)
    lines = capsys.readouterr().out.splitlines()
    assert "checkpoint.npz is unreadable" in lines[0] and "using the previous checkpoint" in lines[0], lines
    assert "checkpoint.prev.npz at step 450 of 600" in lines[1], lines
    assert snapshot_returns(manifest_of(snapshot_dir)) == snapshot_returns(ref_manifest)[:6]
    assert_same_actors(ref_dir, snapshot_dir, [500, 600])
    # with both damaged there is nothing to continue from: one line, not a silent restart
    for name in ("checkpoint.npz", "checkpoint.prev.npz"):
        path = tmp_path / "damaged" / "checkpoint" / name
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(common.UserError, match="no readable checkpoint in .*; delete it to train from the start"):
        md.train_agent(resume_args(600), snapshot_dir)


def test_raising_train_steps_continues_from_the_last_step(uninterrupted, tmp_path, capsys):
    ref_dir, ref_manifest, ref_buffer = uninterrupted
    snapshot_dir = str(tmp_path / "raised")
    md.train_agent(resume_args(600), snapshot_dir)
    capsys.readouterr()
    manifest, buffer = md.train_agent(resume_args(600), snapshot_dir)
    assert "at step 600 = --train-steps: nothing to train" in capsys.readouterr().out
    assert manifest["steps_completed"] == 600 and len(buffer["rewards"]) == 600
    manifest, buffer = md.train_agent(resume_args(800), snapshot_dir)
    assert "at step 600 of 800" in capsys.readouterr().out
    assert manifest["steps_completed"] == 800 and manifest["train_steps_requested"] == 800
    assert snapshot_returns(manifest) == snapshot_returns(ref_manifest)
    assert_same_actors(ref_dir, snapshot_dir, [700, 800])
    for key in ref_buffer:
        assert buffer[key].tobytes() == ref_buffer[key].tobytes(), key
    with pytest.raises(common.UserError, match="at step 800, past --train-steps 700"):
        md.train_agent(resume_args(700), snapshot_dir)


def test_a_checkpoint_from_other_flags_or_in_use_is_refused(tmp_path):
    snapshot_dir = str(tmp_path / "run")
    md.train_agent(resume_args(150), snapshot_dir)
    with pytest.raises(common.UserError, match=r"other flags: --lr 0.0003 \(now 0.001\), --batch-size 32 \(now 64\)"):
        md.train_agent(resume_args(300, lr=1e-3, batch_size=64), snapshot_dir)
    with common.lock_folder(os.path.join(snapshot_dir, "checkpoint"), ""):  # as a training still running holds it
        with pytest.raises(common.UserError, match=rf"checkpoint is in use by another process \(pid {os.getpid()} on "
                                                   rf"{socket.gethostname()}\); wait for it to end, or stop it"):
            md.train_agent(resume_args(300), snapshot_dir)
    with open(os.path.join(snapshot_dir, "checkpoint", ".gitignore")) as f:
        assert f.read() == "*\n"  # hundreds of MB that must not be committed with the snapshots


def test_an_episode_the_env_does_not_replay_ends_at_the_checkpoint(tmp_path, capsys):
    snapshot_dir = str(tmp_path / "run")
    md.train_agent(resume_args(150), snapshot_dir)  # in the middle of the first 200-step episode
    folder = os.path.join(snapshot_dir, "checkpoint")
    saved = md.read_checkpoint(folder, resume_args(150))
    saved["arrays"]["observations"][120, 0] += 1e-3  # as if the env had given another state back
    md.write_checkpoint(folder, saved["state"], saved["arrays"])
    capsys.readouterr()
    _, buffer = md.train_agent(resume_args(300), snapshot_dir)
    assert "did not replay the episode in progress identically" in capsys.readouterr().out
    assert buffer["truncations"][149] and not buffer["truncations"][:149].any()
    env = rollouts.make_env("Pendulum-v1")
    first_obs, _ = env.reset(seed=recipe.sub_seed(0, recipe.STREAM_TRAIN, 1))  # the second episode starts at step 150
    np.testing.assert_array_equal(buffer["observations"][150], first_obs)
    env.close()


def test_a_checkpoint_that_cannot_be_written_leaves_the_last_one(tmp_path, monkeypatch):
    folder = str(tmp_path)
    arrays = {"rewards": np.arange(3.0)}
    md.write_checkpoint(folder, {"step": 3}, arrays)
    before = (tmp_path / "checkpoint.npz").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(md.np, "savez", full_disk)
    with pytest.raises(common.UserError, match="could not write the checkpoint .*: No space left on device"):
        md.write_checkpoint(folder, {"step": 4}, arrays)
    assert sorted(os.listdir(folder)) == ["checkpoint.npz"]  # no temporary file left behind
    assert (tmp_path / "checkpoint.npz").read_bytes() == before


@pytest.mark.parametrize("manifest", ["", "[1, 2]", "{"])
def test_a_damaged_snapshot_manifest_is_one_line(manifest, tmp_path):
    (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(common.UserError, match="cannot be read as a snapshot manifest") as exc_info:
        snapshots.load_manifest(str(tmp_path), "Hopper-v5")
    assert "\n" not in str(exc_info.value)


def test_a_snapshot_dir_that_is_a_file_is_one_line(minari_path, tmp_path):
    (tmp_path / "file").write_text("x")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_dataset.py"), "--env",
                             "Pendulum-v1", "--train-steps", "10", "--snapshot-dir", str(tmp_path / "file")],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "--snapshot-dir" in result.stderr and "cannot be a folder written here" in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["--snapshot-every", "0"], "--snapshot-every must be at least 1, got 0"),
    (["--batch-size", "-1"], "--batch-size must be at least 1, got -1"),
    (["--lr", "nan"], "--lr must be in (0, inf), got nan"),
    (["--env", "foo:Bar-v0"], "Gymnasium does not know env id 'foo:Bar-v0'"),
    (["--kind", "medium", "--snapshot-dir", os.path.join(ROOT, "tools", "snapshots", "Hopper-v5")],
     "holds snapshots of 'Hopper-v5', not of 'Pendulum-v1'"),
])
def test_bad_builder_flags_are_one_line(argv, message, minari_path):
    import tyro

    with pytest.raises(common.UserError, match=re.escape(message)):
        md.main(tyro.cli(md.Args, args=["--env", "Pendulum-v1", "--kind", "random", "--transitions", "10", *argv]))


def test_a_damaged_snapshot_is_one_line(minari_path, tmp_path):
    snapshot_dir = tmp_path / "snapshots"
    shutil.copytree(os.path.join(ROOT, "tools", "snapshots", "Pendulum-v1"), snapshot_dir)
    for actor in snapshot_dir.glob("actor_*.pt"):
        actor.write_bytes(b"not a snapshot")
    with pytest.raises(common.UserError, match=r"is not an actor of 3-dimensional states and 1-dimensional actions"):
        recipe.build_datasets("Pendulum-v1", ("medium",), transitions=10, snapshot_dir=str(snapshot_dir))
