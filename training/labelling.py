"""The library of latent-action labelling: the shard plan, the work dir of shard files, resuming, encoding and the
merge (`training/label_latents.py` is the script that runs them, under `accelerate launch`).

Labelling turns a LeRobot dataset into the same dataset (as v3.0) plus one per-frame feature, `latent_action`: the
s codes the quantizer's encoder gives the frame pair (x_t, x_{t+gap}), the gap clamped at the episode end as in
training, so that every frame gets a label. The column, its feature and the record of how it was made are the data
layer's (`training/data/latent_actions.py`: `LATENT_ACTION_KEY`, `LatentLabelLayout`, ...).

The gap: `--gap-seconds` if given, else the `gap_seconds` the quantizer was trained with (its config.json), else
`DEFAULT_GAP_SECONDS` (`resolve_gap_seconds`); the record says which.

The work is cut into shards, fixed groups of consecutive episodes (`plan_shards`). Process r of W labels the
unfinished shards r, r+W, ...; each finished shard's codes go to one parquet file in the work dir
`<output>/.labelling/`, written atomically (temporary file, fsync, rename), so a killed run leaves only whole shards
and resuming skips them (`decide_output_mode` says whether a run starts fresh, resumes or overwrites).
When every shard exists the main process merges (`merge_labelled_dataset`): the source's videos are hard-linked
(or copied) unchanged, its data parquet files are rewritten with every original column plus `latent_action`, in
the same row order and file layout, and `meta/` is copied and updated (`info.json` features and a record of the
labelling under `LABELLING_INFO_KEY`, `stats.json`, per-episode stats in `meta/episodes`). `info.json` is
written last and the work dir is removed after it, so a folder with `info.json` and no work dir is finished.

Codes do not depend on the number of processes: each episode's pairs are encoded in chunks of `batch_size` that
start at the episode's first frame, in fp32 and eval mode, so every pair is computed in the same batch whatever
process takes its shard (a chunk split over encoding threads gives its pairs the same codes, bit for bit).

A LeRobot v2.x source (one data and one video file per episode) becomes a v3.0 dataset without touching its
frames (`training/data/lerobot_legacy.py`).

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
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .data.errors import SkippedEpisode
from .data.files import (
    TEMPORARY_NAME,
    copy_tree_except,
    fsync_and_replace,
    remove_temporary_files,
    temporary_path,
    write_bytes_atomically,
    write_parquet_atomically,
)
from .data.latent_actions import (
    LABELLING_INFO_KEY,
    LATENT_ACTION_KEY,
    UNLABELLED_CODE,
    LatentLabelLayout,
    data_schema_with_latent_actions,
    latent_action_feature,
    without_latent_actions,
)
from .data.lerobot_format import (
    EPISODES_DIR,
    INFO_PATH,
    LEGACY_EPISODES_PATH,
    LEGACY_TASKS_PATH,
    STATS_PATH,
    column_to_numpy,
)
from .data.lerobot_legacy import legacy_info_as_v3, v3_data_files, write_legacy_as_v3
from .data.stats import compute_vector_stats, stats_to_json

logger = logging.getLogger(__name__)

WORK_DIR_NAME = ".labelling"
PLAN_FILE = "plan.json"
DEFAULT_GAP_SECONDS = 0.6  # the paper's gap for robot video
TARGET_SHARDS = 1024  # automatic shard size aims at about this many shards
_SHARD_METADATA_KEY = b"lapa_labelling_shard"
PLAN_FORMAT = 1  # version of plan.json and the shard files; a resume checks it with the rest of the plan


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
    # Imported here, when a model is loaded: transformers is slow to import and the rest of this library (plan, work
    # dir, merge) does not need it. modeling_lapa registers the LAPA models with the Auto classes.
    import modeling_lapa
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


def resolve_gap_seconds(gap_seconds: float | None, model_config, quantizer_path: str | Path) -> tuple[float, str]:
    """The gap of the pairs to label, and where it came from (recorded as `gap_seconds_from`):

        gap_seconds given (--gap-seconds)      -> (gap_seconds, "--gap-seconds")
        else model_config.gap_seconds is set   -> (that gap, "<quantizer>/config.json"): the gap it was trained with
        else                                   -> (DEFAULT_GAP_SECONDS, "default")
    """
    trained_with = getattr(model_config, "gap_seconds", None)  # None: unknown (a quantizer saved before the field)
    if gap_seconds is not None:
        gap, where = float(gap_seconds), "--gap-seconds"
    elif trained_with is not None:
        gap, where = float(trained_with), str(Path(quantizer_path) / "config.json")
    else:
        gap, where = DEFAULT_GAP_SECONDS, "default"
    if not gap > 0:
        raise LabellingError(f"the gap must be positive, got {gap} (from {where})")
    return gap, where


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
        write_bytes_atomically(self.plan_path, json.dumps(plan, indent=2).encode())

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
                if TEMPORARY_NAME.search(name):
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
        temporary = temporary_path(path, tag)
        pq.write_table(table, temporary)
        fsync_and_replace(temporary, path)
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


# -- starting, resuming or overwriting -----------------------------------------------------------------------
def plan_digest(plan: dict) -> str:
    """sha256 of a plan (without its digest): two runs with the same digest label the same shards the same way."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def _differences(old: dict, new: dict) -> list[str]:
    keys = [k for k in new if k not in ("plan_sha256", "shards", "shard_frames")]
    changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in keys if old.get(k) != new[k]]
    if old.get("shards") != new.get("shards") and not changed:
        changed.append("the shard layout")
    return changed


