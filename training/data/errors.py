"""Errors of the video data layer, and the record of what `skip_corrupt=True` skipped.

Every error names the file and, where there is one, the episode, so that a bad input in a dataset of
thousands of episodes can be found without a debugger. With `skip_corrupt=True` the readers do not raise
these errors for a bad episode: they leave the episode out, add a `SkippedEpisode` to their `skipped` list
and log one summary. Nothing is dropped without a trace.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


class DataLayerError(Exception):
    """Base class of the errors raised by `training.data`."""


class UnsupportedCodebaseVersionError(DataLayerError):
    """`meta/info.json` declares a LeRobot `codebase_version` this reader does not read."""

    def __init__(self, info_path: str | Path, version: object, supported: tuple[str, ...]):
        self.info_path = str(info_path)
        self.version = version
        self.supported = supported
        super().__init__(
            f"{self.info_path}: codebase_version {version!r} is not supported; "
            f"this reader reads LeRobot datasets of version {', '.join(supported)}."
        )


class VideoDecodeError(DataLayerError):
    """A video file is missing, unreadable, corrupt or shorter than the episode that points into it."""

    def __init__(self, path: str | Path, reason: str, *, episode_index: int | None = None):
        self.path = str(path)
        self.reason = reason
        self.episode_index = episode_index
        where = f"episode {episode_index}, " if episode_index is not None else ""
        super().__init__(f"{where}video {self.path}: {reason}")


class FrameTimestampError(DataLayerError):
    """A requested frame timestamp has no decoded frame within the tolerance (LeRobot's `tolerance_s` check)."""

    def __init__(
        self,
        path: str | Path,
        *,
        episode_index: int | None,
        violations: list[tuple[float, float]],
        tolerance_s: float,
    ):
        self.path = str(path)
        self.episode_index = episode_index
        self.violations = violations
        self.tolerance_s = tolerance_s
        shown = ", ".join(
            f"queried {q:.6f}s, " + (f"nearest decoded {d:.6f}s" if d == d else "no frame decoded near it")
            for q, d in violations[:5]
        )
        more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
        where = f"episode {episode_index}, " if episode_index is not None else ""
        super().__init__(
            f"{where}video {self.path}: {len(violations)} requested timestamp(s) have no frame within "
            f"tolerance_s={tolerance_s}: {shown}{more}. The video is shorter than its metadata says, or its "
            "timestamps are out of sync with the dataset's fps."
        )


class MissingCameraKeyError(DataLayerError, KeyError):
    """The requested camera key is not a camera of the dataset; the message lists the available ones."""

    def __init__(self, camera_key: str, available: list[str], *, where: str):
        self.camera_key = camera_key
        self.available = list(available)
        self.message = (
            f"{where}: camera key {camera_key!r} not found; available camera keys: {self.available}"
        )
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return self.message


class EmptyEpisodeError(DataLayerError):
    """An episode (or a video of a video folder) has no frames."""

    def __init__(self, where: str | Path, *, episode_index: int | None = None):
        self.where = str(where)
        self.episode_index = episode_index
        name = f"episode {episode_index}" if episode_index is not None else "video"
        super().__init__(f"{name} ({self.where}) has no frames")


class GapLongerThanEpisodeError(DataLayerError):
    """The frame-pair gap is as long as the episode or longer, so no frame has a successor inside it."""

    def __init__(self, where: str | Path, *, episode_index: int, length: int, gap_frames: int, fps: float):
        self.where = str(where)
        self.episode_index = episode_index
        self.length = length
        self.gap_frames = gap_frames
        super().__init__(
            f"episode {episode_index} ({self.where}) has {length} frames but the pair gap is {gap_frames} "
            f"frames ({gap_frames / fps:.3f}s at {fps:g} fps): no frame has a successor inside the episode. "
            "Use a shorter gap_seconds, or skip_corrupt=True to leave such episodes out."
        )


class DataFileError(DataLayerError):
    """A parquet/json metadata or data file is missing or inconsistent with the episode metadata."""

    def __init__(self, path: str | Path, reason: str, *, episode_index: int | None = None):
        self.path = str(path)
        self.reason = reason
        self.episode_index = episode_index
        where = f"episode {episode_index}, " if episode_index is not None else ""
        super().__init__(f"{where}{self.path}: {reason}")


class LabellingRecordError(DataLayerError):
    """A dataset's `meta/info.json` has no (or an incomplete) record of its latent-action labelling, so the layout
    of its `latent_action` column (codebook size, codes per frame, gap, quantizer) is unknown."""

    def __init__(self, where: str | Path, reason: str):
        self.where = str(where)
        self.reason = reason
        super().__init__(
            f"{self.where}: {reason}. A dataset labelled by `training/label_latents.py` records it; label this one "
            "with `python training/label_latents.py --dataset <it> --quantizer <quantizer folder> --output <folder>`"
        )


@dataclass(frozen=True)
class SkippedEpisode:
    """One episode (or video) left out because of bad input, kept so that nothing is dropped silently."""

    episode_index: int | None
    path: str
    error_type: str
    reason: str


def skipped_from_error(error: DataLayerError, *, episode_index: int | None, path: str | Path) -> SkippedEpisode:
    """Turns a caught error into the record kept in a reader's `skipped` list."""
    return SkippedEpisode(
        episode_index=episode_index, path=str(path), error_type=type(error).__name__, reason=str(error)
    )


def log_skip_summary(logger: logging.Logger, skipped: list[SkippedEpisode], *, what: str) -> None:
    """Logs one warning that counts the skipped episodes by error type and shows the first few."""
    if not skipped:
        return
    by_type = Counter(s.error_type for s in skipped)
    counts = ", ".join(f"{n} {name}" for name, n in sorted(by_type.items()))
    first = "; ".join(s.reason for s in skipped[:3])
    logger.warning(
        "%s: skipped %d episode(s) because of bad input (%s). First: %s", what, len(skipped), counts, first
    )
