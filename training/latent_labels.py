"""The pieces of latent-action labelling (`training/label_latents.py` runs them under `accelerate launch`).

Labelling turns a LeRobot v3.0 dataset into the same dataset plus one per-frame feature, `latent_action`: the s
codes the quantizer's encoder gives the frame pair (x_t, x_{t+gap}), the gap clamped at the episode end as in
training, so that every frame gets a label.

The work is cut into shards, fixed groups of consecutive episodes (`plan_shards`). Process r of W labels the
unfinished shards r, r+W, ...; each finished shard's codes go to one parquet file in the work dir
`<output>/.labelling/`, written atomically (temporary file, fsync, rename), so a killed run leaves only whole shards
and resuming skips them.
When every shard exists the main process merges (`merge_labelled_dataset`): the source's videos are hard-linked
(or copied) unchanged, its data parquet files are rewritten with every original column plus `latent_action`, in
the same row order and file layout, and `meta/` is copied and updated (`info.json` features and a record of the
labelling under `LABELLING_INFO_KEY`, `stats.json`, per-episode stats in `meta/episodes`). `info.json` is
written last and the work dir is removed after it, so a folder with `info.json` and no work dir is finished.

Codes do not depend on the number of processes: each episode's pairs are encoded in chunks of `batch_size` that
start at the episode's first frame, in fp32 and eval mode, so every pair is computed in the same batch whatever
process takes its shard.

A LeRobot v2.x source (one data and one video file per episode) becomes a v3.0 dataset without touching its
frames: the n-th episode's files are hard-linked (or copied) to v3.0 data and video file (n // chunks_size,
n % chunks_size), one episode per file (`legacy_v3_locations`), with v3.0 metadata written from the v2.x jsonl.

Episodes that cannot be labelled (with `skip_corrupt`: unreadable videos, episodes shorter than the gap, ...) are
never dropped silently: their rows stay in the output with every slot set to `UNLABELLED_CODE` (-1, not a valid
code), and `info.json` lists them with the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .data.errors import SkippedEpisode
from .data.latent_actions import (
    LABELLING_INFO_KEY,
    LATENT_ACTION_KEY,
    UNLABELLED_CODE,
    data_schema_with_latent_actions,
    latent_action_feature,
    without_latent_actions,
)
from .data.lerobot_format import (
    CODEBASE_VERSION,
    DATA_PATH,
    DEFAULT_CHUNKS_SIZE,
    DEFAULT_DATA_FILES_SIZE_IN_MB,
    DEFAULT_VIDEO_FILES_SIZE_IN_MB,
    EPISODES_DIR,
    EPISODES_PATH,
    INFO_PATH,
    LEGACY_EPISODES_PATH,
    LEGACY_EPISODES_STATS_PATH,
    LEGACY_TASKS_PATH,
    STATS_PATH,
    TASKS_PATH,
    VIDEO_PATH,
    column_to_numpy,
)
from .data.stats import compute_vector_stats, stats_to_json

logger = logging.getLogger(__name__)

WORK_DIR_NAME = ".labelling"
PLAN_FILE = "plan.json"
DEFAULT_GAP_SECONDS = 0.6  # the paper's gap for robot video
TRAINING_CONFIG_NAMES = ("training_config.json", "training_config.yaml", "training_config.yml")
TARGET_SHARDS = 1024  # automatic shard size aims at about this many shards
_SHARD_METADATA_KEY = b"lapa_labelling_shard"
PLAN_FORMAT = 1  # version of plan.json and the shard files; a resume checks it with the rest of the plan
_TEMPORARY_NAME = re.compile(r"\.tmp-[0-9-]+$")  # `<final name>.tmp-<pid>` or `.tmp-<rank>-<pid>`


class LabellingError(Exception):
    """A labelling run cannot start or finish; the message says what is wrong and what to do."""


# -- the quantizer --------------------------------------------------------------------------------------------
def load_quantizer(folder: str | Path, device: torch.device | str = "cpu"):
    """Loads a `save_pretrained` LAPA quantizer folder in fp32 eval mode; returns (model, record).

    `record` describes the model for the output metadata and for checking that a resumed run uses the same one:
    its path, the sha256 of its weight files and the config values the labels depend on.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise LabellingError(f"--quantizer {folder}: not a folder (expected a save_pretrained LAPA quantizer folder)")
    if not config_path.exists():
        raise LabellingError(
            f"--quantizer {folder}: no config.json, so this is not a save_pretrained model folder "
            "(expected a LAPA quantizer saved with LAPAQuantizerModel.save_pretrained or the converter)"
        )
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except json.JSONDecodeError as error:
        raise LabellingError(f"--quantizer {config_path}: unreadable JSON ({error})") from error
    import modeling_lapa  # registers the LAPA models with the Auto classes
    from transformers import AutoModel

    if model_type != modeling_lapa.LAPAQuantizerConfig.model_type:
        raise LabellingError(
            f"--quantizer {folder}: config.json has model_type {model_type!r}, not "
            f"{modeling_lapa.LAPAQuantizerConfig.model_type!r}: this is not a LAPA quantizer"
        )
    weight_files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not weight_files:
        raise LabellingError(f"--quantizer {folder}: no weight files (*.safetensors) beside config.json")
    try:
        model = AutoModel.from_pretrained(str(folder), dtype=torch.float32)
    except Exception as error:  # noqa: BLE001 - loading fails in many ways; the message keeps the cause
        raise LabellingError(f"--quantizer {folder}: loading the LAPA quantizer failed: {error}") from error
    if not isinstance(model, modeling_lapa.LAPAQuantizerModel):
        raise LabellingError(f"--quantizer {folder}: loaded a {type(model).__name__}, not a LAPAQuantizerModel")
    model = model.to(device=device, dtype=torch.float32).eval()
    digest = hashlib.sha256()
    for path in weight_files:
        digest.update(path.name.encode())
        digest.update(_file_sha256(path).encode())
    config = model.config
    record = {
        "path": str(folder.resolve()),
        "weights_sha256": digest.hexdigest(),
        "model_type": config.model_type,
        "code_seq_len": config.code_seq_len,
        "codebook_size": config.codebook_size,
        "image_size": config.image_size,
        "quant_dim": config.quant_dim,
    }
    return model, record


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_key(tree, key: str, depth: int = 2):
    """The value of `key` at the top of a nested dict, or up to `depth` levels down (first found, in order)."""
    if not isinstance(tree, dict):
        return None
    if key in tree:
        return tree[key]
    if depth > 0:
        for value in tree.values():
            found = _find_key(value, key, depth - 1)
            if found is not None:
                return found
    return None


