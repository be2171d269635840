"""Be Your Own Teacher (Zhang et al., ICCV 2019), the losses of the official journal-version code
(ArchipLab-LinfengZhang/pytorch-self-distillation-final, train.py): a soft cross-entropy from
the deepest classifier to each shallow one, and an L2 distance between features."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def byot_soft_ce(logits_student: torch.Tensor, logits_teacher: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """-sum_c softmax(t/T)_c * log_softmax(s/T)_c, averaged over the batch: the official code's
    `CrossEntropy(outputs, targets)`. It is KL(p_teacher || p_student) plus the teacher's entropy
    (same gradient for the student). No T^2 factor, as in the official code. float32."""
    log_p_student = F.log_softmax(logits_student.float() / temperature, dim=1)
    p_teacher = F.softmax(logits_teacher.float() / temperature, dim=1)
    return -(log_p_student * p_teacher).sum(dim=1).mean()


def byot_feature_loss(feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """`torch.dist(feature, teacher_feature)`, as the official code: the plain L2 norm of the whole
    (batch x channels) difference, neither squared nor averaged. float32."""
    return torch.dist(feature.float(), teacher_feature.float())


__all__ = ["byot_feature_loss", "byot_soft_ce"]
