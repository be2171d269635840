"""DKD (Zhao et al., CVPR 2022) with the reference CIFAR-100 defaults: CE 1, alpha 1, beta 8, T 4,
the distillation term ramped up linearly over the first 20 epochs. The reference configs set
beta per pair (2 for resnet56/resnet110 teachers; 6 for wrn40_2 -> wrn16_2/wrn40_1 and the vgg13
pairs), through `tuned.dkd.beta` in configs/experiment/cifar100/."""
from __future__ import annotations

import torch.nn.functional as F

from distill.distillers.base import DISTILLERS, Distiller, require
from distill.losses import dkd_loss


@DISTILLERS.register("dkd")
class DKD(Distiller):
    def __init__(self, student, teacher, ce_weight: float = 1.0, alpha: float = 1.0,
                 beta: float = 8.0, temperature: float = 4.0, warmup_epochs: int = 20):
        super().__init__(student, teacher)
        self.ce_weight = ce_weight
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs

    @classmethod
    def check_values(cls, options):
        require(options, temperature=">0", ce_weight=">=0", alpha=">=0", beta=">=0",
                warmup_epochs=">=0")

    @classmethod
    def loss_term_weights(cls, options):
        return {k: options[k] for k in ("ce_weight", "alpha", "beta") if k in options}

    def forward(self, images, targets, ctx):
        logits = self.student(images)
        logits_teacher = self.teacher_logits(images)
        # the reference counts epochs from 1, so its first epoch already has weight 1/warmup
        ramp = min((ctx.epoch + 1) / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, targets),
            "dkd": ramp * dkd_loss(logits, logits_teacher, targets, self.alpha, self.beta,
                                   self.temperature),
        }
