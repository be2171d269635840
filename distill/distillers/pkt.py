"""Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018) with the reference CIFAR-100
recipe (RepDistiller `--distill pkt -a 0 -b 30000`, mdistiller PKT.FEAT_WEIGHT 30000): CE 1
plus 30000 x `pkt_loss` on the pooled embeddings, the inputs of the two classifiers (the
reference's feat[-1]). The kernels are within each batch, so the widths may differ.
"""
from __future__ import annotations


from distill.distillers.feature_pairs import FeatureDistiller
from distill.losses import pkt_loss
from distill.method import DISTILLERS, BuildInfo, Traits
from distill.method.checks import require


@DISTILLERS.register("pkt",
                     family="relations",
                     summary=("The student matches the teacher's distribution of embedding "
                              "similarities"),
                     published_as=("PKT",),
                     paper='Probabilistic Knowledge Transfer, Passalis & Tefas ECCV 2018',
                     recipe=('CE 1, 30000 x the KL between the cosine-kernel conditional '
                             'distributions of the pooled embeddings over the batch'),
                     table_row=8)
class PKT(FeatureDistiller):
    # the loss compares each item's similarities to the batch's others: one item gives 0
    traits = Traits(needs_images=True, min_batch=2)

    def __init__(self, student, teacher, ce_weight: float = 1.0, feat_weight: float = 30000.0,
                 student_layer: str | None = None, teacher_layer: str | None = None,
                 *, info: BuildInfo):
        student_layer, teacher_layer = self.layer_pair(student_layer, teacher_layer, info,
                                                       "pooled")
        super().__init__(student, teacher, [student_layer], [teacher_layer])
        self.ce_weight, self.feat_weight = ce_weight, feat_weight

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", feat_weight=">=0")

    def forward(self, images, targets, ctx):
        logits, _, (embed_s,), (embed_t,) = self.forward_features(images)
        return logits, {"ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
                        "pkt": self.feat_weight * pkt_loss(embed_s, embed_t)}
