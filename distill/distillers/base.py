"""The Distiller base: a student, an optional frozen teacher, and the method's loss terms.

A distiller's forward returns the student's logits and a dict of *weighted* loss terms
(`ce`, `kd`, `hint`, ...). The trainer sums them and logs each one, so adding a method never
touches the training loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distill.errors import ConfigError
from distill.registry import Registry

DISTILLERS = Registry("distiller")


@dataclass(frozen=True)
class StepContext:
    """Where training is, for methods whose weights follow a schedule (e.g. DKD's warm-up)."""

    epoch: int          # 0-based epoch index
    step: int           # global optimizer step
    epochs: int         # total epochs of the run


class Distiller(nn.Module):
    """Student plus (optionally) a frozen teacher.

    The teacher is registered as a submodule so `.to(device)` moves it, but it is frozen here once
    and for all: no grad, eval mode (even when the distiller is put in train mode), and excluded
    from `trainable_parameters()` and `student_state_dict()`/`connector_state_dict()`.
    """

    requires_teacher: bool = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None):
        super().__init__()
        if self.requires_teacher and teacher is None:
            raise ConfigError(f"distiller '{type(self).__name__}' needs a teacher", key="teacher")
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BN statistics and dropout of the teacher must never change
        return self

    @classmethod
    def check_values(cls, options: dict) -> None:
        """Range checks on config options, run before anything is built. Override per method."""

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images)

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    # --- what trains and what is saved -------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and connector parameters; never the teacher's."""
        return [p for name, p in self.named_parameters()
                if not name.startswith("teacher.") and p.requires_grad]

    def connector_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the method's own modules (connectors), without student and teacher."""
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith(("student.", "teacher."))}

    def load_connector_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("student.", "teacher."))]
        if missing or unexpected:
            raise RuntimeError(f"connector state mismatch: missing {missing}, unexpected {unexpected}")

    def connector_parameter_count(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters()
                   if not n.startswith(("student.", "teacher.")))


def require(options: dict, **rules: str) -> None:
    """`require(options, temperature=">0", kd_weight=">=0")`: a ConfigError naming the first
    option given in `options` that breaks its rule."""
    tests = {">0": lambda v: v > 0, ">=0": lambda v: v >= 0}
    for name, rule in rules.items():
        if name in options and not tests[rule](options[name]):
            raise ConfigError(f"invalid value {options[name]!r}", key=f"distiller.{name}",
                              allowed="a positive number" if rule == ">0" else "zero or positive")


def build_distiller(name: str, student: nn.Module, teacher: nn.Module | None,
                    options: dict) -> Distiller:
    """Build `name` with its config options, naming any unknown or mistyped option."""
    return DISTILLERS.build_from_config(name, options, key="distiller", student=student,
                                        teacher=teacher)
