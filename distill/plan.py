"""The plan of a run: every option resolved and every check made before anything is built for
good. Planning reads (the config, the run directory's checkpoint, the data, the zoo's index)
and builds models only to check them (untrained, then dropped); it writes no file and trains
no model. A refused command therefore leaves everything as it found it. distill.app builds from
the plan, in the order its side effects need.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import default_collate

from distill import distributed as dist_utils
from distill.catalog import DISTILLERS, run_path
from distill.config import TrainerConfig
from distill.data import DATASETS, DatasetBundle, TensorImageDataset, build_data, dataset_labels
from distill.engine.loaders import data_path_transforms, view_transforms
from distill.engine.rundir import check_run_dir, check_schedule_change
from distill.engine.sampler import steps_per_epoch
from distill.engine.teacher_cache import check_cacheable
from distill.errors import ConfigError
from distill.method import (BuildInfo, DataFree, DerivedModels, Distiller, TeacherRequest,
                            TrainsOnViews, build_distiller, teacher_requests)
from distill.models import create_model, model_spec
from distill.zoo import TeacherZoo

log = logging.getLogger("distill")


@dataclass
class RunPlan:
    """A run, checked: what distill.app builds and trains."""

    cfg: DictConfig
    resolved: dict                       # the resolved config, as .hydra/config.yaml records it
    overrides: list[str]
    run_dir: Path
    device: torch.device
    method: type[Distiller]
    options: dict                        # the method's options (without `name`)
    checkpoint: dict | None              # what a resumed run continues from
    data: DatasetBundle
    requests: list[TeacherRequest]       # the teachers known before any is found
    info: BuildInfo
    pinned: dict[str, str]               # role -> the sha256 a resumed run started with
    trainer: TrainerConfig               # trainer.* as the trainer takes them
    run_name: str                        # <dataset>/<pair>/<method>/seed<N>: trackers' name
    publishes: bool                      # a vanilla run whose student joins the teacher zoo

    @property
    def seed(self) -> int:
        return self.cfg.seed


def plan_run(cfg: DictConfig, resolved: dict, device: torch.device, overrides: list[str],
             run_dir: Path) -> RunPlan:
    """The run `cfg` asks for, every check made (`resolved`: validate(cfg))."""
    # recorded with the config (.hydra/config.yaml, tracker hparams): trainer.batch_size is the
    # global batch, and this says over how many processes it was split
    resolved["world_size"] = dist_utils.launch_world_size()
    method = DISTILLERS.get(cfg.distiller.name)
    checkpoint = check_run_dir(run_dir, resolved, resume=cfg.trainer.resume,
                               teacherless=not method.traits.needs_teacher)
    dataset = resolved["dataset"]
    publishes = cfg.distiller.name == "none" and cfg.zoo.publish
    if publishes:   # a damaged zoo entry is named now, not after hours of training
        dist_utils.on_main(lambda: TeacherZoo(cfg.zoo.root).versions(dataset["name"],
                                                                     cfg.student.name))
    options = {k: v for k, v in resolved["distiller"].items() if k != "name"}
    data = plan_data(cfg, dataset, method, options)
    if data.data_digest is not None:
        # recorded with the config: a resume on other data is refused, the zoo and the report
        # keep runs on different data apart
        resolved["data_sha256"] = data.data_digest
    recorded = (checkpoint or {}).get("config", {}).get("data_sha256")
    if recorded is not None and recorded != data.data_digest:
        raise ConfigError(
            f"the data changed since this run started (digest {recorded[:16]}, now "
            f"{(data.data_digest or 'none')[:16]}): its weights were trained on the old data",
            key=DATASETS.meta(dataset["name"]).get("data_key", "dataset"),
            hint="put the data back, or start over with trainer.resume=false (the old files go "
                 "under previous/), or use another run directory (tag=...)")
    if checkpoint is not None and issubclass(method, DataFree):
        check_made_count(method, options, checkpoint["config"]["trainer"], cfg.trainer)
    if checkpoint is not None:
        check_schedule_change(checkpoint["config"], resolved,
                              steps_taken=checkpoint["state"]["global_step"],
                              steps_per_epoch=-(-steps_per_epoch(len(data.train),
                                                                 cfg.trainer.batch_size,
                                                                 resolved["world_size"],
                                                                 method.traits.min_batch)
                                                // cfg.trainer.accumulate),
                              follows_run_length=method.traits.follows_run_length)
    requests = teacher_requests(method, options, resolved["teacher"])
    if data.inputs == "images":
        for key, arch in (("student", cfg.student.name), *((r.key, r.arch) for r in requests)):
            check_input_size(arch, data.image_size, key=key)
    info = BuildInfo(student_spec=model_spec(cfg.student.name),
                     teacher_spec=model_spec(requests[0].arch) if requests else None,
                     input_shape=(tuple(data.val[0][0].shape) if data.inputs == "images"
                                  else None),
                     num_classes=data.num_classes, mean=tuple(data.mean), std=tuple(data.std),
                     student_arch=cfg.student.name, train_labels=dataset_labels(data.train),
                     seed=cfg.seed, example_inputs=example_inputs(data),
                     model_options=dict(data.model_options))
    check_distiller_fits(cfg.distiller.name, cfg.student.name, requests, options, info, data)
    if data.student_view is not None and issubclass(method, DerivedModels):
        raise ConfigError(f"{method.__name__} evaluates models cut from the student (its early "
                          "exits), which would not see the student's view",
                          key="dataset.student_view", allowed="null for this method")
    if checkpoint is not None and "teachers" not in checkpoint and requests:
        log.warning("this checkpoint was written before runs recorded their teachers' sha256: "
                    "the teacher it resumes with cannot be checked against the one it started "
                    "with (recorded from now on)")
    pinned = {t["role"]: t["sha256"] for t in (checkpoint or {}).get("teachers", [])}
    trainer = TrainerConfig(**resolved["trainer"])
    run_name = "/".join([dataset["name"], run_path(resolved["distiller"], cfg.teacher.name,
                                                   cfg.student.name, cfg.tag), f"seed{cfg.seed}"])
    return RunPlan(cfg, resolved, overrides, run_dir, device, method, options, checkpoint, data,
                   requests, info, pinned, trainer, run_name, publishes)


def plan_data(cfg: DictConfig, dataset: dict, method: type[Distiller],
              options: dict) -> DatasetBundle:
    """The run's data, read and checked: a data-free method's stand-in training set in place
    of the training split (never read), and the data path and teacher cache it allows."""
    data_free = issubclass(method, DataFree)
    data = build_data(dataset, training_split=not data_free)
    if data_free:
        # the training split is never touched from here on: the method's own set replaces it
        data = replace(data, train=method.stand_in_training_set(
            options, data, images_used=images_drawn(cfg.trainer)))
        log.info("%s is data-free: the student's training reads no training image (its "
                 "teacher was trained on them)%s", cfg.distiller.name,
                 " (dataset.train_fraction has nothing to keep a part of)"
                 if dataset.get("train_fraction", 1.0) != 1.0 else "")
        if cfg.trainer.data_path == "memory" and not isinstance(data.train, TensorImageDataset):
            raise ConfigError(f"{cfg.distiller.name} makes its images at every step: there is "
                              "no training data to hold in memory", key="trainer.data_path",
                              allowed="auto or loader")
    data_path_transforms(data, cfg.trainer.data_path)   # trainer.data_path=memory must fit
    check_cacheable(data, cfg.teacher.cache, key="teacher.cache")
    return data


def images_drawn(trainer: Any) -> int | None:
    """The most training items a run draws: trainer.max_steps optimizer steps of `accumulate`
    global batches; None without max_steps (every epoch draws the whole set)."""
    if not trainer["max_steps"]:
        return None
    return trainer["max_steps"] * trainer.get("accumulate", 1) * trainer["batch_size"]


def check_made_count(method: type[DataFree], options: dict, before: dict, now: Any) -> None:
    """A data-free method makes no more images than the run draws (trainer.max_steps bounds
    the set); a resumed run whose bound gives another set would train on other items than the
    steps it continues from, so it is refused (a cut run resumed with the same bound, or with
    one past the whole set, goes on bit for bit)."""
    made_before = method.made_count(options, images_drawn(before))
    made_now = method.made_count(options, images_drawn(now))
    if made_before != made_now:
        steps_before, steps_now = (("null" if t["max_steps"] is None else t["max_steps"])
                                   for t in (before, now))
        raise ConfigError(
            f"this run started with trainer.max_steps={steps_before}, which bounded "
            f"{method.__name__}'s set to {made_before} synthetic images; with "
            f"trainer.max_steps={steps_now} it would be {made_now}, and the steps "
            f"taken were drawn from the other set", key="trainer.max_steps",
            hint=f"resume with trainer.max_steps={steps_before}, or start over with "
                 "trainer.resume=false (the made images are read back where they fit), or use "
                 "another run directory (tag=...)")


def example_inputs(data: DatasetBundle, count: int = 2) -> torch.Tensor | dict:
    """The first `count` validation items' inputs, batched: what models are probed with."""
    return default_collate([data.val[i][0] for i in range(min(count, len(data.val)))])


