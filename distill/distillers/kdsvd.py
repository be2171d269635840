"""KD-SVD (Lee, Kim & Song, ECCV 2018) as mdistiller runs it on CIFAR-100 (KDSVD.K 1, CE 1,
FEAT 1): CE plus `kdsvd_loss` over the stage outputs (mdistiller's feats[1:]). Student and
teacher stages are compared channel by channel, so their channel counts must agree.
"""
from __future__ import annotations


from distill.distillers.feature_pairs import FeatureDistiller, layer_shapes, stage_pairs
from distill.errors import ConfigError
from distill.losses import kdsvd_loss
from distill.method import DISTILLERS, BuildInfo
from distill.method.checks import require


@DISTILLERS.register("kdsvd",
                     family="relations",
                     summary=("The student matches relations between the teacher's stages, "
                              "compressed by SVD"),
                     paper='KD-SVD, Lee, Kim & Song ECCV 2018',
                     recipe=("as mdistiller's config: CE 1, 1 x the squared difference of student "
                             'and teacher RBF relations between the top (`k` 1) right singular '
                             'vectors of neighbouring stage outputs; student and teacher channel '
                             'counts must agree stage by stage'))
class KDSVD(FeatureDistiller):
    layer_option = "layers"

    def __init__(self, student, teacher, ce_weight: float = 1.0, feat_weight: float = 1.0,
                 k: int = 1, student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, *, info: BuildInfo):
        student_layers, teacher_layers = stage_pairs(type(self), student_layers, teacher_layers,
                                                     info, student=student, teacher=teacher)
        if len(student_layers) < 2:
            raise ConfigError(f"KD-SVD relates neighbouring layers: {len(student_layers)} given",
                              key=self.option_key("student"), allowed="two layers or more")
        shapes_s = layer_shapes(student, student_layers, info)
        shapes_t = layer_shapes(teacher, teacher_layers, info)
        for name_s, name_t, s, t in zip(student_layers, teacher_layers, shapes_s, shapes_t):
            if s[1] != t[1]:
                raise ConfigError(
                    f"KD-SVD compares student and teacher channel by channel, but '{name_s}' has "
                    f"{s[1]} channels and the teacher's '{name_t}' {t[1]}",
                    key=self.option_key("student"),
                    allowed="layers with the teacher's channel counts (e.g. resnet56 -> resnet20, "
                            "resnet32x4 -> resnet8x4, wrn_40_2 -> wrn_16_2)")
        super().__init__(student, teacher, student_layers, teacher_layers)
        self.ce_weight, self.feat_weight, self.k = ce_weight, feat_weight, k

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", feat_weight=">=0", k="int>0")

    def forward(self, images, targets, ctx):
        logits, _, feats_s, feats_t = self.forward_features(images)
        return logits, {
            "ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
            "kdsvd": self.feat_weight * kdsvd_loss(feats_s, feats_t, k=self.k),
        }