def gap_seconds_from_training_config(quantizer_dir: str | Path) -> tuple[float, str] | None:
    """The `gap_seconds` the quantizer was trained with, from a training config saved beside the model.

    Looks for `training_config.json` / `.yaml` / `.yml` in the folder (and, for a checkpoint folder inside a run
    folder, in its parent) and takes `gap_seconds` from the top level or a nested section. Returns
    (gap_seconds, file it came from), or None when there is no such file or key.
    """
    folder = Path(quantizer_dir)
    for directory in (folder, folder.parent):
        for name in TRAINING_CONFIG_NAMES:
            path = directory / name
            if not path.exists():
                continue
            text = path.read_text()
            if path.suffix == ".json":
                tree = json.loads(text)
            else:
                import yaml

                tree = yaml.safe_load(text)
            value = _find_key(tree, "gap_seconds")
            if value is not None:
                return float(value), str(path)
    return None


# -- the shard plan -------------------------------------------------------------------------------------------
def auto_episodes_per_shard(num_episodes: int) -> int:
    """Episodes per shard when not given: 1 up to `TARGET_SHARDS` episodes, then enough to make about that many
    shards (a kill loses at most one shard per process; fewer files keep the merge quick)."""
    return max(1, math.ceil(num_episodes / TARGET_SHARDS))


def plan_shards(episode_indices: list[int], episodes_per_shard: int) -> list[list[int]]:
    """Consecutive groups of `episodes_per_shard` episodes, in episode order."""
    if episodes_per_shard < 1:
        raise ValueError(f"episodes_per_shard must be at least 1, got {episodes_per_shard}")
    ordered = sorted(int(e) for e in episode_indices)
    return [ordered[i : i + episodes_per_shard] for i in range(0, len(ordered), episodes_per_shard)]


