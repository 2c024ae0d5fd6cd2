"""A sampler whose order depends only on (seed, epoch), so a killed run can resume mid-epoch.

Each epoch's permutation is drawn from its own generator; under DDP the permutation is
padded to a multiple of the world size and rank r takes every world-th index starting at r,
so the union of the ranks' i-th batches is exactly the single-process i-th batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Deterministic per-epoch order, sharded over ranks, able to skip consumed samples."""

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ) -> None:
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first `start` samples of this rank."""
        self.epoch = epoch
        self.start = start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        if self.world_size > 1:
            if self.pad and len(order) % self.world_size:
                extra = self.world_size - len(order) % self.world_size
                order += order[:extra]
            order = order[self.rank :: self.world_size]
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.start)

    def epoch_length(self) -> int:
        """Samples this rank sees in a whole epoch (ignoring the skip)."""
        return len(self._indices())
