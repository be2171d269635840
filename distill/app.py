"""The train job: validate a composed config, build the parts, fit, publish.

`run(cfg)` is the whole job and needs no Hydra, so tests and the zoo's auto-training call it
directly (the command line is distill.cli). Nothing below `run` reads the config object:
components get plain keyword arguments.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig

from distill.config import run_path
from distill.data import (DATASETS, DatasetBundle, TensorImageDataset, build_datasets,
                          dataset_labels)
from distill.data.batched import tensor_origin, tensor_source
from distill.data.views import apply_student_view
from distill.distillers import DISTILLERS, BuildInfo, Distiller, TeacherRequest, build_distiller
from distill.engine import distributed as dist_utils
from distill.engine.loaders import data_path_transforms, view_transforms
from distill.engine.rundir import (check_run_dir, check_schedule_change, discard_if_unused,
                                   locked, note_new_folders, start_run_dir)
from distill.engine.sampler import steps_per_epoch
from distill.engine.teacher_cache import (OutputStore, attach_teacher_cache, check_cacheable,
                                          images_digest, open_store)
from distill.engine.trainer import Trainer, TrainerOptions
from distill.errors import ConfigError
from distill.models import create_model, model_spec
from distill.teachers import ResolvedTeacher, TeacherResolver, split_identity
from distill.validation import check_teacher_cache, resolve_device, validate
from distill.zoo import TeacherZoo

log = logging.getLogger("distill")



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- data, shapes -----------------------------------------------------------------------------
def build_data(dataset: dict, *, training_split: bool = True) -> DatasetBundle:
    options = {k: v for k, v in dataset.items() if k not in ("name", "recipe")}
    return build_datasets(dataset["name"], training_split=training_split, **options)


def dry_forward(distiller: Distiller, checks: list[tuple[str, torch.nn.Module]],
                data: DatasetBundle, device: torch.device) -> None:
    """One forward pass of each model on two validation images: class counts agree before
    training starts. `checks` pairs each model with the config key that chose it."""
    images = torch.stack([data.val[i][0] for i in range(min(2, len(data.val)))]).to(device)
    for key, model in checks:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(images)
        except (RuntimeError, ValueError, AssertionError, TypeError) as exc:
            raise ConfigError(f"{model.__class__.__name__} cannot take the dataset's "
                              f"{tuple(images.shape[1:])} images: "
                              f"{(str(exc) or type(exc).__name__).splitlines()[0]}",
                              key=key) from None
        finally:
            model.train(was_training)
        if logits.ndim != 2 or logits.shape[1] != data.num_classes:
            raise ConfigError(f"{key} outputs {tuple(logits.shape[1:])} logits but the dataset "
                              f"has {data.num_classes} classes", key=key)


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
    """Methods that take `info` (feature layers, connectors, more models) or train on extra views
    of the data are built once on untrained models of the same architectures, so a bad layer
    option, or data the views cannot be made from, stops the run before a teacher or an
    assistant is trained for it."""
    cls = DISTILLERS.get(name)
    takes_info = "info" in inspect.signature(cls.__init__).parameters
    has_views = cls.views is not Distiller.views
    if not takes_info and not (has_views and data is not None):
        return
    teachers = {r.role: create_model(r.arch, num_classes=info.num_classes) for r in requests}
    distiller = build_distiller(name, create_model(student, num_classes=info.num_classes),
                                teachers, options, info)
    if data is not None:
        view_transforms(data, distiller.views())


# --- the job ----------------------------------------------------------------------------------
def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train one student (or a teacher, with distiller=none). Returns summary.json's content.
    The run directory is locked for the whole job; a command refused before training starts
    leaves it as it found it (and removes it when it was made for this command)."""
    overrides = overrides or []
    run_dir = Path(cfg.run_dir)
    try:
        resolved = validate(cfg)   # reads no file: the run directory is not touched yet
        device = resolve_device(cfg.device)
    except ConfigError:
        discard_if_unused(run_dir, locked_here=False)   # not a folder a live run holds
        raise
    dist_utils.init_from_env(use_cuda=device.type == "cuda")
    note_new_folders(run_dir)
    with contextlib.ExitStack() as held:
        # a process refused here has touched nothing of the holder's
        held.enter_context(locked(run_dir))
        try:
            trainer, publish = prepare(cfg, resolved, overrides, run_dir, device)
        except ConfigError:
            dist_utils.on_main(lambda: discard_if_unused(run_dir))
            raise
        summary = trainer.fit()
        log.info("done: best top-1 %.2f%%, last %.2f%%, %.0f images/s, %.1f s",
                 summary["best_top1"], summary["last_top1"], summary["train_images_per_sec"] or 0,
                 summary["wall_seconds"])
        # also when the run had finished before: a job killed between its last step and
        # publishing publishes now (a version the zoo holds already is left as it is); before
        # any rank goes on: e.g. a teacher trained for a run is in the zoo for all
        if publish is not None:
            dist_utils.on_main(lambda: publish(summary))
        return summary


