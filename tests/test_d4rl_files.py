"""D4RL's own HDF5 files (`--env d4rl/<name>`): tiny files in D4RL's layout, written to a temporary
D4RL_DATASET_DIR, read into the same transitions d4rl.qlearning_dataset made (or, with
next_observations, every transition), scored with D4RL's reference returns, evaluated in the
closest Gymnasium env; refusals and a missing file are one line."""

import json

import h5py
import numpy as np
import pytest

import common
from conftest import run_script
from tools.d4rl_files import d4rl_files, d4rl_name

HOPPER = "hopper-medium-replay-v2"


@pytest.fixture
def d4rl_dir(tmp_path, monkeypatch):
    """An empty D4RL_DATASET_DIR, and a HOME without ~/.d4rl, so only the test's files are found."""
    folder = tmp_path / "d4rl"
    folder.mkdir()
    monkeypatch.setenv("D4RL_DATASET_DIR", str(folder))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))  # each test's own copies
    return folder


def write_file(path, n, obs_dim=11, act_dim=3, terminals=(), timeouts=(), next_observations=False, seed=0):
    """n rows in D4RL's layout. Within an episode a row's next observation is the next row's
    observation; after a terminal or timeout the next row is a reset, and the true next observation
    (stored only in next_observations) is another one."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, obs_dim)).astype(np.float32)
    final = rng.normal(size=(n, obs_dim)).astype(np.float32)  # the true next observation at episode ends
    ends = np.zeros(n, dtype=bool)
    ends[list(terminals) + list(timeouts)] = True
    next_obs = np.where(ends[:, None], final, np.concatenate([obs[1:], final[-1:]]))
    arrays = {"observations": obs, "actions": rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
              "rewards": np.arange(n, dtype=np.float32) + 1.0,
              "terminals": np.isin(np.arange(n), terminals), "timeouts": np.isin(np.arange(n), timeouts)}
    if next_observations:
        arrays["next_observations"] = next_obs
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f[key] = value
    return {**arrays, "next_obs": next_obs}


def qlearning_transitions(arrays):
    """d4rl.qlearning_dataset's rule, written out row by row: the next observation is the next
    row's, a timeout's transition and the last row are left out."""
    rows = [i for i in range(len(arrays["rewards"]) - 1) if not arrays["timeouts"][i]]
    return rows, arrays["observations"][[i + 1 for i in rows]]


def test_without_next_observations_transitions_are_qlearning_datasets(d4rl_dir):
    arrays = write_file(d4rl_dir / "hopper_medium_replay-v2.hdf5", 12, terminals=[3], timeouts=[7])
    data = common.load_dataset(f"d4rl/{HOPPER}")
    rows, next_obs = qlearning_transitions(arrays)
    assert rows == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]  # the timeout (7) and the last row (11) dropped
    np.testing.assert_array_equal(data.observations.numpy(), arrays["observations"][rows])
    np.testing.assert_array_equal(data.next_observations.numpy(), next_obs)
    np.testing.assert_array_equal(data.actions.numpy(), arrays["actions"][rows])
    np.testing.assert_array_equal(data.rewards.numpy(), arrays["rewards"][rows])
    np.testing.assert_array_equal(data.terminals.numpy(), arrays["terminals"][rows])  # the terminal is kept
    # Episodes end at the terminal, before the dropped timeout, at the end: IQL's return range uses them.
    assert data.episode_lengths.tolist() == [4, 3, 3]
    assert data.episode_returns.tolist() == [1 + 2 + 3 + 4, 5 + 6 + 7, 9 + 10 + 11]
    assert data.timeouts.numpy().nonzero()[0].tolist() == [6, 9]  # cut, not terminated


def test_with_next_observations_every_transition_is_kept(d4rl_dir):
    arrays = write_file(d4rl_dir / "hopper_medium_replay-v2.hdf5", 12, terminals=[3], timeouts=[7],
                        next_observations=True)
    data = common.load_dataset(f"d4rl/{HOPPER}")
    np.testing.assert_array_equal(data.observations.numpy(), arrays["observations"])
    np.testing.assert_array_equal(data.next_observations.numpy(), arrays["next_observations"])
    np.testing.assert_array_equal(data.rewards.numpy(), arrays["rewards"])
    np.testing.assert_array_equal(data.terminals.numpy(), arrays["terminals"])
    assert data.timeouts.numpy().nonzero()[0].tolist() == [7, 11]
    assert data.episode_lengths.tolist() == [4, 4, 4]


def test_a_next_observation_that_is_not_the_next_row_starts_a_new_episode(d4rl_dir):
    arrays = write_file(d4rl_dir / "hopper_medium_replay-v2.hdf5", 8, next_observations=True)
    with h5py.File(d4rl_dir / "hopper_medium_replay-v2.hdf5", "r+") as f:
        f["next_observations"][2] = arrays["next_observations"][2] + 1.0  # no flag, yet not the next row
        expected = f["next_observations"][:]
    data = common.load_dataset(f"d4rl/{HOPPER}")
    np.testing.assert_array_equal(data.next_observations.numpy(), expected)
    assert data.episode_lengths.tolist() == [3, 5]


def test_files_without_timeouts_get_them_every_episode_limit(d4rl_dir):
    path = d4rl_dir / "hopper_medium_replay-v2.hdf5"
    write_file(path, 2300, terminals=[499])
    with h5py.File(path, "r+") as f:
        del f["timeouts"]
    data = common.load_dataset(f"d4rl/{HOPPER}")
    # Hopper's 1000-step limit counted from the terminal: steps 1499 and 2499 (after the end) time out.
    assert data.episode_lengths.tolist() == [500, 999, 799]
    assert len(data) == 2300 - 2  # row 1499 (timeout) and the last row dropped


def test_reference_scores_and_eval_envs_are_d4rls(d4rl_dir):
    write_file(d4rl_dir / "hopper_medium_replay-v2.hdf5", 5)
    write_file(d4rl_dir / "halfcheetah_mixed.hdf5", 5, obs_dim=17, act_dim=6)  # halfcheetah-medium-replay-v0
    write_file(d4rl_dir / "pen-v0_demos_clipped.hdf5", 5, obs_dim=45, act_dim=24)  # pen-human-v0
    hopper = common.load_dataset(f"d4rl/{HOPPER}")
    assert (hopper.ref_min_score, hopper.ref_max_score) == (-20.272305, 3234.3)
    assert hopper.ref_scores_source == "dataset" and hopper.eval_env == "Hopper-v4"
    assert not hopper.antmaze
    np.testing.assert_allclose(common.normalized_score(np.array([-20.272305, 3234.3, 1607.013848]),
                                                       hopper.ref_min_score, hopper.ref_max_score), [0, 100, 50])
    cheetah = common.load_dataset("d4rl/halfcheetah-medium-replay-v0")
    assert (cheetah.ref_min_score, cheetah.ref_max_score, cheetah.eval_env) == (-280.178953, 12135.0, "HalfCheetah-v4")
    pen = common.load_dataset("d4rl/pen-human-v0")
    assert (pen.ref_min_score, pen.ref_max_score) == (96.262799, 3076.8331017826877)
    env = pen.make_env()
    assert env.spec.id == "AdroitHandPen-v1" and env.spec.max_episode_steps == 100  # D4RL's pen limit, not 200
    env.close()
    # v0 and v2 share each env's references (d4rl/infos.py)
    write_file(d4rl_dir / "hopper_mixed.hdf5", 5)
    v0 = common.load_dataset("d4rl/hopper-medium-replay-v0")
    assert (v0.ref_min_score, v0.ref_max_score) == (hopper.ref_min_score, hopper.ref_max_score)


def test_file_names_and_ids_follow_d4rl():
    files = d4rl_files()  # the paths below D4RL's download address
    assert files["hopper-medium-replay-v2"] == "gym_mujoco_v2/hopper_medium_replay-v2.hdf5"
    assert files["walker2d-medium-replay-v0"] == "gym_mujoco/walker_mixed.hdf5"
    assert files["halfcheetah-medium-expert-v0"] == "gym_mujoco/halfcheetah_medium_expert.hdf5"
    assert files["hopper-full-replay-v2"] == "gym_mujoco_v2/hopper_full_replay-v2.hdf5"
    assert "hopper-full-replay-v0" not in files  # v0 had no full-replay
    assert files["door-cloned-v0"] == "hand_dapg/door-demos-v0-bc-combined.hdf5"
    assert files["pen-human-v0"] == "hand_dapg/pen-v0_demos_clipped.hdf5"
    assert files["relocate-expert-v1"] == "hand_dapg_v1/relocate-expert-v1.hdf5"
    assert len(files) == 3 * (6 + 5) + 4 * 6
    assert d4rl_name("d4rl/hopper-medium-v2") == "hopper-medium-v2"
    assert d4rl_name("D4RL/antmaze/umaze-v1") is None  # Minari's port, not a D4RL file
    assert d4rl_name("mujoco/hopper/medium-v0") is None
    assert common.dataset_task("d4rl/hopper-medium-replay-v2") == "hopper"  # per-domain settings
    assert common.dataset_task("D4RL/pen/human-v2") == "pen"


def test_a_file_elsewhere_is_written_under_its_d4rl_id_by_make_dataset(d4rl_dir, tmp_path):
    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    arrays = write_file(elsewhere / "hopper_mixed.hdf5", 9, timeouts=[4])
    result = run_script(["tools/make_dataset.py", "--id", f"d4rl/{HOPPER}", "--d4rl-file",
                         str(elsewhere / "hopper_mixed.hdf5")], str(tmp_path / "minari"))
    assert result.returncode == 0, result.stderr[-2000:]
    data = common.load_dataset(f"d4rl/{HOPPER}")
    rows, next_obs = qlearning_transitions(arrays)
    np.testing.assert_array_equal(data.next_observations.numpy(), next_obs)
    assert len(data) == len(rows)


MINARI_PORTS = "for antmaze and kitchen use Minari's ports (D4RL/antmaze/..., D4RL/kitchen/...)"
READ_HERE = ("takes {halfcheetah,hopper,walker2d}-<kind>-v0/v2 and {pen,hammer,door,relocate}-"
             "{human,cloned,expert}-v0/v1")


def test_a_path_to_a_file_says_how_to_use_it(d4rl_dir):
    with pytest.raises(common.UserError) as refused:
        common.load_dataset("/data/hopper_medium_replay-v2.hdf5")
    assert "tools/make_dataset.py --id d4rl/<name> --d4rl-file /data/hopper_medium_replay-v2.hdf5" \
        in str(refused.value)


@pytest.mark.parametrize("dataset_id, messages", [
    ("d4rl/antmaze-medium-play-v2", [MINARI_PORTS]),
    ("d4rl/kitchen-partial-v0", [MINARI_PORTS]),
    ("d4rl/hoper-medium-v2", [READ_HERE]),  # what d4rl/ takes, instead of a guess
])
def test_unreadable_datasets_are_refused_saying_what_to_use(d4rl_dir, dataset_id, messages):
    with pytest.raises(common.UserError) as refused:
        common.load_dataset(dataset_id)
    line = str(refused.value)
    assert "\n" not in line and f"'{dataset_id}' is not a D4RL dataset read here" in line, line
    for message in messages:
        assert message in line, line


@pytest.mark.parametrize("widths, wrong", [(dict(obs_dim=17), "holds 17 and 3"), (dict(act_dim=6), "holds 11 and 6")])
def test_a_file_that_does_not_fit_the_env_is_refused(d4rl_dir, widths, wrong):
    path = d4rl_dir / "hopper_medium_replay-v2.hdf5"
    write_file(path, 5, **widths)
    try:
        data = common.load_dataset(f"d4rl/{HOPPER}")
    except common.UserError as refused:
        line = str(refused)
    else:
        raise AssertionError(f"loaded {data.obs_dim}-wide states and {data.act_dim}-wide actions for Hopper-v4")
    assert "\n" not in line and str(path) in line and "Hopper-v4" in line and wrong in line, line


def test_a_missing_file_says_where_it_looked_and_how_to_get_it(d4rl_dir, tmp_path):
    result = run_script(["algorithms/bc.py", "--env", f"d4rl/{HOPPER}", "--total-steps", "5"], str(tmp_path))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(d4rl_dir) in lines[0] and str(tmp_path / "home" / ".d4rl" / "datasets") in lines[0]
    assert "Traceback" not in result.stderr and lines[0].startswith("error: ")
    assert f"'d4rl/{HOPPER}'" in lines[0] and "D4RL_DATASET_DIR" in lines[0]
    # D4RL's download address, which names the file
    assert "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/hopper_medium_replay-v2.hdf5" in lines[0]


def test_bc_trains_on_a_d4rl_file_and_is_scored_in_hopper_v4(d4rl_dir, tmp_path):
    write_file(d4rl_dir / "hopper_medium_replay-v2.hdf5", 60, terminals=[19], timeouts=[39])
    out = tmp_path / "runs"
    result = run_script(["algorithms/bc.py", "--env", f"d4rl/{HOPPER}", "--total-steps", "50", "--eval-every", "50",
                         "--eval-episodes", "2", "--batch-size", "16", "--device", "cpu", "--output-dir", str(out),
                         "--run-name", "r"], str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "normalised scores: dataset" in result.stdout
    with open(out / "r" / "results.json") as f:
        results = json.load(f)
    assert results["dataset"]["eval_env"] == "Hopper-v4"
    assert results["dataset"]["ref_scores_source"] == "dataset"
    assert results["dataset"]["transitions"] == 58
    last = results["evaluations"][-1]
    assert last["normalized_score_mean"] == pytest.approx(100 * (last["return_mean"] + 20.272305) / (3234.3 + 20.272305))


def test_a_file_given_under_a_name_d4rl_does_not_have_is_refused_in_one_line(d4rl_dir, tmp_path):
    write_file(tmp_path / "mine.hdf5", 5)
    result = run_script(["tools/make_dataset.py", "--id", "d4rl/hopper-mediun-v2", "--d4rl-file",
                         str(tmp_path / "mine.hdf5")], str(tmp_path / "minari"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "'d4rl/hopper-mediun-v2' is not a D4RL dataset read here" in lines[0]


@pytest.mark.parametrize("change", [
    {"rewards": np.zeros(2, np.float32)},  # fields of other lengths
    {"terminals": np.zeros((5, 2), bool)},
    {"actions": np.zeros(5, np.float32)},  # 1-D actions
    {"observations": np.zeros((5, 11, 2), np.float32)},  # 3-D and 1-D observations
    {"observations": np.zeros(5, np.float32)},
    {"observations": np.float32(1.0)},  # a scalar
    {k: np.zeros((0, 11) if k == "observations" else (0, 3) if k == "actions" else 0, np.float32)
     for k in ("observations", "actions", "rewards", "terminals", "timeouts")},  # no rows
    {"rewards": np.array([b"x"] * 5)},  # not numbers
])
def test_a_file_whose_fields_do_not_fit_together_is_one_line(d4rl_dir, change):
    path = d4rl_dir / "hopper_medium_replay-v2.hdf5"
    write_file(path, 5)
    with h5py.File(path, "r+") as f:
        for key, value in change.items():
            del f[key]
            f[key] = value
    with pytest.raises(common.UserError) as refused:
        common.load_dataset(f"d4rl/{HOPPER}")
    assert "\n" not in str(refused.value) and str(path) in str(refused.value), refused.value
