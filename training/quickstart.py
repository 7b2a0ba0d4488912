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
import sys
from pathlib import Path



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
        from training.envs import metaworld_data

        data_args = ["--tasks", args.tasks, "--episodes-per-task", str(args.episodes_per_task),
                     "--image-size", str(args.image_size), "--output", str(data_dir), "--overwrite"]
        if args.num_workers:
            data_args += ["--num-workers", str(args.num_workers)]
        metaworld_data.main(data_args)  # raises (with a message) on failure

    _stage("2/5 latent action quantizer (tiny preset)")
    model_dir = run_dir / "model"
    if (model_dir / "model.safetensors").is_file():
        print(f"{model_dir} exists: using it")
    else:
        from training.train_quantizer import resolve_config, train

        settings = ["--preset", "tiny", "--dataset", str(data_dir), "--output-dir", str(run_dir),
                    "--max-steps", str(args.max_steps), "--eval-every", str(max(args.max_steps // 3, 1))]
        if (run_dir / "checkpoints").is_dir():
            settings.append("--resume")
        train(resolve_config(settings))

    _stage("3/5 label every frame with its latent action")
    if (labelled_dir / "meta" / "info.json").is_file() and not (labelled_dir / ".labelling").exists():
        print(f"{labelled_dir} exists: using it")
    else:
        from training import label_latents

        code = label_latents.main(["--dataset", str(data_dir), "--quantizer", str(model_dir), "--output", str(labelled_dir)])
        if code:
            return code

    pretrain_dir, finetune_dir = root / "lapa", root / "lapa_finetuned"
    _stage("4/5 latent pretraining of a tiny VLA (training/pretrain.py)")
    _run_vla_stage("pretrain", pretrain_dir, [
        "--preset", "tiny", "--dataset", str(labelled_dir), "--max-steps", str(args.vla_steps),
        "--eval-every", str(max(args.vla_steps // 2, 1)), "--save-every", str(max(args.vla_steps // 4, 1))])

    _stage("5/5 action finetuning on a few labelled episodes per task (training/finetune.py)")
    steps = max(args.vla_steps // 2, 1)
    _run_vla_stage("finetune", finetune_dir, [
        "--preset", "tiny", "--dataset", str(data_dir), "--init-from", str(pretrain_dir / "model"),
        "--train-episodes-per-task", str(args.finetune_episodes), "--gripper-dims", "[3]", "--max-steps", str(steps),
        "--eval-every", str(max(steps // 2, 1)), "--save-every", str(max(steps // 4, 1))])

    final = run_dir / "eval" / "final_metrics.json"
    if final.is_file():
        metrics = json.loads(final.read_text())
        summary = metrics.get("summary", {})
        _stage("held-out evaluation of the quantizer")
        print(json.dumps(summary, indent=2))
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
    return 0


def _run_vla_stage(stage: str, run_dir: Path, settings: list[str]) -> None:
    if (run_dir / "model" / "model.safetensors").is_file():
        print(f"{run_dir / 'model'} exists: using it")
        return
    from training.vla_training import resolve_config, train

    settings = settings + ["--output-dir", str(run_dir)]
    if (run_dir / "checkpoints").is_dir():
        settings.append("--resume")
    train(resolve_config(stage, settings))


if __name__ == "__main__":
    sys.exit(main())
