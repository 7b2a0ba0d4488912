"""Latent-action labelling throughput (frames/s, video decoding included), at the tiny preset (64 px) and the
reference size (256 px), with random-init quantizers. Prints a table and writes JSON.

    python benchmarks/label_speed.py                                # tiny + reference
    python benchmarks/label_speed.py --presets tiny --episodes 16 --frames-per-episode 100

For each preset it writes a LeRobot v3.0 dataset of synthetic moving frames at the preset's size (H.264, the
writer's defaults), saves a random quantizer with save_pretrained, and measures, in one process:

- decode: episodes decoded at the quantizer's size (the labeller's decoding, no model), frames/s;
- encode: the model alone on the decoded episodes (`encode_episode`: pairs in chunks of the batch size), frames/s;
- dec+enc: decode then encode, one after the other: the steady-state labelling rate of one process, frames/s;
- end to end: `training/label_latents.py` run in-process on the dataset (load and check the source and the
  model (hashing its weights), decode, encode, write shards, merge the output dataset), frames/s of the whole
  run, for each number of decoding workers (0: decode in the main thread; 1: decode the next episode while the
  model encodes). Its fixed costs weigh on the small datasets used here, most at the reference size.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_report
from modeling_lapa import LAPAQuantizerConfig, LAPAQuantizerModel
from training.data import FramePairDataset, LeRobotDatasetWriter, load_lerobot_dataset
from training.label_latents import main as label_latents_main
from training.labelling import encode_episode, load_quantizer

DEFAULTS = {  # per preset: episodes, frames per episode, batch size
    "tiny": dict(episodes=8, frames_per_episode=60, batch_size=64),
    "reference": dict(episodes=2, frames_per_episode=16, batch_size=8),
}
FPS = 10


def moving_frames(num_frames: int, size: int, seed: int) -> np.ndarray:
    """(T, size, size, 3) uint8: a drifting colour gradient and a bright square crossing the frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0.2, 0.8, size=3)
    square = max(4, size // 8)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        phase = 0.05 * t
        image = np.stack([base[0] + 0.3 * np.sin(2 * np.pi * (xx + phase)),
                          base[1] + 0.3 * np.cos(2 * np.pi * (yy - phase)),
                          np.full_like(xx, base[2])], axis=-1)
        top = (3 * t + seed * 7) % (size - square)
        left = (2 * t + seed * 11) % (size - square)
        image[top : top + square, left : left + square] = 1.0
        frames[t] = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return frames


def write_dataset(root: Path, *, episodes: int, frames_per_episode: int, size: int) -> None:
    rng = np.random.default_rng(0)
    with LeRobotDatasetWriter(root, fps=FPS, robot_type="synthetic") as writer:
        for episode in range(episodes):
            writer.add_episode({"observation.images.main": moving_frames(frames_per_episode, size, episode)},
                               task="move the square", action=rng.normal(size=(frames_per_episode, 4)))


def bench_preset(preset: str, *, episodes: int, frames_per_episode: int, batch_size: int, workers: list[int],
                 scratch: Path) -> list[dict]:
    config = LAPAQuantizerConfig.from_preset(preset)
    size = config.image_size
    source, quantizer = scratch / f"{preset}_source", scratch / f"{preset}_quantizer"
    write_dataset(source, episodes=episodes, frames_per_episode=frames_per_episode, size=size)
    torch.manual_seed(0)
    model = LAPAQuantizerModel(config)
    num_parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(quantizer)
    del model
    frames_total = episodes * frames_per_episode
    common = dict(preset=preset, image_size=size, params_m=round(num_parameters / 1e6, 2), episodes=episodes,
                  frames=frames_total, batch_size=batch_size)

    pairs = FramePairDataset(load_lerobot_dataset(source), gap_seconds=0.6, image_size=size, output="uint8")
    start = time.perf_counter()
    decoded = {episode: pairs.decode_episode(episode) for episode in pairs.episode_indices}
    decode_seconds = time.perf_counter() - start
    decode_fps = frames_total / decode_seconds

    model, _ = load_quantizer(quantizer)
    encode_episode(model, decoded[pairs.episode_indices[0]][:batch_size], 1, batch_size)  # warm-up, one full batch
    start = time.perf_counter()
    for episode, frames in decoded.items():
        encode_episode(model, frames, pairs.gap_frames(episode), batch_size)
    encode_seconds = time.perf_counter() - start
    encode_fps = frames_total / encode_seconds
    # decode then encode, one after the other: the steady-state labelling rate without fixed costs or overlap
    labelling_fps = frames_total / (decode_seconds + encode_seconds)
    del model, decoded

    rows = []
    for num_workers in workers:
        output = scratch / f"{preset}_labelled_w{num_workers}"
        start = time.perf_counter()
        code = label_latents_main([
            "--dataset", str(source), "--quantizer", str(quantizer), "--output", str(output), "--overwrite",
            "--batch-size", str(batch_size), "--num-workers", str(num_workers), "--log-level", "WARNING",
        ])
        seconds = time.perf_counter() - start
        if code != 0:
            raise RuntimeError(f"labelling failed with exit code {code}")
        rows.append(dict(common, num_workers=num_workers, decode_frames_per_s=decode_fps,
                         encode_frames_per_s=encode_fps, decode_and_encode_frames_per_s=labelling_fps,
                         end_to_end_frames_per_s=frames_total / seconds,
                         end_to_end_seconds=seconds))
        print(f"  {preset:9s} {size:4d}px workers={num_workers} decode {decode_fps:9.1f}  encode {encode_fps:8.1f}  "
              f"end to end {frames_total / seconds:8.1f} frames/s ({seconds:.1f} s)", flush=True)
        shutil.rmtree(output, ignore_errors=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "reference"], choices=sorted(DEFAULTS))
    parser.add_argument("--episodes", type=int, default=None, help="episodes per dataset (default: per preset)")
    parser.add_argument("--frames-per-episode", type=int, default=None, help="default: per preset")
    parser.add_argument("--batch-size", type=int, default=None, help="default: tiny 64, reference 8")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="decoding workers to compare")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--output", default="benchmarks/results/label_speed.json")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory(prefix="label_speed_") as scratch:
        for preset in args.presets:
            settings = dict(DEFAULTS[preset])
            for key in ("episodes", "frames_per_episode", "batch_size"):
                if getattr(args, key) is not None:
                    settings[key] = getattr(args, key)
            rows.extend(bench_preset(preset, workers=args.workers, scratch=Path(scratch), **settings))

    header = (f"{'preset':9s} {'px':>4s} {'params':>8s} {'frames':>6s} {'batch':>5s} {'workers':>7s} "
              f"{'decode fr/s':>11s} {'encode fr/s':>11s} {'dec+enc fr/s':>12s} {'end-to-end fr/s':>15s} "
              f"{'seconds':>8s}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['preset']:9s} {r['image_size']:4d} {r['params_m']:7.2f}M {r['frames']:6d} {r['batch_size']:5d} "
              f"{r['num_workers']:7d} {r['decode_frames_per_s']:11.1f} {r['encode_frames_per_s']:11.1f} "
              f"{r['decode_and_encode_frames_per_s']:12.1f} {r['end_to_end_frames_per_s']:15.1f} "
              f"{r['end_to_end_seconds']:8.1f}")
    write_report({
        "benchmark": "label_speed",
        "note": "end to end = one training/label_latents.py run in-process: source and model loading, decoding, "
                "encoding, shard files and the merge into the output dataset",
        "rows": rows,
    }, args.output)


if __name__ == "__main__":
    main()
