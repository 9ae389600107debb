"""IQL's policy fitted again, from a fresh actor, to the advantage weights of a run's frozen Q and V.

    python tools/diagnostics/iql_actor_refit.py ~/long_runs/hopper-medium-replay-v0__iql__0/model.pt --steps 300000

IQL's actor never feeds back into its critic (Q and V learn from dataset actions only), so the policy
a run ends with is the product of two things: the advantage weights exp(beta * (Q - V)) the critic
gives the data, and how long the actor has been fitting them. This tool separates them. It loads the
run's Q (its target network where the file holds one, a checkpoint.pt; model.pt keeps only the
online network, which the target trails by 0.5% per step) and V, keeps them fixed, and trains a new
actor (initialised from --seed) with the run's actor loss, learning rate and cosine schedule (its
--total-steps), batch size and evaluation (its --eval-episodes and --seed), evaluating every
--eval-every steps. A new actor that falls on a critic held still shows the actor's fitting at work;
refits of critics from different steps, with the same --seed, compare the critics' weights.
--output writes the evaluations as JSON.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "algorithms"))
import common  # noqa: E402
import iql  # noqa: E402
from tools.diagnostics.td3_bc_q_check import read_run_file  # noqa: E402


def load(path: str) -> tuple[iql.Args, dict, dict]:
    """The run's args, its networks' state dicts and the file itself, or a one-line error."""
    saved = read_run_file(path, "an iql")
    weights = saved.get("agent", saved)
    if not isinstance(weights, dict) or saved.get("algorithm", "iql") != "iql" \
            or not {"critic", "value"} <= set(weights) or not isinstance(saved.get("args"), dict):
        raise common.UserError(f"{path} is not an iql checkpoint or model.pt")
    args = iql.Args(**{k: v for k, v in saved["args"].items() if k in iql.Args.__dataclass_fields__})
    return args, weights, saved


def refit_step(agent: iql.IQL, batch: common.Batch) -> torch.Tensor:
    """One step of IQL's actor update (IQL.train's second step) with Q and V held fixed."""
    with torch.no_grad():
        target_q = torch.min(*agent.critic_target(batch.observations, batch.actions))
    actor_loss = agent.actor_loss(batch, target_q)[0]
    agent.actor_optimizer.zero_grad(set_to_none=True)
    actor_loss.backward()
    agent.actor_optimizer.step()
    agent.actor_scheduler.step()
    return actor_loss.detach()


def main(argv=None) -> None:
    common.install_user_error_hook()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="checkpoint.pt or model.pt of an iql run")
    parser.add_argument("--steps", type=int, default=300_000, help="actor steps (default 300000)")
    parser.add_argument("--eval-every", type=int, default=10_000, help="evaluate every this many steps")
    parser.add_argument("--seed", type=int, default=None, help="seed of the new actor and its batches "
                        "(default: the run's --seed + 1, so that it differs from the run's own actor)")
    parser.add_argument("--output", default=None, help="write the evaluations here as JSON")
    flags = parser.parse_args(argv)
    if flags.steps <= 0 or flags.eval_every <= 0:
        raise common.UserError("--steps and --eval-every must be positive")
    args, weights, saved = load(flags.path)
    seed = args.seed + 1 if flags.seed is None else flags.seed

    device = torch.device("cpu")
    data = common.load_dataset(args.env, device)
    obs_mean, obs_std = common.normalize_obs(data) if args.normalize_states else (None, None)
    buffer = common.ReplayBuffer(data)
    common.seed_everything(seed)
    agent = iql.IQL(args, data.obs_dim, data.act_dim, device)  # a fresh actor, its optimiser and schedule
    agent.critic.load_state_dict(weights["critic"])
    agent.critic_target.load_state_dict(weights.get("critic_target", weights["critic"]))
    agent.value.load_state_dict(weights["value"])
    for network in (agent.critic, agent.critic_target, agent.value):
        network.requires_grad_(False)

    where = f"step {saved['step']}" if "step" in saved else "the end"
    target = "target Q" if "critic_target" in weights else "Q (model.pt holds no target network)"
    print(f"[iql_actor_refit] {flags.path} ({where}): a new actor (seed {seed}) on the frozen {target} and V, "
          f"{flags.steps} steps, cosine schedule over {args.total_steps}", flush=True)
    with torch.no_grad():  # the weights the new actor fits, over every dataset transition
        obs = data.observations
        advantage = torch.min(*agent.critic_target(obs, data.actions)) - agent.value(obs).squeeze(-1)
        data_weights = torch.exp(args.beta * advantage).clamp(max=args.max_weight)
    ess = data_weights.sum() ** 2 / (data_weights**2).sum() / len(data_weights)
    print(f"  advantage weights over the {len(data_weights)} transitions: mean {data_weights.mean():.2f}, at the "
          f"clip ({args.max_weight:g}) {(data_weights == args.max_weight).float().mean():.1%}, effective sample size "
          f"{ess:.1%} of the data; mean V {agent.value(obs).mean():.1f}", flush=True)
    evaluations = []
    for step in range(1, flags.steps + 1):
        actor_loss = refit_step(agent, buffer.sample(args.batch_size))
        if step % flags.eval_every == 0 or step == flags.steps:
            evaluation = common.evaluate(data, agent.act, args.eval_episodes, args.seed, obs_mean, obs_std)
            score = evaluation["normalized_score_mean"]
            evaluations.append({"step": step, "return_mean": evaluation["return_mean"],
                                "normalized_score_mean": score, "actor_loss": actor_loss.item(),
                                "log_std": agent.actor.log_std.detach().tolist()})
            print(f"step {step} | return {evaluation['return_mean']:.1f}"
                  + ("" if score is None else f" | score {score:.1f}") + f" | actor_loss {actor_loss.item():.3g}",
                  flush=True)
            if flags.output:
                common.write_json(flags.output, {"model": os.path.abspath(flags.path), "seed": seed,
                                                 "evaluations": evaluations})


if __name__ == "__main__":
    main()
