"""The pipeline on the embedded default data, in one command: Meta-World expert video -> latent action quantizer
-> a dataset labelled with latent actions, with the held-out evaluation's figures and plots.

    python -m training.quickstart                                  # MT10, 64 px, CPU-sized (about 30-40 minutes)
    python -m training.quickstart --tasks reach,push --episodes-per-task 4 --max-steps 200   # a few minutes

Each stage writes under `--output-dir` and is skipped or resumed when its output is already there, so running the
command again after an interruption continues where it stopped:

    <output_dir>/metaworld/          LeRobot v3.0 dataset of the scripted experts (training/envs/metaworld_data.py)
    <output_dir>/quantizer/          training run: checkpoints, eval/step-N/ metrics and plots, model/ (save_pretrained)
    <output_dir>/metaworld_latent/   the dataset with a `latent_action` feature (training/label_latents.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/quickstart")
    parser.add_argument("--tasks", default="mt10", help="mt10, mt50 or comma-separated Meta-World task names")
    parser.add_argument("--episodes-per-task", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=64, help="frames are recorded at this size (tiny preset: 64)")
    parser.add_argument("--max-steps", type=int, default=3000, help="quantizer training steps (tiny preset)")
    parser.add_argument("--num-workers", type=int, default=None, help="simulator worker processes (default: all cores)")
    args = parser.parse_args(argv)
    root = Path(args.output_dir)
    data_dir, run_dir, labelled_dir = root / "metaworld", root / "quantizer", root / "metaworld_latent"

    _stage("1/3 Meta-World expert data")
    if (data_dir / "meta" / "info.json").is_file():
        print(f"{data_dir} exists: using it")
    else:
        from training.envs import metaworld_data

        data_args = ["--tasks", args.tasks, "--episodes-per-task", str(args.episodes_per_task),
                     "--image-size", str(args.image_size), "--output", str(data_dir), "--overwrite"]
        if args.num_workers:
            data_args += ["--num-workers", str(args.num_workers)]
        metaworld_data.main(data_args)  # raises (with a message) on failure

    _stage("2/3 latent action quantizer (tiny preset)")
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

    _stage("3/3 label every frame with its latent action")
    if (labelled_dir / "meta" / "info.json").is_file() and not (labelled_dir / ".labelling").exists():
        print(f"{labelled_dir} exists: using it")
    else:
        from training import label_latents

        code = label_latents.main(["--dataset", str(data_dir), "--quantizer", str(model_dir), "--output", str(labelled_dir)])
        if code:
            return code

    final = run_dir / "eval" / "final_metrics.json"
    if final.is_file():
        metrics = json.loads(final.read_text())
        summary = metrics.get("summary", {})
        _stage("held-out evaluation of the quantizer")
        print(json.dumps(summary, indent=2))
        for name, path in sorted((metrics.get("plots") or {}).items()):
            print(f"  plot {name}: {path}")
    print(f"\nlabelled dataset: {labelled_dir}\nquantizer: {model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
