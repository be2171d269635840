"""Soft targets of several teachers (Hinton et al. 2015, section 2: "an arithmetic or geometric
mean of their individual predictive distributions")."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

ENSEMBLE_MODES = ("arithmetic", "geometric")


def ensemble_weights(count: int, weights: Sequence[float] | None) -> list[float]:
    """Equal weights by default; given ones must be `count` non-negative numbers, not all zero.
    Normalised to sum to 1."""
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} teachers")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative and not all zero, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def ensemble_log_probs(logits_list: Sequence[torch.Tensor], temperature: float,
                       mode: str = "arithmetic",
                       weights: Sequence[float] | None = None) -> torch.Tensor:
    """log of `ensemble_probs`, computed in log space (logsumexp for the arithmetic mean), so a
    class every teacher rules out stays finite instead of becoming log(0). Float32."""
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"unknown ensemble mode {mode!r}; allowed: {', '.join(ENSEMBLE_MODES)}")
    if not logits_list:
        raise ValueError("no teacher logits to ensemble")
    w = ensemble_weights(len(logits_list), weights)
    log_probs = torch.stack([F.log_softmax(z.float() / temperature, dim=1) for z in logits_list])
    w = torch.tensor(w, dtype=torch.float32, device=log_probs.device).view(-1, 1, 1)
    if mode == "arithmetic":
        # log sum_i w_i p_i; a zero weight contributes nothing (log 0 = -inf inside logsumexp)
        return torch.logsumexp(log_probs + w.log(), dim=0)
    return F.log_softmax((w * log_probs).sum(0), dim=1)


def ensemble_probs(logits_list: Sequence[torch.Tensor], temperature: float,
                   mode: str = "arithmetic", weights: Sequence[float] | None = None) -> torch.Tensor:
    """One target distribution (N, C) from several teachers' logits at temperature T.

    arithmetic: sum_i w_i softmax(z_i / T), the weighted mean of the distributions;
    geometric:  softmax(sum_i w_i log_softmax(z_i / T)), the renormalised weighted product.
    Weights default to equal and are normalised to sum to 1.
    """
    return ensemble_log_probs(logits_list, temperature, mode, weights).exp()
