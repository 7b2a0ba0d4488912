"""The VLA stages run by `training/pretrain.py` (latent pretraining) and `training/finetune.py` (action finetuning):
one stage on the shared training engine (`training/engine.py`), two sets of defaults.

A run reads LeRobot datasets (the labelled output of `training/label_latents.py` for latent targets, or any dataset
with an `action` column for action targets), holds out a share of each dataset's episodes (stratified by task),
builds or loads a `LAPAForActionPrediction` and its `LAPAProcessor`, trains with Accelerate (full or LoRA through
peft), checkpoints for an exact resume, evaluates held-out token accuracy against the majority baseline, and saves
the model and processor together (`<output_dir>/model`, or for LoRA the adapter in `<output_dir>/adapter` next to
the base model in `<output_dir>/base`; `python -m training.merge_lora` writes a plain checkpoint from them).
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

from modeling_lapa import LAPAConfig, LAPAForActionPrediction, count_image_tokens, tiny_backbone_config
from modeling_lapa.transformers_compat import enable_activation_checkpointing
from training.data import (
    EpochSampler, LABELLING_INFO_KEY, collate_vla_frames, LatentLabelLayout, VLAFrameDataset, load_lerobot_dataset,
    make_streaming_vla_frames, split_episodes,
)
from training.engine import TrainingEngine, TrainingStage
from training.eval import evaluate_vla
from training.settings import preset_config, resolve_stage_config, stage_parser

logger = logging.getLogger("vla_training")

TINY_BACKBONES = {"tiny-llava": "llava", "tiny-idefics3": "idefics3"}
# Linear layers of the language model that LoRA adapts (LLaMA/Mistral/Qwen-style names); the vision tower stays
# untouched (frozen, as in the paper).
DEFAULT_LORA_TARGETS = r".*\.(language_model|text_model)\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class VLATrainingConfig:
    """Every setting of a latent-pretraining or action-finetuning run."""

    stage: str = "pretrain"  # "pretrain" or "finetune": set by the script (training/pretrain.py, training/finetune.py)
    preset: str = "tiny"  # the preset these settings started from (STAGE_PRESETS[stage]; `--preset`)
    # what to train
    target: str = "latent"  # "latent" (latent pretraining) or "action" (ground-truth actions: finetuning, ACTIONVLA)
    backbone: str = "tiny-llava"  # tiny-llava | tiny-idefics3 | a Hub id or folder of an image-text-to-text model
    init_from: str | None = None  # a LAPA model folder (e.g. the latent-pretrained model to finetune)
    tiny: dict = field(default_factory=dict)  # tiny backbone sizes: image_size, patch_size, hidden_size, num_layers,
    # vision_hidden_size, vision_num_layers (TINY_BACKBONE_SIZES)
    freeze_vision_encoder: bool = True
    attn_implementation: str = "sdpa"
    # processor
    num_latent_codes: int | None = None  # default: from the labelled dataset's quantizer record, else 8
    num_action_bins: int = 256
    gripper_dims: list = field(default_factory=list)  # binary gripper action dimensions
    prompt_template: str | None = None  # default: "What action should the robot take to {instruction}?"
    # k future actions per prediction (action chunking; target="action"): the target of frame t is actions t..t+k-1
    # (the last one repeated past the episode's end), k x D tokens; recorded in the model's config and processor
    action_chunk_size: int = 1
    # data
    dataset: list = field(default_factory=list)  # LeRobot dataset folders or Hub repo ids
    camera_key: str | None = None
    holdout_episodes: float = 0.1  # held-out share (< 1) or count (>= 1) of each dataset's episodes, per task
    train_episodes_per_task: int | None = None  # keep only this many training episodes per task (few-shot finetuning)
    frame_stride: int = 1
    streaming: bool = False
    num_workers: int = 0
    skip_corrupt: bool = False
    # optimisation
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.95])
    lr_schedule: str = "constant"  # constant | cosine (both after a linear warmup)
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    batch_size: int = 32  # per device
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # "no" or "bf16"
    gradient_checkpointing: bool = False
    max_steps: int = 1000
    # stop before max_steps once the training token accuracy (mean over a log window) reaches this (the paper
    # finetunes "until the training action accuracy reaches 95%"); None: always max_steps
    stop_at_train_accuracy: float | None = None
    seed: int = 0
    # LoRA (peft)
    lora: bool = False
    lora_rank: int = 32
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str = DEFAULT_LORA_TARGETS
    # checkpoints, evaluation, logging
    output_dir: str = "runs/vla"
    save_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 500
    eval_max_frames: int = 2000
    eval_batch_size: int = 64
    log_every: int = 25
    report_to: str = "auto"
    resume: bool = False


TINY_BACKBONE_SIZES = dict(image_size=64, patch_size=8, hidden_size=128, num_layers=4, vision_hidden_size=32,
                           vision_num_layers=2)

STAGE_PRESETS: dict[str, dict[str, dict]] = {
    "pretrain": {
        # CPU: a tiny LLaVA-style model from scratch on 64 px frames.
        "tiny": dict(target="latent", backbone="tiny-llava", tiny=TINY_BACKBONE_SIZES, learning_rate=1e-3,
                     weight_decay=0.0, warmup_steps=50, lr_schedule="cosine", batch_size=32, max_steps=1500,
                     save_every=250, eval_every=500),
        # GPUs: SmolVLM-256M (Idefics3 family), the paper's recipe shape (batch 128 in total, vision encoder
        # frozen, one epoch is enough for latent pretraining), bf16.
        "smolvlm": dict(target="latent", backbone="HuggingFaceTB/SmolVLM-256M-Instruct", learning_rate=2e-5,
                        weight_decay=0.0, warmup_steps=500, lr_schedule="cosine", batch_size=16,
                        gradient_accumulation_steps=1, mixed_precision="bf16", max_steps=20_000, save_every=2000,
                        eval_every=2000, num_workers=4),
    },
    "finetune": {
        "tiny": dict(target="action", backbone="tiny-llava", tiny=TINY_BACKBONE_SIZES, learning_rate=1e-3,
                     warmup_steps=50, lr_schedule="cosine", batch_size=32, max_steps=1500, save_every=250,
                     eval_every=500),
        # GPUs: LoRA finetuning as in the paper's baselines (batch 32), the new token rows trained with the adapter.
        "smolvlm": dict(target="action", backbone="HuggingFaceTB/SmolVLM-256M-Instruct", lora=True, lora_rank=32,
                        learning_rate=5e-4, warmup_steps=100, lr_schedule="cosine", batch_size=32,
                        mixed_precision="bf16", max_steps=5000, save_every=1000, eval_every=1000, num_workers=4),
    },
}

FIELD_NAMES = [f.name for f in dataclasses.fields(VLATrainingConfig)]


# ----------------------------------------------------------------------------------------------------- settings
def build_parser(stage: str, description: str | None = None) -> argparse.ArgumentParser:
    """The command line of a VLA stage: `--preset`, `--config FILE`, and one flag per `VLATrainingConfig` field."""
    return stage_parser(
        VLATrainingConfig, prog=f"training/{stage}.py", description=description, presets=STAGE_PRESETS[stage],
        repeatable={"dataset": "LeRobot dataset folder or Hub id (repeatable)"},
        key_values={"tiny": "tiny backbone size, e.g. --tiny hidden_size=256 (repeatable)"},
    )


def resolve_config(stage: str, argv: list[str] | None = None, description: str | None = None) -> VLATrainingConfig:
    """defaults <- preset <- YAML file <- command line (unknown keys are errors)."""
    return resolve_stage_config(VLATrainingConfig, build_parser(stage, description), argv,
                                presets=STAGE_PRESETS[stage], key_values=("tiny",), fixed={"stage": stage},
                                validate=validate_config)


def config_from_preset(stage: str, preset: str = "tiny", **settings) -> VLATrainingConfig:
    """Settings in code: `config_from_preset("finetune", dataset=["data"], init_from="runs/lapa/model")`."""
    return preset_config(VLATrainingConfig, STAGE_PRESETS[stage], preset, nested="tiny", validate=validate_config,
                         stage=stage, **settings)


def validate_config(c: VLATrainingConfig) -> None:
    if not c.dataset:
        raise ValueError("No data: give at least one --dataset (a LeRobot folder or Hub id).")
    if c.target not in ("latent", "action"):
        raise ValueError(f"target must be 'latent' or 'action', got {c.target!r}")
    if c.mixed_precision not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {c.mixed_precision!r}")
    if c.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {c.lr_schedule!r}")
    if c.stop_at_train_accuracy is not None and not 0 < c.stop_at_train_accuracy <= 1:
        raise ValueError(f"stop_at_train_accuracy must be in (0, 1], got {c.stop_at_train_accuracy}")
    for name in ("batch_size", "max_steps", "save_every", "eval_every", "log_every", "gradient_accumulation_steps",
                 "frame_stride", "action_chunk_size"):
        if int(getattr(c, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}")
    unknown_tiny = sorted(set(c.tiny) - set(TINY_BACKBONE_SIZES))
    if unknown_tiny:
        raise ValueError(f"Unknown tiny backbone setting(s) {unknown_tiny}; valid: {sorted(TINY_BACKBONE_SIZES)}")
    if c.action_chunk_size > 1 and c.target != "action":
        raise ValueError(f"action_chunk_size={c.action_chunk_size} needs target='action' (finetuning on actions)")
    if c.target == "action" and c.streaming:
        pass  # the action statistics are fitted from the parquet columns, which streaming does not need to decode


def dataset_key(path: str) -> str:
    """The name a dataset's action statistics are stored under in the processor: the folder name or Hub repo id."""
    p = Path(path)
    return p.name if p.exists() else str(path)


