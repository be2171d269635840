"""KD (Hinton et al. 2015). Defaults are the reference CIFAR-100 recipe: CE 0.1, KD 0.9, T=4.
`standardize=True` is logit standardization (Sun et al., CVPR 2024): both logit tensors z-scored
per sample before the KD term (`kd_loss(..., standardize=True)`); its reference settings (base
temperature 2, KD weight 9 on CIFAR-100, per pair) are in configs/experiment/cifar100_ls/."""
from __future__ import annotations

from distill.losses import kd_loss
from distill.method import DISTILLERS, Distiller, Traits, call_model
from distill.method.checks import require


@DISTILLERS.register("kd",
                     family="logits",
                     summary=("The student matches the teacher's temperature-softened class "
                              "probabilities"),
                     published_as=("KD", "KD+LS"),
                     published_in=("4h",),
                     paper='Hinton et al. 2015',
                     recipe=('CE 0.1, KD 0.9, T=4; `standardize: true` is logit standardization '
                             '(Sun et al. CVPR 2024, code sunshangquan/logit-standardization-KD): '
                             "each sample's logits z-scored (unbiased std + 1e-7) before KD, with "
                             'its base temperature and weight per pair '
                             '(`experiment=cifar100_ls/<pair>`: T 2, KD 9 mostly)'),
                     table_row=1)
class KD(Distiller):
    traits = Traits(teacher_outputs_only=True)

    def __init__(self, student, teacher, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 temperature: float = 4.0, standardize: bool = False):
        super().__init__(student, teacher)
        self.standardize = standardize
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.temperature = temperature

    @classmethod
    def check_values(cls, options):
        require(options, temperature=">0", ce_weight=">=0", kd_weight=">=0", standardize="bool")

    def forward(self, inputs, targets, ctx):
        logits = call_model(self.student, inputs)
        logits_teacher = self.teacher_logits(inputs)
        return logits, {
            "ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
            "kd": self.kd_weight * kd_loss(logits, logits_teacher, self.temperature,
                                           standardize=self.standardize),
        }
