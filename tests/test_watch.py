"""Watching a policy (--capture-video), evaluating it again (the same numbers from the same weights
and seed) and evaluating a saved one (tools/evaluate.py).

That tools/evaluate.py gives every file's final evaluation again from its model.pt is checked on the
end-to-end runs of tests/test_algorithms.py, test_brac_plus.py and test_arq.py (conftest's
check_saved_model)."""

import contextlib
import io
import json
import os
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from common import flatten_obs
from conftest import ROOT, run_script

DATASET = "test/hopper/random-v0"  # Hopper-v5 episodes of at most 40 steps


@pytest.fixture(scope="module")
def renders(datasets_path, tmp_path_factory):
    """The tests that record need a renderer (EGL on Linux: Mesa's on a CPU machine): an evaluation
    that cannot record says why in one line and writes no file."""
    import common

    video, said = str(tmp_path_factory.mktemp("render") / "probe.mp4"), io.StringIO()
    with contextlib.redirect_stdout(said):
        common.evaluate(common.load_dataset(DATASET), elementwise_policy, 1, seed=0, video=video)
    if not os.path.exists(video):
        pytest.skip(f"Hopper does not render on this machine: {said.getvalue().strip()}")


def frames_of(path):
    reader = imageio.get_reader(path)
    try:
        return [frame for frame in reader]
    finally:
        reader.close()


def elementwise_policy(obs):
    """Row by row the same numbers whatever the batch (a matrix product's last bits can depend on it)."""
    return torch.tanh(2.0 * obs[:, :3] - obs[:, 3:6])


def test_recording_changes_no_return_and_has_a_frame_per_step_of_the_first_episode(renders, datasets_path,
                                                                                    tmp_path):
    import common

    data = common.load_dataset(DATASET)
    policy = elementwise_policy
    plain = common.evaluate(data, policy, 3, seed=5)
    video = str(tmp_path / "videos" / "v.mp4")
    recorded = common.evaluate(data, policy, 3, seed=5, video=video)
    assert recorded == plain

    # the vector env's first env starts from reset(seed=5): the same episode in an env of its own
    env = data.make_env()
    obs, _ = env.reset(seed=5)
    low, high = data.action_low, data.action_high
    length, done = 0, False
    while not done:
        a = policy(torch.as_tensor(flatten_obs(obs[None], data.antmaze))).clamp(-1, 1).numpy()[0]
        obs, _, terminated, truncated, _ = env.step(low + (a + 1.0) * 0.5 * (high - low))
        length, done = length + 1, terminated or truncated
    frames = frames_of(video)
    assert len(frames) == length and frames[0].shape == (480, 480, 3)
    assert os.listdir(tmp_path / "videos") == ["v.mp4"]  # no temporary file left


def test_a_sampling_policy_draws_the_same_noise_in_every_evaluation_and_leaves_the_run_s_stream(datasets_path):
    """ARQ's implicit policy samples: its noise comes from torch's CPU stream, seeded by the evaluation."""
    import common

    data = common.load_dataset(DATASET)
    policy = lambda obs: (elementwise_policy(obs) + 0.3 * torch.randn(obs.shape[0], 3)).clamp(-1, 1)  # noqa: E731
    torch.manual_seed(123)
    first = common.evaluate(data, policy, 2, seed=0)
    after = torch.rand(3)
    torch.manual_seed(123)
    torch.rand(7)  # the run's stream elsewhere: the evaluation does not depend on it
    assert common.evaluate(data, policy, 2, seed=0) == first
    torch.manual_seed(123)
    common.evaluate(data, policy, 2, seed=1)
    assert torch.equal(torch.rand(3), after)  # the run's stream goes on as if no evaluation had run


def bc_run(out, datasets_path, *extra, env=None):
    args = [os.path.join(ROOT, "algorithms", "bc.py"), "--env", DATASET, "--total-steps", "30", "--eval-every", "10",
            "--log-every", "10", "--eval-episodes", "2", "--batch-size", "16", "--device", "cpu",
            "--output-dir", str(out), "--run-name", "r", *extra]
    if env is None:
        return run_script(args, datasets_path)
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MINARI_DATASETS_PATH": datasets_path, "OMP_NUM_THREADS": "1", **env})


def evaluations(run_dir):
    with open(os.path.join(run_dir, "results.json")) as f:
        return json.load(f)["evaluations"]


