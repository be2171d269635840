"""Hinton, Vinyals & Dean 2015, section 5: specialists that model a subset of the classes plus
one dustbin class, and the full distribution q that agrees best with a generalist and the
specialists that apply to an example. Tensors in and out; float32; no state.

A specialist here keeps the generalist's C-way head (it starts as a copy of the generalist);
its distribution is over its subset S and a dustbin whose logit is the log-sum-exp of the
logits of the classes outside S (`collapsed_log_probs`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _outside(subset: Sequence[int], num_classes: int, device: torch.device) -> torch.Tensor:
    mask = torch.ones(num_classes, dtype=torch.bool, device=device)
    mask[torch.as_tensor(list(subset), dtype=torch.long, device=device)] = False
    return mask


def collapsed_log_probs(logits: torch.Tensor, subset: Sequence[int], temperature: float = 1.0,
                        dustbin_shift: float = 0.0) -> torch.Tensor:
    """(N, |S|+1) log-probabilities of a specialist from its (N, C) logits: the subset's classes
    in the order given, then the dustbin, whose logit is logsumexp of the other classes' logits
    plus `dustbin_shift` (the paper's correction for a training set enriched for S), all
    divided by the temperature."""
    z = logits.float()
    outside = _outside(subset, z.shape[1], z.device)
    dustbin = torch.logsumexp(z[:, outside], dim=1, keepdim=True) + dustbin_shift
    return F.log_softmax(torch.cat([z[:, list(subset)], dustbin], dim=1) / temperature, dim=1)


def collapsed_targets(targets: torch.Tensor, subset: Sequence[int]) -> torch.Tensor:
    """Labels in a specialist's terms: the position in `subset`, or |S| (the dustbin)."""
    lookup = torch.full((int(targets.max()) + 1 if targets.numel() else 1,), len(subset),
                        dtype=torch.long, device=targets.device)
    for position, c in enumerate(subset):
        if c < lookup.numel():
            lookup[c] = position
    return lookup[targets]


def _collapse(probs: torch.Tensor, subset: Sequence[int]) -> torch.Tensor:
    """(N, C) probabilities -> (N, |S|+1): the subset's, then the mass outside it."""
    outside = _outside(subset, probs.shape[1], probs.device)
    return torch.cat([probs[:, list(subset)], probs[:, outside].sum(1, keepdim=True)], dim=1)


def specialists_objective(log_q: torch.Tensor, log_p_generalist: torch.Tensor,
                          log_p_specialists: Sequence[torch.Tensor],
                          subsets: Sequence[Sequence[int]], active: torch.Tensor) -> torch.Tensor:
    """Per example, KL(p_g, q) + sum over the active specialists m of KL(p_m, q_m), where q_m
    is q collapsed to m's subset and dustbin (the dustbin gets the mass q puts on every class
    m does not model): the paper's eq. 5. `active` is (N, M) bool. Returns (N,)."""
    q = log_q.float().exp()
    total = F.kl_div(log_q.float(), log_p_generalist.float(), reduction="none",
                     log_target=True).sum(1)
    for m, (log_p_m, subset) in enumerate(zip(log_p_specialists, subsets)):
        log_q_m = _collapse(q, subset).clamp_min(torch.finfo(torch.float32).tiny).log()
        kl = F.kl_div(log_q_m, log_p_m.float(), reduction="none", log_target=True).sum(1)
        total = total + torch.where(active[:, m], kl, torch.zeros_like(kl))
    return total


def active_specialists(logits_generalist: torch.Tensor, subsets: Sequence[Sequence[int]],
                       top_n: int = 1) -> torch.Tensor:
    """(N, M) bool: specialist m applies to an example when its subset holds one of the
    generalist's `top_n` most probable classes (the paper's n = 1)."""
    top = logits_generalist.topk(min(top_n, logits_generalist.shape[1]), dim=1).indices
    columns = []
    for subset in subsets:
        members = torch.as_tensor(list(subset), dtype=torch.long, device=top.device)
        columns.append(torch.isin(top, members).any(dim=1))
    return torch.stack(columns, dim=1) if columns else top.new_zeros((top.shape[0], 0),
                                                                     dtype=torch.bool)


def solve_specialists_target(log_p_generalist: torch.Tensor,
                             log_p_specialists: Sequence[torch.Tensor],
                             subsets: Sequence[Sequence[int]], active: torch.Tensor,
                             steps: int = 50) -> torch.Tensor:
    """log q minimising `specialists_objective` for each example, from q = p_g (the answer when
    no specialist is active).

    The paper takes gradient steps on q's logits; we iterate the objective's fixed point
    instead, q <- r / (1 + |A|), where r adds p_g, each active specialist's probabilities of its
    own classes, and its dustbin probability spread over the classes outside its subset in
    proportion to q. The objective's gradient in the logits is (1 + |A|) q - r, so the fixed
    point is where it vanishes; the update is EM for a distribution seen partly through
    dustbins, so every step lowers the (convex) objective, and it gets within 1e-6 of the
    minimum in tens of steps where plain gradient descent needs hundreds at T=1. A plain
    function of its inputs: no autograd, no state."""
    p_g = log_p_generalist.float().exp()
    weight = 1.0 + active.float().sum(1, keepdim=True)
    pieces = []
    for log_p_m, subset in zip(log_p_specialists, subsets):
        outside = _outside(subset, p_g.shape[1], p_g.device)
        p_m = log_p_m.float().exp()
        inside = torch.zeros_like(p_g)
        inside[:, list(subset)] = p_m[:, :-1]
        pieces.append((outside, inside, p_m[:, -1:]))
    q = p_g
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(steps):
        r = p_g.clone()
        for m, (outside, inside, dustbin) in enumerate(pieces):
            mass_outside = (q * outside).sum(1, keepdim=True).clamp_min(tiny)
            share = inside + dustbin * q * outside / mass_outside
            r = r + torch.where(active[:, m:m + 1], share, torch.zeros_like(share))
        q = r / weight
    return q.clamp_min(tiny).log()