def shards_of_process(num_shards: int, process_index: int, num_processes: int) -> list[int]:
    """Process r of W takes shards r, r+W, r+2W, ... (positions in the list of shards still to label)."""
    return list(range(process_index, num_shards, num_processes))


def source_fingerprint(root: Path) -> str:
    """sha256 of the source's metadata files (info.json and the episodes tables, v3.0 or v2.x): changes if the
    dataset does."""
    digest = hashlib.sha256()
    paths = [root / INFO_PATH] + sorted((root / EPISODES_DIR).glob("chunk-*/file-*.parquet"))
    paths += [root / name for name in (LEGACY_EPISODES_PATH, LEGACY_TASKS_PATH) if (root / name).exists()]
    for path in paths:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(_file_sha256(path).encode())
    return digest.hexdigest()


# -- the work dir ---------------------------------------------------------------------------------------------
class LabellingWorkDir:
    """`<output>/.labelling/`: `plan.json` (the settings of the run) and one `shard-<6-digit id>.parquet` per finished
    shard, with columns `index`, `episode_index`, `frame_index`, `latent_action` and the shard's skipped episodes
    in the file's metadata."""

    def __init__(self, output: str | Path):
        self.output = Path(output)
        self.path = self.output / WORK_DIR_NAME

    @property
    def plan_path(self) -> Path:
        return self.path / PLAN_FILE

    def exists(self) -> bool:
        return self.plan_path.exists()

    def shard_path(self, shard_id: int) -> Path:
        return self.path / f"shard-{shard_id:06d}.parquet"

    def read_plan(self) -> dict:
        return json.loads(self.plan_path.read_text())

    def write_plan(self, plan: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(self.plan_path, json.dumps(plan, indent=2).encode())

    def finished_shards(self) -> set[int]:
        """Ids of the shard files present (renamed into place, so complete)."""
        if not self.path.exists():
            return set()
        found = set()
        for name in os.listdir(self.path):
            if name.startswith("shard-") and name.endswith(".parquet"):
                found.add(int(name[len("shard-") : -len(".parquet")]))
        return found

    def remove_temporary_files(self) -> list[str]:
        """Deletes half-written files a killed process left behind; returns their names."""
        removed = []
        if self.path.exists():
            for name in os.listdir(self.path):
                if _TEMPORARY_NAME.search(name):
                    (self.path / name).unlink(missing_ok=True)
                    removed.append(name)
        return removed

    def drop_invalid_shards(self, plan: dict) -> list[str]:
        """Deletes shard files that do not belong to this plan or cannot be read (then they are labelled again)."""
        dropped = []
        for shard_id in sorted(self.finished_shards()):
            path = self.shard_path(shard_id)
            problem = None
            try:
                meta = _shard_metadata(pq.read_schema(path))
                if meta.get("plan_sha256") != plan["plan_sha256"] or meta.get("shard_id") != shard_id:
                    problem = "made by a different labelling plan"
            except (pa.ArrowException, OSError, ValueError, KeyError) as error:
                problem = f"unreadable ({error})"
            if problem is not None:
                logger.warning("work dir: %s is %s; it will be labelled again", path.name, problem)
                path.unlink()
                dropped.append(path.name)
        return dropped

    def write_shard(
        self,
        shard_id: int,
        *,
        plan: dict,
        episodes: list[int],
        index: np.ndarray,
        episode_index: np.ndarray,
        frame_index: np.ndarray,
        codes: np.ndarray,
        skipped: list[SkippedEpisode],
        tag: str,
    ) -> Path:
        """Writes a finished shard atomically (temporary file `...tmp-<tag>`, fsync, rename)."""
        code_seq_len = plan["code_seq_len"]
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, code_seq_len)
        flat = pa.array(codes.reshape(-1), pa.int64())
        table = pa.table(
            {
                "index": pa.array(np.asarray(index, dtype=np.int64)),
                "episode_index": pa.array(np.asarray(episode_index, dtype=np.int64)),
                "frame_index": pa.array(np.asarray(frame_index, dtype=np.int64)),
                LATENT_ACTION_KEY: pa.FixedSizeListArray.from_arrays(flat, code_seq_len),
            }
        )
        metadata = {
            "shard_id": shard_id,
            "plan_sha256": plan["plan_sha256"],
            "episodes": [int(e) for e in episodes],
            "skipped": [dataclasses.asdict(s) for s in skipped],
        }
        table = table.replace_schema_metadata({_SHARD_METADATA_KEY: json.dumps(metadata).encode()})
        path = self.shard_path(shard_id)
        temporary = path.with_name(f"{path.name}.tmp-{tag}")
        pq.write_table(table, temporary)
        _fsync_and_replace(temporary, path)
        return path

    def read_shard(self, shard_id: int) -> tuple[pa.Table, dict]:
        table = pq.read_table(self.shard_path(shard_id))
        return table, _shard_metadata(table.schema)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _shard_metadata(schema: pa.Schema) -> dict:
    raw = (schema.metadata or {}).get(_SHARD_METADATA_KEY)
    if raw is None:
        raise ValueError("no labelling metadata")
    return json.loads(raw)


