"""Single frames for the VLA: (image at frame t, the episode's instruction, a target), map-style and streaming.

Latent pretraining and action finetuning both train the vision-language model on one frame at a time:

    target="latent"   the frame's latent action, the `latent_action` column written by `training/label_latents.py`
    target="action"   the frame's ground-truth robot action, the `action` column

An item is a dict:

    image            (H, W, 3) uint8, channels-last RGB; S x S when `image_size=S`
    instruction      str, the LeRobot task of the frame
    latent_codes     (s,) int64 codes in [0, |C|)                 (target="latent")
    action           (D,) float32                                   (target="action")
                     (k, D) float32 with `action_chunk_size=k` > 1: the actions of frames t ... t+k-1
    episode_index, frame_index   int

`VLAFrameDataset` serves torch tensors; `make_streaming_vla_frames` serves numpy arrays (`datasets`' own
currency); `collate_vla_frames` turns a list of either into a batch for `LAPAProcessor`.

Rows of episodes that labelling could not label carry `UNLABELLED_CODE` (-1) in every slot
(`latent_actions.py`); with target="latent" those frames are left out, counted in `num_unlabelled_frames` and
logged once. Frames are decoded a whole episode at a time, as in `frame_pairs.py` (both are an
`EpisodeFrameDataset`): the map-style dataset keeps the last `episode_cache_size` decoded episodes, and the stream
decodes each episode once in the process that owns its shard.
"""

from __future__ import annotations

import logging
from typing import Iterator

import datasets
import numpy as np
import torch

from .episode_frames import EpisodeFrameDataset
from .latent_actions import LABELLING_INFO_KEY, LATENT_ACTION_KEY, UNLABELLED_CODE

logger = logging.getLogger(__name__)

TARGETS = ("latent", "action")
ACTION_KEY = "action"


def _as_rows(values: np.ndarray) -> np.ndarray:
    """Per-frame values (T,) or (T, D) as (T, D): a one-slot column may be stored as scalars."""
    return values.reshape(len(values), -1)


def action_chunks(actions: np.ndarray, chunk_size: int) -> np.ndarray:
    """One episode's actions (T, D) -> the chunk of every frame (T, k, D): row t holds actions t ... t+k-1, and
    indices past the last frame repeat the last action (see `VLAFrameDataset`'s `action_chunk_size`)."""
    steps = np.minimum(np.arange(len(actions))[:, None] + np.arange(chunk_size)[None, :], len(actions) - 1)
    return actions[steps]


