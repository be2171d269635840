"""Every check that needs no data and no model, run before any file is read or written: the
declared options (distill.config), names, each method's options and per-pair `tuned` values,
and what the chosen method cannot run with. (Types were checked when Hydra composed the config
against the schema.)
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill import distributed as dist_utils
from distill.catalog import DISTILLERS
from distill.folders import folder_problem
from distill.config import (CONFIG_DIR, check_known_keys, declared, flatten, is_float_option,
                            register_model_options)
from distill.data import DATASETS
from distill.errors import ConfigError, unknown_name_error
from distill.method import FIXED_ARGUMENTS, Distiller
from distill.method.checks import RUN_FEATURES, cache_refusal, check_common, refused_features
from distill.models import list_models, model_spec
from distill.preflight import check_tag
from distill.registry import check_options

PRETRAINED = ("torchvision", "timm")   # model families with pretrained weights to load


def resolve_config(cfg: DictConfig) -> dict:
    """Resolve every interpolation once, so e.g. `dataset.recipe.lr=abc` is reported as a bad
    value of the key that reads it, not as a traceback halfway through the run."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(str(exc).splitlines()[0], key=key) from None


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


def method_options(method: str, teacher: str, student: str, *overrides: str) -> dict:
    """A method's options as a run of this pair gets them: its YAML composed with Hydra (no
    experiment file, so no per-pair `tuned` values) and resolved, without `name`. What tools and
    tests build a distiller with outside a run."""
    register_model_options([teacher, student])
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"distiller={method}", f"teacher={teacher}",
                                          f"student={student}", *overrides])
    options = resolve_config(cfg)["distiller"]
    options.pop("name")
    return options


def validate(cfg: DictConfig) -> dict:
    """All the checks; returns the resolved config."""
    check_known_keys(cfg)
    resolved = resolve_config(cfg)
    check_recipe(resolved["dataset"].get("recipe"))
    check_finite(resolved)
    check_run_dir_value(cfg.run_dir)
    check_declared_options(cfg)
    distiller_cls = DISTILLERS.get(cfg.distiller.name, key="distiller")
    check_zoo_root(cfg, distiller_cls)
    checkpoint = cfg.teacher.checkpoint
    if distiller_cls.traits.needs_teacher and checkpoint is not None \
            and not Path(checkpoint).expanduser().is_file():
        raise ConfigError(f"no such file: {checkpoint}", key="teacher.checkpoint",
                          allowed="null (the teacher zoo) or the path of a weights file")
    options = {k: v for k, v in resolved["distiller"].items() if k != "name"}
    check_options(distiller_cls, options, key="distiller", skip=FIXED_ARGUMENTS)
    distiller_cls.check_values(options)
    check_common(distiller_cls, options, cfg.trainer.epochs)
    check_tuned(resolved.get("tuned") or {})
    check_teacher_cache(cfg.distiller.name, distiller_cls, cfg.teacher.cache)
    check_tag(cfg.tag)
    for group in ("teacher", "student"):
        if cfg[group].name not in list_models():
            raise unknown_name_error("model", cfg[group].name, list_models(), key=group)
        if cfg[group].pretrained and model_spec(cfg[group].name).family not in PRETRAINED:
            raise ConfigError(f"{cfg[group].name} has no pretrained weights",
                              key=f"{group}.pretrained",
                              allowed="true only for torchvision (tv_*) and timm (timm_*) models")
    check_inputs(cfg, distiller_cls)
    world = dist_utils.launch_world_size()
    check_run_features(cfg.distiller.name, distiller_cls, resolved["trainer"], world)
    trainer = cfg.trainer
    if trainer.batch_size % world:
        raise ConfigError(f"invalid value {trainer.batch_size} for {world} processes",
                          key="trainer.batch_size",
                          allowed=f"a multiple of {world}: it is the global batch, split evenly "
                                  "over the ranks")
    smallest = distiller_cls.traits.min_batch
    if trainer.batch_size // world < smallest:
        raise ConfigError(
            f"invalid value {trainer.batch_size} for distiller={cfg.distiller.name}: its loss "
            f"relates a batch's items to each other, and below {smallest} per process it is 0 "
            "or undefined (the run would be plain cross-entropy under the method's name)",
            key="trainer.batch_size",
            allowed=f"at least {smallest * world}" + (f" ({smallest} per process)" if world > 1
                                                     else ""))
    if world > 1 and cfg.device.startswith("cuda:"):
        raise ConfigError(f"invalid value {cfg.device!r} under torchrun", key="device",
                          allowed="auto or cuda: each process takes GPU LOCAL_RANK")
    if trainer.sync_bn and world > 1 and resolve_device(cfg.device).type != "cuda":
        raise ConfigError("SyncBatchNorm runs on GPUs only", key="trainer.sync_bn",
                          allowed="false on CPU")
    return resolved


