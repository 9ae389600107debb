"""D4RL's recipe for Minari datasets, for any Gymnasium env with a Box action space, built from
the snapshots of a SAC behaviour agent (trained by tools/make_dataset.py, which is also the command
line of this module).

`build_datasets` writes `local/<env>/<kind>-v0` (env id lower-cased without its `-vN` suffix; with
a size, `local/<env>/<kind>-<N/1000>k-v0`, e.g. `local/hopper/medium-200k-v0`, so that each id
names one dataset) into MINARI_DATASETS_PATH (default ~/.minari/datasets); `build_local_dataset`
builds such an id on first use from the shipped snapshots. The recipe follows D4RL:

- random:        rollouts of a randomly initialised policy (a fresh SAC actor, rollouts.Actor,
                 PyTorch's default initialisation, seeded from its own stream), sampling from its
                 stochastic policy, as D4RL did with a randomly initialised SAC actor.
                 `--random-policy uniform` draws uniform random actions over the action Box instead.
- medium:        rollouts of a SAC snapshot at about one third of the expert return (for
                 halfcheetah/hopper/walker2d/ant: of D4RL's expert return, normalised score ~33).
- expert:        rollouts of the best SAC snapshot (the final policy of a converged run). For
                 halfcheetah/hopper/walker2d/ant it must score at least EXPERT_MIN_SCORE (90)
                 D4RL-normalised; below that the expert kinds are refused (train further, or name a
                 snapshot with --expert-snapshot).
- medium-expert: the medium rollouts followed by the expert rollouts (twice --transitions).
- medium-replay: the SAC agent's replay buffer up to the medium snapshot. When tools/make_dataset.py
                 trains the agent in the same call, that is the real buffer. From shipped snapshots
                 (the buffer is too large to ship) it is approximated: the uniform-random warm-up,
                 then for each snapshot interval the snapshot at its end, sampled from its
                 stochastic policy (the agent's own exploration noise), for as many steps as the
                 interval had.
- medium-replay-no-warmup: medium-replay without its uniform-random warm-up segment, its snapshot
                 rollouts drawn from the same streams (at the default size the same rollouts; a
                 sized build shares its transitions among the snapshot segments alone): a control
                 for what the warm-up's episodes, whose actions are uniform over the action Box, do.

medium and expert rollouts sample from the stochastic SAC policy, as D4RL did. Datasets have
`--transitions` transitions (D4RL: 1M; the last episode is cut and marked truncated to hit the size
exactly); medium-replay defaults to the size of the buffer it stands for.

Reference scores: halfcheetah/hopper/walker2d/ant use D4RL's constants (d4rl.D4RL_REF_SCORES) so
that scores are on the familiar scale; other envs use the uniform random policy's mean return and
the expert snapshot's mean evaluation return.

Same seed and same snapshots give byte-identical arrays: every episode resets its env with its own
seed, and every random stream (numpy and torch) comes from its own explicitly seeded generator.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from typing import Literal, Optional

import numpy as np
import torch

from common import D4RL_REF_SCORES
from common import UserError
from dataset_rollouts import (
    Progress,
    load_actor,
    make_env,
    random_init_actor,
    rollout,
    stochastic_policy,
    uniform_policy,
)
from dataset_snapshots import (
    check_expert_level,
    default_snapshot_dir,
    env_name,
    load_manifest,
    shipped_envs_hint,
    shipped_manifests,
    snapshot_by_step,
)

Kind = Literal["random", "medium", "medium-replay", "expert", "medium-expert", "medium-replay-no-warmup"]
KINDS: tuple[str, ...] = Kind.__args__
RandomPolicy = Literal["init", "uniform"]
D4RL_TRANSITIONS = 1_000_000

# Independent random streams, so that adding an episode to one kind never shifts another.
STREAM_TRAIN, STREAM_RANDOM, STREAM_MEDIUM, STREAM_EXPERT, STREAM_EVAL, STREAM_RANDOM_REF = range(6)
STREAM_REPLAY_WARMUP, STREAM_REPLAY_SEGMENT = 10, 100


# ----------------------------------------------------------------------------------------------
# Names and seeds
# ----------------------------------------------------------------------------------------------
def dataset_id_for(env_id: str, kind: str, transitions: Optional[int] = None) -> str:
    """`local/<env>/<kind>-v0` at the default size; a build of another size has its own id,
    `local/<env>/<kind>-<size>-v0` (size 50k for 50,000 transitions), so that an id names one dataset."""
    size = "" if transitions is None else f"-{transitions // 1000}k" if transitions % 1000 == 0 else f"-{transitions}"
    return f"local/{env_name(env_id)}/{kind}{size}-v0"


def parse_local_id(dataset_id: str) -> Optional[tuple[str, str, Optional[int]]]:
    """(env name, kind, transitions or None for the default size) of a `local/` id, or None."""
    match = re.fullmatch(r"local/([^/]+)/(.+)-v0", dataset_id)
    if match is None:
        return None
    sized = re.fullmatch(r"(.+)-([1-9][0-9]*)(k?)", match[2])
    if sized and sized[1] in KINDS:
        return match[1], sized[1], int(sized[2]) * (1000 if sized[3] else 1)
    return (match[1], match[2], None) if match[2] in KINDS else None


def sub_seed(seed: int, *stream: int) -> int:
    """A 32-bit seed for one random stream, derived from the user's seed."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# Medium-replay
