"""Reads LeRobot datasets (v3.0, and v2.1/v2.0) with pyarrow and PyAV, without LeRobot itself.

    dataset = load_lerobot_dataset("outputs/metaworld_push")      # a folder, or a Hub repo id
    item = dataset[0]
    item["observation.images.corner"]   # (3, H, W) uint8 tensor
    item["observation.state"], item["action"]                       # float32 tensors
    item["episode_index"], item["frame_index"], item["timestamp"], item["index"], item["task"]

Items carry LeRobot's keys, so code written for LeRobot's datasets reads ours (one difference, asked for by
the toolkit: camera frames are uint8 (3, H, W), not float in [0, 1]). A camera frame is the decoded frame
nearest to `from_timestamp + timestamp` of its video file, and must be closer than `tolerance_s` (LeRobot's
check; default 1e-4 s), or a `FrameTimestampError` names the file, the episode and the timestamps.

At load time every selected episode is checked: it has frames, its rows are in its data file, and each of its
videos opens and is long enough. A bad episode raises an error naming the file and the episode, or with
`skip_corrupt=True` is left out and recorded in `dataset.skipped` (with one logged summary).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from .errors import (
    DataFileError,
    DataLayerError,
    EmptyEpisodeError,
    MissingCameraKeyError,
    SkippedEpisode,
    UnsupportedCodebaseVersionError,
    VideoDecodeError,
    log_skip_summary,
    skipped_from_error,
)
from .lerobot_format import (
    CAMERA_DTYPES,
    EPISODES_DIR,
    INFO_PATH,
    LEGACY_EPISODES_PATH,
    LEGACY_EPISODES_STATS_PATH,
    LEGACY_TASKS_PATH,
    STATS_PATH,
    SUPPORTED_VERSIONS,
    TASKS_PATH,
    column_to_numpy,
)
from .stats import aggregate_stats, stats_from_json
from .video import VideoFrameReader, match_timestamps, probe_video

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_MAX_OPEN_VIDEOS = 16
# Reader stores inherited through fork, kept alive so that the child never frees the parent's decoders.
_INHERITED_READER_STORES: list = []


def resolve_dataset_root(path_or_repo_id: str | Path, *, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hub dataset repo id, fetched with `huggingface_hub.snapshot_download`
    (which reads the local cache first, and only the cache when `HF_HUB_OFFLINE=1`)."""
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        return path
    if isinstance(path_or_repo_id, str) and _REPO_ID.fullmatch(path_or_repo_id):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(path_or_repo_id, repo_type="dataset", revision=revision))
        except Exception as error:  # noqa: BLE001 - hub errors are many; the message says what was tried
            raise FileNotFoundError(
                f"{path_or_repo_id!r} is not a local folder, and fetching it as a Hub dataset repo "
                f"(revision {revision!r}) failed: {error}"
            ) from error
    raise FileNotFoundError(f"{path_or_repo_id!r} is neither an existing folder nor a Hub repo id (owner/name)")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise DataFileError(path, "not found")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class LeRobotDatasetMetadata:
    """The `meta/` folder of a LeRobot dataset (v3.0 or v2.x), normalised to one view.

    Attributes:
        root, info (the raw info.json), codebase_version, fps, features, robot_type,
        tasks: list of task strings, position = task_index,
        episodes: one dict per episode, sorted by episode_index, with LeRobot's keys ("episode_index",
            "length", "tasks", "dataset_from_index", "dataset_to_index", and for v3.0 "data/chunk_index",
            "data/file_index", "videos/<key>/from_timestamp", ...) plus any extra columns (e.g. "success");
            the per-episode "stats/..." columns are left out, as LeRobot does,
        stats: {feature: {stat: np.ndarray}} or None.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        info_path = self.root / INFO_PATH
        if not info_path.exists():
            raise DataFileError(info_path, "not found: this folder is not a LeRobot dataset")
        self.info = json.loads(info_path.read_text())
        self.codebase_version = self.info.get("codebase_version")
        if self.codebase_version not in SUPPORTED_VERSIONS:
            raise UnsupportedCodebaseVersionError(info_path, self.codebase_version, SUPPORTED_VERSIONS)
        self.fps = self.info["fps"]
        self.features: dict[str, dict] = self.info["features"]
        self.robot_type = self.info.get("robot_type")
        if self.is_v3:
            self.tasks = self._load_v3_tasks()
            self.episodes = self._load_v3_episodes()
        else:
            self.tasks = self._load_legacy_tasks()
            self.episodes = self._load_legacy_episodes()
        self._episode_by_index = {int(ep["episode_index"]): ep for ep in self.episodes}
        self.stats = self._load_stats()

    @property
    def is_v3(self) -> bool:
        return self.codebase_version == "v3.0"

    @property
    def camera_keys(self) -> list[str]:
        return [key for key, ft in self.features.items() if ft["dtype"] in CAMERA_DTYPES]

    @property
    def video_keys(self) -> list[str]:
        return [key for key, ft in self.features.items() if ft["dtype"] == "video"]

    @property
    def total_episodes(self) -> int:
        return len(self.episodes)

    @property
    def total_frames(self) -> int:
        return int(sum(ep["length"] for ep in self.episodes))

    @property
    def total_tasks(self) -> int:
        return len(self.tasks)

    def episode(self, episode_index: int) -> dict:
        if episode_index not in self._episode_by_index:
            raise KeyError(
                f"{self.root}: no episode {episode_index}; the dataset has episodes "
                f"{min(self._episode_by_index, default=None)}..{max(self._episode_by_index, default=None)}"
            )
        return self._episode_by_index[episode_index]

    # -- loading -----------------------------------------------------------------------------------------
    def _load_v3_tasks(self) -> list[str]:
        path = self.root / TASKS_PATH
        if not path.exists():
            raise DataFileError(path, "not found")
        table = pq.read_table(path)
        # pandas stores the named index "task" as a column; an unnamed one as __index_level_0__.
        task_column = "task" if "task" in table.column_names else "__index_level_0__"
        if task_column not in table.column_names or "task_index" not in table.column_names:
            raise DataFileError(path, f"expected columns 'task' and 'task_index', found {table.column_names}")
        tasks = table.column(task_column).to_pylist()
        indices = table.column("task_index").to_pylist()
        by_index = dict(zip(indices, tasks))
        return [by_index.get(i, "") for i in range(max(indices, default=-1) + 1)]

    def _load_v3_episodes(self) -> list[dict]:
        paths = sorted((self.root / EPISODES_DIR).glob("chunk-*/file-*.parquet"))
        if not paths:
            raise DataFileError(self.root / EPISODES_DIR, "no episodes parquet files (chunk-*/file-*.parquet)")
        tables = []
        for path in paths:
            table = pq.read_table(path)
            keep = [name for name in table.column_names if not name.startswith("stats/")]
            tables.append(table.select(keep))
        episodes = pa.concat_tables(tables, promote_options="default").to_pylist()
        return sorted(episodes, key=lambda ep: ep["episode_index"])

    def _load_legacy_tasks(self) -> list[str]:
        rows = _read_jsonl(self.root / LEGACY_TASKS_PATH)
        by_index = {int(row["task_index"]): row["task"] for row in rows}
        return [by_index.get(i, "") for i in range(max(by_index, default=-1) + 1)]

    def _load_legacy_episodes(self) -> list[dict]:
        episodes = sorted(_read_jsonl(self.root / LEGACY_EPISODES_PATH), key=lambda ep: ep["episode_index"])
        start = 0
        for ep in episodes:
            # v2.x has no row ranges in its metadata: episodes are stored in order, so they follow.
            ep["dataset_from_index"] = start
            ep["dataset_to_index"] = start + int(ep["length"])
            start += int(ep["length"])
        return episodes

    def _load_stats(self) -> dict | None:
        path = self.root / STATS_PATH
        if path.exists():
            return stats_from_json(json.loads(path.read_text()))
        legacy = self.root / LEGACY_EPISODES_STATS_PATH
        if legacy.exists():
            per_episode = [stats_from_json(row["stats"]) for row in _read_jsonl(legacy)]
            return aggregate_stats(per_episode) if per_episode else None
        return None

    # -- file locations ----------------------------------------------------------------------------------
    def data_file_path(self, episode_index: int) -> Path:
        ep = self.episode(episode_index)
        if self.is_v3:
            relative = self.info["data_path"].format(
                chunk_index=ep["data/chunk_index"], file_index=ep["data/file_index"]
            )
        else:
            relative = self.info["data_path"].format(
                episode_chunk=episode_index // self.info.get("chunks_size", 1000), episode_index=episode_index
            )
        return self.root / relative

    def video_segment(self, episode_index: int, video_key: str) -> tuple[Path, float, float]:
        """(video file, from_timestamp, to_timestamp) of an episode's frames for one camera."""
        ep = self.episode(episode_index)
        if self.is_v3:
            relative = self.info["video_path"].format(
                video_key=video_key,
                chunk_index=ep[f"videos/{video_key}/chunk_index"],
                file_index=ep[f"videos/{video_key}/file_index"],
            )
            return (
                self.root / relative,
                float(ep[f"videos/{video_key}/from_timestamp"]),
                float(ep[f"videos/{video_key}/to_timestamp"]),
            )
        relative = self.info["video_path"].format(
            episode_chunk=episode_index // self.info.get("chunks_size", 1000),
            video_key=video_key,
            episode_index=episode_index,
        )
        return self.root / relative, 0.0, int(ep["length"]) / self.fps

    def __repr__(self) -> str:
        return (
            f"LeRobotDatasetMetadata(root={str(self.root)!r}, version={self.codebase_version}, fps={self.fps}, "
            f"episodes={self.total_episodes}, frames={self.total_frames}, cameras={self.camera_keys})"
        )


