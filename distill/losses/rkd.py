"""Relational Knowledge Distillation (Park et al., CVPR 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-12


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of x, via |a|^2 + |b|^2 - 2ab.

    The squared distances are clamped at 1e-12 before the square root: for coincident rows
    the clamp zeroes the gradient, so the infinite derivative of sqrt at 0 is never used.
    The diagonal is then set to exactly 0.
    """
    sq = x.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * (x @ x.t())).clamp(min=_EPS).sqrt()
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    return d * off_diagonal


def _distance_potential(x: torch.Tensor) -> torch.Tensor:
    """psi_D: pairwise distances divided by their mean over the (positive) off-diagonal pairs."""
    d = _pairwise_distances(x)
    return d / d[d > 0].mean()


def _angle_potential(x: torch.Tensor) -> torch.Tensor:
    """psi_A, flattened: entry (j, i, k) is the cosine of the angle at x_j between x_i - x_j and
    x_k - x_j (the reference code's layout). Zero difference vectors normalise to 0."""
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
    return torch.bmm(e, e.transpose(1, 2)).reshape(-1)


def rkd_loss(embed_student: torch.Tensor, embed_teacher: torch.Tensor,
             distance_weight: float = 25.0, angle_weight: float = 50.0) -> torch.Tensor:
    """distance_weight * Huber(psi_D(s), psi_D(t)) + angle_weight * Huber(psi_A(s), psi_A(t)).

    Embeddings are flattened to (N, D); student and teacher D may differ, since only distances
    and angles within each batch are compared. Huber is smooth L1 with beta 1, averaged over all
    N^2 distance entries (diagonal included) and all N^3 angle entries, as in the authors' code
    and mdistiller. The teacher potentials are computed under no_grad: they are targets only.
    Everything runs in float32 with autocast disabled, because autocast would run the Gram
    products in bf16/fp16, whose error swamps the differences being measured.
    """
    if embed_student.shape[0] != embed_teacher.shape[0]:
        raise ValueError("rkd_loss: student and teacher batch sizes differ "
                         f"({embed_student.shape[0]} vs {embed_teacher.shape[0]})")
    if embed_student.shape[0] < 2:
        raise ValueError("rkd_loss: RKD needs at least 2 samples in the batch (distances and "
                         f"angles are between samples), got {embed_student.shape[0]}")
    with torch.autocast(device_type=embed_student.device.type, enabled=False):
        s = embed_student.float().reshape(embed_student.shape[0], -1)
        with torch.no_grad():
            t = embed_teacher.float().reshape(embed_teacher.shape[0], -1)
            t_dist, t_angle = _distance_potential(t), _angle_potential(t)
        loss_d = F.smooth_l1_loss(_distance_potential(s), t_dist)
        loss_a = F.smooth_l1_loss(_angle_potential(s), t_angle)
        return distance_weight * loss_d + angle_weight * loss_a