class VLAFrameDataset(EpisodeFrameDataset):
    """Map-style frames of one camera of a LeRobot dataset, each with its instruction and target.

    Args:
        source: `LeRobotDataset` (`load_lerobot_dataset`); for target="latent" one labelled by
            `training/label_latents.py`.
        target: "latent" (items carry `latent_codes` (s,) int64) or "action" (items carry `action` (D,) float32).
        episodes: episode indices to use (default: all the source serves), e.g. a training split.
        camera_key: camera feature name ("observation.images.corner", or just "corner"); None -> the first.
        image_size: S to resize frames to S x S while decoding (aspect ratio not kept); None keeps the size.
        episode_cache_size: decoded episodes kept per process (items are cheap when read episode by episode).
        skip_corrupt: leave out empty episodes (recorded in `.skipped`), and in the stream episodes whose video
            fails to decode, instead of raising; None -> the source's setting.
        frame_stride: serve frames 0, k, 2k, ... of each episode (consecutive frames are near duplicates).
        action_chunk_size: k (target="action" only): the target of frame t is the chunk of the episode's actions
            at frames t, t+1, ..., t+k-1 ((k, D); consecutive control steps whatever the `frame_stride`). Past the
            episode's last frame the chunk repeats the last action: the policy learns to hold its final command
            rather than to predict the next episode. (LeRobot's ACT and diffusion policies pad and mask the loss
            instead; repeating keeps every target a real, fully supervised action, and the training, the held-out
            metrics and the processor need no mask.) 1 (default) gives (D,) targets, exactly as before.

    Attributes:
        episode_indices: episodes that serve at least one frame, in order.
        num_unlabelled_frames: frames (at the stride) left out because their latent label is UNLABELLED (-1).
        unlabelled_episodes: episodes left out entirely because none of their frames is labelled.
        skipped: `SkippedEpisode` records of what the source and this dataset left out for bad input.
    """

    item_name = "frame"

    def __init__(
        self,
        source,
        *,
        target: str = "latent",
        episodes: list[int] | None = None,
        camera_key: str | None = None,
        image_size: int | None = None,
        episode_cache_size: int = 2,
        skip_corrupt: bool | None = None,
        frame_stride: int = 1,
        action_chunk_size: int = 1,
    ):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if isinstance(action_chunk_size, bool) or int(action_chunk_size) != action_chunk_size or action_chunk_size < 1:
            raise ValueError(f"action_chunk_size must be a positive integer, got {action_chunk_size!r}")
        if action_chunk_size > 1 and target != "action":
            raise ValueError(f"action_chunk_size={action_chunk_size} needs target='action' (chunks of robot actions); "
                             "latent targets are one latent action per frame")
        if int(frame_stride) != frame_stride or frame_stride < 1:
            raise ValueError(f"frame_stride must be a positive integer, got {frame_stride!r}")
        super().__init__(
            source, camera_key=camera_key, image_size=image_size, skip_corrupt=skip_corrupt,
            episode_cache_size=episode_cache_size,
        )
        self.target = target
        self.latent_key = LATENT_ACTION_KEY
        self.frame_stride = int(frame_stride)
        self.action_chunk_size = int(action_chunk_size)
        selected = self._select_episodes(episodes)

        # The target column must exist before anything else is worth checking.
        self._target_key = LATENT_ACTION_KEY if target == "latent" else ACTION_KEY
        if not self._has_column(self._target_key, list(source.episode_indices)):
            where = getattr(source, "root", source)
            if target == "latent":
                raise KeyError(
                    f"{where}: target='latent' needs the per-frame column {LATENT_ACTION_KEY!r}, which this dataset "
                    "does not have. Label the dataset with the quantizer first: `python training/label_latents.py "
                    "--dataset <this dataset> --quantizer <quantizer folder> --output <labelled folder>`, then "
                    "load the labelled folder."
                )
            raise KeyError(
                f"{where}: target='action' needs the per-frame column {ACTION_KEY!r} (the robot's actions), which "
                "this dataset does not have: action finetuning needs a dataset recorded with actions."
            )

        self.unlabelled_episodes: list[int] = []
        self.num_unlabelled_frames = 0
        self._frames: dict[int, np.ndarray] = {}  # episode -> frame indices t served, (n,) int64
        self._index_episodes(selected, what="VLA frames")
        if self.num_unlabelled_frames:
            logger.warning(
                "VLA frames: left out %d frame(s) whose latent label is UNLABELLED (%d), %d episode(s) entirely "
                "(%s); labelling could not label them (see info.json[%r]['skipped_episodes'])",
                self.num_unlabelled_frames, UNLABELLED_CODE, len(self.unlabelled_episodes),
                self.unlabelled_episodes[:10], LABELLING_INFO_KEY,
            )

    def _index_episode(self, episode_index: int, length: int) -> int:
        frames = np.arange(0, length, self.frame_stride, dtype=np.int64)
        if self.target == "latent":
            codes = _as_rows(self.source.episode_column(episode_index, self.latent_key))[frames]
            # Labelling writes -1 in every slot of a row it could not label; any -1 slot is not a code.
            labelled = ~np.any(codes == UNLABELLED_CODE, axis=1)
            self.num_unlabelled_frames += int(np.count_nonzero(~labelled))
            frames = frames[labelled]
            if len(frames) == 0:
                self.unlabelled_episodes.append(episode_index)
                return 0
        self._frames[episode_index] = frames
        return len(frames)

    def _has_column(self, name: str, episodes: list[int]) -> bool:
        """Whether the source's frame rows hold a numeric column `name` (read from the data, not info.json)."""
        if episodes:
            return self.source.episode_column(episodes[0], name) is not None
        return name in self.source.meta.features

    # -- indexing ----------------------------------------------------------------------------------------
    def num_frames(self, episode_index: int) -> int:
        """Frames served from one episode."""
        return self.num_items(episode_index)

    def frame_indices(self, episode_index: int) -> np.ndarray:
        """The frame indices t served from one episode, ascending: (n,) int64."""
        return self._frames[episode_index]

    def _frame_at(self, episode_index: int, k: int) -> int:
        return int(self._frames[episode_index][k])

    # -- targets and instructions, read from the parquet columns (no video) --------------------------------
    def episode_targets(self, episode_index: int) -> np.ndarray:
        """Targets of every frame of an episode (not only the served ones): (T, s) int64 or (T, D) float32, or
        (T, k, D) float32 action chunks when `action_chunk_size` k > 1 (the last action repeated past the end)."""
        values = _as_rows(self.source.episode_column(episode_index, self._target_key))
        values = values.astype(np.int64 if self.target == "latent" else np.float32, copy=False)
        if self.target == "action" and self.action_chunk_size > 1:
            values = action_chunks(values, self.action_chunk_size)
        return values

    def _served_column(self, name: str, dtype) -> np.ndarray:
        if not self._has_column(name, self.episode_indices):
            raise KeyError(f"{getattr(self.source, 'root', self.source)}: the dataset has no {name!r} column")
        parts = [_as_rows(self.source.episode_column(e, name))[self._frames[e]] for e in self.episode_indices]
        if not parts:
            return np.zeros((0, 0), dtype=dtype)
        return np.concatenate(parts).astype(dtype, copy=False)

    def all_actions(self) -> np.ndarray:
        """The `action` of every served frame, in item order: (N, D) float32.

        Read from the parquet columns without decoding video: what fits the action tokenizer's bins on a
        training split. Works with either target, as long as the dataset has actions.
        """
        return self._served_column(ACTION_KEY, np.float32)

    def all_action_chunks(self) -> np.ndarray:
        """The action chunk of every served frame, in item order: (N, k, D) float32 (k = `action_chunk_size`, 1
        included), the last action repeated past an episode's end; what the majority baseline reads."""
        if not self._has_column(ACTION_KEY, self.episode_indices):
            raise KeyError(f"{getattr(self.source, 'root', self.source)}: the dataset has no {ACTION_KEY!r} column")
        parts = [action_chunks(_as_rows(self.source.episode_column(e, ACTION_KEY)).astype(np.float32, copy=False),
                               self.action_chunk_size)[self._frames[e]] for e in self.episode_indices]
        if not parts:
            return np.zeros((0, self.action_chunk_size, 0), dtype=np.float32)
        return np.concatenate(parts)

    def all_latent_codes(self) -> np.ndarray:
        """The `latent_action` of every served frame, in item order: (N, s) int64. With target="action"
        unlabelled frames are served too, and their rows are -1."""
        return self._served_column(self.latent_key, np.int64)

    @property
    def action_dim(self) -> int | None:
        """D of the `action` column, or None when the dataset has no actions."""
        if not self._has_column(ACTION_KEY, self.episode_indices):
            return None
        return int(_as_rows(self.source.episode_column(self.episode_indices[0], ACTION_KEY)).shape[1])

    @property
    def latent_sequence_length(self) -> int | None:
        """s, the codes per frame of the `latent_action` column, or None when the dataset is not labelled."""
        if not self._has_column(self.latent_key, self.episode_indices):
            return None
        return int(_as_rows(self.source.episode_column(self.episode_indices[0], self.latent_key)).shape[1])

    @property
    def instructions(self) -> list[str]:
        """The distinct instructions of the served frames, sorted."""
        found: set[str] = set()
        tasks = self.source.meta.tasks
        for episode_index in self.episode_indices:
            task_index = self.source.episode_column(episode_index, "task_index")
            if task_index is None:  # no per-frame task column: the episode's task for every frame
                found.add(self.source.episode_task(episode_index, 0))
            else:
                found.update(tasks[int(i)] for i in np.unique(task_index[self._frames[episode_index]]))
        return sorted(found)

    # -- items ------------------------------------------------------------------------------
    def make_item(
        self, episode_index: int, t: int, image: np.ndarray, targets: np.ndarray, *, as_numpy: bool = False
    ) -> dict:
        """The item of frame t from its decoded image (H, W, 3) uint8 and the episode's targets (T, ...)."""
        # Copies: an item must not keep the whole decoded episode alive, nor let a caller write into the cache.
        image = np.array(image, dtype=np.uint8)
        value = np.array(targets[t])
        item = {
            "image": image if as_numpy else torch.from_numpy(image),
            "instruction": self.source.episode_task(episode_index, int(t)),
            "episode_index": int(episode_index),
            "frame_index": int(t),
        }
        item["latent_codes" if self.target == "latent" else "action"] = value if as_numpy else torch.from_numpy(value)
        return item

    def __getitem__(self, idx: int) -> dict:
        episode_index, t = self.locate(idx)
        image = self._cached_episode(episode_index)[t]
        return self.make_item(episode_index, t, image, self.episode_targets(episode_index))

    def iter_episode(
        self, episode_index: int, *, order: np.ndarray | None = None, as_numpy: bool = True
    ) -> Iterator[dict]:
        """Every served frame of one episode, decoding it once; `order` permutes positions 0..n-1 of the
        served frames (not frame indices)."""
        frames = self.decode_episode(episode_index)
        targets = self.episode_targets(episode_index)
        served = self._frames[episode_index]
        for position in range(len(served)) if order is None else order:
            t = int(served[position])
            yield self.make_item(episode_index, t, frames[t], targets, as_numpy=as_numpy)

    _stream_count_method = "num_frames"
    _stream_iter_kwargs = {"as_numpy": True}
    _stream_what = "VLA frames"

    def _no_episode_to_stream(self) -> str:
        return (f"no episode to stream (unlabelled: {len(self.unlabelled_episodes)}, skipped: "
                f"{len(self.skipped)})")

    def _repr_fields(self) -> list[str]:
        return [
            f"target={self.target!r}", f"camera={self.camera_key!r}", f"image_size={self.image_size}",
            f"frame_stride={self.frame_stride}", f"unlabelled_frames={self.num_unlabelled_frames}",
        ] + ([f"action_chunk_size={self.action_chunk_size}"] if self.action_chunk_size > 1 else [])


