"""Latent-action labelling throughput (frames/s) of the current labeller against the old path (the labelling loop and
network as they were before issue 15, `benchmarks/quantizer_baseline.py`), measured in the same process on the same
decoded episodes, the paths rotated and the median kept; at the tiny preset (64 px) and the reference size (256 px),
with random-init quantizers. Prints a table and writes JSON.

    python benchmarks/label_speed.py                                # tiny + reference
    python benchmarks/label_speed.py --presets tiny --episodes 16 --frames-per-episode 100 --repeats 5

For each preset it writes a LeRobot v3.0 dataset of synthetic moving frames at the preset's size (H.264, the
writer's defaults), saves a random quantizer with save_pretrained, and measures:

- decode: episodes decoded at the quantizer's size (the labeller's decoding, no model), frames/s;
- encode, on the decoded episodes (chunks of the batch size from each episode's first frame), one row per path:
  `old` (the old loop and network, PyTorch's intra-op threads), `new` (`encode_episode` with the labeller's
  default `EncodingThreads`: each chunk split over as many threads as PyTorch has intra-op threads, each thread
  with one intra-op thread), `new, intra-op` (`encode_episode` in this thread with PyTorch's own intra-op threads:
  the model and loop changes alone), and `old, 1 thread` (the old path with one intra-op thread: what the thread
  layout alone is worth on this machine); `codes==` compares every frame's codes with the old path's;
- end to end: `training/label_latents.py` run in-process (load and check the source and the model, decode in one
  worker, encode, write shards, merge the output dataset), the new labeller against the old path (its encoding
  swapped in), frames/s of the whole run; `codes==` compares the labelled datasets' `latent_action` columns. Fixed
  costs weigh on the small datasets used here, most at the reference size.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

import training.label_latents as label_latents_module
from benchmarks.common import write_report
from benchmarks.quantizer_baseline import reference_encode_episode
from modeling_lapa import LAPAQuantizerConfig, LAPAQuantizerModel
from training.data import FramePairDataset, LeRobotDatasetWriter, load_lerobot_dataset
from training.label_latents import main as label_latents_main
from training.labelling import EncodingThreads, encode_episode, load_quantizer

DEFAULTS = {  # per preset: episodes, frames per episode, batch size, timed repeats
    "tiny": dict(episodes=8, frames_per_episode=60, batch_size=64, repeats=5),
    "reference": dict(episodes=2, frames_per_episode=16, batch_size=8, repeats=2),
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


@contextlib.contextmanager
def intra_op_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def encoding_paths(model, batch_size: int) -> dict:
    """Each path: (episode frames, gap) -> codes (T, s)."""
    threads = torch.get_num_threads()

    def new(frames, gap):
        with EncodingThreads(threads) as pool:
            return encode_episode(model, frames, gap, batch_size, threads=pool)

    def old_one_thread(frames, gap):
        with intra_op_threads(1):
            return reference_encode_episode(model, frames, gap, batch_size)

    return {
        "old": lambda frames, gap: reference_encode_episode(model, frames, gap, batch_size),
        "new": new,
        "new, intra-op": lambda frames, gap: encode_episode(model, frames, gap, batch_size),
        "old, 1 thread": old_one_thread,
    }


def bench_encoding(model, decoded: dict, gaps: dict, batch_size: int, repeats: int) -> dict[str, dict]:
    paths = encoding_paths(model, batch_size)
    reference = {episode: paths["old"](frames, gaps[episode]) for episode, frames in decoded.items()}
    same = {name: all(np.array_equal(path(frames, gaps[e]), reference[e]) for e, frames in decoded.items())
            for name, path in paths.items()}
    names, times = list(paths), {name: [] for name in paths}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            for episode, frames in decoded.items():
                paths[name](frames, gaps[episode])
            times[name].append(time.perf_counter() - start)
    return {name: {"seconds": statistics.median(times[name]), "codes_equal": same[name]} for name in paths}


def _old_encode_episode(model, frames, gap_frames, batch_size, device="cpu", threads=None):
    return reference_encode_episode(model, frames, gap_frames, batch_size, device)


def run_labeller(source: Path, quantizer: Path, output: Path, batch_size: int, *, old: bool) -> float:
    """Seconds of one in-process labelling run, the old path's encoding swapped in when `old`."""
    args = ["--dataset", str(source), "--quantizer", str(quantizer), "--output", str(output), "--overwrite",
            "--batch-size", str(batch_size), "--num-workers", "1", "--log-level", "WARNING"]
    saved = label_latents_module.encode_episode
    if old:
        label_latents_module.encode_episode = _old_encode_episode
        args += ["--encode-threads", "0"]
    try:
        start = time.perf_counter()
        code = label_latents_main(args)
        seconds = time.perf_counter() - start
    finally:
        label_latents_module.encode_episode = saved
    if code != 0:
        raise RuntimeError(f"labelling failed with exit code {code}")
    return seconds


