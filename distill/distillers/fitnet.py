"""FitNets (Romero et al., ICLR 2015) as CRD and mdistiller run it on CIFAR-100: CE 1 plus
100 x the MSE between the teacher's hint (a middle stage output) and the student's guided layer
mapped through a trained conv regressor.

`hint_epochs > 0` gives the paper's two-stage schedule instead: for the first `hint_epochs`
epochs only the hint loss trains (so only the student's layers up to the guided layer and the
regressor get gradients), then the whole student trains with CE + KD and no hint.
"""
from __future__ import annotations

from dataclasses import replace


from distill.distillers.connectors import build_connector
from distill.distillers.feature_pairs import FeatureDistiller, layer_shapes
from distill.errors import ConfigError
from distill.losses import fitnet_loss, kd_loss
from distill.method import DISTILLERS, BuildInfo
from distill.method.checks import require


def middle_stage(stages: list[str]) -> str:
    """The reference's hint layer 2 is feats[2], i.e. the second stage output for 3- and 4-stage
    models: (n - 1) // 2 picks it, and the true middle for longer lists."""
    return stages[(len(stages) - 1) // 2]


@DISTILLERS.register("fitnet",
                     family="features",
                     summary=("The student's middle stage regresses the teacher's through a "
                              "trained conv"),
                     published_as=("FitNet",),
                     paper='FitNets, Romero et al. ICLR 2015',
                     recipe=("CE 1, hint MSE x100 between the teacher's middle stage and the "
                             "student's middle stage through a trained conv regressor; "
                             "`hint_epochs=N` for the paper's two stages (hints only, then CE + "
                             '`kd_weight` KD)'),
                     table_row=2,
                     edges={"hint_epochs": {"0": "FitNet in one stage (the reference recipe)"}})
class FitNet(FeatureDistiller):
    def __init__(self, student, teacher, ce_weight: float = 1.0, feat_weight: float = 100.0,
                 student_layer: str | None = None, teacher_layer: str | None = None,
                 hint_epochs: int = 0, kd_weight: float = 0.0, temperature: float = 4.0,
                 *, info: BuildInfo):
        student_layer, teacher_layer = self.layer_pair(student_layer, teacher_layer, info,
                                                       "stages", pick=middle_stage)
        super().__init__(student, teacher, [student_layer], [teacher_layer])
        (shape_s,), (shape_t,) = (layer_shapes(student, [student_layer], info),
                                  layer_shapes(teacher, [teacher_layer], info))
        self.add_trained("connector", build_connector(
            shape_s, shape_t, keys=(self.option_key("student"), self.option_key("teacher"))))
        self.ce_weight, self.feat_weight = ce_weight, feat_weight
        self.hint_epochs, self.kd_weight, self.temperature = hint_epochs, kd_weight, temperature
        if hint_epochs > 0:   # the hint stage trains only the layers up to the guided one
            self.traits = replace(self.traits, unused_parameters=True)

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", feat_weight=">=0", hint_epochs=">=0", kd_weight=">=0",
                temperature=">0")

    @classmethod
    def check_schedule(cls, options, epochs):
        if options.get("hint_epochs", 0) >= epochs:
            raise ConfigError(
                f"{options['hint_epochs']} hint epochs in a {epochs}-epoch run: the student "
                "would train on hints only and never on labels or logits",
                key="distiller.hint_epochs",
                allowed=f"0 (one stage) or fewer than trainer.epochs ({epochs})")

    def forward(self, images, targets, ctx):
        logits, logits_teacher, (feat_s,), (feat_t,) = self.forward_features(images)
        hint = self.feat_weight * fitnet_loss(self.connector(feat_s), feat_t)
        if ctx.epoch < self.hint_epochs:        # stage 1 of 2: hints only
            return logits, {"hint": hint}
        terms = {"ce": self.ce_weight * self.cross_entropy(logits, targets, ctx)}
        if self.hint_epochs == 0:               # single stage (the reference recipe)
            terms["hint"] = hint
        if self.kd_weight > 0:
            terms["kd"] = self.kd_weight * kd_loss(logits, logits_teacher, self.temperature)
        return logits, terms
