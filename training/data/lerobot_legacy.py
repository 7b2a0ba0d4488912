"""A LeRobot v2.x dataset (one data and one video file per episode) as a v3.0 dataset, without touching its frames.

The n-th episode (in episode order) becomes v3.0 data file and video file (chunk n // chunks_size, file
n % chunks_size), one episode per file, which v3.0 allows (`legacy_v3_locations`): its parquet rows and its mp4
keep their content under the new names (hard-linked, or copied), and v3.0 metadata (`meta/episodes`,
`meta/tasks.parquet`, info.json) is written from the v2.x jsonl files. Used by labelling, which writes a v3.0
dataset whatever the source's version.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from .files import copy_tree_except, fsync_and_replace, link_or_copy, temporary_path, write_parquet_atomically
from .lerobot_format import (
    CODEBASE_VERSION,
    DATA_PATH,
    DEFAULT_CHUNKS_SIZE,
    DEFAULT_DATA_FILES_SIZE_IN_MB,
    DEFAULT_VIDEO_FILES_SIZE_IN_MB,
    EPISODES_PATH,
    LEGACY_EPISODES_STATS_PATH,
    TASKS_PATH,
    VIDEO_PATH,
)


def legacy_v3_locations(meta) -> dict[int, tuple[int, int]]:
    """v2.x -> v3.0 without touching the frames: the n-th episode (in episode order) becomes data file and video
    file (chunk n // chunks_size, file n % chunks_size), one episode per file, which v3.0 allows."""
    chunks_size = int(meta.info.get("chunks_size", DEFAULT_CHUNKS_SIZE))
    return {
        int(episode["episode_index"]): (position // chunks_size, position % chunks_size)
        for position, episode in enumerate(meta.episodes)
    }


def v3_data_files(meta) -> list[tuple[Path, Path]]:
    """(source data file, its relative path in a v3.0 copy), each file once, in order. A v3.0 source keeps its
    layout; a v2.x source's per-episode files get v3.0 names (`legacy_v3_locations`). `meta` is a
    `LeRobotDatasetMetadata`."""
    files = []
    if meta.is_v3:
        for episode in meta.episodes:
            location = dict(chunk_index=episode["data/chunk_index"], file_index=episode["data/file_index"])
            relative = Path(meta.info["data_path"].format(**location))
            if (meta.root / relative, relative) not in files:
                files.append((meta.root / relative, relative))
        return files
    for episode_index, (chunk_index, file_index) in legacy_v3_locations(meta).items():
        relative = Path(DATA_PATH.format(chunk_index=chunk_index, file_index=file_index))
        files.append((meta.data_file_path(episode_index), relative))
    return files


def legacy_info_as_v3(info: dict) -> dict:
    """A v2.x info.json rewritten for the v3.0 layout of `legacy_v3_locations` (features unchanged)."""
    info = json.loads(json.dumps(info))
    for key in ("total_chunks", "total_videos"):  # v2.x counters with no v3.0 meaning
        info.pop(key, None)
    has_videos = any(ft["dtype"] == "video" for ft in info["features"].values())
    info.update(
        codebase_version=CODEBASE_VERSION,
        data_path=DATA_PATH,
        video_path=VIDEO_PATH if has_videos else None,
        data_files_size_in_mb=info.get("data_files_size_in_mb", DEFAULT_DATA_FILES_SIZE_IN_MB),
        video_files_size_in_mb=info.get("video_files_size_in_mb", DEFAULT_VIDEO_FILES_SIZE_IN_MB),
        chunks_size=int(info.get("chunks_size", DEFAULT_CHUNKS_SIZE)),
    )
    return info


def _legacy_episode_stats(meta) -> dict[int, dict]:
    """{episode_index: {feature: {stat: value}}} from meta/episodes_stats.jsonl (empty when there is none)."""
    stats = {}
    path = meta.root / LEGACY_EPISODES_STATS_PATH
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                stats[int(row["episode_index"])] = row.get("stats", {})
    return stats


def write_legacy_as_v3(
    meta, output: Path, *, episode_columns: dict[str, pa.Array] | None = None, copy_videos: bool = False,
    skip: set[str] = frozenset(),
) -> dict[str, int]:
    """The v3.0 files of a v2.x source besides the data files and info.json (`v3_data_files`,
    `legacy_info_as_v3`): each episode's mp4 hard-linked (or copied) to its v3.0 name, `meta/episodes` (with the
    `episode_columns` appended, one value per episode of `meta.episodes`), `meta/tasks.parquet`; the source's other
    top-level files copied, except the names in `skip`. Returns the link/copy counts."""
    locations = legacy_v3_locations(meta)
    counts = {"hardlink": 0, "copy": 0}
    legacy_stats = _legacy_episode_stats(meta)
    rows = []
    for episode in meta.episodes:
        episode_index = int(episode["episode_index"])
        chunk_index, file_index = locations[episode_index]
        row = {key: value for key, value in episode.items() if key not in ("dataset_from_index", "dataset_to_index")}
        row.update({
            "data/chunk_index": chunk_index, "data/file_index": file_index,
            "dataset_from_index": int(episode["dataset_from_index"]), "dataset_to_index": int(episode["dataset_to_index"]),
        })
        for key in meta.video_keys:
            source_video, from_timestamp, to_timestamp = meta.video_segment(episode_index, key)
            destination = VIDEO_PATH.format(video_key=key, chunk_index=chunk_index, file_index=file_index)
            counts[link_or_copy(source_video, output / destination, copy=copy_videos)] += 1
            row.update({
                f"videos/{key}/chunk_index": chunk_index, f"videos/{key}/file_index": file_index,
                f"videos/{key}/from_timestamp": from_timestamp, f"videos/{key}/to_timestamp": to_timestamp,
            })
        for feature, per in legacy_stats.get(episode_index, {}).items():
            for stat, value in per.items():
                row[f"stats/{feature}/{stat}"] = value
        row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        rows.append(row)
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    table = pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows])
    for name, values in (episode_columns or {}).items():
        table = table.append_column(name, values)
    write_parquet_atomically(table, output / EPISODES_PATH.format(chunk_index=0, file_index=0))

    tasks = pd.DataFrame({"task_index": np.arange(len(meta.tasks), dtype=np.int64)},
                         index=pd.Index(meta.tasks, name="task"))
    temporary = temporary_path(output / TASKS_PATH)
    tasks.to_parquet(temporary)
    fsync_and_replace(temporary, output / TASKS_PATH)
    for how, count in copy_tree_except(meta.root, output, {*skip, "data", "videos", "meta"}, copy_videos=True).items():
        counts[how] += count
    return counts
