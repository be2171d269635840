"""Neuron Selectivity Transfer (Huang & Wang, "Like What You Like", 2017)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.at import pooled_to_common_size


def _selectivity_vectors(feat: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H*W): each channel's spatial response, L2-normalised (paper eq. 7).
    The normalisation is what makes channel counts and activation scales irrelevant."""
    return F.normalize(feat.reshape(feat.shape[0], feat.shape[1], -1), dim=2)


def _poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch and all channel pairs (i, j) of k(a_i, b_j) = (a_i . b_j)^2, the
    polynomial kernel with d=2, c=0. One batched Gram product instead of the reference code's
    broadcast (N, C_b, C_a, H*W) tensor: same numbers, far less memory."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_loss(feat_student: torch.Tensor, feat_teacher: torch.Tensor) -> torch.Tensor:
    """Squared MMD with the polynomial kernel (d=2, c=0) between the student's and the teacher's
    sets of L2-normalised channel vectors, for one feature pair, averaged over the batch:
    mean k(t, t) + mean k(s, s) - 2 mean k(s, t), each mean over the batch and all channel pairs.

    Follows RepDistiller distiller_zoo/NST.py (`nst_loss` with full_loss=True and `poly_kernel`);
    mdistiller's NST.py is the same code, only summing the stages itself. The teacher-teacher
    term is included but detached, as there: it is a constant that makes the loss a true MMD,
    so identical features give 0. Channel counts may differ. When spatial sizes differ, the larger
    map is adaptive-average-pooled to the smaller before the vectors are formed; the reference
    pools to (H, H) of the smaller map, which is the same for the square maps it is used on (we
    pool each dimension to the smaller one, as at_loss does). Float32 with autocast off, because
    the Gram products in bf16 lose the small differences the MMD measures.
    Code vs paper: the paper states the MMD per sample; the code averages it over the batch.
    """
    if feat_student.dim() != 4 or feat_teacher.dim() != 4:
        raise ValueError("nst_loss expects 4-D (N, C, H, W) features, got shapes "
                         f"{tuple(feat_student.shape)} and {tuple(feat_teacher.shape)}")
    if feat_student.shape[0] != feat_teacher.shape[0]:
        raise ValueError("nst_loss: student and teacher batch sizes differ "
                         f"({feat_student.shape[0]} vs {feat_teacher.shape[0]})")
    with torch.autocast(device_type=feat_student.device.type, enabled=False):
        fs, ft = pooled_to_common_size(feat_student.float(), feat_teacher.float())
        s, t = _selectivity_vectors(fs), _selectivity_vectors(ft)
        return (_poly_kernel_mean(t, t).detach() + _poly_kernel_mean(s, s)
                - 2 * _poly_kernel_mean(s, t))
