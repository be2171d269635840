"""Similarity-Preserving knowledge distillation (Tung & Mori, ICCV 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _similarity(feat: torch.Tensor) -> torch.Tensor:
    """Row-L2-normalised batch Gram matrix of the flattened features, (N, N) (paper eq. 2).
    Only sample-to-sample similarities survive, so the feature shapes of student and teacher
    need not match."""
    x = feat.reshape(feat.shape[0], -1)
    return F.normalize(x @ x.t(), dim=1)


def sp_loss(feat_student: torch.Tensor, feat_teacher: torch.Tensor) -> torch.Tensor:
    """||G_t - G_s||_F^2 / N^2 for one student/teacher feature pair, G the row-normalised batch
    Gram matrix (`_similarity`) of features flattened to (N, -1).

    Follows RepDistiller distiller_zoo/SP.py (`similarity_loss`, identical in mdistiller's SP.py):
    sum of all N^2 squared entries of the difference divided by N^2, i.e. the mean over the
    N x N matrix; the reference returns it as a 1-element tensor, here it is 0-dim. Channel counts
    and spatial sizes may differ; the batch sizes must match (the loss is batch-relational). No
    part is detached: a frozen teacher simply has no gradient to receive. Float32 with autocast
    off, because Gram products of large activations in bf16 are too coarse to compare.
    Code vs paper: none; paper eq. 4 (summed over layer pairs, which the caller does).
    """
    if feat_student.shape[0] != feat_teacher.shape[0]:
        raise ValueError("sp_loss: student and teacher batch sizes differ "
                         f"({feat_student.shape[0]} vs {feat_teacher.shape[0]}); SP compares "
                         "sample-to-sample similarities within one batch")
    n = feat_student.shape[0]
    with torch.autocast(device_type=feat_student.device.type, enabled=False):
        diff = _similarity(feat_teacher.float()) - _similarity(feat_student.float())
        return diff.pow(2).sum() / (n * n)
