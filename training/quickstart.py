"""The pipeline on the embedded default data, in one command: Meta-World expert video -> latent action quantizer
-> a dataset labelled with latent actions -> latent pretraining of a tiny VLA -> action finetuning on a few
episodes per task, with the held-out figures of every stage.

    python -m training.quickstart                                  # MT10, 64 px, CPU-sized (about 50-60 minutes)
    python -m training.quickstart --tasks reach,push --episodes-per-task 4 --max-steps 200 --vla-steps 100

Each stage writes under `--output-dir` and is skipped or resumed when its output is already there, so running the
command again after an interruption continues where it stopped:

    <output_dir>/metaworld/          LeRobot v3.0 dataset of the scripted experts (training/envs/metaworld_data.py)
    <output_dir>/quantizer/          training run: checkpoints, eval/step-N/ metrics and plots, model/ (save_pretrained)
    <output_dir>/metaworld_latent/   the dataset with a `latent_action` feature (training/label_latents.py)
    <output_dir>/lapa/               latent pretraining run (training/pretrain.py): model/ with its processor
    <output_dir>/lapa_finetuned/     action finetuning run (training/finetune.py) on --finetune-episodes per task
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from training import train_quantizer, vla_training
from training.envs.metaworld_data import GenerationConfig, generate_dataset
from training.envs.metaworld_tasks import resolve_task_names
from training.label_latents import LabellingConfig, label_latents


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/quickstart")
    parser.add_argument("--tasks", default="mt10", help="mt10, mt50 or comma-separated Meta-World task names")
    parser.add_argument("--episodes-per-task", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=64, help="frames are recorded at this size (tiny preset: 64)")
    parser.add_argument("--max-steps", type=int, default=3000, help="quantizer training steps (tiny preset)")
    parser.add_argument("--num-workers", type=int, default=None, help="simulator worker processes (default: all cores)")
    parser.add_argument("--vla-steps", type=int, default=1000,
                        help="latent pretraining steps of the tiny VLA; finetuning takes half as many")
    parser.add_argument("--finetune-episodes", type=int, default=5, help="labelled robot episodes per task to finetune on")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = Path(args.output_dir)
    data_dir, run_dir, labelled_dir = root / "metaworld", root / "quantizer", root / "metaworld_latent"

    _stage("1/5 Meta-World expert data")
    if (data_dir / "meta" / "info.json").is_file():
        print(f"{data_dir} exists: using it")
    else:
        config = GenerationConfig(tasks=tuple(resolve_task_names(args.tasks)), episodes_per_task=args.episodes_per_task,
                                  image_size=args.image_size, num_workers=args.num_workers or os.cpu_count() or 1)
        print(generate_dataset(config, data_dir, overwrite=True).table())

    _stage("2/5 latent action quantizer (tiny preset)")
    model_dir = run_dir / "model"
    if (model_dir / "model.safetensors").is_file():
        print(f"{model_dir} exists: using it")
    else:
        train_quantizer.train(train_quantizer.config_from_preset(
            "tiny", dataset=[str(data_dir)], output_dir=str(run_dir), max_steps=args.max_steps,
            eval_every=max(args.max_steps // 3, 1), resume=(run_dir / "checkpoints").is_dir()))

    _stage("3/5 label every frame with its latent action")
    if (labelled_dir / "meta" / "info.json").is_file() and not (labelled_dir / ".labelling").exists():
        print(f"{labelled_dir} exists: using it")
    else:
        label_latents(LabellingConfig(dataset=str(data_dir), quantizer=str(model_dir), output=str(labelled_dir)))

    pretrain_dir, finetune_dir = root / "lapa", root / "lapa_finetuned"
    _stage("4/5 latent pretraining of a tiny VLA (training/pretrain.py)")
    _run_vla_stage("pretrain", pretrain_dir, dataset=[str(labelled_dir)], max_steps=args.vla_steps,
                   eval_every=max(args.vla_steps // 2, 1), save_every=max(args.vla_steps // 4, 1))

    _stage("5/5 action finetuning on a few labelled episodes per task (training/finetune.py)")
    steps = max(args.vla_steps // 2, 1)
    _run_vla_stage("finetune", finetune_dir, dataset=[str(data_dir)], init_from=str(pretrain_dir / "model"),
                   train_episodes_per_task=args.finetune_episodes, gripper_dims=[3], max_steps=steps,
                   eval_every=max(steps // 2, 1), save_every=max(steps // 4, 1))
    _print_summary(run_dir, model_dir, labelled_dir, pretrain_dir, finetune_dir)
    return 0


def _print_summary(run_dir: Path, model_dir: Path, labelled_dir: Path, pretrain_dir: Path, finetune_dir: Path) -> None:
    final = run_dir / "eval" / "final_metrics.json"
    if final.is_file():
        metrics = json.loads(final.read_text())
        _stage("held-out evaluation of the quantizer")
        print(json.dumps(metrics.get("summary", {}), indent=2))
        for name, path in sorted((metrics.get("plots") or {}).items()):
            print(f"  plot {name}: {path}")
    for title, folder in (("latent pretraining", pretrain_dir), ("action finetuning", finetune_dir)):
        metrics_file = folder / "eval_metrics.json"
        if metrics_file.is_file():
            final_metrics = json.loads(metrics_file.read_text())["final"]
            _stage(f"held-out evaluation of the {title}")
            print(json.dumps({k: v for k, v in final_metrics.items() if k != "token_accuracy_per_position"}, indent=2))
    print(f"\nlabelled dataset: {labelled_dir}\nquantizer: {model_dir}\nlatent-pretrained VLA: {pretrain_dir / 'model'}"
          f"\nfinetuned VLA: {finetune_dir / 'model'}")


def _run_vla_stage(stage: str, run_dir: Path, **settings) -> None:
    if (run_dir / "model" / "model.safetensors").is_file():
        print(f"{run_dir / 'model'} exists: using it")
        return
    vla_training.train(vla_training.config_from_preset(stage, "tiny", output_dir=str(run_dir),
                                                       resume=(run_dir / "checkpoints").is_dir(), **settings))


if __name__ == "__main__":
    sys.exit(main())
