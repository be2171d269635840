"""Distillation methods: one small file each, registered by the name used in configs."""
from distill.distillers.base import (
    DISTILLERS, BuildInfo, Distiller, FeatureDistiller, StepContext, build_distiller)

# importing the method modules registers them
from distill.distillers import at, dkd, fitnet, kd, noisy_kd, none, rkd, takd  # noqa: E402,F401

__all__ = ["DISTILLERS", "BuildInfo", "Distiller", "FeatureDistiller", "StepContext",
           "build_distiller"]
