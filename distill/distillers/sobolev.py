"""Sobolev KD (Czarnecki et al., NeurIPS 2017, stochastic Sobolev training): KD (CE 0.1, KD 0.9,
T=4, the reference recipe) plus `sobolev_weight` x `sobolev_loss`, the squared gap between the
student's and the teacher's input gradients of the logits projected on a direction v drawn
uniformly on the unit sphere, one per sample and step. v comes from a generator seeded by
(run seed, step), so a resumed run draws the same directions. The student is forwarded once (on
a leaf copy of the images that requires grad) for every term; the teacher's input gradient is
taken through its frozen weights. The paper distils Atari policies, not images, and gives no
weight for this setting: the default weight is ours.
"""
from __future__ import annotations

import torch

from distill.losses import kd_loss
from distill.losses.sobolev import input_gradient_gap, unit_sphere
from distill.method import DISTILLERS, BuildInfo, Distiller, Traits
from distill.method.checks import require


@DISTILLERS.register("sobolev",
                     family="logits",
                     summary=("KD plus matching the teacher's input gradients along random "
                              "directions"),
                     published_in=("4g",),
                     paper='Sobolev training, Czarnecki et al. NeurIPS 2017',
                     recipe=('KD (CE 0.1, KD 0.9, T=4) + `sobolev_weight` 1 x `sobolev_loss`: the '
                             "squared L2 gap, over every input element, between the student's and "
                             "the teacher's input gradients of the logits projected on a direction"
                             ' drawn on the unit sphere per sample and step (seeded by seed and '
                             'step); trains through a double backward, so no `trainer.compile` and'
                             ' no DDP. The weight is ours (the paper distils Atari policies)'))
class Sobolev(Distiller):
    # input gradients of image pixels: token ids have none
    traits = Traits(needs_images=True, needs=frozenset({"teacher_input_grad", "double_backward"}))

    def __init__(self, student, teacher, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 temperature: float = 4.0, sobolev_weight: float = 1.0, *, info: BuildInfo):
        super().__init__(student, teacher)
        self.ce_weight, self.kd_weight, self.temperature = ce_weight, kd_weight, temperature
        self.sobolev_weight, self.seed = sobolev_weight, info.seed

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", kd_weight=">=0", temperature=">0",
                sobolev_weight=">=0")

    def directions(self, count: int, classes: int, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return unit_sphere(count, classes, generator)

    def forward(self, images, targets, ctx):
        x_student = images.detach().requires_grad_(True)
        logits = self.student(x_student)
        terms = {"ce": self.ce_weight * self.cross_entropy(logits, targets, ctx)}
        if self.sobolev_weight:
            x_teacher = images.detach().requires_grad_(True)
            logits_teacher = self.frozen_forward("teacher", x_teacher, input_grad=True)
            v = self.directions(*logits.shape, ctx.step).to(logits.device)
            terms["sobolev"] = self.sobolev_weight * input_gradient_gap(
                logits, x_student, logits_teacher, x_teacher, v)
            logits_teacher = logits_teacher.detach()
        else:
            logits_teacher = self.teacher_logits(images)
        terms["kd"] = self.kd_weight * kd_loss(logits, logits_teacher, self.temperature)
        return logits, terms
