"""Feature pairing, beside the methods that read intermediate features (fitnet, at, ab, fsp,
ft, vid, crd, rkd, ...): a `FeatureDistiller` takes student and teacher features by forward hooks
on named modules (distill.features), so the models stay unmodified and any model works; its
layer options name modules of `model.named_modules()` and default to the model's registry
spec. `InitStageDistiller` is RepDistiller's two-stage recipe (AB, FSP). Image inputs only:
the layers give (N, C, H, W) maps or pooled image features.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from collections.abc import Callable

import torch
from torch import nn

from distill.errors import ConfigError
from distill.features import FeatureHooks, feature_shapes
from distill.method import MAIN_STAGE, BuildInfo, Distiller, Stage, Staged, Traits
from distill.method.checks import NO_INIT, OVERFLOW
from distill.models import ModelSpec

log = logging.getLogger("distill")


class FeatureDistiller(Distiller):
    """A method that reads intermediate features of student and teacher.

    Features are taken by forward hooks on named modules (`distill.features`), so the models
    stay unmodified and any model works, torchvision's included: the layer options name modules
    of `model.named_modules()`, and default to the model's registry spec.
    """

    traits = Traits(needs_images=True)
    layer_option = "layer"   # the options are distiller.student_<layer_option>, teacher_...

    def __init__(self, student: nn.Module, teacher: nn.Module | None,
                 student_layers: list[str], teacher_layers: list[str]):
        super().__init__(student, teacher)
        self.student_layers, self.teacher_layers = list(student_layers), list(teacher_layers)
        self.student_hooks = hooks_on(student, self.student_layers, self.option_key("student"))
        self.teacher_hooks = hooks_on(teacher, self.teacher_layers, self.option_key("teacher"))

    @classmethod
    def option_key(cls, role: str) -> str:
        return f"distiller.{role}_{cls.layer_option}"

    @classmethod
    def layer_pair(cls, student_layer: str | None, teacher_layer: str | None, info: BuildInfo,
                   what: str, pick: Callable[[list[str]], str] = lambda names: names[0]
                   ) -> tuple[str, str]:
        """The one student and one teacher layer of a single-layer method: each as given, else
        `pick` of that model's default layers (`what`: "stages", "pooled", ...)."""
        return (student_layer or pick(default_layers(info.student_spec, cls.option_key("student"),
                                                     what)),
                teacher_layer or pick(default_layers(info.teacher_spec, cls.option_key("teacher"),
                                                     what)))

    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                list[torch.Tensor], list[torch.Tensor]]:
        """Student logits, teacher logits, student features, teacher features (no grad)."""
        logits = self.student(images)
        logits_teacher = self.teacher_logits(images)
        feats_student = [self.student_hooks.features[n] for n in self.student_layers]
        feats_teacher = [self.teacher_hooks.features[n] for n in self.teacher_layers]
        return logits, logits_teacher, feats_student, feats_teacher


# what an accepted edge value of the init stage's options means (AB, FSP, FT: registrations)
INIT_STAGE_EDGES = {"init_lr": {"huge": OVERFLOW}, "init_epochs": {"0": NO_INIT}}


