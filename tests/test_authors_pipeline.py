"""What each file does before its first step follows its reference code (docs/implementation_notes.md,
"Defaults before the first step"): states, behaviour models, initialisation, preprocessing."""

import math
import os

import numpy as np
import torch

from conftest import ROOT, load_algorithm

# Whether the reference code standardises states: sfujim/TD3_BC (and its BC), CORL's awac.py do;
# the official IQL, CQL, Fisher-BRC, iTRPO (obs_norm False) and BRAC+ codes feed raw states.
STANDARDISED = {"bc": True, "td3_bc": True, "awr": True, "iql": False, "cql": False,
                "fisher_brc": False, "itrpo": False, "brac_plus": False, "arq": False}
CPU = torch.device("cpu")


def test_states_are_standardised_by_default_only_where_the_reference_code_does():
    for name, standardised in STANDARDISED.items():
        assert load_algorithm(name).Args().normalize_states is standardised, name


def test_the_defaults_table_names_every_file_and_its_states():
    with open(os.path.join(ROOT, "docs", "implementation_notes.md")) as f:
        notes = f.read()
    table = notes.split("## Defaults before the first step", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| `")]
    states = {r[0].strip().strip("`").removesuffix(".py"): r[3] for r in rows if r[1].strip() == "states"}
    assert set(states) == set(STANDARDISED)
    for name, ours in states.items():
        assert ("standardised" in ours) is STANDARDISED[name], (name, ours)


def test_fisher_brc_trains_its_behaviour_model_from_each_seed_unless_one_is_given():
    fisher_brc = load_algorithm("fisher_brc")

    def behaviour(**flags):
        args = fisher_brc.Args(**flags)
        return fisher_brc.FisherBRC(args, 11, 3, CPU).behavior.state_dict()

    seed0, seed1, shared1 = behaviour(seed=0), behaviour(seed=1), behaviour(seed=1, bc_seed=0)
    assert not all(torch.equal(seed0[k], seed1[k]) for k in seed0)
    assert all(torch.equal(seed0[k], shared1[k]) for k in seed0)
    assert fisher_brc.behavior_seed(fisher_brc.Args(seed=7)) == 7
    assert fisher_brc.behavior_seed(fisher_brc.Args(seed=7, bc_seed=3)) == 3


def test_cql_starts_from_rlkits_initialisation():
    cql = load_algorithm("cql")
    torch.manual_seed(0)
    agent = cql.CQL(cql.Args(), 11, 3, CPU)
    for net, output_bound in ((agent.critic.net, 3e-3), (agent.actor.net, 1e-3)):
        *hidden, out = [m for m in net if hasattr(m, "weight")]
        for layer in hidden:  # fanin_init reads the nn.Linear weight's size(0): the output width
            fan = layer.weight.shape[-1] if layer.weight.dim() == 3 else layer.weight.shape[0]
            bound = 1 / math.sqrt(fan)
            assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
            assert torch.all(layer.bias == 0.1)
        for p in (out.weight, out.bias):
            assert p.abs().max() <= output_bound and p.abs().max() > 0.5 * output_bound
    torch.manual_seed(0)
    plain = cql.CQL(cql.Args(init="torch"), 11, 3, CPU)
    assert not torch.all(plain.critic.net[0].bias == 0.1)


def test_arq_standardises_states_and_actions_with_numpys_std():
    arq = load_algorithm("arq")
    obs = torch.tensor([[0.0, 1.0, 3.0], [2.0, 1.0, 3.01], [4.0, 1.2, 3.0]])  # a column's std under 0.05
    act = torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.1, 0.0]])
    model = arq.ScoreModel(3, 2, arq.Args())
    model.set_normalization(obs, act)
    np.testing.assert_allclose(model.obs_std.numpy(), np.maximum(np.std(obs.numpy(), 0), 0.05), rtol=1e-6)
    np.testing.assert_allclose(model.act_std.numpy(), np.maximum(np.std(act.numpy(), 0), 0.05), rtol=1e-6)
    assert model.obs_std[2] == model.act_std[1] == 0.05  # the floor, where numpy's std is below it
