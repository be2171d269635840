"""Relational KD (Park et al., CVPR 2019) with the reference CIFAR-100 recipe (mdistiller):
CE 1 plus `rkd_loss` (distance weight 25, angle weight 50) on the pooled embeddings, i.e. the
inputs of the two classifiers. The embeddings may have different widths: RKD compares the
relations within each batch, never the vectors themselves.
"""
from __future__ import annotations


from distill.distillers.feature_pairs import FeatureDistiller
from distill.losses import rkd_loss
from distill.method import DISTILLERS, BuildInfo, Traits
from distill.method.checks import require


@DISTILLERS.register("rkd",
                     family="relations",
                     summary=("The student matches the distances and angles between the teacher's "
                              "embeddings"),
                     published_as=("RKD",),
                     paper='Relational KD, Park et al. CVPR 2019',
                     recipe='CE 1, distance 25, angle 50 on the pooled embeddings',
                     table_row=7)
class RKD(FeatureDistiller):
    # three items: distances are divided by their mean (two items give 1 and 1) and angles need
    # a triangle, so below three both terms are 0
    traits = Traits(needs_images=True, min_batch=3)

    def __init__(self, student, teacher, ce_weight: float = 1.0, feat_weight: float = 1.0,
                 distance_weight: float = 25.0, angle_weight: float = 50.0,
                 student_layer: str | None = None, teacher_layer: str | None = None,
                 *, info: BuildInfo):
        student_layer, teacher_layer = self.layer_pair(student_layer, teacher_layer, info,
                                                       "pooled")
        super().__init__(student, teacher, [student_layer], [teacher_layer])
        self.ce_weight, self.feat_weight = ce_weight, feat_weight
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", feat_weight=">=0", distance_weight=">=0",
                angle_weight=">=0")

    @classmethod
    def loss_term_weights(cls, options):
        feat = options.get("feat_weight", 1.0)
        return {"ce_weight": options.get("ce_weight", 1.0),
                "feat_weight x distance_weight": feat * options.get("distance_weight", 25.0),
                "feat_weight x angle_weight": feat * options.get("angle_weight", 50.0)}

    def forward(self, images, targets, ctx):
        logits, _, (embed_s,), (embed_t,) = self.forward_features(images)
        if embed_s.shape[0] < 2:
            # a batch of one (the last of an epoch) has no relations: no RKD signal, not a crash
            relational = embed_s.sum() * 0.0
        else:
            relational = rkd_loss(embed_s, embed_t, self.distance_weight, self.angle_weight)
        return logits, {"ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
                        "rkd": self.feat_weight * relational}