class InitStageDistiller(Staged, FeatureDistiller):
    """RepDistiller's two-stage methods whose init stage trains the student's body (every
    parameter but its classifier's) and the method's connectors with a feature loss alone, for
    `init_epochs`, with their own SGD at a constant lr (the run's, or `init_lr`), the run's
    momentum and weight decay; the main stage is then the student alone with CE (the
    reference's `-a 0` with no feature term after the init stage). A subclass gives
    `init_loss(feats_student, feats_teacher)` and the layers."""

    traits = replace(FeatureDistiller.traits, manual_step=True)

    def __init__(self, student, teacher, student_layers, teacher_layers, *, info: BuildInfo,
                 init_epochs: int, init_lr: float | None, ce_weight: float):
        super().__init__(student, teacher, student_layers, teacher_layers)
        classifier = (info.student_spec.classifier or "").removesuffix(":in") \
            if info.student_spec else ""
        head = {id(p) for p in student.get_submodule(classifier).parameters()} if classifier \
            else set()
        self._body = [p for p in student.parameters() if id(p) not in head]
        self.init_epochs, self.init_lr, self.ce_weight = init_epochs, init_lr, ce_weight

    def stages(self):
        return [Stage("init", self.init_epochs)] if self.init_epochs else []

    def configure_optimizers(self, default):
        groups = self.parameter_groups()
        init = [*self._body, *groups.get("init", [])]
        return {"main": default(groups["main"]),
                "init": default(init, constant=True,
                                **({"lr": self.init_lr} if self.init_lr else {}))}

    def init_loss(self, feats_student: list[torch.Tensor],
                  feats_teacher: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def training_step(self, images, targets, ctx, step):
        if ctx.stage != MAIN_STAGE:
            _, _, feats_s, feats_t = self.forward_features(images)
            terms = self.init_loss(feats_s, feats_t)
            step.backward(sum(terms.values()))
            step.step("init")
            return terms
        terms = {"ce": self.ce_weight * self.cross_entropy(self.student(images), targets, ctx)}
        step.backward(terms["ce"])
        step.step("main")
        return terms


def stage_pairs(cls: type[FeatureDistiller], student_layers: list[str] | None,
                teacher_layers: list[str] | None, info: BuildInfo, *, student: nn.Module,
                teacher: nn.Module, maps: bool = True,
                what: str = "stages") -> tuple[list[str], list[str]]:
    """(student layers, teacher layers) paired in order: the options as given, else each
    model's stage outputs (the reference's feat[1:-1]). Default lists of different lengths are
    paired from the deepest down (every reference pair has equal counts, where the pairing is
    the reference's); given lists must have the same length. With `maps`, every layer must give
    (N, C, H, W) feature maps."""
    given = student_layers is not None or teacher_layers is not None
    student_layers = list(student_layers or default_layers(
        info.student_spec, cls.option_key("student"), what))
    teacher_layers = list(teacher_layers or default_layers(
        info.teacher_spec, cls.option_key("teacher"), what))
    if len(student_layers) != len(teacher_layers):
        if given:
            raise ConfigError(f"{len(student_layers)} student layers but "
                              f"{len(teacher_layers)} teacher layers", key=cls.option_key("student"),
                              allowed="lists of the same length, paired in order")
        n = min(len(student_layers), len(teacher_layers))
        student_layers, teacher_layers = student_layers[-n:], teacher_layers[-n:]
        log.info("%s pairs the deepest %d stages: %s", cls.__name__, n,
                 list(zip(student_layers, teacher_layers)))
    if maps:
        for role, model, names in (("student", student, student_layers),
                                   ("teacher", teacher, teacher_layers)):
            for name, shape in zip(names, layer_shapes(model, names, info)):
                if len(shape) != 4:
                    raise ConfigError(f"'{name}' gives a {tuple(shape)} tensor; this method needs "
                                      "(N, C, H, W) feature maps", key=cls.option_key(role))
    return student_layers, teacher_layers


def hooks_on(model: nn.Module, names: list[str], key: str) -> FeatureHooks:
    try:
        return FeatureHooks(model, names)
    except ConfigError as exc:  # FeatureHooks names the module; the user set a distiller option
        raise ConfigError(exc.message, key=key, hint=exc.hint) from None


def default_layers(spec: ModelSpec | None, key: str, what: str) -> list[str]:
    """The spec's stage outputs (`what="stages"`) or pooled feature (`"pooled"`); `key` is the
    option that sets them by hand, named when the spec has none."""
    role = key.split(".")[-1].split("_")[0]
    if spec is not None and what == "stages" and spec.stages:
        return list(spec.stages)
    if spec is not None and what == "pooled" and spec.classifier:
        return [f"{spec.classifier}:in"]
    if spec is not None and what == "preact" and spec.preact:
        return list(spec.preact)
    if spec is not None and what == "stem+stages" and spec.stages and spec.stem:
        return [spec.stem, *spec.stages]
    known = {"stages": "stage", "pooled": "classifier", "preact": "pre-activation stage",
             "stem+stages": "stem and stage"}[what]
    raise ConfigError(f"the {role} model has no known {known} modules to take features from",
                      key=key, hint="name modules of model.named_modules(); add ':in' for a "
                                    "module's input, ':preact' for a pre-activation output")


def layer_shapes(model: nn.Module, names: list[str], info: BuildInfo) -> list[torch.Size]:
    shapes = feature_shapes(model, names, (2, *info.input_shape))
    return [shapes[n] for n in names]

