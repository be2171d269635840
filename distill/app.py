"""The train app: compose a config with Hydra, build the parts, fit, publish.

    python tools/train.py distiller=dkd teacher=resnet56 student=resnet20
    distill-train -m distiller=none,kd seed=0,1,2 dataset=digits

`run(cfg)` is the whole job and needs no Hydra, so tests and the teacher auto-train path call it
directly. Nothing below `run` reads the config object: components get plain keyword arguments.
"""
from __future__ import annotations

import copy
import logging
import random
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# importing distill.config registers the schema, the model groups and the resolvers
from distill.config import OptimizerConfig, SchedulerConfig, run_path
from distill.data import DatasetBundle, build_datasets
from distill.distillers import DISTILLERS, build_distiller
from distill.engine.checkpoint import load_weights
from distill.engine.distributed import launched_by_torchrun
from distill.engine.optim import OPTIMIZERS, SCHEDULES
from distill.engine.rundir import check_run_dir, start_run_dir
from distill.engine.trainer import PRECISIONS, Trainer, TrainerOptions
from distill.errors import ConfigError, unknown_name_error
from distill.models import create_model, list_models, model_spec
from distill.registry import check_options
from distill.zoo import TeacherZoo

log = logging.getLogger("distill")

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
# Command-line overrides that carry over to the run that trains a missing teacher; the recipe
# and early-stop keys do not: a teacher is trained to the end with its dataset's recipe.
TEACHER_RUN_KEYS = ("dataset", "trainer", "seed", "zoo", "device")
NOT_FOR_TEACHERS = ("trainer.epochs", "trainer.batch_size", "trainer.max_steps")


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
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"invalid value {OmegaConf.select(cfg, key)!r}", key=key,
                              allowed=allowed)
    distiller_cls = DISTILLERS.get(cfg.distiller.name, key="distiller")
    options = {k: v for k, v in resolved["distiller"].items() if k != "name"}
    check_options(distiller_cls, options, key="distiller", skip=("student", "teacher"))
    distiller_cls.check_values(options)
    for group in ("teacher", "student"):
        if cfg[group].name not in list_models():
            raise unknown_name_error("model", cfg[group].name, list_models(), key=group)
        if cfg[group].pretrained and model_spec(cfg[group].name).family != "torchvision":
            raise ConfigError(f"{cfg[group].name} has no pretrained weights", key=f"{group}.pretrained",
                              allowed="true only for torchvision models (tv_*)")
    if launched_by_torchrun():
        raise ConfigError("multi-process (torchrun) training is not supported yet; every "
                          "process would train the whole run and write the same files",
                          key="trainer", hint="run a single process: python tools/train.py ...")
    return resolved


def resolve_device(name: str) -> torch.device:
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
# Dataset options that do not change which images are in which split.
NOT_SPLIT_DEFINING = ("name", "root", "download", "augment", "recipe", "train_fraction")


def split_identity(dataset: dict) -> dict:
    """The dataset options that define its train/test split. A zoo teacher trained on another
    split may have trained on this run's test images, so the two must agree."""
    return {k: v for k, v in dataset.items() if k not in NOT_SPLIT_DEFINING}


def build_data(dataset: dict) -> DatasetBundle:
    options = {k: v for k, v in dataset.items() if k not in ("name", "recipe")}
    return build_datasets(dataset["name"], **options)


def load_state_into(model: torch.nn.Module, state: dict, *, source: str, key: str,
                    num_classes: int) -> None:
    """Strict load; shape mismatches (usually a class-count mismatch) become one clear error."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()][:4]
        raise ConfigError(f"weights in {source} do not fit this model (dataset has "
                          f"{num_classes} classes):\n  " + "\n  ".join(detail), key=key) from None


def teacher_training_command(cfg: DictConfig, overrides: list[str]) -> str:
    """The exact command that trains and publishes the missing teacher: vanilla training of the
    teacher architecture with the dataset's own recipe on the full training split."""
    def keep(override: str) -> bool:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in ("dataset", "dataset.train_fraction") or key.startswith(NOT_FOR_TEACHERS):
            return False
        return key.split(".")[0] in TEACHER_RUN_KEYS

    args = ["python", "tools/train.py", "distiller=none", f"student={cfg.teacher.name}",
            f"dataset={cfg.dataset.name}", *filter(keep, overrides)]
    if cfg.teacher.pretrained:
        args.append("student.pretrained=true")
    if cfg.teacher.auto_train_epochs:
        args.append(f"trainer.epochs={cfg.teacher.auto_train_epochs}")
    return shlex.join(args)