# ------------------------------------------------------------------------------------------------------- model
def build_processor_and_model(c: VLATrainingConfig, num_latent_codes: int, latent_sequence_length: int):
    """(processor, model) from `init_from`, a tiny backbone built in code, or a pretrained image-text-to-text model."""
    from processing_lapa import LAPAImageProcessor, LAPAProcessor, build_tiny_tokenizer, image_layout_for

    prompt = {"prompt_template": c.prompt_template} if c.prompt_template else {}
    if c.init_from:
        model = LAPAForActionPrediction.from_pretrained(c.init_from, attn_implementation=c.attn_implementation)
        if model.processor is None:
            raise ValueError(f"{c.init_from} holds no processor (processor_config.json); save it with the model")
        if model.config.freeze_vision_encoder != c.freeze_vision_encoder:
            model.config.freeze_vision_encoder = c.freeze_vision_encoder
            model.vision_encoder.requires_grad_(not c.freeze_vision_encoder)
            model.apply_freezing()  # the parameters outside the forward pass stay frozen
        if model.config.num_action_bins != c.num_action_bins and c.target == "action":
            raise ValueError(f"{c.init_from} has {model.config.num_action_bins} action bins, the run asks for "
                             f"{c.num_action_bins}")
        if c.target == "action":
            # The chunk size is only the length of the action block: a latent-pretrained (or single-step) model
            # learns to predict k actions from here on, and its config and processor record the new k.
            model.config.action_chunk_size = model.processor.action_chunk_size = c.action_chunk_size
        return model.processor, model
    if c.backbone in TINY_BACKBONES:
        sizes = {**TINY_BACKBONE_SIZES, **c.tiny}
        backbone_config = tiny_backbone_config(TINY_BACKBONES[c.backbone], **sizes)
        processor = LAPAProcessor.from_components(
            build_tiny_tokenizer(), LAPAImageProcessor(size=sizes["image_size"]),
            num_latent_codes=num_latent_codes, latent_sequence_length=latent_sequence_length,
            num_action_bins=c.num_action_bins, num_image_tokens=count_image_tokens(backbone_config),
            action_chunk_size=c.action_chunk_size, **prompt,
        )
        config = LAPAConfig.from_processor(backbone_config, processor, freeze_vision_encoder=c.freeze_vision_encoder)
        config._attn_implementation = c.attn_implementation
        model = LAPAForActionPrediction(config)
        model.processor = processor
        return processor, model
    # A pretrained vision-language model (Hub id or folder).
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    backbone_config = AutoConfig.from_pretrained(c.backbone)
    tokenizer = AutoTokenizer.from_pretrained(c.backbone)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    size = backbone_config.vision_config.image_size
    try:  # the backbone's own normalisation
        reference = AutoImageProcessor.from_pretrained(c.backbone)
        mean, std = reference.image_mean, reference.image_std
    except (OSError, ValueError):
        mean = std = None
    image_processor = LAPAImageProcessor(size=size, **({"image_mean": mean, "image_std": std} if mean else {}))
    image_token = getattr(tokenizer, "image_token", None) or "<image>"
    # The image part of the prompt as the backbone's own processor builds it (Idefics3/SmolVLM: wrapped, one global
    # image, no tiles; see processing_lapa.processing_lapa).
    processor = LAPAProcessor.from_components(
        tokenizer, image_processor, num_latent_codes=num_latent_codes, latent_sequence_length=latent_sequence_length,
        num_action_bins=c.num_action_bins, num_image_tokens=count_image_tokens(backbone_config),
        image_token=image_token, action_chunk_size=c.action_chunk_size,
        image_layout=image_layout_for(backbone_config.model_type), **prompt,
    )
    model = LAPAForActionPrediction.from_backbone(c.backbone, processor, freeze_vision_encoder=c.freeze_vision_encoder,
                                                  attn_implementation=c.attn_implementation)
    return processor, model