def check_declared_options(cfg: DictConfig) -> None:
    """Every declared option against its choices or rule (distill.config.option)."""
    for key, (opt, _) in declared().items():
        value = OmegaConf.select(cfg, key)
        if opt.choices is not None:
            ok = value in opt.choices
        elif opt.rule is not None:
            try:
                ok = bool(opt.rule(value, cfg))
            except TypeError:   # e.g. a comparison with a value of another type
                ok = False
        else:
            continue
        if not ok:
            raise ConfigError(f"invalid value {value!r}", key=key, allowed=opt.allowed_text())


def dataset_inputs(name: str) -> str:
    """What a registered dataset's items hold: "images" or "tokens" (its registry entry)."""
    return DATASETS.meta(name).get("inputs", "images") if name in DATASETS else "images"


def check_inputs(cfg: DictConfig, distiller_cls: type[Distiller]) -> None:
    """The models and the method take what the dataset gives: an image-only method or model
    on token inputs (or a text model on images) is refused by name."""
    inputs = dataset_inputs(cfg.dataset.name)
    for group in ("student", "teacher"):
        if not distiller_cls.traits.needs_teacher and group == "teacher":
            continue
        takes = model_spec(cfg[group].name).inputs
        if takes != inputs:
            fitting = [n for n in list_models() if not n.startswith(("tv_", "timm_"))
                       and model_spec(n).inputs == inputs]
            raise ConfigError(f"{cfg[group].name} takes {takes}, and dataset {cfg.dataset.name} "
                              f"gives {inputs}", key=group,
                              allowed=f"a model for {inputs}, e.g. {', '.join(fitting[:12])}")
    if inputs != "images" and distiller_cls.traits.needs_images:
        images = [n for n in DISTILLERS.list() if not DISTILLERS.get(n).traits.needs_images]
        raise ConfigError(f"{cfg.distiller.name} works on images (feature maps, pixels or image "
                          f"views); dataset {cfg.dataset.name} gives {inputs}", key="distiller",
                          allowed=f"a method for any inputs: {', '.join(images)}")
    if inputs != "images":
        for key in ("dataset.student_view",):
            if OmegaConf.select(cfg, key) is not None:
                raise ConfigError(f"a view of the image for the student; dataset "
                                  f"{cfg.dataset.name} gives {inputs}", key=key,
                                  allowed="null for this dataset")
        if cfg.trainer.quantize != "none":
            raise ConfigError(f"the int8 student's export calibrates on images; dataset "
                              f"{cfg.dataset.name} gives {inputs}", key="trainer.quantize",
                              allowed="none for this dataset")
        if cfg.trainer.channels_last:
            raise ConfigError(f"channels_last is a memory layout of image batches; dataset "
                              f"{cfg.dataset.name} gives {inputs}", key="trainer.channels_last",
                              allowed="null (the default: on for images) or false")


def check_tuned(tuned: dict) -> None:
    """`tuned.<method>.<key>` (per-pair values the methods' YAMLs read) must name a registered
    method and one of its options: a typo would otherwise be read by nothing."""
    for method, values in tuned.items():
        if method not in DISTILLERS:
            raise unknown_name_error("distiller", method, DISTILLERS.list(), key=f"tuned.{method}")
        if not isinstance(values, dict):
            raise ConfigError(f"invalid value {values!r}", key=f"tuned.{method}",
                              allowed=f"a mapping of {method}'s options to values")
        check_options(DISTILLERS.get(method), values, key=f"tuned.{method}",
                      skip=FIXED_ARGUMENTS)


