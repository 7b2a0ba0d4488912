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
end, the held-out evaluation (`training/eval/`) writes metrics and plots under `<output_dir>/eval/`.
The final model is saved with `save_pretrained` in `<output_dir>/model`, with `training_config.json` beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from modeling_lapa import LAPAQuantizerConfig, LAPAQuantizerModel
from modeling_lapa.configuration_lapa_quantizer import REFERENCE_REPLACEMENT_STEPS
from modeling_lapa.transformers_compat import enable_activation_checkpointing
from training.data import (
    EpochSampler, FramePairDataset, VideoFolderDataset, load_lerobot_dataset, make_streaming_frame_pairs,
    split_episodes,
)
from training.engine import TrainingEngine, TrainingStage
from training.eval import evaluate_quantizer
from training.settings import preset_config, resolve_stage_config, stage_parser

logger = logging.getLogger("train_quantizer")


@dataclass
class QuantizerTrainingConfig:
    """Every setting of a quantizer training run (see the module docstring for presets)."""

    preset: str = "tiny"  # the training preset these settings started from (TRAINING_PRESETS; `--preset`)
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
    # "no" or "bf16" (Accelerate's autocast: GEMMs, convolutions and attention in bf16; the residual streams, the NSVQ
    # codes and the pixels stay fp32). Off in every preset: it changes the numbers (benchmarks/quantizer_speed.py)
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    # torch.compile the three transformer stacks (inductor): the same numbers within fp32 noise; worth its minutes of
    # compiling on long runs, mostly with bf16 (benchmarks/quantizer_speed.py --compile)
    compile: bool = False
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
    return stage_parser(
        QuantizerTrainingConfig, prog="training/train_quantizer.py", description=__doc__, presets=TRAINING_PRESETS,
        repeatable={"dataset": "LeRobot dataset folder or Hub id (repeatable)",
                    "video_folder": "folder of human videos (repeatable; one --labels file each)",
                    "labels": "labels file (json/jsonl/csv) of a --video-folder (repeatable)"},
        key_values={"model": "override a LAPAQuantizerConfig field, e.g. --model hidden_size=256 (repeatable)"},
    )


def resolve_config(argv: list[str] | None = None) -> QuantizerTrainingConfig:
    """defaults <- preset <- YAML file <- command line."""
    return resolve_stage_config(QuantizerTrainingConfig, build_parser(), argv, presets=TRAINING_PRESETS,
                                key_values=("model",), validate=_validate)


def config_from_preset(preset: str = "tiny", **settings) -> QuantizerTrainingConfig:
    """Settings in code: `config_from_preset("tiny", dataset=["data"], max_steps=300)`; `model` adds to the
    preset's."""
    return preset_config(QuantizerTrainingConfig, TRAINING_PRESETS, preset, nested="model", validate=_validate,
                         **settings)


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


@dataclass
class QuantizerData:
    """Per source: its training and held-out frame pairs; the training batches (map-style with `sampler`, or a
    stream when `sampler` is None)."""

    sources: list
    train_sets: list
    eval_sets: list
    split: dict
    dataloader: object
    sampler: object | None


