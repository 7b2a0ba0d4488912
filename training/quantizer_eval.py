"""Held-out evaluation of the latent action quantizer: reconstruction, codebook health, action probes, plots.

    from training.quantizer_eval import evaluate_quantizer

    metrics = evaluate_quantizer(model, held_out_pairs, probe_train_pairs=train_pairs, max_pairs=1000,
                                 output_dir="outputs/quantizer/eval", step=step)
    metrics["summary"]   # psnr_above_copy, min_code_fraction, all_codes_used_2pct, latent_probe_beats_leakage

The reference logs only its training loss and the number of codes used, which cannot tell a collapsed codebook
from a healthy one, nor a world model from a frame copier. This module measures, on frame pairs of episodes kept
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

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

#: A code used by fewer than this fraction of held-out pairs (in its slot) counts as unused.
MIN_CODE_FRACTION = 0.02
#: Per-pair MSE floor for PSNR: identical frames would otherwise give an infinite PSNR (cap: 100 dB).
PSNR_MSE_FLOOR = 1e-10
#: Side of the average-pooled frame-t thumbnail used as the leakage baseline's features.
LEAKAGE_POOL_SIZE = 8
#: Ridge penalties, relative to the number of fitting pairs (lambda = alpha * n).
RIDGE_ALPHAS = tuple(10.0**k for k in range(-4, 3))
#: Standardised probe features are clipped to +-this many standard deviations (see `Standardizer`).
FEATURE_CLIP = 5.0
#: Fraction of held-out episodes used to fit the probes when no training pairs are given.
PROBE_FIT_FRACTION = 0.7
#: Fewest pairs the probes are fitted on and tested on; below that R^2 means nothing and the probes are skipped.
MIN_PROBE_FIT_PAIRS, MIN_PROBE_TEST_PAIRS = 8, 4
ACTION_TARGETS = ("window_mean", "current")
FEATURE_SETS = {
    "latents": "pre-quantisation latent actions z, flattened (s * q)",
    "codes_one_hot": "one-hot codes, one block per slot (s * |C|)",
    "frame_t_pixels": f"leakage baseline: RGB of frame t average-pooled to {LEAKAGE_POOL_SIZE}x{LEAKAGE_POOL_SIZE} "
    f"({3 * LEAKAGE_POOL_SIZE**2} features), blind to frame t+H",
}
LATENT_FEATURE_SETS = ("latents", "codes_one_hot")
#: Plots: one bar chart per slot up to this many slots (a heat map beyond); the scatter and the explorer show at
#: most this many slots.
MAX_BAR_CHART_SLOTS = 8
MAX_PLOTTED_SLOTS = 4
LEAKAGE_FEATURE_SET = "frame_t_pixels"


# ==================================================================================================== the pass
@dataclass
class EncodedPairs:
    """Everything the metrics need from one pass of the model over N frame pairs (numpy, on CPU).

    dataset_index (N,) position in the dataset given; episode_index, frame_index, target_frame_index (N,) int64
    (target_frame_index is -1 when the items do not carry it); codes (N, s) int64; latents (N, s*q) float32;
    frame_t_features (N, 3*8*8) float32; prediction_mse, prediction_mse_unclamped, copy_mse (N,) float64;
    action_at_t (N, A) float32 or None when the items carry no action.
    """

    dataset_index: np.ndarray
    episode_index: np.ndarray
    frame_index: np.ndarray
    target_frame_index: np.ndarray
    codes: np.ndarray
    latents: np.ndarray
    frame_t_features: np.ndarray
    prediction_mse: np.ndarray
    prediction_mse_unclamped: np.ndarray
    copy_mse: np.ndarray
    action_at_t: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.dataset_index)


class _Rows(torch.utils.data.Dataset):
    """Rows `indices` of a map-style dataset, keeping each row's position in the original dataset."""

    def __init__(self, dataset, indices: np.ndarray):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[int(self.indices[i])], "_dataset_index": int(self.indices[i])}


def _collate_pairs(items: list[dict]) -> dict:
    """Stacks the fields the evaluation uses; other fields (the task string, ...) are dropped."""
    for key in ("pixel_values", "episode_index", "frame_index"):
        if key not in items[0]:
            raise KeyError(
                f"frame-pair items must carry {key!r} (FramePairDataset items do); this one has {sorted(items[0])}"
            )
    batch = {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "dataset_index": torch.tensor([item["_dataset_index"] for item in items]),
        "episode_index": torch.tensor([int(item["episode_index"]) for item in items]),
        "frame_index": torch.tensor([int(item["frame_index"]) for item in items]),
        "target_frame_index": torch.tensor([int(item.get("target_frame_index", -1)) for item in items]),
    }
    if all("action" in item for item in items):
        actions = [torch.as_tensor(item["action"], dtype=torch.float32).reshape(-1) for item in items]
        batch["action"] = torch.stack(actions)
    return batch


def _as_unit_float(pixel_values: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1]; float pixels unchanged (the model checks their range)."""
    if pixel_values.dtype == torch.uint8:
        return pixel_values.float().div_(255.0)
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be uint8 or float in [0, 1], got {pixel_values.dtype}")
    return pixel_values


def choose_rows(num_rows: int, max_rows: int | None, seed: int) -> np.ndarray:
    """All row indices, or a seeded random subset of `max_rows` of them, sorted (so that a dataset that caches
    decoded episodes decodes each episode once)."""
    if max_rows is None or max_rows >= num_rows:
        return np.arange(num_rows)
    if max_rows < 1:
        raise ValueError(f"max_pairs must be at least 1, got {max_rows}")
    return np.sort(np.random.default_rng(seed).choice(num_rows, size=max_rows, replace=False))


@torch.no_grad()
def encode_pairs(
    model,
    pairs,
    rows: np.ndarray,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    seed: int = 0,
    description: str = "quantizer eval",
    with_reconstruction: bool = True,
) -> EncodedPairs:
    """One pass of `model` (already in eval mode) over the pairs `rows` of `pairs`, in batches.

    The model's eval-mode forward decodes with the hard codes, so its reconstruction is `decode(frame_t, codes)`.
    `with_reconstruction=False` runs the encoder only (for the probes' fitting pairs); the MSE columns are NaN.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    loader = torch.utils.data.DataLoader(
        _Rows(pairs, rows),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_pairs,
        # A generator of its own: a DataLoader otherwise draws its base seed from the global RNG, and evaluating
        # would change the training run's random stream.
        generator=torch.Generator().manual_seed(seed),
    )
    columns: dict[str, list] = {key: [] for key in EncodedPairs.__dataclass_fields__}
    has_action = True
    for batch in tqdm(loader, desc=description, disable=None, leave=False):
        pixels = _as_unit_float(batch["pixel_values"]).to(device)
        frame_t, frame_next = pixels[:, 0].float(), pixels[:, 1].float()
        if with_reconstruction:
            out = model(pixels.to(dtype), return_dict=True)
            prediction = out.reconstruction.float()
            columns["prediction_mse_unclamped"].append((prediction - frame_next).square().mean(dim=(1, 2, 3)))
            columns["prediction_mse"].append((prediction.clamp(0, 1) - frame_next).square().mean(dim=(1, 2, 3)))
        else:
            out = model.encode(pixels.to(dtype))
            not_computed = torch.full((len(pixels),), float("nan"), device=pixels.device)
            columns["prediction_mse_unclamped"].append(not_computed)
            columns["prediction_mse"].append(not_computed)
        columns["copy_mse"].append((frame_t - frame_next).square().mean(dim=(1, 2, 3)))
        columns["frame_t_features"].append(F.adaptive_avg_pool2d(frame_t, LEAKAGE_POOL_SIZE).flatten(1))
        columns["codes"].append(out.codes)
        columns["latents"].append(out.latents.float().flatten(1))
        for key in ("dataset_index", "episode_index", "frame_index", "target_frame_index"):
            columns[key].append(batch[key])
        has_action &= "action" in batch
        if has_action:
            columns["action_at_t"].append(batch["action"])
    arrays = {}
    for key, parts in columns.items():
        if key == "action_at_t" and not has_action:
            arrays[key] = None
            continue
        arrays[key] = torch.cat(parts).cpu().numpy()
    for key in ("prediction_mse", "prediction_mse_unclamped", "copy_mse"):
        arrays[key] = arrays[key].astype(np.float64)
    return EncodedPairs(**arrays)


