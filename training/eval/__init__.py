"""Held-out evaluation of the LAPA models, one module per concern.

    from training.eval import evaluate_quantizer, evaluate_vla, scalar_metrics, wilson_interval

- `quantizer`: `evaluate_quantizer`, the latent action quantizer's evaluation (its definitions are in that module's
  docstring), composed of `encoding` (one pass of the model over frame pairs), `metrics` (next-frame prediction,
  codebook usage), `actions` (the probes' ground-truth targets), `probes` (ridge and MLP action probes against a
  leakage baseline) and `plots`.
- `vla`: `evaluate_vla`, the vision-language-action model's held-out token accuracy against the majority baseline.
- `metrics.scalar_metrics`: the one flattener of nested metric dicts into tracker scalars, used by every script.
- `intervals`: `wilson_interval`, confidence intervals of closed-loop success rates.
"""

from .actions import ACTION_TARGETS, action_names, action_targets, default_position_dims, window_mean_actions
from .encoding import EncodedPairs, choose_rows, collate_pairs, encode_pairs
from .intervals import wilson_interval
from .metrics import MIN_CODE_FRACTION, codebook_metrics, perplexity, psnr, reconstruction_metrics, scalar_metrics
from .plots import (
    latent_explorer_images,
    plot_action_scatter,
    plot_codebook_usage,
    plot_latent_explorer,
    plot_reconstructions,
    write_plots,
)
from .probes import FEATURE_SETS, MLPProbe, RidgeProbe, Standardizer, probe_features, r2_per_dimension, run_probes
from .quantizer import evaluate_quantizer
from .vla import evaluate_vla, majority_accuracy, majority_tokens

__all__ = [
    "ACTION_TARGETS",
    "EncodedPairs",
    "FEATURE_SETS",
    "MIN_CODE_FRACTION",
    "MLPProbe",
    "RidgeProbe",
    "Standardizer",
    "action_names",
    "action_targets",
    "choose_rows",
    "codebook_metrics",
    "collate_pairs",
    "default_position_dims",
    "encode_pairs",
    "evaluate_quantizer",
    "evaluate_vla",
    "latent_explorer_images",
    "majority_accuracy",
    "majority_tokens",
    "perplexity",
    "plot_action_scatter",
    "plot_codebook_usage",
    "plot_latent_explorer",
    "plot_reconstructions",
    "probe_features",
    "psnr",
    "r2_per_dimension",
    "reconstruction_metrics",
    "run_probes",
    "scalar_metrics",
    "wilson_interval",
    "window_mean_actions",
    "write_plots",
]
