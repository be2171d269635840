"""DIST: knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _mean_pearson_over_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over rows of the Pearson correlation of a's and b's rows: the cosine of the
    mean-centred rows, eps added to the product of the norms (the reference code)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return ((a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


def dist_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, beta: float = 1.0,
              gamma: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """beta * T^2 * (1 - inter) + gamma * T^2 * (1 - intra), on p = softmax(logits / T):
    inter, the mean over samples of the Pearson correlation of student and teacher over the
    classes; intra, the mean over classes of their correlation over the batch.

    As the official code (hunto/image_classification_sota, lib/models/losses/dist_kd.py) computes
    it: correlations of probabilities, not logits; both terms times T^2; eps 1e-8 added to the
    product of the norms (so equal inputs give about 1e-4, not exactly 0). Its CIFAR-100 recipe
    is CE 1 + 2 x this at T 4, beta = gamma = 1 (the paper's beta = gamma = 2). Float32.
    """
    if logits_student.shape != logits_teacher.shape or logits_student.dim() != 2:
        raise ValueError(f"dist_loss expects two (batch, classes) tensors of one shape, got "
                         f"{tuple(logits_student.shape)} and {tuple(logits_teacher.shape)}")
    p_s = F.softmax(logits_student.float() / temperature, dim=1)
    p_t = F.softmax(logits_teacher.float() / temperature, dim=1)
    inter = 1 - _mean_pearson_over_rows(p_s, p_t)
    intra = 1 - _mean_pearson_over_rows(p_s.t(), p_t.t())
    return temperature**2 * (beta * inter + gamma * intra)
