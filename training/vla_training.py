"""The training engine shared by `training/pretrain.py` (latent pretraining) and `training/finetune.py` (action
finetuning): one loop, two sets of defaults.

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
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_lapa import LAPAConfig, LAPAForActionPrediction, count_image_tokens, tiny_backbone_config  # noqa: E402
from modeling_lapa.transformers_compat import enable_activation_checkpointing  # noqa: E402
from training.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from training.settings import (  # noqa: E402
    add_config_arguments, coerce_settings, preset_and_file_settings, settings_from_args, trackers,
)

logger = logging.getLogger("vla_training")

TINY_BACKBONES = {"tiny-llava": "llava", "tiny-idefics3": "idefics3"}
# Linear layers of the language model that LoRA adapts (LLaMA/Mistral/Qwen-style names); the vision tower stays
# untouched (frozen, as in the paper).
DEFAULT_LORA_TARGETS = r".*\.(language_model|text_model)\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class VLATrainingConfig:
    """Every setting of a latent-pretraining or action-finetuning run."""

    # what to train
    target: str = "latent"  # "latent" (latent pretraining) or "action" (ground-truth actions: finetuning, ACTIONVLA)
    backbone: str = "tiny-llava"  # tiny-llava | tiny-idefics3 | a Hub id or folder of an image-text-to-text model
    init_from: str | None = None  # a LAPA model folder (e.g. the latent-pretrained model to finetune)
    tiny: dict = field(default_factory=dict)  # tiny backbone sizes: image_size, patch_size, hidden_size, num_layers
    freeze_vision_encoder: bool = True
    attn_implementation: str = "sdpa"
    # processor
    num_latent_codes: int | None = None  # default: from the labelled dataset's quantizer record, else 8
    num_action_bins: int = 256
    gripper_dims: list = field(default_factory=list)  # binary gripper action dimensions
    prompt_template: str | None = None  # default: "What action should the robot take to {instruction}?"
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


TINY_BACKBONE_SIZES = dict(image_size=64, patch_size=8, hidden_size=128, num_layers=4)

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
    parser = argparse.ArgumentParser(prog=f"training/{stage}.py", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--preset", choices=sorted(STAGE_PRESETS[stage]), default=None,
                        help="settings preset (default: tiny, or the YAML file's `preset`)")
    parser.add_argument("--config", default=None, help="YAML file of settings")
    add_config_arguments(
        parser, VLATrainingConfig,
        repeatable={"dataset": "LeRobot dataset folder or Hub id (repeatable)"},
        key_values={"tiny": "tiny backbone size, e.g. --tiny hidden_size=256 (repeatable)"},
    )
    return parser


def resolve_config(stage: str, argv: list[str] | None = None, description: str | None = None) -> VLATrainingConfig:
    """defaults <- preset <- YAML file <- command line (unknown keys are errors)."""
    args = build_parser(stage, description).parse_args(argv)
    preset, settings = preset_and_file_settings(args.config, args.preset, STAGE_PRESETS[stage], FIELD_NAMES,
                                                nested="tiny")
    settings = settings_from_args(args, settings, VLATrainingConfig, key_values=("tiny",))
    config = VLATrainingConfig(**coerce_settings(settings, VLATrainingConfig))
    validate_config(config)
    config.preset = preset
    config.stage = stage
    return config


def validate_config(c: VLATrainingConfig) -> None:
    if not c.dataset:
        raise ValueError("No data: give at least one --dataset (a LeRobot folder or Hub id).")
    if c.target not in ("latent", "action"):
        raise ValueError(f"target must be 'latent' or 'action', got {c.target!r}")
    if c.mixed_precision not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {c.mixed_precision!r}")
    if c.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {c.lr_schedule!r}")
    for name in ("batch_size", "max_steps", "save_every", "eval_every", "log_every", "gradient_accumulation_steps",
                 "frame_stride"):
        if int(getattr(c, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}")
    unknown_tiny = sorted(set(c.tiny) - set(TINY_BACKBONE_SIZES))
    if unknown_tiny:
        raise ValueError(f"Unknown tiny backbone setting(s) {unknown_tiny}; valid: {sorted(TINY_BACKBONE_SIZES)}")
    if c.target == "action" and c.streaming:
        pass  # the action statistics are fitted from the parquet columns, which streaming does not need to decode


def dataset_key(path: str) -> str:
    """The name a dataset's action statistics are stored under in the processor: the folder name or Hub repo id."""
    p = Path(path)
    return p.name if p.exists() else str(path)