# ================================================================================================ the metrics
def psnr(mse: np.ndarray | float, peak: float = 1.0) -> np.ndarray | float:
    """10 log10(peak^2 / mse), with mse floored at `PSNR_MSE_FLOOR` (so at most 100 dB for peak 1)."""
    return 10.0 * np.log10(peak**2 / np.maximum(mse, PSNR_MSE_FLOOR))


def reconstruction_metrics(encoded: EncodedPairs) -> dict:
    """Next-frame prediction error against frame t+H, beside the copy-frame-t baseline (pixels in [0, 1])."""
    prediction_mse, copy_mse = encoded.prediction_mse, encoded.copy_mse
    prediction_psnr = float(psnr(prediction_mse.mean()))
    copy_psnr = float(psnr(copy_mse.mean()))
    return {
        "prediction_mse": float(prediction_mse.mean()),
        "prediction_mse_unclamped": float(encoded.prediction_mse_unclamped.mean()),
        "copy_mse": float(copy_mse.mean()),
        "prediction_psnr_of_mean_mse": prediction_psnr,
        "copy_psnr_of_mean_mse": copy_psnr,
        "psnr_gain_db": prediction_psnr - copy_psnr,
        "prediction_psnr_mean_per_pair": float(psnr(prediction_mse).mean()),
        "copy_psnr_mean_per_pair": float(psnr(copy_mse).mean()),
        "fraction_pairs_better_than_copy": float((prediction_mse < copy_mse).mean()),
        "definitions": (
            "prediction = decoder output (eval mode, hard codes) clamped to [0, 1], except prediction_mse_unclamped "
            "(the training loss's definition); copy = frame t used as the prediction of frame t+H. "
            "*_psnr_of_mean_mse = 10 log10(1 / mean MSE over pairs); *_psnr_mean_per_pair = mean over pairs of "
            f"10 log10(1 / MSE_i) with MSE_i floored at {PSNR_MSE_FLOOR:g} (at most 100 dB). Peak 1.0."
        ),
    }


def _perplexity(fractions: np.ndarray) -> float:
    """exp of the entropy (nats) of a distribution; zero fractions contribute nothing."""
    nonzero = fractions[fractions > 0]
    return float(np.exp(-(nonzero * np.log(nonzero)).sum()))