def same_folder_or_nested(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def decide_output_mode(output: Path, work_dir: LabellingWorkDir, plan: dict, *, resume: bool | None,
                       overwrite: bool) -> str:
    """'fresh', 'resume' or 'overwrite', or a LabellingError saying why the run cannot start.

    `resume`: None continues an unfinished run with the same plan if `output` holds one (else starts fresh), False
    refuses to continue one, True is None that says so. `overwrite` deletes a labelled dataset or an unfinished
    run first (other non-empty folders are refused).
    """
    if output.exists() and not output.is_dir():
        raise LabellingError(f"--output {output} exists and is not a folder")
    has_content = output.exists() and any(output.iterdir())
    if overwrite:
        if has_content and not is_labelling_output(output):
            # A guard against a mistyped path: only folders this tool wrote are deleted.
            raise LabellingError(
                f"--output {output} is not empty and is not a labelled dataset or an unfinished labelling run; "
                "--overwrite deletes only those. Choose another --output or empty the folder yourself"
            )
        return "overwrite"
    if work_dir.exists():
        if resume is False:
            raise LabellingError(
                f"--output {output} holds an unfinished labelling run ({work_dir.path}); rerun without --no-resume "
                "to continue it, or pass --overwrite to start over"
            )
        old = work_dir.read_plan()
        if old.get("plan_sha256") != plan["plan_sha256"]:
            raise LabellingError(
                f"--output {output} holds an unfinished labelling run with other settings ("
                + "; ".join(_differences(old, plan))
                + "); pass --overwrite to start over with the new ones, or rerun with the old ones to finish it"
            )
        return "resume"
    if has_content:
        what = "a labelled dataset" if (output / "meta" / "info.json").exists() else "not empty"
        raise LabellingError(f"--output {output} exists and is {what}; pass --overwrite to replace it")
    if resume:
        logger.info("--resume: %s has no unfinished run; starting a new one", output)
    return "fresh"


# -- encoding -------------------------------------------------------------------------------------------------
def pair_targets(length: int, gap_frames: int) -> np.ndarray:
    """Frame t pairs with t + gap, clamped to the episode's last frame (as in training): (length,) int64."""
    return np.minimum(np.arange(length, dtype=np.int64) + gap_frames, length - 1)


class EncodingThreads:
    """CPU threads for `encode_episode`: each chunk's pairs are split into `count` contiguous parts encoded side by
    side, each thread running PyTorch with one intra-op thread. A context manager: it sets PyTorch's intra-op
    threads to 1 on entry and back on exit.

    Why: with intra-op threads, every operator of the small quantizer is a parallel region whose threads wait for
    each other; on 2 cores shared with a decoding worker or another job a waiting thread is often descheduled, and
    the model runs several times slower (benchmarks/label_speed.py). Threads that each encode their own part never
    wait for each other. A pair's codes do not change: its rows go through the same per-row computations (the
    tests check the codes against whole chunks on one thread)."""

    def __init__(self, count: int):
        if count < 1:
            raise ValueError(f"the number of encoding threads must be at least 1, got {count}")
        self.count = count

    def __enter__(self) -> "EncodingThreads":
        from concurrent.futures import ThreadPoolExecutor

        self._previous = torch.get_num_threads()
        torch.set_num_threads(1)
        self._pool = ThreadPoolExecutor(self.count, thread_name_prefix="encode")
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown()
        torch.set_num_threads(self._previous)

    def map(self, function, items: list) -> list:
        return list(self._pool.map(function, items))


def encode_episode(
    model, frames: torch.Tensor | np.ndarray, gap_frames: int, batch_size: int, device: torch.device | str = "cpu",
    threads: EncodingThreads | None = None,
) -> np.ndarray:
    """Latent actions of every frame of one episode: (T, s) int64.

    `frames` is the episode decoded at the quantizer's size, (T, S, S, 3) uint8. Pairs are encoded in chunks of
    `batch_size` starting at frame 0, so a frame's batch (and so its codes, bit for bit) does not depend on how
    the work is spread over processes. The pairs of a chunk [a, b) need frames a .. target(b - 1), one contiguous
    run: each is converted and patch-embedded once (`LAPAQuantizerModel.encode_frame_pairs`), not once per pair.
    With `threads` (an entered `EncodingThreads`), each chunk is split over them.
    """
    frames = torch.as_tensor(frames)
    length = int(frames.shape[0])
    targets = torch.from_numpy(pair_targets(length, gap_frames))

    @torch.inference_mode()
    def encode_part(part: tuple[int, int]) -> torch.Tensor:
        start, stop = part
        last = int(targets[stop - 1])  # targets never decrease: the part's frames are start .. last
        pixels = frames[start : last + 1].permute(0, 3, 1, 2).to(device).float().div_(255.0)  # (n, 3, S, S)
        first = torch.arange(stop - start, device=pixels.device)
        second = (targets[start:stop] - start).to(pixels.device)
        return model.encode_frame_pairs(pixels, first, second).codes.cpu()

    codes = []
    for start in range(0, length, batch_size):
        stop = min(start + batch_size, length)
        if threads is None:
            codes.append(encode_part((start, stop)))
            continue
        bounds = np.linspace(start, stop, min(threads.count, stop - start) + 1).round().astype(int)
        codes.extend(threads.map(encode_part, list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))))
    if not codes:
        return np.zeros((0, model.config.code_seq_len), dtype=np.int64)
    return torch.cat(codes).numpy().astype(np.int64)


