"""The speed-ups change no arithmetic the algorithms do.

Each file's twin critic is one 2-member ensemble (every layer one batched matmul), its optimisers are
fused Adam, its Polyak step one foreach call, its policies sample n actions per state from one forward,
and forwards that were computed twice are computed once. Here each is checked against the structure it
replaced, rebuilt in this file: two separate MLPs with the same weights, for-loop Adam, a lerp per
parameter and the training steps as they were written before, on fixed batches with fixed seeds."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import load_algorithm

CRITIC_FILES = {"td3_bc": 2, "awr": 3, "iql": 2, "cql": 3, "itrpo": 3, "brac_plus": 2, "arq": 2, "fisher_brc": 3}


# ----------------------------------------------------------------------------------------------
# The ensemble critic against two separate MLPs
# ----------------------------------------------------------------------------------------------
class TwinMLP(torch.nn.Module):
    """The twin critic as it was: two nn.Linear MLPs on concat(s, a), returning (Q1, Q2)."""

    def __init__(self, q1: torch.nn.Sequential, q2: torch.nn.Sequential):
        super().__init__()
        self.q1, self.q2 = q1, q2

    def forward(self, obs, act):
        x = torch.cat([obs, act], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


def ensemble_layers(ensemble: torch.nn.Module) -> list:
    return [m for m in ensemble.modules() if type(m).__name__ == "EnsembleLinear"]


def twin_from(module, ensemble: torch.nn.Module, in_dim: int, hidden_dim: int, n_hidden: int) -> TwinMLP:
    """Two of the file's own `mlp`s holding the ensemble's member weights (nn.Linear stores W^T)."""
    twin = TwinMLP(module.mlp(in_dim, 1, hidden_dim, n_hidden), module.mlp(in_dim, 1, hidden_dim, n_hidden))
    with torch.no_grad():
        for i, net in enumerate((twin.q1, twin.q2)):
            linears = [m for m in net if isinstance(m, torch.nn.Linear)]
            layers = ensemble_layers(ensemble)
            assert len(linears) == len(layers) == n_hidden + 1
            for linear, layer in zip(linears, layers):
                linear.weight.copy_(layer.weight[i].T)
                linear.bias.copy_(layer.bias[i, 0])
    return twin


def assert_twin_matches(ensemble: torch.nn.Module, twin: TwinMLP, **tol) -> None:
    for i, net in enumerate((twin.q1, twin.q2)):
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        for linear, layer in zip(linears, ensemble_layers(ensemble)):
            torch.testing.assert_close(layer.weight[i].T, linear.weight, **tol)
            torch.testing.assert_close(layer.bias[i, 0], linear.bias, **tol)


def critic_of(name: str, obs_dim: int, act_dim: int, hidden_dim: int):
    module = load_algorithm(name)
    cls = module.Offsets if name == "fisher_brc" else module.Critic
    return module, cls(obs_dim, act_dim, hidden_dim)


@pytest.mark.parametrize("name", sorted(CRITIC_FILES))
def test_ensemble_critic_gives_the_values_and_gradients_of_two_separate_mlps(name):
    torch.manual_seed(0)
    module, critic = critic_of(name, 5, 3, 16)
    twin = twin_from(module, critic, 8, 16, CRITIC_FILES[name])
    obs, act = torch.randn(32, 5), torch.rand(32, 3) * 2 - 1
    a_ens, a_ref = act.clone().requires_grad_(True), act.clone().requires_grad_(True)
    q_ens, q_ref = critic(obs, a_ens), twin(obs, a_ref)
    assert q_ens.shape == (2, 32)
    for got, want in zip(q_ens, q_ref):
        torch.testing.assert_close(got, want)
    # a loss that weighs the two critics differently, so that a mix-up of members would show
    ((q_ens[0] ** 2).mean() + 3.0 * q_ens[1].mean()).backward()
    ((q_ref[0] ** 2).mean() + 3.0 * q_ref[1].mean()).backward()
    torch.testing.assert_close(a_ens.grad, a_ref.grad)
    for i, net in enumerate((twin.q1, twin.q2)):
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        for linear, layer in zip(linears, ensemble_layers(critic)):
            torch.testing.assert_close(layer.weight.grad[i].T, linear.weight.grad)
            torch.testing.assert_close(layer.bias.grad[i, 0], linear.bias.grad)


def test_td3_bc_q1_alone_is_the_first_member_with_its_gradients():
    td3_bc = load_algorithm("td3_bc")
    torch.manual_seed(8)
    critic = td3_bc.Critic(5, 3, 16)
    twin = twin_from(td3_bc, critic, 8, 16, 2)
    obs, act = torch.randn(32, 5), torch.rand(32, 3) * 2 - 1
    a_ens, a_ref = act.clone().requires_grad_(True), act.clone().requires_grad_(True)
    q1 = critic.q1(obs, a_ens)
    torch.testing.assert_close(q1, critic(obs, act)[0])
    (q1**2).mean().backward()
    (twin.q1(torch.cat([obs, a_ref], -1)).squeeze(-1) ** 2).mean().backward()
    torch.testing.assert_close(a_ens.grad, a_ref.grad)
    linears = [m for m in twin.q1 if isinstance(m, torch.nn.Linear)]
    for linear, layer in zip(linears, ensemble_layers(critic)):
        torch.testing.assert_close(layer.weight.grad[0].T, linear.weight.grad)
        assert (layer.weight.grad[1] == 0).all()  # Q2 untouched


@pytest.mark.parametrize("name", ["fisher_brc", "itrpo", "brac_plus"])
def test_per_member_action_copies_give_each_network_its_own_action_gradient(name):
    """The gradient penalties feed (2, N, A) actions: member i sees act[i], and one backward pass
    gives both networks' action gradients, as two autograd.grad calls on separate MLPs did."""
    torch.manual_seed(1)
    module, critic = critic_of(name, 4, 2, 16)
    twin = twin_from(module, critic, 6, 16, CRITIC_FILES[name])
    obs, act = torch.randn(8, 4), torch.rand(8, 2) * 2 - 1
    torch.testing.assert_close(critic(obs, act.repeat(2, 1, 1)), critic(obs, act))
    copies = act.repeat(2, 1, 1).requires_grad_(True)
    q = critic(obs, copies)
    g = torch.autograd.grad(q[0].sum() + q[1].sum(), copies)[0]
    shared = act.clone().requires_grad_(True)
    q1, q2 = twin(obs, shared)
    torch.testing.assert_close(g[0], torch.autograd.grad(q1.sum(), shared, retain_graph=True)[0])
    torch.testing.assert_close(g[1], torch.autograd.grad(q2.sum(), shared)[0])


