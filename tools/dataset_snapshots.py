"""SAC snapshots and their manifest: which snapshot is medium and which expert, and the snapshots
shipped in tools/snapshots/ that `local/` ids are built from.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

from common import D4RL_REF_SCORES
from common import UserError

# The shipped snapshots are data files kept beside the tool that trains them (tools/make_dataset.py).
SNAPSHOTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "snapshots")


def env_name(env_id: str) -> str:
    """'Hopper-v5' -> 'hopper', the middle part of the dataset id."""
    return re.sub(r"-v\d+$", "", env_id).lower().replace("/", "-")


def default_snapshot_dir(env_id: str) -> str:
    return os.path.join(SNAPSHOTS_DIR, env_id.replace("/", "_"))


def load_manifest(snapshot_dir: str, env_id: str) -> dict:
    path = os.path.join(snapshot_dir, "manifest.json")
    if not os.path.exists(path):
        raise UserError(f"no snapshots for '{env_id}' in {snapshot_dir} (no manifest.json); train them with "
                        f"`python tools/make_dataset.py --env {env_id} --train-steps N`"
                        f"{shipped_envs_hint()}")
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read as a snapshot manifest ({type(exc).__name__}: {exc}); restore it, or "
                        f"train the snapshots again with --train-steps") from None
    if manifest.get("env_id") != env_id:
        raise UserError(f"{snapshot_dir} holds snapshots of {manifest.get('env_id')!r}, not of '{env_id}': "
                        f"pass {env_id}'s --snapshot-dir, or train them with --train-steps")
    return manifest


def shipped_manifests() -> dict[str, tuple[str, str]]:
    """env name ('hopper') -> (env id, snapshot folder) for every shipped manifest."""
    found = {}
    if os.path.isdir(SNAPSHOTS_DIR):
        for entry in sorted(os.listdir(SNAPSHOTS_DIR)):
            path = os.path.join(SNAPSHOTS_DIR, entry, "manifest.json")
            if os.path.exists(path):
                with open(path) as f:
                    env_id = json.load(f)["env_id"]
                found[env_name(env_id)] = (env_id, os.path.join(SNAPSHOTS_DIR, entry))
    return found


def shipped_envs_hint() -> str:
    envs = [env_id for env_id, _ in shipped_manifests().values()]
    return f"; shipped snapshots exist for: {', '.join(envs)}" if envs else "; no snapshots are shipped"


def choose_snapshots(snapshots: list[dict], random_return: float, env_id: str) -> dict:
    """Expert = best evaluated snapshot; medium = the one closest to a third of the way from the
    floor to the top (D4RL's "about one third of expert"), i.e. a normalised score of about 33.
    Where D4RL's constants are used (halfcheetah, hopper, walker2d, ant), floor and top are D4RL's
    random and expert returns, so that medium means the same level whatever the agent reached; else
    the floor is this env's random return and the top the best snapshot's, which keeps "a third"
    meaningful for negative-return envs such as Pendulum."""
    best = max(snapshots, key=lambda s: s["eval_return"])
    top, floor, reached = best["eval_return"], random_return, None
    if env_name(env_id) in D4RL_REF_SCORES:
        floor, top = D4RL_REF_SCORES[env_name(env_id)]
        reached = best["eval_return"] >= top
    target = floor + (top - floor) / 3.0
    medium = min(snapshots, key=lambda s: (abs(s["eval_return"] - target), s["step"]))
    choice = {"medium": medium["step"], "expert": best["step"], "medium_target_return": target,
              "expert_is_final": best["step"] == snapshots[-1]["step"], "reached_d4rl_expert": reached}
    if reached is False:
        score = d4rl_normalized(env_id, best["eval_return"])
        use = (f"the expert kinds use this best snapshot (D4RL-normalised {score:.1f})" if score >= EXPERT_MIN_SCORE
               else f"the expert kinds are refused until a snapshot scores at least {EXPERT_MIN_SCORE:.0f} "
                    f"D4RL-normalised (this one: {score:.1f})")
        choice["expert_note"] = (f"not expert level: the best return reached, {best['eval_return']:.1f}, is below "
                                 f"D4RL's expert return {top:.1f}; {use}")
    return choice


# The expert and medium-expert kinds of an env with D4RL's constants are built only from a snapshot
# that scores at least this (D4RL-normalised): below it "expert" would name a medium-level policy.
EXPERT_MIN_SCORE = 90.0


def d4rl_normalized(env_id: str, ret: float) -> Optional[float]:
    if env_name(env_id) not in D4RL_REF_SCORES:
        return None
    low, high = D4RL_REF_SCORES[env_name(env_id)]
    return 100.0 * (ret - low) / (high - low)


def check_expert_level(manifest: dict, expert: dict, dataset_id: str) -> None:
    """One-line refusal of an expert-kind build whose best snapshot is below expert level."""
    env_id = manifest["env_id"]
    score = d4rl_normalized(env_id, expert["eval_return"])
    if score is not None and score < EXPERT_MIN_SCORE:
        raise UserError(
            f"'{dataset_id}' needs an expert policy, and the best {env_id} snapshot (step {expert['step']} of "
            f"{manifest['steps_completed']} trained, return {expert['eval_return']:.0f}) scores {score:.0f} "
            f"D4RL-normalised, below expert level ({EXPERT_MIN_SCORE:.0f}); train further (`python "
            f"tools/make_dataset.py --env {env_id} --train-steps N`, see tools/SNAPSHOTS.md) or build it from "
            f"a snapshot you name (`python tools/make_dataset.py --env {env_id} --kind <kind> --expert-snapshot STEP`)")


def snapshot_by_step(manifest: dict, step: int) -> dict:
    for snap in manifest["snapshots"]:
        if snap["step"] == step:
            return snap
    steps = ", ".join(str(s["step"]) for s in manifest["snapshots"])
    raise UserError(f"no snapshot at step {step} for '{manifest['env_id']}'; snapshots: {steps}")

