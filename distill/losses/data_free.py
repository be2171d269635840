"""Losses of data-free KD: what a teacher's own statistics say an image of its training set
looks like, for images made from noise (DeepInversion) or by a generator (DAFL).

DeepInversion (Yin et al., CVPR 2020; official NVlabs/DeepInversion, cifar10 script):
`bn_statistics_loss` for each BatchNorm's input, `total_variation_loss`, and CE to the class
each image is made for, weighted and summed (`deepinversion_loss`).
DAFL (Chen et al., ICCV 2019; official huawei-noah/Data-Efficient-Model-Compression, DAFL):
the generator's `dafl_losses` on the teacher's outputs for its images.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bn_statistics_loss(features: torch.Tensor, running_mean: torch.Tensor,
                       running_var: torch.Tensor) -> torch.Tensor:
    """||running_var - var(x)||_2 + ||running_mean - mean(x)||_2 for one BatchNorm's input x
    [N,C,H,W]: the batch statistics over (N,H,W), the variance biased, as BatchNorm computes
    them in training. Plain L2 norms, not squared, as the reference's feature hook."""
    mean = features.mean(dim=(0, 2, 3))
    var = features.var(dim=(0, 2, 3), unbiased=False)
    return (torch.linalg.vector_norm(running_var.to(var.dtype) - var)
            + torch.linalg.vector_norm(running_mean.to(mean.dtype) - mean))


def total_variation_loss(images: torch.Tensor) -> torch.Tensor:
    """The L2 norms (not squared) of the differences between neighbouring pixels: horizontal,
    vertical and both diagonals, summed over the whole batch (the reference's `loss_var`)."""
    return (torch.linalg.vector_norm(images[:, :, :, :-1] - images[:, :, :, 1:])
            + torch.linalg.vector_norm(images[:, :, :-1, :] - images[:, :, 1:, :])
            + torch.linalg.vector_norm(images[:, :, 1:, :-1] - images[:, :, :-1, 1:])
            + torch.linalg.vector_norm(images[:, :, :-1, :-1] - images[:, :, 1:, 1:]))


def deepinversion_loss(logits: torch.Tensor, targets: torch.Tensor, bn_losses: list[torch.Tensor],
                       images: torch.Tensor, *, bn_weight: float, tv_weight: float,
                       l2_weight: float) -> torch.Tensor:
    """The image objective of one DeepInversion step: CE(teacher(x), target class)
    + bn_weight x the sum of `bn_statistics_loss` over every BatchNorm of the teacher
    + tv_weight x `total_variation_loss`(x) + l2_weight x ||x||_2 (x: the jittered images)."""
    loss = F.cross_entropy(logits.float(), targets)
    loss = loss + bn_weight * torch.stack(bn_losses).sum()
    loss = loss + tv_weight * total_variation_loss(images)
    if l2_weight:
        loss = loss + l2_weight * torch.linalg.vector_norm(images)
    return loss


def dafl_losses(logits_teacher: torch.Tensor, features_teacher: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """DAFL's generator losses on the teacher's logits and pooled features for a batch of
    generated images, unweighted:
      one_hot: CE of the logits to their own arg-max (the teacher is sure of each image);
      activation: -mean |features| (images that excite the teacher's features);
      entropy: sum_c pbar_c log10 pbar_c of the batch-mean softmax pbar (minimised: classes
        equally frequent). log10, not ln, as the reference code since its commit 137190b.
    """
    logits = logits_teacher.float()
    pseudo_labels = logits.detach().argmax(dim=1)
    mean_probs = F.softmax(logits, dim=1).mean(dim=0)
    return {"one_hot": F.cross_entropy(logits, pseudo_labels),
            "activation": -features_teacher.float().abs().mean(),
            "entropy": (mean_probs * torch.log(mean_probs)).sum() / math.log(10.0)}