def test_gradient_penalties_match_the_two_pass_versions_in_value_and_parameter_gradients():
    fbrc, bp, itrpo = load_algorithm("fisher_brc"), load_algorithm("brac_plus"), load_algorithm("itrpo")
    torch.manual_seed(2)
    obs, act = torch.randn(16, 4), torch.rand(16, 2) * 2 - 1

    def two_pass(critic, act):  # the penalties as written before: one autograd.grad per network
        act = act.detach().requires_grad_(True)
        q1, q2 = critic(obs, act)
        g1 = torch.autograd.grad(q1.sum(), act, create_graph=True)[0]
        g2 = torch.autograd.grad(q2.sum(), act, create_graph=True)[0]
        return g1.pow(2).sum(-1) + g2.pow(2).sum(-1)

    offsets = fbrc.Offsets(4, 2, 16)
    twin = twin_from(fbrc, offsets, 6, 16, 3)
    fbrc.gradient_penalty(offsets, obs, act).backward()
    gp_ref = two_pass(twin, act).mean()
    gp_ref.backward()
    torch.testing.assert_close(fbrc.gradient_penalty(offsets, obs, act), gp_ref)
    for i, net in enumerate((twin.q1, twin.q2)):
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        for linear, layer in zip(linears, ensemble_layers(offsets)):
            torch.testing.assert_close(layer.weight.grad[i].T, linear.weight.grad)

    critic = itrpo.Critic(4, 2, 16)
    twin = twin_from(itrpo, critic, 6, 16, 3)
    torch.testing.assert_close(itrpo.gradient_penalty(critic, obs, act), two_pass(twin, act).mean())

    critic = bp.Critic(4, 2, 16)
    twin = twin_from(bp, critic, 6, 16, 2)
    kl = torch.linspace(0.0, 2.0, 16)
    gp = bp.gated_gradient_penalty(critic, obs, act, kl, 1.0, "paper")
    torch.testing.assert_close(gp, two_pass(twin, act) * (kl > 1.0).float())


def test_ensemble_layers_start_from_each_members_own_draw_of_the_nn_linear_distribution():
    td3_bc = load_algorithm("td3_bc")
    torch.manual_seed(3)
    layer = td3_bc.common.EnsembleLinear(2, 200, 300)
    bound = 1.0 / math.sqrt(200)
    for param in (layer.weight, layer.bias):
        assert param.abs().max() <= bound
    w0, w1 = layer.weight
    assert not torch.equal(w0, w1)  # independent members, not one draw shared
    # uniform on [-b, b]: std b / sqrt(3), as nn.Linear's kaiming_uniform(a=sqrt 5)
    for w in (w0, w1):
        assert w.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.02)
        assert w.mean().item() == pytest.approx(0.0, abs=0.02 * bound)
    reference = torch.nn.Linear(200, 300).weight
    assert reference.abs().max() <= bound and reference.std().item() == pytest.approx(w0.std().item(), rel=0.03)


def test_fisher_brc_offsets_are_orthogonal_per_member_with_the_official_gains():
    fbrc = load_algorithm("fisher_brc")
    torch.manual_seed(4)
    offsets = fbrc.Offsets(obs_dim=20, act_dim=6, hidden_dim=64)
    layers = ensemble_layers(offsets)
    for k, layer in enumerate(layers):
        gain = 1e-2 if k == len(layers) - 1 else math.sqrt(2.0)
        assert (layer.bias == 0).all()
        for w in layer.weight:  # (in, out), nn.Linear's weight transposed
            w = w / gain
            small = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
            torch.testing.assert_close(small, torch.eye(min(w.shape)), atol=1e-5, rtol=0)
        assert not torch.allclose(layer.weight[0], layer.weight[1])


