"""Knowledge Review (Chen, Liu, Zhao & Jia, CVPR 2021, "Distilling Knowledge via Knowledge
Review"): the hierarchical context loss (HCL)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# the pyramid of pooled sizes below the full map, each weighted half the one before it
HCL_LEVELS = (4, 2, 1)


def hcl_loss(feats_student: Sequence[torch.Tensor],
             feats_teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over level pairs (f_s, f_t) of a pyramid of mean squared errors: the MSE of the full
    (N, C, H, W) maps with weight 1, then of both maps adaptive-average-pooled to 4x4, 2x2 and
    1x1 with weights 1/2, 1/4, 1/8, a pooled size skipped when it is not smaller than H; each
    level divided by the sum of the weights it used (so two constant maps a, b give (a - b)^2).
    So H >= 8 weights {H: 1, 4: 1/2, 2: 1/4, 1: 1/8} / 1.875; H = 4: {4: 1, 2: 1/2, 1: 1/4} /
    1.75; H = 2: {2: 1, 1: 1/2} / 1.5; H = 1: {1: 1}.

    Follows the authors' code (dvlab-research/ReviewKD CIFAR-100/model/reviewkd.py `hcl`) and
    mdistiller distillers/ReviewKD.py `hcl_loss`, which are the same: levels are SUMMED, not
    averaged, and the skip test reads the height only (the reference's maps are square).
    Code vs paper: the paper (eq. 6) names the pyramid but not its weights or normalisation;
    these are the code's. `feats_student` are the fused student maps (ABF outputs) and
    `feats_teacher` the teacher's, paired in order; each pair must have the same shape (a
    pooled vector is passed as a (N, C, 1, 1) map). Computed in float32 with autocast off.
    """
    feats_student, feats_teacher = list(feats_student), list(feats_teacher)
    if len(feats_student) != len(feats_teacher):
        raise ValueError("hcl_loss: student and teacher give different numbers of levels "
                         f"({len(feats_student)} vs {len(feats_teacher)})")
    if not feats_student:
        raise ValueError("hcl_loss needs at least one level")
    for i, (fs, ft) in enumerate(zip(feats_student, feats_teacher)):
        if fs.dim() != 4:
            raise ValueError(f"hcl_loss expects (N, C, H, W) maps, level {i} has shape "
                             f"{tuple(fs.shape)} (pass a pooled vector as (N, C, 1, 1))")
        if fs.shape != ft.shape:
            raise ValueError(f"hcl_loss: level {i} student and teacher shapes differ "
                             f"({tuple(fs.shape)} vs {tuple(ft.shape)}); the student map must be "
                             "fused (ABF) to the teacher's channels and size first")
    total = None
    with torch.autocast(device_type=feats_student[0].device.type, enabled=False):
        for fs, ft in zip(feats_student, feats_teacher):
            fs, ft = fs.float(), ft.float()
            height = fs.shape[2]
            level = F.mse_loss(fs, ft)
            weight = norm = 1.0
            for size in HCL_LEVELS:
                if size >= height:
                    continue
                weight /= 2.0
                level = level + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, (size, size)),
                                                    F.adaptive_avg_pool2d(ft, (size, size)))
                norm += weight
            level = level / norm
            total = level if total is None else total + level
    return total


__all__ = ["hcl_loss"]
