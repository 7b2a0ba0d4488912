"""Closed-loop evaluation of a policy in Meta-World: success rate per task with 95% intervals, videos, a chart.

    python -m training.evaluate --policy runs/finetune/model --tasks mt10 --episodes-per-task 10 \\
        --output-dir outputs/eval/finetune

`--policy` is a finetuned VLA folder or Hub id (`LAPAForActionPrediction` with its processor), or a reference
policy: `expert` (Meta-World's scripted expert, which reads the true state: the ceiling) or `zero` (no motion: the
floor). The VLA sees what it was trained on: the camera and image size of its training dataset (read from the
`training_config.json` saved beside the model and the dataset's `meta/info.json`; `--camera`/`--image-size` that
disagree are refused) and the instruction of each task (`task_instruction`, as in the generated data).

Episodes start from initial states no training episode used: episode k of each task uses seed
`EVAL_SEED_BASE (10**9) + --seed * 10**6 + k`; for a VLA whose datasets are here (its own and those of its
`init_from` chain), the episodes' recorded seeds are checked and an overlap is refused. An episode ends at
Meta-World's success or after `--max-steps` (default 200: the scripted expert's slowest success on 200 MT10
episodes was step 139). `--batch-size` environments (in `--num-workers` simulator processes) are stepped together,
one policy call per control step on the whole batch; a finished episode's place takes the next pending one.
A VLA trained with `--action-chunk-size k` predicts k actions per call: they run open loop, `--n-action-steps n`
(default k) per call before it is asked again, or with `--temporal-ensemble` (ACT's: a call every step, the
overlapping predictions for the current step averaged with weights exp(-0.01 i), i = 0 for the oldest).

Writes `<output-dir>/eval_info.json` (LeRobot's multi-task layout: per_task / per_group / overall, plus Wilson
intervals `pc_success_ci95`, episode seeds and steps, the policy, settings and versions), `videos/<task>/
episode_<k>.mp4` for the first `--videos-per-task` episodes of each task, and `success_per_task.png`.
Measured on 2 CPU cores shared with other jobs (load 3-5): the expert on MT10 x 5 episodes in 23 s (98% success);
an untrained tiny VLA (64 px, llava 128 x 4 layers) on MT10 x 10 episodes, all of them running the full 200 steps
(20,000 rendered steps, 2,000 policy calls on batches of 10), in 3 min 36 s to 3 min 57 s, 39% of it in the policy
(`overall.policy_s` in eval_info.json).

Under `accelerate launch` with several processes only the main process evaluates (the simulator, not the policy,
bounds the speed on CPU; use --num-workers for parallelism); the other processes return at once.
Settings: every flag is a field of `EvaluationConfig`, so a YAML file works too (`--config eval.yaml`).
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco

import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from training.envs.eval_episodes import DEFAULT_MAX_STEPS, REFERENCE_POLICIES  # noqa: E402
from training.envs.metaworld_tasks import CAMERA_NAMES, TASK_SETS, resolve_task_names  # noqa: E402
from training.settings import resolve_stage_config, stage_parser  # noqa: E402

# The rest (torch, the model, the data layer) is imported where it is used: the simulator workers, started with
# "spawn", re-import this script, and should not load torch for nothing (about 2 s and 700 MB each).

#: Camera and image size for the reference policies (they read the state; the images are for the videos).
DEFAULT_CAMERA, DEFAULT_IMAGE_SIZE = "corner", 64


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class EvaluationConfig:
    """Every setting of a closed-loop evaluation: one flag per field (`episodes_per_task` is `--episodes-per-task`,
    a boolean `x` is `--x` / `--no-x`), and a key of a `--config` YAML file. `policy` is required."""

    policy: str | None = field(default=None, metadata=_help(
        "a finetuned VLA folder or Hub id, or 'expert' (Meta-World's scripted expert) or 'zero' (all-zero "
        "actions). Required"))
    tasks: str = field(default="mt10", metadata=_help(
        "mt10, mt50, or comma-separated task names, e.g. reach-v3,drawer-close-v3 (default: mt10)"))
    episodes_per_task: int = field(default=10, metadata=_help("episodes of each task (default: 10)"))
    max_steps: int = field(default=DEFAULT_MAX_STEPS, metadata=_help(
        f"control steps before an unsolved episode ends (default: {DEFAULT_MAX_STEPS}; measured: the scripted "
        "expert solved 197 of 200 MT10 episodes, all by step 139, the 3 others not within 500)"))
    seed: int = field(default=0, metadata=_help(
        "evaluation seed: episode k of each task starts from initial state 10**9 + seed * 10**6 + k (default: 0)"))
    output_dir: str | None = field(default=None, metadata=_help(
        "where eval_info.json, the videos and the chart go (default: outputs/eval/<policy>-<date-time>)"))
    overwrite: bool = field(default=False, metadata=_help("replace an earlier evaluation in --output-dir"))
    batch_size: int = field(default=10, metadata=_help(
        "environments stepped together, one policy call per control step on all of them (default: 10)"))
    num_workers: int | None = field(default=None, metadata=_help(
        "simulator worker processes (default: one per CPU core, at most --batch-size)"))
    videos_per_task: int = field(default=1, metadata=_help(
        "MP4 videos of the first N episodes of each task (default: 1; 0: none)"))
    camera: str | None = field(default=None, metadata=_help(
        "camera the policy sees (default: the one of its training data; 'corner' for expert and zero)"))
    image_size: int | None = field(default=None, metadata=_help(
        "image size in pixels (default: that of its training data; 64 for expert and zero)"))
    quantizer: str | None = field(default=None, metadata=_help(
        "a LAPA quantizer folder: with it, the first episode of each task is also imagined by the world model (the "
        "VLA's latent actions decoded by the quantizer, one 0.6 s gap at a time) beside the real one, with the PSNR "
        "per step of horizon (default: none)"))
    world_model_vla: str | None = field(default=None, metadata=_help(
        "with --quantizer: the latent-pretrained VLA that predicts the latent actions (default: the policy's "
        "init_from when its training record names one, else the policy)"))
    imagine_steps: int = field(default=16, metadata=_help(
        "with --quantizer: most gaps imagined per episode (fewer when the real episode ends sooner; default: 16)"))
    n_action_steps: int | None = field(default=None, metadata=_help(
        "a chunking VLA (k actions per call): run n <= k of each chunk's actions open loop, then call it again "
        "(default: k; 1 re-plans every step)"))
    temporal_ensemble: bool = field(default=False, metadata=_help(
        "a chunking VLA: call it every step and execute the average of its overlapping predictions for the step, "
        "weights exp(-0.01 i) with i = 0 the oldest (ACT's temporal ensembling)"))
    device: str = field(default="auto", metadata=_help("torch device of the policy: auto (cuda if any), cpu, cuda"))
    progress: bool = field(default=True, metadata=_help("progress bar over the episodes"))

    def __post_init__(self):
        for name in ("policy", "tasks", "output_dir", "camera", "device"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{name} must be a string, got {value!r}")
            setattr(self, name, None if value is None else str(value))
        if self.policy is None:
            raise ValueError("--policy is required: a VLA folder or Hub id, or one of " + ", ".join(REFERENCE_POLICIES))
        for name in ("quantizer", "world_model_vla"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{name} must be a string, got {value!r}")
            setattr(self, name, None if value is None else str(value))
        if self.world_model_vla is not None and self.quantizer is None:
            raise ValueError("--world-model-vla needs --quantizer (the world model decodes its latent actions)")
        if self.quantizer is not None and self.videos_per_task < 1:
            raise ValueError("--quantizer imagines the first episode of each task beside its video: give "
                             "--videos-per-task >= 1")
        for name, low in (("episodes_per_task", 1), ("max_steps", 1), ("batch_size", 1), ("num_workers", 1),
                          ("videos_per_task", 0), ("image_size", 8), ("seed", 0), ("imagine_steps", 1),
                          ("n_action_steps", 1)):
            value = getattr(self, name)
            if value is None and name in ("num_workers", "image_size", "n_action_steps"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.temporal_ensemble and self.n_action_steps not in (None, 1):
            raise ValueError("--temporal-ensemble calls the policy at every step: leave --n-action-steps unset")
        resolve_task_names(self.tasks)  # an unknown task is an error now, before any simulator starts
        if self.camera is not None and self.camera not in CAMERA_NAMES:
            raise ValueError(f"unknown --camera {self.camera!r}; Meta-World's cameras: {', '.join(CAMERA_NAMES)}")
        if self.image_size is not None and self.image_size % 2:
            raise ValueError(f"--image-size must be even (H.264 videos), got {self.image_size}")

    @property
    def task_group(self) -> str:
        """The task-set name given (mt10, mt50), else "custom" (LeRobot's `task_group`)."""
        return self.tasks.strip().lower() if self.tasks.strip().lower() in TASK_SETS else "custom"


def build_parser():
    parts = __doc__.split("\n\n", 1)
    return stage_parser(EvaluationConfig, prog="evaluate", description=parts[0], epilog=parts[1])


def resolve_config(argv: list[str] | None = None) -> EvaluationConfig:
    """defaults <- YAML file (`--config`) <- command line, into an `EvaluationConfig`; ValueError on a bad setting."""
    return resolve_stage_config(EvaluationConfig, build_parser(), argv)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def prepare(config: EvaluationConfig) -> dict:
    """Everything checked before a simulator starts: tasks, seeds, the policy's observation settings and training
    seeds, the output folder; then the policy itself. ValueError / FileExistsError with the reason."""
    from training.envs.eval_episodes import evaluation_seeds
    from training.eval.action_queues import check_chunk_execution
    from training.eval.closed_loop import chunk_size_of, load_policy
    from training.eval.policy_data import observation_settings, recorded_observation_settings, training_record

    tasks = resolve_task_names(config.tasks)
    seeds = evaluation_seeds(config.seed, config.episodes_per_task)
    reference = config.policy in REFERENCE_POLICIES
    record = None if reference else training_record(config.policy)
    settings = observation_settings(recorded_observation_settings(record), config.camera, config.image_size,
                                    default_camera=DEFAULT_CAMERA, default_image_size=DEFAULT_IMAGE_SIZE)
    if record is not None and config.camera is None and settings["source"] == "default" and record.get("camera_key"):
        settings["camera"] = str(record["camera_key"]).removeprefix("observation.images.")  # dataset not here
        settings["source"] = "training_config.json (camera only)"
    seed_check = None
    if record is not None:
        from training.eval.policy_data import check_seed_overlap, training_episode_seeds

        seed_check = training_episode_seeds(config.policy)
        check_seed_overlap(seed_check, {task: seeds for task in tasks})
        for dataset, why in seed_check["unchecked"]:
            print(f"evaluate: warning: initial states not checked against {dataset}: {why}", file=sys.stderr)
    output_dir = Path(config.output_dir or _default_output_dir(config.policy))
    if (output_dir / "eval_info.json").exists() and not config.overwrite:
        raise FileExistsError(f"--output-dir {output_dir} holds an evaluation already (eval_info.json); give "
                              "--overwrite to replace it, or another folder")
    device = _device(config.device)
    policy = load_policy(config.policy, device=device, dataset=(record or {}).get("dataset_key"))
    check_chunk_execution(chunk_size_of(policy), config.n_action_steps, config.temporal_ensemble)
    if not reference and settings["source"] != "given" and not settings["source"].endswith("info.json"):
        _unknown_training_data_fallback(policy, config, settings)
    world_model = None if config.quantizer is None else load_world_model(config, record, device)
    return dict(tasks=tasks, seeds=seeds, settings=settings, record=record, seed_check=seed_check,
                output_dir=output_dir, device=device, policy=policy, world_model=world_model)


def load_world_model(config: EvaluationConfig, record: dict | None, device: str) -> tuple:
    """(vla, its path, quantizer, gap in seconds) for the imagined rollouts, checked to fit each other before any
    simulator starts. The VLA: --world-model-vla, else the policy's init_from (the latent-pretrained model it was
    finetuned from), else the policy."""
    from training.eval.world_model import check_world_model, load_vla
    from training.labelling import LabellingError, load_quantizer, resolve_gap_seconds

    try:
        quantizer, quantizer_record = load_quantizer(config.quantizer, device=device)
    except LabellingError as error:
        raise ValueError(str(error)) from error  # its message names the folder and what is wrong
    gap_seconds, _ = resolve_gap_seconds(None, quantizer.config, quantizer_record["path"])
    vla_path = config.world_model_vla or (record or {}).get("init_from") or config.policy
    if vla_path in REFERENCE_POLICIES:
        raise ValueError(f"--quantizer needs a VLA that predicts latent actions (--world-model-vla); the {vla_path!r} "
                         "policy has none")
    vla = load_vla(vla_path, device)
    check_world_model(vla, quantizer)
    return vla, vla_path, quantizer, gap_seconds


def _unknown_training_data_fallback(policy, config: EvaluationConfig, settings: dict) -> None:
    """A VLA whose training dataset is not here (a Hub model, or a dataset moved away): the images are rendered at
    the processor's input size (even, for the videos) and a warning says that the views may differ from training."""
    if config.image_size is None:
        size = int(policy.model.processor.image_processor.size)
        settings["image_size"] = max(8, size + size % 2)
        settings["source"] += "; image size of the processor"
    print(f"evaluate: warning: the training data of {config.policy} is not here, so its camera and image size are "
          f"not known; evaluating with camera {settings['camera']!r} at {settings['image_size']} px (set --camera and "
          "--image-size to match the training data), and the initial states are not checked against it",
          file=sys.stderr)


def _default_output_dir(policy: str) -> Path:
    name = policy if policy in REFERENCE_POLICIES else Path(policy).name or "policy"
    return Path("outputs") / "eval" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _set_threads(num_workers: int | None, threads: int | None = None) -> int:
    """Sets the policy's torch threads (`threads`, else the cores the simulator workers leave); returns the previous
    number. The workers wait while the policy runs, but an OpenMP pool larger than the free cores collapses when
    anything else runs: measured 0.3-0.8 s instead of 0.036 s per call of the tiny VLA with 2 threads on 2 busy
    cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) - (num_workers or 0)))
    return previous


def evaluate(config: EvaluationConfig) -> dict:
    """Runs the evaluation and writes its outputs; returns the content of eval_info.json (an empty dict on the
    non-main processes of a multi-process launch)."""
    from accelerate import PartialState

    from training.envs.metaworld_data import DEFAULT_FPS
    from training.eval.closed_loop import run_closed_loop
    from training.eval.eval_report import build_eval_info, plot_success_per_task, write_videos

    if not PartialState(cpu=config.device == "cpu").is_main_process:
        return {}
    setup = prepare(config)
    settings, output_dir = setup["settings"], setup["output_dir"]
    batch_size = min(config.batch_size, len(setup["tasks"]) * config.episodes_per_task)
    num_workers = min(config.num_workers or os.cpu_count() or 1, batch_size)
    threads = _set_threads(num_workers)
    try:
        result = run_closed_loop(
            setup["policy"], setup["tasks"], episodes_per_task=config.episodes_per_task, max_steps=config.max_steps,
            seed=config.seed, camera=settings["camera"], image_size=settings["image_size"], batch_size=batch_size,
            num_workers=num_workers, videos_per_task=config.videos_per_task, progress=config.progress,
            n_action_steps=config.n_action_steps, temporal_ensemble=config.temporal_ensemble)
    finally:
        _set_threads(None, threads)  # as before: evaluate() may be called from a program with its own setting
    output_dir.mkdir(parents=True, exist_ok=True)
    video_paths = write_videos(result, output_dir / "videos", fps=DEFAULT_FPS)
    seed_check = setup["seed_check"]
    extra = {
        "policy": {"name": config.policy, "kind": config.policy if config.policy in REFERENCE_POLICIES else "vla",
                   "device": setup["device"], "training_record": setup["record"]},
        "config": dataclasses.asdict(config),
        "settings": {**result.settings, "camera_source": settings["source"], "video_fps": DEFAULT_FPS,
                     "task_group": config.task_group},
        "seed_check": None if seed_check is None else {"checked": seed_check["checked"],
                                                       "unchecked": seed_check["unchecked"], "overlap": False},
    }
    eval_info = build_eval_info(result, task_group=config.task_group, video_paths=video_paths, extra=extra)
    if config.quantizer is not None:
        world_model_rollouts(config, setup, result, eval_info, output_dir)
    (output_dir / "eval_info.json").write_text(json.dumps(eval_info, indent=2))
    plot_success_per_task(eval_info, output_dir / "success_per_task.png", title=f"{config.policy} on {config.tasks}")
    print(summary_table(eval_info))
    print(f"wrote {output_dir / 'eval_info.json'}")
    return eval_info


def world_model_rollouts(config: EvaluationConfig, setup: dict, result, eval_info: dict, output_dir: Path) -> None:
    """For the first episode of each task: the world model's imagined rollout from its first frame beside the real
    one (`videos/<task>/imagined_episode_0.mp4`, LeRobot's `predicted_video_paths`), and the PSNR of each imagined
    frame against the real frame at the same time (`imagined_psnr_per_step`, with `held_still_psnr_per_step`, the
    start frame held still, as its baseline); their means over tasks in `overall`."""
    import numpy as np

    from training.envs.metaworld_data import DEFAULT_FPS
    from training.envs.metaworld_tasks import task_instruction
    from training.eval.world_model import imagine_beside_real

    vla, vla_path, quantizer, gap_seconds = setup["world_model"]
    # One recorded frame per control step at the datasets' declared fps: a gap of 0.6 s is 6 control steps.
    gap_frames = max(1, round(gap_seconds * DEFAULT_FPS))
    scores, baselines = [], []
    for entry in eval_info["per_task"]:
        task = entry["task"]
        rollout = imagine_beside_real(
            vla, quantizer, result.first_episode_frames[task], task_instruction(task), gap_frames=gap_frames,
            max_steps=config.imagine_steps, path=output_dir / "videos" / task / "imagined_episode_0.mp4",
            fps=1.0 / gap_seconds)
        if rollout is None:
            continue
        entry["metrics"]["predicted_video_paths"] = [rollout["video_path"]]
        entry["metrics"]["imagined_psnr_per_step"] = rollout["psnr"]
        entry["metrics"]["held_still_psnr_per_step"] = rollout["copy_psnr"]
        entry["metrics"]["imagined_codes"] = rollout["codes"]
        scores.append(rollout["psnr"])
        baselines.append(rollout["copy_psnr"])
    horizon = max((len(s) for s in scores), default=0)

    def mean_per_step(rows):
        return [float(np.mean([row[k] for row in rows if len(row) > k])) for k in range(horizon)]

    eval_info["overall"]["imagined_psnr_per_step"] = mean_per_step(scores)
    eval_info["overall"]["held_still_psnr_per_step"] = mean_per_step(baselines)
    eval_info["world_model"] = {"vla": str(vla_path), "quantizer": config.quantizer, "gap_seconds": gap_seconds,
                                "gap_control_steps": gap_frames}


def summary_table(eval_info: dict) -> str:
    """Plain-text per-task success rates with their intervals, and the overall rate."""
    lines = [f"{'task':<30} {'success':>8} {'95% CI':>14} {'episodes':>9} {'mean steps':>11}"]
    rows = [(e["task"], e["pc_success"], e["pc_success_ci95"], e["n_episodes"],
             sum(e["metrics"]["steps"]) / len(e["metrics"]["steps"])) for e in eval_info["per_task"]]
    overall = eval_info["overall"]
    for task, rate, (low, high), n, steps in rows:
        lines.append(f"{task:<30} {rate:>7.1f}% {f'[{low:.0f}, {high:.0f}]':>14} {n:>9} {steps:>11.1f}")
    low, high = overall["pc_success_ci95"]
    lines.append(f"{'overall':<30} {overall['pc_success']:>7.1f}% {f'[{low:.0f}, {high:.0f}]':>14} "
                 f"{overall['n_episodes']:>9}   ({overall['eval_s']:.1f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        config = resolve_config(argv)
        evaluate(config)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"evaluate: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
