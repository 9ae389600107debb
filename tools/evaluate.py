"""Evaluate a saved policy: the model.pt a run writes with --save-model, on its dataset's eval env.

    python tools/evaluate.py runs/<run>/model.pt                   # the run's final evaluation, again
    python tools/evaluate.py runs/<run>/model.pt --episodes 10 --seed 1 --capture-video --device cpu

The policy is rebuilt from the file alone: its `algorithm` names the file in algorithms/ whose
`make_policy` builds the networks that the file's own `act` reads, and the file holds their weights,
the run's args, the observation statistics and the action bounds. The dataset (`--env` of the run,
on this machine) gives the eval env, its reference scores and its observation keys. With the run's
seed and episode count, the defaults, and the kind of device it trained on, the numbers are those
of the run's final evaluation (results.json's final_return and final_normalized_score). The file
loads on any device; another one, or another episode count (the policy's batch), rounds the
policy's outputs a little differently, which can change where an episode ends. With
--capture-video the first episode is recorded as an MP4, as a run's are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Annotated, Optional

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from common import UserError, install_user_error_hook, normalized_score  # noqa: E402


@dataclass
class Args:
    """Evaluate the policy in a model.pt on its dataset's eval env (by default: the run's final evaluation)."""

    model: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="MODEL.PT")]
    """a model.pt written by a run with --save-model"""
    episodes: Optional[int] = None
    """episodes, run at once in a vector env (default: those of the run's last evaluation)"""
    seed: Optional[int] = None
    """seed of the evaluation envs (default: the run's --seed)"""
    device: str = "cpu"
    """torch device of the policy: cpu, auto (cuda if available), cuda, cuda:1, ..."""
    capture_video: bool = False
    """record the first episode to <video-dir>/seed_<seed>.mp4"""
    video_dir: Optional[str] = None
    """where --capture-video writes (default: videos/ next to the model file)"""


def algorithm_files() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "algorithms")) if f.endswith(".py"))


