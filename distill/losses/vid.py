"""Variational Information Distillation (Ahn et al., CVPR 2019)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def vid_log_scale_init(init_var: float = 5.0, eps: float = 1e-5) -> float:
    """The value to fill each channel's `log_scale` with so that softplus(log_scale) + eps starts
    at `init_var`: softplus^-1(init_var - eps), as RepDistiller and mdistiller initialise it
    (their default init_var 5.0, eps 1e-5).

    Written as x + log(1 - exp(-x)) rather than log(exp(x) - 1) so large variances do not
    overflow; the two are equal.
    """
    x = init_var - eps
    if not x > 0:
        raise ValueError(f"vid_log_scale_init: init_var ({init_var}) must exceed eps ({eps})")
    return x + math.log(-math.expm1(-x))


def vid_loss(pred_mean: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor,
             eps: float = 1e-5) -> torch.Tensor:
    """Gaussian negative log-likelihood of the teacher feature `target` under mean `pred_mean`
    (the regressor's output on the student feature) and a learned per-channel variance
    var_c = softplus(log_scale_c) + eps: mean over all elements of
    0.5 * ((pred_mean - target)^2 / var_c + log var_c), the constant 0.5 log(2 pi) dropped.

    Follows RepDistiller distiller_zoo/VID.py and mdistiller distillers/VID.py (the authors'
    code). Code vs paper: the paper sums the NLL over channels and positions (eq. 5), the code
    averages over batch, channels and positions, so it is the paper's value / (C*H*W).

    Shapes: pred_mean and target are equal, (N, C, ...) with channels on dim 1 (the reference
    uses (N, C, H, W)); log_scale is (C,). Spatial matching is not done here: the reference
    adaptive-avg-pools the larger of the student/teacher maps to the smaller (square) size
    *before* the regressor, so the caller does that. softplus replaces the reference's
    log(1 + exp(.)), which is the same function but overflows for large log_scale.
    Computed in float32 (squared differences of bf16 activations lose precision).
    """
    if pred_mean.shape != target.shape:
        raise ValueError("vid_loss: pred_mean and target shapes differ "
                         f"({tuple(pred_mean.shape)} vs {tuple(target.shape)}); pool the larger "
                         "map to the smaller before the regressor, as the reference does")
    if target.dim() < 2:
        raise ValueError(f"vid_loss expects (N, C, ...) features, got shape {tuple(target.shape)}")
    if log_scale.shape != (target.shape[1],):
        raise ValueError(f"vid_loss: log_scale must have shape ({target.shape[1]},), one entry per "
                         f"target channel, got {tuple(log_scale.shape)}")
    mean, tgt = pred_mean.float(), target.float()
    var = F.softplus(log_scale.float()) + eps
    # one variance per channel, broadcast over the batch and every position
    var = var.reshape(1, -1, *([1] * (target.dim() - 2)))
    return (0.5 * ((mean - tgt).pow(2) / var + var.log())).mean()
