"""Facts of the LeRobot dataset format shared by our reader and writer (no LeRobot code is used or copied).

v3.0 layout (one folder, many episodes per file):

    meta/info.json                               codebase_version "v3.0", fps, features, path templates, totals
    meta/stats.json                              {feature: {min, max, mean, std, count, q01, q10, q50, q90, q99}}
    meta/tasks.parquet                           index "task" (the instruction), column task_index
    meta/episodes/chunk-000/file-000.parquet     one row per episode: episode_index, tasks, length,
                                                 data/chunk_index, data/file_index, dataset_from_index,
                                                 dataset_to_index, videos/<key>/{chunk_index, file_index,
                                                 from_timestamp, to_timestamp}, stats/<feature>/<stat>, ...
    data/chunk-000/file-000.parquet              one row per frame: features + timestamp, frame_index,
                                                 episode_index, index, task_index
    videos/<key>/chunk-000/file-000.mp4          an episode's frames are [from_timestamp, to_timestamp) of it

v2.1 layout (one parquet and one mp4 per episode): meta/info.json (codebase_version "v2.1"),
meta/episodes.jsonl ({episode_index, tasks, length}), meta/tasks.jsonl ({task_index, task}),
meta/episodes_stats.jsonl, data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet and
videos/chunk-{episode_chunk:03d}/<key>/episode_{episode_index:06d}.mp4, with episode_chunk =
episode_index // chunks_size.
"""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow as pa

CODEBASE_VERSION = "v3.0"
SUPPORTED_VERSIONS = ("v3.0", "v2.1", "v2.0")

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
CHUNK_FILE_PATTERN = "chunk-{chunk_index:03d}/file-{file_index:03d}"
EPISODES_PATH = EPISODES_DIR + "/" + CHUNK_FILE_PATTERN + ".parquet"
DATA_PATH = "data/" + CHUNK_FILE_PATTERN + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE_PATTERN + ".mp4"

LEGACY_EPISODES_PATH = "meta/episodes.jsonl"
LEGACY_TASKS_PATH = "meta/tasks.jsonl"
LEGACY_EPISODES_STATS_PATH = "meta/episodes_stats.jsonl"
LEGACY_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
LEGACY_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"

DEFAULT_CHUNKS_SIZE = 1000  # files per chunk directory
DEFAULT_DATA_FILES_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILES_SIZE_IN_MB = 200

# Columns every frame row has, in LeRobot's order after the dataset's own features.
DEFAULT_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}

CAMERA_DTYPES = ("video", "image")


def next_chunk_file(chunk_index: int, file_index: int, chunks_size: int) -> tuple[int, int]:
    """The (chunk, file) after this one: files are numbered within a chunk up to `chunks_size`."""
    if file_index + 1 >= chunks_size:
        return chunk_index + 1, 0
    return chunk_index, file_index + 1


def hf_feature(feature: dict) -> datasets.features.features.FeatureType:
    """The `datasets` type of a non-video LeRobot feature: shape [1] -> Value, [D] -> List(length=D), ..."""
    dtype, shape = feature["dtype"], list(feature["shape"])
    if dtype == "image":
        return datasets.Image()
    if dtype == "string":
        return datasets.Value("string")
    if shape == [1]:
        return datasets.Value(dtype)
    if len(shape) == 1:
        return datasets.List(datasets.Value(dtype), length=shape[0])
    array_types = {2: datasets.Array2D, 3: datasets.Array3D, 4: datasets.Array4D, 5: datasets.Array5D}
    if len(shape) in array_types:
        return array_types[len(shape)](shape=tuple(shape), dtype=dtype)
    raise ValueError(f"unsupported feature shape {shape} for dtype {dtype}")


def data_arrow_schema(features: dict[str, dict]) -> pa.Schema:
    """Arrow schema of the frame rows (video features live in mp4 files, not in the parquet).

    Built through `datasets.Features` so that the files carry the `huggingface` schema metadata, as LeRobot's
    files do, and `datasets.load_dataset("parquet", ...)` reads the right types back.
    """
    hf_features = datasets.Features(
        {key: hf_feature(ft) for key, ft in features.items() if ft["dtype"] != "video"}
    )
    return hf_features.arrow_schema


def feature_from_array(values: np.ndarray, *, names: list[str] | None = None) -> dict:
    """A LeRobot feature description of per-frame values (T,) or (T, D) (scalars get shape [1])."""
    values = np.asarray(values)
    dtype = "bool" if values.dtype == np.bool_ else str(values.dtype)
    shape = [1] if values.ndim == 1 else list(values.shape[1:])
    return {"dtype": dtype, "shape": shape, "names": names}


def column_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A parquet column of numbers as a numpy array: scalars (N,), fixed or variable lists (N, D)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        if len(column) == 0:
            return np.zeros((0, getattr(kind, "list_size", 0) or 0), dtype=kind.value_type.to_pandas_dtype())
        flat = column.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(column), -1)
    return column.to_numpy(zero_copy_only=False)
