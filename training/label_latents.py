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
from its first frame in fp32: the codes are the same whatever the number of processes. See
`training/latent_labels.py` for the pieces.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (`accelerate launch training/label_latents.py`): make the project importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm.auto import tqdm

from training.data import FramePairDataset, gap_in_frames, load_lerobot_dataset
from training.data.errors import DataLayerError, skipped_from_error
from training.latent_labels import (
    DEFAULT_GAP_SECONDS,
    PLAN_FORMAT,
    LabellingError,
    LabellingWorkDir,
    auto_episodes_per_shard,
    encode_episode,
    gap_seconds_from_training_config,
    is_labelling_output,
    load_quantizer,
    merge_labelled_dataset,
    plan_shards,
    shards_of_process,
    source_fingerprint,
)

logger = logging.getLogger("label_latents")

_PROGRESS_POLL_SECONDS = 2.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="label_latents",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", required=True, metavar="PATH_OR_REPO_ID",
                        help="source LeRobot dataset (v3.0, or v2.1/v2.0): a folder, or a Hub dataset repo id "
                             "(read from the cache when HF_HUB_OFFLINE=1)")
    parser.add_argument("--revision", default=None, help="Hub revision of a --dataset repo id")
    parser.add_argument("--quantizer", required=True, metavar="DIR",
                        help="a LAPA quantizer folder written by save_pretrained (or the converter)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder of the labelled dataset")
    parser.add_argument("--camera-key", default=None,
                        help="camera to label, full name or last part ('corner' for 'observation.images.corner'); "
                             "default: the dataset's first camera")
    parser.add_argument("--gap-seconds", type=float, default=None,
                        help="time between the two frames of a pair. Default: `gap_seconds` of a "
                             "training_config.json/.yaml beside the quantizer (or in its parent folder), else "
                             f"{DEFAULT_GAP_SECONDS} (the paper's gap for robot video)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="frame pairs per forward pass (default: 64). Chunks start at each episode's first "
                             "frame, so a frame's batch, and its codes bit for bit, do not depend on the number of "
                             "processes; a resumed run must use the same value")
    parser.add_argument("--num-workers", type=int, default=1,
                        help="DataLoader workers per process decoding episodes ahead of the model; 0 decodes in "
                             "the main thread (default: 1)")
    parser.add_argument("--episodes-per-shard", type=int, default=None,
                        help="episodes per unit of work (and of resume). Default: 1, or enough for about 1024 "
                             "shards on datasets with more episodes")
    parser.add_argument("--skip-corrupt", action=argparse.BooleanOptionalAction, default=False,
                        help="label the rest when an episode cannot be read (bad video, too short for the gap, "
                             "...): its rows keep every slot at -1 and info.json lists it with the reason. "
                             "Default: stop with an error naming the file and episode")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                        help="--resume: continue the unfinished run in --output (the default when --output has a "
                             "work dir .labelling/ with the same settings; starts fresh if there is none); "
                             "--no-resume: refuse to continue one (error if --output has one)")
    resume.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                        help="delete --output first: a labelled dataset or an unfinished run (other non-empty "
                             "folders are refused)")
    parser.add_argument("--copy-videos", action=argparse.BooleanOptionalAction, default=False,
                        help="copy the video files instead of hard-linking them")
    parser.add_argument("--keep-work-dir", action=argparse.BooleanOptionalAction, default=False,
                        help="keep <output>/.labelling/ (the shard files) after the merge")
    parser.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=False, help="run on CPU even if a GPU is available")
    parser.add_argument("--log-level", default="INFO")
    debug = parser.add_argument_group("debugging and testing resume")
    debug.add_argument("--max-shards-per-process", type=int, default=None, metavar="N",
                       help="each process labels at most N shards, then exits without merging (rerun to resume)")
    debug.add_argument("--debug-kill-after-shards", type=int, default=None, metavar="N",
                       help="simulate a crash: the main process SIGKILLs itself right after writing its N-th shard")
    return parser


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