def read_model(path: str) -> dict:
    """The contents of a model.pt (common.load_file: loaded as weights only, tensors and plain python
    values, and checked against its checksum)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist" if not os.path.exists(path) else f"{path} is not a file")
    saved = common.load_file(path)  # a file that is damaged or not the library's: one line
    needed = ("algorithm", "args", "obs_dim", "act_dim", "action_low", "action_high")
    if not isinstance(saved, dict) or not set(needed) <= set(saved) or not isinstance(saved["args"], dict):
        raise UserError(f"{path} is not a model.pt written by a run with --save-model (it needs "
                        f"{', '.join(needed)}, args as a dict)")
    if saved["algorithm"] not in algorithm_files():
        raise UserError(f"{path} was written by the algorithm '{saved['algorithm']}', which is not a file in "
                        f"algorithms/ ({', '.join(algorithm_files())})")
    return saved


def load_algorithm(name: str):
    """Import algorithms/<name>.py as a module (the files are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "algorithms", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def rebuild(saved: dict, device: torch.device) -> tuple[object, common.Policy]:
    """The run's args (as the file's Args; flags the file has gained since take their defaults) and
    the policy, with its weights, on `device`."""
    module = load_algorithm(saved["algorithm"])
    file = f"algorithms/{saved['algorithm']}.py"
    fields = {f.name for f in dataclasses.fields(module.Args)}
    try:  # a flag the file requires that the run's file did not have, a value of another type, ...
        args = module.Args(**{k: v for k, v in saved["args"].items() if k in fields})
        policy = module.make_policy(args, saved["obs_dim"], saved["act_dim"])
    except Exception as exc:
        raise UserError(f"the run's args in the model file do not fit {file}'s Args and make_policy "
                        f"({type(exc).__name__}: {one_line(exc)}); evaluate it with the version of {file} "
                        f"that wrote it") from None
    try:
        policy.load(saved)
    except Exception as exc:
        raise UserError(f"the networks in the model file do not fit {file}'s make_policy "
                        f"({type(exc).__name__}: {one_line(exc)})") from None
    return args, policy.to(device).eval()


def one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


@contextlib.contextmanager
def quiet_viewer_cleanup():
    """A MuJoCo viewer that failed to start complains again, as a traceback ("Exception ignored in
    OffScreenViewer.__del__"), when it is freed: after the one line common.evaluate says, nothing more."""
    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = hook


def evaluate_model(path: str, episodes: int | None = None, seed: int | None = None, device: str = "cpu",
                   video_dir: str | None = None) -> dict:
    """Evaluate the policy in `path` (common.evaluate) and return the evaluation with its
    `algorithm`, `env`, `episodes`, `seed` and `episode_scores` (each episode's normalised score,
    None without references), and with `video_dir`, the `video` of its first episode,
    <video_dir>/seed_<seed>.mp4 (where the eval env renders)."""
    saved = read_model(path)
    device = common.resolve_device(device)
    args, policy = rebuild(saved, device)
    if args.precision == "tf32":  # the run evaluated with TF32 on, as it trained (common.autocast)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if episodes is None:  # as the run's final evaluation
        episodes = getattr(args, "final_episodes", None) or args.eval_episodes
        if not isinstance(episodes, int) or episodes < 1:
            raise UserError(f"{path}: its run's args ask for {episodes} evaluation episodes; pass --episodes N")
    seed = args.seed if seed is None else seed
    common.seed_everything(seed)
    data = common.load_dataset(args.env, device)
    data.action_low = np.asarray(saved["action_low"], dtype=np.float32)  # the bounds the policy was trained in
    data.action_high = np.asarray(saved["action_high"], dtype=np.float32)
    if data.obs_dim != saved["obs_dim"] or data.act_dim != saved["act_dim"]:
        raise UserError(f"{path} has observations of {saved['obs_dim']} and actions of {saved['act_dim']} "
                        f"dimensions, the dataset {args.env} here {data.obs_dim} and {data.act_dim}")
    video = None if video_dir is None else os.path.join(video_dir, f"seed_{seed}.mp4")
    obs_mean, obs_std = (None if saved.get(k) is None else torch.as_tensor(saved[k], dtype=torch.float32, device=device)
                         for k in ("obs_mean", "obs_std"))
    for k, v in (("obs_mean", obs_mean), ("obs_std", obs_std)):
        if v is not None and tuple(v.shape) != (data.obs_dim,):
            raise UserError(f"{path}: its {k} has shape {tuple(v.shape)}, not ({data.obs_dim},): the file's state "
                            f"statistics do not fit its dataset")
    with contextlib.nullcontext() if video is None else quiet_viewer_cleanup():
        evaluation = common.evaluate(data, policy, episodes, seed, obs_mean, obs_std, video)
    if video is not None and os.path.exists(video):
        evaluation["video"] = video
    elif video is not None:  # common.evaluate said why in one line, and wrote nothing
        print("--capture-video: the eval env did not render here; evaluated without video (MUJOCO_GL=egl or "
              "osmesa renders MuJoCo without a display)", flush=True)
    scores = normalized_score(evaluation["episode_returns"], data.ref_min_score, data.ref_max_score)
    evaluation["episode_scores"] = None if scores is None else scores.tolist()
    return {"algorithm": saved["algorithm"], "env": args.env, "episodes": episodes, "seed": seed, **evaluation}


def main(flags: Args) -> None:
    common.check_positive(flags, "episodes")
    common.check_seed(flags, "seed")
    video_dir = None
    if flags.capture_video:
        video_dir = flags.video_dir or os.path.join(os.path.dirname(os.path.abspath(flags.model)), "videos")
        common.check_output_dir(video_dir, "--video-dir")
    result = evaluate_model(flags.model, flags.episodes, flags.seed, flags.device, video_dir)
    score = result["normalized_score_mean"]
    episodes = f"{result['episodes']} episode{'s' if result['episodes'] > 1 else ''}"
    print(f"{result['algorithm']} on {result['env']}, {episodes} from seed {result['seed']}: "
          f"return {result['return_mean']:.2f} ± {result['return_std']:.2f}"
          + ("" if score is None else f", normalised score {score:.2f} ± {result['normalized_score_std']:.2f}"))
    # episode i starts from reset(seed=seed + i): the same --episodes with --seed <seed + i> --capture-video records it
    each, what = ((result["episode_scores"], "normalised score") if score is not None
                  else (result["episode_returns"], "return"))
    print(f"{what} (steps) of each episode, seeds {result['seed']} to {result['seed'] + result['episodes'] - 1}: "
          + " ".join(f"{v:.1f} ({n})" for v, n in zip(each, result["episode_lengths"])))
    if "video" in result:
        print(f"video of the first episode: {result['video']}")


if __name__ == "__main__":
    install_user_error_hook()
    main(tyro.cli(Args))
