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

import distill.config  # registers the schema, model groups and resolvers
from distill.config import OptimizerConfig, SchedulerConfig
from distill.data import DatasetBundle, build_datasets
from distill.distillers import DISTILLERS, build_distiller
from distill.engine.checkpoint import load_weights
from distill.engine.trainer import Trainer, TrainerOptions
from distill.errors import ConfigError, unknown_name_error
from distill.registry import check_options
from distill.models import create_model, list_models
from distill.zoo import TeacherZoo

log = logging.getLogger("distill")

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
# Command-line overrides that carry over to the run that trains a missing teacher; the recipe
# keys do not: a teacher is trained with its dataset's recipe (see teacher_run_config).
TEACHER_RUN_KEYS = ("dataset", "trainer", "seed", "zoo", "device")
RECIPE_KEYS = ("trainer.epochs", "trainer.batch_size")


# --- validation -------------------------------------------------------------------------------
def resolve_config(cfg: DictConfig) -> dict:
    """Resolve every interpolation once, so e.g. `dataset.recipe.lr=abc` is reported as a bad
    value of the key that reads it, not as a traceback halfway through the run."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(str(exc).splitlines()[0], key=key) from None


def validate_values(cfg: DictConfig) -> None:
    """Range checks that types alone cannot express, and the names and options of the parts,
    all before any data is read or any teacher is looked for. Types were checked at compose
    time."""
    resolve_config(cfg)
    checks = [
        ("optimizer.lr", cfg.optimizer.lr > 0, "a positive number"),
        ("optimizer.momentum", 0 <= cfg.optimizer.momentum < 1, "in [0, 1)"),
        ("optimizer.weight_decay", cfg.optimizer.weight_decay >= 0, "zero or positive"),
        ("trainer.epochs", cfg.trainer.epochs >= 1, "at least 1"),
        ("trainer.batch_size", cfg.trainer.batch_size >= 1, "at least 1"),
        ("trainer.eval_batch_size", cfg.trainer.eval_batch_size >= 1, "at least 1"),
        ("trainer.max_steps", cfg.trainer.max_steps is None or cfg.trainer.max_steps >= 1,
         "null or at least 1"),
        ("trainer.num_workers", cfg.trainer.num_workers >= 0, "zero or positive"),
        ("trainer.log_every", cfg.trainer.log_every >= 1, "at least 1"),
        ("trainer.precision", cfg.trainer.precision in ("fp32", "bf16", "fp16"), "fp32, bf16, fp16"),
        ("scheduler.gamma", cfg.scheduler.gamma > 0, "a positive number"),
        ("scheduler.warmup_epochs", cfg.scheduler.warmup_epochs >= 0, "zero or positive"),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"invalid value {OmegaConf.select(cfg, key)!r}", key=key,
                              allowed=allowed)
    distiller_options = {k: v for k, v in cfg.distiller.items() if k != "name"}
    check_options(DISTILLERS.get(cfg.distiller.name, key="distiller"), distiller_options,
                  key="distiller", skip=("student", "teacher"))
    for group in ("teacher", "student"):
        if cfg[group].name not in list_models():
            raise unknown_name_error("model", cfg[group].name, list_models(), key=group)


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


# --- building the parts -----------------------------------------------------------------------
def build_data(cfg: DictConfig) -> DatasetBundle:
    options = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items()
               if k not in ("name", "recipe")}
    return build_datasets(cfg.dataset.name, **options)


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
        if key in ("dataset", "dataset.train_fraction") or key.startswith(RECIPE_KEYS):
            return False
        return key.split(".")[0] in TEACHER_RUN_KEYS

    args = ["python", "tools/train.py", "distiller=none", f"student={cfg.teacher.name}",
            f"dataset={cfg.dataset.name}", *filter(keep, overrides)]
    if cfg.teacher.auto_train_epochs:
        args.append(f"trainer.epochs={cfg.teacher.auto_train_epochs}")
    return shlex.join(args)


def teacher_run_config(cfg: DictConfig) -> DictConfig:
    """The config of the vanilla run that trains cfg's teacher: same data, the dataset's recipe."""
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
    tcfg.dataset.pop("train_fraction", None)   # teachers see the whole training split
    tcfg.teacher.auto_train = False
    tcfg.run_dir = str(Path(cfg.zoo.root) / "runs" / cfg.dataset.name / cfg.teacher.name
                       / f"seed{cfg.seed}")
    tcfg.tag = ""
    return tcfg


def build_teacher(cfg: DictConfig, data: DatasetBundle, zoo: TeacherZoo,
                  overrides: list[str]) -> torch.nn.Module:
    name = cfg.teacher.name
    teacher = create_model(name, num_classes=data.num_classes,
                           **({"pretrained": True} if cfg.teacher.pretrained else {}))
    if cfg.teacher.checkpoint:
        source, key = cfg.teacher.checkpoint, "teacher.checkpoint"
    else:
        entry = zoo.find(cfg.dataset.name, name)
        if entry is None and cfg.teacher.auto_train:
            log.info("no %s teacher for %s in the zoo: training one first", name, cfg.dataset.name)
            run(teacher_run_config(cfg), overrides=[])
            entry = zoo.find(cfg.dataset.name, name)
        if entry is None and cfg.teacher.pretrained:
            log.info("teacher %s: using its pretrained weights as they are", name)
            return teacher
        if entry is None:
            raise ConfigError(
                f"no trained '{name}' for dataset '{cfg.dataset.name}' in the teacher zoo "
                f"({zoo.root})", key="teacher",
                hint="train it first:\n  " + teacher_training_command(cfg, overrides)
                     + "\nor add teacher.auto_train=true to train it now, or point "
                       "teacher.checkpoint=PATH at a weights file")
        source, key = str(entry.weights), "teacher"
        log.info("teacher %s from the zoo: %s", name, entry.weights)
    load_state_into(teacher, load_weights(source, key=key), source=source, key=key,
                    num_classes=data.num_classes)
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
        except RuntimeError as exc:
            raise ConfigError(f"{model.__class__.__name__} cannot take the dataset's "
                              f"{tuple(images.shape[1:])} images: {str(exc).splitlines()[0]}",
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
    validate_values(cfg)
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ".hydra").mkdir(exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the run directory: {exc.strerror}", key="run_dir") from None
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    data = build_data(cfg)
    zoo = TeacherZoo(cfg.zoo.root)

    student = create_model(cfg.student.name, num_classes=data.num_classes,
                           **({"pretrained": True} if cfg.student.pretrained else {}))
    needs_teacher = DISTILLERS.get(cfg.distiller.name).requires_teacher
    teacher = build_teacher(cfg, data, zoo, overrides) if needs_teacher else None
    options = {k: v for k, v in OmegaConf.to_container(cfg.distiller, resolve=True).items()
               if k != "name"}
    distiller = build_distiller(cfg.distiller.name, student, teacher, options).to(device)
    dry_forward(distiller, data, device)

    run_name = "/".join([cfg.dataset.name, distill.config.run_path(
        cfg.distiller.name, cfg.teacher.name, cfg.student.name, cfg.tag), f"seed{cfg.seed}"])
    resolved = resolve_config(cfg)
    # the resolved config (no interpolations left) is what reports and resumes read
    OmegaConf.save(OmegaConf.create(resolved), run_dir / ".hydra" / "config.yaml")
    seed_everything(cfg.seed)  # model init consumed randomness; training starts from the seed
    trainer = Trainer(
        distiller, data,
        options=TrainerOptions(**OmegaConf.to_container(cfg.trainer, resolve=True)),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        run_dir=run_dir, device=device,
        loggers=OmegaConf.to_container(cfg.logger, resolve=True) or {},
        config=resolved, seed=cfg.seed, run_name=run_name,
    )
    log.info("run dir %s | %s on %s | student %s (%s params)%s", run_dir, cfg.distiller.name,
             device, cfg.student.name, f"{sum(p.numel() for p in student.parameters()):,}",
             f" | teacher {cfg.teacher.name}" if teacher is not None else "")
    summary = trainer.fit()
    log.info("done: best top-1 %.2f%%, last %.2f%%, %.0f images/s, %.1f s", summary["best_top1"],
             summary["last_top1"], summary["train_images_per_sec"] or 0, summary["wall_seconds"])

    full_split = cfg.dataset.get("train_fraction", 1.0) == 1.0
    if cfg.distiller.name == "none" and cfg.zoo.publish and not full_split:
        log.info("not published to the zoo: trained on part of the training split")
    elif cfg.distiller.name == "none" and cfg.zoo.publish:
        zoo.publish(cfg.dataset.name, cfg.student.name, run_dir / "student.safetensors", {
            "top1": summary["last_top1"], "best_top1": summary["best_top1"],
            "epochs": summary["epochs"], "seed": cfg.seed, "run_dir": str(run_dir.resolve()),
            "num_classes": data.num_classes})
    return summary


# --- command line -----------------------------------------------------------------------------
def print_error(exc: BaseException) -> None:
    from rich.console import Console

    text = exc.render() if isinstance(exc, ConfigError) else str(exc)
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {text}",
                                                                markup=True)


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
