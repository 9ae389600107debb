"""Bad input ends with one clear line on stderr and a non-zero exit, never a traceback."""

import os

import pytest

from conftest import ROOT, run_script

SCRIPT = os.path.join(ROOT, "algorithms", "td3_bc.py")


def assert_clean_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_unknown_dataset_id_is_one_line_naming_it(datasets_path, tmp_path, monkeypatch):
    """An id that is neither local nor downloadable (here: no network) is one line naming it and
    saying how to get a dataset; no list of remote ids is kept any more, so no remote id is guessed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail at once instead of retrying on a dead network
    result = run_script([SCRIPT, "--env", "mujoco/hoper/medium-v0", "--output-dir", str(tmp_path)],
                        datasets_path)
    assert_clean_error(result, "'mujoco/hoper/medium-v0'", "minari download", "minari list local")


def test_unknown_dataset_id_suggests_local_datasets(datasets_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_script([SCRIPT, "--env", "test/hoper/random-v0", "--output-dir", str(tmp_path)],
                        datasets_path)
    assert_clean_error(result, "'test/hoper/random-v0'", "test/hopper/random-v0")


def test_discrete_action_space_is_refused(datasets_path, tmp_path):
    result = run_script([SCRIPT, "--env", "test/cartpole/random-v0", "--output-dir", str(tmp_path)],
                        datasets_path)
    assert_clean_error(result, "test/cartpole/random-v0", "action space Discrete(2)", "continuous control")


def test_download_without_network_says_what_to_do(datasets_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail at once instead of retrying on a dead network
    result = run_script([SCRIPT, "--env", "mujoco/hopper/medium-v0", "--output-dir", str(tmp_path)],
                        datasets_path)
    assert_clean_error(result, "'mujoco/hopper/medium-v0'", "without network", "minari download")


def test_nan_losses_stop_the_run_with_a_message(datasets_path, tmp_path):
    # a learning rate of 1e30 moves every weight by ~1e30 in the first step: Q overflows to inf, then NaN
    result = run_script([SCRIPT, "--env", "test/hopper/random-v0", "--total-steps", "40", "--log-every", "10",
                         "--batch-size", "64", "--lr", "1e30", "--output-dir", str(tmp_path)], datasets_path)
    assert_clean_error(result, "became nan at step 10", "diverged")


def test_cuda_device_without_cuda_is_refused(datasets_path, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_script([SCRIPT, "--env", "test/hopper/random-v0", "--device", "cuda",
                         "--output-dir", str(tmp_path)], datasets_path)
    assert_clean_error(result, "CUDA is not available")


def test_unknown_flag_is_reported_by_the_cli(datasets_path):
    result = run_script([SCRIPT, "--no-such-flag", "1"], datasets_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
