"""Neuron Selectivity Transfer (Huang & Wang, 2017) with the reference CIFAR-100 recipe
(RepDistiller `--distill nst -a 0 -b 50`, mdistiller NST.FEAT_WEIGHT 50): CE 1 plus 50 x the sum
of `nst_loss` (polynomial-kernel MMD) over the stage outputs (the reference's feat[1:-1]).
"""
from __future__ import annotations


from distill.distillers.feature_pairs import FeatureDistiller, stage_pairs
from distill.losses import nst_loss
from distill.method import DISTILLERS, BuildInfo
from distill.method.checks import require


@DISTILLERS.register("nst",
                     family="features",
                     summary=("The student matches the distribution of the teacher's neuron "
                              "activations (MMD)"),
                     published_as=("NST",),
                     paper='Neuron Selectivity Transfer, Huang & Wang arXiv 2017',
                     recipe=('CE 1, 50 x the sum over the stage outputs of the polynomial-kernel '
                             '(d=2) MMD between the L2-normalised channel maps'),
                     table_row=12)
class NST(FeatureDistiller):
    layer_option = "layers"

    def __init__(self, student, teacher, ce_weight: float = 1.0, feat_weight: float = 50.0,
                 student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, *, info: BuildInfo):
        student_layers, teacher_layers = stage_pairs(type(self), student_layers, teacher_layers,
                                                     info, student=student, teacher=teacher)
        super().__init__(student, teacher, student_layers, teacher_layers)
        self.ce_weight, self.feat_weight = ce_weight, feat_weight

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", feat_weight=">=0")

    def forward(self, images, targets, ctx):
        logits, _, feats_s, feats_t = self.forward_features(images)
        return logits, {
            "ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
            "nst": self.feat_weight * sum(nst_loss(s, t) for s, t in zip(feats_s, feats_t)),
        }