# The dataset's recipe: what its keys feed, and the rule of each. Checked whether or not this run
# reads them (trainer.epochs=2 leaves recipe.epochs unread), because the run that trains a
# missing teacher does.
RECIPE_RULES = {
    "epochs": (lambda v: _is_int(v) and v >= 1, "an integer of at least 1 (trainer.epochs)"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer of at least 1 (trainer.batch_size)"),
    "lr": (lambda v: _is_real(v) and v > 0, "a positive finite number (optimizer.lr)"),
    "weight_decay": (lambda v: _is_real(v) and v >= 0, "zero or a positive finite number "
                                                       "(optimizer.weight_decay)"),
    "milestones": (lambda v: isinstance(v, list) and all(_is_int(m) and m >= 1 for m in v)
                   and all(a < b for a, b in zip(v, v[1:])),
                   "epochs (at least 1) in increasing order (scheduler.milestones); [] for none"),
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_recipe(recipe: dict | None) -> None:
    for key, value in (recipe or {}).items():
        rule = RECIPE_RULES.get(key)
        if rule is not None and not rule[0](value):
            raise ConfigError(f"invalid value {value!r}", key=f"dataset.recipe.{key}",
                              allowed=rule[1])


def check_run_dir_value(run_dir: str) -> None:
    if not str(run_dir).strip():
        raise ConfigError(f"invalid value {run_dir!r}: the run would write into the working "
                          "directory", key="run_dir",
                          allowed="a folder for this run (default: "
                                  "outputs/<dataset>/<pair>/<method>/seed<N>)")


def check_zoo_root(cfg: DictConfig, distiller_cls: type[Distiller]) -> None:
    """zoo.root of a run that uses the teacher zoo must be a folder, or one that can be made:
    a method with teachers looks them up there and makes the missing ones there (auto_train,
    TAKD's links: a lock first), a vanilla run publishes there, the teacher cache lives there.
    Refused now, before anything is written, not as a traceback from the first lock or folder
    made in it. A run that will write (it publishes, or may train its teachers) also needs the
    nearest existing folder to take a new one; one that only reads may use a read-only zoo."""
    publishes = cfg.distiller.name == "none" and cfg.zoo.publish
    trains_teachers = distiller_cls.traits.needs_teacher and cfg.teacher.auto_train
    if not (publishes or distiller_cls.traits.needs_teacher or cfg.teacher.cache != "none"):
        return
    root = Path(cfg.zoo.root).expanduser().absolute()
    problem = folder_problem(root, write=publishes or trains_teachers)
    if problem is None:
        return
    raw = cfg.zoo._get_node("root")._value()   # before interpolation: where the value came from
    source = (" (from $DISTILL_ZOO)" if isinstance(raw, str) and "DISTILL_ZOO" in raw
              and os.environ.get("DISTILL_ZOO") else "")
    raise ConfigError(f"cannot use {root} as the teacher zoo{source}: {problem}",
                      key="zoo.root", allowed=declared()["zoo.root"][0].allowed_text())


def check_finite(resolved: dict) -> None:
    """A declared float option holding nan or inf is refused by name (inf passes `> 0`)."""
    for key, value in flatten(resolved).items():
        if isinstance(value, float) and not math.isfinite(value) and is_float_option(key):
            raise ConfigError(f"invalid value {value!r}", key=key, allowed="a finite number")


def check_teacher_cache(name: str, distiller_cls: type[Distiller], mode: str) -> None:
    """`teacher.cache=views` serves only methods that read nothing but their teachers' outputs
    on the training batch; any other is refused, saying why and which methods it serves."""
    why = cache_refusal(distiller_cls) if mode != "none" else None
    if why is not None:
        served = [n for n in DISTILLERS.list() if cache_refusal(DISTILLERS.get(n)) is None]
        raise ConfigError(f"{name} {why}", key="teacher.cache",
                          allowed=f"none for {name}; views serves {', '.join(served)}")


def check_run_features(name: str, distiller_cls: type[Distiller], trainer: dict,
                       world_size: int) -> None:
    """A method that cannot run with a feature this run turns on is refused now, naming the
    key to change, not mid-run."""
    on = {"compile": trainer["compile"] != "none", "fp16": trainer["precision"] == "fp16",
          "bf16": trainer["precision"] == "bf16", "ddp": world_size > 1,
          "channels_last": trainer["channels_last"] is not False,
          "sync_bn": bool(trainer.get("sync_bn")) and world_size > 1}
    for feature, why in refused_features(distiller_cls).items():
        if on[feature]:
            key = RUN_FEATURES[feature]
            what = (f"DDP ({world_size} processes)" if feature == "ddp"
                    else f"{key}={trainer[key.split('.')[1]]}")
            allowed = {"compile": "none", "fp16": "fp32", "bf16": "fp32", "channels_last": "false",
                       "ddp": "one process (no torchrun)", "sync_bn": "false"}[feature]
            raise ConfigError(f"distiller '{name}' cannot run with {what}: {why}",
                              key="distiller" if feature == "ddp" else key, allowed=allowed)
