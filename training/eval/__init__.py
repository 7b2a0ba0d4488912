"""Held-out evaluation of the LAPA models, one module per concern.

    from training.eval import evaluate_quantizer, evaluate_vla, scalar_metrics, wilson_interval

- `quantizer`: `evaluate_quantizer`, the latent action quantizer's evaluation (its definitions are in that module's
  docstring), composed of `encoding` (one pass of the model over frame pairs), `metrics` (next-frame prediction,
  codebook usage), `actions` (the probes' ground-truth targets), `probes` (ridge and MLP action probes against a
  leakage baseline) and `plots`.
- `vla`: `evaluate_vla`, the vision-language-action model's held-out token accuracy against the majority baseline.
- `metrics.scalar_metrics`: the one flattener of nested metric dicts into tracker scalars, used by every script.
- `intervals`: `wilson_interval`, confidence intervals of closed-loop success rates.
- `closed_loop`: `run_closed_loop`, policies acting in Meta-World (`load_policy`: a VLA, "expert" or "zero"), batched
  over simulator worker processes (`training.envs.sim_workers`); `policy_data`: the camera, image size and initial
  states a VLA was trained on; `eval_report`: eval_info.json (LeRobot's layout), videos and the success chart.
- `world_model`: `imagine`, the VLA's latent actions decoded by the quantizer frame after frame (world-model
  rollouts), `imagine_beside_real` against a real episode, `write_rollout` (GIF/MP4 with the codes drawn).
"""

from .actions import ACTION_TARGETS, action_names, action_targets, default_position_dims, window_mean_actions
from .encoding import EncodedPairs, choose_rows, collate_pairs, encode_pairs
from .closed_loop import (
    EVAL_SEED_BASE,
    ClosedLoopResult,
    EpisodeResult,
    ExpertPolicy,
    VLAPolicy,
    ZeroPolicy,
    evaluation_seeds,
    load_policy,
    run_closed_loop,
)
from .eval_report import build_eval_info, plot_success_per_task, write_videos
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
from .policy_data import (
    check_seed_overlap,
    observation_settings,
    recorded_observation_settings,
    training_episode_seeds,
    training_record,
)
from .vla import evaluate_vla, majority_accuracy, majority_tokens
from .world_model import (
    ImaginedRollout,
    check_world_model,
    imagine,
    imagine_beside_real,
    load_vla,
    render_rollout,
    rollout_psnr,
    write_rollout,
)

__all__ = [
    "ImaginedRollout",
    "check_world_model",
    "imagine",
    "imagine_beside_real",
    "load_vla",
    "render_rollout",
    "rollout_psnr",
    "write_rollout",
    "ACTION_TARGETS",
    "ClosedLoopResult",
    "EVAL_SEED_BASE",
    "EncodedPairs",
    "EpisodeResult",
    "ExpertPolicy",
    "FEATURE_SETS",
    "MIN_CODE_FRACTION",
    "MLPProbe",
    "RidgeProbe",
    "Standardizer",
    "VLAPolicy",
    "ZeroPolicy",
    "build_eval_info",
    "check_seed_overlap",
    "action_names",
    "action_targets",
    "choose_rows",
    "codebook_metrics",
    "collate_pairs",
    "default_position_dims",
    "encode_pairs",
    "evaluate_quantizer",
    "evaluate_vla",
    "evaluation_seeds",
    "latent_explorer_images",
    "load_policy",
    "majority_accuracy",
    "majority_tokens",
    "observation_settings",
    "perplexity",
    "plot_action_scatter",
    "plot_codebook_usage",
    "plot_latent_explorer",
    "plot_reconstructions",
    "plot_success_per_task",
    "probe_features",
    "psnr",
    "r2_per_dimension",
    "reconstruction_metrics",
    "recorded_observation_settings",
    "run_closed_loop",
    "run_probes",
    "scalar_metrics",
    "training_episode_seeds",
    "training_record",
    "wilson_interval",
    "window_mean_actions",
    "write_plots",
    "write_videos",
]

