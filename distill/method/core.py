"""The method contract: what every distillation method is, and all the engine knows of one.

A `Distiller` is an nn.Module that declares its parts by role (frozen teachers; trained modules
grouped by optimizer; those evaluated each epoch; the one exported) and turns a batch into named
loss terms; its `traits` say once what kind of method it is. What only a few methods need is an
opt-in piece (distill.method.pieces). A batch's `inputs` are a tensor (images) or a mapping of
tensors (`input_ids`, `attention_mask`), which `call_model` passes as keyword arguments.

    @DISTILLERS.register("kd")
    class KD(Distiller):
        traits = Traits(teacher_outputs_only=True)

        def forward(self, inputs, targets, ctx):
            logits = call_model(self.student, inputs)
            return logits, {"ce": ..., "kd": ...}
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import ConfigError
from distill.inputs import Inputs, call_model
from distill.models import ModelSpec
from distill.registry import Registry

DISTILLERS = Registry("distiller")
MAIN_STAGE = "main"

@dataclass(frozen=True)
class Traits:
    """What kind of method a class is, declared once (`traits = Traits(...)`); validation, the
    teacher cache and the trainer read it, never scattered class flags."""

    needs_teacher: bool = True
    manual_step: bool = False          # implements `training_step` (alternating updates)
    # calls its frozen parts only on the batch's inputs and uses only their outputs (logits):
    # teacher.cache=views may answer those calls
    teacher_outputs_only: bool = False
    needs_images: bool = False         # image tensors (feature maps, pixels): other inputs refused
    follows_run_length: bool = False   # losses follow trainer.epochs: a resume may not change it
    unused_parameters: bool = False    # some steps leave trained parameters without gradients
    # the smallest batch (per rank) the loss means something for: relations between a batch's
    # items are 0 or undefined below it. Smaller trainer.batch_size is refused; an epoch's last
    # batch smaller than this is dropped (distill.engine.sampler.steps_per_epoch)
    min_batch: int = 1
    # the options weighting terms on the logits: all of them 0 leaves the classifier untrained
    logit_weights: tuple[str, ...] = ("ce_weight", "kd_weight")
    # run features (distill.method.checks.RUN_FEATURES) the method cannot run with -> why
    unsupported: Mapping[str, str] = field(default_factory=dict)
    # what it needs of the engine: teacher_input_grad, double_backward (checks.NEEDS)
    needs: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Stage:
    """Epochs a method runs before its main stage (RepDistiller's init stage of AB, FSP, FT)."""

    name: str
    epochs: int


@dataclass(frozen=True)
class StepContext:
    """Where training is, and what a step needs besides the batch."""

    epoch: int                 # 0-based epoch over the whole run, stages included
    step: int                  # global optimizer step being taken (0-based)
    epochs: int                # the run's epochs, stages included
    steps_per_epoch: int = 0
    total_steps: int = 0       # the run's last step (trainer.max_steps included)
    stage: str = MAIN_STAGE
    stage_epoch: int = 0       # 0-based epoch within the stage
    indices: torch.Tensor | None = None   # the batch's items in the training set (this rank's)
    views: dict[str, torch.Tensor] = field(default_factory=dict)   # pieces.TrainsOnViews
    label_smoothing: float = 0.0          # trainer.label_smoothing, for `Distiller.cross_entropy`


@dataclass(frozen=True)
class BuildInfo:
    """What a method may need at build time besides its modules: model specs (default layers),
    the inputs (`input_shape` of an image, None otherwise; `example_inputs`, a small real
    batch), classes, normalisation, the training labels (CRD's memory bank), the seed, and
    what models of the data are built with (`create_model(..., **model_options)`)."""

    student_spec: ModelSpec | None = None
    teacher_spec: ModelSpec | None = None
    input_shape: tuple[int, ...] | None = (3, 32, 32)
    num_classes: int = 100
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    student_arch: str | None = None
    train_labels: torch.Tensor | None = None
    seed: int = 0
    example_inputs: Inputs | None = None
    model_options: dict[str, Any] = field(default_factory=dict)   # e.g. the vocabulary's size


@dataclass(frozen=True)
class TeacherRequest:
    """One frozen teacher, before distill.teachers finds it: weights from `checkpoint`, else the
    zoo, else trained now (teacher.auto_train), else, with `distilled_from`, made from that
    teacher by a run of method `made_by` with `distill_options` and kept in the zoo."""

    role: str
    arch: str
    key: str = "teacher"                    # the config key errors about this teacher name
    checkpoint: str | None = None
    checkpoint_key: str = "teacher.checkpoint"
    pretrained: bool = False
    distilled_from: TeacherRequest | None = None
    distill_options: dict[str, Any] = field(default_factory=dict)
    made_by: str = "kd"


@dataclass
class Part:
    """One module of a method, by the role it plays."""

    role: str
    frozen: bool
    optimizer: str | None      # trained parts: the optimizer that updates them
    evaluated: bool            # evaluated every epoch (frozen parts: once, at the start)
    exported: bool = False     # the model student.safetensors holds (exactly one part)
    arch: str | None = None    # registry name, when the part is a registered model
    key: str | None = None     # the config key that chose it, named in errors about it


class ManualStep(Protocol):
    """What a manual `training_step` drives: the run's optimizers, its (fp16-scaled) backward,
    and optimizer steps that apply the non-finite policy and average gradients over ranks."""

    optimizers: dict[str, torch.optim.Optimizer]

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, name: str) -> bool: ...


OptimizerFactory = Callable[..., tuple[torch.optim.Optimizer, Any]]


