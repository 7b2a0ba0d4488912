"""Label every frame of a LeRobot dataset with the latent action of (x_t, x_{t+gap}), over any number of processes.

    accelerate launch --num_processes 2 training/label_latents.py \\
        --dataset outputs/metaworld_mt10 --quantizer outputs/quantizer --output outputs/metaworld_mt10_latent

(on a CPU-only machine: `accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
--dynamo_backend no training/label_latents.py ...`; one process: `python training/label_latents.py ...`).

The output is a complete LeRobot v3.0 dataset: the source's videos (hard-linked, else copied; never re-encoded),
its data files with every original column plus `latent_action` (int64, s codes per frame), the same row order
and file layout, and `meta/` with the new feature, its statistics and a record of the quantizer, gap and camera
under `info.json["latent_action_labelling"]`. It loads with `training.data.load_lerobot_dataset` and with
`datasets.load_dataset("parquet", data_files=".../data/*/*.parquet")`. A v2.1 (or v2.0) source becomes a v3.0
dataset the same way: its per-episode data and video files keep their content under v3.0 names, one episode per file.

How it runs: episodes are grouped into shards; process r of W labels the unfinished shards r, r+W, ... and writes
each finished shard atomically to `<output>/.labelling/`; a killed run resumes from there (rerun the same command)
without duplicating or losing rows, with any number of processes. When all shards exist the main process merges them
into the output and removes the work dir. Each episode is decoded once (in `--num-workers` DataLoader workers,
ahead of the model) at the quantizer's image size, and its pairs are encoded in fixed chunks of `--batch-size`
from its first frame in fp32, each chunk split over `--encode-threads` CPU threads: the codes are the same whatever
the number of processes or threads. See `training/labelling.py` for the pieces.

Settings: every flag is a field of `LabellingConfig` (`--batch-size 8` is `batch_size: 8`), so a YAML file works
too (`--config labelling.yaml`; flags given with it win). From Python: `label_latents(LabellingConfig(dataset=...,
quantizer=..., output=...))`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from training.data import FramePairDataset, LatentLabelLayout, gap_in_frames, load_lerobot_dataset
from training.data.errors import DataLayerError, skipped_from_error
from training.labelling import (
    DEFAULT_GAP_SECONDS,
    PLAN_FORMAT,
    EncodingThreads,
    LabellingError,
    LabellingWorkDir,
    auto_episodes_per_shard,
    decide_output_mode,
    encode_episode,
    load_quantizer,
    merge_labelled_dataset,
    plan_digest,
    plan_shards,
    resolve_gap_seconds,
    same_folder_or_nested,
    shards_of_process,
    source_fingerprint,
)
from training.settings import resolve_stage_config, stage_parser

logger = logging.getLogger("label_latents")

_PROGRESS_POLL_SECONDS = 2.0


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class LabellingConfig:
    """Every setting of a labelling run: one flag per field (`batch_size` is `--batch-size`, a boolean `x` is `--x`
    / `--no-x`), and a key of a `--config` YAML file. `dataset`, `quantizer` and `output` are required."""

    dataset: str | None = field(default=None, metadata=_help(
        "source LeRobot dataset (v3.0, or v2.1/v2.0): a folder, or a Hub dataset repo id (read from the cache when "
        "HF_HUB_OFFLINE=1). Required"))
    revision: str | None = field(default=None, metadata=_help("Hub revision of a --dataset repo id"))
    quantizer: str | None = field(default=None, metadata=_help(
        "a LAPA quantizer folder written by save_pretrained (or the converter). Required"))
    output: str | None = field(default=None, metadata=_help("folder of the labelled dataset. Required"))
    camera_key: str | None = field(default=None, metadata=_help(
        "camera to label, full name or last part ('corner' for 'observation.images.corner'); default: the "
        "dataset's first camera"))
    gap_seconds: float | None = field(default=None, metadata=_help(
        "time between the two frames of a pair. Default: the gap the quantizer was trained with (`gap_seconds` in "
        f"its config.json), else {DEFAULT_GAP_SECONDS} (the paper's gap for robot video)"))
    batch_size: int = field(default=64, metadata=_help(
        "frame pairs per forward pass (default: 64). Chunks start at each episode's first frame, so a frame's batch, "
        "and its codes bit for bit, do not depend on the number of processes; a resumed run must use the same value"))
    encode_threads: int | None = field(default=None, metadata=_help(
        "CPU threads that encode the pairs of a chunk side by side, each running PyTorch with one intra-op thread "
        "(threads that never wait for each other: several times faster on shared cores, the same codes). Default: "
        "PyTorch's intra-op thread count (the cores); 0: one encoding thread with PyTorch's own intra-op threads. "
        "Ignored on GPU"))
    num_workers: int = field(default=1, metadata=_help(
        "DataLoader workers per process decoding episodes ahead of the model; 0 decodes in the main thread "
        "(default: 1)"))
    episodes_per_shard: int | None = field(default=None, metadata=_help(
        "episodes per unit of work (and of resume). Default: 1, or enough for about 1024 shards on datasets with "
        "more episodes"))
    skip_corrupt: bool = field(default=False, metadata=_help(
        "label the rest when an episode cannot be read (bad video, too short for the gap, ...): its rows keep every "
        "slot at -1 and info.json lists it with the reason. Default: stop with an error naming the file and episode"))
    resume: bool | None = field(default=None, metadata=_help(
        "--resume: continue the unfinished run in --output (the default when --output has a work dir .labelling/ "
        "with the same settings; starts fresh if there is none); --no-resume: refuse to continue one (error if "
        "--output has one)"))
    overwrite: bool = field(default=False, metadata=_help(
        "delete --output first: a labelled dataset or an unfinished run (other non-empty folders are refused)"))
    copy_videos: bool = field(default=False, metadata=_help("copy the video files instead of hard-linking them"))
    keep_work_dir: bool = field(default=False, metadata=_help(
        "keep <output>/.labelling/ (the shard files) after the merge"))
    cpu: bool = field(default=False, metadata=_help("run on CPU even if a GPU is available"))
    log_level: str = field(default="INFO", metadata=_help("logging level of the main process (default: INFO)"))
    # debugging and testing resume
    max_shards_per_process: int | None = field(default=None, metadata=_help(
        "debugging: each process labels at most N shards, then exits without merging (rerun to resume)"))
    debug_kill_after_shards: int | None = field(default=None, metadata=_help(
        "debugging: simulate a crash: the main process SIGKILLs itself right after writing its N-th shard"))

    def __post_init__(self):
        # Values from the command line and YAML are parsed like YAML (`--revision 2` is the int 2): make each the
        # type of its field, and refuse what cannot be.
        for name in ("dataset", "revision", "quantizer", "output", "camera_key", "log_level"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike, int)):
                raise ValueError(f"{name} must be a string, got {value!r}")
            setattr(self, name, None if value is None else str(value))
        for name in ("dataset", "quantizer", "output"):
            if getattr(self, name) is None:
                raise ValueError(f"--{name} is required")
        for name in ("batch_size", "encode_threads", "num_workers", "episodes_per_shard", "max_shards_per_process",
                     "debug_kill_after_shards"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.gap_seconds is not None:
            try:
                self.gap_seconds = float(self.gap_seconds)
            except (TypeError, ValueError):
                raise ValueError(f"gap_seconds must be a number, got {self.gap_seconds!r}") from None
        if self.overwrite and self.resume is not None:
            raise ValueError("--overwrite and --resume/--no-resume exclude each other: give one")


def build_parser():
    parts = __doc__.split("\n\n", 1)
    return stage_parser(LabellingConfig, prog="label_latents", description=parts[0], epilog=parts[1],
                        exclusive=[("resume", "overwrite")])


def resolve_config(argv: list[str] | None = None) -> LabellingConfig:
    """defaults <- YAML file (`--config`) <- command line, into a `LabellingConfig`; ValueError on a bad setting."""
    return resolve_stage_config(LabellingConfig, build_parser(), argv)


class _EpisodeFramesDataset(torch.utils.data.Dataset):
    """One item per episode to label: its frames decoded once at the quantizer's size, or why it was skipped.

    Runs in DataLoader workers, so that decoding the next episodes overlaps encoding the current one.
    """

    def __init__(self, pairs: FramePairDataset, work: list[tuple[int, int]], load_skipped: dict, skip_corrupt: bool):
        self.pairs = pairs
        self.work = work  # (shard_id, episode_index), in the order they are labelled
        self.load_skipped = load_skipped  # episode_index -> SkippedEpisode, skipped when the source was opened
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.work)

    def __getitem__(self, position: int) -> dict:
        shard_id, episode_index = self.work[position]
        item = {"shard_id": shard_id, "episode_index": episode_index, "frames": None, "skipped": None}
        if episode_index in self.load_skipped:
            item["skipped"] = self.load_skipped[episode_index]
            return item
        try:
            item["frames"] = torch.from_numpy(self.pairs.decode_episode(episode_index))
        except DataLayerError as error:
            if not self.skip_corrupt:
                raise
            where = self.pairs.source.describe_episode(episode_index, self.pairs.camera_key)
            item["skipped"] = skipped_from_error(error, episode_index=episode_index, path=where)
        return item


def _collate_one(item: dict) -> dict:
    return item  # items are whole episodes already; keep the SkippedEpisode records as they are


def _start(config: LabellingConfig):
    """The Accelerator of this process, and logging (the main process at `log_level`, the others warnings only)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=config.cpu or not torch.cuda.is_available())
    logging.basicConfig(
        level=config.log_level.upper() if accelerator.is_main_process else logging.WARNING,
        format=f"%(asctime)s [rank {accelerator.process_index}] %(name)s: %(message)s",
    )
    return accelerator


