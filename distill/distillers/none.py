"""Vanilla training: cross-entropy on the labels, no teacher. This is how teachers are made."""
from __future__ import annotations

from distill.method import DISTILLERS, Distiller, Traits, call_model
from distill.method.checks import require


@DISTILLERS.register("none",
                     family="baseline",
                     summary=("Cross-entropy on the labels, no teacher: the baseline, and how "
                              "teachers are made"),
                     published_as=("Student",),
                     paper='cross-entropy only',
                     table_row=0)
class Vanilla(Distiller):
    traits = Traits(needs_teacher=False)

    def __init__(self, student, teacher=None, ce_weight: float = 1.0):
        super().__init__(student, None)  # a teacher, if configured, is not used
        self.ce_weight = ce_weight

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">0")

    def forward(self, inputs, targets, ctx):
        logits = call_model(self.student, inputs)
        return logits, {"ce": self.ce_weight * self.cross_entropy(logits, targets, ctx)}
