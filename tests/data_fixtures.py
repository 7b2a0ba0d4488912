"""Tiny LeRobot datasets and video folders for the data-layer tests, built directly with pyarrow and PyAV.

The v3.0 and v2.1 folders follow LeRobot's documented layout and are written here by hand (not by our
writer), so that the reader is tested against the format rather than against itself. Frames are smooth
moving patterns, distinct from frame to frame, so that lossy codecs keep every frame recognisable.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

FPS = 10
HEIGHT, WIDTH = 32, 48


def synthetic_frames(num_frames: int, *, seed: int = 0, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """(T, H, W, 3) uint8: sinusoidal gradients whose phase moves with t, plus a moving bright square."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        phase = 0.07 * t + 0.9 * seed
        red = 128 + 100 * np.sin(2 * np.pi * (xx / width + phase))
        green = 128 + 100 * np.cos(2 * np.pi * (yy / height - 0.5 * phase))
        blue = np.full_like(xx, 40 + (37 * seed) % 160)
        image = np.stack([red, green, blue], axis=-1)
        top = (3 * t + 5 * seed) % max(1, height - 8)
        left = (2 * t + 7 * seed) % max(1, width - 8)
        image[top : top + 8, left : left + 8] = 250
        frames[t] = np.clip(image, 0, 255).astype(np.uint8)
    return frames