def codebook_metrics(codes: np.ndarray, codebook_size: int, *, top_k: int = 10) -> dict:
    """Codebook usage of N latent actions `codes` (N, s) with codes in [0, codebook_size).

    Returns usage (s x |C| fractions of pairs, each row sums to 1), perplexity per slot and pooled over slots, the
    number of distinct latent actions (tuples of s codes) and their perplexity, the most frequent ones, the smallest
    usage fraction and the (slot, code) cells below `MIN_CODE_FRACTION`.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or len(codes) == 0:
        raise ValueError(f"codes must be (N, s) with N > 0, got shape {codes.shape}")
    num_pairs, num_slots = codes.shape
    usage = np.stack([np.bincount(codes[:, slot], minlength=codebook_size) for slot in range(num_slots)]) / num_pairs
    pooled = np.bincount(codes.reshape(-1), minlength=codebook_size) / codes.size
    tuples, tuple_counts = np.unique(codes, axis=0, return_counts=True)
    order = np.argsort(-tuple_counts, kind="stable")
    below = [
        [int(slot), int(code), float(usage[slot, code])]
        for slot, code in zip(*np.nonzero(usage < MIN_CODE_FRACTION))
    ]
    possible = codebook_size**num_slots
    # |C|^s overflows JSON readers' integers for long code sequences (8^64): a float then.
    possible = int(possible) if possible < 2**53 else float(possible)
    return {
        "codebook_size": int(codebook_size),
        "code_seq_len": int(num_slots),
        "usage": usage.tolist(),
        "perplexity_per_slot": [_perplexity(row) for row in usage],
        "perplexity": _perplexity(pooled),
        "max_perplexity": float(codebook_size),
        "codes_used_per_slot": [int((row > 0).sum()) for row in usage],
        "num_distinct_latent_actions": int(len(tuples)),
        "num_possible_latent_actions": int(possible),
        "distinct_latent_action_share": float(len(tuples) / possible),
        "latent_action_perplexity": _perplexity(tuple_counts / num_pairs),
        "most_frequent_latent_actions": [
            {"codes": tuples[i].tolist(), "fraction": float(tuple_counts[i] / num_pairs)} for i in order[:top_k]
        ],
        "min_code_fraction": float(usage.min()),
        "code_fraction_threshold": MIN_CODE_FRACTION,
        "codes_below_threshold": below,
        "definitions": (
            "usage[slot][code] = fraction of held-out pairs whose slot takes the code; perplexity = exp(entropy in "
            "nats), per slot and of the histogram pooled over slots; a latent action is the tuple of s codes; "
            "codes_below_threshold lists [slot, code, fraction]."
        ),
    }


# ============================================================================================= action targets
def window_mean_actions(
    episode_actions: np.ndarray, frame_index: np.ndarray, target_frame_index: np.ndarray
) -> np.ndarray:
    """Mean of the actions a_t .. a_{t'-1} of one episode for pairs (t, t'): the actions the pair's frames show.

    Args:
        episode_actions: (T, A) the episode's actions, a_t taken at frame t.
        frame_index: (N,) t of each pair; target_frame_index: (N,) t' >= t of each pair.
    Returns:
        (N, A) float64; a pair with t' == t (the clamped last pair of an episode) gets a_t.
    """
    actions = np.asarray(episode_actions, dtype=np.float64)
    start = np.asarray(frame_index, dtype=np.int64)
    stop = np.maximum(np.asarray(target_frame_index, dtype=np.int64), start + 1)
    if len(start) and (start.min() < 0 or stop.max() > len(actions)):
        raise ValueError(f"pair frames [{start.min()}, {stop.max()}) fall outside the episode's {len(actions)} actions")
    # Prefix sums: the mean of any window in O(1).
    cumulative = np.concatenate([np.zeros((1, actions.shape[1])), np.cumsum(actions, axis=0)])
    return (cumulative[stop] - cumulative[start]) / (stop - start)[:, None]


def _unwrap_pair_dataset(pairs):
    """The dataset under (nested) `torch.utils.data.Subset`s; frame-pair items keep their episode and frame indices."""
    while isinstance(pairs, torch.utils.data.Subset):
        pairs = pairs.dataset
    return pairs


def action_names(pairs, num_dims: int) -> list[str]:
    """Names of the action dimensions from the source's features (LeRobot `features["action"]["names"]`), else
    action_0, action_1, ..."""
    source = getattr(_unwrap_pair_dataset(pairs), "source", None)
    features = getattr(getattr(source, "meta", None), "features", None) or {}
    names = (features.get("action") or {}).get("names")
    if isinstance(names, dict) and len(names) == 1:  # some LeRobot datasets: {"motors": [...]}
        names = next(iter(names.values()))
    if isinstance(names, (list, tuple)) and len(names) == num_dims and all(isinstance(n, str) for n in names):
        return list(names)
    return [f"action_{i}" for i in range(num_dims)]


def default_position_dims(names: Sequence[str]) -> list[int]:
    """The first three action dimensions (end-effector x, y, z in Meta-World and most delta-pose action spaces),
    minus any whose name mentions a gripper."""
    return [i for i, name in enumerate(names[:3]) if "grip" not in name.lower()]


def action_targets(pairs, encoded: EncodedPairs, action_target: str) -> np.ndarray | None:
    """The probe target of each encoded pair, (N, A) float64, or None when the pairs carry no actions."""
    if encoded.action_at_t is None:
        return None
    if action_target == "current":
        return encoded.action_at_t.astype(np.float64)
    source = getattr(_unwrap_pair_dataset(pairs), "source", None)
    if source is None or not hasattr(source, "episode_actions"):
        raise ValueError(
            f"action_target='window_mean' needs the actions of the frames after t, read from the pair dataset's "
            f"source (`pairs.source.episode_actions(episode)`, as FramePairDataset has); {type(pairs).__name__} has "
            f"no such source. Pass a FramePairDataset (or a Subset of one), or use action_target='current'."
        )
    if (encoded.target_frame_index < 0).any():
        raise ValueError("action_target='window_mean' needs `target_frame_index` in the items (FramePairDataset's)")
    targets = np.empty(encoded.action_at_t.shape, dtype=np.float64)
    for episode in np.unique(encoded.episode_index):
        rows = np.flatnonzero(encoded.episode_index == episode)
        actions = source.episode_actions(int(episode))
        if actions is None:
            raise ValueError(f"episode {episode}: the items carry actions but the source returns none")
        targets[rows] = window_mean_actions(
            actions.reshape(len(actions), -1), encoded.frame_index[rows], encoded.target_frame_index[rows]
        )
    return targets


# ===================================================================================================== probes
def r2_per_dimension(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Coefficient of determination 1 - SSE/SST of each column of (N, A) arrays; NaN where the truth is constant."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if y_true.ndim == 1:
        y_true, y_pred = y_true[:, None], y_pred[:, None]
    sse = np.square(y_true - y_pred).sum(axis=0)
    sst = np.square(y_true - y_true.mean(axis=0)).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 1e-12, 1.0 - sse / np.where(sst > 1e-12, sst, 1.0), np.nan)


def validation_split(num_rows: int, groups: np.ndarray | None, *, fraction: float = 0.2, seed: int = 0):
    """(fit rows, validation rows): whole groups (episodes) go to validation when there are at least two groups,
    so that the validation pairs are not near-copies of fitting pairs; otherwise random rows."""
    rng = np.random.default_rng(seed)
    if groups is not None and len(np.unique(groups)) >= 2:
        unique = np.unique(groups)
        num_val = min(len(unique) - 1, max(1, int(round(fraction * len(unique)))))
        val_groups = rng.choice(unique, size=num_val, replace=False)
        is_val = np.isin(groups, val_groups)
    else:
        is_val = np.zeros(num_rows, dtype=bool)
        is_val[rng.choice(num_rows, size=max(1, int(round(fraction * num_rows))), replace=False)] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


class Standardizer:
    """Per-column (x - mean) / std with the statistics of the rows it was fitted on; constant columns get std 1.
    With `clip`, results are clipped to [-clip, clip]: a feature that barely varies in the fitting rows (a pixel the
    arm seldom reaches) would otherwise take values of tens of standard deviations on new rows and throw the
    probe's prediction far off."""

    def __init__(self, x: np.ndarray, clip: float | None = None):
        self.mean = x.mean(axis=0)
        std = x.std(axis=0)
        self.std = np.where(std > 1e-8, std, 1.0)
        self.clip = clip

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.std
        return z if self.clip is None else np.clip(z, -self.clip, self.clip)


class RidgeProbe:
    """Linear probe: ridge regression in closed form on standardised features, one penalty per output dimension
    chosen on a validation split from `alphas` (lambda = alpha * number of rows), then refit on all rows."""

    def __init__(self, alphas: Sequence[float] = RIDGE_ALPHAS):
        self.alphas = tuple(alphas)

    @staticmethod
    def _solver(x: np.ndarray, y: np.ndarray):
        """For standardised x (n, d) and centred y (n, A): a function penalties (A,) -> weights (d, A) of the ridge
        regressions, column a with penalty lambda_a. One eigendecomposition of the Gram matrix X^T X = V diag(e) V^T
        serves every penalty: w = V diag(1 / (e + lambda)) V^T X^T y."""
        eigenvalues, eigenvectors = np.linalg.eigh(x.T @ x)
        eigenvalues = np.clip(eigenvalues, 0.0, None)
        projected = eigenvectors.T @ (x.T @ y)  # (d, A)
        return lambda penalties: eigenvectors @ (projected / (eigenvalues[:, None] + penalties[None, :]))

    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, seed: int = 0) -> "RidgeProbe":
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        num_outputs = y.shape[1]
        fit_rows, val_rows = validation_split(len(x), groups, seed=seed)
        if len(fit_rows) >= 2 and len(val_rows) >= 2:
            scaler = Standardizer(x[fit_rows], clip=FEATURE_CLIP)
            x_fit = scaler(x[fit_rows])
            # Clipping moves the mean a little off zero: centre again, so that the intercept is the target mean.
            x_mean = x_fit.mean(axis=0)
            x_fit, x_val = x_fit - x_mean, scaler(x[val_rows]) - x_mean
            y_mean = y[fit_rows].mean(axis=0)
            solve = self._solver(x_fit, y[fit_rows] - y_mean)
            scores = []
            for alpha in self.alphas:
                weights = solve(np.full(num_outputs, alpha * len(fit_rows)))
                scores.append(np.nan_to_num(r2_per_dimension(y[val_rows], x_val @ weights + y_mean), nan=-np.inf))
            # Highest validation R^2 per dimension; ties go to the larger penalty (the simpler model).
            scores = np.array(scores)  # (num_alphas, A)
            best = len(self.alphas) - 1 - np.argmax(scores[::-1], axis=0)
            self.alpha_ = np.array([self.alphas[i] for i in best])
        else:
            self.alpha_ = np.full(num_outputs, 1e-2)
        self.scaler = Standardizer(x, clip=FEATURE_CLIP)
        features = self.scaler(x)
        self.x_mean, self.y_mean = features.mean(axis=0), y.mean(axis=0)
        self.weights = self._solver(features - self.x_mean, y - self.y_mean)(self.alpha_ * len(x))
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (self.scaler(np.asarray(x, dtype=np.float64)) - self.x_mean) @ self.weights + self.y_mean


