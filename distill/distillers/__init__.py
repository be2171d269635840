"""Distillation methods: one small file each, registered by the name used in configs."""
from distill.distillers.base import DISTILLERS, Distiller, StepContext, build_distiller

# importing the method modules registers them
from distill.distillers import dkd, kd, none  # noqa: E402,F401

__all__ = ["DISTILLERS", "Distiller", "StepContext", "build_distiller"]
