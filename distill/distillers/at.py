"""Attention Transfer (Zagoruyko & Komodakis, ICLR 2017) with the reference CIFAR-100 recipe
(CRD / mdistiller): CE 1 plus 1000 x the sum of `at_loss` (p = 2) over the stage outputs.

Stages are paired from the deepest down when the two models have different numbers of them
(every reference pair has the same number, so there the pairing is the reference's).
"""
from __future__ import annotations

import logging

import torch.nn.functional as F

from distill.distillers.base import (
    DISTILLERS, BuildInfo, FeatureDistiller, default_layers, layer_shapes, require)
from distill.errors import ConfigError
from distill.losses import at_loss

log = logging.getLogger("distill")


@DISTILLERS.register("at")
class AT(FeatureDistiller):
    layer_option = "layers"

    def __init__(self, student, teacher, ce_weight: float = 1.0, feat_weight: float = 1000.0,
                 p: float = 2.0, student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, *, info: BuildInfo):
        given = student_layers is not None or teacher_layers is not None
        student_layers = list(student_layers or default_layers(
            info.student_spec, self.option_key("student"), "stages"))
        teacher_layers = list(teacher_layers or default_layers(
            info.teacher_spec, self.option_key("teacher"), "stages"))
        if len(student_layers) != len(teacher_layers):
            if given:
                raise ConfigError(f"{len(student_layers)} student layers but "
                                  f"{len(teacher_layers)} teacher layers", key=self.option_key("student"),
                                  allowed="lists of the same length, paired in order")
            n = min(len(student_layers), len(teacher_layers))
            student_layers, teacher_layers = student_layers[-n:], teacher_layers[-n:]
            log.info("AT pairs the deepest %d stages: %s", n, list(zip(student_layers, teacher_layers)))
        super().__init__(student, teacher, student_layers, teacher_layers)
        for role, model, names in (("student", student, student_layers),
                                   ("teacher", teacher, teacher_layers)):
            for name, shape in zip(names, layer_shapes(model, names, info)):
                if len(shape) != 4:
                    raise ConfigError(f"'{name}' gives a {tuple(shape)} tensor; attention maps need "
                                      "(N, C, H, W) feature maps", key=self.option_key(role))
        self.ce_weight, self.feat_weight, self.p = ce_weight, feat_weight, p

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", feat_weight=">=0", p=">0")

    def forward(self, images, targets, ctx):
        logits, _, feats_s, feats_t = self.forward_features(images)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, targets),
            "at": self.feat_weight * sum(at_loss(s, t, self.p) for s, t in zip(feats_s, feats_t)),
        }
