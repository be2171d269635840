"""Attention Transfer (Zagoruyko & Komodakis, ICLR 2017) with the reference CIFAR-100 recipe
(CRD / mdistiller): CE 1 plus 1000 x the sum of `at_loss` (p = 2) over the stage outputs.

Stages are paired from the deepest down when the two models have different numbers of them
(every reference pair has the same number, so there the pairing is the reference's).
"""
from __future__ import annotations


from distill.distillers.feature_pairs import FeatureDistiller, stage_pairs
from distill.losses import at_loss
from distill.method import DISTILLERS, BuildInfo
from distill.method.checks import OVERFLOW, require


@DISTILLERS.register("at",
                     family="features",
                     summary=("The student matches the teacher's spatial attention maps at every "
                              "stage"),
                     published_as=("AT",),
                     paper='Attention Transfer, Zagoruyko & Komodakis ICLR 2017',
                     recipe='CE 1, p=2, x1000, summed over the stage outputs',
                     table_row=3,
                     edges={"p": {"huge": OVERFLOW}})
class AT(FeatureDistiller):
    layer_option = "layers"

    def __init__(self, student, teacher, ce_weight: float = 1.0, feat_weight: float = 1000.0,
                 p: float = 2.0, student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, *, info: BuildInfo):
        student_layers, teacher_layers = stage_pairs(type(self), student_layers, teacher_layers,
                                                     info, student=student, teacher=teacher)
        super().__init__(student, teacher, student_layers, teacher_layers)
        self.ce_weight, self.feat_weight, self.p = ce_weight, feat_weight, p

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", feat_weight=">=0", p=">0")

    def forward(self, images, targets, ctx):
        logits, _, feats_s, feats_t = self.forward_features(images)
        return logits, {
            "ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
            "at": self.feat_weight * sum(at_loss(s, t, self.p) for s, t in zip(feats_s, feats_t)),
        }
