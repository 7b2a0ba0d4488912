"""Writes LeRobot v3.0 datasets: episodes of camera frames, states, actions and a task string.

    with LeRobotDatasetWriter("outputs/my_dataset", fps=10, robot_type="sawyer") as writer:
        for episode in episodes:
            writer.add_episode(
                {"observation.images.corner": frames},        # (T, H, W, 3) uint8 per camera
                task="push the puck to the goal",
                state=states,                                  # (T, Ds) float
                action=actions,                                # (T, Da) float
                episode_metadata={"success": True},            # extra columns of meta/episodes
            )
    # finalize() (called on exit) writes meta/info.json, stats.json, tasks.parquet and the episodes parquet.

Episodes are appended one at a time and only the current one is in memory: frames go straight into the open
H.264 encoder of each camera (several episodes share one mp4 until it reaches `video_files_size_mb`), frame
rows into the open parquet file (until `data_files_size_mb`). The per-episode metadata rows (a few hundred
bytes each) are kept until `finalize()`. A dataset is readable only after `finalize()`: mp4 files get their
index when they are closed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import EmptyEpisodeError
from .lerobot_format import (
    CODEBASE_VERSION,
    DATA_PATH,
    DEFAULT_CHUNKS_SIZE,
    DEFAULT_DATA_FILES_SIZE_IN_MB,
    DEFAULT_FEATURES,
    DEFAULT_VIDEO_FILES_SIZE_IN_MB,
    EPISODES_PATH,
    INFO_PATH,
    STATS_PATH,
    TASKS_PATH,
    VIDEO_PATH,
    data_arrow_schema,
    feature_from_array,
    next_chunk_file,
)
from .stats import (
    RunningFeatureStats,
    compute_image_stats,
    compute_vector_stats,
    image_pixels_for_stats,
    stats_to_json,
)
from .video import VideoEncoder, probe_video

logger = logging.getLogger(__name__)

_MB = 1024 * 1024
# Columns of meta/episodes that the writer fills itself; episode_metadata may not use these names.
_RESERVED_EPISODE_COLUMNS = {
    "episode_index",
    "tasks",
    "length",
    "data/chunk_index",
    "data/file_index",
    "dataset_from_index",
    "dataset_to_index",
    "meta/episodes/chunk_index",
    "meta/episodes/file_index",
}


def _arrow_column(values: np.ndarray, kind: pa.DataType) -> pa.Array:
    """numpy values (T,) or (T, D) as an arrow array of the schema's type (fixed-size lists for vectors)."""
    if pa.types.is_fixed_size_list(kind):
        flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=kind.value_type)
        return pa.FixedSizeListArray.from_arrays(flat, kind.list_size)
    return pa.array(np.asarray(values).reshape(len(values)), type=kind)