def apply_lora(model: LAPAForActionPrediction, c: VLATrainingConfig):
    """Wrap with peft LoRA on the language model's linear layers; the new token rows (input embeddings and the
    output rows they use) train too and are saved with the adapter (peft's trainable tokens)."""
    from peft import LoraConfig, get_peft_model

    ids = model.new_token_ids
    lora_config = LoraConfig(
        r=c.lora_rank, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, target_modules=c.lora_target_modules,
        trainable_token_indices={"embed_tokens": ids, "lm_head": ids},
    )
    peft_model = get_peft_model(model, lora_config)
    model.apply_freezing()
    return peft_model


# -------------------------------------------------------------------------------------------------------- data
def split_dataset_episodes(source, c: VLATrainingConfig, index: int) -> tuple[list[int], list[int]]:
    train, held = split_episodes(source, c.holdout_episodes, c.seed + index)
    if c.train_episodes_per_task:
        by_task: dict[str, list[int]] = {}
        for e in train:
            by_task.setdefault(source.episode_task(e), []).append(e)
        train = sorted(e for eps in by_task.values() for e in eps[: int(c.train_episodes_per_task)])
    return train, held


class VLACollator:
    """Frames -> model inputs through the processor (runs in DataLoader workers)."""

    def __init__(self, processor, target: str, dataset: str | None):
        self.processor, self.target, self.dataset = processor, target, dataset

    def __call__(self, items: list[dict]) -> dict:
        batch = collate_vla_frames(items)
        images = np.asarray(batch["image"])  # (B, H, W, 3) uint8, channels-last as numpy
        if self.target == "latent":
            inputs = self.processor(images=images, text=batch["instruction"], latent_codes=np.asarray(batch["latent_codes"]))
        else:
            inputs = self.processor(images=images, text=batch["instruction"], actions=np.asarray(batch["action"]),
                                    dataset=self.dataset)
        return dict(inputs)