class Distiller(nn.Module):
    """A method's parts and loss terms. `Distiller(student, teacher)` declares the usual two:
    `student` (trained, evaluated, exported) and `teacher` (frozen)."""

    traits: ClassVar[Traits] = Traits()

    def __init__(self, student: nn.Module | None = None, teacher: nn.Module | None = None):
        super().__init__()
        self.parts: dict[str, Part] = {}
        if student is not None:
            self.add_trained("student", student, evaluated=True, exported=True)
        if teacher is not None:
            self.add_frozen("teacher", teacher)

    # --- parts ---------------------------------------------------------------------------
    def add_frozen(self, role: str, model: nn.Module, *, arch: str | None = None) -> None:
        """A teacher: no gradients, eval mode for good, never in an optimizer or a checkpoint."""
        self._declare(role, model, Part(role, frozen=True, optimizer=None, evaluated=True,
                                        arch=arch))
        model.requires_grad_(False)
        model.eval()

    def add_trained(self, role: str, module: nn.Module, *, optimizer: str = "main",
                    evaluated: bool = False, exported: bool = False, arch: str | None = None,
                    key: str | None = None) -> None:
        self._declare(role, module, Part(role, frozen=False, optimizer=optimizer,
                                         evaluated=evaluated or exported, exported=exported,
                                         arch=arch, key=key))

    def _declare(self, role: str, module: nn.Module, part: Part) -> None:
        if role in self.parts:
            raise ValueError(f"part '{role}' is declared twice")
        setattr(self, role, module)
        self.parts[role] = part

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
    def exported_role(self) -> str:
        return next(role for role, p in self.parts.items() if p.exported)

    @property
    def exported(self) -> nn.Module:
        return self.part(self.exported_role)

    def check_declared(self) -> None:
        """One exported part; every module with parameters or buffers declared (an undeclared
        one would silently neither train nor be saved)."""
        if sum(p.exported for p in self.parts.values()) != 1:
            raise TypeError(f"{type(self).__name__} must export exactly one trained part "
                            "(add_trained(..., exported=True))")
        for name, child in self.named_children():
            if name not in self.parts and any(True for _ in (*child.parameters(),
                                                             *child.buffers())):
                raise TypeError(f"{type(self).__name__}.{name} is a module that is not a declared "
                                f"part: declare it with self.add_trained('{name}', ...) or "
                                f"self.add_frozen('{name}', ...)")

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

    def configure_optimizers(self, default: OptimizerFactory) -> dict[str, tuple[Any, Any]]:
        """{name: (optimizer, scheduler)} per optimizer name of the trained parts: by default
        the run's optimizer and schedule; `default(params, lr=...)` changes a setting,
        `default(params, constant=True)` keeps the lr as given (a stage's own)."""
        return {name: default(params) for name, params in self.parameter_groups().items()}

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        for model in self.frozen_parts().values():
            model.eval()   # BN statistics and dropout of a teacher must never change
        return self

    # --- what methods call ---------------------------------------------------------------
    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor,
                      ctx: StepContext) -> torch.Tensor:
        """The CE term against the labels, with the run's label smoothing (batch mean)."""
        return F.cross_entropy(logits, targets, label_smoothing=ctx.label_smoothing)

    @torch.no_grad()
    def teacher_logits(self, inputs: Inputs) -> torch.Tensor:
        return call_model(self.teacher, inputs)

    def frozen_forward(self, role: str, inputs: Inputs, *, input_grad: bool = False) -> Any:
        """A frozen part's output; with `input_grad`, gradients flow to the inputs (the part's
        own weights stay frozen)."""
        with contextlib.nullcontext() if input_grad else torch.no_grad():
            return call_model(self.part(role), inputs)

    def forward(self, inputs: Inputs, targets: torch.Tensor,
                ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The default step: the exported part's logits and the *weighted* loss terms."""
        raise NotImplementedError

    def training_step(self, inputs: Inputs, targets: torch.Tensor, ctx: StepContext,
                      step: ManualStep) -> dict[str, torch.Tensor]:
        """A manual step (`traits.manual_step`): forward, backward and optimizer steps through
        `step`; returns the loss terms to log."""
        raise NotImplementedError

    # --- what the options are checked by, before anything is built (method.checks) ------
    @classmethod
    def check_values(cls, options: dict) -> None:
        """Ranges (checks.require)."""

    @classmethod
    def check_schedule(cls, options: dict, epochs: int) -> None:
        """Against the run's length (trainer.epochs)."""

    @classmethod
    def loss_term_weights(cls, options: dict) -> dict[str, float]:
        """Each loss term's weight by option (all zero is refused): `*_weight` by default."""
        return {k: v for k, v in options.items() if k.endswith("_weight")
                and isinstance(v, (int, float)) and not isinstance(v, bool)}


FIXED_ARGUMENTS = ("student", "teacher", "teacher_models", "info")   # supplied by the framework


def build_distiller(name: str, student: nn.Module,
                    teachers: dict[str, nn.Module] | nn.Module | None, options: dict,
                    info: BuildInfo | None = None) -> Distiller:
    """Build method `name` with its options, naming any unknown or mistyped one. The constructor
    gets what it asks for by parameter name: `teacher` (the one frozen teacher),
    `teacher_models` (all of them, by role) and `info`."""
    if not len(DISTILLERS):   # the contract knows no method; importing them registers them
        raise ConfigError(f"no method is registered, so none is called {name!r}", key="distiller",
                          hint="import distill.catalog (every method) or the method's module "
                               "(distill.distillers.<name>) first")
    cls = DISTILLERS.get(name, key="distiller")
    params = inspect.signature(cls.__init__).parameters
    teachers = {"teacher": teachers} if isinstance(teachers, nn.Module) else dict(teachers or {})
    if cls.traits.needs_teacher and not teachers:
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
