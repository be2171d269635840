"""Similarity-Preserving KD (Tung & Mori, ICCV 2019) with the reference CIFAR-100 recipe
(RepDistiller `--distill similarity -a 0 -b 3000`, mdistiller SP.FEAT_WEIGHT 3000): CE 1 plus
3000 x `sp_loss` on the last stage output (the reference's feat[-2]). The batch similarity
matrices are compared, so the two maps may have any channel counts and sizes.
"""
from __future__ import annotations


from distill.distillers.feature_pairs import FeatureDistiller
from distill.losses import sp_loss
from distill.method import DISTILLERS, BuildInfo, Traits
from distill.method.checks import require


@DISTILLERS.register("sp",
                     family="relations",
                     summary=("The student matches the teacher's similarities between the images "
                              "of a batch"),
                     published_as=("SP",),
                     paper='Similarity-Preserving KD, Tung & Mori ICCV 2019',
                     recipe=('CE 1, 3000 x the squared difference of the row-normalised batch '
                             'similarity matrices of the last stage output'),
                     table_row=4)
class SP(FeatureDistiller):
    # the loss compares the batch's item-by-item similarity matrices: one item gives 0
    traits = Traits(needs_images=True, min_batch=2)

    def __init__(self, student, teacher, ce_weight: float = 1.0, feat_weight: float = 3000.0,
                 student_layer: str | None = None, teacher_layer: str | None = None,
                 *, info: BuildInfo):
        student_layer, teacher_layer = self.layer_pair(student_layer, teacher_layer, info,
                                                       "stages", pick=lambda names: names[-1])
        super().__init__(student, teacher, [student_layer], [teacher_layer])
        self.ce_weight, self.feat_weight = ce_weight, feat_weight

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", feat_weight=">=0")

    def forward(self, images, targets, ctx):
        logits, _, (feat_s,), (feat_t,) = self.forward_features(images)
        return logits, {"ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
                        "sp": self.feat_weight * sp_loss(feat_s, feat_t)}
