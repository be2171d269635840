"""The in-memory data path: small datasets (CIFAR, digits, fake) live on the training device as
one uint8 tensor, and each batch is gathered, augmented and normalised there in a few batched
ops, instead of per image in Python (DataLoader + torchvision per sample). A 2-core machine
stops being data-bound, and a GPU is not starved by CPU workers.

The augmentation is the CIFAR recipe the datasets declare with `tensor_train_transform`
(zero-padded random crop, optional horizontal flip, then normalisation), read from that very
pipeline so the two paths cannot drift apart; any other pipeline keeps the DataLoader path.
The random numbers of a batch are a function of (seed, epoch, batch, rank) only, so a resumed
run replays them exactly without saving any generator state.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from torchvision.transforms import v2

from distill.data import TensorImageDataset


@dataclass(frozen=True)
class BatchTransform:
    """Pad-and-crop (`padding` > 0), flip, normalise: a whole uint8 batch [B,3,H,W] at once."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int = 0
    flip: bool = False
    crop_size: tuple[int, int] | None = None   # the crop is the image size (checked per batch)

    @property
    def augments(self) -> bool:
        return self.padding > 0 or self.flip

    @classmethod
    def from_pipeline(cls, transform) -> BatchTransform | None:
        """The batch form of `tensor_train_transform` / `tensor_eval_transform` pipelines;
        None for anything else (those keep the per-sample path)."""
        ops = list(getattr(transform, "transforms", [transform]))
        padding, flip, crop_size = 0, False, None
        if ops and isinstance(ops[0], v2.RandomCrop):
            crop = ops.pop(0)
            pad = crop.padding
            zero_fill = all(v in (0, None) for v in _fill_values(crop.fill))
            if (crop.padding_mode != "constant" or not zero_fill or crop.pad_if_needed
                    or not pad or len(set(pad)) != 1):
                return None
            padding = pad[0]
            crop_size = tuple(crop.size)
        if ops and isinstance(ops[0], v2.RandomHorizontalFlip) and ops[0].p == 0.5:
            ops.pop(0)
            flip = True
        kinds = [type(op) for op in ops]
        if (kinds != [v2.ToDtype, v2.Normalize, v2.ToPureTensor] or not ops[0].scale
                or _dtype_of(ops[0]) is not torch.float32):
            return None
        return cls(tuple(ops[1].mean), tuple(ops[1].std), padding, flip, crop_size)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        return self.normalize(self.geometric(images, generator))

    @property
    def view_count(self) -> int:
        """How many distinct views of an image the pipeline draws from: (2p+1)^2 crop offsets,
        times 2 with the flip (CIFAR: 162). A view's id is (top * (2p+1) + left) * flips + flip,
        in [0, view_count)."""
        side = 2 * self.padding + 1
        return side * side * (2 if self.flip else 1)

    def draw_views(self, n: int, device: torch.device,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """The view ids [n] of a batch of n images, drawn as the crop and flip always were
        (crop tops, crop lefts, then flips), so a generator state gives the same images as
        before view ids existed."""
        views = torch.zeros(n, dtype=torch.long, device=device)
        if self.padding:
            side = 2 * self.padding + 1
            top = torch.randint(0, side, (n,), device=device, generator=generator)
            left = torch.randint(0, side, (n,), device=device, generator=generator)
            views = top * side + left
        if self.flip:
            flip = torch.rand(n, device=device, generator=generator) < 0.5
            views = views * 2 + flip
        return views

    def replay_view(self, rng_state: torch.Tensor) -> int:
        """The view id that torchvision's per-item pipeline of the same recipe (RandomCrop,
        RandomHorizontalFlip: `tensor_train_transform`) draws from the global RNG in state
        `rng_state`: the DataLoader path's view, found without touching its random stream.
        Draw order of the pinned torchvision: crop top, crop left (`randint(0, 2p+1, ())`
        each, RandomCrop.make_params), then `rand(1) >= 0.5` means no flip."""
        generator = torch.Generator()
        generator.set_state(rng_state)
        view = 0
        if self.padding:
            side = 2 * self.padding + 1
            top = int(torch.randint(0, side, (), generator=generator))
            left = int(torch.randint(0, side, (), generator=generator))
            view = top * side + left
        if self.flip:
            view = view * 2 + int(float(torch.rand(1, generator=generator)) < 0.5)
        return view

    def geometric(self, images: torch.Tensor, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
        """The random crop and flip alone: uint8 in, uint8 out."""
        return self.render(images, self.draw_views(images.shape[0], images.device, generator))

    def render(self, images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Each uint8 image [B,3,H,W] seen in its view (`views`: ids [B], see view_count)."""
        flips = 2 if self.flip else 1
        if self.padding:
            side = 2 * self.padding + 1
            offsets = views // flips
            images = self._crop(images, offsets // side, offsets % side)
        if self.flip:
            flip = (views % 2).bool()
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(images.device)
        return (images.float() / 255.0 - mean) / std

    @functools.lru_cache(maxsize=4)
    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as [1,C,1,1] tensors on `device`, made once (not a copy every batch)."""
        return (torch.tensor(self.mean, device=device).view(1, -1, 1, 1),
                torch.tensor(self.std, device=device).view(1, -1, 1, 1))

    def _crop(self, images: torch.Tensor, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        """Each image's crop at (top, left) of its zero-padded copy (torchvision's
        RandomCrop(padding=p) with those offsets)."""
        n, _, h, w = images.shape
        if self.crop_size is not None and self.crop_size != (h, w):
            raise ValueError(f"crop size {self.crop_size} differs from the images' {(h, w)}")
        p = self.padding
        padded = F.pad(images, (p, p, p, p))
        rows = (top[:, None] + torch.arange(h, device=images.device))[:, :, None]   # [n,h,1]
        cols = (left[:, None] + torch.arange(w, device=images.device))[:, None, :]  # [n,1,w]
        batch = torch.arange(n, device=images.device)[:, None, None]
        # gathered as [n,h,w,c]; made plain NCHW so the memory format is the trainer's choice
        return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class ViewTransform:
    """Another view of a training batch, for methods that train on two (MLKD's strong view):
    the training pipeline's crop and flip drawn afresh, then `augment` (uint8 in and out, e.g.
    distill.data.augment's), then the pipeline's normalisation. The same object serves both data
    paths: whole batches on the device, single images (a batch of one) in DataLoader workers."""

    base: BatchTransform
    augment: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        return self.base.normalize(self.augment(self.base.geometric(images, generator), generator))


def tensor_source(dataset) -> tuple[torch.Tensor, BatchTransform] | None:
    """(uint8 images [N,3,H,W] in the dataset's item order, the batch form of its pipeline) of a
    TensorImageDataset or a Subset of one (dataset.train_fraction); None for anything else."""
    indices = None
    if isinstance(dataset, Subset):
        dataset, indices = dataset.dataset, torch.as_tensor(dataset.indices, dtype=torch.long)
    transform = batch_transform_of(dataset)
    if transform is None:
        return None
    return (dataset.images if indices is None else dataset.images[indices]), transform


def tensor_origin(dataset) -> tuple[TensorImageDataset, torch.Tensor] | None:
    """(the TensorImageDataset behind `dataset`, the index there of each of its items): the
    identity for the dataset itself, the subset's indices for a Subset of one
    (dataset.train_fraction); None for anything else."""
    if isinstance(dataset, Subset):
        inner = tensor_origin(dataset.dataset)
        if inner is None:
            return None
        return inner[0], inner[1][torch.as_tensor(dataset.indices, dtype=torch.long)]
    if not isinstance(dataset, TensorImageDataset):
        return None
    return dataset, torch.arange(len(dataset))


def _dtype_of(to_dtype: v2.ToDtype):
    dtype = to_dtype.dtype
    return dtype.get(torch.Tensor, dtype.get("others")) if isinstance(dtype, dict) else dtype


def _fill_values(fill) -> Sequence:
    return list(fill.values()) if isinstance(fill, dict) else [fill]


def batch_transform_of(dataset) -> BatchTransform | None:
    """The batch form of an in-memory dataset's pipeline, or None (then: the DataLoader path)."""
    if not isinstance(dataset, TensorImageDataset) or dataset.transform is None:
        return None
    return BatchTransform.from_pipeline(dataset.transform)


class DeviceBatches:
    """Batches of an in-memory dataset, made on `device`: the images move there once.

    `indices` (a sampler, re-read on each iteration) gives this rank's order; `batch_size` is
    the per-rank batch. `with_indices`: each batch also carries its samples' dataset indices and
    the id of the view each was cropped and flipped to (BatchTransform.view_count), as
    `(images, labels, {"index": LongTensor, "augmentation": LongTensor})`, the training batches'
    form on both data paths. `set_epoch(epoch, first_batch)` mirrors the sampler's, and seeds
    each batch's augmentation from (seed, epoch, batch, rank).
    """

    def __init__(self, dataset: TensorImageDataset, transform: BatchTransform, indices,
                 *, batch_size: int, device: torch.device, seed: int = 0, rank: int = 0,
                 with_indices: bool = False, views: dict[str, ViewTransform] | None = None):
        self.with_indices = with_indices   # training batches: (images, labels, {"index": ...})
        self.views = dict(views or {})     # and each view by name in that dict
        self.images = dataset.images.to(device)
        self.labels = dataset.labels.to(device)
        self.transform, self.indices = transform, indices
        self.batch_size, self.device = batch_size, device
        self.seed, self.rank = seed, rank
        self.epoch, self.first_batch = 0, 0
        self.generator = torch.Generator(device=device)

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        self.epoch, self.first_batch = epoch, first_batch

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[tuple]:
        order = torch.as_tensor(list(self.indices), dtype=torch.long).to(self.device)
        for i, start in enumerate(range(0, len(order), self.batch_size)):
            index = order[start:start + self.batch_size]
            if self.transform.augments or self.views:
                batch = self.first_batch + i
                mixed = ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + batch) * 1_009 + self.rank
                self.generator.manual_seed(mixed % (2**63 - 1))   # any seed: stays in int64
            raw = self.images[index]
            augmentation = self.transform.draw_views(len(index), self.device, self.generator)
            images = self.transform.normalize(self.transform.render(raw, augmentation))
            labels = self.labels[index]
            if not self.with_indices:
                yield images, labels
                continue
            views = {name: view(raw, self.generator) for name, view in self.views.items()}
            yield images, labels, {"index": index, "augmentation": augmentation, **views}


__all__ = ["BatchTransform", "DeviceBatches", "ViewTransform", "batch_transform_of",
           "tensor_origin", "tensor_source"]
