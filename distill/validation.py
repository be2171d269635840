"""Every check that needs no data and no model, run before any file is read or written: ranges
that types cannot express, names, each part's options, and what the chosen method cannot run
with. (Types were checked when Hydra composed the config against the schema in distill.config.)
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill.config import CONFIG_DIR, check_known_keys, flatten, schema_defaults
from distill.distillers import DISTILLERS
from distill.distillers.base import (FIXED_ARGUMENTS, RUN_FEATURES, check_common,
                                     refused_features, teacher_cache_refusal)
from distill.engine import distributed as dist_utils
from distill.engine.loaders import DATA_PATHS
from distill.engine.nonfinite import NONFINITE_POLICIES
from distill.engine.optim import OPTIMIZERS, SCHEDULES
from distill.engine.quantize import QUANTIZE_CHOICES
from distill.engine.teacher_cache import CACHE_MODES, STORAGE_DTYPES
from distill.engine.trainer import COMPILE_CHOICES, PRECISIONS
from distill.errors import ConfigError, unknown_name_error
from distill.models import list_models, model_spec
from distill.preflight import check_tag
from distill.registry import check_options

PRETRAINED = ("torchvision", "timm")   # model families with pretrained weights to load
# numpy's seeds are 32-bit, and ranks above 0 add 7919 x rank to the seed
MAX_SEED = 2**31 - 1


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
    from hydra import compose, initialize_config_dir

    from distill.config import register_model_options

    register_model_options([teacher, student])
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"distiller={method}", f"teacher={teacher}",
                                          f"student={student}", *overrides])
    options = resolve_config(cfg)["distiller"]
    options.pop("name")
    return options


def compile_backends() -> list[str]:
    import torch._dynamo   # only when compiling: importing dynamo costs a second

    return torch._dynamo.list_backends(exclude_tags=())


def validate(cfg: DictConfig) -> dict:
    """All the checks; returns the resolved config."""
    check_known_keys(cfg)
    resolved = resolve_config(cfg)
    check_recipe(resolved["dataset"].get("recipe"))
    opt, sched, trainer = cfg.optimizer, cfg.scheduler, cfg.trainer
    checks = [
        ("optimizer.name", lambda: opt.name in OPTIMIZERS, lambda: ", ".join(OPTIMIZERS)),
        ("optimizer.lr", lambda: opt.lr > 0, "a positive number"),
        ("optimizer.momentum", lambda: 0 <= opt.momentum < 1, "in [0, 1)"),
        ("optimizer.nesterov", lambda: not (opt.nesterov and opt.momentum == 0),
         "false when momentum is 0 (Nesterov needs momentum)"),
        ("optimizer.weight_decay", lambda: opt.weight_decay >= 0, "zero or positive"),
        ("scheduler.name", lambda: sched.name in SCHEDULES, lambda: ", ".join(SCHEDULES)),
        ("scheduler.gamma", lambda: 0 < sched.gamma <= 1, "a decay factor in (0, 1]"),
        ("scheduler.milestones", lambda: all(m >= 1 for m in sched.milestones) and all(
            a < b for a, b in zip(sched.milestones, sched.milestones[1:])),
         "epochs (at least 1) in increasing order, e.g. [150,180,210]; [] for none"),
        ("scheduler.min_lr_ratio", lambda: 0 <= sched.min_lr_ratio <= 1,
         "in [0, 1]: the cosine floor as a fraction of the base lr"),
        ("trainer.epochs", lambda: trainer.epochs >= 1, "at least 1"),
        ("scheduler.warmup_epochs", lambda: 0 <= sched.warmup_epochs <= trainer.epochs,
         "zero or positive, at most trainer.epochs (a longer ramp never reaches the base lr)"),
        ("trainer.batch_size", lambda: trainer.batch_size >= 1, "at least 1"),
        ("trainer.eval_batch_size", lambda: trainer.eval_batch_size >= 1, "at least 1"),
        ("trainer.max_steps", lambda: trainer.max_steps is None or trainer.max_steps >= 1,
         "null or at least 1"),
        ("trainer.num_workers", lambda: trainer.num_workers >= 0, "zero or positive"),
        ("trainer.log_every", lambda: trainer.log_every >= 1, "at least 1"),
        ("trainer.precision", lambda: trainer.precision in PRECISIONS,
         lambda: ", ".join(PRECISIONS)),
        ("trainer.data_path", lambda: trainer.data_path in DATA_PATHS, lambda: ", ".join(DATA_PATHS)),
        ("trainer.compile", lambda: trainer.compile in COMPILE_CHOICES,
         lambda: ", ".join(COMPILE_CHOICES)),
        ("trainer.compile_backend", lambda: trainer.compile == "none"
         or trainer.compile_backend in compile_backends(), lambda: ", ".join(compile_backends())),
        ("trainer.quantize", lambda: trainer.quantize in QUANTIZE_CHOICES,
         lambda: ", ".join(QUANTIZE_CHOICES)),
        ("trainer.on_nonfinite", lambda: trainer.on_nonfinite in NONFINITE_POLICIES,
         lambda: ", ".join(NONFINITE_POLICIES)),
        ("teacher.auto_train_epochs", lambda: cfg.teacher.auto_train_epochs is None
         or cfg.teacher.auto_train_epochs >= 1, "null (the dataset recipe's epochs) or at least 1"),
        ("teacher.checkpoint", lambda: cfg.teacher.checkpoint is None
         or cfg.teacher.checkpoint.strip() != "", "null (the zoo) or the path of a weights file"),
        ("trainer.accumulate", lambda: trainer.accumulate >= 1,
         "at least 1 (batches per optimizer step)"),
        ("trainer.clip_grad_norm", lambda: trainer.clip_grad_norm is None
         or 0 < trainer.clip_grad_norm < math.inf, "null (no clipping) or a positive norm"),
        ("trainer.ema_decay", lambda: trainer.ema_decay is None or 0 < trainer.ema_decay < 1,
         "null (no EMA) or a decay in (0, 1), e.g. 0.9998"),
        ("trainer.ema_decay", lambda: trainer.ema_decay is None or trainer.quantize == "none",
         "null with trainer.quantize=int8 (the int8 export is the trained student's)"),
        ("trainer.label_smoothing", lambda: 0 <= trainer.label_smoothing < 1, "in [0, 1)"),
        ("teacher.cache", lambda: cfg.teacher.cache in CACHE_MODES, ", ".join(CACHE_MODES)),
        ("teacher.cache_dtype", lambda: cfg.teacher.cache_dtype in STORAGE_DTYPES,
         ", ".join(STORAGE_DTYPES)),
        ("seed", lambda: 0 <= cfg.seed <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
        ("zoo.root", lambda: cfg.zoo.root.strip() != "", "a folder (default: zoo, or $DISTILL_ZOO)"),
    ]
    check_finite(resolved)
    check_run_dir_value(cfg.run_dir)
    for key, ok, allowed in checks:
        if not ok():
            raise ConfigError(f"invalid value {OmegaConf.select(cfg, key)!r}", key=key,
                              allowed=allowed() if callable(allowed) else allowed)
    distiller_cls = DISTILLERS.get(cfg.distiller.name, key="distiller")
    checkpoint = cfg.teacher.checkpoint
    if distiller_cls.requires_teacher and checkpoint is not None \
            and not Path(checkpoint).expanduser().is_file():
        raise ConfigError(f"no such file: {checkpoint}", key="teacher.checkpoint",
                          allowed="null (the teacher zoo) or the path of a weights file")
    options = {k: v for k, v in resolved["distiller"].items() if k != "name"}
    check_options(distiller_cls, options, key="distiller", skip=FIXED_ARGUMENTS)
    distiller_cls.check_values(options)
    check_common(distiller_cls, options, trainer.epochs)
    check_teacher_cache(cfg.distiller.name, distiller_cls, cfg.teacher.cache)
    check_tag(cfg.tag)
    for group in ("teacher", "student"):
        if cfg[group].name not in list_models():
            raise unknown_name_error("model", cfg[group].name, list_models(), key=group)
        if cfg[group].pretrained and model_spec(cfg[group].name).family not in PRETRAINED:
            raise ConfigError(f"{cfg[group].name} has no pretrained weights",
                              key=f"{group}.pretrained",
                              allowed="true only for torchvision (tv_*) and timm (timm_*) models")
    world = dist_utils.launch_world_size()
    check_run_features(cfg.distiller.name, distiller_cls, resolved["trainer"], world)
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


def check_finite(resolved: dict) -> None:
    """A float key of the schema holding nan or inf is refused by name (inf passes `> 0`)."""
    defaults = schema_defaults()
    for key, value in flatten(resolved).items():
        if isinstance(defaults.get(key), float) and isinstance(value, float) \
                and not math.isfinite(value):
            raise ConfigError(f"invalid value {value!r}", key=key, allowed="a finite number")


def check_teacher_cache(name: str, distiller_cls: type, mode: str) -> None:
    """`teacher.cache=views` serves only methods that read nothing but their teachers' outputs
    on the training batch; any other is refused, saying why and which methods it serves."""
    why = teacher_cache_refusal(distiller_cls) if mode != "none" else None
    if why is not None:
        served = [n for n in DISTILLERS.list() if teacher_cache_refusal(DISTILLERS.get(n)) is None]
        raise ConfigError(f"{name} {why}", key="teacher.cache",
                          allowed=f"none for {name}; views serves {', '.join(served)}")


def check_run_features(name: str, distiller_cls: type, trainer: dict, world_size: int) -> None:
    """A method that cannot run with a feature this run turns on is refused now, naming the
    key to change, not mid-run."""
    on = {"compile": trainer["compile"] != "none", "fp16": trainer["precision"] == "fp16",
          "bf16": trainer["precision"] == "bf16", "ddp": world_size > 1,
          "channels_last": trainer["channels_last"],
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
