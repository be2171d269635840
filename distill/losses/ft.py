"""Factor Transfer (Kim et al., NeurIPS 2018, "Paraphrasing Complex Network")."""
from __future__ import annotations

import torch

from distill.losses.at import attention_map, pooled_to_common_size


def ft_loss(factor_student: torch.Tensor, factor_teacher: torch.Tensor, p: float = 1) -> torch.Tensor:
    """Mean over batch and positions of |Q_s - Q_t|^p, Q being the per-sample L2-normalised
    channel mean of the squared factor (translator output for the student, paraphraser
    encoder output for the teacher). Channel counts may differ.

    Follows RepDistiller distiller_zoo/FT.py (p1=2 fixed, p2=p). Code vs paper: the paper takes
    the p-norm of the difference of the normalised full factor vectors, the code collapses each
    factor to a spatial map (mean over channels of its square, as AT does) and averages |diff|^p.
    When spatial sizes differ the larger factor is adaptive-avg-pooled to the smaller, as the
    reference does (it pools to a square (H, H); here to the per-dimension minimum, the same for
    square maps). The reference's pow(p) for p != 1 is |.|^p here: equal for even p, and never
    negative. Computed in float32.
    """
    if factor_student.dim() != 4 or factor_teacher.dim() != 4:
        raise ValueError("ft_loss expects 4-D (N, C, H, W) factors, got shapes "
                         f"{tuple(factor_student.shape)} and {tuple(factor_teacher.shape)}")
    if factor_student.shape[0] != factor_teacher.shape[0]:
        raise ValueError("ft_loss: student and teacher batch sizes differ "
                         f"({factor_student.shape[0]} vs {factor_teacher.shape[0]})")
    fs, ft = pooled_to_common_size(factor_student.float(), factor_teacher.float())
    # the code's factor map is AT's attention map with p = 2: mean_c f_c^2, normalised
    diff = (attention_map(fs, 2) - attention_map(ft, 2)).abs()
    return (diff if p == 1 else diff.pow(p)).mean()
