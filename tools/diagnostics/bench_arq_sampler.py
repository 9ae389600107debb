"""Throughput of ARQ's support generation (algorithms/arq.py, stage 2) and the agreement of its samplers.

Throughput: samples per hour of sampling *plus* the log-likelihood ODE (what generating the support
costs), for the paper's predictor-corrector sampler (--sampler pc, 500 steps) and the fast one
(--sampler ode, 20 steps), with the default score network (256 wide, 3 residual blocks) and hopper's
dimensions (11 states, 3 actions, so the divergence is exact). It is timed on an *untrained* network:
the cost of a fixed-step sampler and a fixed-step ODE does not depend on the weights.

Agreement: a network of the same size is first trained for --train-steps on a synthetic conditional
distribution with hopper's dimensions (two modes in the first action dimension whose positions jump
with the sign of the first state dimension, a smooth dependence of the others on the state). Then
  1. solver agreement: the same actions (from the pc sampler) are scored with the default
     --likelihood-steps RK4 and with a reference of --reference-steps; reported: mean and max
     |difference| in nats, and how often both agree on keep (log-likelihood > -5) or drop;
  2. sampler agreement: samples from each sampler are scored with the reference ODE; reported: mean
     log-likelihood and the fraction kept (> -5). Close numbers mean the fast sampler yields a support
     of the same quality as the paper's.

    OMP_NUM_THREADS=1 python tools/diagnostics/bench_arq_sampler.py --threads 1
"""

import argparse
import importlib.util
import json
import os
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_arq():
    spec = importlib.util.spec_from_file_location("arq", os.path.join(ROOT, "algorithms", "arq.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic(n: int, obs_dim: int, act_dim: int, gen: torch.Generator):
    s = torch.randn(n, obs_dim, generator=gen)
    a = torch.tanh(0.5 * s[:, 1:act_dim + 1]) + 0.05 * torch.randn(n, act_dim, generator=gen)
    mode = torch.where(torch.rand(n, generator=gen) < 0.5, -0.5, 0.5)
    a[:, 0] = torch.where(s[:, 0] < 0, mode, mode + 0.3) + 0.1 * torch.rand(n, generator=gen)
    return s, a.clamp(-1.0, 1.0)


def time_generation(arq, model, obs, args, gen) -> dict:
    t0 = time.perf_counter()
    s = model.condition(obs).repeat_interleave(args.n_support, 0)
    x = model.sample(s, args.sampler, args.sampler_steps, args.snr, args.n_support, gen)
    t1 = time.perf_counter()
    model.log_likelihood(s, model.to_x(model.to_action(x)), args.likelihood_steps, args.exact_divergence_max_dim,
                         args.hutchinson_probes, gen)
    t2 = time.perf_counter()
    n = len(s)
    return {"samples": n, "sample_s": t1 - t0, "likelihood_s": t2 - t1,
            "samples_per_hour": n / (t2 - t0) * 3600, "sampling_only_per_hour": n / (t1 - t0) * 3600}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--states", type=int, default=64, help="states per timed batch (x N = 30 samples)")
    p.add_argument("--obs-dim", type=int, default=11)
    p.add_argument("--act-dim", type=int, default=3)
    p.add_argument("--ode-steps", type=int, default=20)
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--reference-steps", type=int, default=200)
    p.add_argument("--agreement-states", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    opts = p.parse_args()
    torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    arq = load_arq()
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
           "device": str(device), "cpu": os.cpu_count()}
    print(json.dumps(env))
    configs = {"pc": arq.Args(sampler="pc", sampler_steps=500),
               "ode": arq.Args(sampler="ode", sampler_steps=opts.ode_steps)}
    gen = torch.Generator(device).manual_seed(0)
    results = {"env": env, "throughput": {}, "agreement": {}}

    torch.manual_seed(0)
    model = arq.ScoreModel(opts.obs_dim, opts.act_dim, configs["pc"]).to(device)  # untrained: cost only
    obs = torch.randn(opts.states, opts.obs_dim, device=device)
    for name, args in configs.items():
        r = time_generation(arq, model, obs, args, gen)
        results["throughput"][f"{name}-{args.sampler_steps}"] = r
        print(f"throughput {name} ({args.sampler_steps} steps) + likelihood RK4 ({args.likelihood_steps} steps): "
              f"{r['samples_per_hour']:,.0f} samples/h (sampling {r['sample_s']:.1f} s, likelihood "
              f"{r['likelihood_s']:.1f} s for {r['samples']} samples)", flush=True)

    torch.manual_seed(0)
    args = configs["pc"]
    model = arq.ScoreModel(opts.obs_dim, opts.act_dim, args).to(device)
    s, a = synthetic(100_000, opts.obs_dim, opts.act_dim, gen)
    s, a = s.to(device), a.to(device)
    model.set_normalization(s, a)
    opt = torch.optim.Adam(model.net.parameters(), lr=3e-4)
    t0 = time.perf_counter()
    for step in range(opts.train_steps):
        idx = torch.randint(0, len(s), (args.score_batch_size,), device=device, generator=gen)
        loss = model.loss(s[idx], a[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_ema(0.99)  # short training: a shorter EMA horizon than the paper's 0.999
    print(f"trained the agreement model for {opts.train_steps} steps in {time.perf_counter() - t0:.0f} s, "
          f"last loss {loss.item():.3f}", flush=True)

    cond = model.condition(torch.randn(opts.agreement_states, opts.obs_dim, device=device)).repeat_interleave(30, 0)

    def ll(x, steps):
        return model.log_likelihood(cond, x, steps, args.exact_divergence_max_dim, args.hutchinson_probes, gen)

    samples = {name: model.to_x(model.to_action(model.sample(cond, c.sampler, c.sampler_steps, c.snr, 30, gen)))
               for name, c in configs.items()}
    fast, ref = ll(samples["pc"], args.likelihood_steps), ll(samples["pc"], opts.reference_steps)
    diff = (fast - ref).abs()
    thr = args.log_likelihood_threshold
    solver = {"likelihood_steps": args.likelihood_steps, "reference_steps": opts.reference_steps,
              "mean_abs_diff": diff.mean().item(), "max_abs_diff": diff.max().item(),
              "keep_decision_agreement": ((fast > thr) == (ref > thr)).float().mean().item()}
    results["agreement"]["solver"] = solver
    print(f"solver agreement (RK4 {args.likelihood_steps} vs {opts.reference_steps} steps, same actions): "
          f"mean |diff| {solver['mean_abs_diff']:.3f} nats, max {solver['max_abs_diff']:.3f}, same keep/drop "
          f"decision {solver['keep_decision_agreement']:.1%}")
    for name, x in samples.items():
        r = ll(x, opts.reference_steps)
        results["agreement"][name] = {"mean_log_likelihood": r.mean().item(), "kept": (r > thr).float().mean().item()}
        print(f"sampler {name} ({configs[name].sampler_steps} steps): mean reference log-likelihood "
              f"{r.mean().item():.2f}, kept (> {thr}) {(r > thr).float().mean().item():.1%}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