def _fsync_and_replace(temporary: Path, final: Path) -> None:
    """Makes `temporary` durable, then renames it to `final` (atomic on POSIX) and syncs the directory, so a
    crash leaves either the whole new file or none."""
    with open(temporary, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temporary, final)
    try:
        directory = os.open(final.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _remove_temporary_files(output: Path) -> None:
    for directory, subdirectories, files in os.walk(output):
        subdirectories[:] = [d for d in subdirectories if d != WORK_DIR_NAME]
        for name in files:
            if _TEMPORARY_NAME.search(name):
                os.unlink(os.path.join(directory, name))


def _write_parquet_atomically(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, temporary)
    _fsync_and_replace(temporary, path)


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    temporary.write_bytes(payload)
    _fsync_and_replace(temporary, path)


# -- encoding -------------------------------------------------------------------------------------------------
def pair_targets(length: int, gap_frames: int) -> np.ndarray:
    """Frame t pairs with t + gap, clamped to the episode's last frame (as in training): (length,) int64."""
    return np.minimum(np.arange(length, dtype=np.int64) + gap_frames, length - 1)


@torch.inference_mode()
def encode_episode(
    model, frames: torch.Tensor | np.ndarray, gap_frames: int, batch_size: int, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Latent actions of every frame of one episode: (T, s) int64.

    `frames` is the episode decoded at the quantizer's size, (T, S, S, 3) uint8. Pairs are encoded in chunks of
    `batch_size` starting at frame 0, so a frame's batch (and so its codes, bit for bit) does not depend on how
    the work is spread over processes.
    """
    frames = torch.as_tensor(frames)
    length = int(frames.shape[0])
    targets = torch.from_numpy(pair_targets(length, gap_frames))
    codes = []
    for start in range(0, length, batch_size):
        stop = min(start + batch_size, length)
        pair = torch.stack([frames[start:stop], frames[targets[start:stop]]], dim=1)  # (B, 2, S, S, 3)
        pixel_values = pair.permute(0, 1, 4, 2, 3).contiguous().to(device).float().div_(255.0)
        codes.append(model.encode(pixel_values).codes.cpu())
    if not codes:
        return np.zeros((0, model.config.code_seq_len), dtype=np.int64)
    return torch.cat(codes).numpy().astype(np.int64)


# -- merging --------------------------------------------------------------------------------------------------
def _link_or_copy(source: Path, destination: Path, *, copy: bool) -> str:
    """Hard-links `source` (resolved: Hub snapshots hold symlinks) to `destination`, or copies it when linking is
    impossible (another file system) or `copy` is set. Replaces an existing destination atomically."""
    real = Path(os.path.realpath(source))
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f"{destination.name}.tmp-{os.getpid()}")
    temporary.unlink(missing_ok=True)
    how = "copy"
    if not copy:
        try:
            os.link(real, temporary)
            how = "hardlink"
        except OSError:
            pass
    if how == "copy":
        shutil.copy2(real, temporary)
    os.replace(temporary, destination)
    return how


def _collect_labels(work_dir: LabellingWorkDir, plan: dict) -> tuple[np.ndarray, np.ndarray, list[SkippedEpisode]]:
    """Every shard's rows, sorted by global `index`: (index (N,), codes (N, s)), and the skipped episodes."""
    indices, codes, skipped = [], [], []
    for shard_id in range(plan["num_shards"]):
        table, meta = work_dir.read_shard(shard_id)
        indices.append(column_to_numpy(table.column("index")))
        codes.append(column_to_numpy(table.column(LATENT_ACTION_KEY)).reshape(-1, plan["code_seq_len"]))
        skipped.extend(SkippedEpisode(**record) for record in meta["skipped"])
    index = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    all_codes = np.concatenate(codes) if codes else np.zeros((0, plan["code_seq_len"]), np.int64)
    order = np.argsort(index, kind="stable")
    index, all_codes = index[order], all_codes[order]
    duplicated = index[1:][index[1:] == index[:-1]]
    if len(duplicated):
        raise LabellingError(
            f"{work_dir.path}: frames {duplicated[:10].tolist()} are labelled in more than one shard; the work dir "
            "is inconsistent, run again with --overwrite"
        )
    return index, all_codes, sorted(skipped, key=lambda s: (s.episode_index is None, s.episode_index))


def _data_files(meta) -> list[tuple[Path, Path]]:
    """(source data file, its relative path in the output), each file once, in order. A v3.0 source keeps its
    layout; a v2.x source's per-episode files get v3.0 names (`legacy_v3_locations`)."""
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


def legacy_v3_locations(meta) -> dict[int, tuple[int, int]]:
    """v2.x -> v3.0 without touching the frames: the n-th episode (in episode order) becomes data file and video
    file (chunk n // chunks_size, file n % chunks_size), one episode per file, which v3.0 allows."""
    chunks_size = int(meta.info.get("chunks_size", DEFAULT_CHUNKS_SIZE))
    return {
        int(episode["episode_index"]): (position // chunks_size, position % chunks_size)
        for position, episode in enumerate(meta.episodes)
    }


def _rewrite_data_files(meta, output: Path, label_index, label_codes, skipped_episodes: set[int], code_seq_len):
    """Writes each source data file to the output with `latent_action` appended; returns the codes per episode."""
    used = np.zeros(len(label_index), dtype=bool)
    codes_by_episode: dict[int, list[np.ndarray]] = {}
    for source_path, relative in _data_files(meta):
        try:
            table = pq.read_table(source_path)
        except (pa.ArrowException, OSError) as error:
            raise LabellingError(
                f"{source_path}: the source data file is unreadable ({error}); its rows cannot be carried over to "
                "the labelled dataset (repair or remove it from the source)"
            ) from error
        table = without_latent_actions(table)
        row_index = column_to_numpy(table.column("index")).astype(np.int64)
        row_episode = column_to_numpy(table.column("episode_index")).astype(np.int64)
        # label_index is sorted: each row's label is at its insertion point, if there is one
        position = np.minimum(np.searchsorted(label_index, row_index), max(len(label_index) - 1, 0))
        found = label_index[position] == row_index if len(label_index) else np.zeros(len(row_index), dtype=bool)
        missing = ~found & ~np.isin(row_episode, sorted(skipped_episodes))
        if missing.any():
            bad = np.flatnonzero(missing)[:5]
            raise LabellingError(
                f"{source_path}: rows with index {row_index[bad].tolist()} (episodes "
                f"{sorted(set(row_episode[bad].tolist()))}) have no latent action and their episodes were not "
                "skipped: the shard files do not cover the source (was the source changed during the run?)"
            )
        matched = position[found]
        if np.any(used[matched]) or len(np.unique(matched)) != len(matched):
            raise LabellingError(f"{source_path}: a frame index appears in more than one data row of the source")
        used[matched] = True
        codes = np.full((len(row_index), code_seq_len), UNLABELLED_CODE, dtype=np.int64)
        codes[found] = label_codes[matched]
        for episode in np.unique(row_episode[found]):
            codes_by_episode.setdefault(int(episode), []).append(codes[found & (row_episode == episode)])
        schema = data_schema_with_latent_actions(table.schema, code_seq_len)
        labels = pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1), pa.int64()), code_seq_len)
        labelled = pa.Table.from_arrays([*table.columns, labels], schema=schema)
        _write_parquet_atomically(labelled, output / relative)
    if not used.all():
        extra = label_index[~used][:10].tolist()
        raise LabellingError(f"labelled frames {extra} are in no source data file (was the source changed?)")
    return {episode: np.concatenate(parts) for episode, parts in codes_by_episode.items()}