def label_latents(config: LabellingConfig) -> dict:
    """Labels `config.dataset` into `config.output` (in this process, one of those `accelerate launch` started).

    Returns {"output": the labelled folder, "merged": whether this process merged it (the main process once every
    shard exists), "record": the labelling record of its info.json when merged, else None}. Raises
    LabellingError / DataLayerError / FileNotFoundError when the run cannot start.
    """
    accelerator = _start(config)
    return run(config, accelerator, prepare(config, accelerator))


def main(argv: list[str] | None = None) -> int:
    try:
        config = resolve_config(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"label_latents: error: {error}", file=sys.stderr)
        return 2
    accelerator = _start(config)
    try:
        setup = prepare(config, accelerator)
    except (LabellingError, DataLayerError, FileNotFoundError) as error:
        if accelerator.is_main_process:
            print(f"label_latents: error: {error}", file=sys.stderr)
        return 2
    run(config, accelerator, setup)
    return 0


def _plan(config: LabellingConfig, source, pairs: FramePairDataset, quantizer: dict, gap_seconds: float) -> dict:
    """The settings the codes depend on and the shards: what a resumed run must share with the run it continues."""
    all_episodes = [int(ep["episode_index"]) for ep in source.meta.episodes]
    lengths = {int(ep["episode_index"]): int(ep["length"]) for ep in source.meta.episodes}
    episodes_per_shard = config.episodes_per_shard or auto_episodes_per_shard(len(all_episodes))
    shards = plan_shards(all_episodes, episodes_per_shard)
    plan = {
        "format": PLAN_FORMAT,
        "source_sha256": source_fingerprint(source.root),
        "quantizer_sha256": quantizer["weights_sha256"],
        "camera_key": pairs.camera_key,
        "gap_seconds": gap_seconds,
        "image_size": quantizer["image_size"],
        "code_seq_len": quantizer["code_seq_len"],
        "batch_size": config.batch_size,
        "skip_corrupt": config.skip_corrupt,
        "episodes_per_shard": episodes_per_shard,
        "num_shards": len(shards),
        "shards": shards,
        "shard_frames": [sum(lengths[e] for e in shard) for shard in shards],
    }
    plan["plan_sha256"] = plan_digest(plan)
    return plan