def teacher_run_config(cfg: DictConfig) -> DictConfig:
    """The config of the vanilla run that trains cfg's teacher: same data, the dataset's recipe,
    the full training split, to the end (no max_steps), published to the zoo."""
    tcfg = copy.deepcopy(cfg)
    OmegaConf.set_struct(tcfg, False)
    tcfg.student.name = cfg.teacher.name
    tcfg.student.pretrained = cfg.teacher.pretrained
    tcfg.distiller = OmegaConf.load(CONFIG_DIR / "distiller" / "none.yaml")
    for group, option, schema in (("optimizer", "sgd", OptimizerConfig),
                                  ("scheduler", "multistep", SchedulerConfig)):
        tcfg[group] = OmegaConf.merge(OmegaConf.structured(schema),
                                      OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml"))
    tcfg.trainer.epochs = cfg.teacher.auto_train_epochs or "${dataset.recipe.epochs}"
    tcfg.trainer.batch_size = "${dataset.recipe.batch_size}"
    tcfg.trainer.max_steps = None
    tcfg.dataset.pop("train_fraction", None)
    tcfg.teacher.auto_train = False
    tcfg.zoo.publish = True
    tcfg.run_dir = str(Path(cfg.zoo.root) / "runs" / cfg.dataset.name / cfg.teacher.name
                       / f"seed{cfg.seed}")
    tcfg.tag = ""
    return tcfg


def build_teacher(cfg: DictConfig, dataset: dict, num_classes: int, zoo: TeacherZoo,
                  overrides: list[str]) -> torch.nn.Module:
    """The frozen teacher's weights come from teacher.checkpoint, else the zoo, else (with
    teacher.auto_train) a run that trains it now, else torchvision's pretrained weights when
    they already fit the dataset. Anything else stops with the command that trains one."""
    name = cfg.teacher.name
    source, key = cfg.teacher.checkpoint, "teacher.checkpoint"
    if not source:
        entry = zoo.find(dataset["name"], name)
        if entry is None and cfg.teacher.auto_train:
            log.info("no %s teacher for %s in the zoo: training one first", name, dataset["name"])
            run(teacher_run_config(cfg), overrides=[])
            entry = zoo.find(dataset["name"], name)
        if entry is not None:
            trained_on = entry.meta.get("split")
            if trained_on is not None and trained_on != split_identity(dataset):
                raise ConfigError(
                    f"the zoo's {name} for {dataset['name']} was trained on another split "
                    f"({trained_on}, this run: {split_identity(dataset)}): it may have seen this "
                    f"run's test images", key="teacher",
                    hint="use zoo.root=... for this split, or teacher.checkpoint=PATH")
            source, key = str(entry.weights), "teacher"
            log.info("teacher %s from the zoo: %s", name, entry.weights)
    if not source and cfg.teacher.pretrained:
        teacher = create_model(name, num_classes=num_classes, pretrained=True)
        if getattr(teacher, "head_replaced", False):
            raise ConfigError(
                f"{name}'s pretrained head has a different number of classes than the dataset "
                f"({num_classes}); distilling from an untrained head would teach noise",
                key="teacher.pretrained",
                hint="fine-tune it first:\n  " + teacher_training_command(cfg, overrides))
        log.info("teacher %s: torchvision's pretrained weights, as they are", name)
        return teacher
    if not source:
        raise ConfigError(
            f"no trained '{name}' for dataset '{dataset['name']}' in the teacher zoo ({zoo.root})",
            key="teacher",
            hint="train it first:\n  " + teacher_training_command(cfg, overrides)
                 + "\nor add teacher.auto_train=true to train it now, or point "
                   "teacher.checkpoint=PATH at a weights file")
    teacher = create_model(name, num_classes=num_classes)
    load_state_into(teacher, load_weights(source, key=key), source=source, key=key,
                    num_classes=num_classes)
    return teacher


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


# --- the job ----------------------------------------------------------------------------------
def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train one student (or a teacher, with distiller=none). Returns summary.json's content."""
    overrides = overrides or []
    resolved = validate(cfg)
    device = resolve_device(cfg.device)
    run_dir = Path(cfg.run_dir)
    checkpoint = check_run_dir(run_dir, resolved, resume=cfg.trainer.resume)
    seed_everything(cfg.seed)
    dataset = resolved["dataset"]
    data = build_data(dataset)
    zoo = TeacherZoo(cfg.zoo.root)

    student = create_model(cfg.student.name, num_classes=data.num_classes,
                           **({"pretrained": True} if cfg.student.pretrained else {}))
    distiller_cls = DISTILLERS.get(cfg.distiller.name)
    teacher = (build_teacher(cfg, dataset, data.num_classes, zoo, overrides)
               if distiller_cls.requires_teacher else None)
    options = {k: v for k, v in resolved["distiller"].items() if k != "name"}
    distiller = build_distiller(cfg.distiller.name, student, teacher, options).to(device)
    dry_forward(distiller, data, device)

    run_name = "/".join([dataset["name"], run_path(cfg.distiller.name, cfg.teacher.name,
                                                   cfg.student.name, cfg.tag), f"seed{cfg.seed}"])
    start_run_dir(run_dir, resolved, resuming=checkpoint is not None, overrides=overrides)
    seed_everything(cfg.seed)  # model init consumed randomness; training starts from the seed
    trainer = Trainer(
        distiller, data, options=TrainerOptions(**resolved["trainer"]),
        optimizer=resolved["optimizer"], scheduler=resolved["scheduler"], run_dir=run_dir,
        device=device, loggers=resolved["logger"] or {}, config=resolved, seed=cfg.seed,
        run_name=run_name, checkpoint=checkpoint)
    log.info("run dir %s | %s on %s | student %s (%s params)%s", run_dir, cfg.distiller.name,
             device, cfg.student.name, f"{sum(p.numel() for p in student.parameters()):,}",
             f" | teacher {cfg.teacher.name}" if teacher is not None else "")
    already_finished = checkpoint is not None and checkpoint["state"].get("finished", False)
    summary = trainer.fit()
    log.info("done: best top-1 %.2f%%, last %.2f%%, %.0f images/s, %.1f s", summary["best_top1"],
             summary["last_top1"], summary["train_images_per_sec"] or 0, summary["wall_seconds"])
    if cfg.distiller.name == "none" and cfg.zoo.publish and not already_finished:
        publish_to_zoo(zoo, dataset, cfg, run_dir, summary, data.num_classes)
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
    OmegaConf.set_struct(cfg, False)
    cfg.run_dir = hydra_cfg.runtime.output_dir   # the job's real directory (also under -m)
    OmegaConf.set_struct(cfg, True)
    try:
        summary = run(cfg, overrides=list(hydra_cfg.overrides.task))
    except ConfigError as exc:
        print_error(exc)
        sys.exit(2)
    except FloatingPointError as exc:
        print_error(exc)
        sys.exit(3)
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
