"""The method contract, below both the engine and the methods (distill/distillers): the engine
imports this package and never a method; a method imports this package and never the engine.
core: the Distiller and what it is built and stepped with; pieces: opt-in parts a few methods
need; checks: the rules options and traits are checked by."""
from distill.method.core import (
    DISTILLERS, FIXED_ARGUMENTS, MAIN_STAGE, BuildInfo, Distiller, Inputs, ManualStep, Part,
    Stage, StepContext, TeacherRequest, Traits, build_distiller, call_model)
from distill.method.pieces import (
    DataFree, DerivedModels, OwnTeachers, SelfSyncedBuffers, Staged, TrainsOnViews,
    WeightedSampling, teacher_label, teacher_requests)

__all__ = ["DISTILLERS", "FIXED_ARGUMENTS", "MAIN_STAGE", "BuildInfo", "DataFree",
           "DerivedModels", "Distiller", "Inputs", "ManualStep", "OwnTeachers", "Part",
           "SelfSyncedBuffers", "Stage", "Staged", "StepContext", "TeacherRequest",
           "TrainsOnViews", "Traits", "WeightedSampling", "build_distiller", "call_model",
           "teacher_label", "teacher_requests"]
