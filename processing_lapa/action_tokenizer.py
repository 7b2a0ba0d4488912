"""Robot actions <-> discrete bins: the action vocabulary of LAPA's finetuning stage.

Each action dimension gets its own equal-frequency (quantile) bins fitted on the finetuning data, so that every
bin holds about the same number of training samples (the paper follows RT-2 and OpenVLA here). A bin decodes to
the midpoint of its two edges. Binary gripper dimensions are special: they use only the two end bins (closed /
open) and decode to the dataset's own low and high gripper values.

Statistics are stored per dataset name, because one processor may serve several robots whose actions live on
different scales. Everything is plain JSON (`action_tokenizer.json`), saved next to the processor's other files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np

ACTION_TOKENIZER_NAME = "action_tokenizer.json"
# Bumped when the meaning of the stored statistics changes, so that old files fail loudly instead of decoding wrong.
FORMAT_VERSION = 1


class ActionTokenizer:
    r"""Per-dimension quantile binning of continuous robot actions, with optional binary gripper dimensions.

    Args:
        num_bins (`int`, defaults to 256): number N of bins per dimension; bins are numbered 0 ... N-1.
        statistics (`dict[str, dict]`, *optional*): already fitted statistics keyed by dataset name, as found under
            `"datasets"` in [`~ActionTokenizer.to_dict`]. Normally left empty and filled by [`~ActionTokenizer.fit`].

    Example:

        >>> tokenizer = ActionTokenizer(num_bins=256)
        >>> tokenizer.fit(actions, dataset="metaworld", gripper_dims=[3])   # actions: (T, 4)
        >>> bins = tokenizer.encode(actions[:8])                             # (8, 4) int64 in [0, 256)
        >>> tokenizer.decode(bins)                                           # (8, 4) float32
    """

    def __init__(self, num_bins: int = 256, statistics: dict[str, dict] | None = None):
        if not isinstance(num_bins, (int, np.integer)) or isinstance(num_bins, bool) or num_bins < 2:
            raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}")
        self.num_bins = int(num_bins)
        self._statistics: dict[str, dict] = {}
        for name, stats in (statistics or {}).items():
            self._statistics[name] = self._validated_statistics(name, stats)

    # ------------------------------------------------------------------------------------------------------------
    # Fitting
    # ------------------------------------------------------------------------------------------------------------
    def fit(
        self,
        actions,
        dataset: str,
        gripper_dims: Iterable[int] | None = None,
        gripper_threshold: float = 0.0,
    ) -> ActionTokenizer:
        r"""Fit (or refit) the bins of one dataset.

        Args:
            actions (`np.ndarray` of shape `(T, D)`): the dataset's actions, one row per time step. Finite values only.
            dataset (`str`): name under which the statistics are stored; an existing entry is overwritten.
            gripper_dims (`list[int]`, *optional*): dimensions holding a binary gripper command. A value
                `<= gripper_threshold` becomes bin 0, a larger value bin N-1; they decode to the smallest and the
                largest value of that dimension in `actions`.
            gripper_threshold (`float`, defaults to 0.0): see `gripper_dims`.

        Returns:
            `ActionTokenizer`: `self`, so that calls can be chained.
        """
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"dataset must be a non-empty string naming the data, got {dataset!r}")
        actions = _as_float_array(actions, "actions")
        if actions.ndim != 2:
            raise ValueError(f"actions to fit must have shape (T, D), got shape {tuple(actions.shape)}")
        num_steps, action_dim = actions.shape
        if num_steps == 0 or action_dim == 0:
            raise ValueError(f"actions to fit are empty (shape {tuple(actions.shape)})")
        if not np.all(np.isfinite(actions)):
            bad = np.argwhere(~np.isfinite(actions))[0]
            raise ValueError(
                f"actions to fit contain NaN or infinite values (first at row {bad[0]}, dimension {bad[1]}); "
                "clean the data before fitting the action tokenizer"
            )
        gripper_dims = sorted({int(d) for d in (gripper_dims or [])})
        for dim in gripper_dims:
            if not 0 <= dim < action_dim:
                raise ValueError(f"gripper dimension {dim} is out of range for actions with {action_dim} dimensions")
        if not np.isfinite(gripper_threshold):
            raise ValueError(f"gripper_threshold must be finite, got {gripper_threshold}")

        # Quantiles at N+1 evenly spaced probabilities put about T/N samples between consecutive edges. Repeated values
        # make some edges equal (empty, zero-width bins); `maximum.accumulate` guards against the last-ulp
        # non-monotonicity that linear interpolation between sorted samples can produce.
        probabilities = np.linspace(0.0, 1.0, self.num_bins + 1)
        edges = np.quantile(actions, probabilities, axis=0).T  # (D, N+1)
        edges = np.maximum.accumulate(edges, axis=1)

        stats = {
            "action_dim": action_dim,
            "num_samples": num_steps,
            "bin_edges": [None if d in gripper_dims else edges[d].tolist() for d in range(action_dim)],
            "gripper_dims": gripper_dims,
            "gripper_threshold": float(gripper_threshold),
            "gripper_low": [float(actions[:, d].min()) for d in gripper_dims],
            "gripper_high": [float(actions[:, d].max()) for d in gripper_dims],
            # Normalisation statistics: not used for binning, kept because model cards and other policies want them.
            "mean": actions.mean(axis=0).tolist(),
            "std": actions.std(axis=0).tolist(),
            "min": actions.min(axis=0).tolist(),
            "max": actions.max(axis=0).tolist(),
            "q01": np.quantile(actions, 0.01, axis=0).tolist(),
            "q99": np.quantile(actions, 0.99, axis=0).tolist(),
        }
        self._statistics[dataset] = self._validated_statistics(dataset, stats)
        return self

    # ------------------------------------------------------------------------------------------------------------
    # Look-ups
    # ------------------------------------------------------------------------------------------------------------
    @property
    def datasets(self) -> list[str]:
        """Names of the fitted datasets, in fitting order."""
        return list(self._statistics)

    def resolve_dataset(self, dataset: str | None = None) -> str:
        """The dataset name to use: `dataset` itself if fitted, else the only fitted one when `dataset` is None."""
        if not self._statistics:
            raise ValueError("the action tokenizer has no statistics yet: fit the action tokenizer first")
        choices = ", ".join(repr(name) for name in self._statistics)
        if dataset is None:
            if len(self._statistics) > 1:
                raise ValueError(
                    f"the action tokenizer holds statistics of several datasets ({choices}); pass dataset=... to "
                    "choose one"
                )
            return next(iter(self._statistics))
        if dataset not in self._statistics:
            raise KeyError(f"unknown dataset {dataset!r} for the action tokenizer; fitted datasets: {choices}")
        return dataset

    def statistics(self, dataset: str | None = None) -> dict:
        """A copy of one dataset's statistics (bin edges, gripper settings, mean/std/min/max/q01/q99 per dimension)."""
        return json.loads(json.dumps(self._statistics[self.resolve_dataset(dataset)]))

    def action_dim(self, dataset: str | None = None) -> int:
        """Number D of action dimensions of a dataset."""
        return self._statistics[self.resolve_dataset(dataset)]["action_dim"]

    def bin_edges(self, dataset: str | None = None) -> np.ndarray:
        r"""Bin edges of a dataset.

        Returns:
            `np.ndarray` of shape `(D, N+1)`, float64, non-decreasing along the last axis; rows of gripper
            dimensions are NaN (they have no edges).
        """
        stats = self._statistics[self.resolve_dataset(dataset)]
        edges = np.full((stats["action_dim"], self.num_bins + 1), np.nan)
        for dim, row in enumerate(stats["bin_edges"]):
            if row is not None:
                edges[dim] = row
        return edges

    def bin_widths(self, dataset: str | None = None) -> np.ndarray:
        """Width of every bin, shape `(D, N)` (NaN on gripper dimensions); a decoded value lies within half the
        width of its bin from any value that encodes to that bin."""
        return np.diff(self.bin_edges(dataset), axis=1)

    # ------------------------------------------------------------------------------------------------------------
    # Encoding and decoding
    # ------------------------------------------------------------------------------------------------------------
    def encode(self, actions, dataset: str | None = None) -> np.ndarray:
        r"""Map actions to bin indices.

        Args:
            actions (`np.ndarray` of shape `(..., D)`): continuous actions; values outside the fitted range go to the
                end bins.
            dataset (`str`, *optional*): whose statistics to use; may be omitted when only one dataset is fitted.

        Returns:
            `np.ndarray` of shape `(..., D)`, int64, values in `[0, N)`.
        """
        name = self.resolve_dataset(dataset)
        stats = self._statistics[name]
        actions = _as_float_array(actions, "actions")
        self._check_last_axis(actions, stats["action_dim"], name, "actions")
        if not np.all(np.isfinite(actions)):
            raise ValueError("actions to encode contain NaN or infinite values")

        flat = actions.reshape(-1, stats["action_dim"])
        bins = np.empty(flat.shape, dtype=np.int64)
        grippers = dict(zip(stats["gripper_dims"], range(len(stats["gripper_dims"]))))
        for dim in range(stats["action_dim"]):
            values = flat[:, dim]
            if dim in grippers:
                bins[:, dim] = np.where(values <= stats["gripper_threshold"], 0, self.num_bins - 1)
            else:
                bins[:, dim] = self._encode_dimension(values, np.asarray(stats["bin_edges"][dim]))
        return bins.reshape(actions.shape)

    def _encode_dimension(self, values: np.ndarray, edges: np.ndarray) -> np.ndarray:
        """Bins of one dimension; `edges` (N+1,) non-decreasing."""
        values = np.clip(values, edges[0], edges[-1])
        # edges[left:right] are the edges equal to the value. None equal: the value lies inside bin right-1. One equal:
        # it sits on a boundary and takes the bin to its right (half-open [lo, hi) bins; the last bin also holds its
        # upper edge). Several equal (a value repeated in more than about 1/N of the data): bins left ... right-2 are
        # zero-width [v, v] and the middle one decodes to v exactly.
        left = np.searchsorted(edges, values, side="left")
        right = np.searchsorted(edges, values, side="right")
        bins = np.where(right - left >= 2, (left + right - 2) // 2, right - 1)
        return np.clip(bins, 0, self.num_bins - 1).astype(np.int64)

    def decode(self, bins, dataset: str | None = None) -> np.ndarray:
        r"""Map bin indices back to actions (bin midpoints; gripper bins to the dataset's low/high value).

        Args:
            bins (`np.ndarray` of shape `(..., D)`): integer bin indices in `[0, N)`.
            dataset (`str`, *optional*): whose statistics to use; may be omitted when only one dataset is fitted.

        Returns:
            `np.ndarray` of shape `(..., D)`, float32.
        """
        name = self.resolve_dataset(dataset)
        stats = self._statistics[name]
        bins = np.asarray(bins.detach().cpu().numpy() if hasattr(bins, "detach") else bins)
        if not (np.issubdtype(bins.dtype, np.integer) or bins.dtype == bool) and bins.size:
            raise ValueError(f"bins to decode must be integers, got dtype {bins.dtype}")
        bins = bins.astype(np.int64)
        self._check_last_axis(bins, stats["action_dim"], name, "bins")
        if bins.size and (bins.min() < 0 or bins.max() >= self.num_bins):
            raise ValueError(
                f"bins to decode must lie in [0, {self.num_bins}), got values from {bins.min()} to {bins.max()}"
            )

        flat = bins.reshape(-1, stats["action_dim"])
        actions = np.empty(flat.shape, dtype=np.float64)
        grippers = {dim: i for i, dim in enumerate(stats["gripper_dims"])}
        for dim in range(stats["action_dim"]):
            if dim in grippers:
                i = grippers[dim]
                # Any bin in the upper half counts as "open": at an action position the model may emit any bin id.
                actions[:, dim] = np.where(
                    flat[:, dim] >= self.num_bins // 2, stats["gripper_high"][i], stats["gripper_low"][i]
                )
            else:
                edges = np.asarray(stats["bin_edges"][dim])
                midpoints = 0.5 * (edges[:-1] + edges[1:])
                actions[:, dim] = midpoints[flat[:, dim]]
        return actions.reshape(bins.shape).astype(np.float32)

    # ------------------------------------------------------------------------------------------------------------
    # Serialisation
    # ------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-safe dictionary: `{"format_version", "num_bins", "datasets": {name: statistics}}`."""
        return {
            "format_version": FORMAT_VERSION,
            "num_bins": self.num_bins,
            "datasets": json.loads(json.dumps(self._statistics)),
        }

    @classmethod
    def from_dict(cls, data: dict) -> ActionTokenizer:
        """Inverse of [`~ActionTokenizer.to_dict`]."""
        if not isinstance(data, dict) or "num_bins" not in data:
            raise ValueError("not an action tokenizer dictionary (no 'num_bins' key)")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"action tokenizer format version {version} is not supported (expected {FORMAT_VERSION})")
        return cls(num_bins=data["num_bins"], statistics=data.get("datasets", {}))

    def save(self, path: str | os.PathLike) -> str:
        """Write the JSON file; `path` is a file path or an existing directory (then `action_tokenizer.json` in it).

        Returns:
            `str`: the path of the written file.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, ACTION_TOKENIZER_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ActionTokenizer:
        """Read a file written by [`~ActionTokenizer.save`] (a file, or a directory holding `action_tokenizer.json`)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, ACTION_TOKENIZER_NAME)
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def __eq__(self, other) -> bool:
        return isinstance(other, ActionTokenizer) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        described = ", ".join(f"{name}: D={stats['action_dim']}" for name, stats in self._statistics.items())
        return f"ActionTokenizer(num_bins={self.num_bins}, datasets={{{described}}})"

    # ------------------------------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------------------------------
    def _validated_statistics(self, name: str, stats: dict) -> dict:
        """Check a statistics entry (fresh from `fit` or read from a file) so that later look-ups cannot fail oddly."""
        required = ("action_dim", "bin_edges", "gripper_dims", "gripper_threshold", "gripper_low", "gripper_high")
        missing = [key for key in required if key not in stats]
        if missing:
            raise ValueError(f"statistics of dataset {name!r} lack {missing}")
        action_dim = stats["action_dim"]
        if len(stats["bin_edges"]) != action_dim:
            raise ValueError(f"dataset {name!r}: {len(stats['bin_edges'])} edge rows for {action_dim} dimensions")
        grippers = stats["gripper_dims"]
        if not (len(grippers) == len(stats["gripper_low"]) == len(stats["gripper_high"])):
            raise ValueError(f"dataset {name!r}: gripper dims, lows and highs differ in length")
        for dim, row in enumerate(stats["bin_edges"]):
            if dim in grippers:
                continue
            row = np.asarray(row, dtype=np.float64)
            if row.shape != (self.num_bins + 1,):
                raise ValueError(
                    f"dataset {name!r}, dimension {dim}: {row.size} bin edges, expected {self.num_bins + 1} "
                    f"for num_bins={self.num_bins}"
                )
            if not np.all(np.isfinite(row)) or np.any(np.diff(row) < 0):
                raise ValueError(f"dataset {name!r}, dimension {dim}: bin edges must be finite and non-decreasing")
        return dict(stats)

    @staticmethod
    def _check_last_axis(array: np.ndarray, action_dim: int, name: str, what: str) -> None:
        if array.ndim == 0 or array.shape[-1] != action_dim:
            got = "a scalar" if array.ndim == 0 else f"last axis {array.shape[-1]} (shape {tuple(array.shape)})"
            raise ValueError(
                f"{what} have the wrong action dimension: dataset {name!r} has {action_dim} dimensions, got {got}"
            )


def _as_float_array(values, what: str) -> np.ndarray:
    """numpy float64 view of an array-like or tensor, with a clear error for things that are not numbers."""
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a numeric array, got {type(values).__name__}: {err}") from None
    return array