class LeRobotDataset(torch.utils.data.Dataset):
    """Map-style dataset of the frames of a LeRobot dataset folder (one item per frame).

    Use `load_lerobot_dataset(...)` to build one. Besides items, it serves whole episodes to the frame-pair
    datasets: `decode_episode` decodes an episode's frames of one camera sequentially, once.

    Attributes:
        meta: `LeRobotDatasetMetadata`.
        episode_indices: the episodes served (selected and not skipped), in order.
        skipped: `SkippedEpisode` records of the episodes left out by `skip_corrupt=True`.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        episodes: list[int] | None = None,
        skip_corrupt: bool = False,
        video_backend: str = "pyav",
        tolerance_s: float = 1e-4,
    ):
        if video_backend != "pyav":
            raise ValueError(f"video_backend {video_backend!r} is not supported; the toolkit decodes with 'pyav'")
        self.root = Path(root)
        self.meta = LeRobotDatasetMetadata(self.root)
        self.skip_corrupt = skip_corrupt
        self.tolerance_s = tolerance_s
        self.video_backend = video_backend
        self.skipped: list[SkippedEpisode] = []
        all_indices = [int(ep["episode_index"]) for ep in self.meta.episodes]
        if episodes is None:
            selected = all_indices
        else:
            unknown = sorted(set(episodes) - set(all_indices))
            if unknown:
                raise KeyError(f"{self.root}: episodes {unknown} do not exist; the dataset has {len(all_indices)}")
            selected = sorted(set(int(e) for e in episodes))
        self._local = threading.local()  # open video readers, per thread (see _reader)
        self._local_pid = os.getpid()

        selected = self._check_lengths(selected)
        selected = self._load_frame_rows(selected)
        selected = self._check_videos(selected)
        self.episode_indices: list[int] = selected
        self._build_item_index()
        log_skip_summary(logger, self.skipped, what=str(self.root))

    # -- bad input handling ------------------------------------------------------------------------------
    def _fail(self, error: DataLayerError, episode_index: int, path) -> None:
        """Raise, or with skip_corrupt record the episode as skipped."""
        if not self.skip_corrupt:
            raise error
        self.skipped.append(skipped_from_error(error, episode_index=episode_index, path=path))

    def _check_lengths(self, selected: list[int]) -> list[int]:
        kept = []
        for episode_index in selected:
            if int(self.meta.episode(episode_index)["length"]) <= 0:
                path = self.meta.data_file_path(episode_index)
                self._fail(EmptyEpisodeError(path, episode_index=episode_index), episode_index, path)
            else:
                kept.append(episode_index)
        return kept

    def _load_frame_rows(self, selected: list[int]) -> list[int]:
        """Reads the data parquet rows of the selected episodes into numpy columns."""
        by_file: dict[Path, list[int]] = {}
        for episode_index in selected:
            by_file.setdefault(self.meta.data_file_path(episode_index), []).append(episode_index)
        tables, kept = [], []
        for path, file_episodes in by_file.items():
            try:
                if not path.exists():
                    raise DataFileError(path, "data file not found", episode_index=file_episodes[0])
                try:
                    table = pq.read_table(path)
                except (pa.ArrowException, OSError) as error:
                    raise DataFileError(path, f"unreadable parquet ({error})", episode_index=file_episodes[0]) from error
            except DataFileError as error:
                for episode_index in file_episodes:
                    self._fail(DataFileError(path, error.reason, episode_index=episode_index), episode_index, path)
                continue
            mask = pc.is_in(table.column("episode_index"), value_set=pa.array(file_episodes, pa.int64()))
            tables.append(table.filter(mask))
            kept.extend(file_episodes)
        if tables:
            table = pa.concat_tables(tables, promote_options="default").sort_by("index")
        else:
            table = None
        self._table = table
        episode_column = column_to_numpy(table.column("episode_index")) if table is not None else np.zeros(0, int)
        starts, counts = {}, {}
        if len(episode_column):
            boundaries = np.flatnonzero(np.diff(episode_column)) + 1
            for start, stop in zip(np.r_[0, boundaries], np.r_[boundaries, len(episode_column)]):
                episode_index = int(episode_column[start])
                if episode_index in starts:
                    raise DataFileError(self.root / "data", f"rows of episode {episode_index} are not contiguous")
                starts[episode_index], counts[episode_index] = int(start), int(stop - start)
        self._episode_row_start = starts
        good = []
        for episode_index in sorted(kept):
            expected = int(self.meta.episode(episode_index)["length"])
            found = counts.get(episode_index, 0)
            if found != expected:
                path = self.meta.data_file_path(episode_index)
                reason = f"has {found} frame rows for the episode, but its metadata says length {expected}"
                self._fail(DataFileError(path, reason, episode_index=episode_index), episode_index, path)
            else:
                good.append(episode_index)
        # numpy views of the numeric columns, so that items and episodes are sliced without arrow calls
        self._columns: dict[str, np.ndarray] = {}
        self._string_columns: dict[str, list] = {}
        self._image_columns: dict[str, pa.ChunkedArray] = {}
        if table is not None:
            for name in table.column_names:
                feature = self.meta.features.get(name, {})
                kind = table.schema.field(name).type
                if feature.get("dtype") == "image" or pa.types.is_struct(kind):
                    self._image_columns[name] = table.column(name)
                elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
                    self._string_columns[name] = table.column(name).to_pylist()
                else:
                    self._columns[name] = column_to_numpy(table.column(name))
        return good

    def _check_videos(self, selected: list[int]) -> list[int]:
        """Every selected episode's videos open and are long enough (headers only, no decoding)."""
        probed: dict[Path, object] = {}
        kept = []
        for episode_index in selected:
            problem = None
            for key in self.meta.video_keys:
                path, _, to_timestamp = self.meta.video_segment(episode_index, key)
                if path not in probed:
                    try:
                        probed[path] = probe_video(path)
                    except VideoDecodeError as error:
                        probed[path] = error
                info = probed[path]
                if isinstance(info, VideoDecodeError):
                    problem = (VideoDecodeError(path, info.reason, episode_index=episode_index), path)
                    break
                one_frame = 1.0 / self.meta.fps
                if info.duration_s is not None and to_timestamp > info.duration_s + one_frame + self.tolerance_s:
                    reason = (
                        f"the file lasts {info.duration_s:.3f}s but the episode's frames run to "
                        f"{to_timestamp:.3f}s (truncated file?)"
                    )
                    problem = (VideoDecodeError(path, reason, episode_index=episode_index), path)
                    break
            if problem is not None:
                self._fail(problem[0], episode_index, problem[1])
            else:
                kept.append(episode_index)
        return kept

    def _build_item_index(self) -> None:
        lengths = np.array([self.episode_length(e) for e in self.episode_indices], dtype=np.int64)
        self._item_offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._item_rows = (
            np.concatenate([np.arange(self._episode_row_start[e], self._episode_row_start[e] + n)
                            for e, n in zip(self.episode_indices, lengths)])
            if len(lengths)
            else np.zeros(0, dtype=np.int64)
        )

    # -- episode access (used by the frame-pair datasets) --------------------------------------------------
    @property
    def camera_keys(self) -> list[str]:
        return self.meta.camera_keys

    def resolve_camera_key(self, camera_key: str | None) -> str:
        """The full camera feature name: None -> the first camera; "corner" -> "observation.images.corner"."""
        available = self.meta.camera_keys
        if camera_key is None:
            if not available:
                raise MissingCameraKeyError("<first camera>", available, where=str(self.root))
            return available[0]
        if camera_key in available:
            return camera_key
        matches = [key for key in available if key.split(".")[-1] == camera_key]
        if len(matches) == 1:
            return matches[0]
        raise MissingCameraKeyError(camera_key, available, where=str(self.root / INFO_PATH))

    def episode_length(self, episode_index: int) -> int:
        return int(self.meta.episode(episode_index)["length"])

    def episode_fps(self, episode_index: int) -> float:
        return float(self.meta.fps)

    def _episode_rows(self, episode_index: int) -> slice:
        start = self._episode_row_start[episode_index]
        return slice(start, start + self.episode_length(episode_index))

    def episode_column(self, episode_index: int, name: str) -> np.ndarray | None:
        """A numeric per-frame column of one episode, (T,) or (T, D), or None if the dataset has no such column."""
        column = self._columns.get(name)
        return None if column is None else column[self._episode_rows(episode_index)]

    def episode_actions(self, episode_index: int) -> np.ndarray | None:
        actions = self.episode_column(episode_index, "action")
        return None if actions is None else np.asarray(actions, dtype=np.float32)  # a view when already float32

    def episode_task(self, episode_index: int, frame_index: int = 0) -> str:
        task_index = self.episode_column(episode_index, "task_index")
        if task_index is not None:
            return self.meta.tasks[int(task_index[frame_index])]
        tasks = self.meta.episode(episode_index).get("tasks") or [""]
        return tasks[0]

    def episode_first_index(self, episode_index: int) -> int:
        return int(self._columns["index"][self._episode_row_start[episode_index]])

    def describe_episode(self, episode_index: int, camera_key: str | None = None) -> str:
        if camera_key is not None and camera_key in self.meta.video_keys:
            return str(self.meta.video_segment(episode_index, camera_key)[0])
        return str(self.meta.data_file_path(episode_index))

    def _reader(self, path: Path) -> VideoFrameReader:
        """The open reader of a video file for this process and thread.

        A forked DataLoader worker must not use the parent's open files (they share file offsets), and
        `datasets` reads interleaved shards from a thread pool, so readers are kept per process and thread.
        """
        if os.getpid() != self._local_pid:
            _INHERITED_READER_STORES.append(self._local)
            self._local = threading.local()
            self._local_pid = os.getpid()
        readers = getattr(self._local, "readers", None)
        if readers is None:
            readers = self._local.readers = OrderedDict()
        key = str(path)
        reader = readers.pop(key, None)
        if reader is None:
            reader = VideoFrameReader(key, forward_decode_limit_s=2.0)
        readers[key] = reader
        while len(readers) > _MAX_OPEN_VIDEOS:
            readers.popitem(last=False)[1].close()
        return reader

    def _video_timestamps(self, episode_index: int, video_key: str, frame_indices) -> tuple[Path, np.ndarray]:
        path, from_timestamp, _ = self.meta.video_segment(episode_index, video_key)
        timestamps = self.episode_column(episode_index, "timestamp")
        if timestamps is None:
            timestamps = np.arange(self.episode_length(episode_index)) / self.meta.fps
        return path, from_timestamp + timestamps[frame_indices].astype(np.float64)

    def decode_episode(
        self, episode_index: int, camera_key: str | None = None, *, size: int | tuple[int, int] | None = None
    ) -> np.ndarray:
        """All frames of one episode and camera, decoded sequentially once: (T, H, W, 3) uint8.

        `size` (int S or (H, W)) resizes while decoding. Raises `VideoDecodeError` / `FrameTimestampError`
        naming the file and the episode when the video does not hold the episode's frames.
        """
        key = self.resolve_camera_key(camera_key)
        length = self.episode_length(episode_index)
        if self.meta.features[key]["dtype"] == "image":
            return self._decode_images(episode_index, key, np.arange(length), size)
        path, query = self._video_timestamps(episode_index, key, np.arange(length))
        _, from_timestamp, to_timestamp = self.meta.video_segment(episode_index, key)
        try:
            frames, times = self._reader(path).read_between(
                from_timestamp, to_timestamp, size=size, tolerance_s=self.tolerance_s
            )
            nearest = match_timestamps(
                query, times, tolerance_s=self.tolerance_s, path=str(path), episode_index=episode_index
            )
        except VideoDecodeError as error:
            raise VideoDecodeError(path, error.reason, episode_index=episode_index) from error
        return frames[nearest]

    def read_frames(
        self,
        episode_index: int,
        camera_key: str | None,
        frame_indices: list[int] | np.ndarray,
        *,
        size: int | tuple[int, int] | None = None,
    ) -> np.ndarray:
        """Some frames of one episode and camera by seeking (for random access): (N, H, W, 3) uint8."""
        key = self.resolve_camera_key(camera_key)
        frame_indices = np.asarray(frame_indices, dtype=np.int64)
        if self.meta.features[key]["dtype"] == "image":
            return self._decode_images(episode_index, key, frame_indices, size)
        path, query = self._video_timestamps(episode_index, key, frame_indices)
        try:
            return self._reader(path).read_at(
                query, tolerance_s=self.tolerance_s, size=size, episode_index=episode_index
            )
        except VideoDecodeError as error:
            raise VideoDecodeError(path, error.reason, episode_index=episode_index) from error

    def _decode_images(self, episode_index: int, key: str, frame_indices: np.ndarray, size) -> np.ndarray:
        """Frames of an `image` feature (PNG/JPEG bytes in the parquet), decoded with Pillow."""
        from PIL import Image

        column = self._image_columns[key]
        rows = self._episode_rows(episode_index)
        frames = []
        for frame_index in frame_indices:
            cell = column[rows.start + int(frame_index)].as_py()
            source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else self.root / cell["path"]
            image = Image.open(source).convert("RGB")
            if size is not None:
                height, width = (size, size) if isinstance(size, int) else size
                image = image.resize((width, height), Image.BILINEAR)
            frames.append(np.asarray(image, dtype=np.uint8))
        return np.stack(frames)

    # -- map-style items ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._item_offsets[-1])

    def __getitem__(self, idx: int) -> dict:
        """One frame with LeRobot's keys; camera frames are uint8 tensors (3, H, W)."""
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for a dataset of {len(self)} frames")
        position = int(np.searchsorted(self._item_offsets, idx, side="right") - 1)
        episode_index = self.episode_indices[position]
        frame_index = idx - int(self._item_offsets[position])
        row = int(self._item_rows[idx])
        item: dict = {}
        for name, column in self._columns.items():
            value = column[row]
            if isinstance(value, np.ndarray):
                item[name] = torch.from_numpy(value.astype(np.float32) if value.dtype.kind == "f" else value.copy())
            elif column.dtype.kind == "f":
                item[name] = torch.tensor(value, dtype=torch.float32)
            else:
                item[name] = torch.tensor(value)
        for name, column in self._string_columns.items():
            item[name] = column[row]
        for key in self.meta.camera_keys:
            frame = self.read_frames(episode_index, key, [frame_index])[0]
            item[key] = torch.from_numpy(np.ascontiguousarray(frame.transpose(2, 0, 1)))
        item["task"] = self.episode_task(episode_index, frame_index)
        return item

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_local"] = None  # open containers stay in their process; reopened lazily
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def __repr__(self) -> str:
        return (
            f"LeRobotDataset(root={str(self.root)!r}, version={self.meta.codebase_version}, "
            f"episodes={len(getattr(self, 'episode_indices', []))}, cameras={self.meta.camera_keys}, "
            f"skipped={len(self.skipped)})"
        )


def load_lerobot_dataset(
    path_or_repo_id: str | Path,
    *,
    revision: str | None = None,
    episodes: list[int] | None = None,
    skip_corrupt: bool = False,
    video_backend: str = "pyav",
    tolerance_s: float = 1e-4,
) -> LeRobotDataset:
    """Opens a LeRobot dataset (v3.0 or v2.1) from a folder or a Hub dataset repo id.

    Args:
        path_or_repo_id: a dataset folder, or "owner/name" fetched with `huggingface_hub.snapshot_download`.
        revision: Hub revision (branch, tag or commit) for a repo id.
        episodes: episode indices to serve (default: all).
        skip_corrupt: leave out bad episodes (recorded in `.skipped`) instead of raising.
        video_backend: "pyav", the only backend.
        tolerance_s: largest allowed distance between a frame's timestamp and the decoded frame's.
    """
    root = resolve_dataset_root(path_or_repo_id, revision=revision)
    return LeRobotDataset(
        root, episodes=episodes, skip_corrupt=skip_corrupt, video_backend=video_backend, tolerance_s=tolerance_s
    )