# ------------------------------------------------------------------------------------------------------ training
def _lr_lambda(c: VLATrainingConfig):
    def factor(step: int) -> float:
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.lr_schedule == "constant":
            return 1.0
        progress = (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


@dataclass
class VLAFrames:
    """The run's dataset split into training and held-out episodes, as frames (decoded at `image_size` once the
    processor is known), and the training targets (latent codes or action bins) the majority baseline reads."""

    source: object
    name: str
    train_episodes: list
    heldout_episodes: list
    train: object
    heldout: object
    train_targets: np.ndarray | None = None


def load_frames(c: VLATrainingConfig) -> VLAFrames:
    from accelerate.utils import set_seed

    if len(c.dataset) != 1:
        raise ValueError("one --dataset per run for now (mix datasets by labelling them into one LeRobot dataset)")
    source = load_lerobot_dataset(c.dataset[0], skip_corrupt=c.skip_corrupt)
    train_eps, eval_eps = split_dataset_episodes(source, c, 0)
    kwargs = dict(target=c.target, camera_key=c.camera_key, frame_stride=c.frame_stride, skip_corrupt=c.skip_corrupt,
                  action_chunk_size=c.action_chunk_size if c.target == "action" else 1)
    set_seed(c.seed)
    return VLAFrames(source, dataset_key(c.dataset[0]), train_eps, eval_eps,
                     VLAFrameDataset(source, episodes=train_eps, episode_cache_size=len(train_eps), **kwargs),
                     VLAFrameDataset(source, episodes=eval_eps, episode_cache_size=len(eval_eps), **kwargs))


def build_for_frames(c: VLATrainingConfig, frames: VLAFrames):
    """(processor, model) sized for the data: the latent vocabulary from the labelled dataset (its parquet columns;
    no video decoded yet), the action bins fitted on the training split; the frames' image size set from the
    processor."""
    if c.target == "latent":
        frames.train_targets = frames.train.all_latent_codes()
        latent_sequence_length = frames.train_targets.shape[1]
        num_latent_codes = c.num_latent_codes or _labelled_codebook_size(frames.source) or 8
        if frames.train_targets.size and int(frames.train_targets.max()) >= num_latent_codes:
            raise ValueError(f"{frames.name} holds latent code {int(frames.train_targets.max())} but the run uses "
                             f"{num_latent_codes} codes")
    else:
        latent_sequence_length, num_latent_codes = 4, c.num_latent_codes or 8
    processor, model = build_processor_and_model(c, num_latent_codes, latent_sequence_length)
    if c.init_from and c.target == "latent" and model.config.latent_sequence_length != latent_sequence_length:
        raise ValueError(f"{c.init_from} predicts {model.config.latent_sequence_length} latent codes, the dataset has "
                         f"{latent_sequence_length}")
    # Frames are decoded at the processor's size (known only now); nothing has been decoded before this point.
    size = processor.image_processor.size
    frames.train.image_size = frames.heldout.image_size = (
        size if isinstance(size, int) else size.get("height", size.get("shortest_edge")))
    if c.target == "action":
        # Bin statistics fitted on the training split only (one row per served frame: the repeated actions at the
        # ends of chunks would weigh the last action more), stored in the processor under the dataset's name.
        actions = frames.train.all_actions()
        processor.fit_action_tokenizer(actions, dataset=frames.name, gripper_dims=c.gripper_dims or None)
        # The baseline's targets: the k x D tokens of every training frame's chunk (time-major, as in the prompt).
        chunks = frames.train.all_action_chunks()
        frames.train_targets = processor.action_tokenizer.encode(chunks, dataset=frames.name).reshape(len(chunks), -1)
    return processor, model


def make_dataloader(c: VLATrainingConfig, accelerator, frames: VLAFrames, processor):
    """(dataloader, sampler): map-style with an `EpochSampler`, or a stream sharded by rank (sampler None)."""
    collator = VLACollator(processor, c.target, frames.name)
    if c.streaming:
        stream = make_streaming_vla_frames(frames.train, seed=c.seed, rank=accelerator.process_index,
                                           world_size=accelerator.num_processes)
        return torch.utils.data.DataLoader(stream, batch_size=c.batch_size, num_workers=c.num_workers,
                                           collate_fn=collator, drop_last=True), None
    sampler = EpochSampler([len(frames.train)], None, c.seed)
    loader = accelerator.prepare(torch.utils.data.DataLoader(
        frames.train, batch_size=c.batch_size, sampler=sampler, num_workers=c.num_workers, collate_fn=collator,
        drop_last=True, persistent_workers=c.num_workers > 0, generator=torch.Generator().manual_seed(c.seed)))
    if len(loader) == 0:
        raise ValueError(f"{len(frames.train)} training frames are fewer than one batch of {c.batch_size}")
    return loader, sampler


class VLAStage(TrainingStage):
    """Block-softmax training of the VLA on latent codes or action bins: loss, token accuracy, learning rate and
    tokens/s in the log; held-out metrics against the majority baseline; the model (or LoRA adapter) with its
    processor, the evaluation history and training curves at the end."""

    def __init__(self, c: VLATrainingConfig, engine: TrainingEngine, model, optimizer, scheduler, trainable,
                 dataloader, sampler, frames: VLAFrames, processor):
        self.c, self.engine, self.frames, self.processor = c, engine, frames, processor
        self.name = c.stage
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.dataloader, self.sampler, self.trainable = dataloader, sampler, trainable
        self.trainable_only = c.lora
        self.core = engine.accelerator.unwrap_model(model)
        self.lapa = self.core.get_base_model() if c.lora else self.core
        self.evals: list = []
        self._reset_window()

    def _reset_window(self) -> None:
        self.window = {"loss": 0.0, "acc": 0.0, "n": 0, "t0": time.perf_counter(), "tokens": 0}

    def trainable_parameters(self):
        return self.trainable

    def forward(self, batch, next_step):
        batch = {k: torch.as_tensor(v).to(self.engine.accelerator.device) for k, v in batch.items()}
        self._batch_tokens = int(batch["attention_mask"].sum())
        return self.model(**batch)

    def observe(self, output, batch) -> None:
        w = self.window
        w["loss"] += output.loss.item()
        w["acc"] += output.target_accuracy.item()
        w["n"] += 1
        w["tokens"] += self._batch_tokens * self.engine.accelerator.num_processes

    def log_record(self) -> dict:
        w, elapsed = self.window, time.perf_counter() - self.window["t0"]
        record = {"loss": w["loss"] / w["n"], "token_accuracy": w["acc"] / w["n"],
                  "learning_rate": self.scheduler.get_last_lr()[0], "tokens_per_s": w["tokens"] / max(elapsed, 1e-9)}
        self._reset_window()
        return record

    def postfix(self, record: dict) -> dict:
        return {"loss": f"{record['loss']:.4f}", "acc": f"{record['token_accuracy']:.3f}"}

    def should_stop(self, record: dict) -> bool:
        target = self.c.stop_at_train_accuracy
        return target is not None and record.get("token_accuracy", 0.0) >= target

    def evaluate(self, step: int) -> dict | None:
        if not self.engine.is_main:
            return None
        f = self.frames
        c = self.c
        with torch.random.fork_rng(devices=[]):
            metrics = evaluate_vla(self.lapa, self.processor, f.heldout, VLACollator(self.processor, c.target, f.name),
                                   f.train_targets, target=c.target, dataset=f.name,
                                   device=self.engine.accelerator.device, max_frames=c.eval_max_frames,
                                   batch_size=c.eval_batch_size, seed=c.seed)
        metrics["step"] = step
        tqdm.write(json.dumps({"eval": metrics}))
        self.evals.append(metrics)
        return metrics

    def checkpoint_state(self) -> dict:
        return {"evals": self.evals}

    def restore(self, state: dict, rank_state: dict, step: int) -> None:
        self.evals = state.get("evals", [])

    def save_final(self, output_dir: Path, result) -> None:
        c = self.c
        if c.lora:
            save_dir = output_dir / "adapter"
            self.core.save_pretrained(str(save_dir))
            _point_adapter_at_base(save_dir, c.init_from or str((output_dir / "base").resolve()))
        else:
            save_dir = output_dir / "model"
            self.lapa.save_pretrained(str(save_dir))
        self.processor.save_pretrained(str(save_dir))
        (save_dir / "training_config.json").write_text(json.dumps(self.record, indent=2))
        training = {"steps": result.step, "stopped_early": result.stopped_early,
                    "final_train_token_accuracy": result.history[-1]["token_accuracy"] if result.history else None}
        (output_dir / "eval_metrics.json").write_text(json.dumps(
            {"final": result.last_eval, "history": self.evals, "training": training}, indent=2))
        plot_training_curves(result.history, self.evals, output_dir / "training_curves.png",
                             title=f"{c.stage} ({c.target} targets) on {self.frames.name}")
        logger.info("saved to %s", save_dir)


def train(c: VLATrainingConfig) -> dict:
    engine = TrainingEngine(c, name=f"lapa_{c.stage}")
    frames = load_frames(c)
    processor, model = build_for_frames(c, frames)
    base_dir = engine.output_dir / "base"
    if c.lora:
        if engine.is_main and not c.init_from and not (base_dir / "config.json").exists():
            # The adapter needs its base on disk: the tiny or resized backbone exists nowhere else.
            model.save_pretrained(str(base_dir))
            processor.save_pretrained(str(base_dir))
        model = apply_lora(model, c)
    if c.gradient_checkpointing:
        enable_activation_checkpointing(model)
    dataloader, sampler = make_dataloader(c, engine.accelerator, frames, processor)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=c.learning_rate, betas=tuple(c.adam_betas), weight_decay=c.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(c))
    model, optimizer = engine.accelerator.prepare(model, optimizer)
    stage = VLAStage(c, engine, model, optimizer, scheduler, trainable, dataloader, sampler, frames, processor)
    stage.record = {**dataclasses.asdict(c), "dataset_key": frames.name,
                    "split": {"train_episodes": frames.train_episodes, "heldout_episodes": frames.heldout_episodes},
                    "world_size": engine.accelerator.num_processes, "effective_batch_size": engine.effective_batch_size}
    if engine.is_main:
        logger.info("model %.2fM parameters (%.2fM trained); %d training frames (%d episodes), %d held-out frames; "
                    "target %s", sum(p.numel() for p in model.parameters()) / 1e6,
                    sum(p.numel() for p in trainable) / 1e6, len(frames.train), len(frames.train_episodes),
                    len(frames.heldout), c.target)
    tracker_config = {k: v for k, v in dataclasses.asdict(c).items() if isinstance(v, (int, float, str, bool))}
    result = engine.fit(stage, stage.record, tracker_config)
    return {"step": result.step, "eval": result.last_eval, "evals": stage.evals, "history": result.history,
            "output": str(engine.output_dir)}