# -- merging --------------------------------------------------------------------------------------------------
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


def _rewrite_data_files(meta, output: Path, label_index, label_codes, skipped_episodes: set[int], code_seq_len):
    """Writes each source data file to the output with `latent_action` appended; returns the codes per episode."""
    used = np.zeros(len(label_index), dtype=bool)
    codes_by_episode: dict[int, list[np.ndarray]] = {}
    for source_path, relative in v3_data_files(meta):
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
        write_parquet_atomically(labelled, output / relative)
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
        for name, values in _latent_action_episode_columns(codes_by_episode, episodes).items():
            table = table.append_column(name, values)
        write_parquet_atomically(table, output / source_path.relative_to(source_root))


def _latent_action_episode_columns(codes_by_episode: dict[int, np.ndarray], episodes: list[int]) -> dict[str, pa.Array]:
    """Columns `stats/latent_action/<stat>` of meta/episodes for these episodes (null for a skipped episode)."""
    per_episode = [
        compute_vector_stats(codes_by_episode[e].astype(np.float64)) if e in codes_by_episode else None
        for e in episodes
    ]
    stat_names = next((list(stats) for stats in per_episode if stats is not None), [])
    columns = {}
    for stat in stat_names:
        values = [None if stats is None else np.asarray(stats[stat]).tolist() for stats in per_episode]
        kind = pa.list_(pa.int64()) if stat == "count" else pa.list_(pa.float64())
        columns[f"stats/{LATENT_ACTION_KEY}/{stat}"] = pa.array(values, kind)
    return columns


def merge_labelled_dataset(
    meta, output: str | Path, work_dir: LabellingWorkDir, plan: dict, record: dict, layout: LatentLabelLayout, *,
    copy_videos: bool = False, keep_work_dir: bool = False,
) -> dict:
    """Builds the labelled LeRobot v3.0 dataset in `output` from the source (`meta`: its
    `LeRobotDatasetMetadata`) and the shard files of `work_dir`. Returns the labelling record of `info.json`:
    `record` (the run's description), the label counts and skipped episodes, and `layout` written in.

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
    remove_temporary_files(output, skip_dirs=(WORK_DIR_NAME,))  # what a merge killed before this one left behind

    codes_by_episode = _rewrite_data_files(meta, output, label_index, label_codes, skipped_episodes, code_seq_len)
    if meta.is_v3:
        _rewrite_episode_tables(meta.root, output, codes_by_episode)
        skip = {WORK_DIR_NAME, ".cache", ".git", "data", EPISODES_DIR, INFO_PATH, STATS_PATH}
        counts = copy_tree_except(meta.root, output, skip, copy_videos=copy_videos)
        stats_path = meta.root / STATS_PATH
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
        info = json.loads((meta.root / INFO_PATH).read_text())
    else:
        episodes = [int(e["episode_index"]) for e in meta.episodes]
        counts = write_legacy_as_v3(
            meta, output, episode_columns=_latent_action_episode_columns(codes_by_episode, episodes),
            copy_videos=copy_videos, skip={WORK_DIR_NAME, ".cache", ".git"},
        )
        stats = stats_to_json(meta.stats) if meta.stats else {}
        info = legacy_info_as_v3(meta.info)
    if len(label_codes):
        stats[LATENT_ACTION_KEY] = stats_to_json({"x": compute_vector_stats(label_codes.astype(np.float64))})["x"]
    write_bytes_atomically(output / STATS_PATH, json.dumps(stats, indent=4).encode())

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
    layout.write(info)  # the part of the record the next stages read (LatentLabelLayout.read)
    full_record = info[LABELLING_INFO_KEY]
    write_bytes_atomically(output / INFO_PATH, json.dumps(info, indent=4).encode())
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


