"""CRD: contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020)."""
from __future__ import annotations

import torch

NCE_EPS = 1e-7   # the reference's eps (RepDistiller crd/criterion.py)


def crd_nce_loss(scores: torch.Tensor, n_data: int) -> torch.Tensor:
    """The NCE objective of CRD, as RepDistiller's ContrastLoss computes it.

    scores: (batch, K+1, 1) or (batch, K+1) positive scores exp(<v, m> / T) / Z of one anchor
    against its K+1 memory entries, column 0 the positive pair, the others the K negatives.
    n_data: the size of the training set, the noise distribution being uniform over it
    (P_n = 1 / n_data). With m = K * P_n:
        -(1/B) * sum_i [ log(x_i0 / (x_i0 + m + eps)) + sum_j log(m / (x_ij + m + eps)) ]
    the negatives summed, not averaged, then the batch mean; float32. The reference returns a
    1-element tensor; this one is 0-dim.
    """
    if scores.dim() == 3:
        if scores.shape[2] != 1:
            raise ValueError(f"crd_nce_loss: scores of shape {tuple(scores.shape)}; expected "
                             "(batch, K+1, 1) or (batch, K+1)")
        scores = scores[:, :, 0]
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"crd_nce_loss: scores of shape {tuple(scores.shape)}; expected "
                         "(batch, K+1) with K >= 1 negatives after the positive")
    if n_data < 1:
        raise ValueError(f"crd_nce_loss: n_data must be >= 1, got {n_data}")
    x = scores.float()
    noise = (x.shape[1] - 1) / n_data
    log_positive = torch.log(x[:, 0] / (x[:, 0] + noise + NCE_EPS))
    log_negatives = torch.log(noise / (x[:, 1:] + noise + NCE_EPS))
    return -(log_positive.sum() + log_negatives.sum()) / x.shape[0]
