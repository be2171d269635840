"""Teacher-assistant KD (Mirzadeh et al., AAAI 2020): teacher -> assistant(s) -> student, each
link plain KD. A large teacher-student gap hurts KD; intermediate-sized assistants bridge it.

The app builds the chain before training (`distill.assistants`): each assistant is distilled
with KD from the model before it (with this method's KD weights and temperature), like a
teacher (full training split, the dataset's recipe), and cached in the teacher zoo, so later
runs and other seeds reuse it. This class then is KD from the last assistant.
"""
from __future__ import annotations

from distill.distillers.base import DISTILLERS
from distill.distillers.kd import KD
from distill.errors import ConfigError, unknown_name_error
from distill.models import list_models


@DISTILLERS.register("takd")
class TAKD(KD):
    assistants_option = "assistants"

    def __init__(self, student, teacher, assistants: list[str] | None = None,
                 ce_weight: float = 0.1, kd_weight: float = 0.9, temperature: float = 4.0):
        super().__init__(student, teacher, ce_weight, kd_weight, temperature)
        self.assistants = list(assistants or [])

    @classmethod
    def check_values(cls, options):
        super().check_values(options)
        assistants = options.get("assistants")
        if not assistants or isinstance(assistants, str):
            raise ConfigError(f"invalid value {assistants!r}", key="distiller.assistants",
                              allowed="a non-empty list of model names, teacher side first, "
                                      "e.g. distiller.assistants=[resnet32]")
        for name in assistants:
            if name not in list_models():
                raise unknown_name_error("model", name, list_models(), key="distiller.assistants")
