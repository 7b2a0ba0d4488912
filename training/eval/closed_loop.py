"""Closed-loop evaluation in Meta-World: a policy acts in the simulator, episode after episode, batch after batch.

    policy = load_policy("expert")                           # or "zero", or a finetuned VLA folder / Hub id
    result = run_closed_loop(policy, ["reach-v3", "drawer-close-v3"], episodes_per_task=10)
    result.success_rate("reach-v3"), result.first_episode_frames["reach-v3"]

* **Policies.** Anything with `act(images, observations, instructions, tasks) -> (B, 4) float32` and a
  `needs_images` flag: `VLAPolicy` (a `LAPAForActionPrediction` folder with its processor: one `predict_action` per
  control step on the whole batch), and the references `ExpertPolicy` (Meta-World's scripted expert, reads the
  state) and `ZeroPolicy` (no motion: the floor a policy must beat).
* **Initial states.** Episode k of a task starts from the initial state of seed `EVAL_SEED_BASE + seed *
  EPISODE_SEED_STRIDE + k` (`training.envs.eval_episodes.evaluation_seeds`). The generated datasets use
  `seed * EPISODE_SEED_STRIDE + k` with run seeds below 1000 in practice, so evaluation starts from states no
  training episode used; datasets generated with `--seed 1000` or more would collide, which
  `training.eval.policy_data.check_seed_overlap` detects from the datasets' own episode records.
* **Episodes.** An episode ends at Meta-World's `info["success"]` or after `max_steps` control steps (default
  `DEFAULT_MAX_STEPS` = 200, chosen by measuring the scripted expert: see `training.envs.eval_episodes`). The
  batch stays full: a slot whose episode ends takes the next pending episode.
* **Frames.** Episodes with index < `videos_per_task` keep their frames (the image before each action and the last
  one: steps + 1 frames); `ClosedLoopResult.first_episode_frames` gives each task's first episode, for videos and for
  a world model's imagined rollout beside the real one.

* **Action chunks.** A policy with `action_chunk_size` k > 1 (a chunking VLA) also has `act_chunk(...) -> (B, k,
  4)`. Its chunks run open loop, `n_action_steps` (default k) actions per call, or with ACT's temporal ensembling
  (`temporal_ensemble=True`: a call every step, overlapping predictions averaged); per-slot queues
  (`training.eval.action_queues.ActionQueues`) keep the batch batched: each step the policy is called once, on the
  slots whose queue is empty (all slots for ensembling), and a slot that starts a new episode starts with an empty
  queue. k = 1 is the plain loop: one call per step on every slot.

The environments run in worker processes (`training.envs.sim_workers`); the policy runs here, between their steps.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco (the workers inherit it)

import time  # noqa: E402
from collections import deque  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Protocol, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from training.envs.eval_episodes import (  # noqa: E402
    DEFAULT_MAX_STEPS,
    EVAL_SEED_BASE,
    REFERENCE_POLICIES,
    evaluation_seeds,
)
from training.envs.metaworld_tasks import task_instruction  # noqa: E402
from training.envs.sim_workers import SimWorkers  # noqa: E402
from training.eval.action_queues import ActionQueues, DEFAULT_ENSEMBLE_COEFFICIENT  # noqa: E402

#: Action size of Meta-World (hand displacement x, y, z and gripper effort).
ACTION_DIM = 4


# ---------------------------------------------------------------------------------------------------- policies
class Policy(Protocol):
    """What `run_closed_loop` drives. `needs_images`: whether `act` reads the images (if not, only the episodes
    kept as videos are rendered)."""

    name: str
    needs_images: bool

    def act(self, images: np.ndarray | None, observations: np.ndarray, instructions: list[str],
            tasks: list[str]) -> np.ndarray:
        """images (B, H, W, 3) uint8 (None when `needs_images` is False), observations (B, 39) float64 (Meta-World's
        full state), one instruction and task name per row -> actions (B, 4) float32 in [-1, 1]."""
        ...


class ZeroPolicy:
    """All-zero actions: the arm holds still and the gripper relaxes (a floor for success rates)."""

    name = "zero"
    needs_images = False

    def act(self, images, observations, instructions, tasks) -> np.ndarray:
        return np.zeros((len(observations), ACTION_DIM), np.float32)


class ExpertPolicy:
    """Meta-World's scripted expert of each row's task (reads the full state; the ceiling for success rates)."""

    name = "expert"
    needs_images = False

    def __init__(self):
        self._experts: dict = {}

    def act(self, images, observations, instructions, tasks) -> np.ndarray:
        from training.envs.metaworld_env import ScriptedExpert

        actions = np.zeros((len(observations), ACTION_DIM), np.float32)
        for row, (observation, task) in enumerate(zip(observations, tasks)):
            if task not in self._experts:
                self._experts[task] = ScriptedExpert(task)
            actions[row] = self._experts[task](observation)
        return actions


def chunk_size_of(policy) -> int:
    """k, the actions one call of `policy` predicts (`act_chunk`); 1 for a policy without `action_chunk_size`."""
    return int(getattr(policy, "action_chunk_size", 1))


class VLAPolicy:
    """A finetuned `LAPAForActionPrediction` (with its processor): one `predict_action` call per control step, or
    for a chunking model (`action_chunk_size` k > 1) one `predict_action_chunk` call per chunk (`act_chunk`).

    Args:
        path: the model folder or Hub id (`from_pretrained`).
        device: torch device for the model.
        dataset: the action statistics to decode with (the processor's only dataset when None).
    """

    needs_images = True

    def __init__(self, path: str, device: str = "cpu", dataset: str | None = None):
        import processing_lapa  # noqa: F401  (registers LAPAProcessor with AutoProcessor, which loads the processor)
        from modeling_lapa import LAPAForActionPrediction

        self.name = str(path)
        self.model = LAPAForActionPrediction.from_pretrained(str(path)).to(device).eval()
        processor = self.model.processor
        if processor is None:
            raise ValueError(f"{path} holds no processor (processor_config.json): save the processor with the model")
        tokenizer = processor.action_tokenizer
        if not self.model.config.num_action_bins or tokenizer is None or not tokenizer.datasets:
            raise ValueError(f"{path} is a latent-only model (no action tokens): it predicts latent actions, not "
                             "robot actions; finetune it on actions first (training/finetune.py)")
        self.dataset = dataset if dataset in tokenizer.datasets else None
        action_dim = tokenizer.action_dim(self.dataset)
        if action_dim != ACTION_DIM:
            raise ValueError(f"{path} predicts {action_dim}-D actions; Meta-World takes {ACTION_DIM}-D actions")
        self.action_chunk_size = int(self.model.config.action_chunk_size)

    def act(self, images, observations, instructions, tasks) -> np.ndarray:
        """The next action of every row (B, 4); for a chunking model the first action of its chunk."""
        if self.action_chunk_size > 1:
            return self.act_chunk(images, observations, instructions, tasks)[:, 0]
        actions = self.model.predict_action(images, list(instructions), dataset=self.dataset)
        return np.asarray(actions, dtype=np.float32)

    def act_chunk(self, images, observations, instructions, tasks) -> np.ndarray:
        """The next k actions of every row (B, k, 4)."""
        actions = self.model.predict_action_chunk(images, list(instructions), dataset=self.dataset)
        return np.asarray(actions, dtype=np.float32)


def load_policy(policy: str, device: str = "cpu", dataset: str | None = None) -> Policy:
    """"expert", "zero", or a VLA folder / Hub id ("owner/name"); ValueError with the reason when it is none."""
    if policy in REFERENCE_POLICIES:
        return ExpertPolicy() if policy == "expert" else ZeroPolicy()
    path = Path(policy)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ValueError(f"--policy {policy}: the folder has no config.json, it is not a saved VLA model")
        import json

        model_type = json.loads(config.read_text()).get("model_type")
        if model_type != "lapa":
            raise ValueError(f"--policy {policy}: config.json is a {model_type!r} model, not a LAPA VLA ('lapa'); "
                             "a quantizer or a backbone cannot act")
    elif not _looks_like_hub_id(policy):
        raise ValueError(f"--policy {policy}: no such folder, and not {' or '.join(REFERENCE_POLICIES)} or a Hub "
                         "model id (owner/name)")
    try:
        return VLAPolicy(policy, device=device, dataset=dataset)
    except OSError as error:
        raise ValueError(f"--policy {policy}: could not load the model ({error})") from error


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not Path(parts[0]).exists()


# ---------------------------------------------------------------------------------------------------- episodes
@dataclass
class EpisodeResult:
    """One evaluation episode. `steps`: control steps taken; `frames`: (steps + 1, H, W, 3) uint8 for the episodes
    kept as videos, else None."""

    task: str
    index: int
    seed: int
    sum_reward: float
    max_reward: float
    success: bool
    steps: int
    frames: np.ndarray | None = None


@dataclass
class ClosedLoopResult:
    """Every episode of an evaluation, per task in the order given, its wall time and the policy's part of it."""

    tasks: list[str]
    episodes: dict[str, list[EpisodeResult]]
    eval_s: float
    settings: dict = field(default_factory=dict)
    policy_s: float = 0.0

    @property
    def first_episode_frames(self) -> dict[str, np.ndarray]:
        """{task: frames of its first episode} (the real rollout a world model's imagined one goes beside)."""
        return {task: eps[0].frames for task, eps in self.episodes.items() if eps and eps[0].frames is not None}

    def success_rate(self, task: str | None = None) -> float:
        episodes = self.episodes[task] if task else [ep for eps in self.episodes.values() for ep in eps]
        return sum(ep.success for ep in episodes) / len(episodes)


@dataclass
class _Running:
    """A slot's episode in progress."""

    task: str
    index: int
    seed: int
    keep_frames: bool
    observation: np.ndarray | None = None
    image: np.ndarray | None = None
    rewards: list = field(default_factory=list)
    frames: list = field(default_factory=list)
    success: bool = False

    def finish(self) -> EpisodeResult:
        rewards = np.asarray(self.rewards, dtype=np.float64)
        return EpisodeResult(self.task, self.index, self.seed, float(rewards.sum()), float(rewards.max()),
                             self.success, len(rewards), np.stack(self.frames) if self.keep_frames else None)


class _EpisodeQueue:
    """The episodes not started yet, per task in index order.

    A freed slot takes the next episode of the task it ran last when there is one (its worker still has that
    task's environment: building another costs about a second), else one of the task with the most episodes left
    (the first batch thus takes one task after the other, round-robin)."""

    def __init__(self, episodes: list[_Running]):
        self.by_task: dict[str, deque] = {}
        for episode in episodes:
            self.by_task.setdefault(episode.task, deque()).append(episode)

    def __len__(self) -> int:
        return sum(len(queue) for queue in self.by_task.values())

    def pop(self, preferred_task: str | None) -> _Running:
        if not self.by_task.get(preferred_task):
            preferred_task = max(self.by_task, key=lambda task: len(self.by_task[task]))  # first of the largest
        return self.by_task[preferred_task].popleft()


def _start_episodes(sims: SimWorkers, running: dict[int, _Running], pending: _EpisodeQueue, last_task: dict,
                    render_all: bool) -> None:
    """Puts the next pending episodes into the free slots and resets their environments."""
    operations = {}
    for slot in range(sims.num_slots):
        if slot not in running and len(pending):
            episode = running[slot] = pending.pop(last_task.get(slot))
            last_task[slot] = episode.task
            operations[slot] = ("reset", episode.task, episode.seed, render_all or episode.keep_frames)
    for slot, outcome in sims.run(operations).items():
        episode = running[slot]
        episode.observation, episode.image = outcome["observation"], outcome["image"]
        if episode.keep_frames:
            episode.frames.append(outcome["image"])


def _policy_step(policy: Policy, running: dict[int, _Running], slots: list[int]) -> dict[int, np.ndarray]:
    """One policy call on the running `slots`: {slot: chunk (k, 4)} (k = 1: `act`, else `act_chunk`)."""
    episodes = [running[slot] for slot in slots]
    images = np.stack([ep.image for ep in episodes]) if policy.needs_images else None
    observations = np.stack([ep.observation for ep in episodes])
    arguments = (images, observations, [task_instruction(ep.task) for ep in episodes], [ep.task for ep in episodes])
    k = chunk_size_of(policy)
    if k == 1:
        actions = np.asarray(policy.act(*arguments), dtype=np.float32)
        expected = (len(slots), ACTION_DIM)
    else:
        actions = np.asarray(policy.act_chunk(*arguments), dtype=np.float32)
        expected = (len(slots), k, ACTION_DIM)
    if actions.shape != expected:
        raise ValueError(f"policy {policy.name} returned actions of shape {actions.shape}, expected {expected}")
    if not np.isfinite(actions).all():
        raise ValueError(f"policy {policy.name} returned non-finite actions")
    return dict(zip(slots, actions.reshape(len(slots), k, ACTION_DIM)))


def _next_actions(policy: Policy, running: dict[int, _Running], queues: ActionQueues) -> dict[int, np.ndarray]:
    """{slot: the action (4,) it executes now}, calling the policy once on the slots whose queue needs a chunk."""
    asking = [slot for slot in sorted(running) if queues.needs_policy(slot)]
    if asking:
        for slot, chunk in _policy_step(policy, running, asking).items():
            queues.add(slot, chunk)
    return {slot: queues.pop(slot) for slot in sorted(running)}


def _check_run_settings(tasks: Sequence[str], batch_size: int, num_workers: int, max_steps: int,
                        videos_per_task: int, image_size: int) -> None:
    if not tasks:
        raise ValueError("give at least one task")
    for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 1),
                             ("max_steps", max_steps, 1), ("videos_per_task", videos_per_task, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if image_size < 8 or image_size % 2:
        raise ValueError(f"image_size must be an even number >= 8 (H.264 videos need even sizes), got {image_size}")


def run_closed_loop(policy: Policy, tasks: Sequence[str], *, episodes_per_task: int, max_steps: int = DEFAULT_MAX_STEPS,
                    seed: int = 0, camera: str = "corner", image_size: int = 64, batch_size: int = 10,
                    num_workers: int | None = None, videos_per_task: int = 1, progress: bool = True,
                    n_action_steps: int | None = None, temporal_ensemble: bool = False,
                    ensemble_coefficient: float = DEFAULT_ENSEMBLE_COEFFICIENT) -> ClosedLoopResult:
    """Runs `episodes_per_task` episodes of each task (full Meta-World names) with `policy`, `batch_size` at a time
    in `num_workers` simulator processes (default: one per CPU, at most `batch_size`).

    A chunking policy's chunks run `n_action_steps` actions per call (default: its chunk size k), or with
    `temporal_ensemble` (a call every step, predictions averaged with weights exp(-ensemble_coefficient * i)); see
    `training.eval.action_queues`. Both are checked against k before any simulator starts.

    Each task's episodes start in index order, so its first ones (kept as videos) start first. The results do not
    depend on the batch size or the number of workers: each episode is a deterministic function of its seed and the
    policy, as long as the policy acts on each row independently.
    """
    _check_run_settings(tasks, batch_size, num_workers or 1, max_steps, videos_per_task, image_size)
    queues = ActionQueues(chunk_size_of(policy), n_action_steps, temporal_ensemble, ensemble_coefficient)
    seeds = evaluation_seeds(seed, episodes_per_task)
    pending = _EpisodeQueue([_Running(task, k, s, keep_frames=k < videos_per_task) for task in tasks
                             for k, s in enumerate(seeds)])
    total = len(pending)
    batch_size = min(batch_size, total)
    num_workers = min(num_workers or os.cpu_count() or 1, batch_size)
    episodes: dict[str, list[EpisodeResult]] = {task: [] for task in tasks}
    running: dict[int, _Running] = {}
    last_task: dict[int, str] = {}  # slot -> the task of its last episode
    successes = finished = 0
    policy_s, start = 0.0, time.perf_counter()  # the policy's share of the time (the rest: simulator and start-up)
    from tqdm.auto import tqdm

    with SimWorkers(num_workers, batch_size, camera=camera, image_size=image_size, max_steps=max_steps) as sims, \
            tqdm(total=total, desc=f"evaluating {policy.name}", unit="episode", disable=not progress,
                 dynamic_ncols=True) as bar:
        _start_episodes(sims, running, pending, last_task, policy.needs_images)
        while running:
            tick = time.perf_counter()
            actions = _next_actions(policy, running, queues)
            policy_s += time.perf_counter() - tick
            render = {slot: policy.needs_images or running[slot].keep_frames for slot in actions}
            outcomes = sims.run({slot: ("step", action, render[slot]) for slot, action in actions.items()})
            for slot, outcome in outcomes.items():
                episode = running[slot]
                episode.observation, episode.image = outcome["observation"], outcome["image"]
                episode.rewards.append(outcome["reward"])
                episode.success = episode.success or outcome["success"]
                if episode.keep_frames:
                    episode.frames.append(outcome["image"])
                if episode.success or len(episode.rewards) >= max_steps:
                    episodes[episode.task].append(running.pop(slot).finish())
                    queues.reset(slot)  # the slot's next episode must not run this one's remaining actions
                    successes, finished = successes + episode.success, finished + 1
                    bar.update(1)
                    bar.set_postfix(success=f"{successes / finished:.0%}")
            if pending and len(running) < sims.num_slots:
                _start_episodes(sims, running, pending, last_task, policy.needs_images)
    for task_episodes in episodes.values():
        task_episodes.sort(key=lambda ep: ep.index)
    settings = dict(seed=seed, max_steps=max_steps, camera=camera, image_size=image_size, batch_size=batch_size,
                    num_workers=num_workers, videos_per_task=videos_per_task, episodes_per_task=episodes_per_task,
                    action_chunk_size=queues.chunk_size, n_action_steps=queues.n_action_steps,
                    temporal_ensemble=queues.temporal_ensemble,
                    ensemble_coefficient=queues.ensemble_coefficient if queues.temporal_ensemble else None)
    return ClosedLoopResult(list(tasks), episodes, time.perf_counter() - start, settings, policy_s)


__all__ = [
    "ACTION_DIM",
    "ClosedLoopResult",
    "DEFAULT_MAX_STEPS",
    "EVAL_SEED_BASE",
    "EpisodeResult",
    "ExpertPolicy",
    "Policy",
    "REFERENCE_POLICIES",
    "VLAPolicy",
    "ZeroPolicy",
    "chunk_size_of",
    "evaluation_seeds",
    "load_policy",
    "run_closed_loop",
]