# ----------------------------------------------------------------------------------------------
# Fused Adam, the foreach Polyak step and the one-gather replay buffer
# ----------------------------------------------------------------------------------------------
def test_fused_adam_takes_the_steps_of_for_loop_adam():
    torch.manual_seed(5)
    params = [torch.randn(7, 5), torch.randn(5), torch.randn(())]
    fused = [p.clone().requires_grad_(True) for p in params]
    plain = [p.clone().requires_grad_(True) for p in params]
    opt_fused = torch.optim.Adam(fused, lr=1e-2, fused=True)
    opt_plain = torch.optim.Adam(plain, lr=1e-2, foreach=False)
    for step in range(20):
        grads = [torch.randn_like(p) * (step + 1) for p in params]
        for ps, opt in ((fused, opt_fused), (plain, opt_plain)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    for a, b, start in zip(fused, plain, params):
        torch.testing.assert_close(a, b)
        assert (a - start).abs().max() > 1e-2  # they moved: the comparison is not of untouched tensors


def test_td3_bc_targets_take_the_per_parameter_polyak_step_on_actor_steps():
    """The foreach lerp in TD3+BC's step is target <- target + tau (net - target), per parameter,
    for the actor's and the critic's targets, on the steps the actor moves (every --policy-freq)."""
    td3_bc = load_algorithm("td3_bc")
    args = td3_bc.Args(hidden_dim=16, tau=0.05)
    torch.manual_seed(6)
    agent = td3_bc.TD3BC(args, 5, 3, torch.device("cpu"))
    g = torch.Generator().manual_seed(6)
    batch = common.Batch(torch.randn(32, 5, generator=g), torch.rand(32, 3, generator=g) * 2 - 1,
                         torch.randn(32, generator=g), torch.randn(32, 5, generator=g), torch.zeros(32))
    pairs = ((agent.actor, agent.actor_target), (agent.critic, agent.critic_target))
    for step in range(1, 2 * args.policy_freq + 1):
        before = [[p.detach().clone() for p in target.parameters()] for _, target in pairs]
        agent.train(batch)
        for (net, target), old in zip(pairs, before):
            for p, tp, o in zip(net.parameters(), target.parameters(), old):
                if step % args.policy_freq:
                    assert torch.equal(tp, o)
                else:
                    torch.testing.assert_close(tp, o + args.tau * (p.detach() - o))
                    assert not torch.equal(tp, o)


def test_one_gather_replay_buffer_draws_the_batches_of_five_gathers(datasets_path):
    data = common.load_dataset("test/hopper/random-v0")
    buffer = common.ReplayBuffer(data)
    torch.manual_seed(7)
    batch = buffer.sample(64)
    torch.manual_seed(7)
    idx = torch.randint(0, len(data), (64,))
    expected = (data.observations[idx], data.actions[idx], data.rewards[idx], data.next_observations[idx],
                data.terminals[idx])
    assert isinstance(batch, common.Batch)
    for got, want in zip(batch, expected):
        assert got.shape == want.shape and torch.equal(got, want)


# ----------------------------------------------------------------------------------------------
# Training steps against the steps as they were written before
# ----------------------------------------------------------------------------------------------
OBS, ACT, N = 5, 3, 48


def fixed_batch(terminal_every: int = 7) -> common.Batch:
    g = torch.Generator().manual_seed(11)
    terminals = (torch.arange(N) % terminal_every == 0).float()
    return common.Batch(torch.randn(N, OBS, generator=g), torch.rand(N, ACT, generator=g) * 1.8 - 0.9,
                        torch.randn(N, generator=g), torch.randn(N, OBS, generator=g), terminals)


def unfused(optimizer: torch.optim.Optimizer, params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=optimizer.param_groups[0]["lr"], foreach=False)


def lerp_loop(net, target, tau):
    with torch.no_grad():
        for p, tp in zip(net.parameters(), target.parameters()):
            tp.lerp_(p, tau)


def reference_agent(agent, module, critic_names, in_dim, hidden_dim, n_hidden, optimizers):
    """A copy of `agent` whose twin critics are two MLPs with the same weights and whose optimisers are
    for-loop Adam over the same parameters; `optimizers` maps each optimiser to a function of the copy
    that lists its parameters."""
    ref = copy.deepcopy(agent)
    for name in critic_names:
        setattr(ref, name, twin_from(module, getattr(agent, name), in_dim, hidden_dim, n_hidden))
    for opt_name, params in optimizers.items():
        setattr(ref, opt_name, unfused(getattr(agent, opt_name), params(ref)))
    return ref


def compare_steps(agent, ref, step_new, step_ref, n_steps=3, critic_pairs=(), batch=None):
    """n_steps on one fixed batch, each after the same seed: same metrics, and the critics end equal."""
    batch = batch or fixed_batch()
    for s in range(n_steps):
        torch.manual_seed(100 + s)
        got = step_new(batch)
        torch.manual_seed(100 + s)
        want = step_ref(batch)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(torch.as_tensor(got[k]).float(), torch.as_tensor(want[k]).float(),
                                       rtol=1e-4, atol=1e-5, msg=f"step {s}: {k}")
    for ens_name, twin_name in critic_pairs:
        assert_twin_matches(getattr(agent, ens_name), getattr(ref, twin_name), rtol=1e-4, atol=1e-5)


def test_bc_step_with_fused_adam_is_the_plain_adam_step():
    bc = load_algorithm("bc")
    torch.manual_seed(0)
    agent = bc.BC(bc.Args(hidden_dim=32), OBS, ACT, torch.device("cpu"))
    ref = copy.deepcopy(agent)
    ref.actor_optimizer = unfused(agent.actor_optimizer, ref.actor.parameters())

    def step_ref(batch):
        loss = F.mse_loss(ref.actor(batch.observations), batch.actions)
        ref.actor_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ref.actor_optimizer.step()
        return {"losses/actor_loss": loss.detach()}

    compare_steps(agent, ref, agent.train, step_ref, n_steps=5)
    for p, q in zip(agent.actor.parameters(), ref.actor.parameters()):
        torch.testing.assert_close(p, q)


def td3_bc_reference(td3, ref):
    def step(batch):
        args = ref.args
        ref.total_it += 1
        obs, actions, rewards, next_obs, terminals = batch
        with torch.no_grad():
            noise = (torch.randn_like(actions) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
            next_actions = (ref.actor_target(next_obs) + noise).clamp(-1.0, 1.0)
            target_q = torch.min(*ref.critic_target(next_obs, next_actions))
            target_q = rewards + args.gamma * (1.0 - terminals) * target_q
        q1, q2 = ref.critic(obs, actions)
        critic_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        ref.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        ref.critic_optimizer.step()
        if ref.total_it % args.policy_freq == 0:
            pi = ref.actor(obs)
            q_pi = ref.critic.q1(torch.cat([obs, pi], dim=-1)).squeeze(-1)
            loss, lmbda = td3.bc_regularised_loss(q_pi, pi, actions, args.alpha)
            ref.actor_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ref.actor_optimizer.step()
            lerp_loop(ref.actor, ref.actor_target, args.tau)
            lerp_loop(ref.critic, ref.critic_target, args.tau)
            return {"losses/critic_loss": critic_loss.detach(), "losses/q1": q1.mean().detach(),
                    "losses/actor_loss": loss.detach(), "charts/lambda": lmbda}
        return {"losses/critic_loss": critic_loss.detach(), "losses/q1": q1.mean().detach()}
    return step


def test_td3_bc_step_is_the_unfused_step():
    td3 = load_algorithm("td3_bc")
    torch.manual_seed(0)
    agent = td3.TD3BC(td3.Args(hidden_dim=32), OBS, ACT, torch.device("cpu"))
    ref = reference_agent(agent, td3, ["critic", "critic_target"], OBS + ACT, 32, 2,
                          {"critic_optimizer": lambda r: r.critic.parameters(),
                           "actor_optimizer": lambda r: r.actor.parameters()})
    compare_steps(agent, ref, agent.train, td3_bc_reference(td3, ref), n_steps=4,
                  critic_pairs=[("critic", "critic"), ("critic_target", "critic_target")])


def test_awr_step_is_the_unfused_step():
    awr = load_algorithm("awr")
    torch.manual_seed(0)
    agent = awr.AWR(awr.Args(hidden_dim=32), OBS, ACT, torch.device("cpu"))
    ref = reference_agent(agent, awr, ["critic", "critic_target"], OBS + ACT, 32, 3,
                          {"critic_optimizer": lambda r: r.critic.parameters(),
                           "actor_optimizer": lambda r: r.actor.parameters()})

    def step(batch):
        args = ref.args
        obs, actions, rewards, next_obs, terminals = batch
        with torch.no_grad():
            next_actions = ref.actor.sample(next_obs)
            target_q = torch.min(*ref.critic_target(next_obs, next_actions))
            target_q = rewards + args.gamma * (1.0 - terminals) * target_q
        q1, q2 = ref.critic(obs, actions)
        critic_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        ref.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        ref.critic_optimizer.step()
        with torch.no_grad():
            v = torch.min(*ref.critic(obs, ref.actor.sample(obs)))
            advantages = torch.min(*ref.critic(obs, actions)) - v
            weights = awr.awr_weights(advantages, args.awr_lambda, args.max_weight)
        actor_loss = -(weights * ref.actor.distribution(obs).log_prob(actions).sum(-1)).mean()
        ref.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        ref.actor_optimizer.step()
        lerp_loop(ref.critic, ref.critic_target, args.tau)
        return {"losses/critic_loss": critic_loss.detach(), "losses/actor_loss": actor_loss.detach(),
                "losses/q1": q1.mean().detach(), "charts/advantage": advantages.mean(), "charts/weight": weights.mean()}

    compare_steps(agent, ref, agent.train, step, critic_pairs=[("critic", "critic"), ("critic_target", "critic_target")])


def test_iql_step_is_the_unfused_step():
    iql = load_algorithm("iql")
    torch.manual_seed(0)
    args = iql.Args(hidden_dim=32, expectile=0.7, beta=3.0, dropout=0.0, reward_transform="none", total_steps=10)
    agent = iql.IQL(args, OBS, ACT, torch.device("cpu"))
    ref = reference_agent(agent, iql, ["critic", "critic_target"], OBS + ACT, 32, 2,
                          {"critic_optimizer": lambda r: r.critic.parameters(),
                           "actor_optimizer": lambda r: r.actor.parameters(),
                           "value_optimizer": lambda r: r.value.parameters()})
    ref.actor_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(ref.actor_optimizer, args.total_steps)

    def step(batch):
        obs, actions, rewards, next_obs, terminals = batch
        with torch.no_grad():
            target_q = torch.min(*ref.critic_target(obs, actions))
        v = ref.value(obs).squeeze(-1)
        value_loss = iql.expectile_loss(target_q - v, args.expectile)
        ref.value_optimizer.zero_grad(set_to_none=True)
        value_loss.backward()
        ref.value_optimizer.step()
        with torch.no_grad():
            v = ref.value(obs).squeeze(-1)
            weights = torch.exp(args.beta * (target_q - v)).clamp(max=args.max_weight)
        actor_loss = -(weights * ref.actor.log_prob(obs, actions)).mean()
        ref.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        ref.actor_optimizer.step()
        ref.actor_scheduler.step()
        with torch.no_grad():
            target = rewards + args.gamma * (1.0 - terminals) * ref.value(next_obs).squeeze(-1)
        q1, q2 = ref.critic(obs, actions)
        critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        ref.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        ref.critic_optimizer.step()
        lerp_loop(ref.critic, ref.critic_target, args.tau)
        return {"losses/value_loss": value_loss.detach(), "losses/actor_loss": actor_loss.detach(),
                "losses/critic_loss": critic_loss.detach(), "losses/q1": q1.mean().detach(),
                "losses/v": v.mean(), "charts/weight": weights.mean()}

    compare_steps(agent, ref, agent.train, step, critic_pairs=[("critic", "critic"), ("critic_target", "critic_target")])


@pytest.mark.parametrize("max_q_backup, bc_warmup_steps", [(False, 0), (True, 0), (False, 2)])
def test_cql_step_is_the_unfused_step(max_q_backup, bc_warmup_steps):
    cql = load_algorithm("cql")
    torch.manual_seed(0)
    args = cql.Args(hidden_dim=32, n_actions=4, max_q_backup=max_q_backup, bc_warmup_steps=bc_warmup_steps)
    agent = cql.CQL(args, OBS, ACT, torch.device("cpu"))
    ref = reference_agent(agent, cql, ["critic", "critic_target"], OBS + ACT, 32, 3,
                          {"critic_optimizer": lambda r: r.critic.parameters(),
                           "actor_optimizer": lambda r: r.actor.parameters(),
                           "alpha_optimizer": lambda r: [r.log_alpha],
                           "alpha_prime_optimizer": lambda r: [r.log_alpha_prime]})

    def step(batch):  # the Lagrange branch is not touched by the speed-ups; w is fixed here
        ref.total_it += 1
        obs, actions, rewards, next_obs, terminals = batch
        batch_size, act_dim = actions.shape
        m = args.n_actions
        with torch.no_grad():
            if args.max_q_backup:
                next_rep = next_obs.repeat_interleave(m, 0)
                next_q1, next_q2 = ref.critic_target(next_rep, ref.actor.sample(next_rep)[0])
                target_q = cql.max_q_backup(next_q1.view(batch_size, m), next_q2.view(batch_size, m))
            else:
                target_q = torch.min(*ref.critic_target(next_obs, ref.actor.sample(next_obs)[0]))
            target_q = rewards + args.gamma * (1.0 - terminals) * target_q
            obs_rep = obs.repeat_interleave(m, 0)
            rand_actions = torch.rand(batch_size * m, act_dim) * 2.0 - 1.0
            pi_actions, log_pi_rep = ref.actor.sample(obs_rep)
            next_pi_actions, log_next_pi_rep = ref.actor.sample(next_obs.repeat_interleave(m, 0))
        pi, log_pi = ref.actor.sample(obs)
        alpha_loss = -(ref.log_alpha * (log_pi.detach() + ref.target_entropy)).mean()
        ref.alpha_optimizer.zero_grad(set_to_none=True)
        alpha_loss.backward()
        ref.alpha_optimizer.step()
        alpha = ref.log_alpha.exp().detach()
        if ref.total_it <= args.bc_warmup_steps:
            actor_loss = (alpha * log_pi - ref.actor.log_prob(obs, actions)).mean()
        else:
            actor_loss = (alpha * log_pi - torch.min(*ref.critic(obs, pi))).mean()
        ref.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        ref.actor_optimizer.step()
        q1, q2 = ref.critic(obs, actions)
        td_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        q1_all, q2_all = ref.critic(obs_rep.repeat(3, 1), torch.cat([rand_actions, pi_actions, next_pi_actions]))
        gaps = []
        for q_all, q_data in ((q1_all, q1), (q2_all, q2)):
            q_rand, q_pi, q_next_pi = (q.view(batch_size, m) for q in q_all.chunk(3))
            lse = cql.cql_logsumexp(q_rand, act_dim * math.log(0.5), q_pi, log_pi_rep.view(batch_size, m),
                                    q_next_pi, log_next_pi_rep.view(batch_size, m))
            gaps.append(args.cql_weight * (lse.mean() - q_data.mean()))
        critic_loss = td_loss + gaps[0] + gaps[1]
        ref.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        ref.critic_optimizer.step()
        lerp_loop(ref.critic, ref.critic_target, args.tau)
        return {"losses/critic_loss": critic_loss.detach(), "losses/td_loss": td_loss.detach(),
                "losses/cql_gap": (gaps[0] + gaps[1]).detach() / 2, "losses/actor_loss": actor_loss.detach(),
                "losses/q1": q1.mean().detach(), "charts/alpha": alpha, "charts/alpha_prime": torch.tensor(args.cql_weight),
                "charts/entropy": -log_pi.mean().detach()}

    compare_steps(agent, ref, agent.train, step, critic_pairs=[("critic", "critic"), ("critic_target", "critic_target")])


def test_policy_samples_n_actions_per_state_as_it_sampled_the_repeated_states():
    """sample(obs, n) runs the network once per state; it draws what sample(obs.repeat_interleave(n))
    drew with the same seed, row for row."""
    obs = torch.randn(6, OBS)
    for name, make in (("cql", lambda m: m.Actor(OBS, ACT, 16)),
                       ("itrpo", lambda m: m.TanhGaussian(OBS, ACT, 16, n_hidden=2)),
                       ("brac_plus", lambda m: m.TanhGaussian(OBS, ACT, 16))):
        module = load_algorithm(name)
        torch.manual_seed(0)
        actor = make(module)
        torch.manual_seed(1)
        once = actor.sample(obs, 4)
        torch.manual_seed(1)
        repeated = actor.sample(obs.repeat_interleave(4, 0))
        assert len(once) == len(repeated)
        for got, want in zip(once, repeated):
            assert got.shape[0] == 24
            torch.testing.assert_close(got, want, msg=name)


def test_fisher_brc_step_is_the_unfused_step():
    fbrc = load_algorithm("fisher_brc")
    torch.manual_seed(0)
    agent = fbrc.FisherBRC(fbrc.Args(hidden_dim=32, n_components=3), OBS, ACT, torch.device("cpu"))
    agent.behavior.requires_grad_(False)  # frozen after its phase, as in the script
    ref = reference_agent(agent, fbrc, ["offsets", "offsets_target"], OBS + ACT, 32, 3,
                          {"offsets_optimizer": lambda r: r.offsets.parameters(),
                           "actor_optimizer": lambda r: r.actor.parameters(),
                           "alpha_optimizer": lambda r: [r.log_alpha]})

    def gradient_penalty(offsets, obs, act):
        act = act.detach().requires_grad_(True)
        o1, o2 = offsets(obs, act)
        g1 = torch.autograd.grad(o1.sum(), act, create_graph=True)[0]
        g2 = torch.autograd.grad(o2.sum(), act, create_graph=True)[0]
        return (g1.pow(2).sum(-1) + g2.pow(2).sum(-1)).mean()

    def step(batch):
        args = ref.args
        obs, actions, rewards, next_obs, terminals = batch
        with torch.no_grad():
            next_actions, _ = ref.actor.sample(next_obs)
            target_q = torch.min(*ref.offsets_target(next_obs, next_actions)) + ref.behavior.log_prob(next_obs, next_actions)
            target_q = rewards + args.gamma * (1.0 - terminals) * target_q
            log_mu_data = ref.behavior.log_prob(obs, actions)
            gp_actions = actions if args.gp_on_data else ref.actor.sample(obs)[0]
        o1, o2 = ref.offsets(obs, actions)
        td_loss = F.mse_loss(o1 + log_mu_data, target_q) + F.mse_loss(o2 + log_mu_data, target_q)
        gp = gradient_penalty(ref.offsets, obs, gp_actions)
        offsets_loss = td_loss + args.gp_weight * gp
        ref.offsets_optimizer.zero_grad(set_to_none=True)
        offsets_loss.backward()
        ref.offsets_optimizer.step()
        lerp_loop(ref.offsets, ref.offsets_target, args.tau)
        pi, log_pi = ref.actor.sample(obs)
        q_pi = torch.min(*ref.offsets(obs, pi)) + ref.behavior.log_prob(obs, pi)
        alpha = ref.log_alpha.exp().detach()
        actor_loss = (alpha * log_pi - q_pi).mean()
        ref.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        ref.actor_optimizer.step()
        alpha_loss = (ref.log_alpha.exp() * (-log_pi.detach() - ref.target_entropy)).mean()
        ref.alpha_optimizer.zero_grad(set_to_none=True)
        alpha_loss.backward()
        ref.alpha_optimizer.step()
        return {"losses/offsets_loss": offsets_loss.detach(), "losses/td_loss": td_loss.detach(),
                "losses/gradient_penalty": gp.detach(), "losses/actor_loss": actor_loss.detach(),
                "losses/q1": (o1 + log_mu_data).mean().detach(), "charts/log_mu_data": log_mu_data.mean(),
                "charts/alpha": alpha, "charts/entropy": -log_pi.mean().detach(),
                "charts/offset_vs_log_mu_slope": fbrc.regression_slope(o1.detach(), log_mu_data)}

    compare_steps(agent, ref, agent.train, step,
                  critic_pairs=[("offsets", "offsets"), ("offsets_target", "offsets_target")])


def itrpo_reference(itrpo, ref):
    def kl_and_q(obs, critic):
        k = ref.args.n_samples
        obs_rep = obs.repeat_interleave(k, 0)
        actions, log_pi = ref.actor.sample(obs_rep)
        kl = (log_pi - ref.behavior.log_prob(obs_rep, actions)).view(-1, k).mean(1)
        q1, q2 = critic(obs_rep, actions)
        return kl, q1.view(-1, k), q2.view(-1, k)

    def update_actor(obs):
        kl, q1_pi, q2_pi = kl_and_q(obs, ref.critic)
        actor_loss = (ref.args.alpha * kl - torch.min(q1_pi.mean(1), q2_pi.mean(1))).mean()
        ref.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        ref.actor_optimizer.step()
        return actor_loss.detach(), kl.detach()

    def update_critic(batch):
        args = ref.args
        obs, actions, rewards, next_obs, terminals = batch
        with torch.no_grad():
            shaping = itrpo.shaping_reward(ref.actor.log_prob(obs, actions), ref.behavior.log_prob(obs, actions),
                                           args.alpha, args.shaping_tau, args.shaping_clip)
            next_kl, next_q1, next_q2 = kl_and_q(next_obs, ref.critic_target)
            target_q = itrpo.critic_target(rewards, shaping, terminals, next_q1, next_q2, next_kl, args.gamma,
                                           args.alpha)
            gp_actions = ref.actor.sample(obs)[0]
        q1, q2 = ref.critic(obs, actions)
        td_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        gp_actions.requires_grad_(True)
        gp_q1, gp_q2 = ref.critic(obs, gp_actions)
        g1 = torch.autograd.grad(gp_q1.sum(), gp_actions, create_graph=True)[0]
        g2 = torch.autograd.grad(gp_q2.sum(), gp_actions, create_graph=True)[0]
        gp = (g1.pow(2).sum(-1) + g2.pow(2).sum(-1)).mean()
        critic_loss = td_loss + args.gp_weight * gp
        ref.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        ref.critic_optimizer.step()
        lerp_loop(ref.critic, ref.critic_target, args.tau)
        return {"losses/critic_loss": critic_loss.detach(), "losses/td_loss": td_loss.detach(),
                "losses/gradient_penalty": gp.detach(), "losses/q1": q1.mean().detach(),
                "charts/shaping_reward": shaping.mean()}

    def train(batch):
        if ref.args.update_order == "actor-first":
            actor_loss, kl = update_actor(batch.observations)
            metrics = update_critic(batch)
        else:
            metrics = update_critic(batch)
            actor_loss, kl = update_actor(batch.observations)
        return {**metrics, "losses/actor_loss": actor_loss, "charts/kl": kl.mean()}

    def train_behavior(batch):
        obs, actions = batch.observations, batch.actions
        log_prob = ref.behavior.log_prob(obs, actions)
        entropy = -ref.behavior.sample(obs)[1]
        alpha_loss = (ref.behavior_log_alpha.exp() * (entropy.detach() - ref.target_entropy)).mean()
        ref.behavior_alpha_optimizer.zero_grad(set_to_none=True)
        alpha_loss.backward()
        ref.behavior_alpha_optimizer.step()
        alpha = ref.behavior_log_alpha.exp().detach()
        loss = -(log_prob + alpha * entropy).mean()
        ref.behavior_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ref.behavior_optimizer.step()
        return {"losses/behavior_nll": -log_prob.mean().detach(), "charts/behavior_entropy": entropy.mean().detach(),
                "charts/behavior_alpha": alpha}

    return train, train_behavior


@pytest.mark.parametrize("order", ["actor-first", "critic-first"])
def test_itrpo_steps_are_the_unfused_steps(order):
    itrpo = load_algorithm("itrpo")
    torch.manual_seed(0)
    args = itrpo.Args(hidden_dim=32, n_samples=4, bc_steps=1000, update_order=order, reward_transform="plus-five")
    agent = itrpo.ITRPO(args, OBS, ACT, torch.device("cpu"))
    optimizers = {"critic_optimizer": lambda r: r.critic.parameters(),
                  "actor_optimizer": lambda r: r.actor.parameters(),
                  "behavior_optimizer": lambda r: r.behavior.parameters(),
                  "behavior_alpha_optimizer": lambda r: [r.behavior_log_alpha]}
    ref = reference_agent(agent, itrpo, ["critic", "critic_target"], OBS + ACT, 32, 3, optimizers)
    train, train_behavior = itrpo_reference(itrpo, ref)
    # the behaviour step (its schedulers only change the learning rate at 80% and 90% of bc_steps)
    compare_steps(agent, ref, agent.train_behavior, train_behavior)
    for p, q in zip(agent.behavior.parameters(), ref.behavior.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    agent.behavior.requires_grad_(False)
    ref.behavior.requires_grad_(False)
    compare_steps(agent, ref, agent.train, train, critic_pairs=[("critic", "critic"), ("critic_target", "critic_target")])


@pytest.mark.parametrize("gp_mode", ["paper", "official"])
def test_brac_plus_step_is_the_unfused_step(gp_mode):
    bp = load_algorithm("brac_plus")
    torch.manual_seed(0)
    args = bp.Args(hidden_dim=16, actor_hidden_dim=16, vae_hidden_dim=16, n_ensembles=2, n_samples=3, n_latent=2,
                   gp_mode=gp_mode, kl_margin=0.1, gp_target=0.01)
    agent = bp.BRACPlus(args, OBS, ACT, torch.device("cpu"))
    agent.behavior.requires_grad_(False)
    agent.kl_threshold.fill_(1.0), agent.gp_threshold.fill_(0.5)
    ref = reference_agent(agent, bp, ["critic", "critic_target"], OBS + ACT, 16, 2,
                          {"critic_optimizer": lambda r: r.critic.parameters(),
                           "actor_optimizer": lambda r: r.actor.parameters(),
                           "alpha_optimizer": lambda r: r.alpha_net.parameters(),
                           "beta_optimizer": lambda r: [r.beta_raw],
                           "gp_optimizer": lambda r: [r.gp_raw]})

    def policy_kl(obs, k):
        obs_rep = obs.repeat_interleave(k, 0)
        actions, log_pi, u, mean, std = ref.actor.sample(obs_rep)
        kl = ref.behavior.kl_upper_bound(obs_rep, u, mean, std, args.n_latent)
        return kl.view(-1, k).mean(1), actions, log_pi.view(-1, k)

    def gated_gradient_penalty(critic, obs, actions, kl, threshold, mode):
        actions = actions.detach().requires_grad_(True)
        q1, q2 = critic(obs, actions)
        if mode == "paper":
            g1 = torch.autograd.grad(q1.sum(), actions, create_graph=True)[0]
            g2 = torch.autograd.grad(q2.sum(), actions, create_graph=True)[0]
            return (g1.pow(2).sum(-1) + g2.pow(2).sum(-1)) * (kl > threshold).float()
        g = torch.autograd.grad(torch.min(q1, q2).sum(), actions, create_graph=True)[0]
        gate = F.softplus(kl - threshold)
        return torch.linalg.vector_norm(g, dim=-1) * (gate / gate.max()).detach()

    def td_loss(batch):
        obs, actions, rewards, next_obs, terminals = batch
        k = args.n_samples
        with torch.no_grad():
            next_obs_rep = next_obs.repeat_interleave(k, 0)
            next_q1, next_q2 = ref.critic_target(next_obs_rep, ref.actor.sample(next_obs_rep)[0])
            target_q = bp.critic_target(rewards, terminals, next_q1.view(-1, k), next_q2.view(-1, k), args.gamma,
                                        args.max_q_backup)
        q1, q2 = ref.critic(obs, actions)
        scale = 0.5 if args.gp_mode == "official" else 1.0
        return scale * (F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)), q1

    def step(batch):
        obs = batch.observations
        td, q1 = td_loss(batch)
        with torch.no_grad():
            gate_kl, gp_actions, _ = policy_kl(obs, 1)
        gp = gated_gradient_penalty(ref.critic, obs, gp_actions, gate_kl, ref.gp_threshold, args.gp_mode)
        gp_weight = ref.gp_weight()
        critic_loss = td + gp_weight * gp.mean()
        ref.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        ref.critic_optimizer.step()
        if args.gp_mode == "official":
            low, high = bp.inverse_softplus(args.gp_weight), bp.inverse_softplus(args.alpha_max)
            gp_loss = -(F.softplus(bp.clip_preserve_gradient(ref.gp_raw, low, high)) * (gp.detach().mean() - args.gp_target))
            ref.gp_optimizer.zero_grad(set_to_none=True)
            gp_loss.backward()
            ref.gp_optimizer.step()
        kl, actions, log_pi = policy_kl(obs, args.n_samples)
        q1_pi, q2_pi = ref.critic(obs.repeat_interleave(args.n_samples, 0), actions)
        q_pi = torch.min(q1_pi, q2_pi).view(-1, args.n_samples).mean(1)
        alpha = ref.alpha(obs).detach()
        beta = ref.beta().detach()
        actor_loss = (-q_pi + alpha * (kl - ref.kl_threshold) - beta * log_pi.mean(1)).mean()
        ref.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        ref.actor_optimizer.step()
        alpha_loss = ref.update_alpha(obs, kl)
        ref.update_beta(log_pi)
        lerp_loop(ref.critic, ref.critic_target, args.tau)
        return {"losses/critic_loss": critic_loss.detach(), "losses/td_loss": td.detach(),
                "losses/gradient_penalty": gp.mean().detach(), "losses/actor_loss": actor_loss.detach(),
                "losses/alpha_loss": alpha_loss, "losses/q1": q1.mean().detach(),
                "charts/kl": kl.mean().detach(), "charts/kl_violation": (kl > ref.kl_threshold).float().mean(),
                "charts/gp_fraction": (gate_kl > ref.gp_threshold).float().mean(),
                "charts/gp_threshold": ref.gp_threshold.clone(),
                "charts/alpha": alpha.mean(), "charts/beta": beta, "charts/gp_weight": gp_weight,
                "charts/entropy": -log_pi.mean().detach()}

    compare_steps(agent, ref, agent.train, step, critic_pairs=[("critic", "critic"), ("critic_target", "critic_target")])


def test_arq_step_is_the_unfused_step():
    arq = load_algorithm("arq")
    torch.manual_seed(0)
    args = arq.Args(hidden_dim=32, kth=3, alpha=1.0, deterministic_policy=False, critic_lr=3e-4,
                    score_hidden_dim=8, score_blocks=1)
    agent = arq.ARQ(args, OBS, ACT, torch.device("cpu"))
    ref = reference_agent(agent, arq, ["critic", "critic_target"], OBS + ACT, 32, 2,
                          {"critic_optimizer": lambda r: r.critic.parameters(),
                           "actor_optimizer": lambda r: r.actor.parameters()})
    g = torch.Generator().manual_seed(12)
    support = torch.rand(N, 6, ACT, generator=g) * 2 - 1
    valid = torch.rand(N, 6, generator=g) > 0.3
    valid[:, 0] = True
    batch = arq.SupportBatch(*fixed_batch(), support, valid, support.flip(0), valid.flip(0))

    def target_q(obs, actions):
        return torch.min(*ref.critic_target(obs.unsqueeze(1).expand(-1, actions.shape[1], -1), actions))

    def step(batch):
        with torch.no_grad():
            next_q = target_q(batch.next_observations, batch.next_support_actions)
            backup = arq.kth_largest(next_q, batch.next_support_valid, args.kth)
            backup = torch.maximum(backup, torch.where(batch.next_support_valid[:, 0], next_q[:, 0], -torch.inf))
            target = batch.rewards + args.gamma * (1.0 - batch.terminals) * backup
        q1, q2 = ref.critic(batch.observations, batch.actions)
        critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        ref.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        ref.critic_optimizer.step()
        lerp_loop(ref.critic, ref.critic_target, args.tau)
        with torch.no_grad():
            q = target_q(batch.observations, batch.support_actions)
            mean_q = (q * batch.support_valid).sum(1) / batch.support_valid.sum(1)
            weights = torch.exp(args.alpha * (q[:, 0] - mean_q)).clamp(max=args.max_weight)
        actor_loss = -(weights * ref.actor.log_prob(batch.observations, batch.actions)).mean()
        ref.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        ref.actor_optimizer.step()
        return {"losses/critic_loss": critic_loss.detach(), "losses/q1": q1.mean().detach(),
                "charts/backup": backup.mean(), "charts/support_kept": batch.next_support_valid.float().sum(1).mean(),
                "losses/actor_loss": actor_loss.detach(), "charts/weight": weights.mean()}

    compare_steps(agent, ref, agent.train, step, batch=batch,
                  critic_pairs=[("critic", "critic"), ("critic_target", "critic_target")])


# ----------------------------------------------------------------------------------------------
# --compile
# ----------------------------------------------------------------------------------------------
def test_td3_bc_compiled_steps_give_the_eager_losses(monkeypatch):
    """A few TD3+BC steps with --compile (the actor's step included) against eager ones on a fixed
    batch. The compiled graphs draw their random numbers as eager code does only with fallback_random."""
    import torch._dynamo
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch._dynamo.reset()
    td3 = load_algorithm("td3_bc")
    torch.manual_seed(0)
    eager = td3.TD3BC(td3.Args(hidden_dim=32), OBS, ACT, torch.device("cpu"))
    torch.manual_seed(0)
    compiled = td3.TD3BC(td3.Args(hidden_dim=32, compile=True), OBS, ACT, torch.device("cpu"))
    batch = fixed_batch()
    for s in range(4):
        torch.manual_seed(100 + s)
        want = eager.train(batch)
        torch.manual_seed(100 + s)
        got = compiled.train(batch)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=f"step {s}: {k}")
    for p, q in zip(compiled.critic.parameters(), eager.critic.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled, not silently eager
