"""Activation Boundaries distillation (Heo et al., AAAI 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ab_loss(source: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Alternative (squared-hinge) activation-boundary loss for one layer, weight 1:
    sum over all elements of (margin - s)^2 where t > 0 and s < margin, and (margin + s)^2
    where t <= 0 and s > -margin; divided by the batch size, then by 1000 and times 3.

    `source` is the student's pre-ReLU feature after the connector, `target` the teacher's
    pre-ReLU feature, same shape. The loss pushes each student neuron past the margin on the
    side of zero the teacher neuron is on, so the two share activation boundaries; neurons
    already beyond the margin contribute nothing.

    Follows RepDistiller distiller_zoo/AB.py (criterion_alternative_l2, from the authors'
    code); it weights layer i of n by 2^(i-n+1) (last layer 1), which is the caller's job.
    Code vs paper: the paper states the un-normalised squared-L2 sum; the /batch and *3/1000
    scaling is the code's. Computed in float32.
    """
    if source.shape != target.shape:
        raise ValueError("ab_loss: source (connected student) and target (teacher) shapes differ "
                         f"({tuple(source.shape)} vs {tuple(target.shape)})")
    if source.dim() < 1 or source.shape[0] == 0:
        raise ValueError(f"ab_loss expects a batch-first tensor, got shape {tuple(source.shape)}")
    s, t = source.float(), target.float()
    # relu(m - s)^2 equals the reference's (s - m)^2 * [s <= m] (both 0 at s == m), likewise
    # relu(m + s)^2 for (s + m)^2 * [s > -m]
    hinge = torch.where(t > 0, F.relu(margin - s), F.relu(margin + s))
    return hinge.pow(2).sum() / s.shape[0] / 1000 * 3
