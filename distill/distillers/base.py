"""The Distiller base: a student, an optional frozen teacher, and the method's loss terms.

A distiller's forward returns the student's logits and a dict of *weighted* loss terms
(`ce`, `kd`, `hint`, ...). The trainer sums them and logs each one, so adding a method never
touches the training loop.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from distill.errors import ConfigError
from distill.features import FeatureHooks, feature_shapes
from distill.models import ModelSpec
from distill.registry import Registry

DISTILLERS = Registry("distiller")


@dataclass(frozen=True)
class StepContext:
    """Where training is, for methods whose weights follow a schedule (e.g. DKD's warm-up)."""

    epoch: int          # 0-based epoch index
    step: int           # global optimizer step
    epochs: int         # total epochs of the run


@dataclass(frozen=True)
class BuildInfo:
    """What a feature-based method needs beyond the two modules: their registry specs, which
    name the default layers (stage outputs, the classifier whose input is the pooled feature),
    and the dataset's input shape, to size connectors with one dry forward."""

    student_spec: ModelSpec | None = None
    teacher_spec: ModelSpec | None = None
    input_shape: tuple[int, int, int] = (3, 32, 32)


class Distiller(nn.Module):
    """Student plus (optionally) a frozen teacher.

    The teacher is registered as a submodule so `.to(device)` moves it, but it is frozen here once
    and for all: no grad, eval mode (even when the distiller is put in train mode), and excluded
    from `trainable_parameters()` and `student_state_dict()`/`connector_state_dict()`.
    """

    requires_teacher: bool = True
    # TAKD: the config option naming the assistant chain the app builds before training
    assistants_option: str | None = None
    # True when some steps leave trainable parameters without gradients (DDP must look for them)
    may_leave_parameters_unused: bool = False

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None):
        super().__init__()
        if self.requires_teacher and teacher is None:
            raise ConfigError(f"distiller '{type(self).__name__}' needs a teacher", key="teacher")
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BN statistics and dropout of the teacher must never change
        return self

    @classmethod
    def check_values(cls, options: dict) -> None:
        """Range checks on config options, run before anything is built. Override per method."""

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images)

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    # --- what trains and what is saved -------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and connector parameters; never the teacher's."""
        return [p for name, p in self.named_parameters()
                if not name.startswith("teacher.") and p.requires_grad]

    def connector_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the method's own modules (connectors), without student and teacher."""
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith(("student.", "teacher."))}

    def load_connector_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("student.", "teacher."))]
        if missing or unexpected:
            raise RuntimeError(f"connector state mismatch: missing {missing}, unexpected {unexpected}")

    def connector_parameter_count(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters()
                   if not n.startswith(("student.", "teacher.")))


def require(options: dict, **rules: str) -> None:
    """`require(options, temperature=">0", kd_weight=">=0")`: a ConfigError naming the first
    option given in `options` that breaks its rule."""
    for name, rule in rules.items():
        test, allowed = _RULES[rule]
        if name in options and not test(options[name]):
            raise ConfigError(f"invalid value {options[name]!r}", key=f"distiller.{name}",
                              allowed=allowed)


_RULES = {">0": (lambda v: v > 0, "a positive number"),
          ">=0": (lambda v: v >= 0, "zero or positive"),
          "[0,1]": (lambda v: 0 <= v <= 1, "a number in [0, 1]")}


class FeatureDistiller(Distiller):
    """A method that reads intermediate features of student and teacher.

    Features are taken by forward hooks on named modules (`distill.features`), so the models
    stay unmodified and any model works, torchvision's included: the layer options name modules
    of `model.named_modules()`, and default to the model's registry spec.
    """

    layer_option = "layer"   # the options are distiller.student_<layer_option>, teacher_...

    def __init__(self, student: nn.Module, teacher: nn.Module | None,
                 student_layers: list[str], teacher_layers: list[str]):
        super().__init__(student, teacher)
        self.student_layers, self.teacher_layers = list(student_layers), list(teacher_layers)
        self.student_hooks = _hooks(student, self.student_layers, self.option_key("student"))
        self.teacher_hooks = _hooks(teacher, self.teacher_layers, self.option_key("teacher"))

    @classmethod
    def option_key(cls, role: str) -> str:
        return f"distiller.{role}_{cls.layer_option}"

    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                list[torch.Tensor], list[torch.Tensor]]:
        """Student logits, teacher logits, student features, teacher features (no grad)."""
        logits = self.student(images)
        logits_teacher = self.teacher_logits(images)
        feats_student = [self.student_hooks.features[n] for n in self.student_layers]
        feats_teacher = [self.teacher_hooks.features[n] for n in self.teacher_layers]
        return logits, logits_teacher, feats_student, feats_teacher


def _hooks(model: nn.Module, names: list[str], key: str) -> FeatureHooks:
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
    raise ConfigError(f"the {role} model has no known {'stage' if what == 'stages' else 'classifier'}"
                      " modules to take features from", key=key,
                      hint="name modules of model.named_modules(); add ':in' for a module's input")


def layer_shapes(model: nn.Module, names: list[str], info: BuildInfo) -> list[torch.Size]:
    shapes = feature_shapes(model, names, (2, *info.input_shape))
    return [shapes[n] for n in names]


def build_distiller(name: str, student: nn.Module, teacher: nn.Module | None,
                    options: dict, info: BuildInfo | None = None) -> Distiller:
    """Build `name` with its config options, naming any unknown or mistyped option. Methods
    whose constructor takes `info` get the models' specs and the input shape."""
    cls = DISTILLERS.get(name, key="distiller")
    fixed = {"student": student, "teacher": teacher}
    if "info" in inspect.signature(cls.__init__).parameters:
        fixed["info"] = info or BuildInfo()
    return DISTILLERS.build_from_config(name, options, key="distiller", **fixed)
