"""The Distiller base: a method's parts, declared by role, and its loss terms.

A distiller declares every module it owns as a part (docs/engine-roles.md): frozen teachers,
trained modules grouped by optimizer (student, connectors, peers, ...), which of them are
evaluated each epoch, and which one is exported as the student. The trainer works from these
declarations only, never from module names.

On the default step, `forward` returns the student's logits and a dict of *weighted* loss terms
(`ce`, `kd`, `hint`, ...); the trainer sums them and logs each one. A method that alternates
updates sets `manual_step = True` and implements `training_step` instead.
"""
from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import ConfigError, unknown_name_error
from distill.features import FeatureHooks, feature_shapes
from distill.models import ModelSpec, list_models
from distill.registry import Registry

DISTILLERS = Registry("distiller")
log = logging.getLogger("distill")

# What a method may say it cannot run with (`Distiller.unsupported`), and the config key that
# turns each on: a refused combination names that key.
RUN_FEATURES = {"compile": "trainer.compile", "fp16": "trainer.precision",
                "bf16": "trainer.precision", "ddp": "world_size",
                "channels_last": "trainer.channels_last", "sync_bn": "trainer.sync_bn"}
# What a method may need from the engine (`Distiller.needs`), and what each rules out.
NEEDS = {
    "teacher_input_grad": {},   # gradients through a teacher w.r.t. its input: runs anywhere
    # create_graph=True through the student: torch.compile does not trace double backward, and
    # DDP's reducer does not see gradients taken by torch.autograd.grad
    "double_backward": {"compile": "torch.compile cannot trace a double backward",
                        "ddp": "DDP does not reduce gradients taken with torch.autograd.grad"},
}


MAIN_STAGE = "main"


@dataclass(frozen=True)
class Stage:
    """A stage a method runs before its main training, as the reference code does (RepDistiller's
    init stage of AB, FSP and FT): `epochs` whole epochs at the start of the run, in which the
    method's manual step trains what the stage trains. The main stage (`trainer.epochs`, with
    the run's schedule) follows; checkpoints, resume and logs treat the run as one."""

    name: str
    epochs: int