def encode_frames(path: Path, clips: list[np.ndarray], *, fps: int = FPS, codec: str = "libx264",
                  options: dict | None = None, container_options: dict | None = None) -> list[tuple[float, float]]:
    """Encodes clips one after another in one file; returns each clip's [from, to) seconds in the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = clips[0].shape[1:3]
    ranges, pts = [], 0
    with av.open(str(path), "w", container_options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        for clip in clips:
            ranges.append((pts / fps, (pts + len(clip)) / fps))
            for image in clip:
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts, frame.time_base = pts, Fraction(1, fps)
                pts += 1
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return ranges


def _episode_data(lengths, *, state_dim=4, action_dim=3, seed=0):
    rng = np.random.default_rng(seed)
    states = [rng.normal(size=(n, state_dim)).astype(np.float32) for n in lengths]
    actions = [rng.normal(size=(n, action_dim)).astype(np.float32) for n in lengths]
    return states, actions


def _vector_feature(dim):
    return {"dtype": "float32", "shape": [dim], "names": [f"d{i}" for i in range(dim)]}


def _video_feature(codec_name):
    return {
        "dtype": "video",
        "shape": [HEIGHT, WIDTH, 3],
        "names": ["height", "width", "channels"],
        "info": {"video.height": HEIGHT, "video.width": WIDTH, "video.codec": codec_name,
                 "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": FPS,
                 "video.channels": 3, "has_audio": False},
    }


_SCALAR_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}

TASKS = ["pick up the red block", "open the drawer"]


def build_v30_dataset(root: Path, *, lengths=(12, 9, 15), cameras=("observation.images.top", "observation.images.wrist"),
                      codec: str = "libsvtav1") -> dict:
    """A LeRobot v3.0 folder: episodes 0-1 share data file-000 and video file-000 of each camera, episode 2
    is in data/chunk-000/file-001 and videos/<cam>/chunk-001/file-000 (so chunks and files both vary).

    The default codec is AV1 with a keyframe every 2 frames and CRF 30, LeRobot's recording defaults.
    Returns the ground truth: {"frames": {ep: {cam: (T,H,W,3)}}, "state": [...], "action": [...],
    "tasks": [...], "success": [...], "lengths": [...]}.
    """
    root = Path(root)
    states, actions = _episode_data(lengths)
    frames = {ep: {cam: synthetic_frames(n, seed=ep * 3 + c) for c, cam in enumerate(cameras)}
              for ep, n in enumerate(lengths)}
    episode_tasks = [TASKS[ep % 2] for ep in range(len(lengths))]
    success = [ep % 2 == 0 for ep in range(len(lengths))]
    groups = [(0, 0, [0, 1]), (0, 1, [2])]  # (chunk, file) for data; videos use (file index -> chunk) below
    options = {"g": "2", "crf": "30", "preset": "12"} if codec == "libsvtav1" else {"g": "4", "crf": "20"}
    video_ranges = {}
    for cam in cameras:
        for group_number, (_, _, eps) in enumerate(groups):
            path = root / f"videos/{cam}/chunk-{group_number:03d}/file-000.mp4"
            for ep, rng in zip(eps, encode_frames(path, [frames[ep][cam] for ep in eps], codec=codec, options=options)):
                video_ranges[(ep, cam)] = (group_number, 0, *rng)

    starts = np.concatenate([[0], np.cumsum(lengths)])
    for chunk, file, eps in groups:
        columns = {"observation.state": [], "action": [], "timestamp": [], "frame_index": [],
                   "episode_index": [], "index": [], "task_index": []}
        for ep in eps:
            n = lengths[ep]
            columns["observation.state"].append(states[ep])
            columns["action"].append(actions[ep])
            columns["timestamp"].append((np.arange(n) / FPS).astype(np.float32))
            columns["frame_index"].append(np.arange(n))
            columns["episode_index"].append(np.full(n, ep))
            columns["index"].append(starts[ep] + np.arange(n))
            columns["task_index"].append(np.full(n, TASKS.index(episode_tasks[ep])))
        arrays = {}
        for name, parts in columns.items():
            values = np.concatenate(parts)
            if values.ndim == 2:
                flat = pa.array(values.reshape(-1), pa.float32())
                arrays[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
            else:
                arrays[name] = pa.array(values, pa.float32() if name == "timestamp" else pa.int64())
        path = root / f"data/chunk-{chunk:03d}/file-{file:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(arrays), path)

    episode_rows = []
    for ep, n in enumerate(lengths):
        chunk, file, _ = next(g for g in groups if ep in g[2])
        row = {"episode_index": ep, "tasks": [episode_tasks[ep]], "length": n,
               "data/chunk_index": chunk, "data/file_index": file,
               "dataset_from_index": int(starts[ep]), "dataset_to_index": int(starts[ep + 1])}
        for cam in cameras:
            v_chunk, v_file, start, end = video_ranges[(ep, cam)]
            row.update({f"videos/{cam}/chunk_index": v_chunk, f"videos/{cam}/file_index": v_file,
                        f"videos/{cam}/from_timestamp": start, f"videos/{cam}/to_timestamp": end})
        row["stats/action/mean"] = actions[ep].mean(axis=0).astype(np.float64).tolist()
        row["success"] = success[ep]
        row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = 0, 0
        episode_rows.append(row)
    path = root / "meta/episodes/chunk-000/file-000.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episode_rows), path)
    # LeRobot writes tasks with pandas: the task string is the (named) index, task_index a column.
    pd.DataFrame({"task_index": range(len(TASKS))}, index=pd.Index(TASKS, name="task")).to_parquet(
        root / "meta/tasks.parquet")

    all_actions = np.concatenate(actions)
    stats = {"action": {"min": all_actions.min(0).tolist(), "max": all_actions.max(0).tolist(),
                        "mean": all_actions.mean(0).tolist(), "std": all_actions.std(0).tolist(),
                        "count": [len(all_actions)]}}
    (root / "meta/stats.json").write_text(json.dumps(stats))
    features = {cam: _video_feature("av1" if codec == "libsvtav1" else "h264") for cam in cameras}
    features.update({"observation.state": _vector_feature(4), "action": _vector_feature(3), **_SCALAR_FEATURES})
    info = {
        "codebase_version": "v3.0", "robot_type": "fixture_arm", "total_episodes": len(lengths),
        "total_frames": int(sum(lengths)), "total_tasks": len(TASKS), "chunks_size": 1000,
        "data_files_size_in_mb": 100, "video_files_size_in_mb": 200, "fps": FPS,
        "splits": {"train": f"0:{len(lengths)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": features,
    }
    (root / "meta/info.json").write_text(json.dumps(info, indent=2))
    return {"frames": frames, "state": states, "action": actions, "tasks": episode_tasks, "success": success,
            "lengths": list(lengths), "cameras": list(cameras)}


def build_v21_dataset(root: Path, *, lengths=(8, 11), camera: str = "observation.images.front") -> dict:
    """A LeRobot v2.1 folder: one parquet and one mp4 per episode, jsonl metadata."""
    root = Path(root)
    states, actions = _episode_data(lengths, seed=1)
    frames = {ep: {camera: synthetic_frames(n, seed=10 + ep)} for ep, n in enumerate(lengths)}
    episode_tasks = [TASKS[(ep + 1) % 2] for ep in range(len(lengths))]
    start = 0
    episodes_lines, stats_lines = [], []
    for ep, n in enumerate(lengths):
        encode_frames(root / f"videos/chunk-000/{camera}/episode_{ep:06d}.mp4", [frames[ep][camera]],
                      options={"g": "5", "crf": "18"})
        table = pa.table({
            # v2.1 files written by older tools may use variable-length lists: the reader accepts both.
            "observation.state": pa.array(states[ep].tolist(), pa.list_(pa.float32())),
            "action": pa.array(actions[ep].tolist(), pa.list_(pa.float32())),
            "timestamp": pa.array((np.arange(n) / FPS).astype(np.float32)),
            "frame_index": pa.array(np.arange(n), pa.int64()),
            "episode_index": pa.array(np.full(n, ep), pa.int64()),
            "index": pa.array(start + np.arange(n), pa.int64()),
            "task_index": pa.array(np.full(n, TASKS.index(episode_tasks[ep])), pa.int64()),
        })
        path = root / f"data/chunk-000/episode_{ep:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        episodes_lines.append({"episode_index": ep, "tasks": [episode_tasks[ep]], "length": n})
        stats_lines.append({"episode_index": ep, "stats": {"action": {
            "min": actions[ep].min(0).tolist(), "max": actions[ep].max(0).tolist(),
            "mean": actions[ep].mean(0).tolist(), "std": actions[ep].std(0).tolist(), "count": [n]}}})
        start += n
    meta = root / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "episodes.jsonl").write_text("".join(json.dumps(line) + "\n" for line in episodes_lines))
    (meta / "tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(TASKS)))
    (meta / "episodes_stats.jsonl").write_text("".join(json.dumps(line) + "\n" for line in stats_lines))
    features = {camera: _video_feature("h264"), "observation.state": _vector_feature(4),
                "action": _vector_feature(3), **_SCALAR_FEATURES}
    info = {
        "codebase_version": "v2.1", "robot_type": "fixture_arm", "total_episodes": len(lengths),
        "total_frames": int(sum(lengths)), "total_tasks": len(TASKS), "total_videos": len(lengths),
        "total_chunks": 1, "chunks_size": 1000, "fps": FPS, "splits": {"train": f"0:{len(lengths)}"},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": features,
    }
    (meta / "info.json").write_text(json.dumps(info, indent=2))
    return {"frames": frames, "state": states, "action": actions, "tasks": episode_tasks,
            "lengths": list(lengths), "cameras": [camera]}


def write_with_writer(root: Path, *, lengths=(12, 9, 15), fps: int = FPS, **writer_kwargs) -> dict:
    """A dataset written by our `LeRobotDatasetWriter` (two cameras, state, action, reward, success)."""
    from training.data import LeRobotDatasetWriter

    rng = np.random.default_rng(3)
    truth = {"frames": {}, "state": [], "action": [], "reward": [], "tasks": [], "success": [], "lengths": list(lengths)}
    with LeRobotDatasetWriter(root, fps=fps, robot_type="fixture_arm", **writer_kwargs) as writer:
        for ep, n in enumerate(lengths):
            frames = {"observation.images.top": synthetic_frames(n, seed=ep),
                      "observation.images.wrist": synthetic_frames(n, seed=ep + 20)}
            state = rng.normal(size=(n, 4)).astype(np.float32)
            action = rng.normal(size=(n, 3)).astype(np.float32)
            reward = rng.normal(size=n).astype(np.float32)
            task = TASKS[ep % 2]
            writer.add_episode(frames, task=task, state=state, action=action,
                               extra_frame_columns={"next.reward": reward},
                               episode_metadata={"success": ep % 2 == 1})
            truth["frames"][ep] = frames
            truth["state"].append(state)
            truth["action"].append(action)
            truth["reward"].append(reward)
            truth["tasks"].append(task)
            truth["success"].append(ep % 2 == 1)
    return truth


def best_matching_frame(decoded: np.ndarray, originals: np.ndarray) -> int:
    """Index of the original frame closest (mean absolute error) to a decoded frame."""
    errors = np.abs(originals.astype(np.int16) - decoded.astype(np.int16)).reshape(len(originals), -1).mean(axis=1)
    return int(np.argmin(errors))


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())