def prepare(config: LabellingConfig, accelerator) -> dict:
    """Everything every process checks and builds before labelling (read-only: same result on every rank)."""
    if config.batch_size < 1:
        raise LabellingError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.encode_threads is not None and config.encode_threads < 0:
        raise LabellingError(f"--encode-threads must be 0 or more, got {config.encode_threads}")
    output = Path(config.output)
    source = load_lerobot_dataset(config.dataset, revision=config.revision, skip_corrupt=config.skip_corrupt)
    if same_folder_or_nested(output, source.root):
        raise LabellingError(f"--output {output} is the source dataset or inside/around it ({source.root})")
    model, quantizer = load_quantizer(config.quantizer, device=accelerator.device)
    gap_seconds, gap_from = resolve_gap_seconds(config.gap_seconds, model.config, quantizer["path"])
    # Frames are resized to the quantizer's size while decoding (FFmpeg, area filter), as in training.
    pairs = FramePairDataset(
        source, camera_key=config.camera_key, gap_seconds=gap_seconds, image_size=model.config.image_size,
        output="uint8", skip_corrupt=config.skip_corrupt,
    )
    plan = _plan(config, source, pairs, quantizer, gap_seconds)
    work_dir = LabellingWorkDir(output)
    mode = decide_output_mode(output, work_dir, plan, resume=config.resume, overwrite=config.overwrite)
    layout = LatentLabelLayout(
        codebook_size=model.config.codebook_size, code_seq_len=model.config.code_seq_len, gap_seconds=gap_seconds,
        fps=source.meta.fps, quantizer=quantizer["path"],
    )
    record = {  # the run's description; `layout` is written into it by the merge
        "quantizer": quantizer,
        "gap_seconds": gap_seconds,
        "gap_seconds_from": gap_from,
        "gap_frames": gap_in_frames(gap_seconds, source.meta.fps),
        "fps": source.meta.fps,
        "camera_key": pairs.camera_key,
        "image_size": model.config.image_size,
        "batch_size": config.batch_size,
        "dtype": "float32",
        "pairing": "x_t with x_{t+gap}, clamped to the episode's last frame",
        "source": {"path": str(source.root.resolve()), "codebase_version": source.meta.codebase_version},
        "tool": "training/label_latents.py",
    }
    lengths = {int(ep["episode_index"]): int(ep["length"]) for ep in source.meta.episodes}
    load_skipped = {s.episode_index: s for s in pairs.skipped if s.episode_index is not None}
    return dict(source=source, pairs=pairs, model=model, plan=plan, record=record, layout=layout, mode=mode,
                output=output, work_dir=work_dir, lengths=lengths, load_skipped=load_skipped)


