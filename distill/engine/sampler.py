from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def epoch_seed(seed: int, epoch: int) -> int:
    """One seed per (run seed, epoch); the large prime keeps pairs apart (seed 0 epoch 1 is not
    seed 1 epoch 0), so runs with different seeds never share a data order."""
    return seed * 1_000_003 + epoch


class EpochSampler(Sampler[int]):
    """A random order per epoch that depends on (seed, epoch) only and can start mid-epoch.

    Because the order is a pure function of (seed, epoch), a resumed run needs no sampler state:
    it sets the epoch and the position and sees exactly the samples the interrupted run would
    have seen next.
    """

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=generator)[self.start:].tolist())

    def __len__(self) -> int:
        return self.size - self.start
