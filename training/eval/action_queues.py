"""Executing action chunks in the closed loop: per-environment queues between policy calls.

A chunking policy (a VLA with `config.action_chunk_size` k > 1) predicts the next k actions of an environment in one
call. `ActionQueues` decides, step by step and for each environment slot separately, whether the policy must be
asked again and which action the environment executes now. Two ways, as in ACT (Zhao et al. 2023, "Learning
Fine-Grained Bimanual Manipulation with Low-Cost Hardware") and LeRobot's ACT policy:

* **Open loop** (`n_action_steps` = n <= k, default k): the first n actions of a chunk run one per step without
  asking the policy; it is asked again when they are used up (re-planning every n steps). n = k = 1 is the ordinary
  one-call-per-step loop.
* **Temporal ensembling** (`temporal_ensemble=True`): the policy is asked at every step, and the action executed at
  step t averages every prediction made for step t by the chunks of steps t-k+1 ... t:

      a_t = sum_i w_i * A_{t_i}[t - t_i] / sum_i w_i,    w_i = exp(-m * i),

  where i = 0, 1, ... numbers those chunks from the oldest (t_0, the earliest step whose chunk still reaches t) to
  the newest (issued at t), and m = `ensemble_coefficient` (0.01, ACT's default). The oldest prediction weighs
  most, and with m = 0.01 the weights are nearly equal: the average smooths the jumps between chunks (the oscillating
  gripper of single-step policies), while every step still sees a fresh observation.

Each slot's state is its own: a slot whose episode ends and takes a new one is `reset`, so no action of the previous
episode ever runs in the next one, and the results do not depend on how many environments run together.
"""

from __future__ import annotations

from collections import deque

import numpy as np

#: ACT's default temporal-ensemble coefficient m (weights exp(-m * i), i = 0 for the oldest prediction).
DEFAULT_ENSEMBLE_COEFFICIENT = 0.01


def check_chunk_execution(chunk_size: int, n_action_steps: int | None, temporal_ensemble: bool) -> int:
    """n_action_steps resolved against the policy's chunk size k (None -> k); ValueError when it cannot run."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"the policy's action_chunk_size must be an integer >= 1, got {chunk_size!r}")
    if temporal_ensemble:
        if n_action_steps not in (None, 1):
            raise ValueError(f"temporal ensembling asks the policy at every step: n_action_steps must be 1 or unset, "
                             f"got {n_action_steps}")
        return 1
    if n_action_steps is None:
        return int(chunk_size)
    if isinstance(n_action_steps, bool) or not isinstance(n_action_steps, (int, np.integer)) or n_action_steps < 1:
        raise ValueError(f"n_action_steps must be an integer >= 1, got {n_action_steps!r}")
    if n_action_steps > chunk_size:
        raise ValueError(f"n_action_steps={n_action_steps} exceeds the policy's action_chunk_size={chunk_size}: it "
                         f"predicts only {chunk_size} action(s) per call")
    return int(n_action_steps)


class ActionQueues:
    """The actions waiting in each environment slot (see the module docstring).

    Args:
        chunk_size: k, actions per policy call.
        n_action_steps: actions of each chunk executed before asking again (open loop; default k).
        temporal_ensemble: ask at every step and average the overlapping predictions (ACT).
        ensemble_coefficient: m of the weights exp(-m * i).
    """

    def __init__(self, chunk_size: int, n_action_steps: int | None = None, temporal_ensemble: bool = False,
                 ensemble_coefficient: float = DEFAULT_ENSEMBLE_COEFFICIENT):
        self.chunk_size = int(chunk_size)
        self.n_action_steps = check_chunk_execution(chunk_size, n_action_steps, temporal_ensemble)
        self.temporal_ensemble = bool(temporal_ensemble)
        if not np.isfinite(ensemble_coefficient):
            raise ValueError(f"ensemble_coefficient must be finite, got {ensemble_coefficient!r}")
        self.ensemble_coefficient = float(ensemble_coefficient)
        # open loop: slot -> deque of actions (D,); ensemble: slot -> deque of [chunk (k, D), age], oldest first
        self._queues: dict[int, deque] = {}

    def reset(self, slot: int) -> None:
        """Forget the slot's actions (its episode ended; the next one starts from a fresh policy call)."""
        self._queues.pop(slot, None)

    def needs_policy(self, slot: int) -> bool:
        """Whether the slot needs a new chunk before it can act this step."""
        return self.temporal_ensemble or not self._queues.get(slot)

    def add(self, slot: int, chunk: np.ndarray) -> None:
        """A new chunk (k, D) predicted for the slot at this step."""
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim != 2 or chunk.shape[0] != self.chunk_size:
            raise ValueError(f"expected a chunk of shape ({self.chunk_size}, D), got {chunk.shape}")
        queue = self._queues.setdefault(slot, deque())
        if self.temporal_ensemble:
            queue.append([chunk, 0])
        else:
            queue.extend(chunk[:self.n_action_steps])

    def pop(self, slot: int) -> np.ndarray:
        """The action (D,) the slot executes now; advances its queue by one step."""
        queue = self._queues.get(slot)
        if not queue:
            raise RuntimeError(f"slot {slot} has no action queued: ask the policy first (needs_policy)")
        if not self.temporal_ensemble:
            return queue.popleft()
        predictions = np.stack([chunk[age] for chunk, age in queue])  # oldest first
        weights = np.exp(-self.ensemble_coefficient * np.arange(len(predictions)))
        action = (weights[:, None] * predictions).sum(0) / weights.sum()
        for entry in queue:
            entry[1] += 1
        while queue and queue[0][1] >= self.chunk_size:  # a chunk that reaches no later step
            queue.popleft()
        return action.astype(np.float32)


__all__ = ["ActionQueues", "DEFAULT_ENSEMBLE_COEFFICIENT", "check_chunk_execution"]
