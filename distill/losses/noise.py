"""Noisy teacher (Sau & Balasubramanian 2016, "Deep Model Compression: Distilling Knowledge
from Noisy Teachers")."""
from __future__ import annotations

import torch


def perturb_logits(logits: torch.Tensor, sigma: float, fraction: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """z' = z * (1 + xi), xi ~ N(0, sigma^2) independently per logit, on a random subset of rows.

    Each sample (row, first dimension) is perturbed independently with probability `fraction`
    (the paper's alpha); the other rows are returned bitwise unchanged. Random numbers come from
    `generator` (on the logits' device) when given, else the global RNG, in this order: first one
    uniform per row (float32, row i is perturbed iff u_i < fraction), then normal noise of the
    full logits shape (float32, drawn for every row, used for the selected ones). Returns a new
    tensor of the input's dtype; the input is not modified.
    """
    if not sigma >= 0:
        raise ValueError(f"perturb_logits: sigma must be >= 0, got {sigma}")
    if not 0 <= fraction <= 1:
        raise ValueError(f"perturb_logits: fraction must be in [0, 1], got {fraction}")
    if logits.dim() < 1:
        raise ValueError("perturb_logits expects logits with a batch dimension, got a scalar")
    if sigma == 0 or fraction == 0:
        return logits.clone()
    n = logits.shape[0]
    u = torch.rand(n, generator=generator, device=logits.device, dtype=torch.float32)
    xi = torch.randn(logits.shape, generator=generator, device=logits.device,
                     dtype=torch.float32) * sigma
    selected = (u < fraction).reshape((n,) + (1,) * (logits.dim() - 1))
    noisy = (logits * (1 + xi)).to(logits.dtype)
    return torch.where(selected, noisy, logits)
