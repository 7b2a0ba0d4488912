"""Held-out metrics of the latent action quantizer (next-frame prediction, codebook health), and the one flattener
of nested metric dicts into tracker scalars that every training script logs with.

    reconstruction_metrics(encoded)            # MSE and PSNR against frame t+H, beside the copy-frame-t baseline
    codebook_metrics(encoded.codes, 8)         # usage per slot and code, perplexities, distinct latent actions
    accelerator.log(scalar_metrics(result, "eval"), step=step)   # {"eval/reconstruction/copy_mse": 0.01, ...}

The definitions (clamping, the two PSNRs, the 2% usage floor) are in `training/eval/quantizer.py`'s docstring.
"""

from __future__ import annotations

import math

import numpy as np

from .encoding import EncodedPairs

#: A code used by fewer than this fraction of held-out pairs (in its slot) counts as unused.
MIN_CODE_FRACTION = 0.02
#: Per-pair MSE floor for PSNR: identical frames would otherwise give an infinite PSNR (cap: 100 dB).
PSNR_MSE_FLOOR = 1e-10


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


def perplexity(fractions: np.ndarray) -> float:
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
        "perplexity_per_slot": [perplexity(row) for row in usage],
        "perplexity": perplexity(pooled),
        "max_perplexity": float(codebook_size),
        "codes_used_per_slot": [int((row > 0).sum()) for row in usage],
        "num_distinct_latent_actions": int(len(tuples)),
        "num_possible_latent_actions": int(possible),
        "distinct_latent_action_share": float(len(tuples) / possible),
        "latent_action_perplexity": perplexity(tuple_counts / num_pairs),
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



# ============================================================================================ tracker scalars
def scalar_metrics(tree: dict, prefix: str = "eval") -> dict[str, float]:
    """The numbers and booleans of a nested metrics dict flattened to {"prefix/section/name": float}, for
    `accelerator.log` or TensorBoard.

    The rule, one for every caller (the quantizer's evaluation and training, the VLA's evaluation):

    - a bool becomes 0.0 or 1.0 (checked first: a bool is an int in Python);
    - an int or float becomes a float if it is finite; NaN and +-inf are left out (trackers either reject them or
      draw a hole, and the JSON keeps them as null);
    - a dict is walked, its keys joined with "/" (e.g. "eval/probes/r2/latents/linear/delta_x");
    - everything else (lists, strings such as the plots' paths, None) is left out.

    `prefix=""` gives keys without a prefix. tree: {str: value}; returns {str: float}.
    """
    flat: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, bool):
            flat[name] = float(value)
        elif isinstance(value, (int, float)):
            if math.isfinite(value):
                flat[name] = float(value)
        elif isinstance(value, dict):
            flat.update(scalar_metrics(value, name))
    return flat


__all__ = [
    "MIN_CODE_FRACTION",
    "PSNR_MSE_FLOOR",
    "codebook_metrics",
    "perplexity",
    "psnr",
    "reconstruction_metrics",
    "scalar_metrics",
]