def build_data(c: QuantizerTrainingConfig, accelerator, image_size: int) -> QuantizerData:
    sources = load_sources(c)
    train_sets, eval_sets, split = [], [], {}
    for i, (name, source) in enumerate(sources):
        train_eps, eval_eps = split_episodes(source, c.holdout_episodes, c.seed + i)
        split[name] = {"train_episodes": train_eps, "heldout_episodes": eval_eps}
        common = dict(camera_key=c.camera_key, gap_seconds=c.gap_seconds, image_size=image_size,
                      drop_crossing=c.drop_crossing, skip_corrupt=c.skip_corrupt)
        train_sets.append(FramePairDataset(source, episodes=train_eps, output="uint8",
                                           episode_cache_size=len(train_eps) if c.cache_episodes else 2, **common))
        eval_sets.append(FramePairDataset(source, episodes=eval_eps, output="float",
                                          episode_cache_size=len(eval_eps), **common))
    weights = None if c.mix_weights is None else [float(w) / float(sum(c.mix_weights)) for w in c.mix_weights]
    loader_kwargs = dict(batch_size=c.batch_size, num_workers=c.num_workers, collate_fn=collate_pixels, drop_last=True)
    if c.streaming:
        import datasets as hf_datasets

        streams = [make_streaming_frame_pairs(p, seed=c.seed, shuffle=True,
                                              shuffle_buffer_size=c.shuffle_buffer_size or None) for p in train_sets]
        stream = streams[0] if len(streams) == 1 else hf_datasets.interleave_datasets(
            streams, probabilities=weights, seed=c.seed, stopping_strategy="all_exhausted")
        stream = hf_datasets.distributed.split_dataset_by_node(
            stream, rank=accelerator.process_index, world_size=accelerator.num_processes)
        loader = torch.utils.data.DataLoader(stream.with_format("torch"), **loader_kwargs)
        return QuantizerData(sources, train_sets, eval_sets, split, loader, None)
    train_data = torch.utils.data.ConcatDataset(train_sets)
    sampler = EpochSampler([len(p) for p in train_sets], weights, c.seed)
    loader = accelerator.prepare(torch.utils.data.DataLoader(
        train_data, sampler=sampler, persistent_workers=c.num_workers > 0,
        generator=torch.Generator().manual_seed(c.seed),  # worker seeds must not draw from the global RNG
        **loader_kwargs))
    if len(loader) == 0:
        raise ValueError(f"{len(train_data)} training pairs are fewer than one batch of {c.batch_size} per process.")
    return QuantizerData(sources, train_sets, eval_sets, split, loader, sampler)


class QuantizerStage(TrainingStage):
    """NSVQ training of the quantizer: the loss and perplexity in the log, codebook replacement reported, the
    per-rank hit counters and the codebook sync checks in checkpoints, held-out evaluation per source."""

    name = "train quantizer"

    def __init__(self, c: QuantizerTrainingConfig, engine: TrainingEngine, model, optimizer, data: QuantizerData):
        self.c, self.engine, self.data = c, engine, data
        self.model, self.optimizer = model, optimizer
        self.dataloader, self.sampler = data.dataloader, data.sampler
        self.nsvq = engine.accelerator.unwrap_model(model).quantizer
        self.sync_checks: list = []
        self._reset_window()

    def _reset_window(self) -> None:
        self.window = {"loss": 0.0, "perplexity": 0.0, "n": 0, "codes": set(), "t0": time.perf_counter(), "pairs": 0}

    def forward(self, pixels, next_step):
        pixels = to_unit_float(pixels.to(self.engine.accelerator.device))
        self._batch_pairs = pixels.shape[0]
        return self.model(pixels, step=next_step)

    def observe(self, output, batch) -> None:
        w = self.window
        w["loss"] += output.loss.item()
        w["perplexity"] += output.perplexity.item()
        w["n"] += 1
        w["pairs"] += self._batch_pairs * self.engine.accelerator.num_processes
        w["codes"].update(map(tuple, output.codes.tolist()))

    def log_record(self) -> dict:
        w, elapsed = self.window, time.perf_counter() - self.window["t0"]
        record = {"loss": w["loss"] / w["n"], "perplexity": w["perplexity"] / w["n"],
                  "distinct_latent_actions": len(w["codes"]), "pairs_per_s": w["pairs"] / max(elapsed, 1e-9)}
        self._reset_window()
        return record

    def postfix(self, record: dict) -> dict:
        return {"loss": f"{record['loss']:.5f}", "ppl": f"{record['perplexity']:.2f}"}

    def after_step(self, step: int, output) -> None:
        if output.replaced_codes is not None and self.engine.is_main and len(output.replaced_codes):
            logger.info("step %d: replaced %d unused code(s): %s", step, len(output.replaced_codes),
                        output.replaced_codes.tolist())

    def evaluate(self, step: int) -> dict | None:
        """Each source on its own (its episodes, its action space), probes fitted on that source's training pairs.
        One source: its metrics; several: {"step": step, "sources": {name: metrics}}."""
        if not self.engine.is_main:
            return None
        c, d = self.c, self.data
        step_dir = self.engine.output_dir / "eval" / f"step-{step:07d}"
        results = {}
        # The evaluation must not move the training RNG streams (exact resume, identical runs with or without it).
        with torch.random.fork_rng(devices=[]):
            state = np.random.get_state()
            for i, ((name, _), train_pairs, eval_pairs) in enumerate(zip(d.sources, d.train_sets, d.eval_sets)):
                g = torch.Generator().manual_seed(c.seed)
                probe_idx = torch.randperm(len(train_pairs), generator=g)[: c.probe_train_pairs].tolist()
                results[name] = evaluate_quantizer(
                    self.engine.accelerator.unwrap_model(self.model), eval_pairs,
                    probe_train_pairs=torch.utils.data.Subset(train_pairs, sorted(probe_idx)),
                    output_dir=step_dir if len(d.sources) == 1 else step_dir / f"source-{i}", step=step,
                    batch_size=c.eval_batch_size, max_pairs=c.eval_max_pairs, seed=c.seed,
                )
            np.random.set_state(state)
        self.model.train()
        return next(iter(results.values())) if len(results) == 1 else {"step": step, "sources": results}

    def before_save(self, step: int) -> None:
        self.sync_checks.append({"step": step, "world_size": self.engine.accelerator.num_processes,
                                 "codebooks_identical": codebooks_in_sync(self.engine.accelerator, self.nsvq.codebook)})

    def checkpoint_state(self) -> dict:
        return {"codebook_sync_checks": self.sync_checks}

    def rank_state(self) -> dict:
        return {"code_hits": self.nsvq.code_hits.cpu()}

    def restore(self, state: dict, rank_state: dict, step: int) -> None:
        self.sync_checks = state.get("codebook_sync_checks", [])
        self.nsvq.code_hits = rank_state["code_hits"].to(self.nsvq.codebook.device)

    def save_final(self, output_dir: Path, result) -> None:
        model_dir = output_dir / "model"
        self.engine.accelerator.unwrap_model(self.model).save_pretrained(str(model_dir))
        (model_dir / "training_config.json").write_text(json.dumps(self.record, indent=2))
        if result.last_eval is not None:
            (output_dir / "eval" / "final_metrics.json").write_text(json.dumps(result.last_eval, indent=2))
        logger.info("saved the model to %s", model_dir)


