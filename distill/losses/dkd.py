"""Decoupled Knowledge Distillation (Zhao et al., CVPR 2022)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor, ignore: torch.Tensor | None = None
             ) -> torch.Tensor:
    """sum_c p (log p - log q) per row; entries in `ignore` (probability 0 in both) count 0.
    Their -inf logs are replaced by 0 before the product (giving 1 * (0 - 0) = 0), so no -inf
    reaches it and no gradient is NaN."""
    if ignore is not None:
        log_p = log_p.masked_fill(ignore, 0.0)
        log_q = log_q.masked_fill(ignore, 0.0)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def dkd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, target: torch.Tensor,
             alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD, each times T^2 and averaged over the batch.

    TCKD: KL between the binary (target, all non-target) probabilities of teacher and student.
    NCKD: KL between their distributions over the non-target classes only.
    The reference code removes the target class by subtracting 1000 from its logit; here it is
    removed exactly (-inf, then its KL term is dropped), and everything stays in log space, so the
    loss is exact for 2 classes and for logits far beyond 1000*T. Computed in float32.
    """
    s = logits_student.float() / temperature
    t = logits_teacher.float() / temperature
    is_target = F.one_hot(target, s.shape[1]).bool()

    def binary_log_probs(scaled_logits: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(scaled_logits, dim=1)
        log_target = log_p.gather(1, target[:, None])
        log_rest = torch.logsumexp(log_p.masked_fill(is_target, float("-inf")), dim=1, keepdim=True)
        return torch.cat([log_target, log_rest], dim=1)

    tckd = _kl_rows(binary_log_probs(t), binary_log_probs(s))
    non_target_t = F.log_softmax(t.masked_fill(is_target, float("-inf")), dim=1)
    non_target_s = F.log_softmax(s.masked_fill(is_target, float("-inf")), dim=1)
    nckd = _kl_rows(non_target_t, non_target_s, ignore=is_target)
    return (alpha * tckd + beta * nckd).mean() * temperature**2
