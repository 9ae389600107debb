"""Minari datasets: the local copy or a download, read episode by episode into flat arrays.

A Minari episode stores T+1 observations and T of everything else; `read_episodes` keeps that
layout (the T+1 rows of each episode one after the other), which `offline_data.load` splits into
observations and next observations.
"""

from __future__ import annotations

import difflib
import json
import os
import warnings

import numpy as np

from offline_data.d4rl import D4RL_REF_SCORES
from offline_data.errors import UserError
from offline_data.tasks import flatten_obs

# Remote Minari datasets with continuous actions that we know of. An id that is neither local nor
# listed here is reported as unknown (with close matches) instead of waiting on the network.
_MUJOCO_TASKS = {
    "halfcheetah": ("simple", "medium", "expert"),
    "hopper": ("simple", "medium", "expert"),
    "walker2d": ("simple", "medium", "expert"),
    "ant": ("simple", "medium", "expert"),
    "humanoid": ("simple", "medium", "expert"),
    "humanoidstandup": ("simple", "medium", "expert"),
    "swimmer": ("medium", "expert"),
    "pusher": ("medium", "expert"),
    "reacher": ("medium", "expert"),
    "invertedpendulum": ("medium", "expert"),
    "inverteddoublependulum": ("medium", "expert"),
}
KNOWN_REMOTE_DATASETS = sorted(
    [f"mujoco/{task}/{kind}-v0" for task, kinds in _MUJOCO_TASKS.items() for kind in kinds]
    + [f"D4RL/antmaze/{m}-v1" for m in ("umaze", "umaze-diverse", "medium-play", "medium-diverse",
                                        "large-play", "large-diverse")]
    + [f"D4RL/{t}/{k}-v2" for t in ("door", "hammer", "pen", "relocate")
       for k in ("human", "cloned", "expert")]
    + [f"D4RL/kitchen/{k}-v2" for k in ("complete", "partial", "mixed")]
    + [f"D4RL/pointmaze/{m}-v2" for m in ("umaze", "umaze-dense", "medium", "medium-dense",
                                          "large", "large-dense", "open", "open-dense")]
    + ["D4RL/minigrid/fourrooms-v0", "D4RL/minigrid/fourrooms-random-v0"]
)


