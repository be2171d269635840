"""Deterministic synthetic images that a model can learn (for smoke tests; no files needed).

Each class gets its own mean colour and its own low-frequency spatial pattern; every image is that
class template plus per-image Gaussian noise. Train and val share the templates, not the noise.
"""
from __future__ import annotations

import math

import torch

from distill.data import DATASETS, DatasetBundle, check_positive, tensor_bundle
from distill.errors import ConfigError

FAKE_MEAN = (0.5, 0.5, 0.5)
FAKE_STD = (0.25, 0.25, 0.25)


def _templates(num_classes: int, image_size: int, g: torch.Generator) -> torch.Tensor:
    """[C,3,S,S] float templates in roughly [0,1]: class colour + class-specific sinusoid pattern."""
    colour = 0.25 + 0.5 * torch.rand(num_classes, 3, 1, 1, generator=g)
    coords = torch.linspace(0, 2 * math.pi, image_size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    freq = torch.randint(1, 4, (num_classes, 2), generator=g).float()
    phase = 2 * math.pi * torch.rand(num_classes, 3, generator=g)
    pattern = torch.sin(freq[:, 0, None, None, None] * xx + freq[:, 1, None, None, None] * yy
                        + phase[:, :, None, None])  # [C,3,S,S]
    return (colour + 0.2 * pattern).clamp(0, 1)


def _sample(templates: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    c = templates.shape[0]
    labels = torch.arange(n) % c
    labels = labels[torch.randperm(n, generator=g)]
    noise = 0.1 * torch.randn((n, *templates.shape[1:]), generator=g)
    x = ((templates[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return x, labels


@DATASETS.register("fake", num_classes=10, image_size=32, mean=FAKE_MEAN, std=FAKE_STD,
                   padding=None, flip=True)   # padding: an eighth of dataset.image_size
def fake(num_classes: int = 10, train_size: int = 256, val_size: int = 128, image_size: int = 32,
         seed: int = 0) -> DatasetBundle:
    """Synthetic learnable images; identical for the same arguments."""
    check_positive(num_classes, "dataset.num_classes")
    if num_classes < 2:   # one class: every model scores 100%, nothing is learnt or tested
        raise ConfigError(f"must be at least 2, got {num_classes}", key="dataset.num_classes")
    check_positive(train_size, "dataset.train_size")
    check_positive(val_size, "dataset.val_size")
    check_positive(image_size, "dataset.image_size")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"must be an integer, got {seed!r}", key="dataset.seed")
    g = torch.Generator().manual_seed(seed)
    templates = _templates(num_classes, image_size, g)
    xtr, ytr = _sample(templates, train_size, g)
    xva, yva = _sample(templates, val_size, g)
    return tensor_bundle((xtr, ytr), (xva, yva), num_classes=num_classes, mean=FAKE_MEAN,
                         std=FAKE_STD, padding=max(1, image_size // 8))