def test_capture_video_records_without_changing_the_run_and_the_model_file_replays_it(renders, datasets_path,
                                                                                      tmp_path):
    plain = bc_run(tmp_path / "plain", datasets_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    result = bc_run(tmp_path / "video", datasets_path, "--capture-video", "--save-model")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "video" / "r"
    assert sorted(os.listdir(run_dir / "videos")) == ["step_30.mp4"]  # the last evaluation's
    recorded, unrecorded = evaluations(run_dir), evaluations(tmp_path / "plain" / "r")
    assert [e.pop("video", None) for e in recorded] == [None, None, "videos/step_30.mp4"]
    for e in recorded + unrecorded:
        e.pop("wall_time")
    assert recorded == unrecorded
    run_frames = frames_of(run_dir / "videos" / "step_30.mp4")
    assert 1 <= len(run_frames) <= 40 and run_frames[0].shape == (480, 480, 3)

    # the command of the README: the same numbers, and the same first episode on video
    tool = run_script([os.path.join("tools", "evaluate.py"), str(run_dir / "model.pt"), "--capture-video",
                       "--video-dir", str(tmp_path / "watch")], datasets_path)
    assert tool.returncode == 0, tool.stderr[-3000:]
    final = recorded[-1]
    assert (f"bc on {DATASET}, 2 episodes from seed 0: return {final['return_mean']:.2f} ± "
            f"{final['return_std']:.2f}, normalised score {final['normalized_score_mean']:.2f}") in tool.stdout
    each = " ".join(f"{r:.1f} ({n})" for r, n in zip(final["episode_returns"], final["episode_lengths"]))
    assert f"normalised score (steps) of each episode, seeds 0 to 1: {each}\n" in tool.stdout  # score = return here
    tool_frames = frames_of(tmp_path / "watch" / "seed_0.mp4")
    assert len(tool_frames) == len(run_frames) and np.array_equal(tool_frames[-1], run_frames[-1])


def test_without_a_render_backend_the_run_trains_with_one_notice(datasets_path, tmp_path):
    result = bc_run(tmp_path, datasets_path, "--capture-video", "--save-model", env={"MUJOCO_GL": "disable"})
    assert result.returncode == 0, result.stderr[-3000:]
    # the recording says why in one line (common.evaluate), the run that it goes on without video in another
    assert result.stdout.count("no video ") == 1, result.stdout
    assert result.stdout.count("[bc] --capture-video: the eval env did not render here") == 1, result.stdout
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "results.json").read_text())["finished"]
    assert not os.path.exists(tmp_path / "r" / "videos")
    # tools/evaluate.py --capture-video: the evaluation, with the same lines, and no file
    tool = subprocess.run([sys.executable, os.path.join("tools", "evaluate.py"), str(tmp_path / "r" / "model.pt"),
                           "--capture-video", "--video-dir", str(tmp_path / "watch")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "MINARI_DATASETS_PATH": datasets_path,
                                                       "OMP_NUM_THREADS": "1", "MUJOCO_GL": "disable"})
    assert tool.returncode == 0, tool.stderr[-3000:]
    assert tool.stdout.count("no video ") == 1 and tool.stdout.count(
        "--capture-video: the eval env did not render here; evaluated without video") == 1, tool.stdout
    assert "Traceback" not in tool.stderr and "Exception ignored" not in tool.stderr, tool.stderr[-3000:]
    assert "video of the first episode" not in tool.stdout and not os.path.exists(tmp_path / "watch" / "seed_0.mp4")


