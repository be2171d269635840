"""Distillation methods: one small file each, registered by the name used in configs.

Every module of this package is imported here, so a new method is its file and its YAML: no
list to extend.
"""
import importlib
import pkgutil

from distill.distillers.base import (
    DISTILLERS, MAIN_STAGE, BuildInfo, Distiller, FeatureDistiller, Stage, StepContext,
    TeacherRequest, build_distiller)

NOT_METHODS = ("base", "connectors")
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in NOT_METHODS:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DISTILLERS", "MAIN_STAGE", "BuildInfo", "Distiller", "FeatureDistiller", "Stage",
           "StepContext", "TeacherRequest", "build_distiller"]
