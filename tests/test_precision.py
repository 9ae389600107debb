"""--precision bf16: training steps under torch.autocast(bfloat16), every network's output layer in
fp32, the default fp32 untouched; --precision tf32: TF32 for CUDA's fp32 products, nothing on a CPU."""

import types

import pytest
import torch

import common
from conftest import load_algorithm

OBS, ACT, N = 5, 3, 48

# Small settings of each file, and the training steps that --precision wraps (pretraining first).
SMALL = {
    "bc": (dict(hidden_dim=32), ("train",)),
    "td3_bc": (dict(hidden_dim=32, policy_freq=1), ("train",)),
    "awr": (dict(hidden_dim=32), ("train",)),
    "iql": (dict(hidden_dim=32), ("train",)),
    "cql": (dict(hidden_dim=32, n_actions=4, bc_warmup_steps=0), ("train",)),
    "fisher_brc": (dict(hidden_dim=32, n_components=3), ("train_behavior", "train")),
    "itrpo": (dict(hidden_dim=32, n_samples=4, bc_steps=1000), ("train_behavior", "train")),
    "brac_plus": (dict(hidden_dim=16, actor_hidden_dim=16, vae_hidden_dim=16, n_ensembles=2, n_samples=3,
                       n_latent=2, kl_margin=0.1, gp_target=0.01),
                  ("train_behavior", "train_initial_policy", "train_initial_critic", "train")),
    "arq": (dict(hidden_dim=32, kth=3, alpha=1.0, score_hidden_dim=8, score_blocks=1), ("train_score", "train")),
}


def agent_of(name: str, precision: str):
    module = load_algorithm(name)
    cls = next(v for v in vars(module).values()
               if isinstance(v, type) and v.__module__ == module.__name__ and hasattr(v, "act"))
    args = module.Args(precision=precision, **SMALL[name][0])
    for k, v in (module.domain_defaults(args.env).items() if hasattr(module, "domain_defaults") else ()):
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.manual_seed(0)
    return module, cls(args, OBS, ACT, torch.device("cpu"))


def batch_for(module, step: str):
    g = torch.Generator().manual_seed(11)
    batch = common.Batch(torch.randn(N, OBS, generator=g), torch.rand(N, ACT, generator=g) * 1.8 - 0.9,
                         torch.randn(N, generator=g), torch.randn(N, OBS, generator=g),
                         (torch.arange(N) % 7 == 0).float())
    if step == "train" and hasattr(module, "SupportBatch"):  # ARQ's RL step reads the support set
        support = torch.rand(N, 6, ACT, generator=g) * 2 - 1
        valid = torch.rand(N, 6, generator=g) > 0.3
        valid[:, 0] = True
        batch = module.SupportBatch(*batch, support, valid, support.flip(0), valid.flip(0))
    return batch


def networks(agent) -> dict:
    return {k: v for k, v in vars(agent).items() if isinstance(v, torch.nn.Module)}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_network_ends_in_an_fp32_output_layer(name):
    """Each nn.Sequential of the agent (every mlp and ensemble_mlp) ends in OutputLinear or an
    EnsembleLinear(output=True); ARQ's score network's output layer is an OutputLinear."""
    module, agent = agent_of(name, "fp32")
    sequentials = [(f"{k}.{path}", m) for k, net in networks(agent).items()
                   for path, m in net.named_modules() if isinstance(m, torch.nn.Sequential)]
    assert sequentials
    for where, seq in sequentials:
        last = seq[-1]
        assert isinstance(last, common.OutputLinear) or getattr(last, "output", False) is True, where
    if name == "arq":
        assert isinstance(agent.score.net.out, common.OutputLinear)