def _rewrite_episode_tables(source_root: Path, output: Path, codes_by_episode: dict[int, np.ndarray]) -> None:
    """Copies meta/episodes/*.parquet with per-episode `stats/latent_action/<stat>` columns (null for skipped)."""
    for source_path in sorted((source_root / EPISODES_DIR).glob("chunk-*/file-*.parquet")):
        table = pq.read_table(source_path)
        # a relabelled source: its old per-episode label stats go, the new ones are appended
        table = table.drop_columns([c for c in table.column_names if c.startswith(f"stats/{LATENT_ACTION_KEY}/")])
        episodes = table.column("episode_index").to_pylist()
        for name, values in _latent_action_episode_stats(codes_by_episode, episodes).items():
            kind = pa.list_(pa.int64()) if name.endswith("/count") else pa.list_(pa.float64())
            table = table.append_column(name, pa.array(values, kind))
        _write_parquet_atomically(table, output / source_path.relative_to(source_root))


def _latent_action_episode_stats(codes_by_episode: dict[int, np.ndarray], episodes: list[int]) -> dict[str, list]:
    """Columns `stats/latent_action/<stat>` of meta/episodes for these episodes (None for a skipped episode)."""
    per_episode = [
        compute_vector_stats(codes_by_episode[e].astype(np.float64)) if e in codes_by_episode else None
        for e in episodes
    ]
    stat_names = next((list(stats) for stats in per_episode if stats is not None), [])
    return {
        f"stats/{LATENT_ACTION_KEY}/{stat}": [None if stats is None else np.asarray(stats[stat]).tolist()
                                              for stats in per_episode]
        for stat in stat_names
    }


