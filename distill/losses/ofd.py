"""Overhaul of Feature Distillation (Heo et al., ICCV 2019)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Phi(-m/s) at or below this: the channel is almost never negative, and the margin is -3s
MARGIN_CDF_THRESHOLD = 1e-3


def ofd_margin(bn_weight: torch.Tensor, bn_bias: torch.Tensor) -> torch.Tensor:
    """The per-channel margin of a teacher BatchNorm, shape (C,), float32: the expected value
    of the pre-ReLU response where it is negative, E[x | x < 0] for x ~ N(m, s^2), with
    s = |gamma| (`bn_weight`) and m = beta (`bn_bias`):

        m - s * phi(m/s) / Phi(-m/s)     where Phi(-m/s) > 0.001
        -3 s                             elsewhere (m/s above ~3.09: hardly ever negative)

    phi, Phi: the standard normal density and distribution function. Follows
    `get_margin_from_BN` of clovaai/overhaul-distillation CIFAR-100/distiller.py (mdistiller's
    OFD.py is the same code): only the BN's affine parameters are used, never its running
    statistics. Computed in float64 with erfc instead of scipy's norm.cdf (equal to rounding).
    Where gamma is 0 the reference divides by zero; here the limits apply (m where m < 0, else 0).
    Always negative for gamma != 0.
    """
    if bn_weight.dim() != 1 or bn_weight.shape != bn_bias.shape:
        raise ValueError("ofd_margin expects a BatchNorm's weight and bias, two (C,) tensors, got "
                         f"shapes {tuple(bn_weight.shape)} and {tuple(bn_bias.shape)}")
    s = bn_weight.detach().double().abs()
    m = bn_bias.detach().double()
    z = m / s
    cdf = 0.5 * torch.special.erfc(z / math.sqrt(2.0))            # Phi(-m/s)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)      # phi(m/s)
    margin = torch.where(cdf > MARGIN_CDF_THRESHOLD, m - s * pdf / cdf, -3.0 * s)
    return margin.float()


def ofd_loss(feat_student: torch.Tensor, feat_teacher: torch.Tensor,
             margin: torch.Tensor) -> torch.Tensor:
    """Partial L2 distance between the student's map (after the connector, so with the
    teacher's channels) and the teacher's pre-ReLU map, for one feature pair: with
    t' = max(t, margin_c), the sum of (s - t')^2 over every element where s > t' or t' > 0,
    divided by the batch size. Where the teacher is negative (t <= 0) and the student already
    below t', the element costs nothing: below zero only the sign of the response matters.

    Follows `distillation_loss` of clovaai/overhaul-distillation CIFAR-100/distiller.py and
    `feat_loss` of mdistiller OFD.py (three masked terms, the same numbers because the margin is
    negative), with mdistiller's reduction (mean over the batch, sum over C, H, W) and its spatial
    rule: the teacher map is adaptive-average-pooled to the student's H, W (a no-op when they are
    equal, as in every pair of the paper). The caller weights stage i of n by 1/2^(n-i-1) and the
    whole term by 1/1000 on CIFAR (the official /batch/1000, mdistiller's FEAT_WEIGHT 0.001).

    Shapes: feat_student (N, C, H, W), feat_teacher (N, C, H', W'), margin (C,). No gradient
    flows to the teacher map or the margin. Float32 with autocast off (squared differences of
    bf16 activations summed over C*H*W lose precision).
    """
    if feat_student.dim() != 4 or feat_teacher.dim() != 4:
        raise ValueError("ofd_loss expects 4-D (N, C, H, W) features, got shapes "
                         f"{tuple(feat_student.shape)} and {tuple(feat_teacher.shape)}")
    if feat_student.shape[:2] != feat_teacher.shape[:2]:
        raise ValueError("ofd_loss: student (after the connector) and teacher maps must have the "
                         f"same batch size and channels, got {tuple(feat_student.shape)} and "
                         f"{tuple(feat_teacher.shape)}")
    if feat_student.shape[0] == 0:
        raise ValueError("ofd_loss: empty batch")
    channels = feat_teacher.shape[1]
    if margin.shape != (channels,):
        raise ValueError(f"ofd_loss: margin must have shape ({channels},), one value per teacher "
                         f"channel, got {tuple(margin.shape)}")
    with torch.autocast(device_type=feat_student.device.type, enabled=False):
        s = feat_student.float()
        t = feat_teacher.detach().float()
        if t.shape[2:] != s.shape[2:]:
            t = F.adaptive_avg_pool2d(t, s.shape[2:])
        t = torch.maximum(t, margin.detach().to(t).view(1, channels, 1, 1))
        kept = (s > t) | (t > 0)
        sq = (s - t).pow(2)
        return torch.where(kept, sq, torch.zeros_like(sq)).sum() / s.shape[0]


__all__ = ["MARGIN_CDF_THRESHOLD", "ofd_loss", "ofd_margin"]