@pytest.mark.parametrize("network", ["mlp", "ensemble_mlp", "td3_bc_q1"])
def test_under_autocast_hidden_layers_are_bf16_and_outputs_are_fp32_and_not_rounded(network):
    """A Q-sized output (bias 300.3): in bf16 (8-bit mantissa, steps of 2 at 300) it would be off
    by up to 1; from an fp32 output layer it is within 0.02 of the fp32 network's. td3_bc_q1 is
    TD3+BC's Critic.q1, which runs the first member alone (member=0)."""
    module = load_algorithm("td3_bc")
    torch.manual_seed(0)
    if network == "mlp":
        net, x = module.mlp(8, 2, 32, 2), torch.randn(64, 8)
    else:
        critic = module.Critic(5, 3, 32)
        net, x = critic.net, (torch.randn(64, 5), torch.rand(64, 3) * 2 - 1)
    with torch.no_grad():
        net[-1].bias.fill_(300.3)
    forward = {"mlp": net, "ensemble_mlp": lambda obs, act: critic(obs, act), "td3_bc_q1": lambda obs, act: critic.q1(obs, act)}[network]
    x = x if isinstance(x, tuple) else (x,)
    hidden = []
    if network != "td3_bc_q1":
        net[0].register_forward_hook(lambda m, i, o: hidden.append(o.dtype))
    want = forward(*x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = forward(*x)
    if network != "td3_bc_q1":
        assert hidden == [torch.float32, torch.bfloat16]
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.02


def test_autocast_leaves_fp32_steps_alone_and_wraps_bf16_ones():
    def step(x):
        return torch.nn.functional.linear(x, torch.ones(4, 4)).dtype

    x = torch.ones(2, 4)
    assert common.autocast(step, "fp32", torch.device("cpu")) is step
    assert common.autocast(step, "bf16", torch.device("cpu"))(x) == torch.bfloat16
    assert step(x) == torch.float32  # the autocast ends with the step


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bf16_steps_give_the_fp32_losses_to_within_bf16_rounding(name):
    """Every wrapped step of every file, from the same weights on the same batch with the same seed:
    the same metrics to within a few bf16 roundings, finite, and parameters that moved."""
    module, fp32 = agent_of(name, "fp32")
    _, bf16 = agent_of(name, "bf16")  # same seed: the same initial weights
    for k, net in networks(fp32).items():
        for p, q in zip(net.parameters(), networks(bf16)[k].parameters()):
            assert torch.equal(p, q)
    if name == "brac_plus":
        for agent in (fp32, bf16):
            agent.kl_threshold.fill_(1.0), agent.gp_threshold.fill_(0.5)
    for step in SMALL[name][1]:
        if step == "train":
            for agent in (fp32, bf16):
                for pretrained in ("behavior", "score"):
                    if hasattr(agent, pretrained):
                        getattr(agent, pretrained).requires_grad_(False)
        batch = batch_for(module, step)
        before = [p.detach().clone() for p in bf16.actor.parameters()] if hasattr(bf16, "actor") else []
        dtypes = {"fp32": set(), "bf16": set()}
        hooks = [m.register_forward_hook(lambda m, i, o, seen=dtypes[precision]: seen.add(o.dtype))
                 for precision, agent in (("fp32", fp32), ("bf16", bf16)) for net in networks(agent).values()
                 for m in net.modules() if type(m).__name__ in ("Linear", "EnsembleLinear")]
        torch.manual_seed(5)
        want = getattr(fp32, step)(batch)
        torch.manual_seed(5)
        got = getattr(bf16, step)(batch)
        for hook in hooks:
            hook.remove()
        assert dtypes["fp32"] == {torch.float32} and torch.bfloat16 in dtypes["bf16"], step  # the step is wrapped
        assert set(got) == set(want)
        for k in want:
            g, w = torch.as_tensor(got[k]).float(), torch.as_tensor(want[k]).float()
            assert torch.isfinite(g).all(), f"{step}: {k}"
            torch.testing.assert_close(g, w, rtol=0.03, atol=0.03, msg=f"{step}: {k}")
        if step == "train" and before:
            assert any(not torch.equal(p, q) for p, q in zip(before, bf16.actor.parameters()))


def test_pretrained_models_of_bf16_runs_have_their_own_cache_key():
    """A bf16-trained behaviour model is another model: another key. fp32 keys are the ones an Args
    without the flag gives, so caches written before it exist stay valid."""
    data = common.OfflineData.__new__(common.OfflineData)
    data.observations, data.actions = torch.zeros(4, 2), torch.ones(4, 1)
    fields = ("bc_steps",)
    fp32 = types.SimpleNamespace(env="x/y-v0", bc_steps=10, precision="fp32")
    legacy = types.SimpleNamespace(env="x/y-v0", bc_steps=10)
    bf16 = types.SimpleNamespace(env="x/y-v0", bc_steps=10, precision="bf16")
    assert common.pretraining_key(fp32, fields, data) == common.pretraining_key(legacy, fields, data)
    assert common.pretraining_key(bf16, fields, data) != common.pretraining_key(fp32, fields, data)


class FakeGpus:
    """Two CUDA devices for torch.cuda's functions, on a machine without any: cuda:0 an A100
    (compute capability 8.0, bf16 in hardware), cuda:1 a V100 (7.0, where bf16 tensors can be made
    but the arithmetic is emulated). cuda:0 is the current device unless a `torch.cuda.device`
    block says otherwise."""

    NAMES, MAJORS = ("NVIDIA A100", "Tesla V100"), (8, 7)

    def __init__(self, monkeypatch):
        import contextlib

        self.current = 0

        @contextlib.contextmanager
        def device(d):
            index = torch.device(d).index
            before, self.current = self.current, self.current if index is None else index
            yield
            self.current = before

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda d=None: types.SimpleNamespace(major=self.MAJORS[self._index(d)]))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: self.NAMES[self._index(d)])
        monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda d: True)  # emulation

    def _index(self, d) -> int:
        index = d if isinstance(d, int) else None if d is None else torch.device(d).index
        return self.current if index is None else index


