"""Vanilla training: cross-entropy on the labels, no teacher. This is how teachers are made."""
from __future__ import annotations


from distill.distillers.base import DISTILLERS, Distiller, require


@DISTILLERS.register("none")
class Vanilla(Distiller):
    requires_teacher = False

    def __init__(self, student, teacher=None, ce_weight: float = 1.0):
        super().__init__(student, None)  # a teacher, if configured, is not used
        self.ce_weight = ce_weight

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">0")

    def forward(self, images, targets, ctx):
        logits = self.student(images)
        return logits, {"ce": self.ce_weight * self.cross_entropy(logits, targets)}
