"""Xu, Hsu & Huang 2018, "Training Shallow and Thin Networks for Acceleration via Knowledge
Distillation with Conditional Adversarial Networks" (arXiv 1709.00513): the GAN losses of a
discriminator that tells the teacher's logits (real) from the student's (fake), and the L1
distance between the two logits. All float32 (also under autocast), batch means.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def discriminator_loss(scores_teacher: torch.Tensor, scores_student: torch.Tensor) -> torch.Tensor:
    """-[log D(t) + log(1 - D(s))] with D = sigmoid(score): binary cross-entropy with logits,
    the teacher's scores labelled 1 (real), the student's 0 (fake), each averaged over the batch
    and the two summed. Computed from the raw scores (softplus), finite for any score."""
    t, s = scores_teacher.float(), scores_student.float()
    return (F.binary_cross_entropy_with_logits(t, torch.ones_like(t))
            + F.binary_cross_entropy_with_logits(s, torch.zeros_like(s)))


def generator_loss(scores_student: torch.Tensor) -> torch.Tensor:
    """-log D(s), the non-saturating generator loss (Goodfellow et al. 2014): the student
    wants its logits scored as the teacher's (label 1); batch mean."""
    s = scores_student.float()
    return F.binary_cross_entropy_with_logits(s, torch.ones_like(s))


def logits_l1_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor) -> torch.Tensor:
    """||t(x) - s(x)||_1: the L1 norm of the logit difference summed over classes, averaged over
    the batch (the paper's L1 term, as pix2pix pairs an L1 loss with the GAN loss)."""
    diff = logits_student.float() - logits_teacher.float()
    return diff.abs().sum(dim=1).mean()
