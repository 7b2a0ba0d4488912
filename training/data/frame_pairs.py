"""Frame pairs (x_t, x_{t+gap}) for the latent action quantizer, map-style and streaming.

The gap is given in seconds (reference: 0.6 s for robot video) and converted with each episode's fps:
gap_frames = max(1, round(gap_seconds * fps)). As in the reference, a pair near the end of an episode is
clamped: x_{t+gap} becomes the episode's last frame, so every frame t of an episode starts one pair;
`drop_crossing=True` drops those pairs instead (then an episode of T frames gives T - gap pairs).

An item is a dict:

    pixel_values        (2, 3, S, S) uint8, or float32 in [0, 1]; [0] is x_t, [1] is x_{t+gap}
    episode_index, frame_index (t), target_frame_index (t + gap, clamped), index (global index of frame t)
    task                the instruction (LeRobot task, or the caption of a human video)
    action              the action at frame t (LeRobot sources with actions only)

Sources are a `LeRobotDataset` (`load_lerobot_dataset`) or a `VideoFolderDataset`. Both serve whole episodes:
the map-style dataset decodes an episode once and keeps the last `episode_cache_size` decoded episodes
(`frame_access="episode"`, fast for ordered or episode-grouped access such as labelling every frame), or
seeks to the two frames of each pair (`frame_access="seek"`, for shuffled random access).
`make_streaming_frame_pairs` streams a built `FramePairDataset` as a `datasets.IterableDataset` that decodes each
episode once, in the worker that owns it. Episode selection, bad-input handling and the episode cache are those of
`EpisodeFrameDataset` (`episode_frames.py`), shared with the VLA frames.
"""

from __future__ import annotations

from typing import Iterator

import datasets
import numpy as np
import torch

from .episode_frames import EpisodeFrameDataset
from .errors import GapLongerThanEpisodeError


def gap_in_frames(gap_seconds: float, fps: float) -> int:
    """round(gap_seconds * fps), at least 1 frame."""
    return max(1, int(round(gap_seconds * fps)))


