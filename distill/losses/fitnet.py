"""FitNets hint loss (Romero et al., ICLR 2015)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fitnet_loss(feat_student_projected: torch.Tensor, feat_teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's hint-layer feature, already mapped to the
    teacher's shape by the regressor, and the teacher's hint feature (mean over all elements,
    as in mdistiller). Computed in float32: squared differences of large low-precision
    activations overflow or round badly.
    """
    if feat_student_projected.shape != feat_teacher.shape:
        raise ValueError("fitnet_loss: projected student feature and teacher feature shapes differ "
                         f"({tuple(feat_student_projected.shape)} vs {tuple(feat_teacher.shape)})")
    return F.mse_loss(feat_student_projected.float(), feat_teacher.float())
