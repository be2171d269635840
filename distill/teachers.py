"""Where a run's frozen teacher comes from: a weights file, the teacher zoo, a run that trains
it now, or torchvision; and for TAKD, the chain of assistants between teacher and student.

Runs that make zoo models (a missing teacher with teacher.auto_train, a missing assistant) are
ordinary runs of `distill.app.run`, passed in as `train` (this module does not import the app).
They use the dataset's own recipe and the full training split, and train to the end.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import shlex
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from distill.config import OptimizerConfig, SchedulerConfig
from distill.engine import distributed as dist_utils
from distill.engine.checkpoint import load_weights
from distill.errors import ConfigError
from distill.models import create_model
from distill.zoo import TeacherZoo, ZooEntry

log = logging.getLogger("distill")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
Train = Callable[..., dict[str, Any]]   # distill.app.run
# Command-line overrides that carry over to the run that trains a missing teacher; the recipe
# and early-stop keys do not: a teacher is trained to the end with its dataset's recipe.
TEACHER_RUN_KEYS = ("dataset", "trainer", "seed", "zoo", "device")
NOT_FOR_TEACHERS = ("trainer.epochs", "trainer.batch_size", "trainer.max_steps")
# Dataset options that do not change which images are in which split.
NOT_SPLIT_DEFINING = ("name", "root", "download", "augment", "recipe", "train_fraction")


def split_identity(dataset: dict) -> dict:
    """The dataset options that define its train/test split. A zoo teacher trained on another
    split may have trained on this run's test images, so the two must agree."""
    return {k: v for k, v in dataset.items() if k not in NOT_SPLIT_DEFINING}


def check_split(entry: ZooEntry, name: str, dataset: dict) -> None:
    trained_on = entry.meta.get("split")
    if trained_on is not None and trained_on != split_identity(dataset):
        raise ConfigError(
            f"the zoo's {name} for {dataset['name']} was trained on another split "
            f"({trained_on}, this run: {split_identity(dataset)}): it may have seen this "
            f"run's test images", key="teacher",
            hint="use zoo.root=... for this split, or teacher.checkpoint=PATH")


def load_state_into(model: torch.nn.Module, state: dict, *, source: str, key: str,
                    num_classes: int) -> None:
    """Strict load; shape mismatches (usually a class-count mismatch) become one clear error."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()][:4]
        raise ConfigError(f"weights in {source} do not fit this model (dataset has "
                          f"{num_classes} classes):\n  " + "\n  ".join(detail), key=key) from None


def load_model(name: str, source: str, *, key: str, num_classes: int) -> torch.nn.Module:
    model = create_model(name, num_classes=num_classes)
    load_state_into(model, load_weights(source, key=key), source=source, key=key,
                    num_classes=num_classes)
    return model


# --- runs that make zoo models ------------------------------------------------------------------
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


def zoo_run_config(cfg: DictConfig, *, student: str, distiller: dict | DictConfig,
                   zoo_name: str) -> DictConfig:
    """A run that makes a zoo model from cfg: same data, the dataset's recipe (or
    teacher.auto_train_epochs), the full training split, to the end (no max_steps), in
    <zoo.root>/runs/<dataset>/<zoo_name>/seed<N>."""
    zcfg = copy.deepcopy(cfg)
    OmegaConf.set_struct(zcfg, False)
    zcfg.student.name = student
    zcfg.student.pretrained = False
    zcfg.distiller = distiller
    for group, option, schema in (("optimizer", "sgd", OptimizerConfig),
                                  ("scheduler", "multistep", SchedulerConfig)):
        zcfg[group] = OmegaConf.merge(OmegaConf.structured(schema),
                                      OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml"))
    zcfg.trainer.epochs = cfg.teacher.auto_train_epochs or "${dataset.recipe.epochs}"
    zcfg.trainer.batch_size = "${dataset.recipe.batch_size}"
    zcfg.trainer.max_steps = None
    zcfg.dataset.pop("train_fraction", None)
    zcfg.tuned = {}
    zcfg.run_dir = str(Path(cfg.zoo.root) / "runs" / cfg.dataset.name / zoo_name / f"seed{cfg.seed}")
    zcfg.tag = ""
    return zcfg


def teacher_run_config(cfg: DictConfig) -> DictConfig:
    """The vanilla run that trains cfg's teacher and publishes it to the zoo."""
    tcfg = zoo_run_config(cfg, student=cfg.teacher.name, zoo_name=cfg.teacher.name,
                          distiller=OmegaConf.load(CONFIG_DIR / "distiller" / "none.yaml"))
    tcfg.student.pretrained = cfg.teacher.pretrained
    tcfg.teacher.auto_train = False
    tcfg.zoo.publish = True
    return tcfg


