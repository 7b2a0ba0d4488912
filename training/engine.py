"""The one training loop every stage runs on (quantizer training, latent pretraining, action finetuning).

    engine = TrainingEngine(config, name="train_quantizer")     # Accelerator, output-folder guard, logging
    ...build the model, the data and the optimizer with engine.accelerator...
    result = engine.fit(MyStage(...), record=...)                # resume, epochs or a stream, accumulation,
                                                                 # logging, eval/save cadence, final save
The engine owns what every stage does the same way; a stage (a `TrainingStage` subclass) says what is its own:
how a batch becomes a loss (`forward`), what its log line holds (`observe`, `log_record`), its held-out evaluation
(`evaluate`), the state it adds to checkpoints (`checkpoint_state`, `rank_state`, `restore`) and its final save
(`save_final`). The order of operations is fixed (it is what makes a resumed run bitwise equal to an uninterrupted
one): forward, backward, clip, optimizer step and zero_grad under `accelerator.accumulate`; then, on a step that
synchronises gradients, the scheduler, the step counter, the log line, the evaluation (every `eval_every` steps
but the last) and the checkpoint (every `save_every` steps and the last).

`config` is the stage's settings dataclass; the engine reads these fields of it: output_dir, resume, max_steps,
save_every, eval_every, log_every, keep_checkpoints, max_grad_norm, gradient_accumulation_steps, mixed_precision,
report_to.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from training.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from training.eval.metrics import scalar_metrics
from training.settings import trackers

logger = logging.getLogger("training.engine")


class TrainingStage:
    """What a stage tells the engine. Subclasses set `model`, `optimizer`, `dataloader` and `sampler` (the
    `EpochSampler` of a map-style dataloader, None for a stream whose dataset has `set_epoch`), optionally
    `scheduler` (stepped once per optimizer step) and `trainable_only` (checkpoints hold the trained weights only:
    LoRA)."""

    name = "train"
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    dataloader: object
    sampler: object | None = None
    scheduler: object | None = None
    trainable_only: bool = False

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters whose gradient norm is clipped."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, batch, next_step: int | None):
        """The model's output for one micro-batch (with `.loss`). `next_step` is the step this micro-batch
        completes when it synchronises gradients, else None."""
        raise NotImplementedError

    def observe(self, output, batch) -> None:
        """Add one micro-batch to the running log window."""

    def log_record(self) -> dict:
        """The log line's values since the last one (then reset the window)."""
        return {}

    def postfix(self, record: dict) -> dict:
        """What the progress bar shows of a log line."""
        return {"loss": f"{record['loss']:.5f}"} if "loss" in record else {}

    def after_step(self, step: int, output) -> None:
        """After an optimizer step (e.g. report replaced codes)."""

    def should_stop(self, record: dict) -> bool:
        """Whether training ends at this log line, before `max_steps` (e.g. the training accuracy reached a target;
        every rank must answer alike: the engine stops when any rank says so)."""
        return False

    def evaluate(self, step: int) -> dict | None:
        """Held-out metrics (main process; None on the others). Must not move the training RNG streams."""
        return None

    def before_save(self, step: int) -> None:
        """Collective checks before a checkpoint (every rank calls it)."""

    def checkpoint_state(self) -> dict:
        """Stage state saved in trainer_state.json (JSON), beside the engine's."""
        return {}

    def rank_state(self) -> dict | None:
        """Per-rank tensors saved with each checkpoint (e.g. counters that ranks keep apart)."""
        return None

    def restore(self, state: dict, rank_state: dict, step: int) -> None:
        """Take back what `checkpoint_state` and `rank_state` saved."""

    def save_final(self, output_dir: Path, result: "FitResult") -> None:
        """Write the trained model and the final records (main process)."""


@dataclass
class FitResult:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: list = field(default_factory=list)
    last_eval: dict | None = None
    stopped_early: bool = False  # `should_stop` ended training before max_steps


def _allow_new_mixed_precision(mixed_precision: str) -> None:
    """Accelerate keeps one AcceleratorState per process and refuses another mixed precision later on, so a single
    process that chains stages (the paper experiment: fp32 VLA stages, then a bf16 quantizer) would crash. In a
    single, non-distributed process the state holds nothing else of ours, so it is cleared for the new setting."""
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()


