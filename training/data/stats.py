"""Feature statistics in LeRobot's layout: min, max, mean, std, count and the quantiles q01, q10, q50, q90, q99.

Vector features (state, action, timestamps, ...) get one value per dimension, shape (D,). Camera features
get one value per RGB channel in [0, 1], shape (3, 1, 1), computed on up to 100 evenly spaced frames of an
episode (LeRobot samples frames the same way; stats of images are for normalisation, not for exactness).

`RunningFeatureStats` builds dataset statistics episode by episode, so that a writer never holds the whole
dataset: min, max, mean, std and count are exact (Chan's parallel update); the quantiles come from a uniform
reservoir sample of rows, exact as long as the dataset has no more rows than the reservoir holds.
"""

from __future__ import annotations

import numpy as np

QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)


def quantile_key(q: float) -> str:
    """0.01 -> "q01", 0.5 -> "q50" (LeRobot's names)."""
    return f"q{int(round(q * 100)):02d}"


QUANTILE_KEYS = tuple(quantile_key(q) for q in QUANTILES)
STAT_KEYS = ("min", "max", "mean", "std", "count", *QUANTILE_KEYS)


def _as_rows(values: np.ndarray) -> np.ndarray:
    """(N,) -> (N, 1); (N, D) stays; float64 for accurate sums."""
    values = np.asarray(values)
    if values.ndim == 1:
        values = values[:, None]
    return values.reshape(len(values), -1).astype(np.float64)