def _legacy_info_as_v3(info: dict) -> dict:
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


def _write_legacy_as_v3(meta, output: Path, codes_by_episode: dict[int, np.ndarray], *, copy_videos: bool):
    """The v3.0 files of a v2.x source besides the data files: each episode's mp4 hard-linked (or copied) to its
    v3.0 name, meta/episodes, meta/tasks.parquet; other top-level files copied. Returns link/copy counts."""
    locations = legacy_v3_locations(meta)
    counts = {"hardlink": 0, "copy": 0}
    legacy_stats = {}
    legacy_stats_path = meta.root / LEGACY_EPISODES_STATS_PATH
    if legacy_stats_path.exists():
        for line in legacy_stats_path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                legacy_stats[int(row["episode_index"])] = row.get("stats", {})
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
            counts[_link_or_copy(source_video, output / destination, copy=copy_videos)] += 1
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
    episodes = [int(e["episode_index"]) for e in meta.episodes]
    for name, values in _latent_action_episode_stats(codes_by_episode, episodes).items():
        kind = pa.list_(pa.int64()) if name.endswith("/count") else pa.list_(pa.float64())
        table = table.append_column(name, pa.array(values, kind))
    _write_parquet_atomically(table, output / EPISODES_PATH.format(chunk_index=0, file_index=0))

    tasks = pd.DataFrame({"task_index": np.arange(len(meta.tasks), dtype=np.int64)},
                         index=pd.Index(meta.tasks, name="task"))
    temporary = output / f"{TASKS_PATH}.tmp-{os.getpid()}"
    tasks.to_parquet(temporary)
    _fsync_and_replace(temporary, output / TASKS_PATH)
    skip = {WORK_DIR_NAME, ".cache", ".git", "data", "videos", "meta"}
    for how, count in _copy_tree_except(meta.root, output, skip, copy_videos=True).items():
        counts[how] += count
    return counts


