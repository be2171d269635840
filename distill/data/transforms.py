"""Transforms for `distill.data`.

In-memory datasets (CIFAR, digits, fake) hold uint8 tensors [3,H,W]; their pipelines run
torchvision.transforms.v2 directly on those tensors, so there is no PIL round trip. Folder datasets
(ImageNet, Tiny-ImageNet) read PIL images and convert once. Every pipeline ends with a plain float
tensor, normalised with the dataset's mean/std.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _finish(mean: Sequence[float], std: Sequence[float]) -> list:
    """uint8 image -> float in [0,1] -> normalised plain tensor."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)),
            v2.ToPureTensor()]


def tensor_train_transform(mean: Sequence[float], std: Sequence[float], *, size: int,
                           padding: int = 4, flip: bool = True) -> v2.Compose:
    """The CIFAR recipe on uint8 tensors: RandomCrop(size, padding) [+ horizontal flip] + normalise."""
    ops: list = [v2.RandomCrop(size, padding=padding)]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops + _finish(mean, std))


def tensor_eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Normalise only (uint8 tensor in)."""
    return v2.Compose(_finish(mean, std))


def imagenet_train_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                             std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """PIL in: RandomResizedCrop + horizontal flip + normalise."""
    return v2.Compose([v2.RandomResizedCrop(image_size), v2.RandomHorizontalFlip(),
                       v2.PILToTensor(), *_finish(mean, std)])


def imagenet_eval_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                            std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """PIL in: Resize(size/0.875) + CenterCrop(size) + normalise (the standard 256->224 ratio)."""
    return v2.Compose([v2.Resize(int(image_size / 0.875)), v2.CenterCrop(image_size),
                       v2.PILToTensor(), *_finish(mean, std)])


def pil_crop_train_transform(image_size: int, padding: int, mean: Sequence[float] = IMAGENET_MEAN,
                             std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """PIL in, for small fixed-size images (Tiny-ImageNet): resize to size, pad-crop, flip."""
    return v2.Compose([v2.PILToTensor(), v2.Resize(image_size), v2.CenterCrop(image_size),
                       v2.RandomCrop(image_size, padding=padding), v2.RandomHorizontalFlip(),
                       *_finish(mean, std)])


def pil_eval_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """PIL in: resize/center-crop to size, normalise."""
    return v2.Compose([v2.PILToTensor(), v2.Resize(image_size), v2.CenterCrop(image_size),
                       *_finish(mean, std)])


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of the normalisation: float [...,3,H,W] -> values in [0,1]."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * s + m


def has_flip(transform) -> bool:
    """Whether a Compose pipeline contains a horizontal/vertical flip (digits must not)."""
    ops = getattr(transform, "transforms", [transform])
    return any(isinstance(t, (v2.RandomHorizontalFlip, v2.RandomVerticalFlip)) for t in ops)