# -- streaming ---------------------------------------------------------------------------------------------
def make_streaming_vla_frames(frames: VLAFrameDataset, **options) -> datasets.IterableDataset:
    """The frames of a `VLAFrameDataset` as a `datasets.IterableDataset`: `frames.streaming(**options)` (keywords
    and behaviour in `EpisodeFrameDataset.streaming`). Items are those of `VLAFrameDataset` with numpy arrays
    instead of tensors: `image` (H, W, 3) uint8, `latent_codes` (s,) int64 or `action` (D,) float32,
    `instruction`, `episode_index`, `frame_index`."""
    if not isinstance(frames, VLAFrameDataset):
        raise TypeError(
            f"make_streaming_vla_frames takes a VLAFrameDataset, got {type(frames).__name__}: build one first, "
            "e.g. VLAFrameDataset(source, target='latent', image_size=224)"
        )
    return frames.streaming(**options)


# -- batching ----------------------------------------------------------------------------------------------
def collate_vla_frames(items: list[dict]) -> dict:
    """Stacks VLA frame items (tensors or numpy arrays) into a batch.

    Returns:
        image           (B, H, W, 3) uint8 tensor, channels-last
        instruction     list of B str
        latent_codes    (B, s) int64 tensor      (when the items carry latent codes)
        action          (B, D) float32 tensor    (when the items carry actions; (B, k, D) for action chunks)
        episode_index, frame_index   (B,) int64 tensors

    Feed it to the processor as `processor(images=batch["image"].numpy(), text=batch["instruction"],
    latent_codes=batch["latent_codes"])` (or `actions=batch["action"]`): the image processor reads numpy
    images channels-last but torch tensors channels-first, so pass the numpy view (no copy), or
    `batch["image"].permute(0, 3, 1, 2)`.
    """
    if not items:
        raise ValueError("collate_vla_frames got no items")
    target_keys = [key for key in ("latent_codes", "action") if key in items[0]]
    for item in items:
        if [key for key in ("latent_codes", "action") if key in item] != target_keys:
            raise ValueError("collate_vla_frames: items mix targets (latent_codes vs action); batch one kind at a time")
    sizes = {tuple(np.shape(item["image"])) for item in items}
    if len(sizes) > 1:
        raise ValueError(
            f"collate_vla_frames: images of different sizes {sorted(sizes)}; build the dataset with image_size=S"
        )
    batch = {
        "image": torch.stack([torch.as_tensor(item["image"], dtype=torch.uint8) for item in items]),
        "instruction": [item["instruction"] for item in items],
    }
    if "latent_codes" in target_keys:
        codes = [torch.as_tensor(item["latent_codes"], dtype=torch.int64) for item in items]
        batch["latent_codes"] = torch.stack(codes)
    if "action" in target_keys:
        batch["action"] = torch.stack([torch.as_tensor(item["action"], dtype=torch.float32) for item in items])
    batch["episode_index"] = torch.tensor([int(item["episode_index"]) for item in items], dtype=torch.int64)
    batch["frame_index"] = torch.tensor([int(item["frame_index"]) for item in items], dtype=torch.int64)
    return batch