# ------------------------------------------------------------------------------------------------------- model
def build_processor_and_model(c: VLATrainingConfig, num_latent_codes: int, latent_sequence_length: int):
    """(processor, model) from `init_from`, a tiny backbone built in code, or a pretrained image-text-to-text model."""
    from processing_lapa import LAPAImageProcessor, LAPAProcessor, build_tiny_tokenizer

    prompt = {"prompt_template": c.prompt_template} if c.prompt_template else {}
    if c.init_from:
        model = LAPAForActionPrediction.from_pretrained(c.init_from, attn_implementation=c.attn_implementation)
        if model.processor is None:
            raise ValueError(f"{c.init_from} holds no processor (processor_config.json); save it with the model")
        if model.config.freeze_vision_encoder != c.freeze_vision_encoder:
            model.config.freeze_vision_encoder = c.freeze_vision_encoder
            model.vision_encoder.requires_grad_(not c.freeze_vision_encoder)
        if model.config.num_action_bins != c.num_action_bins and c.target == "action":
            raise ValueError(f"{c.init_from} has {model.config.num_action_bins} action bins, the run asks for "
                             f"{c.num_action_bins}")
        return model.processor, model
    if c.backbone in TINY_BACKBONES:
        sizes = {**TINY_BACKBONE_SIZES, **c.tiny}
        backbone_config = tiny_backbone_config(TINY_BACKBONES[c.backbone], **sizes)
        processor = LAPAProcessor.from_components(
            build_tiny_tokenizer(), LAPAImageProcessor(size=sizes["image_size"]),
            num_latent_codes=num_latent_codes, latent_sequence_length=latent_sequence_length,
            num_action_bins=c.num_action_bins, num_image_tokens=count_image_tokens(backbone_config), **prompt,
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
    processor = LAPAProcessor.from_components(
        tokenizer, image_processor, num_latent_codes=num_latent_codes, latent_sequence_length=latent_sequence_length,
        num_action_bins=c.num_action_bins, num_image_tokens=count_image_tokens(backbone_config),
        image_token=image_token, **prompt,
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
    from training.data import split_episodes

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
        from training.data import collate_vla_frames

        batch = collate_vla_frames(items)
        images = np.asarray(batch["image"])  # (B, H, W, 3) uint8, channels-last as numpy
        if self.target == "latent":
            inputs = self.processor(images=images, text=batch["instruction"], latent_codes=np.asarray(batch["latent_codes"]))
        else:
            inputs = self.processor(images=images, text=batch["instruction"], actions=np.asarray(batch["action"]),
                                    dataset=self.dataset)
        return dict(inputs)


def majority_accuracy(train_targets: np.ndarray, eval_targets: np.ndarray, per_position: bool = False):
    """Accuracy of predicting, at every target position, the most frequent training token of that position (per
    position with `per_position`)."""
    majority = np.array([np.bincount(column).argmax() for column in train_targets.T])
    hits = eval_targets == majority[None, :]
    return hits.mean(axis=0).round(4).tolist() if per_position else float(hits.mean())


@torch.no_grad()
def evaluate(model, processor, frames, c: VLATrainingConfig, dataset: str | None, train_targets: np.ndarray,
             device) -> dict:
    """Held-out loss and teacher-forced token accuracy (each target a softmax over its own block), per position,
    against the majority baseline; for actions also the L1 error of the greedy decoded actions."""
    model.eval()
    count = min(len(frames), c.eval_max_frames)
    order = np.random.default_rng(c.seed).permutation(len(frames))[:count]
    collator = VLACollator(processor, c.target, dataset)
    losses, correct, tokens, per_position, eval_targets, l1, true_actions = [], 0, 0, None, [], [], []
    for start in range(0, count, c.eval_batch_size):
        items = [frames[int(i)] for i in order[start:start + c.eval_batch_size]]
        inputs = {k: torch.as_tensor(v).to(device) for k, v in collator(items).items()}
        out = model(**inputs)
        losses.append(float(out.loss) * int(out.num_target_tokens))
        tokens += int(out.num_target_tokens)
        correct += round(float(out.target_accuracy) * int(out.num_target_tokens))
        k = (inputs["labels"] != -100).sum(dim=1)[0].item()
        logits = out.logits[:, -k - 1:-1]
        target_ids = inputs["labels"][:, -k:]
        offset, size = ((model.config.latent_token_offset, model.config.num_latent_codes) if c.target == "latent"
                        else (model.config.action_token_offset, model.config.num_action_bins))
        predicted = logits[..., offset:offset + size].argmax(-1)
        hits = (predicted == (target_ids - offset)).float().sum(0).cpu().numpy()
        per_position = hits if per_position is None else per_position + hits
        eval_targets.append((target_ids - offset).cpu().numpy())
        if c.target == "action":
            predicted_actions = processor.decode_actions((predicted + offset).cpu().numpy(), dataset=dataset)
            true_actions.append(np.stack([np.asarray(item["action"]) for item in items]))
            l1.append(np.abs(predicted_actions - true_actions[-1]).mean(axis=1))
    model.train()
    eval_targets = np.concatenate(eval_targets)
    metrics = {
        "eval_frames": int(count),
        "loss": sum(losses) / max(tokens, 1),
        "token_accuracy": correct / max(tokens, 1),
        "token_accuracy_per_position": (per_position / count).round(4).tolist(),
        "majority_baseline_accuracy": majority_accuracy(train_targets, eval_targets),
        "majority_baseline_accuracy_per_position": majority_accuracy(train_targets, eval_targets, per_position=True),
    }
    if c.target == "action":
        majority = np.array([np.bincount(column).argmax() for column in train_targets.T])
        majority_actions = processor.decode_actions((majority + model.config.action_token_offset)[None], dataset=dataset)
        metrics["action_l1_teacher_forced"] = float(np.concatenate(l1).mean())
        metrics["majority_baseline_action_l1"] = float(np.abs(np.concatenate(true_actions) - majority_actions).mean())
    return metrics


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


def train(c: VLATrainingConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from training.data import VLAFrameDataset, load_lerobot_dataset, make_streaming_vla_frames

    output_dir = Path(c.output_dir)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=c.mixed_precision,
                              gradient_accumulation_steps=c.gradient_accumulation_steps, log_with=trackers(c.report_to),
                              project_dir=str(output_dir))
    main = accelerator.is_main_process
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if main:
        existing = latest_checkpoint(output_dir)
        if existing is not None and not c.resume:
            raise FileExistsError(f"{output_dir} already holds checkpoints (latest {existing.name}); pass --resume to "
                                  "continue it or choose another --output-dir.")
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    # Data: per dataset, training and held-out episodes.
    if len(c.dataset) != 1:
        raise ValueError("one --dataset per run for now (mix datasets by labelling them into one LeRobot dataset)")
    source = load_lerobot_dataset(c.dataset[0], skip_corrupt=c.skip_corrupt)
    name = dataset_key(c.dataset[0])
    train_eps, eval_eps = split_dataset_episodes(source, c, 0)
    frame_kwargs = dict(target=c.target, camera_key=c.camera_key, frame_stride=c.frame_stride,
                        skip_corrupt=c.skip_corrupt)
    set_seed(c.seed)
    train_frames = VLAFrameDataset(source, episodes=train_eps, episode_cache_size=len(train_eps), **frame_kwargs)
    eval_frames = VLAFrameDataset(source, episodes=eval_eps, episode_cache_size=len(eval_eps), **frame_kwargs)
    # Sizes of the latent vocabulary: from the labelled dataset (its parquet columns; no video decoded yet).
    if c.target == "latent":
        train_targets = train_frames.all_latent_codes()
        latent_sequence_length = train_targets.shape[1]
        num_latent_codes = c.num_latent_codes or _labelled_codebook_size(source) or 8
        if train_targets.size and int(train_targets.max()) >= num_latent_codes:
            raise ValueError(f"{name} holds latent code {int(train_targets.max())} but the run uses {num_latent_codes} "
                             "codes")
    else:
        latent_sequence_length, num_latent_codes = 4, c.num_latent_codes or 8
    processor, model = build_processor_and_model(c, num_latent_codes, latent_sequence_length)
    if c.init_from and c.target == "latent" and model.config.latent_sequence_length != latent_sequence_length:
        raise ValueError(f"{c.init_from} predicts {model.config.latent_sequence_length} latent codes, the dataset has "
                         f"{latent_sequence_length}")
    # Frames are decoded at the processor's size (known only now); nothing has been decoded before this point.
    image_size = processor.image_processor.size
    image_size = image_size if isinstance(image_size, int) else image_size.get("height", image_size.get("shortest_edge"))
    train_frames.image_size = eval_frames.image_size = image_size
    if c.target == "action":
        # Bin statistics fitted on the training split only, stored in the processor under the dataset's name.
        actions = train_frames.all_actions()
        processor.fit_action_tokenizer(actions, dataset=name, gripper_dims=c.gripper_dims or None)
        train_targets = processor.action_tokenizer.encode(actions, dataset=name)

    base_dir = output_dir / "base"
    if c.lora:
        if main and not c.init_from and not (base_dir / "config.json").exists():
            # The adapter needs its base on disk: the tiny or resized backbone exists nowhere else.
            model.save_pretrained(str(base_dir))
            processor.save_pretrained(str(base_dir))
        model = apply_lora(model, c)
    if c.gradient_checkpointing:
        enable_activation_checkpointing(model)

    collator = VLACollator(processor, c.target, name)
    if c.streaming:
        stream = make_streaming_vla_frames(train_frames, seed=c.seed, rank=accelerator.process_index,
                                           world_size=accelerator.num_processes)
        dataloader = torch.utils.data.DataLoader(stream, batch_size=c.batch_size, num_workers=c.num_workers,
                                                 collate_fn=collator, drop_last=True)
        sampler = None
    else:
        from training.data import EpochSampler

        sampler = EpochSampler([len(train_frames)], None, c.seed)
        loader = torch.utils.data.DataLoader(train_frames, batch_size=c.batch_size, sampler=sampler,
                                             num_workers=c.num_workers, collate_fn=collator, drop_last=True,
                                             persistent_workers=c.num_workers > 0,
                                             generator=torch.Generator().manual_seed(c.seed))
        dataloader = accelerator.prepare(loader)
        if len(dataloader) == 0:
            raise ValueError(f"{len(train_frames)} training frames are fewer than one batch of {c.batch_size}")

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=c.learning_rate, betas=tuple(c.adam_betas), weight_decay=c.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(c))
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    lapa = core.get_base_model() if c.lora else core

    step, epoch, batch_in_epoch, history, evals = 0, 0, 0, [], []
    if c.resume:
        folder = latest_checkpoint(output_dir)
        if folder is None:
            logger.info("--resume: no checkpoint in %s yet, starting from scratch", output_dir)
        else:
            state, _ = load_checkpoint(accelerator, folder, model=model, optimizer=optimizer)
            step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            history, evals = state.get("history", []), state.get("evals", [])
            with warnings.catch_warnings():  # fast-forward the schedule (no optimizer step happens here)
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(step):
                    scheduler.step()
            if main:
                logger.info("resumed from %s (step %d)", folder, step)

    record = {**dataclasses.asdict(c), "preset": getattr(c, "preset", None), "stage": getattr(c, "stage", None),
              "dataset_key": name, "split": {"train_episodes": train_eps, "heldout_episodes": eval_eps},
              "world_size": accelerator.num_processes,
              "effective_batch_size": c.batch_size * accelerator.num_processes * c.gradient_accumulation_steps}
    if main:
        (output_dir / "training_config.json").write_text(json.dumps(record, indent=2))
        accelerator.init_trackers(f"lapa_{getattr(c, 'stage', 'vla')}", config={
            k: v for k, v in dataclasses.asdict(c).items() if isinstance(v, (int, float, str, bool))})
        n_all = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("model %.2fM parameters (%.2fM trained); %d training frames (%d episodes), %d held-out frames; "
                    "target %s", n_all / 1e6, n_train / 1e6, len(train_frames), len(train_eps), len(eval_frames),
                    c.target)

    def run_eval():
        if not main:
            return None
        with torch.random.fork_rng(devices=[]):
            metrics = evaluate(lapa, processor, eval_frames, c, name, train_targets, accelerator.device)
        metrics["step"] = step
        tqdm.write(json.dumps({"eval": metrics}))
        return metrics

    def trainer_state():
        return {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "history": history, "evals": evals,
                "config": record}

    model.train()
    progress = tqdm(total=c.max_steps, initial=step, disable=not main, desc=f"{getattr(c, 'stage', 'train')}",
                    dynamic_ncols=True)
    window = {"loss": 0.0, "acc": 0.0, "n": 0, "t0": time.perf_counter(), "tokens": 0}
    while step < c.max_steps:
        if sampler is not None:
            sampler.set_epoch(epoch)
            batches = accelerator.skip_first_batches(dataloader, batch_in_epoch) if batch_in_epoch else dataloader
        else:
            dataloader.dataset.set_epoch(epoch)
            batches = iter(dataloader)
            for _ in range(batch_in_epoch):
                next(batches)
        for batch in batches:
            batch = {k: torch.as_tensor(v).to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(model):
                out = model(**batch)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and c.max_grad_norm:
                    accelerator.clip_grad_norm_(trainable, c.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batch_in_epoch += 1
            window["loss"] += out.loss.item()
            window["acc"] += out.target_accuracy.item()
            window["n"] += 1
            window["tokens"] += int(batch["attention_mask"].sum()) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            progress.update(1)
            if step % c.log_every == 0 or step == c.max_steps:
                elapsed = time.perf_counter() - window["t0"]
                entry = {"step": step, "loss": window["loss"] / window["n"], "token_accuracy": window["acc"] / window["n"],
                         "learning_rate": scheduler.get_last_lr()[0], "tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
                         "epoch": epoch}
                history.append(entry)
                accelerator.log({f"train/{k}": v for k, v in entry.items() if k != "step"}, step=step)
                progress.set_postfix(loss=f"{entry['loss']:.4f}", acc=f"{entry['token_accuracy']:.3f}")
                window = {"loss": 0.0, "acc": 0.0, "n": 0, "t0": time.perf_counter(), "tokens": 0}
            if step % c.eval_every == 0 and step < c.max_steps:
                metrics = run_eval()
                if metrics is not None:
                    evals.append(metrics)
                    accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
                accelerator.wait_for_everyone()
            if step % c.save_every == 0 or step == c.max_steps:
                save_checkpoint(accelerator, output_dir, step, model=model, optimizer=optimizer,
                                trainer_state=trainer_state(), keep=c.keep_checkpoints, trainable_only=c.lora)
            if step >= c.max_steps:
                break
        else:
            epoch += 1
            batch_in_epoch = 0
            continue
        break
    progress.close()

    final = run_eval()
    if final is not None:
        evals.append(final)
    accelerator.wait_for_everyone()
    if main:
        if c.lora:
            save_dir = output_dir / "adapter"
            core.save_pretrained(str(save_dir))
            _point_adapter_at_base(save_dir, c.init_from or str(base_dir.resolve()))
        else:
            save_dir = output_dir / "model"
            lapa.save_pretrained(str(save_dir))
        processor.save_pretrained(str(save_dir))
        (save_dir / "training_config.json").write_text(json.dumps(record, indent=2))
        (output_dir / "eval_metrics.json").write_text(json.dumps({"final": final, "history": evals}, indent=2))
        plot_training_curves(history, evals, output_dir / "training_curves.png", title=f"{getattr(c, 'stage', '')} "
                             f"({c.target} targets) on {name}")
        logger.info("saved to %s", save_dir)
    accelerator.end_training()
    return {"step": step, "eval": final, "evals": evals, "history": history, "output": str(output_dir)}


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
    from training.data import LABELLING_INFO_KEY, LatentLabelLayout

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
