"""Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Each row z-scored over its classes, (z - mean) / (std + 1e-7) with the unbiased std, as
    the logit-standardization code (Sun et al., CVPR 2024) computes it; float32."""
    z = logits.float()
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + 1e-7)


def kd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor,
            temperature: float, standardize: bool = False) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)), summed over classes, averaged over the batch, times T^2.

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label term when
    T changes (Hinton et al. 2015, section 2). Both distributions are taken in log space, so the
    loss stays finite for very confident logits (e.g. 1e4 at T=0.5) where probabilities underflow.
    Computed in float32 even under autocast: low-precision softmax at high T is inaccurate.

    standardize: both logit tensors go through `standardize_logits` first (logit
    standardization; T is then its "base temperature"), the T^2 factor kept, as the reference.
    """
    if standardize:
        logits_student, logits_teacher = (standardize_logits(logits_student),
                                          standardize_logits(logits_teacher))
    log_p_teacher = F.log_softmax(logits_teacher.float() / temperature, dim=1)
    return soft_target_loss(logits_student, log_p_teacher, temperature)


def soft_target_loss(logits_student: torch.Tensor, log_probs_target: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """`kd_loss` against a target distribution given as log-probabilities (e.g. an ensemble of
    teachers, `ensemble_log_probs`): KL(q || softmax(s/T)), class sum, batch mean, times T^2."""
    log_p_student = F.log_softmax(logits_student.float() / temperature, dim=1)
    per_sample = F.kl_div(log_p_student, log_probs_target.float(), reduction="none",
                          log_target=True).sum(1)
    return per_sample.mean() * temperature**2


def soft_cross_entropy(logits_student: torch.Tensor, logits_teacher: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """-sum_c softmax(t/T)_c log_softmax(s/T)_c, averaged over the batch, with no T^2 factor:
    the soft-target loss of the BYOT and BSS reference code. It is KL(p_t || p_s) plus the
    teacher's entropy (the same gradient for the student). Float32."""
    log_p_student = F.log_softmax(logits_student.float() / temperature, dim=1)
    p_teacher = F.softmax(logits_teacher.float() / temperature, dim=1)
    return -(log_p_student * p_teacher).sum(dim=1).mean()
