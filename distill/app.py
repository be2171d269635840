"""The train app: compose a config with Hydra, build the parts, fit, publish.

    python tools/train.py distiller=dkd teacher=resnet56 student=resnet20
    distill-train -m distiller=none,kd seed=0,1,2 dataset=digits

`run(cfg)` is the whole job and needs no Hydra, so tests and the teacher auto-train path call it
directly. Nothing below `run` reads the config object: components get plain keyword arguments.
"""
from __future__ import annotations

import inspect
import logging
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# importing distill.config registers the schema, the model groups and the resolvers
from distill.config import check_known_keys, run_path
from distill.data import DatasetBundle, build_datasets
from distill.distillers import DISTILLERS, BuildInfo, build_distiller
from distill.engine import distributed as dist_utils
from distill.engine.optim import OPTIMIZERS, SCHEDULES
from distill.engine.preemption import EXIT_PREEMPTED, Preempted
from distill.engine.rundir import check_run_dir, start_run_dir
from distill.engine.trainer import (
    COMPILE_CHOICES, DATA_PATHS, NONFINITE_POLICIES, PRECISIONS, Trainer, TrainerOptions,
    data_path_transforms)
from distill.errors import ConfigError, unknown_name_error
from distill.models import create_model, list_models, model_spec
from distill.registry import check_options
from distill.teachers import build_assistant_chain, build_teacher, split_identity
from distill.zoo import TeacherZoo

log = logging.getLogger("distill")

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


# --- validation -------------------------------------------------------------------------------
def resolve_config(cfg: DictConfig) -> dict:
    """Resolve every interpolation once, so e.g. `dataset.recipe.lr=abc` is reported as a bad
    value of the key that reads it, not as a traceback halfway through the run."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(str(exc).splitlines()[0], key=key) from None


def validate(cfg: DictConfig) -> dict:
    """Every check that needs no data and no model, before any file is read or written:
    ranges that types cannot express, names, and each part's options. (Types were checked when
    Hydra composed the config.) Returns the resolved config."""
    check_known_keys(cfg)
    resolved = resolve_config(cfg)
    opt, sched, trainer = cfg.optimizer, cfg.scheduler, cfg.trainer
    checks = [
        ("optimizer.name", opt.name in OPTIMIZERS, ", ".join(OPTIMIZERS)),
        ("optimizer.lr", opt.lr > 0, "a positive number"),
        ("optimizer.momentum", 0 <= opt.momentum < 1, "in [0, 1)"),
        ("optimizer.nesterov", not (opt.nesterov and opt.momentum == 0),
         "false when momentum is 0 (Nesterov needs momentum)"),
        ("optimizer.weight_decay", opt.weight_decay >= 0, "zero or positive"),
        ("scheduler.name", sched.name in SCHEDULES, ", ".join(SCHEDULES)),
        ("scheduler.gamma", sched.gamma > 0, "a positive number"),
        ("scheduler.warmup_epochs", sched.warmup_epochs >= 0, "zero or positive"),
        ("trainer.epochs", trainer.epochs >= 1, "at least 1"),
        ("trainer.batch_size", trainer.batch_size >= 1, "at least 1"),
        ("trainer.eval_batch_size", trainer.eval_batch_size >= 1, "at least 1"),
        ("trainer.max_steps", trainer.max_steps is None or trainer.max_steps >= 1,
         "null or at least 1"),
        ("trainer.num_workers", trainer.num_workers >= 0, "zero or positive"),
        ("trainer.log_every", trainer.log_every >= 1, "at least 1"),
        ("trainer.precision", trainer.precision in PRECISIONS, ", ".join(PRECISIONS)),
        ("trainer.data_path", trainer.data_path in DATA_PATHS, ", ".join(DATA_PATHS)),
        ("trainer.compile", trainer.compile in COMPILE_CHOICES, ", ".join(COMPILE_CHOICES)),
        ("trainer.compile_backend", trainer.compile == "none"
         or trainer.compile_backend in torch._dynamo.list_backends(exclude_tags=()),
         ", ".join(torch._dynamo.list_backends(exclude_tags=()))),
        ("trainer.on_nonfinite", trainer.on_nonfinite in NONFINITE_POLICIES,
         ", ".join(NONFINITE_POLICIES)),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"invalid value {OmegaConf.select(cfg, key)!r}", key=key,
                              allowed=allowed)
    distiller_cls = DISTILLERS.get(cfg.distiller.name, key="distiller")
    options = {k: v for k, v in resolved["distiller"].items() if k != "name"}
    check_options(distiller_cls, options, key="distiller", skip=("student", "teacher", "info"))
    distiller_cls.check_values(options)
    for group in ("teacher", "student"):
        if cfg[group].name not in list_models():
            raise unknown_name_error("model", cfg[group].name, list_models(), key=group)
        if cfg[group].pretrained and model_spec(cfg[group].name).family != "torchvision":
            raise ConfigError(f"{cfg[group].name} has no pretrained weights", key=f"{group}.pretrained",
                              allowed="true only for torchvision models (tv_*)")
    world = dist_utils.launch_world_size()
    if trainer.batch_size % world:
        raise ConfigError(f"invalid value {trainer.batch_size} for {world} processes",
                          key="trainer.batch_size",
                          allowed=f"a multiple of {world}: it is the global batch, split evenly "
                                  "over the ranks")
    if world > 1 and cfg.device.startswith("cuda:"):
        raise ConfigError(f"invalid value {cfg.device!r} under torchrun", key="device",
                          allowed="auto or cuda: each process takes GPU LOCAL_RANK")
    if trainer.sync_bn and world > 1 and resolve_device(cfg.device).type != "cuda":
        raise ConfigError("SyncBatchNorm runs on GPUs only", key="trainer.sync_bn",
                          allowed="false on CPU")
    return resolved


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one; under torchrun each rank takes GPU LOCAL_RANK."""
    if name in ("auto", "cuda") and torch.cuda.is_available() and dist_utils.launched_by_torchrun():
        return torch.device("cuda", dist_utils.local_rank())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"not a device: {name!r}", key="device",
                          allowed="auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA was asked for but this machine has no usable GPU", key="device",
                          allowed="auto, cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- data and the teacher ---------------------------------------------------------------------