def prepare(cfg: DictConfig, resolved: dict, overrides: list[str], run_dir: Path,
            device: torch.device) -> tuple[Trainer, Callable[[dict], Any] | None]:
    """Everything before the first step, in the order that refuses a bad command before any
    file of the run directory is changed: the checkpoint to resume and what may differ from it,
    the data, the teachers, the models and one dry forward pass; then the directory is started
    and the trainer built. Returns the trainer and what publishes the result to the zoo."""
    # recorded with the config (.hydra/config.yaml, tracker hparams): trainer.batch_size is the
    # global batch, and this says over how many processes it was split
    resolved["world_size"] = dist_utils.launch_world_size()
    distiller_cls = DISTILLERS.get(cfg.distiller.name)
    checkpoint = check_run_dir(run_dir, resolved, resume=cfg.trainer.resume,
                               teacherless=not distiller_cls.requires_teacher)
    dataset = resolved["dataset"]
    publishes = cfg.distiller.name == "none" and cfg.zoo.publish
    if publishes:   # a damaged zoo entry is named now, not after hours of training
        dist_utils.on_main(lambda: TeacherZoo(cfg.zoo.root).versions(dataset["name"],
                                                                     cfg.student.name))
    seed_everything(cfg.seed)
    options = {k: v for k, v in resolved["distiller"].items() if k != "name"}
    data = build_data(dataset, training_split=not distiller_cls.data_free)
    if distiller_cls.data_free:
        # the training split is never touched from here on: the method's own set replaces it
        data = replace(data, train=distiller_cls.stand_in_training_set(options, data))
        log.info("%s is data-free: the student's training reads no training image (its "
                 "teacher was trained on them)%s", cfg.distiller.name,
                 " (dataset.train_fraction has nothing to keep a part of)"
                 if dataset.get("train_fraction", 1.0) != 1.0 else "")
    if distiller_cls.data_free and cfg.trainer.data_path == "memory" \
            and not isinstance(data.train, TensorImageDataset):
        raise ConfigError(f"{cfg.distiller.name} makes its images at every step: there is no "
                          "training data to hold in memory", key="trainer.data_path",
                          allowed="auto or loader")
    data_path_transforms(data, cfg.trainer.data_path)   # trainer.data_path=memory must fit
    check_cacheable(data, cfg.teacher.cache, key="teacher.cache")
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
    if checkpoint is not None:
        check_schedule_change(checkpoint["config"], resolved,
                              steps_taken=checkpoint["state"]["global_step"],
                              steps_per_epoch=-(-steps_per_epoch(len(data.train),
                                                                 cfg.trainer.batch_size,
                                                                 resolved["world_size"])
                                                // cfg.trainer.accumulate),
                              follows_run_length=distiller_cls.follows_run_length)

    requests = distiller_cls.teacher_requests(options, resolved["teacher"])
    for key, arch in (("student", cfg.student.name), *((r.key, r.arch) for r in requests)):
        check_input_size(arch, data.image_size, key=key)
    info = BuildInfo(student_spec=model_spec(cfg.student.name),
                     teacher_spec=model_spec(requests[0].arch) if requests else None,
                     input_shape=tuple(data.val[0][0].shape), num_classes=data.num_classes,
                     mean=tuple(data.mean), std=tuple(data.std), student_arch=cfg.student.name,
                     train_labels=dataset_labels(data.train), seed=cfg.seed)
    check_distiller_fits(cfg.distiller.name, cfg.student.name, requests, options, info, data)
    pinned = {t["role"]: t["sha256"] for t in (checkpoint or {}).get("teachers", [])}
    if checkpoint is not None and "teachers" not in checkpoint and requests:
        log.warning("this checkpoint was written before runs recorded their teachers' sha256: "
                    "the teacher it resumes with cannot be checked against the one it started "
                    "with (recorded from now on)")
    teachers, options, requests = find_teachers(cfg, resolved, options, data, device,
                                                overrides, pinned, requests)
    digests = [t.sha256 for t in teachers]
    for i, teacher in enumerate(teachers):
        if teacher.sha256 in digests[:i]:
            log.warning("%s and %s are the same weights (sha256 %s): they teach as one",
                        teachers[digests.index(teacher.sha256)].role, teacher.role,
                        teacher.sha256[:16])
    # the teachers' runs left the random state as it was; the student starts from the seed
    seed_everything(cfg.seed)
    student = create_model(cfg.student.name, num_classes=data.num_classes,
                           **({"pretrained": True} if cfg.student.pretrained else {}))
    distiller = build_distiller(cfg.distiller.name, student, {t.role: t.model for t in teachers},
                                options, info).to(device)
    apply_student_view(distiller, data.student_view, data.mean, data.std)
    if distiller.parts[distiller.exported_role].arch is None:
        distiller.describe(distiller.exported_role, arch=cfg.student.name)
    for teacher in teachers:
        distiller.describe(teacher.role, arch=teacher.name)
    keys = {r.role: r.key for r in requests}
    dry_forward(distiller, [("student" if role == distiller.exported_role else
                             keys.get(role) or distiller.parts[role].key or "distiller", model)
                            for role, model in (*distiller.evaluated_parts().items(),
                                                *distiller.frozen_parts().items())],
                data, device)
    teacher_cache = None
    if cfg.teacher.cache == "views":   # before the run directory: a refused dataset writes nothing
        teacher_cache = attach_teacher_cache(
            distiller, teachers, data, zoo_root=cfg.zoo.root, dataset=dataset["name"],
            precision=cfg.trainer.precision, device=device, dtype=cfg.teacher.cache_dtype)

    run_name = "/".join([dataset["name"], run_path(resolved["distiller"], cfg.teacher.name,
                                                   cfg.student.name, cfg.tag), f"seed{cfg.seed}"])
    dist_utils.on_main(lambda: start_run_dir(
        run_dir, resolved, resuming=checkpoint is not None, overrides=overrides,
        resume_step=checkpoint["state"]["global_step"] if checkpoint else None))
    # e.g. DeepInversion's synthesis (cached in the run directory), from its own seeds
    distiller.make_training_set(data.train, run_dir=run_dir, device=device)
    seed_everything(cfg.seed)  # model init consumed randomness; training starts from the seed
    if dist_utils.rank() > 0:  # other augmentations (and teacher noise) on other ranks
        seed_everything(cfg.seed + 7919 * dist_utils.rank())
    trainer = Trainer(
        distiller, data, options=TrainerOptions(**resolved["trainer"]),
        optimizer=resolved["optimizer"], scheduler=resolved["scheduler"], run_dir=run_dir,
        device=device, loggers=resolved["logger"] or {}, config=resolved, seed=cfg.seed,
        run_name=run_name, checkpoint=checkpoint, teachers=[t.record() for t in teachers],
        teacher_cache=teacher_cache)
    log_start(run_dir, cfg, device, distiller, teachers)
    publish = None
    if publishes:
        def publish(summary: dict) -> None:
            publish_to_zoo(TeacherZoo(cfg.zoo.root), dataset, cfg, run_dir, summary, data)
    return trainer, publish


def find_teachers(cfg: DictConfig, resolved: dict, options: dict, data: DatasetBundle,
                  device: torch.device, overrides: list[str], pinned: dict[str, str],
                  requests: list[TeacherRequest]
                  ) -> tuple[list[ResolvedTeacher], dict, list[TeacherRequest]]:
    """The method's frozen teachers, found (zoo, files) or made as the config says; `pinned`:
    the sha256 a resumed run recorded per role. Returns them, the options completed from the
    first ones (the specialists' class subsets), and every request."""
    distiller_cls = DISTILLERS.get(cfg.distiller.name)
    resolver = TeacherResolver(cfg, resolved["dataset"], data.num_classes,
                               TeacherZoo(cfg.zoo.root), overrides, train=run,
                               data_digest=data.data_digest)
    teachers = [resolver.resolve(r, pinned.get(r.role)) for r in requests]
    # options derived from those teachers and the data (the specialists' class subsets); the
    # teachers that depend on them are requested and resolved now
    completed = distiller_cls.complete_options(options, {t.role: t.model for t in teachers},
                                               data, device)
    if completed != options:
        options, known = completed, {r.role for r in requests}
        later = [r for r in distiller_cls.teacher_requests(options, resolved["teacher"])
                 if r.role not in known]
        requests = [*requests, *later]
        teachers += [resolver.resolve(r, pinned.get(r.role)) for r in later]
    return teachers, options, requests


@dataclass
class CacheJob:
    """One teacher whose outputs tools/cache_teacher.py stores for every (image, view)."""

    teacher: ResolvedTeacher
    store: OutputStore
    images: torch.Tensor   # the uint8 training images the store is keyed by
    transform: Any         # their BatchTransform (its views)
    items: torch.Tensor    # which of them the run trains on (dataset.train_fraction: a part)


def teacher_cache_jobs(cfg: DictConfig, overrides: list[str]) -> tuple[list[CacheJob], torch.device]:
    """The caches a run of `cfg` with teacher.cache=views reads, opened (found, or made empty),
    with their teachers found or made as that run would: what tools/cache_teacher.py fills.
    Refuses methods and datasets the cache cannot serve, as the run would."""
    resolved = validate(cfg)
    device = resolve_device(cfg.device)
    distiller_cls = DISTILLERS.get(cfg.distiller.name)
    check_teacher_cache(cfg.distiller.name, distiller_cls, "views")
    options = {k: v for k, v in resolved["distiller"].items() if k != "name"}
    data = build_data(resolved["dataset"])
    check_cacheable(data, "views", key="dataset")
    requests = distiller_cls.teacher_requests(options, resolved["teacher"])
    teachers, _, _ = find_teachers(cfg, resolved, options, data, device, overrides, {}, requests)
    base, items = tensor_origin(data.train)
    transform = tensor_source(base)[1]
    digest = images_digest(base.images)
    jobs = []
    for teacher in teachers:
        model = teacher.model.to(device).eval()
        if cfg.trainer.channels_last:
            model.to(memory_format=torch.channels_last)
        store = open_store(model, arch=teacher.name, teacher_sha256=teacher.sha256, train=base,
                           zoo_root=cfg.zoo.root, dataset=resolved["dataset"]["name"],
                           precision=cfg.trainer.precision, device=device,
                           dtype=cfg.teacher.cache_dtype, images_sha256=digest)
        jobs.append(CacheJob(teacher, store, base.images, transform, items))
    return jobs, device


def log_start(run_dir: Path, cfg: DictConfig, device: torch.device, distiller: Distiller,
              teachers: list[ResolvedTeacher]) -> None:
    exported = distiller.exported
    aux = distiller.auxiliary_parameter_count()
    others = [f"{role} {distiller.parts[role].arch}" for role in distiller.evaluated_parts()
              if role != distiller.exported_role]
    log.info("run dir %s | %s on %s | student %s (%s params%s)%s", run_dir, cfg.distiller.name,
             device, cfg.student.name, f"{sum(p.numel() for p in exported.parameters()):,}",
             f" + {aux:,} in connectors" if aux else "",
             f" | also trained: {', '.join(others)}" if others else "")
    for t in teachers:
        log.info("%s %s: sha256 %s (%s)", t.role, t.name, t.sha256, t.source)


def publish_to_zoo(zoo: TeacherZoo, dataset: dict, cfg: DictConfig, run_dir: Path,
                   summary: dict, data: DatasetBundle) -> None:
    """Only models trained to the end on the full training split become zoo teachers."""
    if dataset.get("train_fraction", 1.0) != 1.0:
        log.info("not published to the zoo: trained on part of the training split")
    elif dataset.get("student_view"):
        log.info("not published to the zoo: trained on the %s view of the images, not on them",
                 dataset["student_view"])
    elif summary["stopped_early"]:
        log.info("not published to the zoo: stopped early by trainer.max_steps")
    elif cfg.trainer.quantize != "none":
        log.info("not published to the zoo: trained on %s weights (zoo models are float)",
                 cfg.trainer.quantize)
    else:
        zoo.publish(dataset["name"], cfg.student.name, run_dir / "student.safetensors", {
            "top1": summary["last_top1"], "best_top1": summary["best_top1"],
            "epochs": summary["epochs"], "seed": cfg.seed, "run_dir": str(run_dir.resolve()),
            "num_classes": data.num_classes,
            "split": split_identity(dataset, data.data_digest)})
