from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def epoch_seed(seed: int, epoch: int) -> int:
    """One seed per (run seed, epoch); the large prime keeps pairs apart (seed 0 epoch 1 is not
    seed 1 epoch 0), so runs with different seeds never share a data order."""
    return seed * 1_000_003 + epoch


def steps_per_epoch(size: int, global_batch: int, world_size: int, min_batch: int = 1) -> int:
    """Global batches per epoch. A last batch that would give a rank fewer than `min_batch`
    samples is dropped: every rank must take part in every step, and a method's loss needs
    `min_batch` (Traits.min_batch) items to mean something."""
    full, rest = divmod(size, global_batch)
    return full + (1 if rest >= world_size * min_batch else 0)


class EpochSampler(Sampler[int]):
    """This rank's share of a random order that depends on (seed, epoch) only, from any batch on.

    The order is one permutation of the whole training set per epoch, cut into global batches of
    `global_batch`; each of the `world_size` ranks takes its contiguous slice of every global
    batch (the last one split as evenly as possible). So N ranks see together exactly the
    samples one process sees with the same global batch, and a resumed run needs no sampler
    state: it sets the epoch and the batch and continues where the interrupted run would have.
    (When the last batch does not split evenly, DDP's average of the ranks' batch means weighs
    its samples slightly unequally; every other step is the one-process step.)

    With `weights` (one non-negative number per item), an epoch is `size` items drawn with
    replacement in proportion to them instead of a permutation, from the same per-epoch
    generator: a specialist's data, half from its classes (Distiller.sample_weights).
    """

    def __init__(self, size: int, seed: int, *, global_batch: int, rank: int = 0,
                 world_size: int = 1, weights: torch.Tensor | None = None, min_batch: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} ranks")
        if weights is not None and (weights.shape != (size,) or not bool((weights >= 0).all())
                                    or not float(weights.sum()) > 0):
            raise ValueError(f"sample weights must be {size} non-negative numbers, not all zero")
        self.weights = None if weights is None else weights.detach().double().cpu()
        self.size, self.seed = size, seed
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.steps = steps_per_epoch(size, global_batch, world_size, min_batch)
        self.epoch = 0
        self.first_batch = 0

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        self.epoch, self.first_batch = epoch, first_batch

    def _slices(self) -> Iterator[tuple[int, int]]:
        per_rank = self.global_batch // self.world_size
        for step in range(self.first_batch, self.steps):
            start = step * self.global_batch
            count = min(self.global_batch, self.size - start)
            if count == self.global_batch:
                yield start + self.rank * per_rank, per_rank
            else:   # the last, partial batch: sizes differ by at most one sample
                base, extra = divmod(count, self.world_size)
                offset = self.rank * base + min(self.rank, extra)
                yield start + offset, base + (1 if self.rank < extra else 0)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = (torch.randperm(self.size, generator=generator) if self.weights is None else
                 torch.multinomial(self.weights, self.size, replacement=True,
                                   generator=generator)).tolist()
        for start, count in self._slices():
            yield from order[start:start + count]

    def __len__(self) -> int:
        return sum(count for _, count in self._slices())