def check_input_size(arch: str, image_size: int, *, key: str) -> None:
    """The dataset's images against what the model `arch` takes (its ModelSpec): one size only
    (a timm model with a fixed input size), or at least its total stride."""
    spec = model_spec(arch)
    if spec.fixed_input and spec.input_size != image_size:
        raise ConfigError(f"{arch} takes {spec.input_size}x{spec.input_size} images only; the "
                          f"dataset gives {image_size}x{image_size}", key=key,
                          allowed=f"a model for {image_size}x{image_size} images, or "
                                  f"dataset.image_size={spec.input_size} where the dataset has it")
    if spec.min_input_size is not None and image_size < spec.min_input_size:
        raise ConfigError(f"{arch} downsamples its input {spec.min_input_size}x: "
                          f"{image_size}x{image_size} images leave its last stage no pixel",
                          key=key, allowed=f"images of at least {spec.min_input_size}x"
                                           f"{spec.min_input_size} (dataset.image_size)")


def check_distiller_fits(name: str, student: str, requests: list[TeacherRequest], options: dict,
                         info: BuildInfo, data: DatasetBundle | None = None) -> None:
    """Methods that take `info` (feature layers, connectors, more models) or train on extra
    views of the data are built once on untrained models of the same architectures, so a bad
    layer option, or data the views cannot be made from, stops the run before a teacher or an
    assistant is trained for it."""
    cls = DISTILLERS.get(name)
    takes_info = "info" in inspect.signature(cls.__init__).parameters
    has_views = issubclass(cls, TrainsOnViews)
    if not takes_info and not (has_views and data is not None):
        return
    kwargs = {"num_classes": info.num_classes, **info.model_options}
    teachers = {r.role: create_model(r.arch, **kwargs) for r in requests}
    distiller = build_distiller(name, create_model(student, **kwargs), teachers, options, info)
    if data is not None and has_views:
        view_transforms(data, distiller.views())

