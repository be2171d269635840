"""Activation Boundaries (Heo et al., AAAI 2019) as RepDistiller runs it on CIFAR-100
(`--distill abound -a 0 -b 1`, `--init_epochs 30`, helper/pretrain.py): two stages in one run.

- `init` (`init_epochs`, 30): the student's body and one connector per stage train with the AB
  loss alone between the connected student pre-activations and the teacher's, stage i of n
  weighted 2^(i-n+1) (1/4, 1/2, 1), at the run's lr kept constant, with their own SGD.
- `main` (`trainer.epochs`): CE only, the student alone (the reference's feature term is 0
  after the init stage). The connectors are not used again and are not exported.
A connector is the identity where the two maps have the same channels and size, else the
reference's ConvReg without its ReLU (the maps are pre-activations).
"""
from __future__ import annotations

from torch import nn

from distill.distillers.connectors import ConvRegressor, conv_kind
from distill.distillers.feature_pairs import (INIT_STAGE_EDGES, InitStageDistiller, layer_shapes,
                                             stage_pairs)
from distill.errors import ConfigError
from distill.losses import ab_loss
from distill.method import DISTILLERS, BuildInfo
from distill.method.checks import OVERFLOW, require


@DISTILLERS.register("ab",
                     family="features",
                     summary=("The student learns where the teacher's neurons switch on, then "
                              "trains on labels"),
                     published_as=("AB",),
                     paper='Activation Boundaries, Heo et al. AAAI 2019',
                     recipe=('two stages, as RepDistiller: an init stage of 30 epochs '
                             "(`init_epochs`, at the run's lr kept constant or `init_lr`) trains "
                             "the student's body + connectors with the AB loss (margin 1) on the "
                             'pre-activation stage outputs (layer weights 1/4, 1/2, 1), then CE '
                             "only for the run's epochs"),
                     table_row=9,
                     edges={**INIT_STAGE_EDGES,
                            "margin": {"0": "AB on the activation boundary itself, without a "
                                                  "margin", "huge": OVERFLOW}})
class AB(InitStageDistiller):
    layer_option = "layers"

    def __init__(self, student, teacher, ce_weight: float = 1.0, feat_weight: float = 1.0,
                 margin: float = 1.0, init_epochs: int = 30, init_lr: float | None = None,
                 student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, *, info: BuildInfo):
        student_layers, teacher_layers = stage_pairs(type(self), student_layers, teacher_layers,
                                                     info, student=student, teacher=teacher,
                                                     what="preact")
        super().__init__(student, teacher, student_layers, teacher_layers, info=info,
                         init_epochs=init_epochs, init_lr=init_lr, ce_weight=ce_weight)
        connectors = []
        for name, s, t in zip(student_layers, layer_shapes(student, student_layers, info),
                              layer_shapes(teacher, teacher_layers, info)):
            if s[1] == t[1] and s[2:] == t[2:]:
                connectors.append(nn.Identity())
            elif conv_kind(s, t) is not None:
                connectors.append(ConvRegressor(s, t, relu=False))
            else:
                raise ConfigError(f"no connector maps the student's '{name}' {tuple(s[1:])} onto "
                                  f"the teacher's {tuple(t[1:])}", key=self.option_key("student"),
                                  allowed="maps whose sizes are equal, twice, half or larger")
        self.add_trained("connectors", nn.ModuleList(connectors), optimizer="init")
        count = len(connectors)
        self.layer_weights = [2.0 ** (i - count + 1) for i in range(count)]
        self.feat_weight, self.margin = feat_weight, margin

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", feat_weight=">=0", margin=">=0", init_epochs=">=0")
        if options.get("init_lr") is not None:
            require(options, init_lr=">0")

    def init_loss(self, feats_student, feats_teacher):
        total = sum(w * ab_loss(c(s), t, self.margin) for w, c, s, t in
                    zip(self.layer_weights, self.connectors, feats_student, feats_teacher))
        return {"ab": self.feat_weight * total}