def train(c: QuantizerTrainingConfig) -> dict:
    from accelerate.utils import set_seed

    engine = TrainingEngine(c, name="train_quantizer")
    set_seed(c.seed)  # identical initial weights on every rank
    model = build_model(c)
    model.config.gap_seconds = c.gap_seconds  # what the quantizer tells the labelling stage (saved in config.json)
    if c.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if c.compile:
        for stack in (model.encoder_spatial, model.encoder_temporal, model.decoder_spatial):
            stack.compile()  # in place: the state_dict keeps its keys
    data = build_data(c, engine.accelerator, model.config.image_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=c.learning_rate, betas=tuple(c.adam_betas),
                                 weight_decay=c.weight_decay)
    model, optimizer = engine.accelerator.prepare(model, optimizer)
    stage = QuantizerStage(c, engine, model, optimizer, data)
    stage.record = {**dataclasses.asdict(c), "split": data.split, "world_size": engine.accelerator.num_processes,
                    "effective_batch_size": engine.effective_batch_size}
    if engine.is_main:
        logger.info("model %.2fM parameters; %d training pairs in %d sources, %d held-out pairs; effective batch %d",
                    sum(p.numel() for p in model.parameters()) / 1e6, sum(len(p) for p in data.train_sets),
                    len(data.train_sets), sum(len(p) for p in data.eval_sets), engine.effective_batch_size)
    tracker_config = {k: v for k, v in dataclasses.asdict(c).items() if isinstance(v, (int, float, str, bool))}
    result = engine.fit(stage, stage.record, tracker_config)
    return {"step": result.step, "eval": result.last_eval, "history": result.history}


def codebooks_in_sync(accelerator, codebook: torch.Tensor) -> bool:
    """Whether every rank holds a bitwise-identical codebook (collective). A divergence is a bug: raise."""
    if accelerator.num_processes == 1:
        return True
    gathered = accelerator.gather(codebook.detach().unsqueeze(0))
    same = all(torch.equal(gathered[0], other) for other in gathered[1:])
    if not same:
        raise RuntimeError("The codebooks of the ranks diverged; codebook replacement must take the same decision on every rank.")
    return True


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