def _copy_tree_except(source_root: Path, output: Path, skip: set[str], *, copy_videos: bool) -> dict[str, int]:
    """Links (videos) or copies every file of the source except the relative paths/prefixes in `skip`."""
    counts = {"hardlink": 0, "copy": 0}
    for directory, subdirectories, files in os.walk(source_root, followlinks=True):
        relative_dir = Path(directory).relative_to(source_root)
        subdirectories[:] = [d for d in subdirectories if str(relative_dir / d) not in skip]
        for name in files:
            relative = relative_dir / name
            if str(relative) in skip:
                continue
            is_video = relative.parts[:1] == ("videos",)
            how = _link_or_copy(Path(directory) / name, output / relative, copy=copy_videos or not is_video)
            counts[how] += 1
    return counts


def merge_labelled_dataset(
    meta, output: str | Path, work_dir: LabellingWorkDir, plan: dict, record: dict, *, copy_videos: bool = False,
    keep_work_dir: bool = False,
) -> dict:
    """Builds the labelled LeRobot v3.0 dataset in `output` from the source (`meta`: its
    `LeRobotDatasetMetadata`) and the shard files of `work_dir`. Returns the labelling record of `info.json`.

    Every step overwrites what a killed earlier merge may have left; `info.json` is written last and the work dir
    removed after it (unless `keep_work_dir`).
    """
    output = Path(output)
    code_seq_len = plan["code_seq_len"]
    missing = sorted(set(range(plan["num_shards"])) - work_dir.finished_shards())
    if missing:
        raise LabellingError(f"{work_dir.path}: shards {missing[:10]} are not labelled yet; cannot merge")
    label_index, label_codes, skipped = _collect_labels(work_dir, plan)
    skipped_episodes = {s.episode_index for s in skipped if s.episode_index is not None}
    _remove_temporary_files(output)  # what a merge killed before this one left behind

    codes_by_episode = _rewrite_data_files(meta, output, label_index, label_codes, skipped_episodes, code_seq_len)
    if meta.is_v3:
        _rewrite_episode_tables(meta.root, output, codes_by_episode)
        skip = {WORK_DIR_NAME, ".cache", ".git", "data", EPISODES_DIR, INFO_PATH, STATS_PATH}
        counts = _copy_tree_except(meta.root, output, skip, copy_videos=copy_videos)
        stats_path = meta.root / STATS_PATH
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
        info = json.loads((meta.root / INFO_PATH).read_text())
    else:
        counts = _write_legacy_as_v3(meta, output, codes_by_episode, copy_videos=copy_videos)
        stats = stats_to_json(meta.stats) if meta.stats else {}
        info = _legacy_info_as_v3(meta.info)
    if len(label_codes):
        stats[LATENT_ACTION_KEY] = stats_to_json({"x": compute_vector_stats(label_codes.astype(np.float64))})["x"]
    _atomic_write_bytes(output / STATS_PATH, json.dumps(stats, indent=4).encode())

    info["features"].pop(LATENT_ACTION_KEY, None)  # a relabelled source: the new feature goes last, like its column
    info["features"][LATENT_ACTION_KEY] = latent_action_feature(code_seq_len)
    full_record = dict(record)
    full_record.update(
        labelled_frames=int(len(label_index)),
        unlabelled_frames=int(meta.total_frames - len(label_index)),
        labelled_episodes=len(codes_by_episode),
        skipped_episodes=[dataclasses.asdict(s) for s in skipped],
        unlabelled_code=UNLABELLED_CODE,
    )
    info[LABELLING_INFO_KEY] = full_record
    _atomic_write_bytes(output / INFO_PATH, json.dumps(info, indent=4).encode())
    logger.info(
        "merged %d labelled frames into %s (%d files hard-linked, %d copied; %d episodes skipped)",
        len(label_index), output, counts["hardlink"], counts["copy"], len(skipped),
    )
    if not keep_work_dir:
        work_dir.remove()
    return full_record


def is_labelling_output(folder: Path) -> bool:
    """Whether `folder` holds a labelling run, finished (info.json with the labelling record) or not (work dir):
    the only non-empty folders `--overwrite` deletes."""
    if (folder / WORK_DIR_NAME / PLAN_FILE).exists():
        return True
    info_path = folder / INFO_PATH
    try:
        return LABELLING_INFO_KEY in json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False