def build_data(dataset: dict) -> DatasetBundle:
    options = {k: v for k, v in dataset.items() if k not in ("name", "recipe")}
    return build_datasets(dataset["name"], **options)


def dry_forward(distiller, data: DatasetBundle, device: torch.device) -> None:
    """One forward pass on two validation images: class counts agree before training starts."""
    images = torch.stack([data.val[i][0] for i in range(min(2, len(data.val)))]).to(device)
    checks = [("student", distiller.student)]
    if distiller.teacher is not None:
        checks.append(("teacher", distiller.teacher))
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


def check_distiller_fits(cfg: DictConfig, teacher_name: str, options: dict, info: BuildInfo,
                         num_classes: int) -> None:
    """Methods that read features check their layer names and connector shapes on untrained
    models of the two architectures (one dry forward), so a bad layer option stops the run
    before a teacher or an assistant is trained for it."""
    if "info" not in inspect.signature(DISTILLERS.get(cfg.distiller.name).__init__).parameters:
        return
    build_distiller(cfg.distiller.name, create_model(cfg.student.name, num_classes=num_classes),
                    create_model(teacher_name, num_classes=num_classes), options, info)


# --- the job ----------------------------------------------------------------------------------
def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train one student (or a teacher, with distiller=none). Returns summary.json's content."""
    overrides = overrides or []
    resolved = validate(cfg)
    # recorded with the config (.hydra/config.yaml, tracker hparams): trainer.batch_size is the
    # global batch, and this says over how many processes it was split
    resolved["world_size"] = dist_utils.launch_world_size()
    device = resolve_device(cfg.device)
    dist_utils.init_from_env(use_cuda=device.type == "cuda")
    run_dir = Path(cfg.run_dir)
    checkpoint = check_run_dir(run_dir, resolved, resume=cfg.trainer.resume)
    seed_everything(cfg.seed)
    dataset = resolved["dataset"]
    data = build_data(dataset)
    data_path_transforms(data, cfg.trainer.data_path)   # trainer.data_path=memory must fit
    zoo = TeacherZoo(cfg.zoo.root)

    distiller_cls = DISTILLERS.get(cfg.distiller.name)
    options = {k: v for k, v in resolved["distiller"].items() if k != "name"}
    chain = options.get(distiller_cls.assistants_option) if distiller_cls.assistants_option else None
    teacher_name = chain[-1] if chain else cfg.teacher.name   # TAKD: the last assistant teaches
    info = BuildInfo(student_spec=model_spec(cfg.student.name),
                     teacher_spec=model_spec(teacher_name) if distiller_cls.requires_teacher else None,
                     input_shape=tuple(data.val[0][0].shape))
    check_distiller_fits(cfg, teacher_name, options, info, data.num_classes)
    teacher = None
    if chain:
        teacher = build_assistant_chain(
            cfg, dataset, data.num_classes, zoo, overrides, train=run, assistants=chain,
            kd_options={k: v for k, v in options.items() if k != distiller_cls.assistants_option})
    elif distiller_cls.requires_teacher:
        teacher = build_teacher(cfg, dataset, data.num_classes, zoo, overrides, train=run)
    # the teacher may have been trained just now, in this process: student and connector
    # initialisation must not depend on that
    seed_everything(cfg.seed)
    student = create_model(cfg.student.name, num_classes=data.num_classes,
                           **({"pretrained": True} if cfg.student.pretrained else {}))
    distiller = build_distiller(cfg.distiller.name, student, teacher, options, info).to(device)
    dry_forward(distiller, data, device)

    run_name = "/".join([dataset["name"], run_path(cfg.distiller.name, cfg.teacher.name,
                                                   cfg.student.name, cfg.tag), f"seed{cfg.seed}"])
    dist_utils.on_main(lambda: start_run_dir(
        run_dir, resolved, resuming=checkpoint is not None, overrides=overrides,
        resume_step=checkpoint["state"]["global_step"] if checkpoint else None))
    seed_everything(cfg.seed)  # model init consumed randomness; training starts from the seed
    if dist_utils.rank() > 0:  # other augmentations (and teacher noise) on other ranks
        seed_everything(cfg.seed + 7919 * dist_utils.rank())
    trainer = Trainer(
        distiller, data, options=TrainerOptions(**resolved["trainer"]),
        optimizer=resolved["optimizer"], scheduler=resolved["scheduler"], run_dir=run_dir,
        device=device, loggers=resolved["logger"] or {}, config=resolved, seed=cfg.seed,
        run_name=run_name, checkpoint=checkpoint)
    connectors = distiller.connector_parameter_count()
    log.info("run dir %s | %s on %s | student %s (%s params%s)%s", run_dir, cfg.distiller.name,
             device, cfg.student.name, f"{sum(p.numel() for p in student.parameters()):,}",
             f" + {connectors:,} in connectors" if connectors else "",
             f" | teacher {teacher_name}" + (f" (assistant of {cfg.teacher.name})"
                                             if teacher_name != cfg.teacher.name else "")
             if teacher is not None else "")
    already_finished = checkpoint is not None and checkpoint["state"].get("finished", False)
    summary = trainer.fit()
    log.info("done: best top-1 %.2f%%, last %.2f%%, %.0f images/s, %.1f s", summary["best_top1"],
             summary["last_top1"], summary["train_images_per_sec"] or 0, summary["wall_seconds"])
    if cfg.distiller.name == "none" and cfg.zoo.publish and not already_finished:
        # before any rank goes on: e.g. a teacher trained for a run is in the zoo for all
        dist_utils.on_main(lambda: publish_to_zoo(zoo, dataset, cfg, run_dir, summary,
                                                  data.num_classes))
    return summary


