"""An AWR run's critic and policy against the data, and its policy in the env, read from its
checkpoint.pt (or model.pt).

    python tools/diagnostics/awr_check.py ~/long_runs/hopper-medium-replay-v0__awr__1/checkpoint.pt --episodes 50

Over every dataset transition: Q(s, a) (the smaller of the twin critics) next to the discounted
return that followed (s, a) in the data, by quartile of that return, as
tools/diagnostics/td3_bc_q_check.py prints for TD3+BC; the actor's weights exp(A / lambda), clipped
at --max-weight, with V(s) the mean of Q over 4 policy samples (the run uses one): their mean, the
share at the clip and their effective sample size sum(w)^2 / sum(w^2) per batch of 256 (the
transitions in a fixed random order, cut into batches; one batch of all where there are fewer); the
policy's standard deviation; and the squared distance of the policy's mean action to the data's,
over all transitions and over the 10% with the largest weights.
With --episodes N: the policy's normalised score over N evaluation episodes from --seed (as a run
evaluates), their lengths, and how far the states they visit lie from the nearest dataset state, in
the data's standard deviations (the run's state normalisation): a policy whose episodes leave the
states the data covers acts where no weighted action taught it.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "algorithms"))
import awr  # noqa: E402
import common  # noqa: E402
from tools.diagnostics.td3_bc_q_check import discounted_returns, read_run_file  # noqa: E402

BATCH = 256


def load(path: str):
    """The run's agent (actor and critic loaded), its args and its dataset, states normalised as the
    run's; and the normalisation statistics (None without them)."""
    saved = read_run_file(path, "an awr")
    weights, stored = saved.get("agent", saved), saved.get("args")
    fields = set(awr.Args.__dataclass_fields__)
    # a model.pt names its algorithm; a checkpoint is known by its flags
    is_awr = saved.get("algorithm") == "awr" if "algorithm" in saved else (
        isinstance(stored, dict) and "awr_lambda" in stored and set(stored) <= fields)
    if not is_awr or not isinstance(stored, dict) or not isinstance(weights, dict) \
            or not {"actor", "critic"} <= set(weights):
        raise common.UserError(f"{path} is not an awr checkpoint or model.pt")
    args = awr.Args(**{k: v for k, v in stored.items() if k in fields})
    data = common.load_dataset(args.env, "cpu")
    stats = common.normalize_obs(data) if args.normalize_states else (None, None)
    agent = awr.AWR(args, data.obs_dim, data.act_dim, torch.device("cpu"))
    agent.actor.load_state_dict(weights["actor"])
    agent.critic.load_state_dict(weights["critic"])
    return saved, args, agent, data, stats