def run(config: LabellingConfig, accelerator, setup: dict) -> dict:
    """Labels this process's share of the shards and, on the main process once every shard exists, merges them.
    Returns the summary of `label_latents`."""
    is_main = accelerator.is_main_process
    plan, work_dir, output = setup["plan"], setup["work_dir"], setup["output"]
    accelerator.wait_for_everyone()  # everyone has checked the output before the main process changes it
    if is_main:
        if setup["mode"] == "overwrite" and output.exists():
            shutil.rmtree(output)
        if setup["mode"] in ("fresh", "overwrite"):
            output.mkdir(parents=True, exist_ok=True)
            work_dir.write_plan(plan)
        else:
            removed = work_dir.remove_temporary_files()
            dropped = work_dir.drop_invalid_shards(plan)
            logger.info(
                "resuming: %d of %d shards already labelled (%d half-written files removed, %d bad shards dropped)",
                len(work_dir.finished_shards()), plan["num_shards"], len(removed), len(dropped),
            )
    accelerator.wait_for_everyone()  # the work dir is ready: from here on, processes only meet through files

    finished = work_dir.finished_shards()
    # The shards still to do are dealt round-robin, so a resumed run (with any number of processes) is balanced.
    unfinished = [s for s in range(plan["num_shards"]) if s not in finished]
    pending = [
        [unfinished[i] for i in shards_of_process(len(unfinished), rank, accelerator.num_processes)]
        for rank in range(accelerator.num_processes)
    ]
    mine = pending[accelerator.process_index]
    limit = config.max_shards_per_process
    # Decided from every process's share, so that all agree whether the run ends before the merge.
    stopped_early = limit is not None and any(len(shards) > limit for shards in pending)
    if limit is not None:
        mine = mine[:limit]
    progress = label_shards(config, accelerator, setup, mine)

    if stopped_early:
        progress.close()
        logger.warning("stopped after --max-shards-per-process %d shards; rerun the same command to resume",
                       config.max_shards_per_process)
        return {"output": str(output), "merged": False, "record": None}
    if not is_main:
        # The main process merges; the others are done (no collective waits: a merge may be long).
        return {"output": str(output), "merged": False, "record": None}
    _wait_for_all_shards(work_dir, plan, progress)
    record = merge_labelled_dataset(
        setup["source"].meta, output, work_dir, plan, setup["record"], setup["layout"],
        copy_videos=config.copy_videos, keep_work_dir=config.keep_work_dir,
    )
    skipped = record["skipped_episodes"]
    summary = f"labelled {record['labelled_frames']} frames of {record['labelled_episodes']} episodes -> {output}"
    if skipped:
        summary += f"; {len(skipped)} episode(s) skipped, their rows have latent_action -1 (see meta/info.json)"
    print(summary)
    return {"output": str(output), "merged": True, "record": record}


def _progress_frames(work_dir: LabellingWorkDir, plan: dict) -> int:
    """Frames in the shard files present, whichever process wrote them."""
    return sum(plan["shard_frames"][s] for s in work_dir.finished_shards() if s < plan["num_shards"])


