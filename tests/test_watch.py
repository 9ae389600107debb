"""Evaluating a policy again: the same numbers from the same weights and seed, and from a saved one
(tools/evaluate.py).

That tools/evaluate.py gives every file's final evaluation again from its model.pt is checked on the
end-to-end runs of tests/test_algorithms.py, test_brac_plus.py and test_arq.py (conftest's
check_saved_model)."""

import os

import pytest
import torch

from conftest import run_script

DATASET = "test/hopper/random-v0"  # Hopper-v5 episodes of at most 40 steps


def elementwise_policy(obs):
    """Row by row the same numbers whatever the batch (a matrix product's last bits can depend on it)."""
    return torch.tanh(2.0 * obs[:, :3] - obs[:, 3:6])


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


def test_evaluate_refuses_what_is_not_a_model_file_in_one_line(datasets_path, tmp_path):
    from tools.evaluate import read_model

    import common

    with pytest.raises(common.UserError, match="does not exist"):
        read_model(str(tmp_path / "missing.pt"))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(common.UserError, match="is not a model.pt written by a run with --save-model"):
        read_model(str(tmp_path / "text.pt"))
    torch.save({"w": torch.ones(1)}, tmp_path / "weights.pt")
    with pytest.raises(common.UserError, match="holds no algorithm"):
        read_model(str(tmp_path / "weights.pt"))
    torch.save({"algorithm": "../common", "args": {}, "obs_dim": 1, "act_dim": 1}, tmp_path / "foreign.pt")
    with pytest.raises(common.UserError, match="algorithm '../common', which is not a file in algorithms/"):
        read_model(str(tmp_path / "foreign.pt"))

    result = run_script([os.path.join("tools", "evaluate.py"), str(tmp_path / "missing.pt")], datasets_path)
    assert result.returncode == 1 and result.stderr.strip() == f"error: {tmp_path / 'missing.pt'} does not exist"
