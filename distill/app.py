"""The train job: validate a composed config, plan the run, build it, fit, publish.

`run(cfg)` is the whole job and needs no Hydra, so tests and the zoo's auto-training call it
directly (the command line is distill.cli). The plan (distill.plan) makes every check without a
side effect; `build` then makes the teachers (finding or training them), the student and the
method, starts the run directory and returns the trainer. Nothing below `run` reads the config
object beyond the plan: components get plain keyword arguments.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from distill import distributed as dist_utils
from distill.catalog import DISTILLERS
from distill.checkpoint import seed_everything
from distill.data import DatasetBundle, build_data
from distill.data.batched import tensor_source
from distill.data.views import apply_student_view
from distill.engine.progress import WorkProgress
from distill.engine.rundir import discard_if_unused, locked, note_new_folders, start_run_dir
from distill.engine.teacher_cache import (OutputStore, attach_teacher_cache, cache_source,
                                          check_cacheable, open_store)
from distill.engine.trainer import Trainer
from distill.errors import ConfigError
from distill.inputs import call_model, to_device
from distill.method import (DataFree, Distiller, OwnTeachers, TeacherRequest, build_distiller,
                            teacher_requests)
from distill.models import create_model
from distill.plan import RunPlan, example_inputs, plan_run
from distill.teachers import ResolvedTeacher, TeacherResolver, split_identity
from distill.validation import check_teacher_cache, resolve_device, validate
from distill.zoo import TeacherZoo

log = logging.getLogger("distill")


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
            plan = plan_run(cfg, resolved, device, overrides, run_dir)
            trainer, publish = build(plan)
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


def build(plan: RunPlan) -> tuple[Trainer, Callable[[dict], Any] | None]:
    """The run's parts, in the order the refusal guarantees need: the teachers (found, or
    trained into the zoo), the student and the method with one dry forward pass of every model
    (still refusable: nothing of the run directory is written yet), then the run directory,
    a data-free method's training set and the trainer. The models start from the run's seed;
    the trainer seeds the training stream itself."""
    cfg, data = plan.cfg, plan.data
    teachers, options, requests = find_teachers(
        teacher_resolver(cfg, plan.resolved["dataset"], data, plan.overrides), plan.method,
        plan.options, plan.requests, data, plan.device, plan.resolved["teacher"], plan.pinned)
    digests = [t.sha256 for t in teachers]
    for i, teacher in enumerate(teachers):
        if teacher.sha256 in digests[:i]:
            log.warning("%s and %s are the same weights (sha256 %s): they teach as one",
                        teachers[digests.index(teacher.sha256)].role, teacher.role,
                        teacher.sha256[:16])
    # the teachers' runs left the random state as it was; the models start from the seed
    seed_everything(plan.seed)
    student = create_model(cfg.student.name, num_classes=data.num_classes, **data.model_options,
                           **({"pretrained": True} if cfg.student.pretrained else {}))
    distiller = build_distiller(cfg.distiller.name, student, {t.role: t.model for t in teachers},
                                options, plan.info).to(plan.device)
    if data.student_view is not None:
        apply_student_view(distiller.evaluated_parts().values(), data.student_view, data.mean,
                           data.std)
    if distiller.parts[distiller.exported_role].arch is None:
        distiller.parts[distiller.exported_role].arch = cfg.student.name
    for teacher in teachers:
        distiller.parts[teacher.role].arch = teacher.name
    keys = {r.role: r.key for r in requests}
    dry_forward(distiller, [("student" if role == distiller.exported_role else
                             keys.get(role) or distiller.parts[role].key or "distiller", model)
                            for role, model in (*distiller.evaluated_parts().items(),
                                                *distiller.frozen_parts().items())],
                data, plan.device)
    teacher_cache = None
    if cfg.teacher.cache == "views":   # before the run directory: a refused dataset writes nothing
        teacher_cache = attach_teacher_cache(
            distiller, teachers, data, zoo_root=cfg.zoo.root, dataset=data.name,
            precision=cfg.trainer.precision, device=plan.device, dtype=cfg.teacher.cache_dtype)
    checkpoint = plan.checkpoint
    dist_utils.on_main(lambda: start_run_dir(
        plan.run_dir, plan.resolved, resuming=checkpoint is not None, overrides=plan.overrides,
        resume_step=checkpoint["state"]["global_step"] if checkpoint else None))
    if isinstance(distiller, DataFree):   # e.g. DeepInversion's synthesis, from its own seeds
        distiller.make_training_set(data.train, run_dir=plan.run_dir, device=plan.device,
                                    progress=functools.partial(
                                        WorkProgress, enabled=plan.trainer.progress
                                        and dist_utils.is_main_process()))
    trainer = Trainer(
        distiller, data, options=plan.trainer, optimizer=plan.resolved["optimizer"],
        scheduler=plan.resolved["scheduler"], run_dir=plan.run_dir, device=plan.device,
        loggers=plan.resolved["logger"] or {}, config=plan.resolved, seed=plan.seed,
        run_name=plan.run_name, checkpoint=checkpoint, teachers=[t.record() for t in teachers],
        teacher_cache=teacher_cache)
    log_start(plan, distiller, teachers)
    publish = None
    if plan.publishes:
        def publish(summary: dict) -> None:
            publish_to_zoo(TeacherZoo(cfg.zoo.root), plan.resolved["dataset"], cfg,
                           plan.run_dir, summary, data)
    return trainer, publish


def dry_forward(distiller: Distiller, checks: list[tuple[str, torch.nn.Module]],
                data: DatasetBundle, device: torch.device) -> None:
    """One forward pass of each model on two validation items: class counts agree before
    training starts. `checks` pairs each model with the config key that chose it."""
    inputs = to_device(example_inputs(data), device)
    shape = (tuple(inputs.shape[1:]) if isinstance(inputs, torch.Tensor)
             else {k: tuple(v.shape[1:]) for k, v in inputs.items()})
    for key, model in checks:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = call_model(model, inputs)
        except (RuntimeError, ValueError, AssertionError, TypeError) as exc:
            raise ConfigError(f"{model.__class__.__name__} cannot take the dataset's "
                              f"{shape} inputs: "
                              f"{(str(exc) or type(exc).__name__).splitlines()[0]}",
                              key=key) from None
        finally:
            model.train(was_training)
        if logits.ndim != 2 or logits.shape[1] != data.num_classes:
            raise ConfigError(f"{key} outputs {tuple(logits.shape[1:])} logits but the dataset "
                              f"has {data.num_classes} classes", key=key)


def find_teachers(resolver: TeacherResolver, method: type[Distiller], options: dict,
                  requests: list[TeacherRequest], data: DatasetBundle, device: torch.device,
                  teacher_group: dict, pinned: dict[str, str] | None = None
                  ) -> tuple[list[ResolvedTeacher], dict, list[TeacherRequest]]:
    """The method's frozen teachers, found (zoo, files) or made as the config says (`pinned`:
    the sha256 a resumed run recorded per role). Returns them, the options completed from the
    first ones (the specialists' class subsets), and every request."""
    pinned = pinned or {}
    teachers = [resolver.resolve(r, pinned.get(r.role)) for r in requests]
    if issubclass(method, OwnTeachers):
        # options derived from those teachers and the data; the teachers that depend on them
        # are requested and resolved now
        completed = method.complete_options(options, {t.role: t.model for t in teachers},
                                            data, device)
        if completed != options:
            options, known = completed, {r.role for r in requests}
            later = [r for r in teacher_requests(method, options, teacher_group)
                     if r.role not in known]
            requests = [*requests, *later]
            teachers += [resolver.resolve(r, pinned.get(r.role)) for r in later]
    return teachers, options, requests


def teacher_resolver(cfg: DictConfig, dataset: dict, data: DatasetBundle,
                     overrides: list[str]) -> TeacherResolver:
    """What finds a run's teachers; a missing one is trained by a run of `run`."""
    return TeacherResolver(cfg, dataset, data.num_classes, TeacherZoo(cfg.zoo.root), overrides,
                           train=run, data_digest=data.data_digest,
                           model_options=data.model_options)


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
    method = DISTILLERS.get(cfg.distiller.name)
    check_teacher_cache(cfg.distiller.name, method, "views")
    options = {k: v for k, v in resolved["distiller"].items() if k != "name"}
    data = build_data(resolved["dataset"])
    check_cacheable(data, "views", key="dataset")
    if data.inputs != "images":
        raise ConfigError(f"tools/cache_teacher.py fills the views of image datasets; the "
                          f"{data.inputs} of {data.name} have one view each, stored by the "
                          "first run that reads them", key="dataset",
                          allowed="an image dataset (cifar10, cifar100, digits, mnist5k, fake)")
    teachers, _, _ = find_teachers(
        teacher_resolver(cfg, resolved["dataset"], data, overrides), method, options,
        teacher_requests(method, options, resolved["teacher"]), data, device,
        resolved["teacher"])
    source = cache_source(data.train)
    transform = tensor_source(source.base)[1]
    jobs = []
    for teacher in teachers:
        model = teacher.model.to(device).eval()
        if cfg.trainer.channels_last is not False:
            model.to(memory_format=torch.channels_last)
        store = open_store(model, arch=teacher.name, teacher_sha256=teacher.sha256,
                           source=source, zoo_root=cfg.zoo.root,
                           dataset=resolved["dataset"]["name"], precision=cfg.trainer.precision,
                           device=device, dtype=cfg.teacher.cache_dtype)
        jobs.append(CacheJob(teacher, store, source.base.images, transform, source.base_index))
    return jobs, device


def log_start(plan: RunPlan, distiller: Distiller, teachers: list[ResolvedTeacher]) -> None:
    exported = distiller.exported
    aux = sum(p.numel() for role, part in distiller.parts.items()
              if not part.frozen and not part.evaluated for p in distiller.part(role).parameters())
    others = [f"{role} {distiller.parts[role].arch}" for role in distiller.evaluated_parts()
              if role != distiller.exported_role]
    log.info("run dir %s | %s on %s | student %s (%s params%s)%s", plan.run_dir,
             plan.cfg.distiller.name, plan.device, plan.cfg.student.name,
             f"{sum(p.numel() for p in exported.parameters()):,}",
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


__all__ = ["CacheJob", "build", "dry_forward", "find_teachers", "run", "teacher_cache_jobs",
           "teacher_resolver"]
