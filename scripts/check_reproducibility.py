"""Fixed-seed tiny runs of every training stage, fingerprinted: the check that a refactor changed no behaviour.

Runs, through the stages' command lines (an interface that stays put while the code behind it moves):
Meta-World expert data (2 tasks x 6 episodes, 64 px) -> the tiny quantizer (300 steps, codebook replacements at
steps 10..100 and 200/300 included) with its held-out evaluation -> latent labels -> latent pretraining (60 steps)
-> action finetuning (60 steps, 3 episodes per task). Writes one JSON: the SHA-256 of every saved weight file and
of the labels, and the held-out metrics of each stage. Run it before and after a change and compare:

    python scripts/check_reproducibility.py --output-dir /tmp/repro-before --json before.json
    python scripts/check_reproducibility.py --output-dir /tmp/repro-after --json after.json --compare before.json

Bitwise identity is expected on one machine and one software set (not across CPUs or library versions).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "MUJOCO_GL": "egl", "HF_HUB_OFFLINE": "1"}
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True)


def _scalars(tree, prefix="") -> dict:
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_scalars(value, f"{prefix}{key}."))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix[:-1]] = tree
    return out


def run_all(root: Path) -> dict:
    data, quantizer, labelled = root / "data", root / "quantizer", root / "labelled"
    pretrain, finetune = root / "pretrain", root / "finetune"
    if not (data / "meta" / "info.json").is_file():
        _run(["-m", "training.envs.metaworld_data", "--tasks", "reach-v3,drawer-close-v3", "--episodes-per-task", "6",
              "--image-size", "64", "--num-workers", "2", "--output", str(data), "--overwrite", "--no-progress"])
    _run(["training/train_quantizer.py", "--preset", "tiny", "--dataset", str(data), "--output-dir", str(quantizer),
          "--max-steps", "300", "--batch-size", "16", "--save-every", "150", "--eval-every", "300",
          "--holdout-episodes", "2", "--eval-max-pairs", "256", "--probe-train-pairs", "256", "--report-to", "none",
          "--replacement-cooldown-steps", "0", "--seed", "5"])
    _run(["training/label_latents.py", "--dataset", str(data), "--quantizer", str(quantizer / "model"), "--output",
          str(labelled), "--num-workers", "0"])
    _run(["training/pretrain.py", "--preset", "tiny", "--dataset", str(labelled), "--output-dir", str(pretrain),
          "--max-steps", "60", "--eval-every", "30", "--save-every", "30", "--report-to", "none", "--seed", "5"])
    _run(["training/finetune.py", "--preset", "tiny", "--dataset", str(data), "--init-from", str(pretrain / "model"),
          "--output-dir", str(finetune), "--train-episodes-per-task", "3", "--gripper-dims", "[3]", "--max-steps", "60",
          "--eval-every", "30", "--save-every", "30", "--report-to", "none", "--seed", "5"])
    record = {"weights": {}, "labels": {}, "metrics": {}}
    for name, folder in (("quantizer", quantizer), ("pretrain", pretrain), ("finetune", finetune)):
        for weights in sorted((folder / "model").glob("*.safetensors")):
            record["weights"][f"{name}/{weights.name}"] = _sha256(weights)
    for parquet in sorted((labelled / "data").rglob("*.parquet")):
        record["labels"][str(parquet.relative_to(labelled))] = _sha256(parquet)
    record["metrics"]["quantizer"] = _scalars(json.loads((quantizer / "eval" / "final_metrics.json").read_text()))
    for name, folder in (("pretrain", pretrain), ("finetune", finetune)):
        record["metrics"][name] = _scalars(json.loads((folder / "eval_metrics.json").read_text())["final"])
    return record


def compare(now: dict, before: dict) -> list[str]:
    problems = []
    for section in ("weights", "labels"):
        if now[section] != before[section]:
            changed = sorted(k for k in set(now[section]) | set(before[section])
                             if now[section].get(k) != before[section].get(k))
            problems.append(f"{section} differ: {changed}")
    for stage, metrics in before["metrics"].items():
        for key, value in metrics.items():
            # timings are not behaviour
            if "seconds" in key or key.endswith("_s") or "per_second" in key:
                continue
            if now["metrics"].get(stage, {}).get(key) != value:
                problems.append(f"{stage} metric {key}: {value} -> {now['metrics'].get(stage, {}).get(key)}")
    return problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="a fresh folder for the runs")
    parser.add_argument("--json", required=True, help="where to write the fingerprint")
    parser.add_argument("--compare", default=None, help="a fingerprint from before the change")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    root = Path(args.output_dir)
    if (root / "quantizer").exists():
        raise SystemExit(f"{root} already holds runs: give a fresh --output-dir")
    root.mkdir(parents=True, exist_ok=True)
    record = run_all(root)
    Path(args.json).write_text(json.dumps(record, indent=1, sort_keys=True))
    print(f"fingerprint: {args.json} ({len(record['weights'])} weight files, {len(record['labels'])} label files, "
          f"{sum(len(m) for m in record['metrics'].values())} metrics)")
    if args.compare:
        problems = compare(record, json.loads(Path(args.compare).read_text()))
        if problems:
            print("DIFFERENT:\n  " + "\n  ".join(problems))
            return 1
        print("identical: every weight file, every label file and every held-out metric")
    return 0


if __name__ == "__main__":
    sys.exit(main())