def test_evaluate_refuses_what_is_not_a_model_file_in_one_line(datasets_path, tmp_path):
    from tools.evaluate import read_model

    import common

    with pytest.raises(common.UserError, match="does not exist"):
        read_model(str(tmp_path / "missing.pt"))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(common.UserError, match="text.pt cannot be read as weights only .*not a file of this library"):
        read_model(str(tmp_path / "text.pt"))
    # model files are common.save_file's: torch.save's alone (no checksum) is refused, as is a changed one
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(common.UserError, match="plain.pt is not a file of this library \\(it has no checksum\\)"):
        read_model(str(tmp_path / "plain.pt"))
    common.save_file(str(tmp_path / "changed.pt"), {"w": torch.ones(1)})
    changed = torch.load(tmp_path / "changed.pt", weights_only=True)
    changed["w"] += 1
    torch.save(changed, tmp_path / "changed.pt")
    with pytest.raises(common.UserError, match="changed.pt is damaged: its contents do not match their checksum"):
        read_model(str(tmp_path / "changed.pt"))
    common.save_file(str(tmp_path / "weights.pt"), {"w": torch.ones(1)})
    with pytest.raises(common.UserError, match="it needs algorithm, args, obs_dim, act_dim, action_low"):
        read_model(str(tmp_path / "weights.pt"))
    no_bounds = {"algorithm": "bc", "args": {}, "obs_dim": 1, "act_dim": 1}
    common.save_file(str(tmp_path / "no_bounds.pt"), no_bounds)
    with pytest.raises(common.UserError, match="it needs"):
        read_model(str(tmp_path / "no_bounds.pt"))
    common.save_file(str(tmp_path / "args.pt"), {**no_bounds, "action_low": [-1.0], "action_high": [1.0], "args": [1]})
    with pytest.raises(common.UserError, match="args as a dict"):
        read_model(str(tmp_path / "args.pt"))
    common.save_file(str(tmp_path / "foreign.pt"), {"algorithm": "../common", "args": {}, "obs_dim": 1, "act_dim": 1,
                                                    "action_low": [-1.0], "action_high": [1.0]})
    with pytest.raises(common.UserError, match="algorithm '../common', which is not a file in algorithms/"):
        read_model(str(tmp_path / "foreign.pt"))

    result = run_script([os.path.join("tools", "evaluate.py"), str(tmp_path / "missing.pt")], datasets_path)
    assert result.returncode == 1 and result.stderr.strip() == f"error: {tmp_path / 'missing.pt'} does not exist"


def test_evaluate_says_in_one_line_when_the_model_file_does_not_fit_the_algorithm_file(datasets_path, tmp_path):
    """A model.pt of another version of its file: args the file's Args or make_policy cannot take (a
    value of another type; a flag it needs that the older file did not write), or networks of other
    names or shapes, are one line, not a traceback."""
    from tools.evaluate import read_model, rebuild

    import common

    bc = {"algorithm": "bc", "obs_dim": 3, "act_dim": 2, "action_low": [-1.0] * 2, "action_high": [1.0] * 2}
    common.save_file(str(tmp_path / "args.pt"), {**bc, "args": {"hidden_dim": None}})
    with pytest.raises(common.UserError, match=r"^the run's args in the model file do not fit algorithms/bc.py's "
                                               r"Args and make_policy \(TypeError: "):
        rebuild(read_model(str(tmp_path / "args.pt")), torch.device("cpu"))
    common.save_file(str(tmp_path / "networks.pt"), {**bc, "args": {}, "actor": {"w": torch.ones(1)}})
    with pytest.raises(common.UserError, match=r"^the networks in the model file do not fit algorithms/bc.py's "
                                               r"make_policy \(RuntimeError: "):
        rebuild(read_model(str(tmp_path / "networks.pt")), torch.device("cpu"))
    result = run_script([os.path.join("tools", "evaluate.py"), str(tmp_path / "args.pt")], datasets_path)
    assert result.returncode == 1 and result.stderr.startswith("error: the run's args in the model file do not fit")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_evaluate_says_in_one_line_when_the_state_statistics_or_episodes_do_not_fit(datasets_path, tmp_path):
    """A model.pt with a sound checksum whose contents do not fit together (state statistics of another
    size, a run's args that ask for no evaluation episode) is one line, not a traceback."""
    from conftest import load_algorithm
    from tools.evaluate import evaluate_model

    import common

    bc = load_algorithm("bc")
    args = dict(vars(bc.Args(env="test/hopper/random-v0")))
    base = {"algorithm": "bc", "obs_dim": 11, "act_dim": 3, "action_low": [-1.0] * 3, "action_high": [1.0] * 3,
            "args": args, "actor": bc.make_policy(bc.Args(), 11, 3).actor.state_dict()}
    common.save_file(str(tmp_path / "fits.pt"), {**base, "obs_mean": torch.zeros(11), "obs_std": torch.ones(11)})
    assert len(evaluate_model(str(tmp_path / "fits.pt"), episodes=1)["episode_returns"]) == 1
    common.save_file(str(tmp_path / "stats.pt"), {**base, "obs_mean": torch.zeros(5), "obs_std": torch.ones(5)})
    with pytest.raises(common.UserError, match=r"obs_mean has shape \(5,\), not \(11,\)"):
        evaluate_model(str(tmp_path / "stats.pt"), episodes=1)
    common.save_file(str(tmp_path / "episodes.pt"), {**base, "args": {**args, "eval_episodes": 0, "final_episodes": 0}})
    with pytest.raises(common.UserError, match=r"args ask for 0 evaluation episodes; pass --episodes N"):
        evaluate_model(str(tmp_path / "episodes.pt"))