# --- the teacher ------------------------------------------------------------------------------
def teacher_weights(cfg: DictConfig, dataset: dict, zoo: TeacherZoo, overrides: list[str],
                    train: Train) -> tuple[str | None, str]:
    """(weights file, config key it came from) of cfg's teacher: teacher.checkpoint, else the
    zoo, else (with teacher.auto_train) a run that trains it now. (None, ...) means
    torchvision's pretrained weights; no weights at all stops with the command that trains them."""
    name = cfg.teacher.name
    if cfg.teacher.checkpoint:
        return cfg.teacher.checkpoint, "teacher.checkpoint"
    entry = zoo.find(dataset["name"], name)
    if entry is None and cfg.teacher.auto_train:
        log.info("no %s teacher for %s in the zoo: training one first", name, dataset["name"])
        train(teacher_run_config(cfg), overrides=[])
        entry = zoo.find(dataset["name"], name)
    if entry is not None:
        check_split(entry, name, dataset)
        log.info("teacher %s from the zoo: %s", name, entry.weights)
        return str(entry.weights), "teacher"
    if cfg.teacher.pretrained:
        return None, "teacher.pretrained"
    raise ConfigError(
        f"no trained '{name}' for dataset '{dataset['name']}' in the teacher zoo ({zoo.root})",
        key="teacher",
        hint="train it first:\n  " + teacher_training_command(cfg, overrides)
             + "\nor add teacher.auto_train=true to train it now, or point "
               "teacher.checkpoint=PATH at a weights file")


def build_teacher(cfg: DictConfig, dataset: dict, num_classes: int, zoo: TeacherZoo,
                  overrides: list[str], train: Train) -> torch.nn.Module:
    """The teacher model with its weights (see `teacher_weights`); torchvision's pretrained
    weights only when they already fit the dataset."""
    name = cfg.teacher.name
    source, key = teacher_weights(cfg, dataset, zoo, overrides, train)
    if source is not None:
        return load_model(name, source, key=key, num_classes=num_classes)
    teacher = create_model(name, num_classes=num_classes, pretrained=True)
    if getattr(teacher, "head_replaced", False):
        raise ConfigError(
            f"{name}'s pretrained head has a different number of classes than the dataset "
            f"({num_classes}); distilling from an untrained head would teach noise",
            key="teacher.pretrained",
            hint="fine-tune it first:\n  " + teacher_training_command(cfg, overrides))
    log.info("teacher %s: torchvision's pretrained weights, as they are", name)
    return teacher


# --- TAKD: the assistant chain ----------------------------------------------------------------
def link_fingerprint(parent_weights: str | None, parent_name: str, kd_options: dict) -> str:
    """8 hex digits naming one KD link: the parent's exact weights and the KD options. An
    assistant distilled from other weights (a retrained teacher, another teacher.checkpoint) or
    with another temperature is another zoo entry, never a stale cache hit."""
    digest = hashlib.sha256()
    if parent_weights is None:
        digest.update(f"torchvision-pretrained:{parent_name}".encode())
    else:
        with open(parent_weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    digest.update(json.dumps(kd_options, sort_keys=True).encode())
    return digest.hexdigest()[:8]


def build_assistant_chain(cfg: DictConfig, dataset: dict, num_classes: int, zoo: TeacherZoo,
                          overrides: list[str], train: Train, *, assistants: list[str],
                          kd_options: dict) -> torch.nn.Module:
    """The last assistant of teacher -> assistants[0] -> ... , each distilled with KD
    (`kd_options`) from the model before it and kept in the zoo as
    `<assistant>@kd-<parent>.<link_fingerprint>`: missing ones are trained now, found ones are
    reused by every later run, whatever its seed or student. The zoo always keeps them
    (zoo.publish is about teachers): the chain's next link loads them from there."""
    parent_name = cfg.teacher.name
    parent_weights, _ = teacher_weights(cfg, dataset, zoo, overrides, train)
    parent_teacher = {**OmegaConf.to_container(cfg.teacher), "checkpoint": parent_weights,
                      "auto_train": False}
    for arch in assistants:
        zoo_name = f"{arch}@kd-{parent_name}.{link_fingerprint(parent_weights, parent_name, kd_options)}"
        entry = zoo.find(dataset["name"], zoo_name)
        if entry is None:
            log.info("TAKD: training assistant %s (KD from %s) for the zoo", arch, parent_name)
            acfg = zoo_run_config(cfg, student=arch, zoo_name=zoo_name,
                                  distiller={"name": "kd", **kd_options})
            for option, value in parent_teacher.items():
                acfg.teacher[option] = value
            summary = train(acfg, overrides=[])
            meta = {"top1": summary["last_top1"], "best_top1": summary["best_top1"],
                    "epochs": summary["epochs"], "seed": cfg.seed,
                    "run_dir": str(Path(acfg.run_dir).resolve()), "num_classes": num_classes,
                    "split": split_identity(dataset), "distilled_from": parent_name,
                    "teacher_weights": parent_weights, "kd": kd_options}
            weights = Path(acfg.run_dir) / "student.safetensors"
            dist_utils.on_main(lambda: zoo.publish(dataset["name"], zoo_name, weights, meta))
            entry = zoo.find(dataset["name"], zoo_name)
        check_split(entry, zoo_name, dataset)
        log.info("TAKD: assistant %s from the zoo: %s (top-1 %s)", zoo_name, entry.weights,
                 entry.meta.get("top1"))
        parent_name, parent_weights = arch, str(entry.weights)
        parent_teacher = {"name": arch, "pretrained": False, "checkpoint": parent_weights,
                          "auto_train": False, "auto_train_epochs": cfg.teacher.auto_train_epochs}
    return load_model(assistants[-1], parent_weights, key="distiller.assistants",
                      num_classes=num_classes)
