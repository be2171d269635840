"""FSP, "A Gift from Knowledge Distillation" (Yim et al., CVPR 2017), as RepDistiller runs it
on CIFAR-100 (`--distill fsp -a 0 -b 50`, `--init_epochs 30`, helper/pretrain.py): two stages.

- `init` (`init_epochs`, 30): the student's body trains with `fsp_loss` alone between the FSP
  matrices of consecutive maps (stem output and stage outputs, the reference's feat[:-1]), at
  the run's lr kept constant, with its own SGD.
- `main` (`trainer.epochs`): CE only (the reference's feature term is 0 after the init stage;
  its `-b 50` weighs nothing).
The FSP matrices are compared entry by entry, so every pair needs the teacher's channel counts.
"""
from __future__ import annotations

from distill.distillers.feature_pairs import (INIT_STAGE_EDGES, InitStageDistiller, layer_shapes,
                                             stage_pairs)
from distill.errors import ConfigError
from distill.losses import fsp_loss
from distill.method import DISTILLERS, BuildInfo
from distill.method.checks import require


@DISTILLERS.register("fsp",
                     family="relations",
                     summary=("Pre-training on the teacher's flow between layers (Gram matrices), "
                              "then labels"),
                     published_as=("FSP",),
                     paper='Flow of Solution Procedure, Yim et al. CVPR 2017',
                     recipe=('two stages, as RepDistiller: an init stage of 30 epochs '
                             "(`init_epochs`, at the run's lr kept constant or `init_lr`) trains "
                             "the student's body with the FSP loss (Gram matrices between "
                             'consecutive maps of the stem + stage outputs; equal channel counts '
                             "needed), then CE only for the run's epochs"),
                     table_row=11,
                     edges=INIT_STAGE_EDGES)
class FSP(InitStageDistiller):
    layer_option = "layers"

    def __init__(self, student, teacher, ce_weight: float = 1.0, feat_weight: float = 1.0,
                 init_epochs: int = 30, init_lr: float | None = None,
                 student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, *, info: BuildInfo):
        student_layers, teacher_layers = stage_pairs(type(self), student_layers, teacher_layers,
                                                     info, student=student, teacher=teacher,
                                                     what="stem+stages")
        if len(student_layers) < 2:
            raise ConfigError("FSP relates consecutive maps: give at least two layers",
                              key=self.option_key("student"))
        channels_s = [s[1] for s in layer_shapes(student, student_layers, info)]
        channels_t = [t[1] for t in layer_shapes(teacher, teacher_layers, info)]
        if channels_s != channels_t:
            raise ConfigError(
                f"FSP compares the matrices of consecutive maps entry by entry, so the "
                f"student's channel counts {channels_s} must be the teacher's {channels_t}",
                key=self.option_key("student"),
                allowed="a pair of one family and width (e.g. resnet56 -> resnet20, "
                        "wrn_40_2 -> wrn_16_2, resnet32x4 -> resnet8x4), or layers that match")
        super().__init__(student, teacher, student_layers, teacher_layers, info=info,
                         init_epochs=init_epochs, init_lr=init_lr, ce_weight=ce_weight)
        self.feat_weight = feat_weight

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", feat_weight=">=0", init_epochs=">=0")
        if options.get("init_lr") is not None:
            require(options, init_lr=">0")

    def init_loss(self, feats_student, feats_teacher):
        return {"fsp": self.feat_weight * fsp_loss(feats_student, feats_teacher)}