@contextlib.contextmanager
def _one_torch_thread():
    """Runs the block with one intra-op thread, then restores the setting. The probes' matrices are tiny: extra
    threads only add synchronisation, and on busy shared cores spinning threads made the MLP probes 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class MLPProbe:
    """Non-linear probe: Linear(d, hidden) - ReLU - Linear(hidden, A) on standardised features and targets, Adam on
    minibatches for at most `max_steps`, keeping the weights with the lowest validation loss (early stopping)."""

    def __init__(
        self,
        hidden_size: int = 128,
        max_steps: int = 400,
        batch_size: int = 256,
        learning_rate: float = 3e-3,
        eval_every: int = 25,
    ):
        self.hidden_size, self.max_steps, self.batch_size = hidden_size, max_steps, batch_size
        self.learning_rate, self.eval_every = learning_rate, eval_every

    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, seed: int = 0) -> "MLPProbe":
        with _one_torch_thread():
            return self._fit(x, y, groups, seed)

    def _fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, seed: int) -> "MLPProbe":
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        fit_rows, val_rows = validation_split(len(x), groups, seed=seed)
        if len(fit_rows) < 2 or len(val_rows) < 1:
            fit_rows, val_rows = np.arange(len(x)), np.arange(0)
        self.x_scaler, self.y_scaler = Standardizer(x[fit_rows], clip=FEATURE_CLIP), Standardizer(y[fit_rows])
        x_fit = torch.tensor(self.x_scaler(x[fit_rows]), dtype=torch.float32)
        y_fit = torch.tensor(self.y_scaler(y[fit_rows]), dtype=torch.float32)
        x_val = torch.tensor(self.x_scaler(x[val_rows]), dtype=torch.float32)
        y_val = torch.tensor(self.y_scaler(y[val_rows]), dtype=torch.float32)
        # Seeded initialisation without touching the caller's global RNG (the training run's random stream).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = nn.Sequential(
                nn.Linear(x.shape[1], self.hidden_size), nn.ReLU(), nn.Linear(self.hidden_size, y.shape[1])
            )
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.learning_rate)
        batch = min(self.batch_size, len(x_fit))
        # Step 0 (the initial network, close to predicting the mean) is a candidate too: when every fitted state
        # is worse on the validation pairs, the probe falls back to it instead of reporting an overfit.
        best_loss, best_state, self.best_step_ = math.inf, copy.deepcopy(self.network.state_dict()), 0
        if len(x_val):
            with torch.no_grad():
                best_loss = F.mse_loss(self.network(x_val), y_val).item()
        with torch.enable_grad():
            for step in range(1, self.max_steps + 1):
                rows = torch.randint(0, len(x_fit), (batch,), generator=generator)
                loss = F.mse_loss(self.network(x_fit[rows]), y_fit[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if len(x_val) and (step % self.eval_every == 0 or step == self.max_steps):
                    with torch.no_grad():
                        val_loss = F.mse_loss(self.network(x_val), y_val).item()
                    if val_loss < best_loss:
                        best_loss, self.best_step_ = val_loss, step
                        best_state = copy.deepcopy(self.network.state_dict())
        if len(x_val):
            self.network.load_state_dict(best_state)
        else:
            self.best_step_ = self.max_steps
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad(), _one_torch_thread():
            out = self.network(torch.tensor(self.x_scaler(np.asarray(x, dtype=np.float64)), dtype=torch.float32))
        return out.double().numpy() * self.y_scaler.std + self.y_scaler.mean


def probe_features(encoded: EncodedPairs, codebook_size: int) -> dict[str, np.ndarray]:
    """The probes' feature sets of N pairs: latents (N, s*q), codes_one_hot (N, s*|C|), frame_t_pixels (N, 192)."""
    one_hot = np.eye(codebook_size, dtype=np.float32)[encoded.codes].reshape(len(encoded), -1)
    return {"latents": encoded.latents, "codes_one_hot": one_hot, "frame_t_pixels": encoded.frame_t_features}


def _named(values: np.ndarray, names: Sequence[str]) -> dict:
    return {name: (None if not np.isfinite(v) else float(v)) for name, v in zip(names, values)}


def run_probes(
    fit_features: dict[str, np.ndarray],
    fit_targets: np.ndarray,
    fit_groups: np.ndarray | None,
    test_features: dict[str, np.ndarray],
    test_targets: np.ndarray,
    names: Sequence[str],
    position_dims: Sequence[int],
    *,
    seed: int = 0,
) -> dict:
    """Fits a ridge and an MLP probe per feature set on the fitting pairs, reports R^2 per action dimension on the
    test pairs, and compares the latent feature sets against the leakage baseline.

    Args:
        fit_features / test_features: {feature set: (N_fit, d) / (N_test, d)} with the keys of `FEATURE_SETS`.
        fit_targets / test_targets: (N_fit, A) / (N_test, A) probe targets.
        fit_groups: (N_fit,) episode of each fitting pair, for the probes' validation split.
        names: A action dimension names; position_dims: which of them the pass/fail comparison covers.
    """
    r2: dict[str, dict] = {}
    ridge_alpha: dict[str, dict] = {}
    mlp_best_step: dict[str, int] = {}
    best_by_set: dict[str, np.ndarray] = {}
    for feature_set in FEATURE_SETS:
        ridge = RidgeProbe().fit(fit_features[feature_set], fit_targets, fit_groups, seed=seed)
        mlp = MLPProbe().fit(fit_features[feature_set], fit_targets, fit_groups, seed=seed)
        linear_r2 = r2_per_dimension(test_targets, ridge.predict(test_features[feature_set]))
        mlp_r2 = r2_per_dimension(test_targets, mlp.predict(test_features[feature_set]))
        r2[feature_set] = {"linear": _named(linear_r2, names), "mlp": _named(mlp_r2, names)}
        ridge_alpha[feature_set] = {name: float(a) for name, a in zip(names, ridge.alpha_)}
        mlp_best_step[feature_set] = int(mlp.best_step_)
        best_by_set[feature_set] = np.fmax(linear_r2, mlp_r2)
    best_latent = np.fmax(*(best_by_set[s] for s in LATENT_FEATURE_SETS))
    best_leakage = best_by_set[LEAKAGE_FEATURE_SET]
    beats = {}
    for dim in position_dims:
        latent, leakage = best_latent[dim], best_leakage[dim]
        # A probe below R^2 = 0 is worse than predicting the mean: "beating" an even worse baseline means nothing.
        beats[names[dim]] = (
            None if not (np.isfinite(latent) and np.isfinite(leakage)) else bool(latent > max(leakage, 0.0))
        )
    return {
        "r2": r2,
        "best_latent_r2": _named(best_latent, names),
        "best_leakage_r2": _named(best_leakage, names),
        "latent_probe_beats_leakage": beats,
        "ridge_alpha": ridge_alpha,
        "mlp_best_step": mlp_best_step,
    }


