"""Which episodes train and which are held out, and the order training visits the items in.

    train, held = split_episodes(source, 0.1, seed=0)       # 10% of each task's episodes held out
    sampler = EpochSampler([len(pairs_a), len(pairs_b)], [0.7, 0.3], seed=0)   # a DataLoader sampler

Shared by the quantizer and VLA stages, so that both hold out episodes the same way.
"""

from __future__ import annotations

import numpy as np
import torch


def split_episodes(source, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out a share (or a count) of a source's episodes, stratified by task, reproducibly from `seed`."""
    episodes = list(source.episode_indices)
    if len(episodes) < 2:
        raise ValueError(f"{source!r} has {len(episodes)} episode(s): at least 2 are needed to hold one out.")
    by_task: dict[str, list[int]] = {}
    for e in episodes:
        by_task.setdefault(source.episode_task(e), []).append(e)
    rng = np.random.default_rng(seed)
    held: list[int] = []
    if holdout >= 1:  # a count, spread over tasks round-robin
        pools = {task: list(rng.permutation(eps)) for task, eps in sorted(by_task.items())}
        while len(held) < int(holdout) and any(pools.values()):
            for task in sorted(pools):
                if pools[task] and len(held) < int(holdout):
                    held.append(int(pools[task].pop()))
    else:
        for task, eps in sorted(by_task.items()):
            k = int(round(holdout * len(eps)))
            if holdout > 0 and len(eps) > 1:
                k = max(1, k)
            held.extend(int(e) for e in rng.permutation(eps)[:k])
    held_set = set(held)
    train = [e for e in episodes if e not in held_set]
    if not train:
        raise ValueError(f"Holding out {holdout} leaves no training episode in {source!r}.")
    return train, sorted(held_set)


class EpochSampler(torch.utils.data.Sampler):
    """A fresh order each epoch, fixed by (seed, epoch): uniform permutation, or weighted by source."""

    def __init__(self, sizes: list[int], weights: list[float] | None, seed: int):
        self.sizes, self.weights, self.seed, self.epoch = sizes, weights, seed, 0
        self.total = int(sum(sizes))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is None:
            return iter(torch.randperm(self.total, generator=g).tolist())
        per_sample = torch.cat([torch.full((n,), w / n, dtype=torch.float64) for n, w in zip(self.sizes, self.weights) if n > 0])
        return iter(torch.multinomial(per_sample, self.total, replacement=True, generator=g).tolist())