def _suggest(dataset_id: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(dataset_id, candidates, n=5, cutoff=0.5)
    return ("; close matches: " + ", ".join(close)) if close else ""


def _local_ids() -> list[str]:
    import minari

    with warnings.catch_warnings():  # a misconfigured folder is reported by open_dataset if it is the one asked for
        warnings.simplefilter("ignore")
        return sorted(minari.list_local_datasets().keys())


def _folder(dataset_id: str) -> str:
    import minari

    return str(minari.storage.get_dataset_path(dataset_id))


def datasets_root() -> str:
    """The folder of local Minari datasets (MINARI_DATASETS_PATH, else ~/.minari/datasets), made if
    missing."""
    import minari

    return str(minari.storage.get_dataset_path())


def stored(dataset_id: str) -> bool:
    """Whether MINARI_DATASETS_PATH holds `dataset_id` (whole or damaged)."""
    return os.path.isdir(os.path.join(_folder(dataset_id), "data")) or dataset_id in _local_ids()


def open_dataset(dataset_id: str):
    """Return a `minari.MinariDataset`: the local copy if there is one, else download it."""
    import minari

    folder = _folder(dataset_id)
    if stored(dataset_id):
        try:
            return minari.load_dataset(dataset_id)
        except Exception as exc:  # json's, h5py's and pyarrow's own errors, among others
            metadata = os.path.join(folder, "data", "metadata.json")
            try:
                with open(metadata) as f:
                    json.load(f)
            except (OSError, ValueError):
                raise _damaged_dataset(dataset_id, folder, metadata, exc) from None
            raise _damaged_dataset(dataset_id, folder, folder, exc) from None
    if dataset_id not in KNOWN_REMOTE_DATASETS:
        raise UserError(
            f"unknown dataset id '{dataset_id}'{_suggest(dataset_id, _local_ids() + KNOWN_REMOTE_DATASETS)}"
            f". Local datasets are listed by `minari list local`; a remote dataset not known here "
            f"can be fetched first with `minari download {dataset_id}`."
        )
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as exc:  # network errors come from several libraries (httpx, requests, HF)
        raise UserError(
            f"could not download '{dataset_id}' ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})."
            f" Without network access, run `minari download {dataset_id}` on a machine with one and "
            f"copy the folder into {minari.storage.get_dataset_path()} (or set MINARI_DATASETS_PATH)."
        ) from None


def _damaged_dataset(dataset_id: str, folder: str, path: str, exc: Exception) -> UserError:
    """The one line for a dataset file that cannot be read: which file, why, and how to replace it."""
    if dataset_id.startswith("local/"):
        fix = f"delete {folder} and it is rebuilt on first use"
    elif dataset_id in KNOWN_REMOTE_DATASETS:
        fix = f"download it again with `minari download --force {dataset_id}`"
    else:
        fix = f"rebuild it, or download it again with `minari download --force {dataset_id}` if it is on the hub"
    reason = (str(exc).strip().splitlines() or [""])[0][:160]
    return UserError(f"dataset '{dataset_id}' is damaged: {path} could not be read "
                     f"({type(exc).__name__}: {reason}); {fix}")


def _episodes(dataset, dataset_id: str):
    """The dataset's episodes, one at a time; a data file that cannot be read is a `_damaged_dataset`."""
    folder = os.path.dirname(os.path.abspath(dataset.storage.data_path))
    path = getattr(dataset.storage, "_file_path", dataset.storage.data_path)  # HDF5: main_data.hdf5
    episodes = None
    while True:
        try:
            if episodes is None:
                episodes = iter(dataset.storage.get_episodes(dataset.episode_indices))
            episode = next(episodes)
        except StopIteration:
            return
        except Exception as exc:  # h5py's, pyarrow's and numpy's own errors, among others
            raise _damaged_dataset(dataset_id, folder, str(path), exc) from None
        yield episode


def read_episodes(dataset, dataset_id: str, obs_dim: int, keys: tuple[str, ...]) -> dict:
    """One pass over the episodes; observations keep their T+1 rows per episode."""
    obs, acts, rews, terms, truncs, lengths = [], [], [], [], [], []
    for ep in _episodes(dataset, dataset_id):
        o = flatten_obs(ep["observations"], keys)
        steps = len(ep["rewards"])
        if o.shape != (steps + 1, obs_dim):
            raise UserError(
                f"dataset '{dataset_id}', episode {ep['id']}: observations have shape {o.shape}, "
                f"expected ({steps + 1}, {obs_dim}) (T+1 rows for T steps); the dataset is malformed."
            )
        obs.append(o)
        acts.append(np.asarray(ep["actions"], dtype=np.float32).reshape(steps, -1))
        rews.append(ep["rewards"])
        terms.append(ep["terminations"])
        truncs.append(ep["truncations"])
        lengths.append(steps)
    if not lengths or sum(lengths) == 0:
        raise UserError(f"dataset '{dataset_id}' contains no transitions.")
    return {
        "observations": np.concatenate(obs),
        "actions": np.concatenate(acts),
        "rewards": np.concatenate(rews).astype(np.float32),
        "terminals": np.concatenate(terms).astype(np.float32),
        "timeouts": np.concatenate(truncs).astype(np.float32),
        "lengths": np.asarray(lengths, dtype=np.int64),
    }


def eval_env_id(dataset) -> str | None:
    spec = dataset.storage.metadata.get("eval_env_spec")
    if isinstance(spec, str):
        try:
            return json.loads(spec)["id"]
        except (ValueError, KeyError, TypeError):
            pass
    return dataset.env_spec.id if dataset.env_spec is not None else None


def reference_scores(dataset, dataset_id: str):
    """(ref_min, ref_max, where they come from): the dataset's own, else D4RL's constants for
    Minari's mujoco/<task> datasets, else none."""
    meta = dataset.storage.metadata
    if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
        return float(meta["ref_min_score"]), float(meta["ref_max_score"]), "dataset"
    parts = dataset_id.split("/")
    if len(parts) == 3 and parts[0] == "mujoco" and parts[1] in D4RL_REF_SCORES:
        lo, hi = D4RL_REF_SCORES[parts[1]]
        return lo, hi, "D4RL constants (v2 envs)"
    return None, None, "none"
