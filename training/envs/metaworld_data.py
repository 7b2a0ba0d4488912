"""Meta-World expert data: scripted-policy episodes rendered into a LeRobot v3.0 dataset.

    python -m training.envs.metaworld_data --tasks mt10 --episodes-per-task 20 --image-size 128 \
        --output outputs/metaworld_mt10

For every task, Meta-World's own scripted expert (``metaworld.policies``) runs from seeded initial states
(episode ``k`` of a task uses seed ``--seed * 1_000_000 + k``, see :class:`MetaWorldTaskEnv`), and each
episode is stored with:

* ``observation.images.<camera>``: upright RGB video of each camera (default ``corner``: arm, table and
  objects from the front-left);
* ``observation.state``: end-effector state (4,) = hand x, y, z and gripper opening;
* ``action``: the 4-D action applied at that frame (hand displacement x, y, z and gripper effort), in [-1, 1];
* ``next.reward`` and ``next.success``: Meta-World's reward and ``info["success"]`` after that action;
* the task's instruction (e.g. "open the drawer") as the LeRobot task, and per-episode metadata
  ``success`` (solved at any step), ``metaworld_task``, ``episode_seed``, ``first_success_frame``
  (-1 if never) and ``control_dt`` (simulated seconds per frame).

Frame rate. One frame is recorded per control step; a control step lasts ``env.dt`` = 12.5 ms of simulated
time (80 Hz), and an expert typically solves a task in 30-150 steps (0.4-1.9 s). Declaring 80 fps would
make the reference LAPA frame gap (0.6 s) span 48 steps, half an episode or more. The dataset therefore
declares 10 fps by default (``--fps``): videos play 8x slower than simulated time, and a 0.6 s gap spans
6 control steps (at most 6 cm of hand travel), so a latent action describes one short arm motion, as it
does on slow real-robot video. The true time scale is kept in each episode's ``control_dt``.

Episodes end ``--steps-after-success`` steps (default 10) after the first success, or at ``--max-steps``
(default: the env's 500). Episodes run in parallel worker processes (``--num-workers``); each returns its
arrays and the parent writes them in a fixed order, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from training.data import LeRobotDatasetWriter, load_lerobot_dataset

from .metaworld_tasks import CAMERA_NAMES, MT50_TASKS, resolve_task_names, task_instruction

#: Default frame rate declared by the dataset (see the module docstring).
DEFAULT_FPS = 10
#: Episode seeds of run seed ``s`` are ``s * EPISODE_SEED_STRIDE + k``: runs with different seeds never
#: share an initial state (for fewer than a million episodes per task).
EPISODE_SEED_STRIDE = 1_000_000
#: Robot type stored in the dataset's info.json.
ROBOT_TYPE = "sawyer"


@dataclass(frozen=True)
class GenerationConfig:
    """Everything that defines a generated dataset (besides its output folder).

    Attributes:
        tasks: full Meta-World task names, e.g. ``("drawer-open-v3",)``.
        episodes_per_task: episodes recorded for each task.
        image_size: height = width of the images (even, for H.264 yuv420p video).
        cameras: model cameras to record, one video feature each.
        fps: frame rate the dataset declares (one frame per 12.5 ms control step; see module docstring).
        max_steps: episode length cap; ``None`` = the env's maximum path length (500).
        steps_after_success: steps recorded after the first success; a negative value records until
            ``max_steps``.
        seed: run seed; episode ``k`` of every task uses seed ``seed * EPISODE_SEED_STRIDE + k``.
        action_noise: standard deviation of Gaussian noise added to the expert's actions (before clipping).
        only_successful: keep only successful episodes; further seeds are tried until every task has
            ``episodes_per_task`` of them (or ``max_attempts_per_task`` seeds were tried).
        num_workers: parallel processes; 1 runs in this process.
        supersample: render at this multiple of ``image_size`` and average down (antialiasing).
        crf: H.264 quality (x264's constant rate factor; 23 is its default; 0 is lossless in YUV).
        pix_fmt: "yuv420p" (plays everywhere; halves colour resolution) or "yuv444p" (full colour resolution: at
            64 px Meta-World's goal markers are single pixels, which yuv420p at crf 23 smears into the background).
    """

    tasks: tuple[str, ...]
    episodes_per_task: int
    image_size: int = 128
    cameras: tuple[str, ...] = ("corner",)
    fps: int = DEFAULT_FPS
    max_steps: int | None = None
    steps_after_success: int = 10
    seed: int = 0
    action_noise: float = 0.0
    only_successful: bool = False
    num_workers: int = 1
    supersample: int = 1
    crf: int = 23
    pix_fmt: str = "yuv420p"

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("Give at least one task.")
        unknown_tasks = [task for task in self.tasks if task not in MT50_TASKS]
        if unknown_tasks:
            raise ValueError(f"Unknown Meta-World task(s) {unknown_tasks}; use resolve_task_names().")
        if self.episodes_per_task < 1:
            raise ValueError(f"episodes_per_task must be >= 1, got {self.episodes_per_task}")
        if self.image_size < 8 or self.image_size % 2:
            raise ValueError(
                f"image_size must be an even number >= 8 (H.264 yuv420p video needs even sizes), "
                f"got {self.image_size}"
            )
        if not self.cameras:
            raise ValueError("Give at least one camera.")
        unknown_cameras = [camera for camera in self.cameras if camera not in CAMERA_NAMES]
        if unknown_cameras:
            raise ValueError(f"Unknown camera(s) {unknown_cameras}; Meta-World's cameras: {list(CAMERA_NAMES)}")
        if len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"Cameras listed twice: {list(self.cameras)}")
        if self.fps < 1:
            raise ValueError(f"fps must be a positive integer, got {self.fps}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.action_noise < 0:
            raise ValueError(f"action_noise must be >= 0, got {self.action_noise}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {self.supersample}")
        if self.pix_fmt not in ("yuv420p", "yuv444p"):
            raise ValueError(f"pix_fmt must be 'yuv420p' or 'yuv444p', got {self.pix_fmt!r}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in [0, 51] (x264's range), got {self.crf}")

    @property
    def max_attempts_per_task(self) -> int:
        """Seeds tried per task with ``only_successful`` before giving up on reaching the count."""
        return 4 * self.episodes_per_task + 10

    def episode_seed(self, episode_number: int) -> int:
        """Seed of a task's ``episode_number``-th candidate episode."""
        return self.seed * EPISODE_SEED_STRIDE + episode_number


@dataclass(frozen=True)
class EpisodeSpec:
    """One episode to run: a task and the seed of its initial state (and of its action noise)."""

    task_name: str
    episode_seed: int


@dataclass
class EpisodeRecord:
    """The arrays of one expert episode of T frames.

    Attributes:
        frames: ``{camera: uint8 (T, H, W, 3)}``; empty when the episode was run without rendering.
        state: (T, 4) float32 end-effector state before each action.
        action: (T, 4) float32 action applied at each frame, in [-1, 1].
        reward: (T,) float32 reward after each action.
        success_after_step: (T,) bool, ``info["success"]`` after each action.
        control_dt: simulated seconds per frame.
    """

    spec: EpisodeSpec
    frames: dict[str, np.ndarray]
    state: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    success_after_step: np.ndarray
    control_dt: float

    @property
    def num_frames(self) -> int:
        return len(self.action)

    @property
    def success(self) -> bool:
        """The expert solved the task at some step of the episode."""
        return bool(self.success_after_step.any())

    @property
    def first_success_frame(self) -> int:
        """Index of the first frame whose action led to success; -1 if none did."""
        return int(np.argmax(self.success_after_step)) if self.success else -1


def run_expert_episode(
    env,
    expert: Callable[[np.ndarray], np.ndarray],
    spec: EpisodeSpec,
    *,
    steps_after_success: int = 10,
    action_noise: float = 0.0,
    render: bool = True,
) -> EpisodeRecord:
    """Roll out the expert in ``env`` (a :class:`MetaWorldTaskEnv`) from the initial state of ``spec``.

    Frame t holds the observation before action t (LeRobot's convention). The episode ends
    ``steps_after_success`` steps after the first success (never early if negative) or at the env's
    maximum path length. Deterministic given the spec: the action noise is drawn from a generator seeded
    by the episode seed and the task name.
    """
    observation = env.reset(spec.episode_seed)
    noise_rng = np.random.default_rng([spec.episode_seed, zlib.crc32(spec.task_name.encode())])
    frames: dict[str, list[np.ndarray]] = {camera: [] for camera in env.cameras} if render else {}
    states, actions, rewards, successes = [], [], [], []
    first_success_step = -1
    for step in range(env.max_path_length):
        if render:
            for camera, image in env.render().items():
                frames[camera].append(image)
        states.append(env.state)
        action = expert(observation)
        if action_noise > 0:
            action = np.clip(action + noise_rng.normal(0.0, action_noise, size=action.shape), -1.0, 1.0)
        action = action.astype(np.float32)
        result = env.step(action)
        actions.append(action)
        rewards.append(result.reward)
        successes.append(result.success)
        observation = result.observation
        if result.success and first_success_step < 0:
            first_success_step = step
        if result.truncated:
            break
        if first_success_step >= 0 and 0 <= steps_after_success <= step - first_success_step:
            break
    return EpisodeRecord(
        spec=spec,
        frames={camera: np.stack(images) for camera, images in frames.items()},
        state=np.stack(states).astype(np.float32),
        action=np.stack(actions).astype(np.float32),
        reward=np.asarray(rewards, dtype=np.float32),
        success_after_step=np.asarray(successes, dtype=bool),
        control_dt=env.control_dt,
    )


# ---------------------------------------------------------------------- worker side
# Each worker process keeps one env (with its OpenGL context) for the task it ran last: episodes are
# handed out in task order, so a worker rebuilds its env only when the task changes.
_worker_config: GenerationConfig | None = None
_worker_envs: dict[bool, tuple[object, object]] = {}  # render? -> (env, expert)


def _init_worker(config: GenerationConfig, single_threaded_rendering: bool) -> None:
    """Pool initializer: remember the config; keep Mesa's software rasteriser to one thread per worker."""
    global _worker_config
    if single_threaded_rendering:
        # Must be set before the first OpenGL context of this process; workers already use every core.
        os.environ.setdefault("LP_NUM_THREADS", "1")
    _worker_config = config


def _env_and_expert(task_name: str, render: bool):
    from .metaworld_env import MetaWorldTaskEnv, ScriptedExpert

    config = _worker_config
    cached = _worker_envs.get(render)
    if cached is not None and cached[0].task_name == task_name:
        return cached
    if cached is not None:
        cached[0].close()
    env = MetaWorldTaskEnv(
        task_name,
        cameras=config.cameras,
        image_size=config.image_size,
        supersample=config.supersample,
        max_path_length=config.max_steps,
        render=render,
    )
    _worker_envs[render] = (env, ScriptedExpert(task_name))
    return _worker_envs[render]


def _close_worker_envs() -> None:
    for env, _ in _worker_envs.values():
        env.close()
    _worker_envs.clear()


def _probe_episode(spec: EpisodeSpec) -> bool:
    """Run an episode without rendering and tell whether the expert succeeded (cheap: no OpenGL)."""
    env, expert = _env_and_expert(spec.task_name, render=False)
    config = _worker_config
    record = run_expert_episode(
        env, expert, spec, steps_after_success=0, action_noise=config.action_noise, render=False
    )
    return record.success


def _record_episode(spec: EpisodeSpec) -> EpisodeRecord:
    """Run and render one episode."""
    env, expert = _env_and_expert(spec.task_name, render=True)
    config = _worker_config
    return run_expert_episode(
        env,
        expert,
        spec,
        steps_after_success=config.steps_after_success,
        action_noise=config.action_noise,
        render=True,
    )


def _run_on_chunk(function: Callable, specs: list[EpisodeSpec]) -> list:
    """Worker side of :func:`_episode_runner`: ``function`` on each spec of one chunk, in order."""
    return [function(spec) for spec in specs]


#: Most episodes a worker runs per hand-out (bounds the frames it holds before returning them).
MAX_EPISODES_PER_CHUNK = 8


def chunk_specs(specs: Sequence[EpisodeSpec], num_workers: int) -> list[list[EpisodeSpec]]:
    """Split specs into consecutive chunks of one task each, handed out to workers as units.

    Building a task's env (initial-state benchmark, model, OpenGL context) takes about a second, as long
    as an episode: a worker should run several episodes of a task in a row rather than every worker
    building every task. Chunks are small enough to keep all workers busy until the end (about four per
    worker) and hold at most ``MAX_EPISODES_PER_CHUNK`` episodes.
    """
    size = max(1, min(MAX_EPISODES_PER_CHUNK, -(-len(specs) // (4 * num_workers))))
    chunks: list[list[EpisodeSpec]] = []
    for spec in specs:
        if chunks and chunks[-1][0].task_name == spec.task_name and len(chunks[-1]) < size:
            chunks[-1].append(spec)
        else:
            chunks.append([spec])
    return chunks


@contextmanager
def _episode_runner(config: GenerationConfig) -> Iterator[Callable]:
    """Yield ``run(function, specs)``: an iterator of ``function(spec)`` for each spec, in the specs' order.

    With one worker everything runs in this process (no start-up cost, easy to debug); otherwise a pool
    of "spawn" processes (fork would copy this process's threads and any OpenGL state) runs chunks of
    same-task episodes (:func:`chunk_specs`), and the results come back in order whatever finishes first.
    """
    if config.num_workers == 1:
        _init_worker(config, single_threaded_rendering=False)
        try:
            yield lambda function, specs: map(function, specs)
        finally:
            _close_worker_envs()
        return

    context = multiprocessing.get_context("spawn")
    pool = context.Pool(config.num_workers, initializer=_init_worker, initargs=(config, True))

    def run(function: Callable, specs: Sequence[EpisodeSpec]) -> Iterator:
        chunks = chunk_specs(specs, config.num_workers)
        for results in pool.imap(partial(_run_on_chunk, function), chunks, chunksize=1):
            yield from results

    try:
        yield run
        pool.close()
        pool.join()
    finally:
        pool.terminate()


# ---------------------------------------------------------------------- parent side
@dataclass
class TaskResult:
    """Per-task outcome of a generation run."""

    task_name: str
    episodes: int = 0
    successes: int = 0
    frames: int = 0
    seeds_tried: int = 0

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0


@dataclass
class GenerationSummary:
    """What :func:`generate_dataset` did, for printing and benchmarks."""

    output: Path
    config: GenerationConfig
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    total_frames: int = 0
    seconds: float = 0.0

    @property
    def frames_per_second(self) -> float:
        """Recorded frames per wall-clock second (stepping, rendering, encoding and writing)."""
        return self.total_frames / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        """JSON-ready summary: settings, per-task counts and success rates, frames and speed."""
        config = dataclasses.asdict(self.config)
        return {
            "output": str(self.output),
            "config": config,
            "tasks": {
                name: {**dataclasses.asdict(result), "success_rate": result.success_rate}
                for name, result in self.tasks.items()
            },
            "total_frames": self.total_frames,
            "seconds": self.seconds,
            "frames_per_second": self.frames_per_second,
        }

    def table(self) -> str:
        """A plain-text per-task table (episodes, successes, success rate, mean length)."""
        lines = [f"{'task':<30} {'episodes':>8} {'success':>8} {'rate':>6} {'mean len':>9}"]
        for result in self.tasks.values():
            mean_length = result.frames / result.episodes if result.episodes else 0.0
            lines.append(
                f"{result.task_name:<30} {result.episodes:>8} {result.successes:>8} "
                f"{result.success_rate:>6.0%} {mean_length:>9.1f}"
            )
        lines.append(
            f"{self.total_frames} frames in {self.seconds:.1f} s = {self.frames_per_second:.1f} frames/s "
            f"({self.config.num_workers} worker(s), {self.config.image_size} px, {len(self.config.cameras)} camera(s))"
        )
        return "\n".join(lines)


def _select_successful_specs(config: GenerationConfig, run, progress: bool) -> tuple[list[EpisodeSpec], dict]:
    """Find, per task, the first ``episodes_per_task`` seeds (in order) whose expert episode succeeds.

    Runs without rendering, so failed seeds cost only stepping. Seeds are probed in rounds; the chosen
    seeds are the lowest successful ones whatever the rounds or the number of workers.
    """
    from tqdm import tqdm

    successful: dict[str, list[int]] = {task: [] for task in config.tasks}
    tried: dict[str, int] = {task: 0 for task in config.tasks}
    with tqdm(total=len(config.tasks) * config.episodes_per_task, desc="finding successful seeds",
              unit="episode", disable=not progress) as bar:
        while True:
            batch: list[EpisodeSpec] = []
            for task in config.tasks:
                missing = config.episodes_per_task - len(successful[task])
                budget = config.max_attempts_per_task - tried[task]
                # Probe a few more than missing, as some will fail; never more than the budget.
                count = min(budget, missing + max(1, missing // 4)) if missing > 0 else 0
                batch.extend(EpisodeSpec(task, config.episode_seed(tried[task] + i)) for i in range(count))
                tried[task] += count
            if not batch:
                break
            for spec, success in zip(batch, run(_probe_episode, batch)):
                found = successful[spec.task_name]
                if success and len(found) < config.episodes_per_task:
                    found.append(spec.episode_seed)
                    bar.update(1)
    specs = [EpisodeSpec(task, seed) for task in config.tasks for seed in successful[task]]
    return specs, tried


def generate_dataset(
    config: GenerationConfig, output: str | Path, *, overwrite: bool = False, progress: bool = True
) -> GenerationSummary:
    """Run the experts, render the episodes and write them as a LeRobot v3.0 dataset at ``output``.

    Returns a summary with per-task success rates and the generation speed. With
    ``config.only_successful`` a task whose expert keeps failing gets fewer episodes (a warning is
    printed) rather than none.
    """
    from tqdm import tqdm


    from .metaworld_env import ACTION_NAMES, STATE_NAMES

    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; pass overwrite=True to replace it")
    start = time.perf_counter()
    summary = GenerationSummary(output=output, config=config)
    summary.tasks = {task: TaskResult(task) for task in config.tasks}
    feature_names = {"observation.state": list(STATE_NAMES), "action": list(ACTION_NAMES)}
    with _episode_runner(config) as run:
        if config.only_successful:
            specs, tried = _select_successful_specs(config, run, progress)
            for task, count in tried.items():
                summary.tasks[task].seeds_tried = count
        else:
            specs = [
                EpisodeSpec(task, config.episode_seed(k))
                for task in config.tasks
                for k in range(config.episodes_per_task)
            ]
            for task in config.tasks:
                summary.tasks[task].seeds_tried = config.episodes_per_task
        writer = LeRobotDatasetWriter(
            output, fps=config.fps, robot_type=ROBOT_TYPE, crf=config.crf, pix_fmt=config.pix_fmt,
            feature_names=feature_names, overwrite=overwrite,
        )
        with writer, tqdm(total=len(specs), desc="recording episodes", unit="episode",
                          disable=not progress) as bar:
            for record in run(_record_episode, specs):
                if config.only_successful and not record.success:
                    raise RuntimeError(
                        f"{record.spec}: the expert succeeded without rendering but failed with it; "
                        "the simulation should not depend on rendering"
                    )
                writer.add_episode(
                    {f"observation.images.{camera}": images for camera, images in record.frames.items()},
                    task=task_instruction(record.spec.task_name),
                    state=record.state,
                    action=record.action,
                    extra_frame_columns={
                        "next.reward": record.reward,
                        "next.success": record.success_after_step,
                    },
                    episode_metadata={
                        "success": record.success,
                        "metaworld_task": record.spec.task_name,
                        "episode_seed": record.spec.episode_seed,
                        "first_success_frame": record.first_success_frame,
                        "control_dt": record.control_dt,
                    },
                )
                result = summary.tasks[record.spec.task_name]
                result.episodes += 1
                result.successes += int(record.success)
                result.frames += record.num_frames
                summary.total_frames += record.num_frames
                bar.update(1)
                bar.set_postfix(frames_per_s=f"{summary.total_frames / (time.perf_counter() - start):.0f}")
    summary.seconds = time.perf_counter() - start
    if config.only_successful:
        for result in summary.tasks.values():
            if result.episodes < config.episodes_per_task:
                print(
                    f"warning: {result.task_name}: only {result.episodes} successful episodes in "
                    f"{result.seeds_tried} seeds (wanted {config.episodes_per_task})",
                    file=sys.stderr,
                )
    return summary


def write_sample_grid(
    dataset_root: str | Path, path: str | Path, *, episodes: Sequence[int] | None = None, frames_per_episode: int = 3
) -> Path:
    """Save a PNG grid of frames from a generated dataset: one tile per episode (first camera).

    Each tile shows ``frames_per_episode`` evenly spaced frames (first to last) with the task's instruction
    underneath; by default one episode per task. Frames are decoded from the stored videos, so the grid
    shows what a training run will see (up to the PNG's 256-colour palette).
    """
    from PIL import Image, ImageDraw


    dataset = load_lerobot_dataset(dataset_root)
    if episodes is None:
        first_of_task: dict[str, int] = {}
        for index in range(dataset.meta.total_episodes):
            first_of_task.setdefault(dataset.episode_task(index), index)
        episodes = list(first_of_task.values())
    camera = dataset.meta.camera_keys[0]
    caption_height, columns = 14, min(5, len(episodes))
    tiles = []
    for index in episodes:
        frames = dataset.decode_episode(index, camera)
        picks = np.linspace(0, len(frames) - 1, frames_per_episode).round().astype(int)
        strip = np.concatenate([frames[i] for i in picks], axis=1)
        tile = Image.new("RGB", (strip.shape[1], strip.shape[0] + caption_height), "white")
        tile.paste(Image.fromarray(strip), (0, 0))
        ImageDraw.Draw(tile).text((2, strip.shape[0] + 1), dataset.episode_task(index), fill="black")
        tiles.append(tile)
    width, height = tiles[0].size
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * (width + 4) - 4, rows * (height + 4) - 4), "white")
    for position, tile in enumerate(tiles):
        grid.paste(tile, ((position % columns) * (width + 4), (position // columns) * (height + 4)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A 256-colour palette: the renders have few colours, and it makes the PNG less than half the size.
    grid.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.envs.metaworld_data",
        description="Record Meta-World scripted-expert episodes as a LeRobot v3.0 dataset.",
    )
    parser.add_argument("--tasks", required=True,
                        help="mt10, mt50, or comma-separated task names (with or without '-v3'), "
                             "e.g. drawer-open,button-press-topdown-v3")
    parser.add_argument("--episodes-per-task", type=int, default=10, help="episodes per task (default 10)")
    parser.add_argument("--output", required=True, help="dataset folder to create")
    parser.add_argument("--image-size", type=int, default=128, help="image height = width, even (default 128)")
    parser.add_argument("--cameras", default="corner",
                        help=f"comma-separated cameras (default corner); any of {', '.join(CAMERA_NAMES)}")
    parser.add_argument("--fps", type=int, default=DEFAULT_FPS,
                        help=f"frame rate the dataset declares; one frame per 12.5 ms control step "
                             f"(default {DEFAULT_FPS}: plays 8x slower than simulated time)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="episode length cap (default: the env's maximum path length, 500)")
    parser.add_argument("--steps-after-success", type=int, default=10,
                        help="steps recorded after the first success (default 10; negative: until --max-steps)")
    parser.add_argument("--num-workers", type=int, default=os.cpu_count() or 1,
                        help="parallel worker processes (default: number of CPUs)")
    parser.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    parser.add_argument("--action-noise", type=float, default=0.0,
                        help="std of Gaussian noise added to the expert's actions (default 0)")
    parser.add_argument("--only-successful", action=argparse.BooleanOptionalAction, default=False,
                        help="keep only successful episodes, trying further seeds to reach the count")
    parser.add_argument("--supersample", type=int, default=1,
                        help="render at this multiple of the size and average down (antialiasing; default 1)")
    parser.add_argument("--crf", type=int, default=23,
                        help="H.264 quality, lower is better (default 23; 0 is lossless in YUV)")
    parser.add_argument("--pix-fmt", choices=("yuv420p", "yuv444p"), default="yuv420p",
                        help="yuv420p (default, plays everywhere) or yuv444p (full colour resolution: keeps "
                             "single-pixel goal markers at small sizes)")
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                        help="replace an existing output folder")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bars (--no-progress: none)")
    parser.add_argument("--summary-json", default=None,
                        help="also write the run's summary (per-task success, frames/s) as JSON at this path")
    parser.add_argument("--sample-grid", default=None,
                        help="also save a PNG grid of frames (one episode per task) at this path")
    return parser


def config_from_args(args: argparse.Namespace) -> GenerationConfig:
    """Build the config from parsed arguments (raises ValueError with a clear message on bad values)."""
    return GenerationConfig(
        tasks=tuple(resolve_task_names(args.tasks)),
        episodes_per_task=args.episodes_per_task,
        image_size=args.image_size,
        cameras=tuple(camera.strip() for camera in args.cameras.split(",") if camera.strip()),
        fps=args.fps,
        max_steps=args.max_steps,
        steps_after_success=args.steps_after_success,
        seed=args.seed,
        action_noise=args.action_noise,
        only_successful=args.only_successful,
        num_workers=args.num_workers,
        supersample=args.supersample,
        crf=args.crf,
        pix_fmt=args.pix_fmt,
    )


def main(argv: Sequence[str] | None = None) -> GenerationSummary:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        parser.error(f"--output {output} exists and is not empty; pass --overwrite to replace it")
    summary = generate_dataset(config, output, overwrite=args.overwrite, progress=args.progress)
    print(summary.table())
    print(f"wrote {output}")
    if args.summary_json:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_text(json.dumps(summary.to_dict(), indent=2))
        print(f"wrote {args.summary_json}")
    if args.sample_grid:
        print(f"wrote {write_sample_grid(output, args.sample_grid)}")
    return summary


def cli(argv: Sequence[str] | None = None) -> int:
    """The `lapa-generate-metaworld` command: `main` with an exit status."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
