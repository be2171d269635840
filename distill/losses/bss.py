"""Boundary-supporting samples (Heo, Lee, Yun & Choi, AAAI 2019, "Knowledge Distillation with
Adversarial Samples Supporting Decision Boundary"), as the official code (bhheo/BSS_distillation,
train_BSS_distillation.py and attacks/attack_BSS.py): which samples are attacked, toward which
class, the targeted attack on the teacher, and the two loss weights' schedules. The soft-target
loss on the samples is `soft_cross_entropy` (no T^2), as the reference.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def base_samples(logits_teacher: torch.Tensor, logits_student: torch.Tensor,
                 targets: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the samples to attack: those both networks classify correctly; when more than
    `count`, the `count` with the largest squared gap between the two softmax outputs summed over
    the classes other than the true one."""
    correct = (logits_teacher.argmax(1) == targets) & (logits_student.argmax(1) == targets)
    index = correct.nonzero().flatten()
    if index.numel() <= count:
        return index
    gap = (F.softmax(logits_teacher[index].float(), 1)
           - F.softmax(logits_student[index].float(), 1)).pow(2)
    score = gap.sum(1) - gap.gather(1, targets[index, None]).squeeze(1)
    return index[score.argsort(descending=True, stable=True)[:count]]


def attack_targets(logits_teacher: torch.Tensor) -> torch.Tensor:
    """Each sample's target class: drawn in proportion to the teacher's softmax over the classes
    other than its top-1 (the reference's inverse-CDF draw), from the global RNG (checkpoints
    carry it, so a resumed run draws the same)."""
    logits = logits_teacher.float()
    others = logits.scatter(1, logits.argmax(1, keepdim=True), float("-inf"))
    # softmax over the other classes alone: a confident teacher whose other probabilities all
    # underflow in the full softmax still has a distribution over them
    return torch.multinomial(F.softmax(others, 1), 1).squeeze(1)


def boundary_supporting_samples(teacher: Callable[[torch.Tensor], torch.Tensor],
                                images: torch.Tensor, targets: torch.Tensor, *, steps: int = 10,
                                step_size: float = 0.3,
                                low: torch.Tensor | float = -2.5,
                                high: torch.Tensor | float = 2.5) -> torch.Tensor:
    """The reference's targeted attack on the teacher: up to `steps` times, each sample moves
    along the L2-normalised input gradient of (target logit - original logit) by `step_size` x
    its current margin (original logit - target logit + 1e-4), clamped to [low, high]; a sample
    stops at the first iterate whose teacher top-1 is no longer its original class, and the
    attack ends when all have stopped. The original class is the teacher's top-1 on `images`.
    `teacher` must give gradients with respect to its input. Returns the samples, detached."""
    x = images.detach().clone()
    original = None
    rows = torch.arange(len(x), device=x.device)
    for _ in range(steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            logits = teacher(x).float()
            if original is None:
                original = logits.argmax(1).detach()
            margin = logits[rows, targets] - logits[rows, original]
            (grad,) = torch.autograd.grad(margin.sum(), x)
        moving = (logits.argmax(1) == original).to(x.dtype).detach()
        x = x.detach()
        if not bool(moving.any()):
            break
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        size = step_size * moving * (1e-4 - margin.detach())
        x = x + (size / norm).view(-1, *([1] * (x.dim() - 1))) * grad
        x = torch.maximum(torch.minimum(x, torch.as_tensor(high, device=x.device)),
                          torch.as_tensor(low, device=x.device))
    return x.detach()


def bss_schedule(epoch: int, epochs: int, *, kd_start: float = 4.0, kd_end: float = 1.0,
                 bss_start: float = 2.0, bss_until: float = 0.75) -> tuple[float, float]:
    """(KD weight, BSS weight) at 0-based `epoch` of `epochs`, the reference's with e = epoch + 1:
    KD falls linearly from about kd_start to kd_end (3 (1 - e/E) + 1), BSS from about bss_start
    to 0 at bss_until x E (2 (1 - e / (0.75 E))), no attack after that."""
    e = (epoch + 1) / epochs
    return (kd_end + (kd_start - kd_end) * max(1.0 - e, 0.0),
            bss_start * max(1.0 - e / bss_until, 0.0))
