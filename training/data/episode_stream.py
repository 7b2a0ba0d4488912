"""Streaming an episode-based dataset (frame pairs, VLA frames) as a `datasets.IterableDataset`, one shard per
episode: shared by `make_streaming_frame_pairs` and `make_streaming_vla_frames`.

The dataset must offer `episode_indices`, `skip_corrupt`, `iter_episode(episode_index, order=..., **kwargs)` and a
method giving the number of items of an episode (its name is passed as `count_method`).
"""

from __future__ import annotations

import inspect
import logging
from typing import Iterator

import datasets
import numpy as np
from datasets.distributed import split_dataset_by_node

from .errors import DataLayerError

logger = logging.getLogger(__name__)


def _generate_episode_items(
    episode_shards: list[list[int]], source, count_method: str, iter_kwargs: dict, shuffle: bool, seed: int,
    what: str,
) -> Iterator[dict]:
    """Generator of `datasets.IterableDataset.from_generator`: `datasets` calls it once per shard.

    A shard is a list of episodes; each is decoded once and its items are yielded in a permutation fixed by
    (seed, episode), so that resuming from a state_dict (which re-runs the shard and skips what was already
    yielded) yields exactly the items that were not.
    """
    for shard in episode_shards:
        for episode_index in shard:
            order = None
            if shuffle:
                count = getattr(source, count_method)(episode_index)
                order = np.random.default_rng([seed, episode_index]).permutation(count)
            try:
                yield from source.iter_episode(episode_index, order=order, **iter_kwargs)
            except DataLayerError as error:
                if not source.skip_corrupt:
                    raise
                # Logged from the worker that met it; items already yielded from the episode stay yielded.
                logger.warning("streaming %s: skipped episode %d: %s", what, episode_index, error)


def stream_episodes(
    source,
    *,
    count_method: str,
    iter_kwargs: dict,
    what: str,
    shuffle: bool,
    seed: int,
    shuffle_buffer_size: int | None,
    interleave_episodes: int,
    rank: int | None,
    world_size: int | None,
) -> datasets.IterableDataset:
    """The items of `source` as an IterableDataset with one shard per episode, shuffled reproducibly from `seed`
    (episode order, a fixed permutation within each episode, `interleave_episodes` episodes read round-robin,
    optionally datasets' shuffle buffer) and split over ranks when `world_size` is given."""
    dataset = datasets.IterableDataset.from_generator(
        _generate_episode_items,
        gen_kwargs={
            "episode_shards": [[episode_index] for episode_index in source.episode_indices],
            "source": source,
            "count_method": count_method,
            "iter_kwargs": iter_kwargs,
            "shuffle": shuffle,
            "seed": seed,
            "what": what,
        },
    )
    if shuffle:
        shuffle_kwargs = {"seed": seed, "buffer_size": shuffle_buffer_size or 1}
        if "max_buffer_input_shards" in inspect.signature(datasets.IterableDataset.shuffle).parameters:
            shuffle_kwargs["max_buffer_input_shards"] = max(1, interleave_episodes)
        dataset = dataset.shuffle(**shuffle_kwargs)
    if world_size is not None:
        if rank is None:
            raise ValueError("pass rank together with world_size")
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    return dataset