@dataclass(frozen=True)
class StepContext:
    """Where training is, for methods whose weights follow a schedule (e.g. DKD's warm-up)."""

    epoch: int                 # 0-based epoch index (over the whole run, stages included)
    step: int                  # global optimizer step (0-based: the step being taken)
    epochs: int                # total epochs of the run (stages included)
    steps_per_epoch: int = 0
    total_steps: int = 0       # the run's last step (trainer.max_steps included)
    stage: str = MAIN_STAGE    # the stage this step belongs to (Distiller.stages)
    stage_epoch: int = 0       # 0-based epoch within that stage
    # the batch's positions in the training set (this rank's share under DDP); None outside
    # the trainer
    indices: torch.Tensor | None = None
    # other views of the batch's images, by the names Distiller.views() gives (MLKD's "strong")
    views: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildInfo:
    """What a method may need beyond its modules, at build time: the models' registry specs
    (default layers: stage outputs, the classifier whose input is the pooled feature), the
    student's architecture name, the input shape, the class count and the dataset's
    normalisation (to size connectors, build more models, or clamp images to valid pixels)."""

    student_spec: ModelSpec | None = None
    teacher_spec: ModelSpec | None = None
    input_shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 100
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    student_arch: str | None = None
    # the training set's labels, item by item (what StepContext.indices point into; CRD's memory
    # bank and its negatives), and the run's seed (for randomness every rank must share)
    train_labels: torch.Tensor | None = None
    seed: int = 0

    @property
    def pixel_range(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(lowest, highest) normalised value per channel: what black and white become."""
        return (tuple((0.0 - m) / s for m, s in zip(self.mean, self.std)),
                tuple((1.0 - m) / s for m, s in zip(self.mean, self.std)))


@dataclass(frozen=True)
class TeacherRequest:
    """One frozen teacher a method needs, before it is found (distill.teachers resolves it):
    weights from `checkpoint`, else the zoo, else trained now (`teacher.auto_train`), else, when
    `distilled_from` is set, made from that teacher by a run of method `made_by` (KD by default)
    with `distill_options`, and kept in the zoo."""

    role: str
    arch: str
    key: str = "teacher"                    # the config key errors about this teacher name
    checkpoint: str | None = None
    checkpoint_key: str = "teacher.checkpoint"
    pretrained: bool = False
    distilled_from: TeacherRequest | None = None
    distill_options: dict[str, Any] = field(default_factory=dict)
    # the method of the run that makes a distilled teacher from `distilled_from` ("kd": a KD
    # link; "specialist": one of Hinton's specialists, initialised from it)
    made_by: str = "kd"


@dataclass
class Part:
    role: str
    frozen: bool
    optimizer: str | None      # trained parts: the optimizer that updates them
    evaluated: bool            # evaluated every epoch (frozen parts: once, at the start)
    arch: str | None = None    # registry name, when the part is a registered model
    key: str | None = None     # the config key that chose it, named in errors about it


class ManualStep(Protocol):
    """What a manual `training_step` drives: the trainer's optimizers, its (fp16-scaled)
    backward, and optimizer steps that apply the non-finite policy and average gradients over
    DDP ranks."""

    optimizers: dict[str, torch.optim.Optimizer]

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, name: str) -> bool: ...


OptimizerFactory = Callable[..., tuple[torch.optim.Optimizer, Any]]


class Distiller(nn.Module):
    """A method's parts and loss terms. `Distiller(student, teacher)` declares the usual two:
    `student` (trained, evaluated, exported) and `teacher` (frozen)."""

    requires_teacher: ClassVar[bool] = True
    manual_step: ClassVar[bool] = False
    # RUN_FEATURES this method cannot run with -> why (refused when the config is validated)
    unsupported: ClassVar[dict[str, str]] = {}
    needs: ClassVar[frozenset[str]] = frozenset()
    # True when some steps leave trainable parameters without gradients (DDP must look for them)
    may_leave_parameters_unused: bool = False
    # True when the method's losses depend on the run's length (ctx.epochs, ctx.total_steps):
    # then a resumed run may not change trainer.epochs (distill.engine.rundir)
    follows_run_length: ClassVar[bool] = False
    exported_role: str = "student"
    # True for a data-free method: it never reads a training image. The app gives it the
    # training set `stand_in_training_set` returns instead of the dataset's training split
    # (which it never touches), and `make_training_set` fills that set before the first step.
    data_free: ClassVar[bool] = False
    # True when the method calls its frozen parts only on the training batch's images and uses
    # only what they return (the logits): `teacher.cache=views` may answer those calls from the
    # teacher-output cache (distill/engine/teacher_cache.py). Otherwise `cache_refusal` says why
    # not (derived for feature methods, data-free ones and methods without a teacher).
    teacher_outputs_only: ClassVar[bool] = False
    cache_refusal: ClassVar[str] = "shows its teacher images other than the training batch's"

    def __init__(self, student: nn.Module | None = None, teacher: nn.Module | None = None):
        super().__init__()
        self.parts: dict[str, Part] = {}
        if student is not None:
            self.add_trained("student", student, evaluated=True)
        if teacher is not None:
            self.add_frozen("teacher", teacher)

    # --- declaring parts ---------------------------------------------------------------------
    def add_frozen(self, role: str, model: nn.Module, *, arch: str | None = None) -> None:
        """A teacher: frozen here once and for all (no grad, eval mode even when the distiller
        trains), never in an optimizer or a checkpoint."""
        self._declare(role, model, Part(role, frozen=True, optimizer=None, evaluated=True,
                                        arch=arch))
        model.requires_grad_(False)
        model.eval()

    def add_trained(self, role: str, module: nn.Module, *, optimizer: str = "main",
                    evaluated: bool = False, arch: str | None = None,
                    key: str | None = None) -> None:
        self._declare(role, module, Part(role, frozen=False, optimizer=optimizer,
                                         evaluated=evaluated, arch=arch, key=key))

    def _declare(self, role: str, module: nn.Module, part: Part) -> None:
        if role in self.parts:
            raise ValueError(f"part '{role}' is declared twice")
        setattr(self, role, module)
        self.parts[role] = part

    def describe(self, role: str, *, arch: str) -> None:
        """Name the registry architecture of a part the app built (student, teachers)."""
        self.parts[role].arch = arch

    def check_declared(self) -> None:
        """Every module with parameters or buffers must be a declared part: an undeclared one
        would silently neither train nor be saved. The exported part is trained and evaluated."""
        exported = self.parts.get(self.exported_role)
        if exported is None or exported.frozen or not exported.evaluated:
            raise TypeError(f"{type(self).__name__}.exported_role '{self.exported_role}' must name "
                            f"a part declared with add_trained(..., evaluated=True)")
        for name, child in self.named_children():
            if name not in self.parts and (any(True for _ in child.parameters())
                                           or any(True for _ in child.buffers())):
                raise TypeError(f"{type(self).__name__}.{name} is a module that is not a declared "
                                f"part: declare it with self.add_trained('{name}', ...) or "
                                f"self.add_frozen('{name}', ...)")

    # --- reading the declarations ------------------------------------------------------------
    def part(self, role: str) -> nn.Module:
        return getattr(self, role)

    def _roles(self, test: Callable[[Part], bool]) -> dict[str, nn.Module]:
        return {role: self.part(role) for role, p in self.parts.items() if test(p)}

    def frozen_parts(self) -> dict[str, nn.Module]:
        return self._roles(lambda p: p.frozen)

    def trained_parts(self) -> dict[str, nn.Module]:
        return self._roles(lambda p: not p.frozen)

    def evaluated_parts(self) -> dict[str, nn.Module]:
        """Trained parts evaluated every epoch, the exported one first."""
        parts = self._roles(lambda p: not p.frozen and p.evaluated)
        return {self.exported_role: parts.pop(self.exported_role), **parts}

    @property
    def exported(self) -> nn.Module:
        return self.part(self.exported_role)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by optimizer name, in declaration order; never a frozen one."""
        groups: dict[str, list[nn.Parameter]] = {}
        seen: set[int] = set()
        for role, part in self.parts.items():
            if part.frozen:
                continue
            params = groups.setdefault(part.optimizer, [])
            for p in self.part(role).parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return groups

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for params in self.parameter_groups().values() for p in params]

    def trained_buffers(self) -> Iterator[torch.Tensor]:
        for module in self.trained_parts().values():
            yield from module.buffers()

    def views(self) -> dict[str, str]:
        """Extra views of each training image the method trains on, by name -> a registered
        augmentation (distill.data.augment), given in StepContext.views: none by default."""
        return {}

    def sample_weights(self) -> torch.Tensor | None:
        """How often each training item is drawn, one weight per item (drawn with replacement,
        an epoch's worth per epoch; e.g. a specialist's data enriched for its classes); None
        (the default): every item once per epoch, in a random order."""
        return None

    def derived_models(self) -> dict[str, nn.Module]:
        """Models made of the method's parts (BYOT's early exits), evaluated every epoch beside
        the evaluated parts and reported in summary.json `models` with their params and FLOPs.
        They hold no state of their own (nothing to checkpoint); `tools/export.py --exit N`
        exports the one named `exitN`. None by default."""
        return {}

    def self_synced_buffers(self) -> list[torch.Tensor]:
        """Buffers of trained parts that the method itself keeps equal on every rank (e.g. CRD's
        memory bank, updated from all ranks' samples): DDP need not broadcast them each step."""
        return []

    def auxiliary_parameter_count(self) -> int:
        """Parameters of trained parts that are not evaluated (connectors, discriminators)."""
        return sum(p.numel() for role, part in self.parts.items()
                   if not part.frozen and not part.evaluated
                   for p in self.part(role).parameters())

    # --- stages ------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        """The stages before the main one (none by default). A method with stages sets
        `manual_step`, so each stage steps only its own optimizer."""
        return []

    # --- optimizers --------------------------------------------------------------------------
    def configure_optimizers(self, default: OptimizerFactory) -> dict[str, tuple[Any, Any]]:
        """{name: (optimizer, scheduler)}, one per optimizer name of the trained parts. The
        default gives each the run's optimizer and the run's schedule, which starts with the
        main stage; `default(params, lr=...)` builds one with some settings changed, and
        `default(params, constant=True)` one whose lr stays as given (a stage's own)."""
        return {name: default(params) for name, params in self.parameter_groups().items()}

    # --- state by role -----------------------------------------------------------------------
    def part_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {role: module.state_dict() for role, module in self.trained_parts().items()}

    def load_part_state_dicts(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        trained = self.trained_parts()
        if set(states) != set(trained):
            raise RuntimeError(f"the checkpoint holds parts {sorted(states)}, this method has "
                               f"{sorted(trained)}")
        for role, module in trained.items():
            module.load_state_dict(states[role])

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        for model in self.frozen_parts().values():
            model.eval()   # BN statistics and dropout of a teacher must never change
        return self

    # --- what methods call -------------------------------------------------------------------
    label_smoothing: float = 0.0   # the run's trainer.label_smoothing (the trainer sets it)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The CE term against the labels, with the run's label smoothing (batch mean)."""
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    @classmethod
    def check_values(cls, options: dict) -> None:
        """Range checks on config options, run before anything is built. Override per method."""

    @classmethod
    def check_schedule(cls, options: dict, epochs: int) -> None:
        """Checks of options against the run's length (`trainer.epochs`). Override per method."""

    @classmethod
    def loss_term_weights(cls, options: dict) -> dict[str, float]:
        """The weight of each loss term, by option name: all zero trains nothing, which is
        refused. Default: every number option named `*_weight`; override where a term's weight
        is a product or named otherwise."""
        return {k: v for k, v in options.items() if k.endswith("_weight") and _is_number(v)}

    @classmethod
    def teacher_requests(cls, options: dict, teacher: dict) -> list[TeacherRequest]:
        """The frozen teachers this method needs, given its options and the `teacher` config
        group: by default the one `teacher=` names."""
        if not cls.requires_teacher:
            return []
        return [TeacherRequest("teacher", teacher["name"], checkpoint=teacher.get("checkpoint"),
                               pretrained=bool(teacher.get("pretrained", False)))]

    @classmethod
    def complete_options(cls, options: dict, teachers: dict[str, nn.Module], data: Any,
                         device: torch.device) -> dict:
        """Options the method derives from its first teachers and the training data (the
        specialists' class subsets, clustered from the generalist's predictions), filled in
        before `teacher_requests` is asked again for the teachers that depend on them. It must
        be deterministic: a resumed run derives them again (and refuses a zoo link recorded
        with other options than it now asks for). Default: the options unchanged."""
        return options

    @classmethod
    def stand_in_training_set(cls, options: dict, data: Any) -> Any:
        """A data-free method's training set, made from its options and the dataset's facts
        (classes, image size, mean, std, the validation split), never from the training split:
        the images it will make (`make_training_set` fills them) or one placeholder per item of
        an epoch when it makes new images every step. Only `data_free` methods are asked."""
        raise NotImplementedError(f"{cls.__name__} is data-free but gives no training set")

    @classmethod
    def made_images(cls, run_dir: Any, options: dict, input_shape: tuple[int, ...],
                    count: int) -> torch.Tensor | None:
        """Up to `count` images (normalised) a finished run of this data-free method trained
        on, read back from its run directory: what its int8 export calibrates on instead of
        training images. None by default."""
        return None

    def make_training_set(self, dataset: Any, *, run_dir: Any, device: torch.device) -> None:
        """Fill the stand-in training set before the first step, teachers built (e.g.
        DeepInversion's synthesis, cached in the run directory so a resumed run reads it
        back). Every run calls it, resumed ones too. Nothing to do by default."""

    @classmethod
    def teacher_label(cls, options: dict, teacher: str) -> str | None:
        """The teacher part of run-directory names (`<label>-<student>/<method>`); None for a
        method without a teacher (`<student>/<method>`)."""
        return teacher if cls.requires_teacher else None

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images)

    def frozen_forward(self, role: str, images: torch.Tensor, *,
                       input_grad: bool = False) -> torch.Tensor:
        """A frozen part's output; with `input_grad` outside no_grad, so gradients flow to
        `images` (the part's own weights stay frozen)."""
        if input_grad:
            return self.part(role)(images)
        with torch.no_grad():
            return self.part(role)(images)

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def training_step(self, images: torch.Tensor, targets: torch.Tensor, ctx: StepContext,
                      step: ManualStep) -> dict[str, torch.Tensor]:
        """Manual step (`manual_step = True`): forward, backward and step through `step`;
        returns the loss terms to log."""
        raise NotImplementedError


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require(options: dict, **rules: str) -> None:
    """`require(options, temperature=">0", kd_weight=">=0")`: a ConfigError naming the first
    option given in `options` that breaks its rule. Every rule but "bool" wants a finite number."""
    for name, rule in rules.items():
        test, allowed = _RULES[rule]
        value = options.get(name)
        ok = (isinstance(value, bool) if rule == "bool"
              else _is_number(value) and math.isfinite(value) and test(value))
        if name in options and not ok:
            raise ConfigError(f"invalid value {value!r}", key=f"distiller.{name}",
                              allowed=allowed)


# Weights of loss terms computed on the logits (CE, KD, DKD's parts, DML's KL): with all of them
# zero, only feature terms are left and nothing trains the classifier.
LOGIT_TERM_WEIGHTS = ("ce_weight", "kd_weight", "kl_weight", "alpha", "beta", "l1_weight",
                      "adv_weight")


def check_common(cls: type[Distiller], options: dict, epochs: int) -> None:
    """What every method's options must satisfy, whatever its own check_values says: layer
    options are null (the defaults) or name layers, never empty; not every loss weight is zero,
    nor every weight of a term on the logits; then the method's own checks against the run's
    length."""
    for name, value in options.items():
        if name.startswith(("student_", "teacher_")) and name.endswith(("layer", "layers")) \
                and value is not None:
            names = value if isinstance(value, (list, tuple)) else [value]
            if not names or not all(isinstance(n, str) and n.strip() for n in names):
                raise ConfigError(f"invalid value {value!r}", key=f"distiller.{name}",
                                  allowed="null (the model's default layers) or module names "
                                          "of the model (an empty name or list is not a layer)")
    weights = cls.loss_term_weights(options)
    if weights and not any(w != 0 for w in weights.values()):
        raise ConfigError(f"every loss term has weight 0 ({', '.join(sorted(weights))}): the run "
                          "would train nothing", key="distiller",
                          allowed="at least one positive loss weight")
    on_logits = {k: w for k, w in weights.items() if k in LOGIT_TERM_WEIGHTS}
    if on_logits and not any(w != 0 for w in on_logits.values()):
        raise ConfigError(f"no loss term on the logits ({', '.join(sorted(on_logits))} have weight "
                          "0): the features train, the classifier stays at chance",
                          key="distiller", allowed="a positive weight for one of them")
    cls.check_schedule(options, epochs)


def require_models(options: dict, option: str, *, at_least: int, allowed: str) -> list[str]:
    """The option `option` as a list of at least `at_least` registered model names, or a
    ConfigError naming `distiller.<option>` (close matches for a misspelt name)."""
    names = options.get(option)
    if not isinstance(names, (list, tuple)) or len(names) < at_least:
        raise ConfigError(f"invalid value {names!r}", key=f"distiller.{option}", allowed=allowed)
    for name in names:
        if name not in list_models():
            raise unknown_name_error("model", name, list_models(), key=f"distiller.{option}")
    return list(names)


_RULES = {">0": (lambda v: v > 0, "a positive (finite) number"),
          ">=0": (lambda v: v >= 0, "zero or a positive (finite) number"),
          "[0,1]": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
          "(0,1]": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
          "int>0": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
          "int>=0": (lambda v: isinstance(v, int) and v >= 0, "zero or a positive integer"),
          "bool": (None, "true or false")}


def warmup_ramp(epoch: int, warmup_epochs: int) -> float:
    """A loss term's factor at 0-based `epoch` under mdistiller's linear warm-up (DKD, ReviewKD):
    min(epoch / warmup_epochs, 1) with its 1-based epochs, so the first epoch already has
    1 / warmup_epochs; 1 without a warm-up."""
    return min((epoch + 1) / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0


def teacher_cache_refusal(cls: type[Distiller]) -> str | None:
    """Why `teacher.cache=views` cannot serve the method `cls`, or None when it can."""
    if cls.teacher_outputs_only:
        return None
    if not cls.requires_teacher:
        return "has no teacher"
    if cls.data_free:
        return "trains on images it makes, not on views of the dataset's images"
    if issubclass(cls, FeatureDistiller):
        return "reads the teacher's intermediate features, which the cache does not hold"
    if "teacher_input_grad" in cls.needs:
        return "takes gradients through the teacher with respect to its input"
    return cls.cache_refusal


def refused_features(cls: type[Distiller]) -> dict[str, str]:
    """Every RUN_FEATURE the method cannot run with -> why: its own `unsupported` and what its
    `needs` rule out."""
    refused = dict(cls.unsupported)
    for need in cls.needs:
        for feature, why in NEEDS[need].items():
            refused.setdefault(feature, why)
    return refused


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


class InitStageDistiller(FeatureDistiller):
    """RepDistiller's two-stage methods whose init stage trains the student's body (every
    parameter but its classifier's) and the method's connectors with a feature loss alone, for
    `init_epochs`, with their own SGD at a constant lr (the run's, or `init_lr`), the run's
    momentum and weight decay; the main stage is then the student alone with CE (the
    reference's `-a 0` with no feature term after the init stage). A subclass gives
    `init_loss(feats_student, feats_teacher)` and the layers."""

    manual_step = True

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
        terms = {"ce": self.ce_weight * self.cross_entropy(self.student(images), targets)}
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


def build_distiller(name: str, student: nn.Module,
                    teachers: dict[str, nn.Module] | nn.Module | None, options: dict,
                    info: BuildInfo | None = None) -> Distiller:
    """Build `name` with its config options, naming any unknown or mistyped option. The
    constructor gets what it asks for by parameter name: `teacher` (the one frozen teacher),
    `teacher_models` (all of them, by role; a lone module is role `teacher`) and `info`."""
    cls = DISTILLERS.get(name, key="distiller")
    params = inspect.signature(cls.__init__).parameters
    if isinstance(teachers, nn.Module):
        teachers = {"teacher": teachers}
    teachers = dict(teachers or {})
    if cls.requires_teacher and not teachers:
        raise ConfigError(f"distiller '{name}' needs a teacher", key="teacher")
    fixed: dict[str, Any] = {"student": student}
    if "teacher_models" in params:
        fixed["teacher_models"] = teachers
    elif len(teachers) > 1:
        raise ConfigError(f"distiller '{name}' takes one teacher, not {len(teachers)} "
                          f"({', '.join(teachers)})", key="distiller")
    if "teacher" in params:
        fixed["teacher"] = next(iter(teachers.values()), None)
    if "info" in params:
        fixed["info"] = info or BuildInfo()
    distiller = DISTILLERS.build_from_config(name, options, key="distiller", **fixed)
    distiller.check_declared()
    return distiller


FIXED_ARGUMENTS = ("student", "teacher", "teacher_models", "info")   # supplied by the framework