def labelled_codes(root: Path) -> np.ndarray:
    tables = [pq.read_table(path) for path in sorted((root / "data").glob("chunk-*/file-*.parquet"))]
    index = np.concatenate([t.column("index").to_numpy() for t in tables])
    codes = np.concatenate([np.stack(t.column("latent_action").to_pylist()) for t in tables])
    return codes[np.argsort(index)]


def bench_preset(preset: str, *, episodes: int, frames_per_episode: int, batch_size: int, repeats: int,
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
                  frames=frames_total, batch_size=batch_size, repeats=repeats, torch_threads=torch.get_num_threads())

    pairs = FramePairDataset(load_lerobot_dataset(source), gap_seconds=0.6, image_size=size, output="uint8")
    start = time.perf_counter()
    decoded = {episode: pairs.decode_episode(episode) for episode in pairs.episode_indices}
    decode_fps = frames_total / (time.perf_counter() - start)
    gaps = {episode: pairs.gap_frames(episode) for episode in decoded}

    model, _ = load_quantizer(quantizer)
    encode_episode(model, decoded[pairs.episode_indices[0]][:batch_size], 1, batch_size)  # warm-up
    encoding = bench_encoding(model, decoded, gaps, batch_size, repeats)
    del model, decoded
    rows = [dict(common, phase="encode", path=name, frames_per_s=frames_total / r["seconds"], seconds=r["seconds"],
                 speedup_vs_old=encoding["old"]["seconds"] / r["seconds"], codes_equal=r["codes_equal"],
                 decode_frames_per_s=decode_fps)
            for name, r in encoding.items()]

    seconds = {"old": [], "new": []}
    outputs = {name: scratch / f"{preset}_labelled_{name}" for name in seconds}
    for r in range(max(1, repeats // 2)):
        for name in (["old", "new"] if r % 2 == 0 else ["new", "old"]):
            seconds[name].append(run_labeller(source, quantizer, outputs[name], batch_size, old=name == "old"))
    same = bool(np.array_equal(labelled_codes(outputs["old"]), labelled_codes(outputs["new"])))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    for name in seconds:
        rows.append(dict(common, phase="end to end", path=name, frames_per_s=frames_total / medians[name],
                         seconds=medians[name], speedup_vs_old=medians["old"] / medians[name], codes_equal=same,
                         decode_frames_per_s=decode_fps))
        shutil.rmtree(outputs[name], ignore_errors=True)
    for row in rows:
        print(f"  {preset:9s} {row['phase']:10s} {row['path']:14s} {row['frames_per_s']:9.1f} frames/s "
              f"x{row['speedup_vs_old']:.2f} codes== {row['codes_equal']}", flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "reference"], choices=sorted(DEFAULTS))
    parser.add_argument("--episodes", type=int, default=None, help="episodes per dataset (default: per preset)")
    parser.add_argument("--frames-per-episode", type=int, default=None, help="default: per preset")
    parser.add_argument("--batch-size", type=int, default=None, help="default: tiny 64, reference 8")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per encoding path (default: per "
                        "preset); the end-to-end runs take half as many each")
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
            for key in ("episodes", "frames_per_episode", "batch_size", "repeats"):
                if getattr(args, key) is not None:
                    settings[key] = getattr(args, key)
            rows.extend(bench_preset(preset, scratch=Path(scratch), **settings))

    header = (f"{'preset':9s} {'px':>4s} {'params':>8s} {'frames':>6s} {'batch':>5s} {'phase':10s} {'path':14s} "
              f"{'frames/s':>9s} {'x old':>6s} {'codes==':>7s}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['preset']:9s} {r['image_size']:4d} {r['params_m']:7.2f}M {r['frames']:6d} {r['batch_size']:5d} "
              f"{r['phase']:10s} {r['path']:14s} {r['frames_per_s']:9.1f} {r['speedup_vs_old']:6.2f} "
              f"{str(r['codes_equal']):>7s}")
    decode = {r["preset"]: r["decode_frames_per_s"] for r in rows}
    print("decoding alone (frames/s): " + ", ".join(f"{preset} {fps:.0f}" for preset, fps in decode.items()))
    write_report({
        "benchmark": "label_speed",
        "old_path": "benchmarks/quantizer_baseline.py (before issue 15)",
        "note": "end to end = one training/label_latents.py run in-process: source and model loading, decoding, "
                "encoding, shard files and the merge into the output dataset",
        "rows": rows,
    }, args.output)


if __name__ == "__main__":
    main()
