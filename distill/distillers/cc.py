"""Correlation Congruence (Peng et al., ICCV 2019) with the reference CIFAR-100 recipe
(RepDistiller `--distill correlation -a 0 -b 0.02`): CE 1 plus 0.02 x `cc_loss` between the
pooled embeddings (the reference's feat[-1]), each mapped to `feat_dim` (128) by its own
trained linear head, the teacher's included, as the reference trains both.
"""
from __future__ import annotations

from torch import nn

from distill.distillers.feature_pairs import FeatureDistiller, layer_shapes
from distill.losses import cc_loss
from distill.method import DISTILLERS, BuildInfo, Traits
from distill.method.checks import require


@DISTILLERS.register("cc",
                     family="relations",
                     summary=("The student matches the teacher's correlations between the "
                              "embeddings of a batch"),
                     published_as=("CC",),
                     paper='Correlation Congruence, Peng et al. ICCV 2019',
                     recipe=('CE 1, 0.02 x CC loss between the pooled embeddings, each mapped to '
                             "128 by its own trained linear head (`feat_dim`; the teacher's head "
                             'trains too, as in RepDistiller)'),
                     table_row=5)
class CC(FeatureDistiller):
    # the loss correlates a batch's items with each other: one item gives 0
    traits = Traits(needs_images=True, min_batch=2)

    def __init__(self, student, teacher, ce_weight: float = 1.0, feat_weight: float = 0.02,
                 feat_dim: int = 128, student_layer: str | None = None,
                 teacher_layer: str | None = None, *, info: BuildInfo):
        student_layer, teacher_layer = self.layer_pair(student_layer, teacher_layer, info,
                                                       "pooled")
        super().__init__(student, teacher, [student_layer], [teacher_layer])
        widths = []
        for role, model, name in (("student", student, student_layer),
                                  ("teacher", teacher, teacher_layer)):
            (shape,) = layer_shapes(model, [name], info)
            widths.append(int(shape[1:].numel()))
        # RepDistiller's LinearEmbed: flatten, one linear layer (bias), no normalisation
        self.add_trained("embed_student", nn.Linear(widths[0], feat_dim))
        self.add_trained("embed_teacher", nn.Linear(widths[1], feat_dim))
        self.ce_weight, self.feat_weight = ce_weight, feat_weight

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", feat_weight=">=0", feat_dim="int>0")

    def forward(self, images, targets, ctx):
        logits, _, (feat_s,), (feat_t,) = self.forward_features(images)
        embed_s = self.embed_student(feat_s.flatten(1))
        embed_t = self.embed_teacher(feat_t.flatten(1))
        if embed_s.shape[0] < 2:
            # a batch of one (the last of an epoch) has no neighbouring pair: no CC signal
            congruence = (embed_s.sum() + embed_t.sum()) * 0.0
        else:
            congruence = cc_loss(embed_s, embed_t)
        return logits, {"ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
                        "cc": self.feat_weight * congruence}