@pytest.mark.parametrize("device, native", [("cuda:0", True), ("cuda:1", False), ("cuda", True)])
def test_bf16_is_accepted_on_the_flag_s_gpu_only_where_it_is_not_emulated(monkeypatch, device, native):
    """--device cuda:1 is a V100 while cuda:0, the current device, is an A100: the V100 is refused
    although torch.cuda.is_bf16_supported() (the current device, emulation counted) says True."""
    FakeGpus(monkeypatch)
    assert torch.cuda.is_bf16_supported()
    if native:
        common.autocast(lambda: None, "bf16", torch.device(device))
    else:
        with pytest.raises(common.UserError, match="Tesla V100 has no native bfloat16 support"):
            common.autocast(lambda: None, "bf16", torch.device(device))


def test_bf16_is_refused_on_a_gpu_that_only_emulates_it(monkeypatch):
    """The V100 as the current device: torch.cuda.is_bf16_supported() is True there (emulation)."""
    gpus = FakeGpus(monkeypatch)
    gpus.current = 1
    assert torch.cuda.is_bf16_supported()
    with pytest.raises(common.UserError, match="Tesla V100 has no native bfloat16 support"):
        common.autocast(lambda: None, "bf16", torch.device("cuda"))


@pytest.mark.parametrize("name", ["td3_bc", "brac_plus"])
def test_tf32_allows_tf32_cuda_matmuls_and_leaves_the_steps_and_the_cpu_alone(monkeypatch, name):
    for flags, attr in ((torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")):
        monkeypatch.setattr(flags, attr, False)  # restored after the test: the setting is process-wide
    mkldnn = torch.backends.mkldnn.matmul.fp32_precision
    _, fp32 = agent_of(name, "fp32")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    _, tf32 = agent_of(name, "tf32")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"  # the legacy API agrees, and does not raise
    assert torch.backends.mkldnn.matmul.fp32_precision == mkldnn  # CPU products untouched
    for step in SMALL[name][1]:
        assert getattr(tf32, step).__func__ is getattr(type(tf32), step)  # not wrapped: fp32 arithmetic


def test_tf32_on_a_cpu_computes_what_fp32_computes(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    module, fp32 = agent_of("td3_bc", "fp32")
    _, tf32 = agent_of("td3_bc", "tf32")
    batch = batch_for(module, "train")
    for _ in range(2):
        torch.manual_seed(5)
        want = fp32.train(batch)
        torch.manual_seed(5)
        got = tf32.train(batch)
        assert {k: v.item() for k, v in got.items()} == {k: v.item() for k, v in want.items()}
    for p, q in zip(fp32.actor.parameters(), tf32.actor.parameters()):
        assert torch.equal(p, q)
