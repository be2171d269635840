"""Variational Information Distillation (Ahn et al., CVPR 2019) with the reference CIFAR-100
recipe (RepDistiller `--distill vid -a 0 -b 1`, mdistiller VID.FEAT_WEIGHT 1): CE 1 plus the
sum of `vid_loss` over the stage outputs (the reference's feat[1:-1]), each student map
regressed onto its teacher map by a trained `VIDRegressor` with a learned per-channel variance
(initial 5). The larger of the two maps is average-pooled to the smaller first, as the
reference does; unlike mdistiller, whose variances never train, RepDistiller's do, and so do ours.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from distill.distillers.connectors import VIDRegressor
from distill.distillers.feature_pairs import FeatureDistiller, layer_shapes, stage_pairs
from distill.errors import ConfigError
from distill.losses import vid_loss
from distill.method import DISTILLERS, BuildInfo
from distill.method.checks import OVERFLOW, require


@DISTILLERS.register("vid",
                     family="features",
                     summary=("The teacher's feature maps predicted from the student's (Gaussian, "
                              "learned variance)"),
                     published_as=("VID",),
                     paper='Variational Information Distillation, Ahn et al. CVPR 2019',
                     recipe=('CE 1, 1 x the sum over the stage outputs of the Gaussian NLL of the '
                             "teacher's map under a trained regressor of the student's (three 1x1 "
                             'convs) with a learned per-channel variance (`init_var` 5, `eps` '
                             '1e-5)'),
                     table_row=6,
                     edges={"init_var": {"huge": OVERFLOW}})
class VID(FeatureDistiller):
    layer_option = "layers"

    def __init__(self, student, teacher, ce_weight: float = 1.0, feat_weight: float = 1.0,
                 init_var: float = 5.0, eps: float = 1e-5,
                 student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, *, info: BuildInfo):
        student_layers, teacher_layers = stage_pairs(type(self), student_layers, teacher_layers,
                                                     info, student=student, teacher=teacher)
        super().__init__(student, teacher, student_layers, teacher_layers)
        shapes_s = layer_shapes(student, student_layers, info)
        shapes_t = layer_shapes(teacher, teacher_layers, info)
        # RepDistiller's VIDLoss(s, t, t): the middle width is the teacher's channel count
        self.add_trained("regressors", nn.ModuleList(
            VIDRegressor(s[1], t[1], t[1], init_var=init_var, eps=eps)
            for s, t in zip(shapes_s, shapes_t)))
        self.ce_weight, self.feat_weight, self.eps = ce_weight, feat_weight, eps

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", feat_weight=">=0", init_var=">0", eps=">0")
        if options.get("eps", 1e-5) >= options.get("init_var", 5.0):
            raise ConfigError(f"invalid value {options['eps']!r}: the variance is softplus(.) + "
                              f"eps, which must start at init_var ({options.get('init_var', 5.0)})",
                              key="distiller.eps", allowed="a positive number below init_var")

    def forward(self, images, targets, ctx):
        logits, _, feats_s, feats_t = self.forward_features(images)
        total = 0.0
        for head, f_s, f_t in zip(self.regressors, feats_s, feats_t):
            if f_s.shape[2] > f_t.shape[2]:
                f_s = F.adaptive_avg_pool2d(f_s, f_t.shape[2:])
            elif f_s.shape[2] < f_t.shape[2]:
                f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[2:])
            total = total + vid_loss(head(f_s), f_t, head.log_scale, eps=self.eps)
        return logits, {"ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
                        "vid": self.feat_weight * total}
