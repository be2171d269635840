"""Born-Again Networks (Furlanello, Lipton, Tschannen, Itti & Anandkumar, ICML 2018): students
of the teacher's own architecture. Generation 0 is a model of the student's architecture
trained the usual way (the zoo's, or `teacher.auto_train`); generation k learns by KD from
generation k-1; this run trains generation `generations`. The generations in between are made
like TAKD's assistants (`teacher_requests`): each a KD run of the whole recipe, kept in the zoo
under its parent's weights and the KD options, so other seeds and later runs reuse them.

The paper's BAN student learns from the teacher's output distribution alone (its BAN+L variant
adds the label loss: `ce_weight`), at temperature 1. With `ensemble`, the run's generation
learns from the mean of every earlier generation's distribution, 0 included (the issue's
reading of the paper's BANE, which averages the generations' predictions at test time).
There is no reference code; the KD term is the reference KD loss (KL, T^2) of distill.losses.
"""
from __future__ import annotations

import inspect
from dataclasses import replace

import torch

from distill.errors import ConfigError
from distill.losses import ensemble_log_probs, soft_target_loss
from distill.method import (DISTILLERS, BuildInfo, Distiller, OwnTeachers, TeacherRequest, Traits,
                            call_model)
from distill.method.checks import require, require_models

LINK_OPTIONS = ("ce_weight", "kd_weight", "temperature")   # every generation learns with these


@DISTILLERS.register("born_again",
                     family="self",
                     summary=("A student of its own architecture learns from the previous "
                              "generation"),
                     published_in=("4c",),
                     paper='Born-Again Networks, Furlanello et al. ICML 2018',
                     recipe=("generation k (the student's architecture) learns from generation k-1"
                             " by KD on the teacher's outputs only (CE 0, KD 1, T=1; `ce_weight` >"
                             ' 0 is BAN+L); `generations` 3: generations 0..2 are zoo models, this'
                             ' run trains generation 3; `ensemble: true` teaches with the mean of '
                             'all earlier generations'))
class BornAgain(OwnTeachers, Distiller):
    traits = Traits(teacher_outputs_only=True)

    def __init__(self, student, teacher_models, architecture: str | None = None,
                 generations: int = 3, ensemble: bool = False, ce_weight: float = 0.0,
                 kd_weight: float = 1.0, temperature: float = 1.0, *, info: BuildInfo):
        super().__init__(student, None)
        if info.student_arch is not None and architecture != info.student_arch:
            raise ConfigError(f"every generation is a {architecture}, but the student is "
                              f"{info.student_arch}", key="distiller.architecture",
                              hint=f"set student={architecture}, or leave "
                                   "distiller.architecture at its default (the student's)")
        for role, model in teacher_models.items():
            self.add_frozen(role, model, arch=architecture)
        self.teacher_roles = list(teacher_models)
        self.ce_weight, self.kd_weight, self.temperature = ce_weight, kd_weight, temperature

    @classmethod
    def check_values(cls, options):
        require(options, generations="int>0", ensemble="bool", ce_weight=">=0",
                kd_weight=">=0", temperature=">0")
        require_models({"architecture": [options.get("architecture")]}, "architecture",
                       at_least=1, allowed="a model name (default: the student's)")

    @classmethod
    def teacher_requests(cls, options, teacher):
        defaults = inspect.signature(cls.__init__).parameters   # one place for the defaults
        link = {k: options.get(k, defaults[k].default) for k in LINK_OPTIONS}
        arch = options["architecture"]
        chain = [TeacherRequest("gen0", arch, checkpoint=teacher.get("checkpoint"),
                                pretrained=bool(teacher.get("pretrained", False)))]
        for k in range(1, options.get("generations", defaults["generations"].default)):
            chain.append(TeacherRequest(f"gen{k}", arch, key="distiller.generations",
                                        distilled_from=replace(chain[-1], role="parent"),
                                        distill_options=link))
        if options.get("ensemble", defaults["ensemble"].default):
            return chain
        return [replace(chain[-1], role="teacher")]

    @classmethod
    def teacher_label(cls, options, teacher):
        generations = options.get("generations",
                                  inspect.signature(cls.__init__).parameters["generations"].default)
        return f"{options.get('architecture')}-gen{generations}"

    def forward(self, inputs, targets, ctx):
        logits = call_model(self.student, inputs)
        with torch.no_grad():
            teachers = [call_model(self.part(role), inputs) for role in self.teacher_roles]
            target = ensemble_log_probs(teachers, self.temperature)
        return logits, {
            "ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
            "kd": self.kd_weight * soft_target_loss(logits, target, self.temperature),
        }
