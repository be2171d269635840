"""Factor Transfer (Kim, Park & Kwak, NeurIPS 2018) as RepDistiller runs it on CIFAR-100
(`--distill factor -a 0 -b 200`, helper/pretrain.py): two stages in one run.

- `init` (`init_epochs`, 30): a paraphraser (autoencoder) learns to reconstruct the frozen
  teacher's last stage output (MSE), with its own SGD at a constant lr (0.01 for ResNet/WRN
  students, else the run's lr, as the reference), momentum and weight decay the run's. The
  student does not train.
- `main` (`trainer.epochs`, the run's schedule): the student and a translator train with CE 1
  plus 200 x `ft_loss` between the translator's factor of the student's last stage output and
  the paraphraser's (fixed) encoding of the teacher's.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from distill.distillers.connectors import Paraphraser, Translator
from distill.distillers.feature_pairs import INIT_STAGE_EDGES, FeatureDistiller, layer_shapes
from distill.errors import ConfigError
from distill.losses import ft_loss
from distill.method import DISTILLERS, MAIN_STAGE, BuildInfo, Stage, Staged
from distill.method.checks import require

# the students RepDistiller's init stage trains the paraphraser at lr 0.01 for (helper/pretrain.py)
LOW_INIT_LR_STUDENTS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
                        "resnet110", "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2",
                        "wrn_40_1", "wrn_40_2")


@DISTILLERS.register("ft",
                     family="features",
                     summary=("The student's translated features match factors paraphrased from "
                              "the teacher's"),
                     published_as=("FT",),
                     paper='Factor Transfer, Kim, Park & Kwak NeurIPS 2018',
                     recipe=('two stages: `init` (`init_epochs` 30) trains a paraphraser '
                             "(autoencoder, `rate` 0.5) to reconstruct the frozen teacher's last "
                             'stage output (MSE, constant lr 0.01 for ResNet/WRN students, else '
                             "the run's); then, for `trainer.epochs`, student + translator with CE"
                             " 1 + 200 x FT loss (`p` 1) between the translator's factor of the "
                             "student's last stage output and the fixed paraphraser's factor of "
                             "the teacher's"),
                     table_row=10,
                     edges=INIT_STAGE_EDGES)
class FT(Staged, FeatureDistiller):
    traits = replace(FeatureDistiller.traits, manual_step=True)

    def __init__(self, student, teacher, ce_weight: float = 1.0, feat_weight: float = 200.0,
                 p: int = 1, rate: float = 0.5, init_epochs: int = 30,
                 init_lr: float | None = None, student_layer: str | None = None,
                 teacher_layer: str | None = None, *, info: BuildInfo):
        student_layer, teacher_layer = self.layer_pair(student_layer, teacher_layer, info,
                                                       "stages", pick=lambda names: names[-1])
        super().__init__(student, teacher, [student_layer], [teacher_layer])
        (shape_s,), (shape_t,) = (layer_shapes(student, [student_layer], info),
                                  layer_shapes(teacher, [teacher_layer], info))
        for role, shape in (("student", shape_s), ("teacher", shape_t)):
            if len(shape) != 4:
                raise ConfigError(f"'{student_layer if role == 'student' else teacher_layer}' gives "
                                  f"a {tuple(shape)} tensor; factors are made from (N, C, H, W) maps",
                                  key=self.option_key(role))
        if min(shape_s[2], shape_t[2]) * min(shape_s[3], shape_t[3]) == 1:
            raise ConfigError(
                f"'{student_layer}' {tuple(shape_s[1:])} and the teacher's '{teacher_layer}' "
                f"{tuple(shape_t[1:])} meet at 1x1: a normalised 1x1 factor map is constant, "
                "so FT would transfer nothing", key=self.option_key("student"),
                allowed="a layer whose output is larger than 1x1 (e.g. an earlier stage)")
        if int(shape_t[1] * rate) < 1:
            raise ConfigError(f"rate {rate} leaves no channel of the teacher's {shape_t[1]}",
                              key="distiller.rate", allowed="a rate with rate x channels >= 1")
        self.add_trained("translator", Translator(shape_s[1], shape_t[1], rate))
        self.add_trained("paraphraser", Paraphraser(shape_t[1], rate), optimizer="init")
        self.ce_weight, self.feat_weight, self.p = ce_weight, feat_weight, p
        self.init_epochs = init_epochs
        self.init_lr = init_lr if init_lr is not None else (
            0.01 if info.student_arch in LOW_INIT_LR_STUDENTS else None)

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", feat_weight=">=0", p=">0", rate="(0,1]",
                init_epochs=">=0")
        if options.get("init_lr") is not None:
            require(options, init_lr=">0")

    def stages(self):
        return [Stage("init", self.init_epochs)] if self.init_epochs else []

    def configure_optimizers(self, default):
        groups = self.parameter_groups()
        return {"main": default(groups["main"]),
                "init": default(groups["init"], constant=True,
                                **({"lr": self.init_lr} if self.init_lr else {}))}

    def training_step(self, images, targets, ctx, step):
        if ctx.stage != MAIN_STAGE:   # the paraphraser learns the teacher's map
            with torch.no_grad():
                self.teacher(images)
            (feat_t,) = [self.teacher_hooks.features[n] for n in self.teacher_layers]
            reconstruction = F.mse_loss(self.paraphraser(feat_t), feat_t)
            step.backward(reconstruction)
            step.step("init")
            return {"paraphrase": reconstruction}
        logits, _, (feat_s,), (feat_t,) = self.forward_features(images)
        with torch.no_grad():   # fixed in the main stage (the reference never steps it)
            factor_t = self.paraphraser.encoder(feat_t)
        terms = {"ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
                 "ft": self.feat_weight * ft_loss(self.translator(feat_s), factor_t, self.p)}
        step.backward(sum(terms.values()))
        step.step("main")
        return terms
