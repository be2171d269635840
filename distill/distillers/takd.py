"""Teacher-assistant KD (Mirzadeh et al., AAAI 2020): teacher -> assistant(s) -> student, each
link plain KD. A large teacher-student gap hurts KD; intermediate-sized assistants bridge it.

The method's one frozen teacher is its last assistant, requested as "distilled from" the one
before it, and so on back to the run's teacher (`teacher_requests`). distill.teachers makes
each missing link like a teacher (full training split, the dataset's recipe) by KD with this
method's KD options, and keeps it in the zoo, so later runs and other seeds reuse it. Training
the student is then KD from the last assistant.
"""
from __future__ import annotations

import inspect
from dataclasses import replace

from distill.distillers.kd import KD
from distill.method import DISTILLERS, OwnTeachers, TeacherRequest, teacher_requests
from distill.method.checks import require_models

KD_OPTIONS = ("ce_weight", "kd_weight", "temperature")   # each link is KD with these


@DISTILLERS.register("takd",
                     family="several teachers",
                     summary=("KD through intermediate-sized teacher assistants: teacher, "
                              "assistant, student"),
                     published_in=("4a",),
                     paper='Teacher assistants, Mirzadeh et al. AAAI 2020',
                     recipe='KD (CE 0.1, KD 0.9, T=4) along `assistants` (default `[resnet32]`)')
class TAKD(OwnTeachers, KD):
    def __init__(self, student, teacher, assistants: list[str] | None = None,
                 ce_weight: float = 0.1, kd_weight: float = 0.9, temperature: float = 4.0):
        super().__init__(student, teacher, ce_weight, kd_weight, temperature)
        self.assistants = list(assistants or [])

    @classmethod
    def check_values(cls, options):
        super().check_values(options)
        require_models(options, "assistants", at_least=1,
                       allowed="a non-empty list of model names, teacher side first, e.g. "
                               "distiller.assistants=[resnet32]")

    @classmethod
    def teacher_requests(cls, options, teacher):
        (link,) = teacher_requests(KD, options, teacher)
        defaults = inspect.signature(cls.__init__).parameters   # one place for the defaults
        kd = {k: options.get(k, defaults[k].default) for k in KD_OPTIONS}
        for arch in options["assistants"]:
            link = TeacherRequest("teacher", arch, key="distiller.assistants",
                                  distilled_from=replace(link, role="parent"), distill_options=kd)
        return [link]
