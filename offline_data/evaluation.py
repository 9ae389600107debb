"""`evaluate(data, policy, n_episodes, seed)`: a policy's returns and normalised score in the
dataset's evaluation env, all episodes at once in a vector env; with a video path, the first
episode is also recorded as an MP4 (`Recording`)."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
from typing import Callable

import numpy as np
import torch

from offline_data.dataset import OfflineData
from offline_data.tasks import flatten_obs, goal_obs_keys


def normalized_score(returns: np.ndarray, ref_min: float | None, ref_max: float | None):
    if ref_min is None or ref_max is None:
        return None
    return 100.0 * (np.asarray(returns, dtype=np.float64) - ref_min) / (ref_max - ref_min)


@torch.no_grad()
def evaluate(data: OfflineData, policy: Callable[[torch.Tensor], torch.Tensor], n_episodes: int, seed: int,
             obs_mean: torch.Tensor | None = None, obs_std: torch.Tensor | None = None,
             video: str | None = None) -> dict:
    """Run `n_episodes` at once in a vector env of the dataset's eval env, one batched policy call
    per step; episode i starts from reset(seed=seed + i), as Gymnasium seeds a vector env. `policy`
    maps (normalised) observations to actions in [-1, 1]. A policy that samples (ARQ's implicit one)
    draws from torch's CPU random stream, which is seeded with `seed` here and given back to the run
    as it was, so that an evaluation depends on the weights and the seed alone. With `video` (a
    path), the first episode is also rendered, one frame per step, and written there as an MP4
    (`Recording`); this changes neither the episodes nor the returns. Returns raw return mean/std,
    the normalised score (None without references), and each episode's return and length (steps),
    in episode order: the mean hides an episode that fails among good ones."""
    import gymnasium as gym

    dataset = data.minari_dataset
    keys = goal_obs_keys(dataset, data.dataset_id)
    make_env = [lambda: dataset.recover_environment(eval_env=True)] * n_episodes
    if video is not None:  # only the recorded env renders: the others step as they do without video
        choose_render_backend()
        make_env[0] = lambda: dataset.recover_environment(eval_env=True, render_mode="rgb_array")
    envs = gym.vector.SyncVectorEnv(make_env)
    recording = Recording(video, envs.envs[0]) if video is not None else None
    device = data.observations.device
    low, high = data.action_low, data.action_high
    returns = np.zeros(n_episodes)
    lengths = np.zeros(n_episodes, dtype=np.int64)
    done = np.zeros(n_episodes, dtype=bool)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            obs, _ = envs.reset(seed=seed)
            while not done.all():
                o = torch.as_tensor(flatten_obs(obs, keys), device=device)
                if obs_mean is not None:
                    o = (o - obs_mean) / obs_std
                a = policy(o).clamp(-1.0, 1.0).cpu().numpy()
                obs, reward, terminated, truncated, _ = envs.step(low + (a + 1.0) * 0.5 * (high - low))
                if recording is not None and not done[0]:
                    recording.capture()  # the state this step led to
                returns += np.where(done, 0.0, reward)
                lengths += ~done
                done |= terminated | truncated
    except BaseException:
        if recording is not None:
            recording.discard()
        raise
    if recording is not None:
        recording.close()
    envs.close()
    scores = normalized_score(returns, data.ref_min_score, data.ref_max_score)
    return {
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "normalized_score_mean": None if scores is None else float(scores.mean()),
        "normalized_score_std": None if scores is None else float(scores.std()),
        "episode_returns": [float(r) for r in returns],
        "episode_lengths": [int(n) for n in lengths],
    }


# ----------------------------------------------------------------------------------------------
# Videos of evaluation episodes (--capture-video)
# ----------------------------------------------------------------------------------------------
def choose_render_backend() -> None:
    """On Linux, where the user has set no MUJOCO_GL, have MuJoCo render headless with EGL (without a
    display, on a GPU or through Mesa on a CPU); a user's setting is kept. Read when an env first
    renders, so it can come after MuJoCo is imported."""
    if sys.platform.startswith("linux") and "MUJOCO_GL" not in os.environ:
        os.environ["MUJOCO_GL"] = "egl"


def render_problem(data: OfflineData) -> str | None:
    """Why the dataset's eval env cannot render frames on this machine, in one line (None: it can),
    found by rendering one frame with the backend `choose_render_backend` leaves."""
    choose_render_backend()
    problem = None
    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None  # a viewer that failed to start
    try:                                                                    # complains again as it is freed
        env = data.minari_dataset.recover_environment(eval_env=True, render_mode="rgb_array")
        try:
            env.reset(seed=0)
            frame = env.render()
            if not (isinstance(frame, np.ndarray) and frame.ndim == 3):
                problem = f"render() gave {type(frame).__name__}, not an RGB image"
        finally:
            env.close()
    except Exception as exc:
        problem = _one_line(exc)
    finally:
        gc.collect()
        sys.unraisablehook = hook
    return problem


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


class Recording:
    """The frames of one env's episode, rendered one at a time and streamed to `path` as an H.264 MP4
    (yuv420p, so an odd height or width loses its last row or column) by imageio's ffmpeg plugin,
    whose wheel brings ffmpeg, at the env's render_fps. It is written to a temporary file renamed
    into place once whole. A frame that fails to render or write ends the recording with one line;
    the episode goes on."""

    def __init__(self, path: str, env):
        self.path, self.env = path, env
        self.writer, self.tmp = None, None

    def capture(self) -> None:
        if self.env is None:
            return
        try:
            frame = self.env.render()
            height, width = frame.shape[0] // 2 * 2, frame.shape[1] // 2 * 2
            if self.writer is None:
                import imageio.v2 as imageio

                folder = os.path.dirname(os.path.abspath(self.path))
                os.makedirs(folder, exist_ok=True)
                fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".mp4")
                os.close(fd)
                self.writer = imageio.get_writer(self.tmp, format="FFMPEG", mode="I", codec="libx264",
                                                 fps=self.env.metadata.get("render_fps") or 30, macro_block_size=2)
            self.writer.append_data(np.ascontiguousarray(frame[:height, :width]))
        except Exception as exc:
            print(f"no video {self.path}: {_one_line(exc)}", flush=True)
            self.discard()

    def close(self) -> bool:
        """Finish the file; True if it was written."""
        if self.writer is None:
            return False
        try:
            self.writer.close()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)  # as atomic_write_bytes: results are meant to be shared
            os.replace(self.tmp, self.path)
        except Exception as exc:
            print(f"no video {self.path}: {_one_line(exc)}", flush=True)
            self.discard()
            return False
        self.writer = self.env = None
        return True

    def discard(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        if self.tmp is not None and os.path.exists(self.tmp):
            os.remove(self.tmp)
        self.writer = self.env = None
