"""BSS (Heo, Lee, Yun & Choi, AAAI 2019, "Knowledge Distillation with Adversarial Samples
Supporting Decision Boundary"; official code bhheo/BSS_distillation): KD on the batch plus KD on
boundary-supporting samples, made each step by a targeted attack on the teacher from the
samples both networks get right toward another class (distill.losses.bss).

Per step, as the reference: CE + kd x soft CE(student, teacher) at T=3 (no T^2), where kd falls
from ~4 to 1 over the run; then, while the BSS weight (from ~2 down to 0 at 3/4 of the run) is
positive, up to `attack_fraction` of the batch (the reference: 64 of 256) is attacked
(`attack_steps` 10, `step_size` 0.3) and the student learns bss x soft CE(student(x_adv),
teacher(x_adv)) on the attacked samples, through a second forward that, as the reference's, also
updates its BatchNorm statistics. The reference clamps the samples to +-2.5 in normalised
units; we clamp to each channel's valid pixel range (black to white). "bss" is logged (0 when no
sample qualifies) on every step, so every rank logs the same terms.
"""
from __future__ import annotations

import torch

from distill.losses import soft_cross_entropy
from distill.losses.bss import (attack_targets, base_samples, boundary_supporting_samples,
                                bss_schedule)
from distill.method import DISTILLERS, BuildInfo, Distiller, Traits
from distill.method.checks import OVERFLOW, require


def pixel_range(mean: tuple[float, ...], std: tuple[float, ...]
                ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(lowest, highest) normalised value per channel: what black and white become."""
    return (tuple((0.0 - m) / s for m, s in zip(mean, std)),
            tuple((1.0 - m) / s for m, s in zip(mean, std)))


KD_OFF_AT_END = "BSS's KD weight is 0 at that end of its ramp"
NO_ATTACK = "BSS attacks no sample: its KD schedule alone"


@DISTILLERS.register("bss",
                     family="adversarial",
                     summary="KD also on samples attacked toward the teacher's decision boundary",
                     published_in=("4f",),
                     paper=('Boundary-supporting samples, Heo et al. AAAI 2019 (code '
                            'bhheo/BSS_distillation)'),
                     recipe=('as the code: CE + KD (soft CE at T=3, no T^2, weight 3(1-e/E)+1) + '
                             'BSS (weight 2(1-e/(0.75E)), none after 3/4 of the run): KD on '
                             'samples moved toward another class by a targeted attack on the '
                             'teacher (10 steps of 0.3 x the logit margin along the normalised '
                             "gradient, each stopping when the teacher's class changes) from up to"
                             ' a quarter of the batch (`attack_fraction`), those both networks get'
                             ' right, most disagreeing first; clamped to the valid pixel range; no'
                             ' `trainer.sync_bn` under DDP'),
                     edges={"kd_start": {"0": KD_OFF_AT_END, "huge": OVERFLOW},
                            "kd_end": {"0": KD_OFF_AT_END, "huge": OVERFLOW},
                            "bss_start": {"0": NO_ATTACK, "huge": OVERFLOW},
                            "attack_fraction": {"0": NO_ATTACK},
                            "step_size": {"huge": OVERFLOW}})
class BSS(Distiller):
    # attacks pixels; its KD and BSS weights follow the run's epochs; its second student forward
    # runs only on ranks with samples to attack, and SyncBatchNorm needs every rank in each
    traits = Traits(needs_images=True, follows_run_length=True,
                    needs=frozenset({"teacher_input_grad"}),
                    unsupported={"sync_bn": "its forward on the attacked samples runs only on the "
                                            "ranks that have some, and SyncBatchNorm needs every "
                                            "rank in every forward"})

    def __init__(self, student, teacher, ce_weight: float = 1.0, temperature: float = 3.0,
                 kd_start: float = 4.0, kd_end: float = 1.0, bss_start: float = 2.0,
                 bss_until: float = 0.75, attack_fraction: float = 0.25, attack_steps: int = 10,
                 step_size: float = 0.3, *, info: BuildInfo):
        super().__init__(student, teacher)
        self.ce_weight, self.temperature = ce_weight, temperature
        self.schedule = dict(kd_start=kd_start, kd_end=kd_end, bss_start=bss_start,
                             bss_until=bss_until)
        self.attack_fraction, self.attack_steps, self.step_size = (attack_fraction, attack_steps,
                                                                   step_size)
        low, high = pixel_range(info.mean, info.std)
        self.register_buffer("low", torch.tensor(low).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("high", torch.tensor(high).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", temperature=">0", kd_start=">=0", kd_end=">=0",
                bss_start=">=0", bss_until="(0,1]", attack_fraction="[0,1]",
                attack_steps="int>0", step_size=">0")

    @classmethod
    def loss_term_weights(cls, options):
        return {"ce_weight": options.get("ce_weight", 1.0),
                "kd_weight": max(options.get("kd_start", 4.0), options.get("kd_end", 1.0)),
                "bss_start": options.get("bss_start", 2.0)}

    def forward(self, images, targets, ctx):
        kd_weight, bss_weight = bss_schedule(ctx.epoch, ctx.epochs, **self.schedule)
        logits = self.student(images)
        logits_teacher = self.teacher_logits(images)
        terms = {"ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
                 "kd": kd_weight * soft_cross_entropy(logits, logits_teacher, self.temperature)}
        attacked = torch.zeros(0, dtype=torch.long, device=images.device)
        if bss_weight > 0:
            attacked = base_samples(logits_teacher, logits.detach(), targets,
                                    int(self.attack_fraction * len(images)))
        if attacked.numel():
            adversarial = boundary_supporting_samples(
                lambda x: self.frozen_forward("teacher", x, input_grad=True), images[attacked],
                attack_targets(logits_teacher[attacked]), steps=self.attack_steps,
                step_size=self.step_size, low=self.low.to(images.dtype),
                high=self.high.to(images.dtype))
            terms["bss"] = bss_weight * soft_cross_entropy(
                self.student(adversarial), self.teacher_logits(adversarial), self.temperature)
        else:
            terms["bss"] = logits.new_zeros(())
        return logits, terms
