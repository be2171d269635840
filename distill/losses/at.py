"""Attention Transfer (Zagoruyko & Komodakis, ICLR 2017)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_map(feat: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Spatial attention map of a (N, C, H, W) feature: mean_c |f_c|^p, flattened to (N, H*W)
    and L2-normalised per sample (paper eq. 2 with the reference code's channel mean).

    The normalisation makes the map independent of the feature's scale, so student and teacher
    maps are comparable even when their activations differ in magnitude or channel count.
    Computed in float32: |f|^p of low-precision activations overflows or loses the small entries.
    """
    feat = feat.float()
    return F.normalize(feat.abs().pow(p).mean(1).reshape(feat.shape[0], -1), dim=1)


def at_loss(feat_student: torch.Tensor, feat_teacher: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Mean over batch and positions of (Q_s - Q_t)^2 for one student/teacher feature pair, where
    Q is `attention_map`. Channel counts may differ; the maps are compared position by position.

    When the spatial sizes differ, the larger feature is adaptive-average-pooled to the smaller
    size *before* its map is computed, as the reference code (mdistiller) does; this keeps the
    maps the same length without inventing detail by upsampling the smaller one. (For the
    unusual case where neither feature is at least as large in both dimensions, both are pooled
    to the per-dimension minimum.) The result is float32, also under autocast.
    """
    if feat_student.dim() != 4 or feat_teacher.dim() != 4:
        raise ValueError("at_loss expects 4-D (N, C, H, W) features, got shapes "
                         f"{tuple(feat_student.shape)} and {tuple(feat_teacher.shape)}")
    if feat_student.shape[0] != feat_teacher.shape[0]:
        raise ValueError("at_loss: student and teacher batch sizes differ "
                         f"({feat_student.shape[0]} vs {feat_teacher.shape[0]})")
    size = (min(feat_student.shape[2], feat_teacher.shape[2]),
            min(feat_student.shape[3], feat_teacher.shape[3]))
    fs, ft = feat_student.float(), feat_teacher.float()
    if tuple(fs.shape[2:]) != size:
        fs = F.adaptive_avg_pool2d(fs, size)
    if tuple(ft.shape[2:]) != size:
        ft = F.adaptive_avg_pool2d(ft, size)
    return (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()
