"""Be Your Own Teacher (Zhang et al., ICCV 2019), the losses of the official journal-version code
(ArchipLab-LinfengZhang/pytorch-self-distillation-final, train.py): a soft cross-entropy from
the deepest classifier to each shallow one, and an L2 distance between features."""
from __future__ import annotations

import torch

from distill.losses.kd import soft_cross_entropy


# -sum_c softmax(t/T)_c log_softmax(s/T)_c, batch mean, no T^2: the official code's
# `CrossEntropy(outputs, targets)` from the deepest exit to a shallow one
byot_soft_ce = soft_cross_entropy


def byot_feature_loss(feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """`torch.dist(feature, teacher_feature)`, as the official code: the plain L2 norm of the whole
    (batch x channels) difference, neither squared nor averaged. float32."""
    return torch.dist(feature.float(), teacher_feature.float())


__all__ = ["byot_feature_loss", "byot_soft_ce"]
