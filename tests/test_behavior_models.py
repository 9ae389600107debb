"""Behaviour models: Fisher-BRC's and iTRPO's training steps as in the authors' code, and the on-disk
cache that lets seeds and settings share one behaviour model (Fisher-BRC, iTRPO, BRAC+)."""

import copy
import json
import os
import re

import pytest
import torch

from conftest import load_algorithm, run_script


def fisher_brc_agent(**overrides):
    fbrc = load_algorithm("fisher_brc")
    args = fbrc.Args(hidden_dim=16, n_components=3, **overrides)
    return fbrc, fbrc.FisherBRC(args, obs_dim=3, act_dim=2, device=torch.device("cpu"))


def test_fisher_brc_behaviour_sample_is_reparameterised_through_the_chosen_component_only():
    """TFP's mixture sample: the component choice carries no gradient, the Gaussian draw does, so
    the entropy estimate -log mu(a~mu|s) trains the chosen component's mean and scale."""
    _, agent = fisher_brc_agent()
    actions = agent.behavior.sample(torch.randn(64, 3))
    assert actions.requires_grad
    actions.sum().backward()
    # last layer rows per action dimension: 3 logits, 3 means, 3 log-stds
    last = agent.behavior.net[-1].weight.grad.view(2, 9, -1)
    assert last[:, :3].abs().sum() == 0
    assert (last[:, 3:6].abs().sum(-1) > 0).any() and (last[:, 6:].abs().sum(-1) > 0).any()


def test_fisher_brc_behaviour_temperature_follows_the_learning_rate_schedule():
    fbrc, agent = fisher_brc_agent(bc_steps=10, bc_lr=1e-3)
    obs, act = torch.randn(32, 3), torch.rand(32, 2) * 2 - 1
    batch = fbrc.common.Batch(obs, act, torch.zeros(32), obs, torch.zeros(32))
    for _ in range(10):
        agent.train_behavior(batch)
    for optimizer in (agent.behavior_optimizer, agent.behavior_alpha_optimizer):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_fisher_brc_temperature_step_is_scaled_by_alpha_as_in_the_official_code():
    fbrc, agent = fisher_brc_agent(bc_steps=10)
    with torch.no_grad():
        agent.behavior_log_alpha.fill_(-3.0)
    obs, act = torch.randn(32, 3), torch.rand(32, 2) * 2 - 1
    batch = fbrc.common.Batch(obs, act, torch.zeros(32), obs, torch.zeros(32))
    metrics = agent.train_behavior(batch)  # the gradient stays in .grad after the step
    expected = torch.exp(torch.tensor(-3.0)) * (metrics["charts/behavior_entropy"] - agent.target_entropy)
    torch.testing.assert_close(agent.behavior_log_alpha.grad, expected, rtol=1e-4, atol=1e-6)


def test_fisher_brc_behaviour_learning_rate_drops_one_update_after_each_boundary_as_keras_does():
    """behavioral_cloning.py: PiecewiseConstantDecay([800k, 900k], [1e-3, 1e-4, 1e-5]) of the optimiser's
    step count, which is n - 1 at update n: 1e-3 while n - 1 <= 800k, i.e. for the first 800,001 updates."""
    fbrc, agent = fisher_brc_agent(bc_steps=20, bc_lr=1e-3)  # boundaries 16 and 18
    obs, act = torch.randn(32, 3), torch.rand(32, 2) * 2 - 1
    batch = fbrc.common.Batch(obs, act, torch.zeros(32), obs, torch.zeros(32))
    used = []  # the rates each update runs at (the schedulers step after the update)
    for _ in range(20):
        used.append([opt.param_groups[0]["lr"] for opt in (agent.behavior_optimizer, agent.behavior_alpha_optimizer)])
        agent.train_behavior(batch)
    keras = [1e-3 if step <= 16 else 1e-4 if step <= 18 else 1e-5 for step in range(20)]
    assert [model for model, _ in used] == pytest.approx(keras)
    assert [temperature for _, temperature in used] == pytest.approx(keras)


def test_itrpo_behaviour_loss_uses_the_temperature_after_its_step():
    """bc_trainer.py steps log alpha first, then adds exp(log alpha).detach() * log pi to the loss."""
    itrpo = load_algorithm("itrpo")
    torch.manual_seed(0)
    agent = itrpo.ITRPO(itrpo.Args(hidden_dim=16, bc_steps=10, bc_lr=0.5), 3, 2, torch.device("cpu"))
    before = copy.deepcopy(agent.behavior)
    obs, act = torch.randn(32, 3), torch.rand(32, 2) * 1.8 - 0.9
    torch.manual_seed(1)
    agent.train_behavior(itrpo.common.Batch(obs, act, torch.zeros(32), obs, torch.zeros(32)))
    alpha = agent.behavior_log_alpha.exp().detach()
    assert abs(alpha.item() - 1.0) > 0.3  # the step moved it (Adam's first step is the learning rate)
    torch.manual_seed(1)  # the same entropy sample, on the model as it was before the step
    params = before(obs)
    log_prob = itrpo.tanh_gaussian_log_prob(*params, act)
    entropy = -itrpo.tanh_gaussian_sample(*params)[1]
    (-(log_prob + alpha * entropy).mean()).backward()
    for got, want in zip(agent.behavior.parameters(), before.parameters()):  # .grad stays after the step
        torch.testing.assert_close(got.grad, want.grad)


