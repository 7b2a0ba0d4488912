"""Train the LAPA latent action quantizer on frame pairs (stage 1 of LAPA).

    accelerate launch training/train_quantizer.py --preset tiny --dataset outputs/metaworld_mt10 --output-dir runs/laq
    accelerate launch --multi_gpu --num_processes 2 training/train_quantizer.py --config my_run.yaml --resume

Data: LeRobot v3.0/v2.1 datasets (`--dataset`, a folder or a Hub repo id, repeatable) and/or human-video folders
(`--video-folder DIR --labels FILE`, repeatable), mixed with `--mix-weights`. A share of each source's episodes
(stratified by task) is held out for evaluation and never trained on. Map-style by default (each episode decoded
once and cached when `--cache-episodes`), or streamed (`--streaming`) for data that does not fit in memory.

Presets: `tiny` (CPU-sized model at 64 px, a higher learning rate, a few thousand steps) and `reference` (the
paper's quantizer and recipe: Adam lr 1e-4, betas (0.9, 0.99), no weight decay, gradient clipping 0.5, batch 64 per
device, 100k steps, fp32, codebook replacement on the reference schedule, pairs 0.6 s apart). Every setting can be
overridden by a YAML file (`--config`) and then by the command line; unknown keys are an error.

Checkpoints (`--save-every`) hold everything needed to resume exactly (weights, optimizer, step, data position, RNG
states, codebook usage counters); `--resume` continues from the latest one. Every `--eval-every` steps and at the
end, the held-out evaluation (`training/quantizer_eval.py`) writes metrics and plots under `<output_dir>/eval/`.
The final model is saved with `save_pretrained` in `<output_dir>/model`, with `training_config.json` beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script by `accelerate launch training/train_quantizer.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_lapa import LAPAQuantizerConfig, LAPAQuantizerModel  # noqa: E402
from modeling_lapa.configuration_lapa_quantizer import REFERENCE_REPLACEMENT_STEPS  # noqa: E402
from modeling_lapa.transformers_compat import enable_activation_checkpointing  # noqa: E402
from training.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from training.settings import (  # noqa: E402
    add_config_arguments, coerce_settings, preset_and_file_settings, settings_from_args, trackers,
)

logger = logging.getLogger("train_quantizer")


@dataclass
class QuantizerTrainingConfig:
    """Every setting of a quantizer training run (see the module docstring for presets)."""

    # model
    model_preset: str = "tiny"  # LAPAQuantizerConfig preset: "tiny" or "reference"
    model: dict = field(default_factory=dict)  # overrides of LAPAQuantizerConfig fields
    init_from: str | None = None  # start from a save_pretrained folder (e.g. the converted laq_openx)
    # data
    dataset: list = field(default_factory=list)  # LeRobot dataset folders or Hub repo ids
    video_folder: list = field(default_factory=list)  # human-video folders
    labels: list = field(default_factory=list)  # one labels file (json/jsonl/csv) per video folder
    mix_weights: list | None = None  # sampling weight per source (datasets first, then video folders)
    camera_key: str | None = None  # default: each dataset's first camera
    gap_seconds: float = 0.6  # time between the frames of a pair (reference: 0.6 s for robot video)
    drop_crossing: bool = False  # drop pairs that cross the episode end instead of clamping (reference: clamp)
    holdout_episodes: float = 0.1  # held-out share (< 1) or count (>= 1) of each source's episodes
    skip_corrupt: bool = False
    streaming: bool = False
    shuffle_buffer_size: int = 0  # extra datasets shuffle buffer when streaming (pairs)
    cache_episodes: bool = True  # map-style: keep every decoded episode in memory (small datasets)
    num_workers: int = 0
    # optimisation
    learning_rate: float = 1e-4
    adam_betas: list = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    max_grad_norm: float = 0.5
    batch_size: int = 64  # per device
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # "no" or "bf16" (through Accelerate)
    gradient_checkpointing: bool = False
    max_steps: int = 100_000
    # No codebook replacement in the last N steps: a code replaced at the very end has no time to take pairs, and
    # the final model would carry it unused (the reference's schedule ends at step 4500 of 100k, so this never
    # matters there).
    replacement_cooldown_steps: int = 0
    seed: int = 0
    # checkpoints, evaluation, logging
    output_dir: str = "runs/quantizer"
    save_every: int = 1000
    keep_checkpoints: int = 2
    eval_every: int = 1000
    eval_max_pairs: int = 2000
    probe_train_pairs: int = 3000  # training pairs the evaluation's probes are fitted on
    eval_batch_size: int = 64
    log_every: int = 50
    report_to: str = "auto"  # "auto" (TensorBoard if installed), "none", or an Accelerate tracker name
    resume: bool = False


TRAINING_PRESETS: dict[str, dict] = {
    # The paper's quantizer and recipe.
    "reference": dict(
        model_preset="reference", learning_rate=1e-4, adam_betas=[0.9, 0.99], weight_decay=0.0, max_grad_norm=0.5,
        batch_size=64, max_steps=100_000, gap_seconds=0.6, save_every=1000, eval_every=5000,
    ),
    # CPU-sized: the tiny model at 64 px; a higher learning rate so that a run of ~30 minutes on 2 cores learns.
    # Per-slot codebooks with replacement copies that can split their originals' pairs: with the reference's shared
    # codebook and 1e-12 replacement noise, on Meta-World the slots over the arm and over the table split the 8
    # codes between them (MT10, step 1000: slots 0-1 used codes {1..5}, slots 2-3 codes {0, 6, 7}). The reference
    # rule (hits per batch over 100-500 steps) stops firing after a few hundred steps, so a code whose share falls
    # to ~1% stays there; replacing codes under a 3% share, and not in the last 500 steps, kept every code above
    # 2% of the held-out pairs on MT10 (min 4.5% at step 3000, against 1.7% without).
    "tiny": dict(
        model_preset="tiny", model={"codebook_per_slot": True, "replacement_noise": 0.1, "replacement_min_share": 0.03},
        learning_rate=5e-4, adam_betas=[0.9, 0.99], weight_decay=0.0, max_grad_norm=0.5,
        batch_size=32, max_steps=3000, gap_seconds=0.6, save_every=250, eval_every=1000, log_every=25,
        replacement_cooldown_steps=500,
    ),
}

FIELD_NAMES = [f.name for f in dataclasses.fields(QuantizerTrainingConfig)]


def build_parser() -> argparse.ArgumentParser:
    """The command line: `--preset`, `--config FILE`, and one flag per `QuantizerTrainingConfig` field."""
    parser = argparse.ArgumentParser(
        prog="training/train_quantizer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--preset", choices=sorted(TRAINING_PRESETS), default=None,
                        help="training preset (default: tiny, or the YAML file's `preset`)")
    parser.add_argument("--config", default=None, help="YAML file of settings")
    add_config_arguments(
        parser, QuantizerTrainingConfig,
        repeatable={"dataset": "LeRobot dataset folder or Hub id (repeatable)",
                    "video_folder": "folder of human videos (repeatable; one --labels file each)",
                    "labels": "labels file (json/jsonl/csv) of a --video-folder (repeatable)"},
        key_values={"model": "override a LAPAQuantizerConfig field, e.g. --model hidden_size=256 (repeatable)"},
    )
    return parser


def resolve_config(argv: list[str] | None = None) -> QuantizerTrainingConfig:
    """defaults <- preset <- YAML file <- command line."""
    args = build_parser().parse_args(argv)
    preset, settings = preset_and_file_settings(args.config, args.preset, TRAINING_PRESETS, FIELD_NAMES, nested="model")
    settings = settings_from_args(args, settings, QuantizerTrainingConfig, key_values=("model",))
    config = QuantizerTrainingConfig(**coerce_settings(settings, QuantizerTrainingConfig))
    _validate(config)
    config.preset = preset  # recorded in training_config.json
    return config


def _validate(c: QuantizerTrainingConfig) -> None:
    if not c.dataset and not c.video_folder:
        raise ValueError("No data: give at least one --dataset (LeRobot folder or Hub id) or --video-folder.")
    if len(c.labels) != len(c.video_folder):
        raise ValueError(f"Give one --labels file per --video-folder ({len(c.video_folder)} folders, {len(c.labels)} labels).")
    n_sources = len(c.dataset) + len(c.video_folder)
    if c.mix_weights is not None and len(c.mix_weights) != n_sources:
        raise ValueError(f"--mix-weights needs one weight per source ({n_sources}), got {c.mix_weights}.")
    if c.mixed_precision not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {c.mixed_precision!r}.")
    for name in ("batch_size", "max_steps", "save_every", "eval_every", "log_every", "gradient_accumulation_steps"):
        if int(getattr(c, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}.")
    unknown_model = sorted(set(c.model) - set(LAPAQuantizerConfig().to_dict()))
    if unknown_model:
        raise ValueError(f"Unknown quantizer setting(s) in `model`: {unknown_model}.")


# ------------------------------------------------------------------------------------------------------- data
def load_sources(c: QuantizerTrainingConfig) -> list[tuple[str, object]]:
    from training.data import VideoFolderDataset, load_lerobot_dataset

    sources = [(str(path), load_lerobot_dataset(path, skip_corrupt=c.skip_corrupt)) for path in c.dataset]
    for folder, labels in zip(c.video_folder, c.labels):
        sources.append((str(folder), VideoFolderDataset(folder, labels, skip_corrupt=c.skip_corrupt)))
    return sources


def collate_pixels(items: list[dict]) -> torch.Tensor:
    """Only the pixels train the quantizer: (B, 2, 3, S, S) uint8 or float."""
    return torch.stack([item["pixel_values"] for item in items])


def to_unit_float(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float().div_(255.0) if pixels.dtype == torch.uint8 else pixels.float()


# ------------------------------------------------------------------------------------------------------ training
def build_model(c: QuantizerTrainingConfig) -> LAPAQuantizerModel:
    if c.init_from:
        model = LAPAQuantizerModel.from_pretrained(c.init_from)
        for key, value in c.model.items():
            setattr(model.config, key, value)
    else:
        model = LAPAQuantizerModel(LAPAQuantizerConfig.from_preset(c.model_preset, **c.model))
    if c.replacement_cooldown_steps:
        last = c.max_steps - c.replacement_cooldown_steps
        schedule = model.config.replacement_steps
        schedule = list(schedule if schedule is not None else REFERENCE_REPLACEMENT_STEPS)
        model.config.replacement_steps = [step for step in schedule if step <= last]
    return model


def train(c: QuantizerTrainingConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from training.data import EpochSampler, FramePairDataset, make_streaming_frame_pairs, split_episodes

    output_dir = Path(c.output_dir)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=c.mixed_precision,
        gradient_accumulation_steps=c.gradient_accumulation_steps,
        log_with=trackers(c.report_to),
        project_dir=str(output_dir),
    )
    main = accelerator.is_main_process
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if main:
        existing = latest_checkpoint(output_dir)
        if existing is not None and not c.resume:
            raise FileExistsError(
                f"{output_dir} already holds checkpoints (latest {existing.name}); pass --resume to continue it or "
                f"choose another --output-dir."
            )
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    set_seed(c.seed)  # identical initial weights on every rank
    model = build_model(c)
    if c.gradient_checkpointing:
        enable_activation_checkpointing(model)
    image_size = model.config.image_size

    # Data: per source, training episodes and held-out episodes.
    sources = load_sources(c)
    train_sets, eval_sets, split_record = [], [], {}
    for i, (name, source) in enumerate(sources):
        train_eps, eval_eps = split_episodes(source, c.holdout_episodes, c.seed + i)
        split_record[name] = {"train_episodes": train_eps, "heldout_episodes": eval_eps}
        common = dict(camera_key=c.camera_key, gap_seconds=c.gap_seconds, image_size=image_size,
                      drop_crossing=c.drop_crossing, skip_corrupt=c.skip_corrupt)
        train_sets.append(FramePairDataset(
            source, episodes=train_eps, output="uint8",
            episode_cache_size=len(train_eps) if c.cache_episodes else 2, **common,
        ))
        eval_sets.append(FramePairDataset(source, episodes=eval_eps, output="float",
                                          episode_cache_size=len(eval_eps), **common))
    weights = None
    if c.mix_weights is not None:
        total = float(sum(c.mix_weights))
        weights = [float(w) / total for w in c.mix_weights]

    effective_batch = c.batch_size * accelerator.num_processes * c.gradient_accumulation_steps
    if c.streaming:
        import datasets as hf_datasets

        streams = [make_streaming_frame_pairs(p, seed=c.seed, shuffle=True, shuffle_buffer_size=c.shuffle_buffer_size or None)
                   for p in train_sets]
        stream = streams[0] if len(streams) == 1 else hf_datasets.interleave_datasets(
            streams, probabilities=weights, seed=c.seed, stopping_strategy="all_exhausted")
        stream = hf_datasets.distributed.split_dataset_by_node(
            stream, rank=accelerator.process_index, world_size=accelerator.num_processes)
        sampler = None
        dataloader = torch.utils.data.DataLoader(
            stream.with_format("torch"), batch_size=c.batch_size, num_workers=c.num_workers,
            collate_fn=collate_pixels, drop_last=True,
        )
        batches_per_epoch = None
    else:
        train_data = torch.utils.data.ConcatDataset(train_sets)
        sampler = EpochSampler([len(p) for p in train_sets], weights, c.seed)
        loader = torch.utils.data.DataLoader(
            train_data, batch_size=c.batch_size, sampler=sampler, num_workers=c.num_workers,
            collate_fn=collate_pixels, drop_last=True, persistent_workers=c.num_workers > 0,
            generator=torch.Generator().manual_seed(c.seed),  # worker seeds must not draw from the global RNG
        )
        dataloader = accelerator.prepare(loader)
        batches_per_epoch = len(dataloader)
        if batches_per_epoch == 0:
            raise ValueError(f"{len(train_data)} training pairs are fewer than one batch of {c.batch_size} per process.")

    optimizer = torch.optim.Adam(model.parameters(), lr=c.learning_rate, betas=tuple(c.adam_betas),
                                 weight_decay=c.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    nsvq = accelerator.unwrap_model(model).quantizer

    step, epoch, batch_in_epoch, history, sync_checks = 0, 0, 0, [], []
    if c.resume:
        folder = latest_checkpoint(output_dir)
        if folder is None:
            logger.info("--resume: no checkpoint in %s yet, starting from scratch", output_dir)
        else:
            state, extra = load_checkpoint(accelerator, folder, model=model, optimizer=optimizer)
            step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            history = state.get("history", [])
            sync_checks = state.get("codebook_sync_checks", [])
            nsvq.code_hits = extra["code_hits"].to(nsvq.codebook.device)
            if main:
                logger.info("resumed from %s (step %d, epoch %d, batch %d)", folder, step, epoch, batch_in_epoch)

    config_record = {**dataclasses.asdict(c), "preset": getattr(c, "preset", None), "split": split_record,
                     "world_size": accelerator.num_processes, "effective_batch_size": effective_batch}
    if main:
        (output_dir / "training_config.json").write_text(json.dumps(config_record, indent=2))
        accelerator.init_trackers("train_quantizer", config={k: v for k, v in dataclasses.asdict(c).items()
                                                             if isinstance(v, (int, float, str, bool))})
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("model %.2fM parameters; %d training pairs in %d sources, %d held-out pairs; effective batch %d",
                    n_params / 1e6, sum(len(p) for p in train_sets), len(train_sets), sum(len(p) for p in eval_sets),
                    effective_batch)

    def trainer_state():
        return {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "history": history,
                "codebook_sync_checks": sync_checks, "config": config_record}

    def run_eval():
        """Held-out evaluation of each source on its own (its episodes, its action space), probes fitted on that
        source's training pairs. One source: its metrics; several: {"sources": {name: metrics}}."""
        if not main:
            return None
        from training.quantizer_eval import evaluate_quantizer

        step_dir = output_dir / "eval" / f"step-{step:07d}"
        results = {}
        # The evaluation must not move the training RNG streams (exact resume, identical runs with or without it).
        with torch.random.fork_rng(devices=[]):
            state = np.random.get_state()
            for i, ((name, _), train_pairs, eval_pairs) in enumerate(zip(sources, train_sets, eval_sets)):
                g = torch.Generator().manual_seed(c.seed)
                probe_idx = torch.randperm(len(train_pairs), generator=g)[: c.probe_train_pairs].tolist()
                results[name] = evaluate_quantizer(
                    accelerator.unwrap_model(model), eval_pairs,
                    probe_train_pairs=torch.utils.data.Subset(train_pairs, sorted(probe_idx)),
                    output_dir=step_dir if len(sources) == 1 else step_dir / f"source-{i}", step=step,
                    batch_size=c.eval_batch_size, max_pairs=c.eval_max_pairs, seed=c.seed,
                )
            np.random.set_state(state)
        model.train()
        return next(iter(results.values())) if len(results) == 1 else {"step": step, "sources": results}

    model.train()
    progress = tqdm(total=c.max_steps, initial=step, disable=not main, desc="train quantizer", dynamic_ncols=True)
    window = {"loss": 0.0, "perplexity": 0.0, "n": 0, "codes": set(), "t0": time.perf_counter(), "pairs": 0}
    last_eval = None
    while step < c.max_steps:
        if sampler is not None:
            sampler.set_epoch(epoch)
            batches = accelerator.skip_first_batches(dataloader, batch_in_epoch) if batch_in_epoch else dataloader
        else:
            dataloader.dataset.set_epoch(epoch)
            batches = iter(dataloader)
            for _ in range(batch_in_epoch):  # replay the stream to the saved position (deterministic)
                next(batches)
        for pixels in batches:
            pixels = to_unit_float(pixels.to(accelerator.device))
            with accelerator.accumulate(model):
                out = model(pixels, step=step + 1 if accelerator.sync_gradients else None)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and c.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), c.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batch_in_epoch += 1
            window["loss"] += out.loss.item()
            window["perplexity"] += out.perplexity.item()
            window["n"] += 1
            window["pairs"] += pixels.shape[0] * accelerator.num_processes
            window["codes"].update(map(tuple, out.codes.tolist()))
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if out.replaced_codes is not None and main and len(out.replaced_codes):
                logger.info("step %d: replaced %d unused code(s): %s", step, len(out.replaced_codes), out.replaced_codes.tolist())
            if step % c.log_every == 0 or step == c.max_steps:
                elapsed = time.perf_counter() - window["t0"]
                record = {
                    "step": step, "loss": window["loss"] / window["n"], "perplexity": window["perplexity"] / window["n"],
                    "distinct_latent_actions": len(window["codes"]), "pairs_per_s": window["pairs"] / max(elapsed, 1e-9),
                    "epoch": epoch,
                }
                history.append(record)
                accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
                progress.set_postfix(loss=f"{record['loss']:.5f}", ppl=f"{record['perplexity']:.2f}")
                if main:
                    tqdm.write(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}))
                window = {"loss": 0.0, "perplexity": 0.0, "n": 0, "codes": set(), "t0": time.perf_counter(), "pairs": 0}
            if step % c.eval_every == 0 and step < c.max_steps:
                metrics = run_eval()
                if metrics is not None:
                    last_eval = metrics
                    accelerator.log(_flat_scalars(metrics, "eval"), step=step)
                accelerator.wait_for_everyone()
            if step % c.save_every == 0 or step == c.max_steps:
                sync_checks.append({"step": step, "codebooks_identical": codebooks_in_sync(accelerator, nsvq.codebook),
                                    "world_size": accelerator.num_processes})
                save_checkpoint(accelerator, output_dir, step, model=model, optimizer=optimizer,
                                trainer_state=trainer_state(), rank_extra={"code_hits": nsvq.code_hits.cpu()},
                                keep=c.keep_checkpoints)
            if step >= c.max_steps:
                break
        else:
            epoch += 1
            batch_in_epoch = 0
            continue
        break
    progress.close()

    final_eval = run_eval()
    if final_eval is not None:
        last_eval = final_eval
        accelerator.log(_flat_scalars(final_eval, "eval"), step=step)
    accelerator.wait_for_everyone()
    if main:
        model_dir = output_dir / "model"
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(str(model_dir))
        (model_dir / "training_config.json").write_text(json.dumps(config_record, indent=2))
        if last_eval is not None:
            (output_dir / "eval" / "final_metrics.json").write_text(json.dumps(last_eval, indent=2))
        logger.info("saved the model to %s", model_dir)
    accelerator.end_training()
    return {"step": step, "eval": last_eval, "history": history}


def codebooks_in_sync(accelerator, codebook: torch.Tensor) -> bool:
    """Whether every rank holds a bitwise-identical codebook (collective). A divergence is a bug: raise."""
    if accelerator.num_processes == 1:
        return True
    gathered = accelerator.gather(codebook.detach().unsqueeze(0))
    same = all(torch.equal(gathered[0], other) for other in gathered[1:])
    if not same:
        raise RuntimeError("The codebooks of the ranks diverged; codebook replacement must take the same decision on every rank.")
    return True


def _flat_scalars(metrics: dict, prefix: str) -> dict:
    """Numbers of a nested metrics dict as `prefix/a/b` scalars, for trackers."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}"
        if isinstance(value, bool):
            flat[name] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(float(value)):
            flat[name] = float(value)
        elif isinstance(value, dict):
            flat.update(_flat_scalars(value, name))
    return flat


def main(argv: list[str] | None = None) -> int:
    try:
        config = resolve_config(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