def compute_vector_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Exact statistics of rows (N,) or (N, D); every stat has shape (D,) ((1,) for scalars), count (1,)."""
    rows = _as_rows(values)
    stats = {
        "min": rows.min(axis=0),
        "max": rows.max(axis=0),
        "mean": rows.mean(axis=0),
        "std": rows.std(axis=0),
        "count": np.array([len(rows)]),
    }
    quantiles = np.quantile(rows, QUANTILES, axis=0)
    for key, value in zip(QUANTILE_KEYS, quantiles):
        stats[key] = value
    return stats


def sample_frame_indices(num_frames: int, max_frames: int = 100) -> np.ndarray:
    """Up to `max_frames` evenly spaced frame indices (LeRobot's sampling of episode images for stats)."""
    count = min(num_frames, max_frames)
    return np.unique(np.round(np.linspace(0, num_frames - 1, count)).astype(int))


def image_pixels_for_stats(frames: np.ndarray, *, max_frames: int = 100, max_side: int = 150) -> np.ndarray:
    """Channel values in [0, 1] of sampled, spatially strided frames: (num_pixels, 3) float64.

    frames: (T, H, W, 3) uint8. Large frames are strided down to about `max_side` pixels per side, as LeRobot
    does, because per-channel statistics do not need every pixel.
    """
    sampled = frames[sample_frame_indices(len(frames), max_frames)]
    stride = max(1, max(sampled.shape[1], sampled.shape[2]) // max_side)
    sampled = sampled[:, ::stride, ::stride]
    return sampled.reshape(-1, 3).astype(np.float64) / 255.0


def compute_image_stats(frames: np.ndarray, *, max_frames: int = 100) -> dict[str, np.ndarray]:
    """Per-channel statistics of an episode's frames (T, H, W, 3) uint8: stats (3, 1, 1) in [0, 1]."""
    pixels = image_pixels_for_stats(frames, max_frames=max_frames)
    stats = compute_vector_stats(pixels)
    stats = {key: value.reshape(3, 1, 1) for key, value in stats.items() if key != "count"}
    stats["count"] = np.array([len(sample_frame_indices(len(frames), max_frames))])
    return stats


class RunningFeatureStats:
    """Statistics of one feature accumulated over episodes (rows (N, D) at a time).

    Args:
        reservoir_size: rows kept for the quantiles (uniform reservoir sample, Vitter's algorithm R).
        seed: seed of the reservoir sampling, so that written datasets are reproducible.
        image: whether the feature is a camera (stats reshaped to (3, 1, 1)).
    """

    def __init__(self, *, reservoir_size: int = 200_000, seed: int = 0, image: bool = False):
        self.reservoir_size = reservoir_size
        self.image = image
        self._rng = np.random.default_rng(seed)
        self._count = 0  # rows seen (for images: pixels seen)
        self._frames = 0  # for images: sampled frames seen, LeRobot's `count`
        self._mean = None
        self._m2 = None  # sum of squared deviations from the mean
        self._min = None
        self._max = None
        self._reservoir = None
        self._reservoir_filled = 0

    def update(self, rows: np.ndarray, *, frames: int | None = None) -> None:
        rows = _as_rows(rows)
        if len(rows) == 0:
            return
        if frames is not None:
            self._frames += frames
        batch_mean = rows.mean(axis=0)
        batch_m2 = ((rows - batch_mean) ** 2).sum(axis=0)
        n_a, n_b = self._count, len(rows)
        if self._mean is None:
            self._mean, self._m2 = batch_mean, batch_m2
            self._min, self._max = rows.min(axis=0), rows.max(axis=0)
            self._reservoir = np.empty((self.reservoir_size, rows.shape[1]), dtype=np.float64)
        else:
            if rows.shape[1] != self._mean.shape[0]:
                raise ValueError(f"expected rows of {self._mean.shape[0]} values, got {rows.shape[1]}")
            delta = batch_mean - self._mean
            total = n_a + n_b
            self._mean = self._mean + delta * (n_b / total)
            self._m2 = self._m2 + batch_m2 + delta**2 * (n_a * n_b / total)
            self._min = np.minimum(self._min, rows.min(axis=0))
            self._max = np.maximum(self._max, rows.max(axis=0))
        self._count = n_a + n_b
        self._add_to_reservoir(rows, first_index=n_a)

    def _add_to_reservoir(self, rows: np.ndarray, *, first_index: int) -> None:
        free = self.reservoir_size - self._reservoir_filled
        taken = min(free, len(rows))
        if taken:
            self._reservoir[self._reservoir_filled : self._reservoir_filled + taken] = rows[:taken]
            self._reservoir_filled += taken
        rest = rows[taken:]
        if len(rest):
            # Row number n (0-based) replaces a random slot with probability reservoir_size / (n + 1).
            numbers = np.arange(first_index + taken, first_index + taken + len(rest))
            slots = self._rng.integers(0, numbers + 1)
            keep = slots < self.reservoir_size
            # Fancy assignment keeps the last write for a repeated slot: the sequential algorithm's result.
            self._reservoir[slots[keep]] = rest[keep]

    def get(self) -> dict[str, np.ndarray]:
        if self._mean is None:
            raise ValueError("no rows were added")
        stats = {
            "min": self._min.copy(),
            "max": self._max.copy(),
            "mean": self._mean.copy(),
            "std": np.sqrt(np.maximum(self._m2 / self._count, 0.0)),
        }
        quantiles = np.quantile(self._reservoir[: self._reservoir_filled], QUANTILES, axis=0)
        for key, value in zip(QUANTILE_KEYS, quantiles):
            stats[key] = value
        if self.image:
            stats = {key: value.reshape(3, 1, 1) for key, value in stats.items()}
            stats["count"] = np.array([self._frames])
        else:
            stats["count"] = np.array([self._count])
        return {key: stats[key] for key in STAT_KEYS}


def stats_to_json(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, list]]:
    """{feature: {stat: array}} -> nested lists for `meta/stats.json`."""
    return {feature: {key: np.asarray(value).tolist() for key, value in per.items()} for feature, per in stats.items()}


def stats_from_json(data: dict) -> dict[str, dict[str, np.ndarray]]:
    """`meta/stats.json` -> {feature: {stat: np.ndarray}}."""
    return {feature: {key: np.asarray(value) for key, value in per.items()} for feature, per in data.items()}


def aggregate_stats(per_episode: list[dict[str, dict[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """Combines per-episode statistics (v2.1's `episodes_stats.jsonl`) into dataset statistics.

    min, max, mean, std are exact (count-weighted); quantiles are the count-weighted mean of the episodes'
    quantiles, an approximation (the per-episode rows are not available).
    """
    features = sorted({feature for stats in per_episode for feature in stats})
    result = {}
    for feature in features:
        items = [stats[feature] for stats in per_episode if feature in stats]
        counts = np.array([float(np.asarray(s["count"]).reshape(-1)[0]) for s in items])
        weights = counts / counts.sum()

        def weighted(key, items=items, weights=weights):
            return sum(w * np.asarray(s[key], dtype=np.float64) for w, s in zip(weights, items))

        mean = weighted("mean")
        second_moment = sum(
            w * (np.asarray(s["std"], dtype=np.float64) ** 2 + np.asarray(s["mean"], dtype=np.float64) ** 2)
            for w, s in zip(weights, items)
        )
        out = {
            "min": np.min(np.stack([np.asarray(s["min"]) for s in items]), axis=0),
            "max": np.max(np.stack([np.asarray(s["max"]) for s in items]), axis=0),
            "mean": mean,
            "std": np.sqrt(np.maximum(second_moment - mean**2, 0.0)),
            "count": np.array([int(counts.sum())]),
        }
        for key in QUANTILE_KEYS:
            if all(key in s for s in items):
                out[key] = weighted(key)
        result[feature] = out
    return result
