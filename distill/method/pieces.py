"""Opt-in pieces: what one or a few methods need beyond the contract. A method inherits the
piece (`class Specialists(OwnTeachers, WeightedSampling, Distiller)`); the engine and the app
ask for it by type (`isinstance(distiller, TrainsOnViews)`), never through a default hook on
every method. Each piece names its users.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.method.core import Distiller, Stage, TeacherRequest


class OwnTeachers:
    """Teachers other than the one `teacher=` names (multi_teacher, takd, born_again,
    specialists): their requests, the run-directory label they give, and options derived from
    the first teachers and the data (specialists' class subsets) before the rest are asked for.
    `complete_options` must be deterministic: a resumed run derives them again."""

    @classmethod
    def teacher_requests(cls, options: dict, teacher: dict) -> list[TeacherRequest]:
        raise NotImplementedError

    @classmethod
    def teacher_label(cls, options: dict, teacher: str) -> str:
        return teacher

    @classmethod
    def complete_options(cls, options: dict, teachers: dict[str, nn.Module], data: Any,
                         device: torch.device) -> dict:
        return options


def teacher_requests(cls: type[Distiller], options: dict, teacher: dict) -> list[TeacherRequest]:
    """The frozen teachers method `cls` needs, given its options and the `teacher` group."""
    if issubclass(cls, OwnTeachers):
        return cls.teacher_requests(options, teacher)
    if not cls.traits.needs_teacher:
        return []
    return [TeacherRequest("teacher", teacher["name"], checkpoint=teacher.get("checkpoint"),
                           pretrained=bool(teacher.get("pretrained", False)))]


def teacher_label(cls: type[Distiller], options: dict, teacher: str) -> str | None:
    """The teacher part of run-directory names (`<label>-<student>/<method>`); None for a
    method without a teacher (`<student>/<method>`)."""
    if issubclass(cls, OwnTeachers):
        return cls.teacher_label(options, teacher)
    return teacher if cls.traits.needs_teacher else None


class DataFree:
    """A method that never reads a training image (deepinversion, dafl). The app builds the
    dataset without its training split and trains on `stand_in_training_set` instead: room for
    the images the method makes (`make_training_set` fills it before the first step, resumed
    runs too) or one placeholder per item of an epoch when it makes images every step."""

    @classmethod
    def stand_in_training_set(cls, options: dict, data: Any, *,
                              images_used: int | None = None) -> Any:
        """`images_used`: the most training items the run can draw (trainer.max_steps x the
        batch; None: no bound). A method that makes its images before training makes no more
        than `made_count` says."""
        raise NotImplementedError

    @classmethod
    def made_count(cls, options: dict, images_used: int | None) -> int | None:
        """How many images the method makes before training for a run that draws at most
        `images_used` items; None: it makes none before training (they come at every step)."""
        return None

    def make_training_set(self, dataset: Any, *, run_dir: Path, device: torch.device,
                          progress: Callable[..., Any]) -> None:
        """Nothing to do by default. `progress(what, total=..., unit=...)`: the engine's
        WorkProgress (a context: live bar, log lines with rate and time left) for long work."""

    @classmethod
    def made_images(cls, run_dir: Path, options: dict, input_shape: tuple[int, ...],
                    count: int) -> torch.Tensor | None:
        """Up to `count` normalised images a finished run trained on, read back from its run
        directory: what its int8 export calibrates on. None by default."""
        return None


class Staged:
    """Stages before the main one (ab, fsp, ft: RepDistiller's init stage). A staged method
    takes the manual step, so each stage steps only its own optimizer."""

    def stages(self) -> list[Stage]:
        raise NotImplementedError


class TrainsOnViews:
    """Extra views of each training image (mlkd's strong view): {name: registered augmentation
    (distill.data.augment)}, given in StepContext.views. Images only."""

    def views(self) -> dict[str, str]:
        raise NotImplementedError


class WeightedSampling:
    """How often each training item is drawn (specialists: data enriched for their classes):
    one weight per item, an epoch's worth drawn with replacement each epoch."""

    def sample_weights(self) -> torch.Tensor:
        raise NotImplementedError


class DerivedModels:
    """Models made of the method's parts (byot's early exits): evaluated every epoch beside the
    evaluated parts, reported in summary.json `models`, exported with tools/export.py
    --exit N. They hold no state of their own."""

    def derived_models(self) -> dict[str, nn.Module]:
        raise NotImplementedError


class SelfSyncedBuffers:
    """Buffers of trained parts the method keeps equal on every rank itself (crd's memory bank,
    updated from all ranks' samples): DDP need not broadcast them each step."""

    def self_synced_buffers(self) -> list[torch.Tensor]:
        raise NotImplementedError