# ----------------------------------------------------------------------------------------------
def episodes_from_buffer(buf: dict, start: int, stop: int) -> list[dict]:
    """Split buffer rows [start, stop) into episodes; a piece cut off at `stop` is marked truncated."""
    ends = np.flatnonzero(buf["terminations"][start:stop] | buf["truncations"][start:stop]) + start + 1
    if not len(ends) or ends[-1] != stop:
        ends = np.append(ends, stop)
    episodes, first = [], start
    for end in ends:
        truncs = buf["truncations"][first:end].copy()
        truncs[-1] |= not buf["terminations"][end - 1]
        episodes.append({
            "observations": np.concatenate([buf["observations"][first:end], buf["next_observations"][end - 1:end]]),
            "actions": buf["actions"][first:end], "rewards": buf["rewards"][first:end],
            "terminations": buf["terminations"][first:end].copy(), "truncations": truncs})
        first = end
    return episodes


def split_quota(lengths: list[int], total: Optional[int]) -> list[int]:
    """Share `total` transitions among segments in proportion to their lengths (largest remainder)."""
    if total is None or total >= sum(lengths):
        return list(lengths)
    exact = np.asarray(lengths, dtype=np.float64) * total / sum(lengths)
    quota = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quota), kind="stable")[: total - quota.sum()]:
        quota[i] += 1
    return quota.tolist()


def replay_segments(manifest: dict, medium_step: int) -> list[tuple[Optional[dict], int, int]]:
    """(snapshot or None for the uniform warm-up, first step, length) of the buffer up to medium."""
    warmup = min(manifest["warmup_steps"], medium_step)
    segments, previous = [(None, 0, warmup)], warmup
    for snap in manifest["snapshots"]:
        if snap["step"] > medium_step:
            break
        if snap["step"] > previous:
            segments.append((snap, previous, snap["step"] - previous))
            previous = snap["step"]
    return segments



# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------
def build_datasets(env_id: str, kinds: tuple[str, ...], seed: int = 0, transitions: Optional[int] = None,
                   snapshot_dir: Optional[str] = None, medium_step: Optional[int] = None,
                   expert_step: Optional[int] = None, training_buffer: Optional[dict] = None,
                   force: bool = False, random_policy: str = "init") -> list[str]:
    """Write one Minari dataset per kind; returns their ids."""
    if random_policy not in RandomPolicy.__args__:
        raise UserError(f"unknown random policy '{random_policy}'; choose one of "
                        f"{', '.join(RandomPolicy.__args__)}")
    # Rollouts call a small network on one row at a time: one thread is fastest, and more threads
    # spin-wait against any other process on the cores. The caller's setting comes back after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_datasets(env_id, kinds, seed, transitions, snapshot_dir, medium_step, expert_step,
                               training_buffer, force, random_policy)
    finally:
        torch.set_num_threads(threads)


