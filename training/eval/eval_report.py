"""The closed-loop evaluation's outputs: `eval_info.json` in LeRobot's multi-task layout, MP4 videos of the first
episodes of each task, and a bar chart of the success rate per task.

`eval_info.json` has LeRobot's keys (`lerobot-eval`'s multi-task output) so that tools reading those read ours:

    per_task:  [{task_group, task_id, task, metrics: {sum_rewards, max_rewards, successes, video_paths}}, ...]
    per_group: {group: {avg_sum_reward, avg_max_reward, pc_success, n_episodes, video_paths}}
    overall:   {avg_sum_reward, avg_max_reward, pc_success, n_episodes, eval_s, eval_ep_s, video_paths}

and adds what a success rate needs to be read: 95% Wilson intervals in percent (`pc_success_ci95: [lo, hi]`) per
task, group and overall, each episode's initial-state seed and control steps (`metrics.seeds`, `metrics.steps`),
and at the top level the policy, the settings and the package versions. A task's `metrics` may take further
per-episode lists, e.g. LeRobot's `predicted_video_paths` for a world model's imagined rollouts.
"""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

import numpy as np

from .intervals import wilson_interval

#: Packages whose versions an evaluation records (the simulator's and the model's).
RECORDED_PACKAGES = ("lapa-toolkit", "metaworld", "mujoco", "gymnasium", "numpy", "torch", "transformers")


def package_versions() -> dict[str, str | None]:
    """{package: installed version or None}, plus Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _percent_interval(successes: int, n: int) -> list[float]:
    low, high = wilson_interval(successes, n)
    return [100.0 * low, 100.0 * high]


def _aggregate(episodes: list, video_paths: list[str]) -> dict:
    """LeRobot's aggregate keys (plus the Wilson interval) over a list of `EpisodeResult`."""
    successes = sum(ep.success for ep in episodes)
    return {
        "avg_sum_reward": float(np.mean([ep.sum_reward for ep in episodes])),
        "avg_max_reward": float(np.mean([ep.max_reward for ep in episodes])),
        "pc_success": 100.0 * successes / len(episodes),
        "pc_success_ci95": _percent_interval(successes, len(episodes)),
        "n_episodes": len(episodes),
        "video_paths": list(video_paths),
    }


def build_eval_info(result, *, task_group: str, video_paths: dict[str, list[str]] | None = None,
                    extra: dict | None = None) -> dict:
    """`eval_info.json`'s content for a `ClosedLoopResult` (see the module docstring). `video_paths`: {task: paths
    of its videos, in episode order}; `extra`: top-level keys added as they are (policy, config, ...)."""
    video_paths = video_paths or {}
    per_task, everything, all_videos = [], [], []
    for task_id, task in enumerate(result.tasks):
        episodes = result.episodes[task]
        videos = list(video_paths.get(task, []))
        successes = sum(ep.success for ep in episodes)
        per_task.append({
            "task_group": task_group,
            "task_id": task_id,
            "task": task,
            "metrics": {
                "sum_rewards": [ep.sum_reward for ep in episodes],
                "max_rewards": [ep.max_reward for ep in episodes],
                "successes": [bool(ep.success) for ep in episodes],
                "video_paths": videos,
                "seeds": [ep.seed for ep in episodes],
                "steps": [ep.steps for ep in episodes],
            },
            "pc_success": 100.0 * successes / len(episodes),
            "pc_success_ci95": _percent_interval(successes, len(episodes)),
            "n_episodes": len(episodes),
        })
        everything += episodes
        all_videos += videos
    overall = _aggregate(everything, all_videos)
    overall["eval_s"] = result.eval_s
    overall["eval_ep_s"] = result.eval_s / len(everything)
    overall["policy_s"] = result.policy_s  # not LeRobot's: the policy's share of eval_s (the rest: the simulator)
    return {
        "per_task": per_task,
        "per_group": {task_group: _aggregate(everything, all_videos)},
        "overall": overall,
        **(extra or {}),
        "versions": package_versions(),
    }


def write_videos(result, folder: str | Path, fps: int) -> dict[str, list[str]]:
    """MP4s (H.264) of the episodes that kept their frames: `<folder>/<task>/episode_<k>.mp4`; {task: paths}."""
    from training.data import encode_video

    paths: dict[str, list[str]] = {}
    for task in result.tasks:
        for episode in result.episodes[task]:
            if episode.frames is None:
                continue
            path = Path(folder) / task / f"episode_{episode.index}.mp4"
            encode_video(path, episode.frames, fps=fps)
            paths.setdefault(task, []).append(str(path))
    return paths


def plot_success_per_task(eval_info: dict, path: str | Path, title: str = "") -> Path:
    """A bar chart of the success rate (%) per task with its 95% Wilson interval, and the overall rate as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [entry["task"] for entry in eval_info["per_task"]]
    rates = np.array([entry["pc_success"] for entry in eval_info["per_task"]])
    intervals = np.array([entry["pc_success_ci95"] for entry in eval_info["per_task"]])
    errors = np.stack([rates - intervals[:, 0], intervals[:, 1] - rates]).clip(min=0)
    overall = eval_info["overall"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(tasks) + 2), 4))
    # yerr as nested lists: matplotlib 3.10 probes the first element of a (2, n) array with math.isfinite, a NumPy 1.25+
    # deprecation (an array of ndim > 0 taken as a scalar) that fails the test run at the oldest supported releases.
    ax.bar(range(len(tasks)), rates, yerr=errors.tolist(), capsize=3, color="tab:blue", ecolor="black")
    low, high = overall["pc_success_ci95"]
    ax.axhline(overall["pc_success"], color="tab:red", linestyle="--",
               label=f"overall {overall['pc_success']:.1f}% (95% CI {low:.1f}-{high:.1f}, n={overall['n_episodes']})")
    ax.set_xticks(range(len(tasks)), [task.removesuffix("-v3") for task in tasks], rotation=45, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("success (%)")
    ax.set_title(title or "closed-loop success per task (95% Wilson intervals)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["build_eval_info", "package_versions", "plot_success_per_task", "write_videos"]
