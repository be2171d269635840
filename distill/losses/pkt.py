"""Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018)."""
from __future__ import annotations

import torch


def _conditional_probabilities(embed: torch.Tensor, eps: float) -> torch.Tensor:
    """(N, D) -> (N, N): cosine similarities rescaled to [0, 1], each row divided by its sum.

    Rows are divided by (norm + eps), not clamped, as in the authors' code; NaN entries (only
    from non-finite inputs) are set to 0 there, and here too."""
    x = embed / (embed.pow(2).sum(1, keepdim=True).sqrt() + eps)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    sim = (x @ x.t() + 1.0) / 2.0
    return sim / sim.sum(1, keepdim=True)


def pkt_loss(embed_student: torch.Tensor, embed_teacher: torch.Tensor,
             eps: float = 1e-7) -> torch.Tensor:
    """mean_{i,j} p_t(j|i) * log((p_t(j|i) + eps) / (p_s(j|i) + eps)), where p(j|i) is row i of
    `_conditional_probabilities`, the cosine kernel's conditional distribution over the batch.

    Follows RepDistiller distiller_zoo/PKT.py (`cosine_similarity_loss`, the authors' code; the
    same in mdistiller's PKT.py): the mean runs over all N x N entries, so it is the per-row KL
    averaged over rows, divided by N once more. Embeddings are flattened to (N, D); student and
    teacher widths may differ (each side has its own N x N kernel); batch sizes must match. No
    part is detached (the reference detaches the teacher's features in its loop, not here).
    Float32 with autocast off: the probabilities are close to 1/N and their logs need the bits.
    Code vs paper: the code keeps the self-pair j = i in each row, takes the mean instead of the
    sum over pairs and puts eps inside the log.
    """
    if embed_student.shape[0] != embed_teacher.shape[0]:
        raise ValueError("pkt_loss: student and teacher batch sizes differ "
                         f"({embed_student.shape[0]} vs {embed_teacher.shape[0]}); PKT compares "
                         "sample-to-sample similarities within one batch")
    n = embed_student.shape[0]
    with torch.autocast(device_type=embed_student.device.type, enabled=False):
        p_s = _conditional_probabilities(embed_student.float().reshape(n, -1), eps)
        p_t = _conditional_probabilities(embed_teacher.float().reshape(n, -1), eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()
