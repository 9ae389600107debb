"""A Fisher-BRC or iTRPO run's critic and policy against the data, read from its checkpoint.pt (or model.pt).

    python tools/diagnostics/support_check.py ~/long_runs/hopper-medium-replay-v0__fisher_brc__0/checkpoint.pt
    python tools/diagnostics/support_check.py ~/long_runs/hopper-medium-replay-v0__itrpo__0/checkpoint.pt
    python tools/diagnostics/support_check.py <checkpoint.pt> --rollouts 5

Both files keep the policy near a frozen behaviour model mu (Fisher-BRC: Q = min(O_1, O_2) + log mu
and a gradient penalty on O; iTRPO: a KL penalty to mu in the actor's loss and the critic's target).
Over every dataset transition: Q(s, a) next to the discounted return that followed (s, a) in the
data, both of the rewards the run trains on (with its survival bonus); log mu at the data's actions
and at the policy's (its mean action, as evaluations act, and a sample); Q at the policy's mean
action; how far that action is from the data's; the policy's log-std and its KL divergence from mu
(log pi - log mu of one sample per state, averaged); and Q, the return, log mu and
the mean actions at the episodes' first states, drawn from the distribution every evaluation episode
starts from. A policy whose actions sit where mu puts little density has left the support the
penalty is meant to keep it in. On a local medium-replay dataset the first states are also split by
where their episode came from: the uniform-random warm-up or the SAC snapshots' rollouts. With
--rollouts N the policy also runs N episodes of its own: Q at its own states and actions beside the
discounted return that followed them, which no dataset state can show. With --critic PATH, Q is read
from another checkpoint of the same run: whether one step's critic already overvalues a later policy.
Last, the file's own actor loss of the policy (under that critic), over all states and the first.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "algorithms"))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import common  # noqa: E402
from dataset_recipe import replay_sources  # noqa: E402
import fisher_brc  # noqa: E402
import itrpo  # noqa: E402
from tools.diagnostics.td3_bc_q_check import discounted_returns, read_run_file  # noqa: E402

NETWORKS = {"fisher_brc": ("actor", "offsets", "behavior"), "itrpo": ("actor", "critic", "behavior")}


def load(path: str):
    """The run's agent (networks loaded), its dataset (states normalised as the run's) and the
    discounted returns of the rewards it trains on."""
    saved = read_run_file(path, "a fisher_brc or itrpo")
    weights = saved.get("agent", saved)
    weights = weights if isinstance(weights, dict) else {}
    # a model.pt names its algorithm; a checkpoint is known by its networks (its flags may include one
    # that a file has dropped since)
    name = saved.get("algorithm") if weights else None
    if weights and name is None and isinstance(saved.get("args"), dict):
        matches = [n for n, nets in NETWORKS.items() if set(nets) <= set(weights)]
        name = matches[0] if len(matches) == 1 else None
    if name not in NETWORKS or not set(NETWORKS[name]) <= set(weights) or not isinstance(saved.get("args"), dict):
        raise common.UserError(f"{path} is not a fisher_brc or itrpo checkpoint or model.pt")
    module = {"fisher_brc": fisher_brc, "itrpo": itrpo}[name]
    args = module.Args(**{k: v for k, v in saved["args"].items() if k in module.Args.__dataclass_fields__})
    data = common.load_dataset(args.env, "cpu")
    raw_rewards = data.rewards.clone()
    if name == "fisher_brc":
        common.transform_rewards(data, args.reward_transform)
        agent = fisher_brc.FisherBRC(args, data.obs_dim, data.act_dim, torch.device("cpu"))
    else:
        for k, v in itrpo.domain_defaults(args.env).items():  # as the run set them before training
            if getattr(args, k) is None:
                setattr(args, k, v)
        itrpo.transform_rewards(data, args)
        agent = itrpo.ITRPO(args, data.obs_dim, data.act_dim, torch.device("cpu"))
    returns = discounted_returns(data, args.gamma)  # of the rewards the run trains on
    stats = common.normalize_obs(data) if args.normalize_states else (None, None)
    for net in NETWORKS[name]:
        getattr(agent, net).load_state_dict(weights[net])
    # every reward transform is affine: the data's lowest and highest rewards give it for an env step's
    raw, trained = raw_rewards.double(), data.rewards.double()
    lo, hi = int(raw.argmin()), int(raw.argmax())
    slope = float((trained[hi] - trained[lo]) / (raw[hi] - raw[lo])) if raw[hi] > raw[lo] else None
    train_reward = None if slope is None else lambda r: slope * (r - float(raw[lo])) + float(trained[lo])
    return name, saved, agent, data, returns, stats, train_reward


def rollouts(agent, q, data, stats, train_reward, gamma: float, episodes: int) -> None:
    """The policy's own episodes in the eval env (its mean action, as evaluations act, from
    reset(seed=1000 + i)): Q(s_t, pi(s_t)) beside the discounted return of the training rewards that
    followed in the episode, and log mu at pi(s_t), by stretch of the episode (to step 500). Where the
    time limit cuts an episode the critic bootstraps and the return does not: of such an episode, the
    last k steps, from which the cut-off part weighs gamma^k >= 1%, are left out."""
    env, tail = data.make_env(), math.ceil(math.log(0.01) / math.log(gamma)) if 0 < gamma < 1 else 0
    rows = {s: [] for s in [(0, 1), (1, 10), (10, 50), (50, 200), (200, 500)]}
    lengths = []
    for i in range(episodes):
        obs, _ = env.reset(seed=1000 + i)
        qs, log_mus, rewards, done = [], [], [], False
        while not done:
            o = torch.as_tensor(common.flatten_obs(obs, data.antmaze))[None]
            o = o if stats[0] is None else (o - stats[0]) / stats[1]
            with torch.no_grad():
                a = agent.act(o)
                qs.append(float(q(o, a)))
                log_mus.append(float(agent.behavior.log_prob(o, a)))
            low, high = data.action_low, data.action_high
            a = a[0].clamp(-1.0, 1.0).numpy()
            obs, r, terminated, truncated, _ = env.step(low + (a + 1) / 2 * (high - low))
            rewards.append(train_reward(float(r)))
            done = terminated or truncated
        lengths.append(len(rewards))
        exact = len(rewards) if terminated else len(rewards) - tail
        to_go, acc = np.zeros(len(rewards)), 0.0
        for t in range(len(rewards) - 1, -1, -1):
            acc = rewards[t] + gamma * acc
            to_go[t] = acc
        for (lo, hi), kept in rows.items():
            kept += [(qs[t], to_go[t], log_mus[t]) for t in range(lo, min(hi, exact))]
    env.close()
    print(f"  the policy's own {episodes} episodes (reset seeds 1000-{999 + episodes}): lengths "
          f"{min(lengths)}-{max(lengths)} (mean {np.mean(lengths):.0f})")
    for (lo, hi), kept in rows.items():
        if kept:
            qv, g, lm = np.array(kept).T
            print(f"    steps {lo}-{hi - 1} ({len(kept)} states): Q(s, pi(s)) {qv.mean():.1f}, discounted "
                  f"return that followed {g.mean():.1f}, log mu at pi(s) {lm.mean():.2f} "
                  f"(below -10 at {(lm < -10).mean():.0%})")


def main(argv=None) -> None:
    common.install_user_error_hook()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="checkpoint.pt or model.pt of a fisher_brc or itrpo run")
    parser.add_argument("--rollouts", type=int, default=0, metavar="N",
                        help="also run the policy for N episodes in the eval env: Q along its own states")
    parser.add_argument("--critic", metavar="PATH",
                        help="read Q from another checkpoint of the same run: one step's critic on another's policy")
    options = parser.parse_args(argv)
    path = options.path
    if options.rollouts < 0:
        raise common.UserError(f"--rollouts must be 0 or more, got {options.rollouts}")
    name, saved, agent, data, returns, stats, train_reward = load(path)
    if options.rollouts and train_reward is None:
        raise common.UserError(f"--rollouts: every reward of {data.dataset_id} is the same, so the run's reward "
                               f"transform cannot be read from them; run without --rollouts")
    judge = agent
    if options.critic:
        other, other_saved, judge = load(options.critic)[:3]
        # the same run's checkpoints differ in no trained flag; one a file added or dropped in between is
        # in one of them only
        ours, theirs = saved["args"], other_saved["args"]
        differ = sorted(k for k in set(ours) & set(theirs)
                        if k not in common.RESUME_FREE_FLAGS and ours[k] != theirs[k])
        if other != name or differ:
            raise common.UserError(f"--critic {options.critic} is not of the same run as {path} (they differ in "
                                   f"{', '.join(differ) or 'algorithm'})")
        step = f"step {other_saved['step']}" if "step" in other_saved else "the final policy"
        print(f"Q below is the critic of {options.critic} ({step}), on the policy of {path}")
    if name == "fisher_brc":
        def q(obs, act):
            return torch.min(*judge.offsets(obs, act)) + judge.behavior.log_prob(obs, act)
    else:
        def q(obs, act):
            return torch.min(*judge.critic(obs, act))
    torch.manual_seed(0)
    with torch.no_grad():
        obs, actions = data.observations, data.actions
        pi = agent.act(obs)
        log_mu_data = agent.behavior.log_prob(obs, actions)
        log_mu_pi = agent.behavior.log_prob(obs, pi)
        sample, log_pi_sample = agent.actor.sample(obs)
        log_mu_sample = agent.behavior.log_prob(obs, sample)
        kl = log_pi_sample - log_mu_sample  # one-sample estimate of KL(pi || mu) at each state
        log_std = agent.actor(obs)[1].mean(-1)
        q_data, q_pi = q(obs, actions).numpy(), q(obs, pi).numpy()
    step = f"step {saved['step']}" if "step" in saved else "the final policy"
    print(f"{path} ({name}, {step}), {len(data)} transitions, rewards of the run's transform and bonus:")
    print(f"  discounted return after (s, a): mean {returns.mean():.1f}, max {returns.max():.1f}")
    print(f"  mean Q(s, a) {q_data.mean():.1f}; Q(s, pi(s)) {q_pi.mean():.1f}")
    edges = np.quantile(returns, [0.25, 0.5, 0.75])
    quartile = np.digitize(returns, edges)
    gaps = [(q_data[quartile == i] - returns[quartile == i]).mean() for i in range(4)]
    print("  Q - return, by quartile of the return (lowest first): " + ", ".join(f"{g:+.0f}" for g in gaps))
    print(f"  mean log mu: data actions {log_mu_data.mean():.2f}, pi(s) {log_mu_pi.mean():.2f} (below -10 at "
          f"{(log_mu_pi < -10).float().mean():.1%} of states), sampled actions {log_mu_sample.mean():.2f}; "
          f"KL(pi || mu) {kl.mean():.2f}")
    print(f"  mean (pi(s) - a)^2 (as tools/diagnostics/td3_bc_q_check.py): {((pi - actions) ** 2).mean():.3f}; "
          f"policy log-std (mean over dimensions) {log_std.mean():.2f}")
    first = data.episode_starts  # from the initial-state distribution that evaluation episodes start from too
    print(f"  at the episodes' {len(first)} first states: Q(s, a) {q_data[first].mean():.1f}, Q(s, pi(s)) "
          f"{q_pi[first].mean():.1f}, return after them mean {returns[first].mean():.1f}, "
          f"max {returns[first].max():.1f}; "
          f"log mu at a {log_mu_data[first].mean():.2f}, at pi(s) {log_mu_pi[first].mean():.2f}; "
          f"policy log-std {log_std[first].mean():.2f}, KL(pi || mu) {kl[first].mean():.2f}; "
          f"mean pi(s) {np.array2string(pi[first].mean(0).numpy(), precision=2)}, "
          f"a {np.array2string(actions[first].mean(0).numpy(), precision=2)}")

    sources = replay_sources(data.dataset_id)
    if sources and sum(n for _, n in sources) != len(data):
        print(f"  (not split by source: {data.dataset_id} has {len(data)} transitions, the shipped "
              f"snapshots' recipe {sum(n for _, n in sources)}; it was built from other snapshots)")
    elif sources:  # rows hold the segments in order; an episode belongs to the segment of its first row
        segment = np.searchsorted(np.cumsum([n for _, n in sources]), first, side="right")
        warmup = np.array([sources[i][0] == "warm-up" for i in segment], dtype=bool)
        for label, mask in (("warm-up", warmup), ("snapshot", ~warmup)):
            rows = first[mask]
            if len(rows):
                print(f"  first states of {label} episodes ({len(rows)} of {len(first)}): Q(s, a) "
                      f"{q_data[rows].mean():.1f}, Q(s, pi(s)) {q_pi[rows].mean():.1f}; log mu at a "
                      f"{log_mu_data[rows].mean():.2f}, at pi(s) {log_mu_pi[rows].mean():.2f}; "
                      f"mean |a| {actions[rows].abs().mean():.2f}, mean |pi(s)| {pi[rows].abs().mean():.2f}")
    all_states, first_states = actor_loss(name, judge, agent, data.observations), actor_loss(
        name, judge, agent, data.observations[data.episode_starts])
    print(f"  the file's actor loss of this policy (its samples from seed 0): {all_states:.2f} over all states, "
          f"{first_states:.2f} where the episodes start")
    if options.rollouts:
        rollouts(agent, q, data, stats, train_reward, saved["args"]["gamma"], options.rollouts)


def actor_loss(name: str, judge, agent, obs: torch.Tensor) -> float:
    """The loss the file's actor minimises, of `agent`'s policy under `judge`'s critic (and, for Fisher-BRC,
    its temperature), over `obs`: iTRPO's alpha KL - Q of its K samples, Fisher-BRC's alpha log pi - Q."""
    own, judge.actor = judge.actor, agent.actor
    torch.manual_seed(0)  # both policies of a comparison draw the same noise
    total = 0.0
    try:
        with torch.no_grad():
            for chunk in obs.split(4096):
                if name == "fisher_brc":
                    loss = judge.actor_loss(chunk, judge.behavior.components(chunk))[0]
                else:
                    loss = judge.actor_loss(chunk)[0]
                total += float(loss) * len(chunk)
    finally:
        judge.actor = own
    return total / len(obs)


if __name__ == "__main__":
    main()
