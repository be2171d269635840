"""Adversarial KD (Xu, Hsu & Huang 2018, "Training Shallow and Thin Networks for Acceleration
via Knowledge Distillation with Conditional Adversarial Networks", arXiv 1709.00513): KD plus
a discriminator that learns to tell the teacher's logits (real) from the student's (fake),
conditioned on the label, while the student learns to fool it.

Per batch, as a GAN alternates: (1) the discriminator steps on the teacher's logits against
the student's, detached (`discriminator_loss`, plus `category_weight` x a category head's CE on
both when that is on); (2) the student steps on `ce_weight` x CE + `kd_weight` x KD (the
reference KD loss at `temperature`) + `adv_weight` x `generator_loss` (non-saturating) of the
updated discriminator's scores + `l1_weight` x `logits_l1_loss`. The discriminator's
parameters take no gradient in the student's step (their requires_grad is off for it).

The discriminator is an MLP on the logits: `layers` fully connected layers, `hidden` units,
LeakyReLU(0.2) between them; with `conditional` (default) the label's one-hot vector is
concatenated to the logits it reads, as a conditional GAN's discriminator. It learns with Adam
(no weight decay) at a constant `disc_lr` (optimizer "discriminator"), as GAN discriminators
usually do: with the run's SGD at CIFAR's lr it wins within a few steps and the student's
logits, pushed to fool it, blow up (digits: non-finite at step 52).
The paper has no released code, and its layer sizes, loss weights and optimiser are in no source
we could reach: the defaults (configs/distiller/adversarial_kd.yaml) are ours, KD's the
reference CIFAR-100 KD weights.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import kd_loss
from distill.losses.adversarial import discriminator_loss, generator_loss, logits_l1_loss
from distill.method import DISTILLERS, BuildInfo, Distiller, Traits, call_model
from distill.method.checks import OVERFLOW, require


class LogitDiscriminator(nn.Module):
    """An MLP on (logits[, one-hot label]) -> (real/fake score, class scores or None)."""

    def __init__(self, num_classes: int, hidden: int = 500, layers: int = 3,
                 conditional: bool = False, category: bool = True):
        super().__init__()
        self.num_classes, self.conditional, self.category = num_classes, conditional, category
        width = num_classes * (2 if conditional else 1)
        body: list[nn.Module] = []
        for _ in range(layers - 1):
            body += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
            width = hidden
        body.append(nn.Linear(width, 1 + (num_classes if category else 0)))
        self.net = nn.Sequential(*body)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = logits
        if self.conditional:
            x = torch.cat([x, F.one_hot(targets, self.num_classes).to(x.dtype)], dim=1)
        out = self.net(x)
        return out[:, 0], (out[:, 1:] if self.category else None)


@DISTILLERS.register("adversarial_kd",
                     family="adversarial",
                     summary=("KD plus a discriminator of teacher and student logits that the "
                              "student fools"),
                     paper='Adversarial KD, Xu, Hsu & Huang 2018 (arXiv 1709.00513)',
                     recipe=('CE 0.1 + KD 0.9 (T=4) + 1 x the non-saturating GAN loss of a '
                             'label-conditioned discriminator MLP on the logits (3 layers of 500),'
                             ' trained in alternation with its own optimizer (Adam, constant '
                             '`disc_lr` 2e-4); `l1_weight` adds the L1 logit distance. No code or '
                             'sizes were published: the defaults are ours'),
                     edges={"disc_lr": {"huge": OVERFLOW}})
class AdversarialKD(Distiller):
    traits = Traits(teacher_outputs_only=True, manual_step=True,
                    logit_weights=("ce_weight", "kd_weight", "l1_weight", "adv_weight"))

    def __init__(self, student, teacher, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 temperature: float = 4.0, adv_weight: float = 1.0, l1_weight: float = 0.0,
                 category_weight: float = 0.0, conditional: bool = True, hidden: int = 500,
                 layers: int = 3, disc_lr: float = 2e-4, *, info: BuildInfo):
        super().__init__(student, teacher)
        self.add_trained("discriminator",
                         LogitDiscriminator(info.num_classes, hidden, layers, conditional,
                                            category=category_weight > 0),
                         optimizer="discriminator")
        self.ce_weight, self.l1_weight, self.adv_weight = ce_weight, l1_weight, adv_weight
        self.kd_weight, self.temperature, self.disc_lr = kd_weight, temperature, disc_lr
        self.category_weight = category_weight

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", kd_weight=">=0", temperature=">0", l1_weight=">=0",
                adv_weight=">=0",
                category_weight=">=0", conditional="bool", hidden="int>0", layers="int>0",
                disc_lr=">0")

    @classmethod
    def loss_term_weights(cls, options):
        # the student's terms (category_weight trains the discriminator only)
        return {k: options[k] for k in ("ce_weight", "kd_weight", "l1_weight", "adv_weight")
                if k in options}

    def configure_optimizers(self, default):
        groups = self.parameter_groups()
        return {"main": default(groups["main"]),
                "discriminator": default(groups["discriminator"], constant=True, name="adamw",
                                         lr=self.disc_lr, weight_decay=0.0)}

    def training_step(self, inputs, targets, ctx, step):
        logits = call_model(self.student, inputs)
        logits_teacher = self.teacher_logits(inputs)
        disc = self.discriminator
        # (1) the discriminator: teacher real, student fake (detached)
        real, cls_real = disc(logits_teacher, targets)
        fake, cls_fake = disc(logits.detach(), targets)
        terms = {"disc": discriminator_loss(real, fake)}
        if cls_real is not None:
            terms["disc_category"] = self.category_weight * (
                F.cross_entropy(cls_real.float(), targets) + F.cross_entropy(cls_fake.float(), targets))
        step.backward(sum(terms.values()))
        step.step("discriminator")
        # (2) the student, against the updated discriminator (which takes no gradient here)
        with frozen(disc):
            score, _ = disc(logits, targets)
        student_terms = {"ce": self.ce_weight * self.cross_entropy(logits.float(), targets, ctx),
                         "kd": self.kd_weight * kd_loss(logits, logits_teacher, self.temperature),
                         "adv": self.adv_weight * generator_loss(score)}
        if self.l1_weight:
            student_terms["l1"] = self.l1_weight * logits_l1_loss(logits, logits_teacher)
        step.backward(sum(student_terms.values()))
        step.step("main")
        return {k: v.detach() for k, v in {**terms, **student_terms}.items()}


@contextmanager
def frozen(module: nn.Module):
    """`module`'s parameters without requires_grad for the block (gradients still flow through
    it to its input); the flags put back after."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
