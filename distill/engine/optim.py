"""SGD and the learning-rate schedules of the reference recipes, as one per-step LambdaLR.

The multistep decay happens exactly at epoch boundaries, as in the reference CIFAR code
(lr x0.1 from the 0-based epoch 150, 180, 210 on); warm-up, when asked for, ramps linearly per
step and multiplies whatever the schedule gives.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence

import torch

from distill.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "cosine", "constant")


def build_optimizer(params: Iterable[torch.nn.Parameter], *, name: str = "sgd", lr: float,
                    momentum: float = 0.9, weight_decay: float = 5e-4,
                    nesterov: bool = False, decay_norm_and_bias: bool = True
                    ) -> torch.optim.Optimizer:
    """`decay_norm_and_bias=False`: no weight decay on parameters of one dimension or none
    (normalisation layers' scales and shifts, every bias), as timm's recipes; the CIFAR
    reference recipes decay every parameter (the default)."""
    if not decay_norm_and_bias:
        params = weight_decay_groups(params, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer '{name}'", key="optimizer.name", allowed=", ".join(OPTIMIZERS))


def weight_decay_groups(params: Iterable[torch.nn.Parameter], weight_decay: float
                        ) -> list[dict]:
    """Two parameter groups: matrices and kernels with `weight_decay`, the rest (norm scales and
    shifts, biases: ndim <= 1) without. Empty groups are left out."""
    params = list(params)
    decayed = [p for p in params if p.ndim > 1]
    plain = [p for p in params if p.ndim <= 1]
    return [g for g in ({"params": decayed, "weight_decay": weight_decay},
                        {"params": plain, "weight_decay": 0.0}) if g["params"]]


def lr_factor_fn(*, name: str, epochs: int, steps_per_epoch: int, milestones: Sequence[int] = (),
                 gamma: float = 0.1, warmup_epochs: float = 0.0, min_lr_ratio: float = 0.0,
                 start_epoch: int = 0) -> Callable[[int], float]:
    """factor(step): the multiplier of the base lr at optimizer step `step` (0-based). With
    `start_epoch`, the schedule begins after that many epochs (a method's stages run first):
    its step 0 is the run's step start_epoch x steps_per_epoch."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown scheduler '{name}'", key="scheduler.name",
                          allowed=", ".join(SCHEDULES))
    milestones = sorted(milestones)
    warmup_steps = warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        step = max(step - start_epoch * steps_per_epoch, 0)
        epoch = step / steps_per_epoch
        if name == "multistep":
            value = gamma ** bisect.bisect_right(milestones, step // steps_per_epoch)
        elif name == "cosine":
            span = max(epochs - warmup_epochs, 1e-8)
            progress = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
            value = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            value = 1.0
        if step < warmup_steps:
            value *= (step + 1) / warmup_steps
        return value

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, epochs: int,
                    name: str = "multistep", milestones: Sequence[int] = (), gamma: float = 0.1,
                    warmup_epochs: float = 0.0, min_lr_ratio: float = 0.0, start_epoch: int = 0
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(
        name=name, epochs=epochs, steps_per_epoch=steps_per_epoch, milestones=milestones,
        gamma=gamma, warmup_epochs=warmup_epochs, min_lr_ratio=min_lr_ratio,
        start_epoch=start_epoch))
