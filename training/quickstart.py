"""The whole pipeline on the embedded default data, in one command, ending in what the robot does: Meta-World expert
video -> latent action quantizer -> a dataset labelled with latent actions -> latent pretraining of a tiny VLA ->
action finetuning on a few episodes per task -> closed-loop evaluation in the simulator from unseen initial states ->
an imagined (world-model) rollout GIF. About 17 minutes on 2 CPU cores at the defaults.

    python -m training.quickstart                                  # MT10, 64 px, CPU-sized
    python -m training.quickstart --tasks reach-v3,drawer-close-v3 --episodes-per-task 4 --quantizer-steps 200

Each stage writes under `--output-dir` and is skipped when its output is already there (a training stage that was
interrupted resumes from its last checkpoint), so running the command again after an interruption continues where it
stopped:

    <output_dir>/metaworld/          LeRobot v3.0 dataset of the scripted experts (training/envs/metaworld_data.py)
    <output_dir>/quantizer/          training run: checkpoints, eval/step-N/ metrics and plots, model/ (save_pretrained)
    <output_dir>/metaworld_latent/   the dataset with a `latent_action` feature (training/label_latents.py)
    <output_dir>/lapa/               latent pretraining run (training/pretrain.py): model/ with its processor
    <output_dir>/lapa_finetuned/     action finetuning run (training/finetune.py) on --finetune-episodes per task
    <output_dir>/eval/               closed-loop evaluation (training/evaluate.py): eval_info.json, videos, chart, and
                                     the imagined rollout of each task's first episode beside the real one
    <output_dir>/rollout.gif         world-model rollout (training/imagine.py) from a held-out episode's first frame

The defaults (measured on this project's 2-core CPU machine) spend the time where the robot gains from it: 10 expert
episodes per MT10 task (1,000 quantizer steps: latent actions of 4 codes of 8 that beat copying the frame), latent
pretraining of 1,000 steps on every frame, then 1,500 finetuning steps on 5 labelled episodes per task (the paper
finetunes until the training action accuracy is high; 500 steps stopped at 0.49), and 5 evaluation episodes per task.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from training import train_quantizer, vla_training
from training.envs.metaworld_data import GenerationConfig, generate_dataset
from training.envs.metaworld_tasks import resolve_task_names
from training.evaluate import EvaluationConfig, evaluate, summary_table
from training.imagine import ImagineConfig, imagine_rollout
from training.label_latents import LabellingConfig, label_latents

STAGES = 7


def _stage(number: int, title: str) -> None:
    print(f"\n=== {number}/{STAGES} {title} ===", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/quickstart")
    parser.add_argument("--tasks", default="mt10", help="mt10, mt50 or comma-separated Meta-World task names")
    parser.add_argument("--episodes-per-task", type=int, default=10, help="expert episodes recorded per task")
    parser.add_argument("--image-size", type=int, default=64, help="frames are recorded at this size (tiny preset: 64)")
    parser.add_argument("--quantizer-steps", type=int, default=1000, help="quantizer training steps (tiny preset)")
    parser.add_argument("--num-workers", type=int, default=None, help="simulator worker processes (default: all cores)")
    parser.add_argument("--vla-steps", type=int, default=1000, help="latent pretraining steps of the tiny VLA")
    parser.add_argument("--finetune-steps", type=int, default=1500, help="action finetuning steps")
    parser.add_argument("--finetune-episodes", type=int, default=5, help="labelled robot episodes per task to finetune on")
    parser.add_argument("--eval-episodes", type=int, default=5,
                        help="closed-loop episodes per task, from initial states no training episode used")
    parser.add_argument("--eval-max-steps", type=int, default=200, help="control steps before an episode counts as failed")
    parser.add_argument("--rollout-steps", type=int, default=8, help="gaps (0.6 s each) the world-model GIF imagines")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = Path(args.output_dir)
    paths = {name: root / name for name in ("metaworld", "quantizer", "metaworld_latent", "lapa", "lapa_finetuned",
                                             "eval")}
    paths["rollout"] = root / "rollout.gif"
    timings: dict[str, float] = {}
    workers = args.num_workers or os.cpu_count() or 1

    def timed(name, run):
        start = time.perf_counter()
        run()
        timings[name] = time.perf_counter() - start

    _stage(1, "Meta-World expert data")
    timed("data", lambda: _data(args, paths["metaworld"], workers))
    _stage(2, "latent action quantizer (tiny preset)")
    timed("quantizer", lambda: _quantizer(args, paths["metaworld"], paths["quantizer"]))
    _stage(3, "label every frame with its latent action")
    timed("labels", lambda: _labels(paths["metaworld"], paths["quantizer"] / "model", paths["metaworld_latent"]))
    _stage(4, "latent pretraining of a tiny VLA (training/pretrain.py)")
    timed("pretrain", lambda: _run_vla_stage(
        "pretrain", paths["lapa"], dataset=[str(paths["metaworld_latent"])], max_steps=args.vla_steps,
        eval_every=args.vla_steps, save_every=max(args.vla_steps // 4, 1), eval_max_frames=1000))
    _stage(5, "action finetuning on a few labelled episodes per task (training/finetune.py)")
    timed("finetune", lambda: _run_vla_stage(
        "finetune", paths["lapa_finetuned"], dataset=[str(paths["metaworld"])], init_from=str(paths["lapa"] / "model"),
        train_episodes_per_task=args.finetune_episodes, gripper_dims=[3], max_steps=args.finetune_steps,
        eval_every=args.finetune_steps, save_every=max(args.finetune_steps // 4, 1), eval_max_frames=1000))
    _stage(6, "closed-loop evaluation in Meta-World (training/evaluate.py)")
    timed("evaluate", lambda: _evaluate(args, paths, workers))
    _stage(7, "world-model rollout: the VLA's latent actions decoded by the quantizer (training/imagine.py)")
    timed("imagine", lambda: _imagine(args, paths))
    print_summary(paths, timings)
    return 0


def _data(args, folder: Path, workers: int) -> None:
    if (folder / "meta" / "info.json").is_file():
        print(f"{folder} exists: using it")
        return
    config = GenerationConfig(tasks=tuple(resolve_task_names(args.tasks)), episodes_per_task=args.episodes_per_task,
                              image_size=args.image_size, num_workers=workers)
    print(generate_dataset(config, folder, overwrite=True).table())


def _quantizer(args, data_dir: Path, run_dir: Path) -> None:
    if (run_dir / "model" / "model.safetensors").is_file():
        print(f"{run_dir / 'model'} exists: using it")
        return
    steps = args.quantizer_steps
    # The tiny preset stops replacing codes 500 steps before its 3,000-step end; a shorter run keeps the same share.
    train_quantizer.train(train_quantizer.config_from_preset(
        "tiny", dataset=[str(data_dir)], output_dir=str(run_dir), max_steps=steps, eval_every=steps,
        save_every=max(steps // 4, 1), replacement_cooldown_steps=steps // 6, resume=(run_dir / "checkpoints").is_dir()))


def _labels(data_dir: Path, quantizer_dir: Path, labelled_dir: Path) -> None:
    if (labelled_dir / "meta" / "info.json").is_file() and not (labelled_dir / ".labelling").exists():
        print(f"{labelled_dir} exists: using it")
        return
    label_latents(LabellingConfig(dataset=str(data_dir), quantizer=str(quantizer_dir), output=str(labelled_dir)))


def _run_vla_stage(stage: str, run_dir: Path, **settings) -> None:
    if (run_dir / "model" / "model.safetensors").is_file():
        print(f"{run_dir / 'model'} exists: using it")
        return
    vla_training.train(vla_training.config_from_preset(stage, "tiny", output_dir=str(run_dir),
                                                       resume=(run_dir / "checkpoints").is_dir(), **settings))


def _evaluate(args, paths: dict, workers: int) -> None:
    if (paths["eval"] / "eval_info.json").is_file():
        print(f"{paths['eval'] / 'eval_info.json'} exists: using it")
        return
    evaluate(EvaluationConfig(
        policy=str(paths["lapa_finetuned"] / "model"), tasks=args.tasks, episodes_per_task=args.eval_episodes,
        max_steps=args.eval_max_steps, output_dir=str(paths["eval"]), num_workers=workers, overwrite=True,
        quantizer=str(paths["quantizer"] / "model"), world_model_vla=str(paths["lapa"] / "model")))


def _imagine(args, paths: dict) -> None:
    if paths["rollout"].is_file():
        print(f"{paths['rollout']} exists: using it")
        return
    record = json.loads((paths["lapa_finetuned"] / "model" / "training_config.json").read_text())
    episode = record["split"]["heldout_episodes"][0]  # an episode neither VLA stage trained on
    imagine_rollout(ImagineConfig(vla=str(paths["lapa"] / "model"), quantizer=str(paths["quantizer"] / "model"),
                                  dataset=str(paths["metaworld"]), episode=episode, steps=args.rollout_steps,
                                  output=str(paths["rollout"])))


def _read(path: Path, *keys):
    if not path.is_file():
        return None
    value = json.loads(path.read_text())
    for key in keys:
        value = value[key]
    return value


def _steps(values: list[float]) -> str:
    return "/".join(f"{values[k - 1]:.1f}" for k in (1, 2, 4, 8) if k <= len(values))


def print_summary(paths: dict, timings: dict[str, float]) -> None:
    """One table: the held-out figure of each stage, the closed-loop success per task, and where the files are."""
    print("\n=== summary ===")
    rows = []
    quantizer = _read(paths["quantizer"] / "eval" / "final_metrics.json")
    if quantizer is not None:
        rec, codebook = quantizer["reconstruction"], quantizer["codebook"]
        rows.append(("quantizer (held-out pairs)",
                     f"next-frame PSNR {rec['prediction_psnr_of_mean_mse']:.2f} dB vs {rec['copy_psnr_of_mean_mse']:.2f}"
                     f" dB copying frame t; {100 * rec['fraction_pairs_better_than_copy']:.0f}% of pairs better; "
                     f"min code share {100 * codebook['min_code_fraction']:.1f}%; "
                     f"{codebook['num_distinct_latent_actions']} distinct latent actions"))
    for name, key in (("latent pretraining (held-out frames)", "lapa"),
                      ("action finetuning (held-out frames)", "lapa_finetuned")):
        final = _read(paths[key] / "eval_metrics.json", "final")
        if final is not None:
            text = f"token accuracy {final['token_accuracy']:.3f} (majority {final['majority_baseline_accuracy']:.3f})"
            if "action_l1_teacher_forced" in final:
                text += (f"; action L1 {final['action_l1_teacher_forced']:.3f} "
                         f"(majority {final['majority_baseline_action_l1']:.3f})")
            rows.append((name, text))
    eval_info = _read(paths["eval"] / "eval_info.json")
    if eval_info is not None:
        overall = eval_info["overall"]
        low, high = overall["pc_success_ci95"]
        rows.append(("closed loop (unseen initial states)",
                     f"success {overall['pc_success']:.1f}% [95% CI {low:.1f}, {high:.1f}] over "
                     f"{overall['n_episodes']} episodes"))
        if overall.get("imagined_psnr_per_step"):
            imagined, held = overall["imagined_psnr_per_step"], overall["held_still_psnr_per_step"]
            rows.append(("world model vs real (first episodes)",
                         "PSNR at 0.6 s steps 1/2/4/8: imagined " + _steps(imagined) + " dB; start frame held still "
                         + _steps(held) + " dB"))
    width = max((len(name) for name, _ in rows), default=0)
    for name, text in rows:
        print(f"{name:<{width}}  {text}")
    if eval_info is not None:
        print("\n" + summary_table(eval_info))
    print("\nfiles:")
    for label, path in (("quantizer plots", paths["quantizer"] / "eval"),
                        ("training curves", paths["lapa_finetuned"] / "training_curves.png"),
                        ("success chart", paths["eval"] / "success_per_task.png"),
                        ("episode videos (real | imagined)", paths["eval"] / "videos"),
                        ("imagined rollout GIF", paths["rollout"]),
                        ("finetuned VLA", paths["lapa_finetuned"] / "model")):
        if path.exists():
            print(f"  {label}: {path}")
    if timings:
        print("\ntime (this run): " + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in timings.items())
              + f"; total {sum(timings.values()) / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