class LeRobotDatasetWriter:
    """Writes a LeRobot v3.0 dataset folder incrementally, one episode at a time.

    Args:
        root: output folder; must not exist or be empty, unless `overwrite=True` (then it is deleted first).
        fps: frames per second of every episode (LeRobot stores an int).
        robot_type: stored in info.json (e.g. "sawyer").
        crf: H.264 constant rate factor: 0 is lossless in YUV, 23 is x264's default, higher is smaller/worse.
        keyframe_interval: frames between keyframes (GOP size). None means 2 * fps: a seek then decodes at
            most 2 s of video, while the files stay small. Every episode also starts with a keyframe, so an
            episode decodes without the episode before it in a shared file.
        pix_fmt: "yuv420p" (default, plays everywhere, needs even sizes) or "yuv444p" (full chroma).
        codec: FFmpeg encoder, "libx264" (H.264) by default.
        data_files_size_mb, video_files_size_mb: when the current parquet / mp4 file would grow past this,
            the next episode starts a new file (LeRobot's `data_files_size_in_mb` / `video_files_size_in_mb`).
        chunks_size: files per chunk-<3-digit index> folder.
        feature_names: optional names of the dimensions, e.g. {"action": ["dx", "dy", "dz", "gripper"]}.
        overwrite: delete an existing `root` first.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        fps: int,
        robot_type: str | None = None,
        crf: int = 23,
        keyframe_interval: int | None = None,
        pix_fmt: str = "yuv420p",
        codec: str = "libx264",
        data_files_size_mb: float = DEFAULT_DATA_FILES_SIZE_IN_MB,
        video_files_size_mb: float = DEFAULT_VIDEO_FILES_SIZE_IN_MB,
        chunks_size: int = DEFAULT_CHUNKS_SIZE,
        feature_names: dict[str, list[str]] | None = None,
        overwrite: bool = False,
    ):
        self.root = Path(root)
        if self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{self.root} exists and is not empty; pass overwrite=True to replace it")
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        if int(fps) != fps or fps <= 0:
            raise ValueError(f"fps must be a positive integer (LeRobot's info.json stores an int), got {fps}")
        self.fps = int(fps)
        self.robot_type = robot_type
        self.crf = crf
        self.keyframe_interval = keyframe_interval if keyframe_interval is not None else 2 * self.fps
        self.pix_fmt = pix_fmt
        self.codec = codec
        self.data_files_size_mb = data_files_size_mb
        self.video_files_size_mb = video_files_size_mb
        self.chunks_size = chunks_size
        self.feature_names = dict(feature_names or {})

        self.features: dict[str, dict] | None = None  # fixed by the first episode
        self.camera_keys: list[str] = []
        self._tasks: dict[str, int] = {}
        self._episode_rows: list[dict] = []
        self._total_frames = 0
        self._running_stats: dict[str, RunningFeatureStats] = {}
        self._data_schema: pa.Schema | None = None
        self._data_writer: pq.ParquetWriter | None = None
        self._data_location = (0, 0)  # (chunk_index, file_index) of the open data file
        self._data_frames_in_file = 0
        self._encoders: dict[str, VideoEncoder] = {}
        self._video_locations: dict[str, tuple[int, int]] = {}
        self._finalized = False

    # -- schema ------------------------------------------------------------------------------------------
    def _build_features(self, frames, state, action, extra) -> dict[str, dict]:
        features: dict[str, dict] = {}
        for key, array in frames.items():
            features[key] = {
                "dtype": "video",
                "shape": [int(array.shape[1]), int(array.shape[2]), 3],
                "names": ["height", "width", "channels"],
                "info": None,  # filled from the encoded files in finalize()
            }
        for key, values in (("observation.state", state), ("action", action), *extra.items()):
            if values is not None:
                features[key] = feature_from_array(values, names=self.feature_names.get(key))
        for key, ft in DEFAULT_FEATURES.items():
            features[key] = dict(ft)
        return features

    def _check_same_schema(self, frames, state, action, extra) -> None:
        expected = self._build_features(frames, state, action, extra)
        shape_of = lambda fts: {k: (ft["dtype"], tuple(ft["shape"])) for k, ft in fts.items()}  # noqa: E731
        if shape_of(expected) != shape_of(self.features):
            raise ValueError(
                f"episode {len(self._episode_rows)} does not match the dataset's features: expected "
                f"{shape_of(self.features)}, got {shape_of(expected)}"
            )

    # -- writing -----------------------------------------------------------------------------------------
    def add_episode(
        self,
        frames: dict[str, np.ndarray],
        *,
        task: str,
        state: np.ndarray | None = None,
        action: np.ndarray | None = None,
        extra_frame_columns: dict[str, np.ndarray] | None = None,
        episode_metadata: dict | None = None,
    ) -> int:
        """Appends one episode and returns its episode index.

        Args:
            frames: {camera feature name (e.g. "observation.images.corner"): (T, H, W, 3) uint8 RGB}.
            task: the language instruction of the episode.
            state: (T, Ds) robot state, stored as float32 "observation.state".
            action: (T, Da) action at each frame, stored as float32 "action".
            extra_frame_columns: more per-frame columns, {name: (T,) or (T, D)} (e.g. "next.reward").
            episode_metadata: per-episode values (e.g. {"success": True}) stored as columns of
                meta/episodes and read back through `.meta.episodes`.
        """
        if self._finalized:
            raise RuntimeError(f"{self.root}: the writer is finalized; open a new one to add episodes")
        if not isinstance(task, str) or not task:
            raise ValueError("task must be a non-empty string (the episode's instruction)")
        extra = {key: np.asarray(value) for key, value in (extra_frame_columns or {}).items()}
        frames = {key: np.asarray(value) for key, value in frames.items()}
        state = None if state is None else np.asarray(state, dtype=np.float32)
        action = None if action is None else np.asarray(action, dtype=np.float32)
        episode_index = len(self._episode_rows)
        length = self._validate_episode(episode_index, frames, state, action, extra, episode_metadata or {})

        if self.features is None:
            self.features = self._build_features(frames, state, action, extra)
            self.camera_keys = list(frames)
            self._data_schema = data_arrow_schema(self.features)
        else:
            self._check_same_schema(frames, state, action, extra)

        task_index = self._tasks.setdefault(task, len(self._tasks))
        columns: dict[str, np.ndarray] = {}
        if state is not None:
            columns["observation.state"] = state
        if action is not None:
            columns["action"] = action
        columns.update(extra)
        frame_index = np.arange(length, dtype=np.int64)
        columns["timestamp"] = (frame_index / self.fps).astype(np.float32)
        columns["frame_index"] = frame_index
        columns["episode_index"] = np.full(length, episode_index, dtype=np.int64)
        columns["index"] = self._total_frames + frame_index
        columns["task_index"] = np.full(length, task_index, dtype=np.int64)

        # Statistics first: if anything is wrong with the data, fail before any file is touched.
        episode_stats = {key: compute_image_stats(array) for key, array in frames.items()}
        for key, values in columns.items():
            episode_stats[key] = compute_vector_stats(values.astype(np.float64))

        row: dict = {"episode_index": episode_index, "tasks": [task], "length": length}
        chunk_index, file_index = self._write_frame_rows(columns, length)
        row.update({"data/chunk_index": chunk_index, "data/file_index": file_index})
        row.update({"dataset_from_index": self._total_frames, "dataset_to_index": self._total_frames + length})
        for key, array in frames.items():
            row.update(self._write_video(key, array))
        for feature, per in episode_stats.items():
            for stat, value in per.items():
                row[f"stats/{feature}/{stat}"] = np.asarray(value).tolist()
        row.update(episode_metadata or {})

        for key, array in frames.items():
            running = self._running_stats.setdefault(key, RunningFeatureStats(image=True))
            running.update(image_pixels_for_stats(array), frames=int(episode_stats[key]["count"][0]))
        for key, values in columns.items():
            self._running_stats.setdefault(key, RunningFeatureStats()).update(values)

        self._episode_rows.append(row)
        self._total_frames += length
        return episode_index

    def _validate_episode(self, episode_index, frames, state, action, extra, metadata) -> int:
        lengths = {f"frames[{key!r}]": len(array) for key, array in frames.items()}
        for name, values in (("state", state), ("action", action), *extra.items()):
            if values is not None:
                lengths[name] = len(values)
        if not lengths:
            raise ValueError("an episode needs at least one camera, a state or an action")
        if len(set(lengths.values())) != 1:
            raise ValueError(f"episode {episode_index}: inputs have different numbers of frames: {lengths}")
        length = next(iter(lengths.values()))
        if length == 0:
            raise EmptyEpisodeError(self.root, episode_index=episode_index)
        for key, array in frames.items():
            if "/" in key:
                raise ValueError(f"feature names may not contain '/': {key!r}")
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
                raise ValueError(
                    f"episode {episode_index}: frames[{key!r}] must be uint8 (T, H, W, 3) RGB, "
                    f"got {array.dtype} {array.shape}"
                )
        for name, values in (("state", state), ("action", action)):
            if values is not None and values.ndim != 2:
                raise ValueError(f"episode {episode_index}: {name} must be (T, D), got shape {values.shape}")
        for key, values in extra.items():
            if "/" in key or key in DEFAULT_FEATURES or key in frames or key in ("observation.state", "action"):
                raise ValueError(f"extra frame column {key!r} clashes with a reserved or existing name")
            if values.ndim not in (1, 2) or values.dtype == object:
                raise ValueError(f"extra frame column {key!r} must be numeric (T,) or (T, D), got {values.shape}")
        for key in metadata:
            if key in _RESERVED_EPISODE_COLUMNS or key.startswith(("stats/", "videos/")):
                raise ValueError(f"episode_metadata key {key!r} is a reserved meta/episodes column")
        return length

    def _write_frame_rows(self, columns: dict[str, np.ndarray], length: int) -> tuple[int, int]:
        table = pa.Table.from_arrays(
            [_arrow_column(columns[field.name], field.type) for field in self._data_schema],
            schema=self._data_schema,
        )
        if self._data_writer is not None and self._data_frames_in_file > 0:
            size_mb = os.path.getsize(self._data_writer.where) / _MB
            if size_mb + size_mb / self._data_frames_in_file * length >= self.data_files_size_mb:
                self._data_writer.close()
                self._data_writer = None
                self._data_location = next_chunk_file(*self._data_location, self.chunks_size)
        if self._data_writer is None:
            chunk_index, file_index = self._data_location
            path = self.root / DATA_PATH.format(chunk_index=chunk_index, file_index=file_index)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._data_writer = pq.ParquetWriter(str(path), self._data_schema)
            self._data_frames_in_file = 0
        self._data_writer.write_table(table)
        self._data_frames_in_file += length
        return self._data_location

    def _write_video(self, key: str, frames: np.ndarray) -> dict:
        encoder = self._encoders.get(key)
        if encoder is not None and encoder.frames_written > 0:
            size_mb = encoder.estimated_size_bytes / _MB
            if size_mb + size_mb / encoder.frames_written * len(frames) >= self.video_files_size_mb:
                encoder.close()
                self._video_locations[key] = next_chunk_file(*self._video_locations[key], self.chunks_size)
                encoder = None
        if encoder is None:
            chunk_index, file_index = self._video_locations.setdefault(key, (0, 0))
            path = self.root / VIDEO_PATH.format(video_key=key, chunk_index=chunk_index, file_index=file_index)
            encoder = VideoEncoder(
                path,
                fps=self.fps,
                width=frames.shape[2],
                height=frames.shape[1],
                codec=self.codec,
                pix_fmt=self.pix_fmt,
                crf=self.crf,
                keyframe_interval=self.keyframe_interval,
            )
            self._encoders[key] = encoder
        start, end = encoder.add_frames(frames)
        chunk_index, file_index = self._video_locations[key]
        return {
            f"videos/{key}/chunk_index": chunk_index,
            f"videos/{key}/file_index": file_index,
            f"videos/{key}/from_timestamp": start / self.fps,
            f"videos/{key}/to_timestamp": end / self.fps,
        }

    # -- metadata ----------------------------------------------------------------------------------------
    def finalize(self) -> None:
        """Closes the open files and writes info.json, stats.json, tasks.parquet and the episodes parquet.
        Idempotent."""
        if self._finalized:
            return
        self._finalized = True
        for encoder in self._encoders.values():
            encoder.close()
        if self._data_writer is not None:
            self._data_writer.close()
            self._data_writer = None
        features = self.features or {key: dict(ft) for key, ft in DEFAULT_FEATURES.items()}
        for key in self.camera_keys:
            features[key]["info"] = self._video_info(key)
        self._write_episodes()
        self._write_tasks()
        stats = {key: running.get() for key, running in self._running_stats.items()}
        (self.root / STATS_PATH).write_text(json.dumps(stats_to_json(stats), indent=4))
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": len(self._episode_rows),
            "total_frames": self._total_frames,
            "total_tasks": len(self._tasks),
            "chunks_size": self.chunks_size,
            "data_files_size_in_mb": self.data_files_size_mb,
            "video_files_size_in_mb": self.video_files_size_mb,
            "fps": self.fps,
            "splits": {"train": f"0:{len(self._episode_rows)}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.camera_keys else None,
            "features": features,
        }
        (self.root / INFO_PATH).write_text(json.dumps(info, indent=4))
        logger.info("wrote %d episodes (%d frames) to %s", len(self._episode_rows), self._total_frames, self.root)

    def _video_info(self, key: str) -> dict:
        chunk_index, file_index = 0, 0
        probed = probe_video(self.root / VIDEO_PATH.format(video_key=key, chunk_index=chunk_index, file_index=file_index))
        return {
            "video.height": probed.height,
            "video.width": probed.width,
            "video.codec": probed.codec,
            "video.pix_fmt": probed.pix_fmt,
            "video.is_depth_map": False,
            "video.fps": self.fps,
            "video.channels": 3,
            "video.g": self.keyframe_interval,
            "video.crf": self.crf,
            "has_audio": probed.has_audio,
        }

    def _write_episodes(self) -> None:
        rows = self._episode_rows
        if not rows:
            return
        # Every row gets every column (episode_metadata keys may differ between episodes; missing -> null).
        columns: list[str] = []
        for row in rows:
            columns.extend(key for key in row if key not in columns)
        table = pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows])
        rows_per_file = max(1, int(self.data_files_size_mb * _MB / max(1, table.nbytes / len(rows))))
        chunk_index, file_index = 0, 0
        for start in range(0, len(rows), rows_per_file):
            part = table.slice(start, rows_per_file)
            part = part.append_column("meta/episodes/chunk_index", pa.array([chunk_index] * len(part), pa.int64()))
            part = part.append_column("meta/episodes/file_index", pa.array([file_index] * len(part), pa.int64()))
            path = self.root / EPISODES_PATH.format(chunk_index=chunk_index, file_index=file_index)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(part, path)
            chunk_index, file_index = next_chunk_file(chunk_index, file_index, self.chunks_size)

    def _write_tasks(self) -> None:
        tasks = pd.DataFrame(
            {"task_index": np.array(list(self._tasks.values()), dtype=np.int64)},
            index=pd.Index(list(self._tasks), name="task"),
        )
        (self.root / TASKS_PATH).parent.mkdir(parents=True, exist_ok=True)
        tasks.to_parquet(self.root / TASKS_PATH)

    @property
    def num_episodes(self) -> int:
        return len(self._episode_rows)

    def __enter__(self) -> LeRobotDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        # Finalize even after an error, so that the episodes added before it form a readable dataset.
        self.finalize()

    def __del__(self):
        if not getattr(self, "_finalized", True) and getattr(self, "_episode_rows", None):
            logger.warning("%s: LeRobotDatasetWriter was not finalized; call finalize() or use `with`", self.root)