def _build_datasets(env_id, kinds, seed, transitions, snapshot_dir, medium_step, expert_step,
                    training_buffer, force, random_policy) -> list[str]:
    import minari

    env = make_env(env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    name = env_name(env_id)
    ids = [dataset_id_for(env_id, kind, transitions) for kind in kinds]
    existing = set(minari.list_local_datasets())
    for dataset_id in ids:
        if dataset_id in existing and not force:
            raise UserError(f"dataset '{dataset_id}' already exists in {minari.storage.get_dataset_path()}; "
                            f"pass --force to replace it")

    # Random data needs no snapshots, but their manifest (when there is one) gives its ref scores.
    snapshot_dir = snapshot_dir or default_snapshot_dir(env_id)
    manifest, medium, expert = None, None, None
    if any(kind != "random" for kind in kinds) or os.path.exists(os.path.join(snapshot_dir, "manifest.json")):
        manifest = load_manifest(snapshot_dir, env_id)
        medium = snapshot_by_step(manifest, medium_step or manifest["medium"])
        expert = snapshot_by_step(manifest, expert_step or manifest["expert"])
        if expert_step is None:
            for kind, dataset_id in zip(kinds, ids):
                if kind in ("expert", "medium-expert"):
                    check_expert_level(manifest, expert, dataset_id)
    size = transitions or D4RL_TRANSITIONS

    if name in D4RL_REF_SCORES:
        ref_min, ref_max = D4RL_REF_SCORES[name]
        ref_note = "D4RL's reference constants (measured on the v2 envs)"
    elif manifest is not None:
        ref_min, ref_max = manifest["random_return"], expert["eval_return"]
        ref_note = ("the uniform random policy's and the expert snapshot's mean returns "
                    f"({manifest['eval_episodes']} episodes each)")
    else:
        ref_min = ref_max = None
        ref_note = "none (no snapshots for this env, so no expert return)"

    cache: dict[str, list[dict]] = {}
    replay_how = ""
    random_name = "uniform random" if random_policy == "uniform" else "randomly initialised SAC actor"

    def policy_rollouts(snap: dict, stream: int, n: int, progress: Progress) -> list[dict]:
        actor = load_actor(os.path.join(snapshot_dir, snap["file"]), obs_dim, act_dim)
        return rollout(env, stochastic_policy(actor, low, high, sub_seed(seed, stream, 1)), n,
                       sub_seed(seed, stream), progress)

    def medium_episodes(label):
        if "medium" not in cache:
            cache["medium"] = policy_rollouts(medium, STREAM_MEDIUM, size, Progress(f"[{label}]", size))
        return cache["medium"]

    def expert_episodes(label):
        if "expert" not in cache:
            cache["expert"] = policy_rollouts(expert, STREAM_EXPERT, size, Progress(f"[{label}]", size))
        return cache["expert"]

    def medium_replay_episodes(label, warmup: bool = True):
        segments = replay_segments(manifest, medium["step"])
        kept = [i for i in range(len(segments)) if warmup or segments[i][0] is not None]
        if not kept:
            raise UserError(f"{label}: the medium snapshot (step {medium['step']}) comes before the warm-up "
                            f"ends; without the warm-up there is nothing to keep")
        quotas = dict(zip(kept, split_quota([segments[i][2] for i in kept], transitions)))
        # The kind's description is built here, where the quotas are known.
        nonlocal replay_how
        replay_how = replay_description(segments, medium["step"], training_buffer is not None,
                                        sum(quotas.values()), warmup)
        episodes, progress = [], Progress(f"[{label}]", sum(quotas.values()))  # one line for all the segments
        for i, quota in quotas.items():  # segment i draws from stream i whichever segments are kept
            snap, first, _ = segments[i]
            if quota == 0:
                continue
            if training_buffer is not None:
                episodes += episodes_from_buffer(training_buffer, first, first + quota)
            elif snap is None:
                episodes += rollout(env, uniform_policy(low, high, sub_seed(seed, STREAM_REPLAY_WARMUP, 1)),
                                    quota, sub_seed(seed, STREAM_REPLAY_WARMUP), progress)
            else:
                episodes += policy_rollouts(snap, STREAM_REPLAY_SEGMENT + i, quota, progress)
        return episodes

    for kind, dataset_id in zip(kinds, ids):
        label = dataset_id
        print(f"[collect] {dataset_id}: {kind} data for {env_id}", flush=True)
        if kind == "random" and random_policy == "uniform":
            episodes = rollout(env, uniform_policy(low, high, sub_seed(seed, STREAM_RANDOM, 1)), size,
                               sub_seed(seed, STREAM_RANDOM), Progress(f"[{label}]", size))
            how = "uniform random actions over the action Box (--random-policy uniform)"
        elif kind == "random":
            actor = random_init_actor(obs_dim, act_dim, sub_seed(seed, STREAM_RANDOM, 2))
            act = stochastic_policy(actor, low, high, sub_seed(seed, STREAM_RANDOM, 1))
            episodes = rollout(env, act, size, sub_seed(seed, STREAM_RANDOM), Progress(f"[{label}]", size))
            how = ("rollouts sampling from a randomly initialised policy (a fresh SAC actor, PyTorch's "
                   "default initialisation; D4RL's recipe)")
        elif kind == "medium":
            episodes = medium_episodes(label)
            how = "rollouts sampling from the stochastic medium policy"
        elif kind == "expert":
            episodes = expert_episodes(label)
            how = "rollouts sampling from the stochastic expert policy"
        elif kind == "medium-expert":
            episodes = medium_episodes(label + " medium half") + expert_episodes(label + " expert half")
            how = "the medium rollouts followed by the expert rollouts, each sampling from its stochastic policy"
        else:
            episodes = medium_replay_episodes(label, warmup=kind == "medium-replay")
            how = replay_how

        parts = [f"D4RL-style '{kind}' dataset for {env_id}, built offline by tools/make_dataset.py "
                 f"with seed {seed}: {how}."]
        if manifest is not None:
            parts.append(
                f"Behaviour agent: SAC trained online by the same tool (seed {manifest['seed']}, "
                f"{manifest['steps_completed']} env steps); medium snapshot = step {medium['step']} "
                f"(mean eval return {medium['eval_return']:.1f}), expert snapshot = step {expert['step']} "
                f"(mean eval return {expert['eval_return']:.1f}"
                + ("" if manifest.get("reached_d4rl_expert") in (None, True)
                   else ", the best this agent reached: below D4RL's expert level")
                + ").")
        n_steps = sum(len(ep["rewards"]) for ep in episodes)
        parts.append(f"{n_steps} transitions in {len(episodes)} episodes; reference scores: {ref_note}.")
        buffers = [_episode_buffer(i, ep) for i, ep in enumerate(episodes)]
        refs = {} if ref_min is None else {"ref_min_score": ref_min, "ref_max_score": ref_max}
        if dataset_id in existing:
            minari.delete_dataset(dataset_id)
        minari.create_dataset_from_buffers(
            dataset_id, buffers, env=env, eval_env=env_id,
            algorithm_name=random_name if kind == "random" else "SAC (tools/make_dataset.py)",
            author="offline-rl tools/make_dataset.py", author_email="offline-rl@localhost",
            code_permalink="tools/make_dataset.py (this repository)", description=" ".join(parts), **refs)
        print(f"[collect] wrote {dataset_id}: {n_steps} transitions, {len(episodes)} episodes, mean "
              f"episode return {np.mean([ep['rewards'].sum() for ep in episodes]):.1f}", flush=True)
    env.close()
    return ids


def replay_description(segments: list, medium_step: int, real_buffer: bool, kept: int,
                       warmup: bool = True) -> str:
    length = medium_step if warmup else medium_step - segments[0][2]
    thinned = ("" if kept == length else
               f"; {kept} of those {length} transitions kept, the start of every segment in proportion "
               f"to its length")
    if real_buffer:
        what = (f"its first {medium_step} env steps, {segments[0][2]} uniform-random warm-up steps included"
                if warmup else f"env steps {segments[0][2]} to {medium_step}: its {segments[0][2]} "
                               f"uniform-random warm-up steps left out")
        return f"the SAC agent's own replay buffer up to the medium snapshot ({what}){thinned}"
    steps = [snap["step"] for snap, _, _ in segments[1:]]
    start = (f"{segments[0][2]} uniform-random warm-up steps as in training, then " if warmup else
             f"without the {segments[0][2]} uniform-random warm-up steps of training: ")
    return (f"an approximation of the SAC agent's replay buffer up to the medium snapshot (step {medium_step}), "
            f"which is too large to ship: {start}for each interval between training snapshots (steps "
            f"{', '.join(map(str, steps))}) rollouts of the snapshot at its end, sampling from its stochastic "
            f"policy (the exploration noise the agent used), as many steps as the interval had{thinned}")


def replay_sources(dataset_id: str) -> Optional[list[tuple[str, int]]]:
    """(source, transitions) of each segment of a local medium-replay id as build_local_dataset builds
    it from the shipped snapshots, in the order its rows hold them: "warm-up" (uniform random
    actions) or "step <n>" (the snapshot of that training step); None for other ids. Each segment is
    as many transitions as its quota (its last episode is cut). A build of the same id from other
    snapshots has other segments: compare the total with the dataset's size."""
    parsed = parse_local_id(dataset_id)
    shipped = shipped_manifests()
    if parsed is None or not parsed[1].startswith("medium-replay") or parsed[0] not in shipped:
        return None
    env_id, snapshot_dir = shipped[parsed[0]]
    manifest = load_manifest(snapshot_dir, env_id)
    segments = replay_segments(manifest, snapshot_by_step(manifest, manifest["medium"])["step"])
    if parsed[1] == "medium-replay-no-warmup":
        segments = segments[1:]
    quotas = split_quota([length for _, _, length in segments], parsed[2])
    return [("warm-up" if snap is None else f"step {snap['step']}", q)
            for (snap, _, _), q in zip(segments, quotas)]


def _episode_buffer(index: int, episode: dict):
    from minari.data_collector import EpisodeBuffer

    return EpisodeBuffer(id=index, observations=episode["observations"], actions=episode["actions"],
                         rewards=episode["rewards"], terminations=episode["terminations"],
                         truncations=episode["truncations"])


@contextlib.contextmanager
def preserved_global_rngs():
    """Run a block without changing the global python, numpy and torch (CPU) random streams.
    CUDA's are left out: forking them would initialise CUDA, and the dataset builder runs on the CPU."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def build_local_dataset(dataset_id: str) -> None:
    """Build a `local/<env>/<kind>[-<size>]-v0` id from the shipped snapshots (common.load_dataset
    does, on first use, through tools/make_dataset.py).

    The build runs after a training script's seed_everything and draws from the global generators
    (network initialisation), so it leaves them as it found them: otherwise the run that builds the
    dataset and every later run with the same seed would start from different weights."""
    import minari

    parsed = parse_local_id(dataset_id)
    shipped = shipped_manifests()
    if parsed is None or parsed[0] not in shipped:
        ids = [dataset_id_for(env_id, "<kind>") for env_id, _ in shipped.values()]
        raise UserError(f"cannot build '{dataset_id}': buildable ids are {', '.join(ids) or '(none)'} with "
                        f"<kind> one of {', '.join(KINDS)}, optionally sized (e.g. medium-50k-v0 for 50,000 "
                        f"transitions){shipped_envs_hint()}")
    name, kind, transitions = parsed
    env_id, snapshot_dir = shipped[name]
    print(f"'{dataset_id}' is not in {minari.storage.get_dataset_path()}: building it from the shipped "
          f"snapshots in {snapshot_dir} ({transitions or 'the default number of'} transitions); "
          f"this happens once", flush=True)
    with preserved_global_rngs():
        build_datasets(env_id, (kind,), transitions=transitions, snapshot_dir=snapshot_dir)