def _wait_for_all_shards(work_dir: LabellingWorkDir, plan: dict, progress) -> None:
    """The main process waits for the other processes' shard files, moving the progress bar.

    Through the file system rather than a collective barrier, whose timeout (30 min by default) a long run can
    exceed when the shards are uneven; if another process dies, the launcher stops this one.
    """
    while len(work_dir.finished_shards() & set(range(plan["num_shards"]))) < plan["num_shards"]:
        progress.n = _progress_frames(work_dir, plan)
        progress.refresh()
        time.sleep(_PROGRESS_POLL_SECONDS)
    progress.n = _progress_frames(work_dir, plan)
    progress.close()


def _shard_columns(rows: list[tuple], code_seq_len: int) -> dict[str, np.ndarray]:
    """The per-episode (index, episode_index, frame_index, codes) of a shard as concatenated columns."""
    if not rows:
        empty = np.zeros(0, np.int64)
        return dict(index=empty, episode_index=empty, frame_index=empty, codes=np.zeros((0, code_seq_len), np.int64))
    index, episode_index, frame_index, codes = (np.concatenate(column) for column in zip(*rows))
    return dict(index=index, episode_index=episode_index, frame_index=frame_index, codes=codes)


def _encoding_threads(config: LabellingConfig, device) -> EncodingThreads | None:
    """The CPU threads that encode (`--encode-threads`), or None: encode in this thread."""
    if torch.device(device).type != "cpu" or config.encode_threads == 0:
        return None
    return EncodingThreads(config.encode_threads or torch.get_num_threads())


def label_shards(config: LabellingConfig, accelerator, setup: dict, shard_ids: list[int]):
    """Labels this process's shards, writing each one to the work dir as soon as it is complete.

    Returns the progress bar (shown on the main process only): frames in every process's finished shards plus
    this process's open shard.
    """
    plan, work_dir, pairs, source = setup["plan"], setup["work_dir"], setup["pairs"], setup["source"]
    model, device = setup["model"], accelerator.device
    is_main = accelerator.is_main_process
    work = [(shard_id, episode) for shard_id in shard_ids for episode in plan["shards"][shard_id]]
    decoded = _EpisodeFramesDataset(pairs, work, setup["load_skipped"], config.skip_corrupt)
    loader = torch.utils.data.DataLoader(
        decoded, batch_size=None, shuffle=False, num_workers=config.num_workers, collate_fn=_collate_one,
        prefetch_factor=2 if config.num_workers > 0 else None,
    )
    progress = tqdm(total=sum(plan["shard_frames"]), unit="frame", desc="labelling", disable=not is_main,
                    dynamic_ncols=True)
    progress.update(_progress_frames(work_dir, plan) if is_main else 0)
    last_poll = time.monotonic()
    open_frames = 0  # frames of this process's unfinished shard, counted before its file exists
    remaining = {shard_id: len(plan["shards"][shard_id]) for shard_id in shard_ids}
    rows: dict[int, list[tuple]] = {shard_id: [] for shard_id in shard_ids}
    skipped: dict[int, list] = {shard_id: [] for shard_id in shard_ids}
    written = 0
    tag = f"{accelerator.process_index}-{os.getpid()}"
    threads = _encoding_threads(config, device)
    with threads if threads is not None else contextlib.nullcontext():
        for item in loader:
            shard_id, episode_index = item["shard_id"], item["episode_index"]
            if item["skipped"] is not None:
                skipped[shard_id].append(item["skipped"])
                logger.warning("skipped episode %d: %s", episode_index, item["skipped"].reason)
            else:
                codes = encode_episode(model, item["frames"], pairs.gap_frames(episode_index), config.batch_size,
                                       device, threads)
                rows[shard_id].append((
                    source.episode_column(episode_index, "index").astype(np.int64),
                    np.full(len(codes), episode_index, dtype=np.int64),
                    source.episode_column(episode_index, "frame_index").astype(np.int64),
                    codes,
                ))
            open_frames += setup["lengths"][episode_index]
            remaining[shard_id] -= 1
            shard_done = remaining[shard_id] == 0
            if shard_done:
                work_dir.write_shard(
                    shard_id, plan=plan, episodes=plan["shards"][shard_id], skipped=skipped.pop(shard_id), tag=tag,
                    **_shard_columns(rows.pop(shard_id), plan["code_seq_len"]),
                )
                open_frames = 0
                written += 1
                kill_after = config.debug_kill_after_shards
                if kill_after is not None and is_main and written >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)  # a real crash: no cleanup, no finally blocks
            if is_main and (shard_done or time.monotonic() - last_poll >= _PROGRESS_POLL_SECONDS):
                last_poll = time.monotonic()
                progress.n = _progress_frames(work_dir, plan) + open_frames
                progress.refresh()
    return progress


if __name__ == "__main__":
    sys.exit(main())
