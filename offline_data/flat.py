"""The flat arrays of a dataset: their cache beside a Minari dataset, and their checks.

The arrays are `observations` (the T+1 rows of each episode one after the other), `actions`,
`rewards`, `terminals`, `timeouts` (one row per transition) and `lengths` (one per episode).
"""

from __future__ import annotations

import io
import os

import numpy as np

from offline_data.errors import UserError, atomic_write_bytes

# Reading a Minari HDF5 file costs ~1 ms per episode (h5py's per-dataset overhead), a minute for a
# random-policy dataset of 50k short episodes. The flat arrays are therefore cached once beside the
# dataset, keyed by the names, sizes and mtimes of its data files, and later loads take seconds.
CACHE_NAME = "flat_transitions_v1.npz"
KEYS = ("observations", "actions", "rewards", "terminals", "timeouts", "lengths")


def _cache_key(dataset) -> str:
    data_dir = dataset.storage.data_path  # the folder of the data files, whatever the format
    entries = []
    for root, _, files in os.walk(data_dir):
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            entries.append(f"{os.path.relpath(os.path.join(root, name), data_dir)}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(sorted(entries))


def cache_path(dataset) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(dataset.storage.data_path)), CACHE_NAME)


def read_cache(dataset, obs_dim: int) -> dict | None:
    """The cached arrays, or None when there is no cache; a stale or damaged one is only a cache
    miss, with a notice (it is then written again)."""
    path = cache_path(dataset)
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as f:
            if str(f["key"]) != _cache_key(dataset):
                print(f"the flat-array cache {path} is stale (the dataset's files changed); rebuilding it",
                      flush=True)
                return None
            arrays = {k: f[k] for k in KEYS}
        n, episodes, act_dim = int(arrays["lengths"].sum()), len(arrays["lengths"]), dataset.action_space.shape[0]
        expected = {"observations": (n + episodes, obs_dim), "actions": (n, act_dim), "rewards": (n,),
                    "terminals": (n,), "timeouts": (n,)}
        for name, shape in expected.items():
            if arrays[name].shape != shape:
                raise ValueError(f"{name} have shape {arrays[name].shape}, not {shape}")
        return arrays
    except Exception as exc:  # zipfile's, numpy's and the checks' errors: whatever it is, rebuild it
        reason = (str(exc).strip().splitlines() or [""])[0][:120]
        print(f"the flat-array cache {path} is damaged ({type(exc).__name__}: {reason}); rebuilding it", flush=True)
        return None


def write_cache(dataset, arrays: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(_cache_key(dataset)), **arrays)
    try:
        atomic_write_bytes(cache_path(dataset), buffer.getvalue())
    except UserError as exc:  # e.g. a read-only dataset folder: no cache, every load reads the episodes
        print(f"{exc}; the dataset's episodes will be read again on every load", flush=True)


# Actions beyond the Box by float rounding are clipped silently; beyond this fraction of the Box's
# half-width they are the data's, and clipping them changes the data, so it is said.
ACTION_BOUNDS_TOLERANCE = 1e-3


def _locate(row: int, lengths: np.ndarray, extra: int) -> str:
    """Which episode and step a row of the flat arrays is (observations have extra=1 row per episode)."""
    ends = np.cumsum(lengths + extra)
    episode = int(np.searchsorted(ends, row, side="right"))
    return f"episode {episode}, step {row - (ends[episode] - lengths[episode] - extra)}"


def check_arrays(arrays: dict, dataset_id: str, low: np.ndarray, high: np.ndarray) -> dict:
    """The checks of the flat arrays, whatever their source, each with one line: values that are
    not finite are refused (they would only give NaN losses); episodes of length zero are dropped
    (they hold no transition and would break the per-episode sums); actions beyond the action
    space's bounds are clipped to them (a tanh policy cannot produce them)."""
    lengths = arrays["lengths"]
    bad = []
    for name, extra in (("observations", 1), ("actions", 0), ("rewards", 0)):
        finite = np.isfinite(arrays[name])
        if not finite.all():
            rows = finite.reshape(len(finite), -1).all(1)
            first = _locate(int(np.argmin(rows)), lengths, extra)
            bad.append(f"{finite.size - int(finite.sum())} in {name} (first at {first})")
    if bad:
        raise UserError(f"dataset '{dataset_id}' holds values that are not finite (NaN or inf): "
                        f"{'; '.join(bad)}. Training on them gives NaN losses: repair or drop those episodes.")
    if (lengths == 0).any():
        empty = np.flatnonzero(lengths == 0)
        obs_rows = np.ones(len(arrays["observations"]), dtype=bool)
        obs_rows[(np.cumsum(lengths + 1) - 1)[empty]] = False  # an empty episode's one observation
        arrays = {**arrays, "observations": arrays["observations"][obs_rows], "lengths": lengths[lengths > 0]}
        shown = ", ".join(str(e) for e in empty[:5]) + (", ..." if len(empty) > 5 else "")
        print(f"dataset '{dataset_id}': dropped {len(empty)} episode(s) of length zero (episode {shown}), which "
              f"hold no transitions", flush=True)
    if not len(arrays["lengths"]):
        raise UserError(f"dataset '{dataset_id}' contains no transitions.")
    if np.any(high <= low):
        raise UserError(f"dataset '{dataset_id}' has an action space with no width in some dimension "
                        f"(low {low}, high {high}); actions cannot be rescaled to [-1, 1].")
    actions = arrays["actions"]
    excess = np.maximum(actions - high, low - actions)  # > 0 outside the bounds, in the dataset's units
    outside = (excess > ACTION_BOUNDS_TOLERANCE * (high - low) / 2).any(1)
    if outside.any():
        print(f"dataset '{dataset_id}': {int(outside.sum())} of {len(actions)} actions lie outside the action "
              f"space's bounds, by up to {float(excess.max()):.3g} (first at "
              f"{_locate(int(np.argmax(outside)), lengths, 0)}); they are clipped to the bounds", flush=True)
    return arrays
