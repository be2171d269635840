"""KD from a noisy teacher (Sau & Balasubramanian, 2016): the teacher's logits are perturbed,
z' = z (1 + xi) with xi ~ N(0, sigma^2) per logit, on a random `fraction` of each batch's
samples, before the usual KD loss. The noise stands in for learning from several teachers and
acts as a regulariser. Only training batches are perturbed; the teacher's logged top-1 is not.
"""
from __future__ import annotations

from distill.distillers.kd import KD
from distill.losses import perturb_logits
from distill.method import DISTILLERS
from distill.method.checks import OVERFLOW, require


@DISTILLERS.register("noisy_kd",
                     family="logits",
                     summary=("KD from a teacher whose logits are randomly perturbed, as a "
                              "regulariser"),
                     published_in=("4b",),
                     paper='Noisy teacher, Sau & Balasubramanian 2016',
                     recipe=('KD with teacher logits z(1+xi), xi ~ N(0, 0.1^2), on half the '
                             'samples (`sigma`, `fraction`)'),
                     edges={"sigma": {"0": "noisy_kd without noise: plain KD", "huge": OVERFLOW},
                            "fraction": {"0": "noisy_kd noises no example: plain KD"}})
class NoisyKD(KD):
    def __init__(self, student, teacher, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 temperature: float = 4.0, sigma: float = 0.1, fraction: float = 0.5):
        super().__init__(student, teacher, ce_weight, kd_weight, temperature)
        self.sigma, self.fraction = sigma, fraction

    @classmethod
    def check_values(cls, options):
        super().check_values(options)
        require(options, sigma=">=0", fraction="[0,1]")

    def teacher_logits(self, inputs):
        logits = super().teacher_logits(inputs)
        # the global RNG draws the noise: checkpoints carry it, so a resumed run is exact
        return perturb_logits(logits, self.sigma, self.fraction) if self.training else logits