def _probe_section(
    model, eval_pairs, encoded: EncodedPairs, probe_train_pairs, probe_encoded: EncodedPairs | None,
    action_target: str, position_dims: Sequence[int] | None, seed: int,
) -> dict:
    """The `probes` section of the metrics, or a note saying why the probes were skipped."""
    codebook_size = model.config.codebook_size
    test_targets = action_targets(eval_pairs, encoded, action_target)
    if test_targets is None:
        return {"available": False, "note": "the held-out pairs have no ground-truth actions (e.g. a video folder): "
                "probes skipped", "action_target": action_target}
    names = action_names(eval_pairs, test_targets.shape[1])
    dims = default_position_dims(names) if position_dims is None else [int(d) for d in position_dims]
    if any(not 0 <= d < len(names) for d in dims):
        raise ValueError(f"position_dims {dims} out of range for {len(names)} action dimensions {names}")
    passes = [encoded] + ([probe_encoded] if probe_encoded is not None else [])
    if not all(np.isfinite(p.latents).all() for p in passes):
        return {"available": False, "action_target": action_target, "action_names": names,
                "note": "the model's latents are not finite (diverged training?): probes skipped"}
    test_features = probe_features(encoded, codebook_size)
    if probe_encoded is not None:
        fit_targets = action_targets(probe_train_pairs, probe_encoded, action_target)
        if fit_targets is None:
            return {"available": False, "note": "probe_train_pairs have no ground-truth actions: probes skipped",
                    "action_target": action_target}
        if fit_targets.shape[1] != test_targets.shape[1]:
            raise ValueError(f"probe_train_pairs have {fit_targets.shape[1]}-D actions, the held-out pairs "
                             f"{test_targets.shape[1]}-D")
        fit_features, fit_groups = probe_features(probe_encoded, codebook_size), probe_encoded.episode_index
        fit_on = "probe_train_pairs (training episodes); tested on all held-out pairs"
        test_rows = np.arange(len(encoded))
    else:
        episodes = np.unique(encoded.episode_index)
        if len(episodes) < 2:
            return {"available": False, "action_target": action_target, "action_names": names,
                    "note": "no probe_train_pairs and fewer than 2 held-out episodes to split by episode: "
                    "probes skipped"}
        rng = np.random.default_rng(seed)
        num_fit = min(len(episodes) - 1, max(1, int(round(PROBE_FIT_FRACTION * len(episodes)))))
        fit_episodes = rng.choice(episodes, size=num_fit, replace=False)
        is_fit = np.isin(encoded.episode_index, fit_episodes)
        fit_rows, test_rows = np.flatnonzero(is_fit), np.flatnonzero(~is_fit)
        fit_features = {k: v[fit_rows] for k, v in test_features.items()}
        test_features = {k: v[test_rows] for k, v in test_features.items()}
        fit_targets, test_targets = test_targets[fit_rows], test_targets[test_rows]
        fit_groups = encoded.episode_index[fit_rows]
        fit_on = (f"held-out episodes split {PROBE_FIT_FRACTION:.0%}/{1 - PROBE_FIT_FRACTION:.0%} by episode "
                  f"(seeded; no probe_train_pairs given)")
    if len(fit_targets) < MIN_PROBE_FIT_PAIRS or len(test_targets) < MIN_PROBE_TEST_PAIRS:
        return {"available": False, "action_target": action_target, "action_names": names,
                "note": f"too few pairs for probes ({len(fit_targets)} to fit, {len(test_targets)} to test; need "
                f"{MIN_PROBE_FIT_PAIRS} and {MIN_PROBE_TEST_PAIRS}): probes skipped"}
    section = {
        "available": True,
        "note": "",
        "action_target": action_target,
        "action_names": list(names),
        "position_dims": dims,
        "position_names": [names[d] for d in dims],
        "fit_on": fit_on,
        "num_fit_pairs": int(len(fit_targets)),
        "num_test_pairs": int(len(test_targets)),
        "fit_episodes": sorted(int(e) for e in np.unique(fit_groups)),
        "test_episodes": sorted(int(e) for e in np.unique(encoded.episode_index[test_rows])),
        "features": {k: {"num_features": int(test_features[k].shape[1]), "description": d}
                     for k, d in FEATURE_SETS.items()},
        "target_std": _named(test_targets.std(axis=0), names),
    }
    section.update(
        run_probes(fit_features, fit_targets, fit_groups, test_features, test_targets, names, dims, seed=seed)
    )
    section["definitions"] = (
        "R^2 = 1 - SSE/SST per action dimension on the test pairs (null: constant target). linear = ridge in closed "
        "form on standardised features, penalty per dimension from the validation split; mlp = 1 hidden layer of 128 "
        "ReLUs, Adam, early-stopped on the validation split. best_latent_r2 = max over latents/codes_one_hot x "
        "linear/mlp; best_leakage_r2 = max over frame_t_pixels x linear/mlp; latent_probe_beats_leakage: "
        "best_latent_r2 > max(best_leakage_r2, 0) on each position dimension."
    )
    return section