def _same_folder_or_nested(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _plan_digest(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def _differences(old: dict, new: dict) -> list[str]:
    keys = [k for k in new if k not in ("plan_sha256", "shards", "shard_frames")]
    changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in keys if old.get(k) != new[k]]
    if old.get("shards") != new.get("shards") and not changed:
        changed.append("the shard layout")
    return changed


def decide_output_mode(output: Path, work_dir: LabellingWorkDir, plan: dict, args) -> str:
    """'fresh', 'resume' or 'overwrite', or a LabellingError saying why the run cannot start."""
    if output.exists() and not output.is_dir():
        raise LabellingError(f"--output {output} exists and is not a folder")
    has_content = output.exists() and any(output.iterdir())
    if args.overwrite:
        if has_content and not is_labelling_output(output):
            # A guard against a mistyped path: only folders this tool wrote are deleted.
            raise LabellingError(
                f"--output {output} is not empty and is not a labelled dataset or an unfinished labelling run; "
                "--overwrite deletes only those. Choose another --output or empty the folder yourself"
            )
        return "overwrite"
    if work_dir.exists():
        if args.resume is False:
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
    if args.resume:
        logger.info("--resume: %s has no unfinished run; starting a new one", output)
    return "fresh"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    is_main = accelerator.is_main_process
    logging.basicConfig(
        level=args.log_level.upper() if is_main else logging.WARNING,
        format=f"%(asctime)s [rank {accelerator.process_index}] %(name)s: %(message)s",
    )
    try:
        setup = prepare(args, accelerator)
    except (LabellingError, DataLayerError, FileNotFoundError) as error:
        if is_main:
            print(f"label_latents: error: {error}", file=sys.stderr)
        return 2
    return run(args, accelerator, setup)


def prepare(args, accelerator) -> dict:
    """Everything every process checks and builds before labelling (read-only: same result on every rank)."""
    if args.batch_size < 1:
        raise LabellingError(f"--batch-size must be at least 1, got {args.batch_size}")
    output = Path(args.output)
    source = load_lerobot_dataset(args.dataset, revision=args.revision, skip_corrupt=args.skip_corrupt)
    if _same_folder_or_nested(output, source.root):
        raise LabellingError(f"--output {output} is the source dataset or inside/around it ({source.root})")
    model, record = load_quantizer(args.quantizer, device=accelerator.device)
    config = model.config

    if args.gap_seconds is not None:
        gap_seconds, gap_from = args.gap_seconds, "--gap-seconds"
    else:
        found = gap_seconds_from_training_config(args.quantizer)
        gap_seconds, gap_from = found if found is not None else (DEFAULT_GAP_SECONDS, "default")
    if not gap_seconds > 0:
        raise LabellingError(f"the gap must be positive, got {gap_seconds} (from {gap_from})")
    # Frames are resized to the quantizer's size while decoding (FFmpeg, area filter), as in training.
    pairs = FramePairDataset(
        source, camera_key=args.camera_key, gap_seconds=gap_seconds, image_size=config.image_size,
        output="uint8", skip_corrupt=args.skip_corrupt,
    )
    all_episodes = [int(ep["episode_index"]) for ep in source.meta.episodes]
    lengths = {int(ep["episode_index"]): int(ep["length"]) for ep in source.meta.episodes}
    episodes_per_shard = args.episodes_per_shard or auto_episodes_per_shard(len(all_episodes))
    shards = plan_shards(all_episodes, episodes_per_shard)
    plan = {
        "format": PLAN_FORMAT,
        "source_sha256": source_fingerprint(source.root),
        "quantizer_sha256": record["weights_sha256"],
        "camera_key": pairs.camera_key,
        "gap_seconds": gap_seconds,
        "image_size": config.image_size,
        "code_seq_len": config.code_seq_len,
        "batch_size": args.batch_size,
        "skip_corrupt": args.skip_corrupt,
        "episodes_per_shard": episodes_per_shard,
        "num_shards": len(shards),
        "shards": shards,
        "shard_frames": [sum(lengths[e] for e in shard) for shard in shards],
    }
    plan["plan_sha256"] = _plan_digest(plan)
    work_dir = LabellingWorkDir(output)
    mode = decide_output_mode(output, work_dir, plan, args)
    record = {
        "quantizer": record,
        "gap_seconds": gap_seconds,
        "gap_seconds_from": gap_from,
        "gap_frames": gap_in_frames(gap_seconds, source.meta.fps),
        "fps": source.meta.fps,
        "camera_key": pairs.camera_key,
        "image_size": config.image_size,
        "batch_size": args.batch_size,
        "dtype": "float32",
        "pairing": "x_t with x_{t+gap}, clamped to the episode's last frame",
        "source": {"path": str(source.root.resolve()), "codebase_version": source.meta.codebase_version},
        "tool": "training/label_latents.py",
    }
    load_skipped = {s.episode_index: s for s in pairs.skipped if s.episode_index is not None}
    return dict(source=source, pairs=pairs, model=model, plan=plan, record=record, mode=mode, output=output,
                work_dir=work_dir, lengths=lengths, load_skipped=load_skipped)


def run(args, accelerator, setup: dict) -> int:
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
    limit = args.max_shards_per_process
    # Decided from every process's share, so that all agree whether the run ends before the merge.
    stopped_early = limit is not None and any(len(shards) > limit for shards in pending)
    if limit is not None:
        mine = mine[:limit]
    progress = label_shards(args, accelerator, setup, mine)

    if stopped_early:
        progress.close()
        logger.warning("stopped after --max-shards-per-process %d shards; rerun the same command to resume",
                       args.max_shards_per_process)
        return 0
    if not is_main:
        return 0  # the main process merges; the others are done (no collective waits: a merge may be long)
    _wait_for_all_shards(work_dir, plan, progress)
    record = merge_labelled_dataset(
        setup["source"].meta, output, work_dir, plan, setup["record"],
        copy_videos=args.copy_videos, keep_work_dir=args.keep_work_dir,
    )
    skipped = record["skipped_episodes"]
    summary = f"labelled {record['labelled_frames']} frames of {record['labelled_episodes']} episodes -> {output}"
    if skipped:
        summary += f"; {len(skipped)} episode(s) skipped, their rows have latent_action -1 (see meta/info.json)"
    print(summary)
    return 0


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


def label_shards(args, accelerator, setup: dict, shard_ids: list[int]):
    """Labels this process's shards, writing each one to the work dir as soon as it is complete.

    Returns the progress bar (shown on the main process only): frames in every process's finished shards plus
    this process's open shard.
    """
    plan, work_dir, pairs, source = setup["plan"], setup["work_dir"], setup["pairs"], setup["source"]
    model, device = setup["model"], accelerator.device
    is_main = accelerator.is_main_process
    work = [(shard_id, episode) for shard_id in shard_ids for episode in plan["shards"][shard_id]]
    decoded = _EpisodeFramesDataset(pairs, work, setup["load_skipped"], args.skip_corrupt)
    loader = torch.utils.data.DataLoader(
        decoded, batch_size=None, shuffle=False, num_workers=args.num_workers, collate_fn=_collate_one,
        prefetch_factor=2 if args.num_workers > 0 else None,
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
    for item in loader:
        shard_id, episode_index = item["shard_id"], item["episode_index"]
        if item["skipped"] is not None:
            skipped[shard_id].append(item["skipped"])
            logger.warning("skipped episode %d: %s", episode_index, item["skipped"].reason)
        else:
            codes = encode_episode(model, item["frames"], pairs.gap_frames(episode_index), args.batch_size, device)
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
            if args.debug_kill_after_shards is not None and is_main and written >= args.debug_kill_after_shards:
                os.kill(os.getpid(), signal.SIGKILL)  # a real crash: no cleanup, no finally blocks
        if is_main and (shard_done or time.monotonic() - last_poll >= _PROGRESS_POLL_SECONDS):
            last_poll = time.monotonic()
            progress.n = _progress_frames(work_dir, plan) + open_frames
            progress.refresh()
    return progress


if __name__ == "__main__":
    sys.exit(main())