SMALL = {"brac_plus": ["--pretrain-steps", "10", "--epoch-steps", "10", "--kl-states", "64", "--batch-size", "16",
                       "--hidden-dim", "32", "--actor-hidden-dim", "32", "--vae-hidden-dim", "32",
                       "--n-samples", "2", "--n-latent", "2"]}


def pretraining_run(datasets_path, tmp_path, algorithm, name, extra=()):
    out = tmp_path / "runs"
    result = run_script([f"algorithms/{algorithm}.py", "--env", "test/hopper/random-v0", "--total-steps", "20",
                         "--eval-every", "20", "--eval-episodes", "1", "--bc-steps", "30", "--device", "cpu",
                         "--batch-size", "64", "--output-dir", str(out), "--run-name", name,
                         *SMALL.get(algorithm, []), *extra],
                        datasets_path)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / name / "results.json") as f:
        return result.stdout, json.load(f)["evaluations"], out


@pytest.mark.parametrize("algorithm", ["fisher_brc", "itrpo", "brac_plus"])
def test_behaviour_model_is_cached_and_a_cached_run_continues_identically(algorithm, datasets_path, tmp_path):
    first_log, first, out = pretraining_run(datasets_path, tmp_path, algorithm, "first")
    cached = sorted(os.listdir(out / "pretrained_cache"))
    assert len(cached) == 1 and cached[0].startswith(f"{algorithm}_behavior_")
    assert "behaviour model step" in first_log
    second_log, second, _ = pretraining_run(datasets_path, tmp_path, algorithm, "second")
    assert "reusing the cached pretrained model" in second_log
    assert "behaviour model step" not in second_log
    assert [e["return_mean"] for e in second] == [e["return_mean"] for e in first]
    # another --seed shares the behaviour model; Fisher-BRC's authors train one per seed, as its file does
    # unless --bc-seed names one
    third_log, _, _ = pretraining_run(datasets_path, tmp_path, algorithm, "third", ["--seed", "3"])
    assert ("behaviour model step" in third_log) == (algorithm == "fisher_brc")
    assert ("reusing the cached pretrained model" in third_log) == (algorithm != "fisher_brc")
    if algorithm == "fisher_brc":
        shared_log, _, _ = pretraining_run(datasets_path, tmp_path, algorithm, "shared", ["--seed", "3", "--bc-seed", "0"])
        assert "reusing the cached pretrained model" in shared_log
    if algorithm == "fisher_brc":  # --no-reuse-cache trains it again (the three files read it in the same line)
        fourth_log, _, _ = pretraining_run(datasets_path, tmp_path, algorithm, "fourth", ["--no-reuse-cache"])
        assert "behaviour model step" in fourth_log


def test_a_damaged_behaviour_cache_is_retrained_with_a_notice(datasets_path, tmp_path):
    _, first, out = pretraining_run(datasets_path, tmp_path, "fisher_brc", "first")
    (path,) = (out / "pretrained_cache").iterdir()
    path.write_bytes(path.read_bytes()[:100])
    log, again, _ = pretraining_run(datasets_path, tmp_path, "fisher_brc", "again")
    assert "cannot be read" in log and "building it again" in log and "behaviour model step" in log
    assert [e["return_mean"] for e in again] == [e["return_mean"] for e in first]


@pytest.mark.parametrize("algorithm", ["fisher_brc", "itrpo"])
def test_behaviour_cache_key_names_how_the_model_is_trained(algorithm):
    """A behaviour model trained another way (another initialisation, temperature order or
    learning-rate schedule) must not be read from the cache as this one: the key carries the
    file's recipe words, which the bare key of the data and flags does not."""
    import inspect

    module = load_algorithm(algorithm)
    # the file passes its recipe, a non-empty tuple of words, to the key
    assert re.search(r'pretraining_key\([^)]*\),\s*data,\s*recipe=\("[^"]+"', inspect.getsource(module))
    data = module.common.OfflineData.__new__(module.common.OfflineData)
    data.observations, data.actions = torch.zeros(4, 2), torch.ones(4, 1)
    args = module.Args()
    assert module.common.pretraining_key(args, ("bc_steps",), data, recipe=("x",)) != \
        module.common.pretraining_key(args, ("bc_steps",), data)
