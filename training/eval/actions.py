"""Ground-truth action targets of held-out frame pairs, for the probes and the action scatter plot.

    targets = action_targets(pairs, encoded, "window_mean")   # (N, A) float64, or None without actions
    names = action_names(pairs, targets.shape[1])             # from LeRobot's features, else action_0, ...

`"window_mean"` is the mean of a_t .. a_{t'-1} (t' the pair's second frame): the actions whose effect the two
frames show; `"current"` is a_t. Actions come from the source's parquet columns (`source.episode_actions`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .encoding import EncodedPairs

ACTION_TARGETS = ("window_mean", "current")


def window_mean_actions(
    episode_actions: np.ndarray, frame_index: np.ndarray, target_frame_index: np.ndarray
) -> np.ndarray:
    """Mean of the actions a_t .. a_{t'-1} of one episode for pairs (t, t'): the actions the pair's frames show.

    Args:
        episode_actions: (T, A) the episode's actions, a_t taken at frame t.
        frame_index: (N,) t of each pair; target_frame_index: (N,) t' >= t of each pair.
    Returns:
        (N, A) float64; a pair with t' == t (the clamped last pair of an episode) gets a_t.
    """
    actions = np.asarray(episode_actions, dtype=np.float64)
    start = np.asarray(frame_index, dtype=np.int64)
    stop = np.maximum(np.asarray(target_frame_index, dtype=np.int64), start + 1)
    if len(start) and (start.min() < 0 or stop.max() > len(actions)):
        raise ValueError(f"pair frames [{start.min()}, {stop.max()}) fall outside the episode's {len(actions)} actions")
    # Prefix sums: the mean of any window in O(1).
    cumulative = np.concatenate([np.zeros((1, actions.shape[1])), np.cumsum(actions, axis=0)])
    return (cumulative[stop] - cumulative[start]) / (stop - start)[:, None]


def _unwrap_pair_dataset(pairs):
    """The dataset under (nested) `torch.utils.data.Subset`s; frame-pair items keep their episode and frame indices."""
    while isinstance(pairs, torch.utils.data.Subset):
        pairs = pairs.dataset
    return pairs


def action_names(pairs, num_dims: int) -> list[str]:
    """Names of the action dimensions from the source's features (LeRobot `features["action"]["names"]`), else
    action_0, action_1, ..."""
    source = getattr(_unwrap_pair_dataset(pairs), "source", None)
    features = getattr(getattr(source, "meta", None), "features", None) or {}
    names = (features.get("action") or {}).get("names")
    if isinstance(names, dict) and len(names) == 1:  # some LeRobot datasets: {"motors": [...]}
        names = next(iter(names.values()))
    if isinstance(names, (list, tuple)) and len(names) == num_dims and all(isinstance(n, str) for n in names):
        return list(names)
    return [f"action_{i}" for i in range(num_dims)]


def default_position_dims(names: Sequence[str]) -> list[int]:
    """The first three action dimensions (end-effector x, y, z in Meta-World and most delta-pose action spaces),
    minus any whose name mentions a gripper."""
    return [i for i, name in enumerate(names[:3]) if "grip" not in name.lower()]


def action_targets(pairs, encoded: EncodedPairs, action_target: str) -> np.ndarray | None:
    """The probe target of each encoded pair, (N, A) float64, or None when the pairs carry no actions."""
    if encoded.action_at_t is None:
        return None
    if action_target == "current":
        return encoded.action_at_t.astype(np.float64)
    source = getattr(_unwrap_pair_dataset(pairs), "source", None)
    if source is None or not hasattr(source, "episode_actions"):
        raise ValueError(
            f"action_target='window_mean' needs the actions of the frames after t, read from the pair dataset's "
            f"source (`pairs.source.episode_actions(episode)`, as FramePairDataset has); {type(pairs).__name__} has "
            f"no such source. Pass a FramePairDataset (or a Subset of one), or use action_target='current'."
        )
    if (encoded.target_frame_index < 0).any():
        raise ValueError("action_target='window_mean' needs `target_frame_index` in the items (FramePairDataset's)")
    targets = np.empty(encoded.action_at_t.shape, dtype=np.float64)
    for episode in np.unique(encoded.episode_index):
        rows = np.flatnonzero(encoded.episode_index == episode)
        actions = source.episode_actions(int(episode))
        if actions is None:
            raise ValueError(f"episode {episode}: the items carry actions but the source returns none")
        targets[rows] = window_mean_actions(
            actions.reshape(len(actions), -1), encoded.frame_index[rows], encoded.target_frame_index[rows]
        )
    return targets


__all__ = ["ACTION_TARGETS", "action_names", "action_targets", "default_position_dims", "window_mean_actions"]
