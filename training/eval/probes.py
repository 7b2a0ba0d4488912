"""Action probes: does the latent action carry the real action, beyond what frame t alone reveals?

    section = probe_section(model, eval_pairs, encoded, probe_train_pairs, probe_encoded, "window_mean", None, seed)
    section["latent_probe_beats_leakage"]   # {"delta_x": True, "delta_y": False, ...}

Per feature set (the pre-quantisation latents, the one-hot codes, and the leakage baseline of frame t's pixels), a
ridge probe and a one-hidden-layer MLP probe map the features to every action dimension; R^2 is measured on
held-out pairs. Both probes are written here rather than taken from scikit-learn: see `docs/hand_written.md`. The
fitting rules (standardising, clipping, penalty choice, early stopping) are in `training/eval/quantizer.py`'s
docstring.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .actions import action_names, action_targets, default_position_dims
from .encoding import LEAKAGE_POOL_SIZE, EncodedPairs

#: Ridge penalties, relative to the number of fitting pairs (lambda = alpha * n).
RIDGE_ALPHAS = tuple(10.0**k for k in range(-4, 3))
#: Standardised probe features are clipped to +-this many standard deviations (see `Standardizer`).
FEATURE_CLIP = 5.0
#: Fraction of held-out episodes used to fit the probes when no training pairs are given.
PROBE_FIT_FRACTION = 0.7
#: Fewest pairs the probes are fitted on and tested on; below that R^2 means nothing and the probes are skipped.
MIN_PROBE_FIT_PAIRS, MIN_PROBE_TEST_PAIRS = 8, 4
FEATURE_SETS = {
    "latents": "pre-quantisation latent actions z, flattened (s * q)",
    "codes_one_hot": "one-hot codes, one block per slot (s * |C|)",
    "frame_t_pixels": f"leakage baseline: RGB of frame t average-pooled to {LEAKAGE_POOL_SIZE}x{LEAKAGE_POOL_SIZE} "
    f"({3 * LEAKAGE_POOL_SIZE**2} features), blind to frame t+H",
}
LATENT_FEATURE_SETS = ("latents", "codes_one_hot")
LEAKAGE_FEATURE_SET = "frame_t_pixels"


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


def probe_section(
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


__all__ = [
    "FEATURE_SETS",
    "MLPProbe",
    "RidgeProbe",
    "Standardizer",
    "probe_features",
    "probe_section",
    "r2_per_dimension",
    "run_probes",
    "validation_split",
]
