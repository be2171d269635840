"""KD from several teachers (Hinton et al. 2015, section 2): the student's soft target is one
distribution made from every teacher's softmax at temperature T, their weighted arithmetic mean
(default) or geometric mean (`mode`), by `distill.losses.ensemble_probs`. CE 0.1 + KD 0.9 at T=4
as for single-teacher KD. Each teacher is found like the run's teacher (its
`teacher_checkpoints` entry, else the zoo, else trained now with `teacher.auto_train`).
There is no reference code to follow (mdistiller, RepDistiller and torchdistill have no
multi-teacher KD) and no published CIFAR-100 number: this is the paper's sentence, with the
single-teacher KD loss of the reference code (KL in log space, T^2) against the ensemble.
"""
from __future__ import annotations

import math

import torch

from distill.errors import ConfigError
from distill.losses import ensemble_log_probs, soft_target_loss
from distill.losses.ensemble import ENSEMBLE_MODES, ensemble_weights
from distill.method import DISTILLERS, Distiller, OwnTeachers, TeacherRequest, Traits, call_model
from distill.method.checks import require, require_models


@DISTILLERS.register("multi_teacher",
                     family="several teachers",
                     summary="KD to the mean of several teachers' softened predictions",
                     published_in=("4h",),
                     paper='Several teachers, Hinton et al. 2015 (section 2)',
                     recipe=('KD (CE 0.1, KD 0.9, T=4) to the `arithmetic` (or `geometric`) mean '
                             "of the teachers' softened distributions, `weights` equal unless "
                             'given; `teachers` (default `[<teacher>, resnet110]`, each found like'
                             ' `teacher=`), `teacher_checkpoints`'))
class MultiTeacher(OwnTeachers, Distiller):
    traits = Traits(teacher_outputs_only=True)

    def __init__(self, student, teacher_models, teachers: list[str] | None = None,
                 teacher_checkpoints: list[str | None] | None = None, ce_weight: float = 0.1,
                 kd_weight: float = 0.9, temperature: float = 4.0, mode: str = "arithmetic",
                 weights: list[float] | None = None):
        super().__init__(student, None)
        if not teacher_models:
            raise ConfigError("multi_teacher needs teachers", key="distiller.teachers")
        for role, model in teacher_models.items():
            self.add_frozen(role, model)
        self.teacher_roles = list(teacher_models)
        self.ce_weight, self.kd_weight, self.temperature = ce_weight, kd_weight, temperature
        self.mode, self.weights = mode, ensemble_weights(len(self.teacher_roles), weights)

    @classmethod
    def check_values(cls, options):
        require(options, temperature=">0", ce_weight=">=0", kd_weight=">=0")
        teachers = require_models(options, "teachers", at_least=1,
                                  allowed="a non-empty list of model names, e.g. "
                                          "distiller.teachers=[resnet56,resnet110]")
        checkpoints = options.get("teacher_checkpoints")
        if checkpoints is not None and len(checkpoints) != len(teachers):
            raise ConfigError(f"{len(checkpoints)} checkpoints for {len(teachers)} teachers",
                              key="distiller.teacher_checkpoints",
                              allowed="null, or one entry per teacher (null: from the zoo)")
        if options.get("mode", "arithmetic") not in ENSEMBLE_MODES:
            raise ConfigError(f"invalid value {options['mode']!r}", key="distiller.mode",
                              allowed=", ".join(ENSEMBLE_MODES))
        weights = options.get("weights")
        if weights is not None:
            try:
                if not isinstance(weights, (list, tuple)) or not all(
                        isinstance(w, (int, float)) and not isinstance(w, bool)
                        and math.isfinite(w) for w in weights):
                    raise ValueError(f"invalid value {weights!r}")
                ensemble_weights(len(teachers), weights)
            except ValueError as exc:
                raise ConfigError(str(exc), key="distiller.weights",
                                  allowed="null (equal), or one non-negative number per teacher, "
                                          "not all zero") from None

    @classmethod
    def teacher_requests(cls, options, teacher):
        checkpoints = options.get("teacher_checkpoints") or [None] * len(options["teachers"])
        return [TeacherRequest(f"teacher{i}", name, key="distiller.teachers",
                               checkpoint=checkpoint,
                               checkpoint_key="distiller.teacher_checkpoints",
                               pretrained=bool(teacher.get("pretrained", False)))
                for i, (name, checkpoint) in enumerate(zip(options["teachers"], checkpoints))]

    @classmethod
    def teacher_label(cls, options, teacher):
        return "+".join(options.get("teachers") or [teacher])

    def forward(self, inputs, targets, ctx):
        logits = call_model(self.student, inputs)
        with torch.no_grad():
            teacher_logits = [call_model(self.part(role), inputs) for role in self.teacher_roles]
            target = ensemble_log_probs(teacher_logits, self.temperature, self.mode, self.weights)
        return logits, {
            "ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
            "kd": self.kd_weight * soft_target_loss(logits, target, self.temperature),
        }