def plot_training_curves(history: list[dict], evals: list[dict], path: Path, title: str = "") -> None:
    """Training loss and token accuracy, held-out token accuracy and the majority baseline, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    if history:
        steps = [h["step"] for h in history]
        left.plot(steps, [h["loss"] for h in history], label="train")
        right.plot(steps, [h["token_accuracy"] for h in history], label="train", alpha=0.6)
    if evals:
        steps = [e["step"] for e in evals]
        left.plot(steps, [e["loss"] for e in evals], "o-", label="held-out")
        right.plot(steps, [e["token_accuracy"] for e in evals], "o-", label="held-out")
        right.axhline(evals[-1]["majority_baseline_accuracy"], color="gray", linestyle="--", label="majority baseline")
    left.set(xlabel="step", ylabel="loss (block softmax)")
    right.set(xlabel="step", ylabel="token accuracy", ylim=(0, 1))
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _labelled_codebook_size(source) -> int | None:
    """The quantizer's codebook size recorded by the labelling stage in info.json, if any."""
    if LABELLING_INFO_KEY not in (getattr(source.meta, "info", None) or {}):
        return None  # not labelled by training/label_latents.py: the caller's default applies
    return LatentLabelLayout.read(source).codebook_size


def _point_adapter_at_base(adapter_dir: Path, base: str) -> None:
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config, indent=2))


def run(stage: str, argv: list[str] | None, description: str) -> int:
    try:
        config = resolve_config(stage, argv, description)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    train(config)
    return 0