# ===================================================================================================== plots
def _new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, without pyplot (no global backend switch, no figure registry)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _image(tensor: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] (clamped) -> (H, W, 3) for imshow."""
    return tensor.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _code_colors(codebook_size: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if codebook_size <= 10 else "tab20" if codebook_size <= 20 else "turbo"]
    if codebook_size <= 20:
        return [cmap(i) for i in range(codebook_size)]
    return [cmap(i / max(1, codebook_size - 1)) for i in range(codebook_size)]


def plot_codebook_usage(codebook: dict, path: Path, *, title_suffix: str = "") -> Path:
    """Bars of the usage fraction of every code per slot (red below the 2% line; with more than
    `MAX_BAR_CHART_SLOTS` slots a slots x codes heat map instead), and the most frequent latent actions."""
    usage = np.asarray(codebook["usage"])
    num_slots, codebook_size = usage.shape
    bar_charts = num_slots <= MAX_BAR_CHART_SLOTS
    figure = _new_figure(max(8.0, 2.6 * num_slots) if bar_charts else 10.0, 6.2)
    grid = figure.add_gridspec(2, num_slots if bar_charts else 1, height_ratios=[1.2, 1.0], hspace=0.55, wspace=0.3)
    top = max(usage.max(), 1.0 / codebook_size) * 1.15
    for slot in range(num_slots if bar_charts else 0):
        ax = figure.add_subplot(grid[0, slot])
        colors = ["tab:red" if f < MIN_CODE_FRACTION else "tab:blue" for f in usage[slot]]
        ax.bar(np.arange(codebook_size), usage[slot], color=colors)
        ax.axhline(MIN_CODE_FRACTION, color="tab:red", linestyle="--", linewidth=1,
                   label=f"{MIN_CODE_FRACTION:.0%} floor")
        ax.axhline(1.0 / codebook_size, color="gray", linestyle=":", linewidth=1, label="uniform")
        ax.set_ylim(0, top)
        ax.set_xticks(np.arange(codebook_size))
        ax.set_xlabel("code")
        perplexity = codebook["perplexity_per_slot"][slot]
        ax.set_title(f"slot {slot}: perplexity {perplexity:.2f} / {codebook_size}", fontsize=9)
        if slot == 0:
            ax.set_ylabel("fraction of held-out pairs")
            ax.legend(fontsize=7, loc="upper right")
    if not bar_charts:
        ax = figure.add_subplot(grid[0, 0])
        shown = ax.imshow(usage.T, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("slot")
        ax.set_ylabel("code")
        below = len(codebook["codes_below_threshold"])
        ax.set_title(f"usage per slot and code; {below} of {usage.size} cells below {MIN_CODE_FRACTION:.0%}",
                     fontsize=9)
        figure.colorbar(shown, ax=ax, fraction=0.03).set_label("fraction of held-out pairs", fontsize=8)
    ax = figure.add_subplot(grid[1, :])
    frequent = codebook["most_frequent_latent_actions"]
    ax.bar(np.arange(len(frequent)), [f["fraction"] for f in frequent], color="tab:green")
    ax.set_xticks(np.arange(len(frequent)))
    # Long code sequences do not fit as tick labels: ranks instead (the tuples are in metrics.json).
    labels = [str(f["codes"]) for f in frequent] if bar_charts else [f"#{i + 1}" for i in range(len(frequent))]
    ax.set_xticklabels(labels, fontsize=8, rotation=20 if bar_charts else 0)
    ax.set_ylabel("fraction of pairs")
    possible = f"{codebook_size}^{num_slots}"
    if codebook_size**num_slots < 10**6:
        possible += f" = {codebook_size**num_slots}"
    ax.set_title(
        f"most frequent latent actions: {codebook['num_distinct_latent_actions']} distinct of {possible} possible "
        f"(perplexity {codebook['latent_action_perplexity']:.1f})",
        fontsize=9,
    )
    figure.suptitle(
        f"Codebook usage on held-out pairs (min code fraction {codebook['min_code_fraction']:.1%}){title_suffix}"
    )
    figure.savefig(path, bbox_inches="tight")
    return path


def plot_action_scatter(
    targets: np.ndarray, codes: np.ndarray, names: Sequence[str], position_dims: Sequence[int], codebook_size: int,
    path: Path, *, target_label: str = "window-mean action", title_suffix: str = "",
) -> Path:
    """The paper's Figure 13: held-out pairs placed at their ground-truth action (x-y, and x-z when there is a third
    position dimension), coloured by the code of each slot (one column per slot; X marks each code's mean), and in
    the last column by the most frequent latent actions (tuples; the rest grey)."""
    from matplotlib.lines import Line2D

    # Planes of position dimensions only (other dimensions, like a gripper, are not motions in the image).
    dims = list(position_dims) or list(range(len(names)))
    if len(dims) >= 3:
        planes = [(dims[0], dims[1]), (dims[0], dims[2])]
    elif len(dims) == 2:
        planes = [(dims[0], dims[1])]
    else:
        planes = [(dims[0], None)]  # 1-D action: the action against the code
    num_pairs, num_slots = codes.shape
    shown_slots = min(num_slots, MAX_PLOTTED_SLOTS)
    colors = np.array(_code_colors(codebook_size))
    tuples, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    top_tuples = np.argsort(-counts, kind="stable")[:8]
    tuple_rank = np.full(len(tuples), -1)
    tuple_rank[top_tuples] = np.arange(len(top_tuples))
    tuple_colors = np.array(_code_colors(10))[:8]
    jitter = np.random.default_rng(0).uniform(-0.3, 0.3, num_pairs)
    figure = _new_figure(2.9 * (shown_slots + 1) + 2.2, 2.9 * len(planes) + 1.0)
    grid = figure.add_gridspec(len(planes), shown_slots + 1, wspace=0.32, hspace=0.42)
    for row, (dim_x, dim_y) in enumerate(planes):
        x = targets[:, dim_x]
        for column in range(shown_slots + 1):
            ax = figure.add_subplot(grid[row, column])
            if column < shown_slots:
                slot_codes = codes[:, column]
                y = targets[:, dim_y] if dim_y is not None else slot_codes + jitter
                ax.scatter(x, y, s=8, alpha=0.5, c=colors[slot_codes], linewidths=0)
                used = np.unique(slot_codes)
                means = np.array([[x[slot_codes == c].mean(), y[slot_codes == c].mean()] for c in used])
                ax.scatter(means[:, 0], means[:, 1], s=80, marker="X", c=colors[used], edgecolors="black",
                           linewidths=0.8, zorder=3)
                ax.set_title(f"colour: code of slot {column}", fontsize=9)
            else:
                y = targets[:, dim_y] if dim_y is not None else inverse + jitter
                ranks = tuple_rank[inverse]
                rest = ranks < 0
                ax.scatter(x[rest], y[rest], s=5, alpha=0.35, color="lightgray", linewidths=0)
                ax.scatter(x[~rest], y[~rest], s=6, alpha=0.65, c=tuple_colors[ranks[~rest]], linewidths=0)
                ax.set_title("colour: latent action (top 8)", fontsize=9)
                if row == 0:
                    handles = [Line2D([], [], marker="o", linestyle="", color=tuple_colors[rank],
                                      label=f"{tuples[t].tolist()} {counts[t] / num_pairs:.0%}")
                               for rank, t in enumerate(top_tuples)]
                    handles.append(Line2D([], [], marker="o", linestyle="", color="lightgray", label="other"))
                    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
            ax.set_xlabel(f"{names[dim_x]} ({target_label})", fontsize=8)
            ax.set_ylabel(names[dim_y] if dim_y is not None else "code", fontsize=8)
            ax.tick_params(labelsize=7)
    handles = [
        Line2D([], [], marker="o", linestyle="", color=colors[code], label=f"code {code}")
        for code in range(codebook_size)
    ]
    # Below the axes (the saved image grows to include it), where it cannot cover the x labels.
    figure.legend(handles=handles, loc="upper center", ncol=min(codebook_size, 16), fontsize=8, frameon=False,
                  bbox_to_anchor=(0.42, 0.0))
    more = f"; first {shown_slots} of {num_slots} slots" if shown_slots < num_slots else ""
    figure.suptitle(
        f"Latent actions vs ground-truth actions on held-out pairs (X = mean of a code{more}){title_suffix}",
        y=0.98 + 0.05 / len(planes),
    )
    figure.savefig(path, bbox_inches="tight")
    return path


def _pick_display_pairs(encoded: EncodedPairs, count: int, seed: int) -> np.ndarray:
    """Rows of `encoded` to show: pairs where something moves (copy MSE at least the median), from distinct
    episodes where possible, seeded."""
    rng = np.random.default_rng(seed)
    moving = np.flatnonzero(encoded.copy_mse >= np.median(encoded.copy_mse))
    moving = rng.permutation(moving)
    chosen, seen = [], set()
    for row in moving:  # first pass: one per episode
        if encoded.episode_index[row] not in seen:
            chosen.append(row)
            seen.add(encoded.episode_index[row])
        if len(chosen) == count:
            break
    for row in moving:
        if len(chosen) == count:
            break
        if row not in chosen:
            chosen.append(row)
    return np.array(chosen, dtype=np.int64)


def _mosaic(tiles: list[list[np.ndarray | None]], gap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tiles (rows x columns of (h, w, 3) RGB in [0, 1], or None for an empty cell), all the same size, on one white
    canvas with `gap` pixels between them. One image in one axes draws far faster than an axes per tile.

    Returns the canvas (H, W, 3), and the pixel offsets of each tile row (top) and column (left)."""
    first = next(tile for row in tiles for tile in row if tile is not None)
    height, width = first.shape[:2]
    num_rows, num_columns = len(tiles), max(len(row) for row in tiles)
    tops = gap + np.arange(num_rows) * (height + gap)
    lefts = gap + np.arange(num_columns) * (width + gap)
    canvas = np.ones((tops[-1] + height + gap, lefts[-1] + width + gap, 3))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            if tile is not None:
                canvas[tops[r] : tops[r] + height, lefts[c] : lefts[c] + width] = tile
    return canvas, tops, lefts


def _colormapped(values: np.ndarray, cmap_name: str, low: float, high: float) -> np.ndarray:
    """(h, w) values -> (h, w, 3) RGB through a matplotlib colormap on [low, high]."""
    import matplotlib

    scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
    return matplotlib.colormaps[cmap_name](scaled)[..., :3]


def _mosaic_axes(ax, canvas: np.ndarray, tops, lefts, tile_size, *, row_labels=None, column_labels=None) -> None:
    """Shows a mosaic in `ax` with row labels on the left and column labels on top, as tick labels."""
    height, width = tile_size
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks(lefts + width / 2 - 0.5)
    ax.set_xticklabels(column_labels or [""] * len(lefts), fontsize=8)
    ax.set_yticks(tops + height / 2 - 0.5)
    ax.set_yticklabels(row_labels or [""] * len(tops), fontsize=9)
    ax.tick_params(length=0, top=True, labeltop=True, bottom=False, labelbottom=False)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _colorbar(figure, ax, cmap_name: str, low: float, high: float, label: str) -> None:
    import matplotlib
    from matplotlib.cm import ScalarMappable

    mappable = ScalarMappable(norm=matplotlib.colors.Normalize(low, high), cmap=matplotlib.colormaps[cmap_name])
    colorbar = figure.colorbar(mappable, ax=ax, fraction=0.025, pad=0.015)
    colorbar.set_label(label, fontsize=8)
    colorbar.ax.tick_params(labelsize=7)


def plot_reconstructions(
    frames: torch.Tensor, predictions: torch.Tensor, captions: list[str], path: Path, *, title_suffix: str = ""
) -> Path:
    """Columns = held-out pairs; rows: frame t, true t+H, predicted t+H (clamped), |copy error| = |x_{t+H} - x_t|
    and |prediction error|, both averaged over RGB on one shared colour scale; the PSNR of both above each column.

    frames (K, 2, 3, H, W) in [0, 1]; predictions (K, 3, H, W); captions: K strings."""
    predictions = predictions.float().clamp(0, 1)
    copy_error = (frames[:, 1] - frames[:, 0]).abs().mean(dim=1).numpy()
    prediction_error = (frames[:, 1] - predictions).abs().mean(dim=1).numpy()
    vmax = max(float(np.quantile(np.concatenate([copy_error.ravel(), prediction_error.ravel()]), 0.995)), 0.05)
    count = frames.shape[0]
    tiles = [
        [_image(frames[k, 0]) for k in range(count)],
        [_image(frames[k, 1]) for k in range(count)],
        [_image(predictions[k]) for k in range(count)],
        [_colormapped(copy_error[k], "magma", 0, vmax) for k in range(count)],
        [_colormapped(prediction_error[k], "magma", 0, vmax) for k in range(count)],
    ]
    labels = []
    for k in range(count):
        mse_copy = float((frames[k, 1] - frames[k, 0]).square().mean())
        mse_prediction = float((frames[k, 1] - predictions[k]).square().mean())
        labels.append(f"{captions[k]}\ncopy {psnr(mse_copy):.1f} dB\npredicted {psnr(mse_prediction):.1f} dB")
    size = frames.shape[-2:]
    canvas, tops, lefts = _mosaic(tiles, gap=max(1, size[0] // 16))
    figure = _new_figure(1.75 * count + 2.2, 1.75 * 5 + 1.4)
    ax = figure.add_subplot(1, 1, 1)
    _mosaic_axes(ax, canvas, tops, lefts, size, column_labels=labels,
                 row_labels=["frame t", "true t+H", "predicted t+H", "|copy error|", "|prediction error|"])
    _colorbar(figure, ax, "magma", 0, vmax, "error rows: mean |error| over RGB")
    figure.suptitle(f"Held-out reconstructions (PSNR per pair, peak 1){title_suffix}")
    figure.savefig(path, bbox_inches="tight")
    return path


@torch.no_grad()
def latent_explorer_images(
    model, frame_t: torch.Tensor, own_codes: torch.Tensor, max_codes: int = 16, max_slots: int = MAX_PLOTTED_SLOTS
) -> torch.Tensor:
    """Frame t decoded under every code of every slot, the other slots kept at the frame's own codes.

    Args:
        frame_t: (3, H, W) in [0, 1]; own_codes: (s,) the pair's latent action.
    Returns:
        (S, K, 3, H, W) decoded frames for the first S = min(s, max_slots) slots and K = min(|C|, max_codes) codes:
        entry [slot, c] uses code c in `slot`.
    """
    code_seq_len = model.config.code_seq_len
    num_slots = min(code_seq_len, max_slots)
    num_codes = min(model.config.codebook_size, max_codes)
    device = next(model.parameters()).device
    codes = own_codes.to(device).reshape(1, 1, code_seq_len).repeat(num_slots, num_codes, 1)
    for slot in range(num_slots):
        codes[slot, :, slot] = torch.arange(num_codes, device=device)
    frames = frame_t.to(device, next(model.parameters()).dtype).unsqueeze(0).expand(num_slots * num_codes, -1, -1, -1)
    decoded = model.decode(frames.contiguous(), codes.reshape(-1, code_seq_len))
    return decoded.float().reshape(num_slots, num_codes, *decoded.shape[1:])


def plot_latent_explorer(
    model, pair: torch.Tensor, own_codes: torch.Tensor, own_prediction: torch.Tensor, path: Path, *,
    caption: str = "", title_suffix: str = "",
) -> Path:
    """The paper's Figures 5 and 12: one held-out frame decoded under every code of each slot (the other slots at
    the frame's own codes).

    Top: frame t, true t+H, the decoding with the pair's own latent action, the true change (t+H - t) and the
    predicted change (decoding - t). Below, per slot: the decoded frames (the pair's own code framed in red), then
    how each differs from the decoding under the pair's own latent action (mean over RGB, signed: red = brighter,
    blue = darker). That difference shows what choosing the code does; the decoder's blur, common to all codes,
    cancels out of it.

    pair (2, 3, H, W) in [0, 1]; own_codes (s,); own_prediction (3, H, W)."""
    from matplotlib.patches import Rectangle

    decoded = latent_explorer_images(model, pair[0], own_codes).cpu().clamp(0, 1)
    num_slots, num_codes = decoded.shape[:2]
    frame_t, frame_next = pair[0].float().cpu(), pair[1].float().cpu()
    own_prediction = own_prediction.float().cpu().clamp(0, 1)
    versus_own = (decoded - own_prediction).mean(dim=2).numpy()  # (S, K, H, W)
    true_change = (frame_next - frame_t).mean(dim=0).numpy()
    predicted_change = (own_prediction - frame_t).mean(dim=0).numpy()
    header_limit = max(float(np.abs(true_change).max()), float(np.abs(predicted_change).max()), 0.05)
    limit = max(float(np.quantile(np.abs(versus_own), 0.999)), 0.02)
    size = frame_t.shape[-2:]
    gap = max(1, size[0] // 10)

    header, header_tops, header_lefts = _mosaic([[
        _image(frame_t), _image(frame_next), _image(own_prediction),
        _colormapped(true_change, "RdBu_r", -header_limit, header_limit),
        _colormapped(predicted_change, "RdBu_r", -header_limit, header_limit),
    ]], gap)
    tiles = []
    for slot in range(num_slots):
        tiles.append([_image(decoded[slot, code]) for code in range(num_codes)])
        tiles.append([_colormapped(versus_own[slot, code], "RdBu_r", -limit, limit) for code in range(num_codes)])
    canvas, tops, lefts = _mosaic(tiles, gap)

    columns = max(num_codes, 5)
    figure = _new_figure(1.2 * columns + 2.4, 1.2 * (2 * num_slots + 1) + 2.2)
    grid = figure.add_gridspec(2, 1, height_ratios=[1.35, 2 * num_slots], hspace=0.12)
    ax_header = figure.add_subplot(grid[0])
    _mosaic_axes(ax_header, header, header_tops, header_lefts, size, column_labels=[
        "frame t", "true t+H", f"decoded, own\n{own_codes.tolist()}",
        f"true change\n(+-{header_limit:.2f})", f"predicted change\n(+-{header_limit:.2f})",
    ])
    ax = figure.add_subplot(grid[1])
    # The largest difference a slot's codes make, in the label: a slot whose codes change nothing is visible at once.
    row_labels = [
        label for slot in range(num_slots)
        for label in (f"slot {slot}", f"slot {slot} vs own\nmax |diff| {np.abs(versus_own[slot]).max():.3f}")
    ]
    _mosaic_axes(ax, canvas, tops, lefts, size, row_labels=row_labels,
                 column_labels=[f"code {code}" for code in range(num_codes)])
    for slot in range(num_slots):
        own = int(own_codes[slot])
        if own < num_codes:  # frame the pair's own code in both rows of the slot
            ax.add_patch(Rectangle(
                (lefts[own] - gap / 2 - 0.5, tops[2 * slot] - gap / 2 - 0.5), size[1] + gap, 2 * size[0] + 2 * gap,
                fill=False, edgecolor="tab:red", linewidth=2.0,
            ))
    _colorbar(figure, ax, "RdBu_r", -limit, limit, "'vs own' rows: decoded - decoded with own codes (mean over RGB)")
    shown = []
    if num_codes < model.config.codebook_size:
        shown.append(f"first {num_codes} of {model.config.codebook_size} codes")
    if num_slots < model.config.code_seq_len:
        shown.append(f"first {num_slots} of {model.config.code_seq_len} slots")
    more = f" ({', '.join(shown)})" if shown else ""
    figure.suptitle(
        f"Latent explorer: one frame decoded under every code of each slot{more}, the other slots at the pair's own "
        f"codes (red frame)\n{caption}{title_suffix}", fontsize=10,
    )
    figure.savefig(path, bbox_inches="tight")
    return path


@torch.no_grad()
def _make_plots(model, eval_pairs, encoded: EncodedPairs, codebook: dict, targets, probes: dict, output_dir: Path,
                step, seed: int) -> dict[str, str]:
    output_dir.mkdir(parents=True, exist_ok=True)
    suffix = f", step {step}" if step is not None else ""
    paths = {"codebook_usage": plot_codebook_usage(codebook, output_dir / "codebook_usage.png", title_suffix=suffix)}
    if targets is not None:
        names = probes.get("action_names") or action_names(eval_pairs, targets.shape[1])
        dims = probes.get("position_dims")
        if dims is None:
            dims = default_position_dims(names) or list(range(min(3, len(names))))
        label = "window-mean action" if probes.get("action_target") == "window_mean" else "action at t"
        paths["action_scatter"] = plot_action_scatter(
            targets, encoded.codes, names, dims, model.config.codebook_size, output_dir / "action_scatter.png",
            target_label=label, title_suffix=suffix,
        )
    # Re-read the few displayed pairs instead of keeping every pair's pixels through the pass.
    rows = _pick_display_pairs(encoded, min(6, len(encoded)), seed)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    frames = torch.stack(
        [_as_unit_float(eval_pairs[int(encoded.dataset_index[r])]["pixel_values"]) for r in rows]
    ).float()
    own_codes = torch.as_tensor(encoded.codes[rows])
    predictions = model.decode(frames[:, 0].to(device, dtype), own_codes.to(device)).float().cpu()
    captions = [
        f"ep {encoded.episode_index[r]}, t={encoded.frame_index[r]}\n{own_codes[i].tolist()}"
        for i, r in enumerate(rows)
    ]
    paths["reconstructions"] = plot_reconstructions(frames, predictions, captions, output_dir / "reconstructions.png",
                                                    title_suffix=suffix)
    r = rows[0]
    paths["latent_explorer"] = plot_latent_explorer(
        model, frames[0], own_codes[0], predictions[0], output_dir / "latent_explorer.png",
        caption=f"episode {encoded.episode_index[r]}, frame {encoded.frame_index[r]}", title_suffix=suffix,
    )
    return {name: str(path) for name, path in paths.items()}


# ============================================================================================== the entry point
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
    if make_plots and output_dir is None:
        logger.info("evaluate_quantizer: make_plots=True but no output_dir; no plots are written")
    output_dir = Path(output_dir) if output_dir is not None else None

    was_training = model.training
    model.eval()
    try:
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
        reconstruction = reconstruction_metrics(encoded)
        codebook = codebook_metrics(encoded.codes, config.codebook_size)
        probes = _probe_section(model, eval_pairs, encoded, probe_train_pairs, probe_encoded, action_target,
                                position_dims, seed)
        plots: dict[str, str] = {}
        if make_plots and output_dir is not None:
            targets = action_targets(eval_pairs, encoded, action_target)
            plots = _make_plots(model, eval_pairs, encoded, codebook, targets, probes, output_dir, step, seed)
    finally:
        model.train(was_training)

    beats = probes.get("latent_probe_beats_leakage") if probes.get("available") else None
    summary = {
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
    result = {
        "step": step,
        "num_pairs": int(len(encoded)),
        "num_episodes": int(len(np.unique(encoded.episode_index))),
        "num_probe_train_pairs": int(len(probe_encoded)) if probe_encoded is not None else 0,
        "image_size": int(config.image_size),
        "summary": summary,
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


def scalar_metrics(result: dict, prefix: str = "eval") -> dict[str, float]:
    """The numbers and booleans of an `evaluate_quantizer` result flattened to {"eval/section/name": float}, for
    `accelerator.log` or TensorBoard (lists, strings and nulls are left out; the per-dimension probe dicts are
    kept, e.g. "eval/probes/r2/latents/linear/delta_x")."""
    flat: dict[str, float] = {}

    def visit(value, key):
        if isinstance(value, bool):
            flat[key] = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                flat[key] = float(value)
        elif isinstance(value, dict):
            for name, inner in value.items():
                visit(inner, f"{key}/{name}")

    for section, value in result.items():
        if section not in ("plots",):
            visit(value, f"{prefix}/{section}")
    return flat


__all__ = [
    "EncodedPairs",
    "MIN_CODE_FRACTION",
    "MLPProbe",
    "RidgeProbe",
    "codebook_metrics",
    "encode_pairs",
    "evaluate_quantizer",
    "latent_explorer_images",
    "psnr",
    "r2_per_dimension",
    "reconstruction_metrics",
    "run_probes",
    "scalar_metrics",
    "window_mean_actions",
]
