"""TD3+BC's critic against the data: Q1(s, a) of every dataset transition next to the discounted
return that followed it in the dataset, read from a run's checkpoint (or model.pt).

    python tools/diagnostics/td3_bc_q_check.py ~/long_runs/hopper-medium-replay-v0__td3_bc__0/checkpoint.pt

The discounted return after (s, a) is what the behaviour policy earned; a better policy earns more,
but no policy earns more than the best of them by much, and none more than max r / (1 - gamma). A
critic whose mean over the data lies well above the data's own returns, at a policy that scores
below the data, overestimates. Also printed: how far the policy's actions are from the data's
(the behaviour-cloning term of the actor's loss) and Q along the segment from a to pi(s).
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
import common  # noqa: E402
import td3_bc  # noqa: E402


def read_run_file(path: str, kind: str) -> dict:
    """A run's checkpoint.pt or model.pt, read by common.load_file: as weights only (a pickle that would
    run code is refused) and checked against its checksum. A file that is missing, damaged or not of this
    library is refused in one line that names `kind` ("an awr", "a td3_bc")."""
    if not os.path.isfile(path):
        raise common.UserError(f"{path} is not a file; give {kind} run's checkpoint.pt or model.pt")
    try:
        return common.load_file(path)
    except common.UserError as exc:
        reason = str(exc)  # load_file's line starts with the path
        reason = "it " + reason[len(path) + 1:] if reason.startswith(path + " ") else reason
        raise common.UserError(f"{path} is not {kind} checkpoint or model.pt: {reason}") from None


def discounted_returns(data: common.OfflineData, gamma: float) -> np.ndarray:
    """sum_k gamma^k r_(t+k) to the end of each episode (a truncated episode's tail is cut off there)."""
    rewards = data.rewards.cpu().numpy().astype(np.float64)
    out = np.zeros_like(rewards)
    for start, length in zip(data.episode_starts, data.episode_lengths):
        acc = 0.0
        for i in range(start + length - 1, start - 1, -1):
            acc = rewards[i] + gamma * acc
            out[i] = acc
    return out


def main(argv=None) -> None:
    common.install_user_error_hook()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="checkpoint.pt or model.pt of a td3_bc run")
    path = parser.parse_args(argv).path
    saved = read_run_file(path, "a td3_bc")
    if saved.get("algorithm", "td3_bc") != "td3_bc" or ("agent" not in saved and "critic" not in saved) \
            or not isinstance(saved.get("args"), dict):
        raise common.UserError(f"{path} is not a td3_bc checkpoint or model.pt")
    args = td3_bc.Args(**{k: v for k, v in saved["args"].items() if k in td3_bc.Args.__dataclass_fields__})
    data = common.load_dataset(args.env, "cpu")
    if args.normalize_states:
        common.normalize_obs(data)
    agent = td3_bc.TD3BC(args, data.obs_dim, data.act_dim, torch.device("cpu"))
    if "agent" in saved:
        run_state = saved["agent"]
        agent.actor.load_state_dict(run_state["actor"])
        agent.critic.load_state_dict(run_state["critic"])
    else:
        agent.actor.load_state_dict(saved["actor"])
        agent.critic.load_state_dict(saved["critic"])

    returns = discounted_returns(data, args.gamma)
    with torch.no_grad():
        obs, actions = data.observations, data.actions
        q1 = agent.critic(obs, actions)[0].numpy()
        pi = agent.actor(obs)
        along = [float(agent.critic(obs, actions + f * (pi - actions))[0].mean()) for f in (0.0, 0.5, 1.0)]
        distance = float(((pi - actions) ** 2).mean())
    quartiles = np.quantile(returns, [0.25, 0.5, 0.75])
    groups = np.digitize(returns, quartiles)
    print(f"{path}: step {saved.get('step', 'final')}, {args.env}, gamma {args.gamma}")
    print(f"mean Q1(s, a) over the data {q1.mean():.1f}; mean discounted return that followed {returns.mean():.1f} "
          f"(largest {returns.max():.1f}); max r / (1 - gamma) = {float(data.rewards.max()) / (1 - args.gamma):.1f}")
    print("Q1 - return by quartile of the return (lowest first): "
          + ", ".join(f"{(q1 - returns)[groups == g].mean():+.1f}" for g in range(4)))
    print(f"mean (pi(s) - a)^2 {distance:.3f}; mean Q1 at a, (a + pi(s)) / 2, pi(s): "
          + ", ".join(f"{q:.1f}" for q in along))


if __name__ == "__main__":
    main()