def publish_to_zoo(zoo: TeacherZoo, dataset: dict, cfg: DictConfig, run_dir: Path,
                   summary: dict, num_classes: int) -> None:
    """Only models trained to the end on the full training split become zoo teachers."""
    if dataset.get("train_fraction", 1.0) != 1.0:
        log.info("not published to the zoo: trained on part of the training split")
    elif summary["stopped_early"]:
        log.info("not published to the zoo: stopped early by trainer.max_steps")
    else:
        zoo.publish(dataset["name"], cfg.student.name, run_dir / "student.safetensors", {
            "top1": summary["last_top1"], "best_top1": summary["best_top1"],
            "epochs": summary["epochs"], "seed": cfg.seed, "run_dir": str(run_dir.resolve()),
            "num_classes": num_classes, "split": split_identity(dataset)})


# --- command line -----------------------------------------------------------------------------
def print_error(exc: BaseException) -> None:
    from rich.console import Console

    from rich.markup import escape

    text = exc.render() if isinstance(exc, ConfigError) else str(exc)
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(text)}", markup=True)


def _hydra_task(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    try:
        run_dir = hydra_cfg.runtime.output_dir   # the job's real directory (also under -m)
        dist_utils.adopt_slurm_tasks()           # hydra/launcher=slurm with several GPUs
        if dist_utils.launched_by_torchrun():
            dist_utils.init_from_env(use_cuda=resolve_device(cfg.device).type == "cuda")
            # one directory per job: a sweep's time stamp may differ between ranks by a second
            run_dir = dist_utils.broadcast_object(run_dir)
            if not dist_utils.is_main_process():
                logging.getLogger("distill").setLevel(logging.WARNING)
        OmegaConf.set_struct(cfg, False)
        cfg.run_dir = run_dir
        OmegaConf.set_struct(cfg, True)
        summary = run(cfg, overrides=list(hydra_cfg.overrides.task))
    except ConfigError as exc:
        print_error(exc)
        sys.exit(2)
    except FloatingPointError as exc:   # a non-finite loss (trainer.on_nonfinite=stop)
        print_error(exc)
        sys.exit(3)
    except Preempted:   # the trainer logged the step and how to resume; a sweep stops here too
        sys.exit(EXIT_PREEMPTED)
    return summary["best_top1"]


def main() -> None:
    """Entry point of tools/train.py and the `distill-train` console script."""
    import hydra

    from distill.preflight import check_overrides

    try:
        check_overrides(sys.argv[1:], CONFIG_DIR)
    except ConfigError as exc:
        print_error(exc)
        sys.exit(2)
    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")(_hydra_task)()
