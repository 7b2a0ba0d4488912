"""Held-out evaluation of the latent action quantizer: reconstruction, codebook health, action probes, plots.

    from training.eval import evaluate_quantizer

    metrics = evaluate_quantizer(model, held_out_pairs, probe_train_pairs=train_pairs, max_pairs=1000,
                                 output_dir="outputs/quantizer/eval", step=step)
    metrics["summary"]   # psnr_above_copy, min_code_fraction, all_codes_used_2pct, latent_probe_beats_leakage

The reference logs only its training loss and the number of codes used, which cannot tell a collapsed codebook
from a healthy one, nor a world model from a frame copier. The evaluation measures, on frame pairs of episodes kept
out of training:

1. **Next-frame prediction.** The decoder's prediction of frame t+H (eval mode, hard codes) against the true
   frame t+H, beside the copy-frame-t baseline (predicting "nothing moves"). MSE and PSNR (peak 1.0).
2. **Codebook usage.** The fraction of pairs that pick each code in each of the s token slots, perplexity (exp of
   the entropy) per slot and pooled, and how many distinct latent actions (tuples of s codes) occur.
3. **Action probes** (when the data has ground-truth actions). Does the latent action carry the real action?
   Ridge-regression and one-hidden-layer MLP probes map each feature set to every action dimension; R^2 is
   measured on held-out pairs. Feature sets: the pre-quantisation latents, the one-hot codes, and a *leakage
   baseline* computed from frame t alone. Scripted robot actions depend on the scene (where the arm is, where the
   object is), so some of the action is predictable without seeing any motion; a latent action is only informative
   if its probe beats that baseline.
4. **Plots** (PNG): codebook usage, latent vs ground-truth action scatter (the paper's Figure 13), reconstructions,
   and a latent explorer grid (one frame decoded under every code of each slot: the paper's Figures 5 and 12).

This module is the entry point; it composes the package's pieces: `encoding` (the one pass of the model over the
pairs), `metrics` (1 and 2), `actions` (the probe targets), `probes` (3) and `plots` (4).

Decisions, in one place:

- **Predictions are clamped to [0, 1]** before MSE and PSNR (the target lies in [0, 1], so clamping only removes
  error a viewer never sees). `prediction_mse_unclamped` is the training loss's definition, for comparison.
- **Two PSNRs.** `*_psnr_of_mean_mse` = 10 log10(1 / mean MSE over pairs): ranks models exactly like the MSE; the
  pass/fail field `psnr_above_copy` uses it. `*_psnr_mean_per_pair` = mean over pairs of 10 log10(1 / MSE_i), the
  number image papers usually quote; a per-pair MSE is floored at 1e-10 (PSNR at most 100 dB), because a pair whose
  frames are identical (a still scene, or the clamped last pair of an episode) would give the copy baseline an
  infinite PSNR.
- **Probe target.** `"window_mean"`: the mean of a_t .. a_{t'-1}, with t' the pair's second frame (t + gap, clamped
  to the episode's last frame): the actions whose effect the two frames show. For the clamped last pair (t' = t) it
  is a_t. `"current"`: a_t. Actions come from the source's parquet columns (`source.episode_actions`), not video.
- **Leakage features** are the RGB pixels of frame t average-pooled to 8 x 8 (192 numbers): independent of the
  model (the encoder's tokens of frame t already mixed in frame t+H through temporal attention, so they would leak
  the motion) and blind to frame t+H by construction, while keeping where the arm and objects are.
- **Probe fitting.** Features are standardised with the fitting set's statistics and clipped to +-5 standard
  deviations (a feature nearly constant in the fitting pairs must not explode on test pairs). The linear probe is
  ridge regression in closed form; its penalty lambda = alpha * n, alpha in {1e-4, 1e-3, ..., 1e2}, is picked per
  action dimension on a validation split (20% of the fitting episodes), then refit on the whole fitting set. The
  MLP probe (one hidden layer of 128 ReLUs, targets standardised) trains with Adam (lr 3e-3, minibatches of 256)
  for at most 400 steps on the other 80% and keeps the weights of the step with the lowest validation loss
  (checked every 25 steps). Seeded by `seed`; the global torch RNG is left as it was. R^2 = 1 - SSE/SST per action
  dimension on the test pairs (SST about the test mean; `null` when the test targets are constant).
- **"Beats leakage"** for an action dimension: the best R^2 of the latent probes (latents or one-hot codes, linear
  or MLP) is above the best R^2 of the leakage probes (linear or MLP), and above 0. Position dimensions: the first
  three action dimensions, minus any whose name mentions a gripper (Meta-World: delta_x, delta_y, delta_z), unless
  `position_dims` is given.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .actions import ACTION_TARGETS, action_targets
from .encoding import EncodedPairs, choose_rows, encode_pairs
from .metrics import MIN_CODE_FRACTION, codebook_metrics, reconstruction_metrics
from .plots import write_plots
from .probes import probe_section

logger = logging.getLogger(__name__)


def evaluate_quantizer(
    model,
    eval_pairs,
    *,
    probe_train_pairs=None,
    output_dir: str | Path | None = None,
    step: int | None = None,
    batch_size: int = 64,
    max_pairs: int | None = None,
    action_target: str = "window_mean",
    make_plots: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    position_dims: Sequence[int] | None = None,
) -> dict:
    """Evaluates a latent action quantizer on held-out frame pairs; see the module docstring for the definitions.

    Args:
        model: an unwrapped `LAPAQuantizerModel` (not DDP/FSDP-wrapped: `accelerator.unwrap_model(model)`). It is
            put in eval mode for the evaluation (hard codes, no codebook counting) and put back in its mode after.
        eval_pairs: held-out frame pairs: a `FramePairDataset` (or a `Subset` of one, or any map-style dataset with
            its items: `pixel_values` (2, 3, S, S) float in [0, 1] or uint8, `episode_index`, `frame_index`,
            `target_frame_index`, and `action` when the source has actions), from episodes kept out of training.
        probe_train_pairs: pairs of *training* episodes to fit the probes on (the probes are tested on the held-out
            pairs); None: the held-out pairs are split 70/30 by episode (seeded) into fitting and test pairs.
        output_dir: where to write `metrics.json` and the PNG plots (created); None writes nothing.
        step: the training step, stored in the metrics and the plot titles.
        batch_size: pairs per forward pass.
        max_pairs: evaluate a seeded random subset of at most this many pairs, of `eval_pairs` and, separately, of
            `probe_train_pairs` (None: all of them).
        action_target: probe target, "window_mean" (mean action over the frames the pair spans) or "current" (a_t).
        make_plots: write the plots (needs `output_dir`).
        num_workers: DataLoader workers for reading the pairs.
        seed: seeds the subsets, the probe splits, the MLP probes and the choice of displayed pairs.
        position_dims: action dimensions that `latent_probe_beats_leakage` covers (default: see
            `default_position_dims`).
    Returns:
        A JSON-ready dict: `step`, `num_pairs`, `num_episodes`, `reconstruction`, `codebook`, `probes`, `summary`
        (psnr_above_copy, psnr_gain_db, min_code_fraction, all_codes_used_2pct, latent_probe_beats_leakage per
        position dimension, latent_probes_beat_leakage_on_all_position_dims), `plots` (name -> PNG path) and
        `eval_seconds`; the same dict is written to `output_dir/metrics.json`.
    """
    started = time.perf_counter()
    config = _check_arguments(model, eval_pairs, action_target)
    if make_plots and output_dir is None:
        logger.info("evaluate_quantizer: make_plots=True but no output_dir; no plots are written")
    output_dir = Path(output_dir) if output_dir is not None else None

    was_training = model.training
    model.eval()
    try:
        encoded, probe_encoded = _encode(model, eval_pairs, probe_train_pairs, batch_size=batch_size,
                                         max_pairs=max_pairs, num_workers=num_workers, seed=seed)
        reconstruction = reconstruction_metrics(encoded)
        codebook = codebook_metrics(encoded.codes, config.codebook_size)
        probes = probe_section(model, eval_pairs, encoded, probe_train_pairs, probe_encoded, action_target,
                               position_dims, seed)
        plots: dict[str, str] = {}
        if make_plots and output_dir is not None:
            targets = action_targets(eval_pairs, encoded, action_target)
            plots = write_plots(model, eval_pairs, encoded, codebook, targets, probes, output_dir, step, seed)
    finally:
        model.train(was_training)

    result = {
        "step": step,
        "num_pairs": int(len(encoded)),
        "num_episodes": int(len(np.unique(encoded.episode_index))),
        "num_probe_train_pairs": int(len(probe_encoded)) if probe_encoded is not None else 0,
        "image_size": int(config.image_size),
        "summary": _summary(reconstruction, codebook, probes),
        "reconstruction": reconstruction,
        "codebook": codebook,
        "probes": probes,
        "plots": plots,
    }
    result["eval_seconds"] = float(time.perf_counter() - started)
    result = _json_ready(result)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return result


def _check_arguments(model, eval_pairs, action_target: str):
    """Refuses what the evaluation cannot run on, before any pass; returns the model's config."""
    if action_target not in ACTION_TARGETS:
        raise ValueError(f"action_target must be one of {ACTION_TARGETS}, got {action_target!r}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "code_seq_len") or not hasattr(model, "decode"):
        raise TypeError(
            f"model must be an unwrapped LAPAQuantizerModel, got {type(model).__name__} (a DDP/FSDP wrapper? pass "
            f"accelerator.unwrap_model(model))"
        )
    if len(eval_pairs) == 0:
        raise ValueError("eval_pairs is empty: no held-out pairs to evaluate")
    return config


def _encode(
    model, eval_pairs, probe_train_pairs, *, batch_size: int, max_pairs: int | None, num_workers: int, seed: int
) -> tuple[EncodedPairs, EncodedPairs | None]:
    """The held-out pass (with reconstructions) and, when probe-fitting pairs are given, their encoder-only pass.
    The fitting pairs' subset is drawn with `seed + 1`, so that it differs from the held-out subset's."""
    encoded = encode_pairs(model, eval_pairs, choose_rows(len(eval_pairs), max_pairs, seed),
                           batch_size=batch_size, num_workers=num_workers, seed=seed)
    probe_encoded = None
    if probe_train_pairs is not None:
        if len(probe_train_pairs) == 0:
            raise ValueError("probe_train_pairs is empty")
        probe_encoded = encode_pairs(
            model, probe_train_pairs, choose_rows(len(probe_train_pairs), max_pairs, seed + 1),
            batch_size=batch_size, num_workers=num_workers, seed=seed, description="quantizer eval (probe fit)",
            with_reconstruction=False,
        )
    return encoded, probe_encoded


def _summary(reconstruction: dict, codebook: dict, probes: dict) -> dict:
    """The pass/fail fields of the evaluation (see the module docstring for "beats leakage")."""
    beats = probes.get("latent_probe_beats_leakage") if probes.get("available") else None
    return {
        "psnr_above_copy": bool(
            reconstruction["prediction_psnr_of_mean_mse"] > reconstruction["copy_psnr_of_mean_mse"]
        ),
        "psnr_gain_db": reconstruction["psnr_gain_db"],
        "min_code_fraction": codebook["min_code_fraction"],
        "all_codes_used_2pct": bool(codebook["min_code_fraction"] >= MIN_CODE_FRACTION),
        "perplexity": codebook["perplexity"],
        "num_distinct_latent_actions": codebook["num_distinct_latent_actions"],
        "latent_probe_beats_leakage": beats,
        "latent_probes_beat_leakage_on_all_position_dims": (
            None if not beats or any(v is None for v in beats.values()) else all(beats.values())
        ),
        "probes_note": probes.get("note", ""),
    }


def _json_ready(value):
    """Plain JSON values: numpy scalars to Python numbers, non-finite floats (a diverged model) to None."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value



__all__ = ["evaluate_quantizer"]
