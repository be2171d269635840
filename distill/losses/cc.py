"""Correlation Congruence (Peng et al., ICCV 2019)."""
from __future__ import annotations

import torch


def cc_loss(embed_student: torch.Tensor, embed_teacher: torch.Tensor) -> torch.Tensor:
    """mean_{i=0}^{N-2} sum_d |s_i - t_i|_d * |s_{i+1} - t_{i+1}|_d: for each pair of
    neighbouring samples in the batch, the inner product of their absolute student-teacher
    embedding differences, averaged over the N - 1 pairs.

    Follows RepDistiller distiller_zoo/CC.py (`Correlation.forward`, the authors' code as
    restructured there; mdistiller has no CC). Student and teacher embeddings must have the same
    shape, since they are subtracted element-wise (the reference maps both to feat_dim=128 with
    linear heads first); they are flattened to (N, D), which leaves (N, D) input as it is. The
    pairing depends on the batch order, as in the reference. Needs N >= 2. Float32 with
    autocast off.
    Code vs paper: instead of the paper's ||C_t - C_s||^2 / N^2 over Gaussian-RBF (Taylor)
    correlation matrices, the code uses only neighbouring pairs (i, i+1) and no kernel.
    """
    if embed_student.shape != embed_teacher.shape:
        raise ValueError("cc_loss: student and teacher embeddings must have the same shape "
                         f"(got {tuple(embed_student.shape)} and {tuple(embed_teacher.shape)}); "
                         "map both to one width with embedding heads first")
    n = embed_student.shape[0]
    if n < 2:
        raise ValueError(f"cc_loss: needs at least 2 samples in the batch (it pairs neighbouring "
                         f"samples), got {n}")
    with torch.autocast(device_type=embed_student.device.type, enabled=False):
        delta = (embed_student.float() - embed_teacher.float()).abs().reshape(n, -1)
        return (delta[:-1] * delta[1:]).sum(1).mean()
