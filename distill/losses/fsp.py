"""Flow of Solution Procedure (Yim et al., CVPR 2017, "A Gift from Knowledge Distillation")."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from distill.losses.at import pooled_to_common_size


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """(N, C_top, C_bottom) FSP matrix G[n, j, i] = sum_hw top_j * bottom_i / (H*W) of two maps
    of one network (the reference code's layout). If their spatial sizes differ the larger map is
    adaptive-avg-pooled to the smaller first, as the reference does (it pools to a square
    (H, H); here to the per-dimension minimum, the same for square maps). Float32, autocast off.
    """
    with torch.autocast(device_type=bottom.device.type, enabled=False):
        b, t = pooled_to_common_size(bottom.float(), top.float())
        b, t = b.flatten(2), t.flatten(2)
        # autocast is off: in bf16 the Gram product's rounding would swamp the differences
        return torch.bmm(t, b.transpose(1, 2)) / b.shape[2]


def fsp_loss(feats_student: Sequence[torch.Tensor],
             feats_teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over consecutive pairs (f_i, f_{i+1}) of the mean over batch and matrix entries of
    (G_s - G_t)^2, G being `fsp_matrix`; pairs weighted equally.

    Follows RepDistiller distiller_zoo/FSP.py. Code vs paper: the paper sums the squared
    entries of each matrix difference (squared Frobenius norm, mean over samples, weights
    lambda_i); the code also averages over the C_top*C_bottom entries, with all weights 1.
    Student and teacher spatial sizes may differ (FSP matrices are channel x channel), but the
    matrices are compared entry by entry, so the reference requires equal channel counts
    layer by layer; a pair whose student and teacher FSP shapes differ raises ValueError.
    """
    feats_student, feats_teacher = list(feats_student), list(feats_teacher)
    if len(feats_student) != len(feats_teacher):
        raise ValueError("fsp_loss: student and teacher give different numbers of feature maps "
                         f"({len(feats_student)} vs {len(feats_teacher)})")
    if len(feats_student) < 2:
        raise ValueError("fsp_loss needs at least 2 feature maps per network (FSP matrices are "
                         f"between consecutive maps), got {len(feats_student)}")
    for f in feats_student + feats_teacher:
        if f.dim() != 4:
            raise ValueError(f"fsp_loss expects 4-D (N, C, H, W) features, got shape {tuple(f.shape)}")
    batches = {f.shape[0] for f in feats_student + feats_teacher}
    if len(batches) != 1:
        raise ValueError(f"fsp_loss: feature maps have different batch sizes {sorted(batches)}")
    for i in range(len(feats_student) - 1):
        s_shape = (feats_student[i + 1].shape[1], feats_student[i].shape[1])
        t_shape = (feats_teacher[i + 1].shape[1], feats_teacher[i].shape[1])
        if s_shape != t_shape:
            raise ValueError(f"fsp_loss: pair {i} (maps {i} and {i + 1}) has student FSP matrix "
                             f"{s_shape[0]}x{s_shape[1]} but teacher {t_shape[0]}x{t_shape[1]}; "
                             "FSP compares the matrices entry by entry, so student and teacher "
                             "channel counts must be equal (the reference raises here too)")
    total = None
    for i in range(len(feats_student) - 1):
        g_s = fsp_matrix(feats_student[i], feats_student[i + 1])
        g_t = fsp_matrix(feats_teacher[i], feats_teacher[i + 1])
        term = (g_s - g_t).pow(2).mean()
        total = term if total is None else total + term
    return total