class TrainingEngine:
    def __init__(self, config, name: str):
        from accelerate import Accelerator

        self.config, self.name = config, name
        self.output_dir = Path(config.output_dir)
        _allow_new_mixed_precision(config.mixed_precision)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps, log_with=trackers(config.report_to),
            project_dir=str(self.output_dir),
        )
        self.is_main = self.accelerator.is_main_process
        logging.basicConfig(level=logging.INFO if self.is_main else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s")
        if self.is_main:
            existing = latest_checkpoint(self.output_dir)
            if existing is not None and not config.resume:
                raise FileExistsError(
                    f"{self.output_dir} already holds checkpoints (latest {existing.name}); pass --resume to continue "
                    "it or choose another --output-dir."
                )
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()

    @property
    def effective_batch_size(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes * self.config.gradient_accumulation_steps

    # -- the loop ------------------------------------------------------------------------------------------------
    def fit(self, stage: TrainingStage, record: dict, tracker_config: dict) -> FitResult:
        """Train `stage` to `max_steps` (resuming from the latest checkpoint with `resume`), then evaluate and save.
        `record` is written to `<output_dir>/training_config.json`; `tracker_config` goes to the trackers."""
        c, accelerator = self.config, self.accelerator
        result = self._resume(stage) if c.resume else FitResult()
        if self.is_main:
            (self.output_dir / "training_config.json").write_text(json.dumps(record, indent=2))
            accelerator.init_trackers(self.name, config=tracker_config)
        stage.model.train()
        progress = tqdm(total=c.max_steps, initial=result.step, disable=not self.is_main, desc=stage.name,
                        dynamic_ncols=True)
        while result.step < c.max_steps:
            finished = self._run_epoch(stage, result, record, progress)
            if finished:
                break
            result.epoch += 1
            result.batch_in_epoch = 0
        progress.close()
        self._evaluate(stage, result)
        if self.is_main:
            stage.save_final(self.output_dir, result)
        accelerator.end_training()
        return result

    def _epoch_batches(self, stage: TrainingStage, result: FitResult):
        if stage.sampler is not None:
            loader = stage.dataloader
            if result.batch_in_epoch:
                loader = self.accelerator.skip_first_batches(loader, result.batch_in_epoch)
            # Accelerate's DataLoaderShard sets its sampler's epoch to its own count of passes at every __iter__, and
            # a loader made by skip_first_batches counts from 0: tell the loader the epoch, or a resumed run replays
            # epoch 0's order in every later epoch.
            (loader.set_epoch if hasattr(loader, "set_epoch") else stage.sampler.set_epoch)(result.epoch)
            return loader
        stage.dataloader.dataset.set_epoch(result.epoch)
        batches = iter(stage.dataloader)
        for _ in range(result.batch_in_epoch):  # replay the stream to the saved position (deterministic)
            next(batches)
        return batches

    def _run_epoch(self, stage: TrainingStage, result: FitResult, record: dict, progress) -> bool:
        """One pass over the data; True when `max_steps` is reached."""
        c, accelerator = self.config, self.accelerator
        for batch in self._epoch_batches(stage, result):
            with accelerator.accumulate(stage.model):
                output = stage.forward(batch, result.step + 1 if accelerator.sync_gradients else None)
                accelerator.backward(output.loss)
                if accelerator.sync_gradients and c.max_grad_norm:
                    accelerator.clip_grad_norm_(stage.trainable_parameters(), c.max_grad_norm)
                stage.optimizer.step()
                stage.optimizer.zero_grad(set_to_none=True)
            result.batch_in_epoch += 1
            stage.observe(output, batch)
            if not accelerator.sync_gradients:
                continue
            if stage.scheduler is not None:
                stage.scheduler.step()
            result.step += 1
            progress.update(1)
            stage.after_step(result.step, output)
            step, stop = result.step, False
            if step % c.log_every == 0 or step == c.max_steps:
                stop = self._any_rank(stage.should_stop(self._log(stage, result, progress))) and step < c.max_steps
            if step % c.eval_every == 0 and step < c.max_steps and not stop:
                self._evaluate(stage, result)
            if step % c.save_every == 0 or step == c.max_steps or stop:
                stage.before_save(step)
                state = {"epoch": result.epoch, "batch_in_epoch": result.batch_in_epoch, "history": result.history,
                         **stage.checkpoint_state(), "config": record}
                save_checkpoint(accelerator, self.output_dir, step, model=stage.model, optimizer=stage.optimizer,
                                trainer_state=state, rank_extra=stage.rank_state(), keep=c.keep_checkpoints,
                                trainable_only=stage.trainable_only)
            if stop:
                result.stopped_early = True
                if self.is_main:
                    tqdm.write(json.dumps({"step": step, "stopped_early": True}))
            if step >= c.max_steps or stop:
                return True
        return False

    def _any_rank(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return bool(flag)
        votes = self.accelerator.reduce(torch.tensor([float(flag)], device=self.accelerator.device), "max")
        return bool(votes.item() > 0)

    def _log(self, stage: TrainingStage, result: FitResult, progress) -> dict:
        entry = {"step": result.step, **stage.log_record(), "epoch": result.epoch}
        result.history.append(entry)
        self.accelerator.log({f"train/{k}": v for k, v in entry.items() if k != "step"}, step=result.step)
        progress.set_postfix(**stage.postfix(entry))
        if self.is_main:
            tqdm.write(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in entry.items()}))
        return entry

    def _evaluate(self, stage: TrainingStage, result: FitResult) -> None:
        metrics = stage.evaluate(result.step)
        if metrics is not None:
            result.last_eval = metrics
            self.accelerator.log(scalar_metrics(metrics, "eval"), step=result.step)
        self.accelerator.wait_for_everyone()

    def _resume(self, stage: TrainingStage) -> FitResult:
        folder = latest_checkpoint(self.output_dir)
        if folder is None:
            logger.info("--resume: no checkpoint in %s yet, starting from scratch", self.output_dir)
            return FitResult()
        state, rank_state = load_checkpoint(self.accelerator, folder, model=stage.model, optimizer=stage.optimizer)
        result = FitResult(step=state["step"], epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"],
                           history=state.get("history", []))
        if stage.scheduler is not None:
            with warnings.catch_warnings():  # fast-forward the schedule (no optimizer step happens here)
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(result.step):
                    stage.scheduler.step()
        stage.restore(state, rank_state, result.step)
        if self.is_main:
            logger.info("resumed from %s (step %d, epoch %d, batch %d)", folder, result.step, result.epoch,
                        result.batch_in_epoch)
        return result


__all__ = ["FitResult", "TrainingEngine", "TrainingStage"]
