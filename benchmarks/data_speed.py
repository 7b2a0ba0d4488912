"""Frame-pair reading speed from a LeRobot v3.0 dataset (H.264 mp4): our map-style and streaming readers
against a naive baseline that opens the video and seeks for every frame, in the same process.

    python benchmarks/data_speed.py                                  # writes a synthetic dataset first
    python benchmarks/data_speed.py --dataset outputs/metaworld      # an existing v3.0/v2.1 folder
    python benchmarks/data_speed.py --episodes 16 --frames 200 --output /tmp/data_speed.json

Readers measured (all yield (2, 3, S, S) uint8 pairs, so that decoding is what is timed):
  naive           per frame: av.open, seek to the frame's timestamp, decode up to it, close (2 per pair)
  map episode     FramePairDataset, frame_access="episode": each episode decoded once, pairs in order
  map seek        FramePairDataset, frame_access="seek": shuffled order, the two frames of a pair by seeking
  map + loader    the map-style episode reader through a DataLoader (2 workers, batches of 32)
  stream          make_streaming_frame_pairs (datasets.IterableDataset), shuffled, one process
  stream + loader the same through a DataLoader (2 workers, batches of 32)
DataLoader rows include starting the worker processes.
The speed-up is pairs/s divided by the naive baseline's pairs/s. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import av
import datasets
import numpy as np
import torch

from benchmarks.common import write_report
from training.data import (
    FramePairDataset,
    LeRobotDatasetWriter,
    load_lerobot_dataset,
    make_streaming_frame_pairs,
)


def synthetic_episode(num_frames: int, size: int, seed: int) -> np.ndarray:
    """(T, size, size, 3) uint8: drifting colour gradients and a moving square, like a simple robot scene."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    speed = rng.uniform(0.02, 0.06, size=2)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        red = 128 + 90 * np.sin(2 * np.pi * (xx + speed[0] * t))
        green = 128 + 90 * np.cos(2 * np.pi * (yy - speed[1] * t))
        blue = 100 + 60 * np.sin(2 * np.pi * (xx + yy + 0.01 * t))
        image = np.stack([red, green, blue], axis=-1)
        top, left = int((0.3 + 0.3 * np.sin(0.1 * t + seed)) * size), int((0.3 + 0.3 * np.cos(0.07 * t)) * size)
        image[top : top + size // 8, left : left + size // 8] = (250, 240, 30)
        frames[t] = np.clip(image, 0, 255).astype(np.uint8)
    return frames


def write_dataset(root: Path, episodes: int, frames: int, size: int, fps: int) -> float:
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    with LeRobotDatasetWriter(root, fps=fps, robot_type="synthetic", overwrite=True) as writer:
        for episode in range(episodes):
            writer.add_episode(
                {"observation.images.main": synthetic_episode(frames, size, seed=episode)},
                task=f"task {episode % 4}",
                state=rng.normal(size=(frames, 8)),
                action=rng.normal(size=(frames, 4)),
            )
    return time.perf_counter() - start


def naive_read_frame(path: str, timestamp: float, size: int | None) -> np.ndarray:
    """Opens the file, seeks to the keyframe before `timestamp`, decodes up to the frame, closes."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # like our readers: parallelism comes from processes
        container.seek(int(timestamp / stream.time_base), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.time >= timestamp - 1e-4:
                if size is None:
                    return frame.to_ndarray(format="rgb24")
                return frame.to_ndarray(format="rgb24", width=size, height=size, interpolation="AREA")
    raise RuntimeError(f"{path}: no frame at {timestamp}s")


def naive_pair(dataset, pairs: FramePairDataset, idx: int) -> np.ndarray:
    episode, t, target = pairs.locate(idx)
    path, from_timestamp, _ = dataset.meta.video_segment(episode, pairs.camera_key)
    fps = dataset.meta.fps
    images = [naive_read_frame(str(path), from_timestamp + i / fps, pairs.image_size) for i in (t, target)]
    return np.stack(images).transpose(0, 3, 1, 2)  # (2, 3, S, S)


def timed(name: str, count_and_run) -> dict:
    start = time.perf_counter()
    count = count_and_run()
    seconds = time.perf_counter() - start
    return {"reader": name, "pairs": count, "seconds": seconds, "pairs_per_second": count / seconds}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="an existing LeRobot dataset folder (default: write a synthetic one)")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--frames", type=int, default=120, help="frames per synthetic episode")
    parser.add_argument("--size", type=int, default=128, help="synthetic frame size")
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--gap-seconds", type=float, default=0.6)
    parser.add_argument("--image-size", type=int, default=64, help="pairs are resized to this square size")
    parser.add_argument("--naive-pairs", type=int, default=200, help="pairs read by the (slow) naive baseline")
    parser.add_argument("--seek-pairs", type=int, default=400, help="pairs read by the map-style seek reader")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the DataLoader rows")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "data_speed.json"))
    return parser


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        write_seconds = None
        if args.dataset:
            root = Path(args.dataset)
        else:
            root = Path(tmp) / "synthetic_v30"
            write_seconds = write_dataset(root, args.episodes, args.frames, args.size, args.fps)
        dataset = load_lerobot_dataset(root)
        common = dict(gap_seconds=args.gap_seconds, image_size=args.image_size, output="uint8")
        pairs = FramePairDataset(dataset, **common)
        total = len(pairs)
        rng = np.random.default_rng(0)
        results = []

        naive_indices = np.linspace(0, total - 1, min(args.naive_pairs, total)).round().astype(int)
        results.append(timed("naive (open+seek per frame)", lambda: sum(1 for i in naive_indices if naive_pair(dataset, pairs, int(i)) is not None)))
        results.append(timed("map episode (in order)", lambda: sum(1 for i in range(total) if pairs[i] is not None)))
        seek_pairs = FramePairDataset(dataset, frame_access="seek", **common)
        seek_order = rng.permutation(total)[: args.seek_pairs]
        results.append(timed("map seek (shuffled)", lambda: sum(1 for i in seek_order if seek_pairs[int(i)] is not None)))
        loader = torch.utils.data.DataLoader(pairs, batch_size=args.batch_size, num_workers=2)
        results.append(timed("map episode (DataLoader, 2 workers)", lambda: sum(len(b["index"]) for b in loader)))
        results.append(timed("stream (shuffled, 1 process)", lambda: sum(1 for _ in make_streaming_frame_pairs(pairs, seed=0))))
        stream = make_streaming_frame_pairs(pairs, seed=0)
        loader = torch.utils.data.DataLoader(stream, batch_size=args.batch_size, num_workers=2)
        results.append(timed("stream (DataLoader, 2 workers)", lambda: sum(len(b["index"]) for b in loader)))

        # The readers must agree with the baseline: same frames, same pixels.
        check = [int(i) for i in naive_indices[:: max(1, len(naive_indices) // 10)]]
        max_difference = max(
            int(np.abs(naive_pair(dataset, pairs, i).astype(int) - pairs[i]["pixel_values"].numpy().astype(int)).max())
            for i in check
        )

    baseline = results[0]["pairs_per_second"]
    for row in results:
        row["speedup_vs_naive"] = row["pairs_per_second"] / baseline
    header = f"{'reader':34s} {'pairs':>6s} {'seconds':>8s} {'pairs/s':>9s} {'vs naive':>9s}"
    print(f"\nframe pairs from {root.name if args.dataset else 'a synthetic LeRobot v3.0 dataset'}: "
          f"{dataset.meta.total_episodes} episodes x {dataset.meta.total_frames // max(1, dataset.meta.total_episodes)} "
          f"frames, {dataset.meta.fps} fps, gap {args.gap_seconds}s ({pairs.gap_frames(pairs.episode_indices[0])} frames), "
          f"pairs resized to {args.image_size}x{args.image_size}")
    print(header)
    print("-" * len(header))
    for row in results:
        print(f"{row['reader']:34s} {row['pairs']:6d} {row['seconds']:8.2f} {row['pairs_per_second']:9.1f} "
              f"{row['speedup_vs_naive']:8.1f}x")
    print(f"largest pixel difference between the readers and the naive baseline: {max_difference}")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other processes make the numbers noisy)")

    report = {
        "benchmark": "data_speed",
        "config": {**vars(args), "dataset": str(args.dataset) if args.dataset else "synthetic",
                   "total_pairs": total, "dataset_write_seconds": write_seconds,
                   "codec": dataset.meta.features[pairs.camera_key].get("info", {}).get("video.codec")},
        "environment": {"av": av.__version__, "datasets": datasets.__version__},
        "results": results,
        "max_pixel_difference_vs_naive": max_difference,
    }
    write_report(report, args.output)


if __name__ == "__main__":
    main()