class FramePairDataset(EpisodeFrameDataset):
    """Map-style frame pairs of one camera of a LeRobot dataset or a video folder.

    Args:
        source: `LeRobotDataset` or `VideoFolderDataset`.
        camera_key: camera feature name ("observation.images.corner", or just "corner"); None -> the first.
        gap_seconds: time between the two frames of a pair.
        image_size: S to resize frames to S x S while decoding (aspect ratio not kept); None keeps the size.
        output: "float" (float32 in [0, 1]) or "uint8".
        drop_crossing: drop pairs whose second frame would be past the episode end instead of clamping.
        episodes: episode indices to use (default: all the source serves).
        skip_corrupt: leave out empty episodes and episodes shorter than the gap (recorded in `.skipped`)
            instead of raising; None -> the source's setting.
        frame_access: "episode" (decode whole episodes, cached) or "seek" (decode the two frames of a pair).
        episode_cache_size: decoded episodes kept per process with frame_access="episode".
    """

    item_name = "pair"

    def __init__(
        self,
        source,
        *,
        camera_key: str | None = None,
        gap_seconds: float = 0.6,
        image_size: int | None = None,
        output: str = "float",
        drop_crossing: bool = False,
        episodes: list[int] | None = None,
        skip_corrupt: bool | None = None,
        frame_access: str = "episode",
        episode_cache_size: int = 2,
    ):
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        if frame_access not in ("episode", "seek"):
            raise ValueError(f"frame_access must be 'episode' or 'seek', got {frame_access!r}")
        if not gap_seconds > 0:
            raise ValueError(f"gap_seconds must be positive, got {gap_seconds}")
        self.gap_seconds, self.output, self.drop_crossing, self.frame_access = (
            gap_seconds, output, drop_crossing, frame_access)
        self._gaps: dict[int, int] = {}  # episode -> gap in frames at its fps
        super().__init__(source, camera_key=camera_key, image_size=image_size, skip_corrupt=skip_corrupt,
                         episode_cache_size=episode_cache_size)
        self._index_episodes(self._select_episodes(episodes), what=f"frame pairs (gap {gap_seconds}s)")

    def _episode_error(self, episode_index: int, length: int) -> GapLongerThanEpisodeError | None:
        fps = self.source.episode_fps(episode_index)
        gap = gap_in_frames(self.gap_seconds, fps)
        if gap < length:
            return None
        where = self.source.describe_episode(episode_index, self.camera_key)
        return GapLongerThanEpisodeError(where, episode_index=episode_index, length=length, gap_frames=gap, fps=fps)

    def _index_episode(self, episode_index: int, length: int) -> int:
        gap = gap_in_frames(self.gap_seconds, self.source.episode_fps(episode_index))
        self._gaps[episode_index] = gap
        return length - gap if self.drop_crossing else length

    # -- indexing ----------------------------------------------------------------------------------------
    def num_pairs(self, episode_index: int) -> int:
        return self.num_items(episode_index)

    def gap_frames(self, episode_index: int) -> int:
        return self._gaps[episode_index]

    def locate(self, idx: int) -> tuple[int, int, int]:
        """(episode_index, t, t + gap clamped to the last frame) of pair `idx`."""
        episode_index, t = super().locate(idx)
        return episode_index, t, self._target(episode_index, t)

    def _target(self, episode_index: int, t: int) -> int:
        return min(t + self._gaps[episode_index], self.source.episode_length(episode_index) - 1)

    # -- items -------------------------------------------------------------------------------------------
    def make_item(self, episode_index: int, t: int, pair: np.ndarray, *, as_float: bool | None = None) -> dict:
        """The item of pair (t, t + gap) from its two frames (2, H, W, 3) uint8."""
        pixels = torch.from_numpy(np.ascontiguousarray(pair.transpose(0, 3, 1, 2)))  # (2, 3, H, W)
        to_float = (self.output == "float") if as_float is None else as_float
        if to_float:
            pixels = pixels.float().div_(255.0)
        item = {
            "pixel_values": pixels,
            "episode_index": int(episode_index),
            "frame_index": int(t),
            "target_frame_index": self._target(episode_index, t),
            "index": self.source.episode_first_index(episode_index) + int(t),
            "task": self.source.episode_task(episode_index, int(t)),
        }
        actions = self.source.episode_actions(episode_index)
        if actions is not None:
            item["action"] = torch.from_numpy(np.array(actions[t], dtype=np.float32))
        return item

    def __getitem__(self, idx: int) -> dict:
        episode_index, t, target = self.locate(idx)
        if self.frame_access == "episode":
            pair = self._cached_episode(episode_index)[[t, target]]
        else:
            pair = self.source.read_frames(episode_index, self.camera_key, [t, target], size=self.image_size)
        return self.make_item(episode_index, t, pair)

    def iter_episode(
        self, episode_index: int, *, order: np.ndarray | None = None, as_float: bool | None = None
    ) -> Iterator[dict]:
        """Every pair of one episode, decoding it once; `order` permutes the frame indices t."""
        frames = self.decode_episode(episode_index)
        count = self.num_pairs(episode_index)
        for t in range(count) if order is None else order:
            yield self.make_item(episode_index, int(t), frames[[t, self._target(episode_index, int(t))]], as_float=as_float)

    _stream_count_method = "num_pairs"
    _stream_iter_kwargs = {"as_float": False}
    _stream_what = "frame pairs"

    def _finish_stream(self, dataset):
        if self.output == "float":
            # Converted after the shuffle buffer, which then holds uint8 pixels (4x less memory).
            dataset = dataset.map(_pixels_to_float)
        return dataset

    def _repr_fields(self) -> list[str]:
        return [
            f"camera={self.camera_key!r}", f"gap_seconds={self.gap_seconds}", f"image_size={self.image_size}",
            f"output={self.output!r}", f"drop_crossing={self.drop_crossing}",
        ]


# -- streaming ---------------------------------------------------------------------------------------------
def _pixels_to_float(item: dict) -> dict:
    item["pixel_values"] = item["pixel_values"].float().div_(255.0)
    return item


def make_streaming_frame_pairs(pairs: FramePairDataset, **options) -> datasets.IterableDataset:
    """The pairs of a `FramePairDataset` as a `datasets.IterableDataset` (items as the dataset's, tensors):
    `pairs.streaming(**options)`, whose keywords (seed, shuffle, shuffle_buffer_size, interleave_episodes, rank,
    world_size) and behaviour `EpisodeFrameDataset.streaming` documents."""
    if not isinstance(pairs, FramePairDataset):
        raise TypeError(
            f"make_streaming_frame_pairs takes a FramePairDataset, got {type(pairs).__name__}: build one first, "
            "e.g. FramePairDataset(source, gap_seconds=0.6, image_size=128)"
        )
    return pairs.streaming(**options)
