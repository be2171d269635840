"""The registered methods, all of them: importing this module imports every method
(distill.distillers) and registers the Hydra resolvers that need them. The app, the tools and
the report import it; the engine and the contract never do.

    ${distill_run:${distiller},${teacher.name},${student.name},${tag}}   # the run's folder
    ${distill_methods:}   # every registered method: the benchmark sweeps' distiller axis
"""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

import distill.distillers  # noqa: F401 - registers every method
from distill.method import DISTILLERS, teacher_label


def run_path(distiller: Any, teacher: str, student: str, tag: str = "") -> str:
    """`resnet56-resnet20/kd` for distillation, `resnet20/none` for vanilla training (and any
    method without a teacher, e.g. dml), `resnet56+resnet110-resnet20/multi_teacher`: the
    method's teacher label. `distiller` is the method's name or its whole config group."""
    name = distiller if isinstance(distiller, str) else distiller["name"]
    options = {} if isinstance(distiller, str) else {k: distiller[k] for k in distiller}
    label = teacher_label(DISTILLERS.get(name), options, teacher) if name in DISTILLERS \
        else teacher
    pair = student if label is None else f"{label}-{student}"
    return f"{pair}/{name}" + (f"-{tag}" if tag else "")


def registered_methods() -> str:
    """Every registered method, comma-separated (`${distill_methods:}`), so a new method joins
    the sweeps without editing a list."""
    return ",".join(DISTILLERS.list())


for _name, _resolver in (("distill_run", run_path), ("distill_methods", registered_methods)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)
