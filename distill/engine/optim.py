"""SGD and the learning-rate schedules of the reference recipes, as one per-step LambdaLR.

The schedule is a function of the fractional epoch, so warm-up is smooth per step while the
multistep decay happens exactly at epoch boundaries, as in the reference CIFAR code
(lr x0.1 when the 0-based epoch index reaches 150, 180, 210).
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence

import torch

from distill.errors import ConfigError


def build_optimizer(params: Iterable[torch.nn.Parameter], *, name: str = "sgd", lr: float,
                    momentum: float = 0.9, weight_decay: float = 5e-4,
                    nesterov: bool = False) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer '{name}'", key="optimizer.name", allowed="sgd, adamw")


def lr_factor_fn(*, name: str, epochs: int, milestones: Sequence[int] = (), gamma: float = 0.1,
                 warmup_epochs: float = 0.0, min_lr_ratio: float = 0.0) -> Callable[[float], float]:
    """factor(t) for t = fractional epoch (global_step / steps_per_epoch)."""
    milestones = sorted(milestones)
    if name not in ("multistep", "cosine", "constant"):
        raise ConfigError(f"unknown scheduler '{name}'", key="scheduler.name",
                          allowed="multistep, cosine, constant")

    def factor(t: float) -> float:
        if warmup_epochs > 0 and t < warmup_epochs:
            return (t + 1e-8) / warmup_epochs if t > 0 else 1.0 / max(1.0, warmup_epochs * 100)
        if name == "multistep":
            return gamma ** bisect.bisect_right(milestones, math.floor(t + 1e-9))
        if name == "cosine":
            span = max(epochs - warmup_epochs, 1e-8)
            progress = min(max((t - warmup_epochs) / span, 0.0), 1.0)
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, epochs: int,
                    name: str = "multistep", milestones: Sequence[int] = (), gamma: float = 0.1,
                    warmup_epochs: float = 0.0, min_lr_ratio: float = 0.0
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step."""
    factor = lr_factor_fn(name=name, epochs=epochs, milestones=milestones, gamma=gamma,
                          warmup_epochs=warmup_epochs, min_lr_ratio=min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: factor(step / steps_per_epoch))
