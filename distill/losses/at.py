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
    fs, ft = pooled_to_common_size(feat_student.float(), feat_teacher.float())
    return (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()


def pooled_to_common_size(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (N, C, H, W) maps at the per-dimension minimum of their sizes: the larger one
    adaptive-average-pooled, as the reference code pools the larger map to the smaller."""
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    if tuple(a.shape[2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if tuple(b.shape[2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b
