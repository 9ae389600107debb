"""Evaluating a policy again: the same numbers from the same weights and seed."""

import torch

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
