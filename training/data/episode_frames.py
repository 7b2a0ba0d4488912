"""The base of the datasets that serve items drawn from whole episodes of one camera (`FramePairDataset`,
`VLAFrameDataset`).

What every such dataset does the same way lives here, once:

    episode selection     `episodes=[...]` must be served by the source (a KeyError names the missing ones)
    bad input             an empty episode (or one a subclass refuses, e.g. shorter than the pair gap) raises, or
                          with `skip_corrupt` is left out and recorded in `.skipped` (one logged summary)
    indexing              items are numbered episode after episode; `locate(idx)` finds (episode_index, t)
    decoding              `decode_episode` decodes an episode once at `image_size`; `_cached_episode` keeps the
                          last `episode_cache_size` decoded episodes (a per-process cache, not pickled)

A subclass says what its items are: how many an episode serves (`_index_episode`), which frame the k-th of them
is (`_frame_at`), why an episode cannot serve any (`_episode_error`), and what its items hold (`make_item`,
`__getitem__`, `iter_episode`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import torch

from .episode_stream import stream_episodes
from .errors import DataLayerError, EmptyEpisodeError, SkippedEpisode, log_skip_summary, skipped_from_error


class EpisodeFrameDataset(torch.utils.data.Dataset):
    """Map-style items from the episodes of one camera of a LeRobot dataset or a video folder.

    Args:
        source: `LeRobotDataset` or `VideoFolderDataset` (anything serving episodes the same way).
        camera_key: camera feature name ("observation.images.corner", or just "corner"); None -> the first.
        image_size: S to resize frames to S x S while decoding (aspect ratio not kept); None keeps the size.
        skip_corrupt: leave out bad episodes (recorded in `.skipped`) instead of raising; None -> the source's
            setting.
        episode_cache_size: decoded episodes kept per process by `_cached_episode`.

    Attributes:
        episode_indices: the episodes that serve at least one item, in order (set by `_index_episodes`).
        skipped: `SkippedEpisode` records of what the source and this dataset left out for bad input.
    """

    item_name = "item"  # in messages: "pair index 7 out of range for 5 pairs"

    def __init__(
        self,
        source,
        *,
        camera_key: str | None = None,
        image_size: int | None = None,
        skip_corrupt: bool | None = None,
        episode_cache_size: int = 2,
    ):
        self.source = source
        self.camera_key = source.resolve_camera_key(camera_key)
        self.image_size = image_size
        self.skip_corrupt = getattr(source, "skip_corrupt", False) if skip_corrupt is None else skip_corrupt
        self.episode_cache_size = episode_cache_size
        self._episode_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        # What the source skipped, then what this dataset skips: one list of everything left out.
        self.skipped: list[SkippedEpisode] = list(getattr(source, "skipped", []))
        self.episode_indices: list[int] = []
        self._offsets = np.zeros(1, dtype=np.int64)
        self._positions: dict[int, int] = {}

    # -- building the index ------------------------------------------------------------------------------
    def _select_episodes(self, episodes: list[int] | None) -> list[int]:
        """The source's episodes that are in `episodes` (all when None), in the source's order."""
        available = list(self.source.episode_indices)
        if episodes is None:
            return available
        missing = sorted(set(episodes) - set(available))
        if missing:
            raise KeyError(
                f"episodes {missing} are not served by the source (missing or skipped); "
                f"it serves {len(available)} episodes"
            )
        wanted = set(int(e) for e in episodes)
        return [e for e in available if e in wanted]

    def _episode_error(self, episode_index: int, length: int) -> DataLayerError | None:
        """Why a non-empty episode cannot serve items (bad input), or None. Subclasses add their own reasons."""
        return None

    def _index_episode(self, episode_index: int, length: int) -> int:
        """Records what the subclass needs about a good episode and returns how many items it serves; 0 leaves it
        out without a `SkippedEpisode` (the subclass keeps its own account, e.g. unlabelled episodes)."""
        raise NotImplementedError

    def _index_episodes(self, selected: list[int], *, what: str) -> None:
        """Builds `episode_indices` and the item offsets from the selected episodes, raising on bad input or,
        with `skip_corrupt`, recording it in `.skipped` (summarised once in the log, under `what`)."""
        own_skipped: list[SkippedEpisode] = []
        counts = []
        for episode_index in selected:
            length = self.source.episode_length(episode_index)
            if length <= 0:
                where = self.source.describe_episode(episode_index, self.camera_key)
                error = EmptyEpisodeError(where, episode_index=episode_index)
            else:
                error = self._episode_error(episode_index, length)
            if error is not None:
                if not self.skip_corrupt:
                    raise error
                where = self.source.describe_episode(episode_index, self.camera_key)
                own_skipped.append(skipped_from_error(error, episode_index=episode_index, path=where))
                continue
            count = self._index_episode(episode_index, length)
            if count == 0:
                continue
            self.episode_indices.append(episode_index)
            counts.append(count)
        self.skipped.extend(own_skipped)
        # Logged under the subclass's module (training.data.frame_pairs, ...), where a reader looks for it.
        log_skip_summary(logging.getLogger(type(self).__module__), own_skipped, what=what)
        self._offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)
        self._positions = {episode_index: i for i, episode_index in enumerate(self.episode_indices)}

    # -- indexing ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._offsets[-1])

    def num_items(self, episode_index: int) -> int:
        """Items served from one episode."""
        position = self._positions[episode_index]
        return int(self._offsets[position + 1] - self._offsets[position])

    def _frame_at(self, episode_index: int, k: int) -> int:
        """The frame index t of the k-th item of an episode (the k-th frame unless a subclass serves fewer)."""
        return k

    def locate(self, idx: int) -> tuple[int, int]:
        """(episode_index, frame index t) of item `idx` (negative indices count from the end)."""
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"{self.item_name} index {idx} out of range for {len(self)} {self.item_name}s")
        position = int(np.searchsorted(self._offsets, idx, side="right") - 1)
        episode_index = self.episode_indices[position]
        return episode_index, self._frame_at(episode_index, idx - int(self._offsets[position]))

    # -- decoding ----------------------------------------------------------------------------------------
    def decode_episode(self, episode_index: int) -> np.ndarray:
        """All frames of an episode for this camera and size: (T, S, S, 3) uint8, decoded once."""
        return self.source.decode_episode(episode_index, self.camera_key, size=self.image_size)

    def _cached_episode(self, episode_index: int) -> np.ndarray:
        """`decode_episode` through a least-recently-used cache of `episode_cache_size` episodes."""
        frames = self._episode_cache.pop(episode_index, None)
        if frames is None:
            frames = self.decode_episode(episode_index)
        self._episode_cache[episode_index] = frames
        while len(self._episode_cache) > self.episode_cache_size:
            self._episode_cache.popitem(last=False)
        return frames

    # -- pickling (DataLoader workers) and printing ------------------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_episode_cache"] = OrderedDict()  # decoded frames are a per-process cache
        return state

    # -- streaming: the one factory of every episode-frame dataset (`make_streaming_frame_pairs`,
    # `make_streaming_vla_frames` are it under their documented names)
    _stream_count_method = "num_items"  # the method giving an episode's number of items
    _stream_iter_kwargs: dict = {}  # keywords of `iter_episode` for streamed items
    _stream_what = "items"

    def _no_episode_to_stream(self) -> str:
        return f"no episode to stream (skipped: {len(self.skipped)})"

    def _finish_stream(self, dataset):
        """Per-item conversions applied after the shuffle buffer (e.g. uint8 -> float pixels)."""
        return dataset

    def streaming(self, *, seed: int = 0, shuffle: bool = True, shuffle_buffer_size: int | None = None,
                  interleave_episodes: int = 8, rank: int | None = None, world_size: int | None = None):
        """These items as a `datasets.IterableDataset`, one shard per episode.

        Each episode is decoded once, sequentially, by the process that owns its shard. Sharding does the rest:
        `split_dataset_by_node` gives each rank its episodes (or, when the number of episodes is not divisible by
        `world_size`, every rank reads all and keeps every world_size-th item), and a DataLoader gives each worker
        a share of its rank's episodes, so no item is read twice. `world_size=None` does not split (a caller that
        interleaves several streams splits the mix instead).

        Shuffling (`shuffle=True`), all of it reproducible from `seed` and resumable exactly from `state_dict()`:
        the episode order is shuffled (reshuffled by `set_epoch`), the items of an episode come in a permutation
        fixed by (seed, episode), and `interleave_episodes` episodes are read round-robin at a time (datasets'
        `max_buffer_input_shards`), which mixes episodes without holding pixels in a buffer. `shuffle_buffer_size`
        adds datasets' shuffle buffer of that many items on top; datasets does not save the buffer in
        `state_dict()`, so after a resume the items that were in the buffer are not seen again in that epoch
        (none is seen twice)."""
        if not self.episode_indices:
            raise ValueError(self._no_episode_to_stream())
        dataset = stream_episodes(
            self, count_method=self._stream_count_method, iter_kwargs=self._stream_iter_kwargs, what=self._stream_what,
            shuffle=shuffle, seed=seed, shuffle_buffer_size=shuffle_buffer_size,
            interleave_episodes=interleave_episodes, rank=rank, world_size=world_size,
        )
        return self._finish_stream(dataset)

    def _repr_fields(self) -> list[str]:
        """The subclass's settings shown by `repr`, as "name=value" strings."""
        return [f"camera={self.camera_key!r}", f"image_size={self.image_size}"]

    def __repr__(self) -> str:
        fields = ", ".join(self._repr_fields())
        return (
            f"{type(self).__name__}({self.item_name}s={len(self)}, episodes={len(self.episode_indices)}, {fields}, "
            f"skipped={len(self.skipped)})"
        )
