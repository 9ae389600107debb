"""Fisher-BRC's critic and policy against the data, read from a run's checkpoint.pt (or model.pt).

    python tools/fisher_brc_check.py ~/long_runs/hopper-medium-replay-v0__fisher_brc__0/checkpoint.pt

Over every dataset transition: Q(s, a) = min(O_1, O_2)(s, a) + log mu(a|s) next to the discounted
return that followed (s, a) in the data, both of the rewards the run trains on (with the survival
bonus of --reward-transform plus-five); log mu, the frozen behaviour model's density, at the data's
actions and at the policy's (its mean action, as evaluations act, and a sample); Q at the policy's
mean action; how far that action is from the data's; and Q, the return, log mu and the mean
actions at the episodes' first states, drawn from the distribution every evaluation episode starts
from. A policy whose actions sit where mu puts little density has left the support the gradient
penalty is meant to keep it in.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "algorithms"))
import common  # noqa: E402
import fisher_brc  # noqa: E402
from tools.td3_bc_q_check import discounted_returns  # noqa: E402


def main(argv=None) -> None:
    common.install_user_error_hook()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="checkpoint.pt or model.pt of a fisher_brc run")
    path = parser.parse_args(argv).path
    if not os.path.isfile(path):
        raise common.UserError(f"{path} is not a file; give a fisher_brc run's checkpoint.pt or model.pt")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        saved = None
    weights = saved.get("agent", saved) if isinstance(saved, dict) else {}
    if not weights or saved.get("algorithm", "fisher_brc") != "fisher_brc" or not {"actor", "offsets", "behavior"} <= set(weights):
        raise common.UserError(f"{path} is not a fisher_brc checkpoint or model.pt")
    args = fisher_brc.Args(**{k: v for k, v in saved["args"].items() if k in fisher_brc.Args.__dataclass_fields__})
    data = common.load_dataset(args.env, "cpu")
    common.transform_rewards(data, args.reward_transform)
    returns = discounted_returns(data, args.gamma)  # of the rewards the run trains on
    if args.normalize_states:
        common.normalize_obs(data, *common.compute_obs_stats(data))
    agent = fisher_brc.FisherBRC(args, data.obs_dim, data.act_dim, torch.device("cpu"))
    for name in ("actor", "offsets", "behavior"):
        getattr(agent, name).load_state_dict(weights[name])
    torch.manual_seed(0)
    with torch.no_grad():
        obs, actions = data.observations, data.actions
        components = agent.behavior.components(obs)
        pi = agent.act(obs)
        log_mu_data = agent.behavior.mixture_log_prob(*components, actions)
        log_mu_pi = agent.behavior.mixture_log_prob(*components, pi)
        log_mu_sample = agent.behavior.mixture_log_prob(*components, agent.actor.sample(obs)[0])
        q_data = (torch.min(*agent.offsets(obs, actions)) + log_mu_data).numpy()
        q_pi = (torch.min(*agent.offsets(obs, pi)) + log_mu_pi).numpy()
    step = f"step {saved['step']}" if "step" in saved else "the final policy"
    print(f"{path} ({step}), {len(data)} transitions, rewards '{args.reward_transform}':")
    print(f"  discounted return after (s, a): mean {returns.mean():.1f}, max {returns.max():.1f}")
    print(f"  mean Q(s, a) {q_data.mean():.1f}; Q(s, pi(s)) {q_pi.mean():.1f}")
    edges = np.quantile(returns, [0.25, 0.5, 0.75])
    quartile = np.digitize(returns, edges)
    gaps = [(q_data[quartile == i] - returns[quartile == i]).mean() for i in range(4)]
    print("  Q - return, by quartile of the return (lowest first): " + ", ".join(f"{g:+.0f}" for g in gaps))
    print(f"  mean log mu: data actions {log_mu_data.mean():.2f}, pi(s) {log_mu_pi.mean():.2f} (below -10 at "
          f"{(log_mu_pi < -10).float().mean():.1%} of states), sampled actions {log_mu_sample.mean():.2f}")
    print(f"  mean (pi(s) - a)^2 (as tools/td3_bc_q_check.py): {((pi - actions) ** 2).mean():.3f}")
    first = data.episode_starts  # from the initial-state distribution that evaluation episodes start from too
    print(f"  at the episodes' {len(first)} first states: Q(s, a) {q_data[first].mean():.1f}, Q(s, pi(s)) "
          f"{q_pi[first].mean():.1f}, return after them mean {returns[first].mean():.1f}, max {returns[first].max():.1f}; "
          f"log mu at a {log_mu_data[first].mean():.2f}, at pi(s) {log_mu_pi[first].mean():.2f}; "
          f"mean pi(s) {np.array2string(pi[first].mean(0).numpy(), precision=2)}, "
          f"a {np.array2string(actions[first].mean(0).numpy(), precision=2)}")


if __name__ == "__main__":
    main()