def effective_sample_size(weights: torch.Tensor, batch: int = BATCH) -> float:
    """Mean over whole batches of sum(w)^2 / sum(w^2): how many of a batch's transitions the actor's
    weighted loss effectively learns from (batch when all weights are equal, 1 when one dominates).
    Fewer transitions than a batch make one batch of all of them."""
    batch = min(batch, len(weights))
    w = weights[: len(weights) // batch * batch].view(-1, batch)
    return float((w.sum(1) ** 2 / (w ** 2).sum(1)).mean())


def episode_limit(data) -> int | None:
    """The evaluation env's episode length limit (None where it has none)."""
    env = data.make_env()
    env.close()
    return None if env.spec is None else env.spec.max_episode_steps


def visited_states(data, agent, episodes: int, seed: int, stats) -> tuple[dict, list[torch.Tensor]]:
    """The run's evaluation of the policy's mean action, and the (normalised) states each episode visited."""
    seen = []

    def policy(obs: torch.Tensor) -> torch.Tensor:
        seen.append(obs.clone())
        return agent.act(obs)

    result = common.evaluate(data, policy, episodes, seed, *stats)
    steps = torch.stack(seen)  # (steps, episodes, obs); episode i is alive for its first lengths[i] steps
    return result, [steps[:n, i] for i, n in enumerate(result["episode_lengths"])]


def nearest_distance(states: torch.Tensor, data_states: torch.Tensor) -> torch.Tensor:
    """Each state's Euclidean distance to the nearest of data_states (exact: no matrix-product shortcut)."""
    exact = "donot_use_mm_for_euclid_dist"
    return torch.cat([torch.cdist(states[i:i + 512], data_states, compute_mode=exact).min(1).values
                      for i in range(0, len(states), 512)])


def main(argv=None) -> None:
    common.install_user_error_hook()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="checkpoint.pt or model.pt of an awr run")
    parser.add_argument("--episodes", type=int, default=0, help="also evaluate the policy on this many episodes")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the first evaluation episode")
    options = parser.parse_args(argv)
    if options.episodes < 0:
        raise common.UserError("--episodes must be 0 (no evaluation) or more")
    saved, args, agent, data, stats = load(options.path)
    returns = discounted_returns(data, args.gamma)
    torch.manual_seed(0)
    with torch.no_grad():
        obs, actions = data.observations, data.actions
        q_data = torch.min(*agent.critic(obs, actions))
        v = torch.stack([torch.min(*agent.critic(obs, agent.actor.sample(obs))) for _ in range(4)]).mean(0)
        weights = awr.awr_weights(q_data - v, args.awr_lambda, args.max_weight)
        order = torch.randperm(len(weights), generator=torch.Generator().manual_seed(0))
        distance = ((agent.act(obs) - actions) ** 2).mean(-1)
        top = weights >= torch.quantile(weights, 0.9)
        std = agent.actor.log_std.clamp(-20.0, 2.0).exp()
    q = q_data.numpy()
    quartile = np.digitize(returns, np.quantile(returns, [0.25, 0.5, 0.75]))
    gaps = [(q[quartile == i] - returns[quartile == i]).mean() for i in range(4)]
    step = f"step {saved['step']}" if "step" in saved else "the final policy"
    print(f"{options.path} (awr, {step}), {len(data)} transitions:")
    print(f"  mean Q(s, a) {q.mean():.1f}; discounted return after (s, a): mean {returns.mean():.1f}, "
          f"max {returns.max():.1f}; Q - return, by quartile of the return (lowest first): "
          + ", ".join(f"{g:+.0f}" for g in gaps))
    print(f"  weights exp(A / {args.awr_lambda:.3g}) clipped at {args.max_weight:g}: mean {weights.mean():.2f}, "
          f"{(weights >= args.max_weight).float().mean():.1%} at the clip, effective sample size "
          f"{effective_sample_size(weights[order]):.1f} per batch of {min(BATCH, len(weights))}")
    print(f"  policy std {np.array2string(std.numpy(), precision=3)}; mean (pi(s) - a)^2 {distance.mean():.3f}, "
          f"on the 10% of transitions with the largest weights {distance[top].mean():.3f}")
    if options.episodes:
        result, states = visited_states(data, agent, options.episodes, options.seed, stats)
        near = [nearest_distance(s, obs) for s in states]
        every = torch.cat(near)
        lengths = np.array(result["episode_lengths"])
        limit = episode_limit(data)
        full = "" if limit is None else f" ({(lengths >= limit).mean():.0%} of them the env's {limit} steps)"
        score = result["normalized_score_mean"]
        what = f"score {score:.1f} ± {result['normalized_score_std']:.1f}" if score is not None else \
            f"return {result['return_mean']:.1f} ± {result['return_std']:.1f}"
        print(f"  {options.episodes} episodes from seed {options.seed}: {what}, length {lengths.mean():.0f}"
              f"{full}; distance of the states "
              f"they visit to the nearest dataset state: mean {every.mean():.2f}, over their last 20 steps "
              f"{torch.stack([d[-20:].mean() for d in near]).mean():.2f}, above 1: {(every > 1).float().mean():.1%}")


if __name__ == "__main__":
    main()
