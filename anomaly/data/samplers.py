"""Samplers that shard data across DDP ranks themselves (the trainer runs with
`use_distributed_sampler=False`): training shards an epoch-seeded permutation, evaluation shards
without padding, so no image is counted twice by the distributed metrics.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Shuffles `num_samples` indices with a permutation seeded by (seed, epoch), sharded by rank.

    Yields `epoch * num_samples + index`, so the dataset can seed its per-sample randomness by
    (seed, epoch, index) whatever the number of workers. Shards are padded to equal length (DDP
    training steps must match across ranks).
    """

    def __init__(
        self, num_samples: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ) -> None:
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        order = np.resize(order, len(self) * self.world_size)  # pad by wrapping around
        offset = self.epoch * self.num_samples
        return iter((offset + order[self.rank :: self.world_size]).tolist())


class ShardSampler(Sampler[int]):
    """Every `world_size`-th index from `rank`, in order, without padding (for evaluation)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, num_samples, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
