"""Training sets of data-free methods, made without reading one training image
(Distiller.stand_in_training_set): the images a method will synthesise, stored like a real
in-memory dataset so the trainer's data paths, augmentation and resume work unchanged, or one
placeholder per item of an epoch for a method that makes new images every step.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from distill.data import DATASETS, DatasetBundle, TensorImageDataset, crop_recipe
from distill.data.transforms import denormalize, tensor_train_transform
from distill.errors import ConfigError


class StepPlaceholders(Dataset):
    """`size` items of nothing: an empty [0,1,1] image and label -1 each. The trainer draws its
    batches (their count sets the steps of an epoch, their size the per-rank batch) and the
    method makes the images itself (DAFL's generator)."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(0, 1, 1), -1


def synthetic_image_set(data: DatasetBundle, labels: torch.Tensor) -> TensorImageDataset:
    """Room for len(labels) uint8 images of the dataset's shape (black until a method fills
    `.images`), augmented by the dataset's own crop/flip recipe from its registry entry and
    normalised with its mean and std. A dataset read from files (no recipe) is refused."""
    recipe = crop_recipe(data.name) if data.name in DATASETS else None
    if recipe is None:
        in_memory = [n for n in DATASETS.list() if crop_recipe(n) is not None]
        raise ConfigError(f"this data-free method stores its images like an in-memory dataset, "
                          f"with its crop/flip recipe; {data.name or 'this dataset'} is read from files",
                          key="dataset", allowed=", ".join(in_memory))
    channels, height, width = data.val[0][0].shape
    padding = recipe["padding"] if recipe["padding"] is not None else max(1, height // 8)
    transform = tensor_train_transform(data.mean, data.std, size=height, padding=padding,
                                       flip=recipe["flip"])
    images = torch.zeros(len(labels), channels, height, width, dtype=torch.uint8)
    return TensorImageDataset(images, labels, transform)


def to_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised images back to uint8 pixels: denormalised, clamped to [0, 1], rounded."""
    return (denormalize(images, mean, std).clamp(0, 1) * 255).round().to(torch.uint8)
