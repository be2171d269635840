"""DKD (Zhao et al., CVPR 2022) with the reference CIFAR-100 defaults: CE 1, alpha 1, beta 8, T 4,
the distillation term ramped up linearly over the first 20 epochs. The reference configs set
beta per pair (2 for resnet56/resnet110 teachers; 6 for wrn40_2 -> wrn16_2/wrn40_1 and the vgg13
pairs), through `tuned.dkd.beta` in configs/experiment/cifar100/. `standardize=True` is logit
standardization (Sun et al., CVPR 2024): both logit tensors z-scored per sample before DKD, whose
reference settings (alpha and beta times the KD weight, base temperature) are in
configs/experiment/cifar100_ls/; the warm-up is unchanged, as there."""
from __future__ import annotations

from distill.losses import dkd_loss, standardize_logits
from distill.method import DISTILLERS, Distiller, Traits, call_model
from distill.method.checks import OFF, OVERFLOW, require


def warmup_ramp(epoch: int, warmup_epochs: int) -> float:
    """A loss term's factor at 0-based `epoch` under mdistiller's linear warm-up (DKD, ReviewKD):
    min(epoch / warmup_epochs, 1) with its 1-based epochs, so the first epoch already has
    1 / warmup_epochs; 1 without a warm-up."""
    return min((epoch + 1) / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0


@DISTILLERS.register("dkd",
                     family="logits",
                     summary=("KD split into target-class and non-target-class terms, weighted "
                              "apart"),
                     published_as=("DKD", "DKD+LS"),
                     paper='Decoupled KD, Zhao et al. CVPR 2022',
                     recipe=('CE 1, alpha 1, beta 8 (per pair: `tuned.dkd.beta`), T=4, linear ramp'
                             ' over 20 epochs; `standardize: true` as for `kd` (`cifar100_ls`: '
                             'alpha and beta times its weight, T 2 or 3)'),
                     table_row=16,
                     edges={"alpha": {"0": OFF, "huge": OVERFLOW},
                            "beta": {"0": OFF, "huge": OVERFLOW},
                            "warmup_epochs": {"0": "no warm-up ramp"}})
class DKD(Distiller):
    traits = Traits(teacher_outputs_only=True, logit_weights=("ce_weight", "alpha", "beta"))

    def __init__(self, student, teacher, ce_weight: float = 1.0, alpha: float = 1.0,
                 beta: float = 8.0, temperature: float = 4.0, warmup_epochs: int = 20,
                 standardize: bool = False):
        super().__init__(student, teacher)
        self.standardize = standardize
        self.ce_weight = ce_weight
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs

    @classmethod
    def check_values(cls, options):
        require(options, temperature=">0", ce_weight=">=0", alpha=">=0", beta=">=0",
                warmup_epochs=">=0", standardize="bool")

    @classmethod
    def loss_term_weights(cls, options):
        return {k: options[k] for k in ("ce_weight", "alpha", "beta") if k in options}

    def forward(self, inputs, targets, ctx):
        logits = call_model(self.student, inputs)
        logits_teacher = self.teacher_logits(inputs)
        ramp = warmup_ramp(ctx.epoch, self.warmup_epochs)
        s, t = ((standardize_logits(logits), standardize_logits(logits_teacher))
                if self.standardize else (logits, logits_teacher))
        return logits, {
            "ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
            "dkd": ramp * dkd_loss(s, t, targets, self.alpha, self.beta, self.temperature),
        }
