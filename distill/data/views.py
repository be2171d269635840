"""What a student sees when it learns from a teacher that sees another modality (cross-modal KD:
Gupta, Hoffman & Malik, CVPR 2016, "Cross Modal Distillation for Supervision Transfer", where a
depth or optical-flow network learns from an RGB network on paired images). Here the student's
modality is a rendering of the same image (`dataset.student_view`): each view is a function of
the normalised batch the teacher gets, after augmentation, so the pair is aligned under every
crop and flip by construction. The view is put in front of the student as a forward pre-hook
(`apply_student_view`), so every method, the evaluation and the dry forward see it, and the
model itself stays as it is; the teacher sees the image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.registry import Registry

STUDENT_VIEWS = Registry("student view")
# ITU-R 601 luma, as torchvision's rgb_to_grayscale
LUMA = (0.299, 0.587, 0.114)
LOW_RES_FACTOR = 4


def _pixels(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return images * std + mean


def _gray(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luma of the pixels."""
    luma = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (_pixels(images, mean, std) * luma).sum(1, keepdim=True)


@STUDENT_VIEWS.register("grayscale")
def grayscale(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The luma in every channel, normalised again with the dataset's mean and std."""
    return (_gray(images, mean, std).expand_as(images) - mean) / std


@STUDENT_VIEWS.register("low_res")
def low_res(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A 4x lower resolution (each 4x4 block averaged), bilinearly upsampled back to the input
    size. Both are linear and keep constants, so they commute with the normalisation."""
    small = F.avg_pool2d(images, LOW_RES_FACTOR, ceil_mode=True)
    return F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)


@STUDENT_VIEWS.register("edges")
def edges(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The Sobel gradient magnitude of the luma, scaled to [0, 1] (its largest value on pixels in
    [0, 1] is 4 sqrt 2), in every channel, normalised again."""
    gray = _gray(images, mean, std)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]],
                      dtype=images.dtype, device=images.device)
    kernels = torch.stack([kx, kx.T])[:, None]
    grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    # + 1e-12: sqrt's derivative at 0 is infinite, and a flat region times it is NaN for a
    # method that differentiates the view (Sobolev's input gradients)
    magnitude = (grad.pow(2).sum(1, keepdim=True) + 1e-12).sqrt() / (4 * 2 ** 0.5)
    return (magnitude.expand_as(images) - mean) / std


class StudentViewInput:
    """A forward pre-hook that replaces a model's input with a view of it."""

    def __init__(self, name: str, mean: tuple[float, ...], std: tuple[float, ...]):
        self.name, self.view = name, STUDENT_VIEWS.get(name, key="dataset.student_view")
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        images, *rest = args
        mean = self.mean.to(images.device, images.dtype)
        std = self.std.to(images.device, images.dtype)
        return (self.view(images, mean, std), *rest)


def apply_student_view(models, name: str, mean, std) -> None:
    """Put the view `name` in front of each of `models` (the models a method evaluates: the
    student, DML's peers); its teachers see the image. Methods that cut the student into models
    of their own (BYOT's exits) are refused before (distill.plan): the cut models would skip
    the view."""
    hook = StudentViewInput(name, mean, std)
    for model in models:
        model.register_forward_pre_hook(hook)
