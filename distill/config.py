"""Structured configs: the schema Hydra checks types against at compose time.

The groups that differ per choice (dataset, distiller, logger) stay free-form here; their keys
are checked against the builder's signature before anything is built (Registry.build_from_config).
Every registered model becomes an entry of the `teacher` and `student` groups, so
`teacher=NAME` works for every model without a YAML file per model.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from distill.models import list_models

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"   # the checkout's Hydra configs


@dataclass
class StudentConfig:
    name: str = MISSING
    pretrained: bool = False   # torchvision weights (needs network or a filled torch hub cache)


@dataclass
class TeacherConfig(StudentConfig):
    checkpoint: Optional[str] = None       # weights file; default: the zoo entry for (dataset, name)
    auto_train: bool = False               # no weights anywhere: train the teacher first
    auto_train_epochs: Optional[int] = None  # epochs for that run (default: the dataset recipe's)
    cache: str = "none"                    # views: its outputs per (image, augmentation view), kept
    cache_dtype: str = "float32"           # float32 (exact) | float16 (half the disk, rounded)


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    decay_norm_and_bias: bool = True   # false: no weight decay on norm layers and biases (timm)


@dataclass
class SchedulerConfig:
    name: str = "multistep"
    milestones: list[int] = field(default_factory=list)   # epochs at which lr *= gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0   # cosine floor, as a fraction of the base lr


@dataclass
class TrainerConfig:
    epochs: int = 240
    batch_size: int = 64
    eval_batch_size: int = 256
    max_steps: Optional[int] = None   # stop after this many optimizer steps (smoke runs)
    num_workers: int = 0
    log_every: int = 20
    precision: str = "fp32"           # fp32 | bf16 | fp16
    resume: bool = True               # re-running in the same run_dir continues from its checkpoint
    progress: bool = True
    sync_bn: bool = False             # DDP on GPUs: BN statistics over all ranks
    data_path: str = "auto"           # auto | memory (batched on the device) | loader
    channels_last: bool = True        # NHWC convolutions (measured faster: docs/bench-cpu.md)
    compile: str = "none"             # none | teacher | student | both (torch.compile)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager, eager: to debug)
    on_nonfinite: str = "stop"        # stop | skip: a NaN/inf loss ends the run, or its step is skipped
    quantize: str = "none"            # none | int8: quantisation-aware training of the student
    accumulate: int = 1               # gradient accumulation: an optimizer step every N batches
    clip_grad_norm: Optional[float] = None   # clip each optimizer's gradients to this L2 norm
    ema_decay: Optional[float] = None  # e.g. 0.9998: an EMA of the student, evaluated and exported
    label_smoothing: float = 0.0      # of the CE term against the labels (every method's)


@dataclass
class ZooConfig:
    root: str = "zoo"
    publish: bool = True   # `distiller=none` runs publish their weights for (dataset, model)


@dataclass
class TrainConfig:
    dataset: Any = MISSING
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distiller: Any = MISSING
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: Any = field(default_factory=dict)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    seed: int = 0
    device: str = "auto"      # auto | cpu | cuda | cuda:N
    tag: str = ""             # appended to the run directory name, to keep variants apart
    # Per-pair hyperparameters of the reference configs, by method (experiment files set them,
    # e.g. tuned.dkd.beta); a method's YAML reads its entry, and the command line still wins.
    tuned: Any = field(default_factory=dict)
    run_dir: str = MISSING


def check_known_keys(cfg: Any) -> None:
    """Keys added with `+key=value` that the schema does not know (`+trainer.epoch=3`, `+foo=1`)
    get past Hydra; stop them here, naming the key and its close matches, instead of training
    with a typo or failing deep inside a builder."""
    from distill.errors import ConfigError, close_matches

    def walk(node: Any, schema: type, prefix: str) -> None:
        known = {f.name: f for f in fields(schema)}
        for key in node:
            if key not in known:
                similar = close_matches(str(key), known)
                hint = f"; did you mean: {', '.join(similar)}?" if similar else ""
                raise ConfigError(f"unknown key{hint}", key=f"{prefix}{key}",
                                  allowed=", ".join(sorted(known)))
            nested = _schema_type(known[key])
            if nested is not None and node[key] is not None:
                walk(node[key], nested, f"{prefix}{key}.")

    walk(cfg, TrainConfig, "")


def _schema_type(f: Any) -> type | None:
    """The dataclass a field holds (made by its default_factory), or None for a free-form one."""
    if f.default_factory is dataclasses.MISSING:
        return None
    value = f.default_factory()
    return type(value) if is_dataclass(value) else None


@functools.cache
def schema_defaults() -> dict[str, Any]:
    """Default of every key of the config schema, by dotted path: a run recorded before a key
    existed ran with its default (resume and report compare old runs with it)."""
    schema = OmegaConf.to_container(OmegaConf.structured(TrainConfig), resolve=False)
    return {k: v for k, v in flatten(schema).items() if v != "???"}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys: {"a": {"b": 1}, "c": [2]} -> {"a.b": 1, "c": [2]}. Lists
    stay values; an empty dict yields no key. The one flattening of configs (run records,
    schema defaults, tracker hparams)."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items()
                for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def run_path(distiller: Any, teacher: str, student: str, tag: str = "") -> str:
    """`resnet56-resnet20/kd` for distillation, `resnet20/none` for vanilla training (and any
    method without a teacher, e.g. dml), `resnet56+resnet110-resnet20/multi_teacher`: the
    method's `teacher_label`. `distiller` is the method's name or its whole config group."""
    from distill.distillers import DISTILLERS   # resolvers run after everything is imported

    name = distiller if isinstance(distiller, str) else distiller["name"]
    options = {} if isinstance(distiller, str) else {k: distiller[k] for k in distiller}
    label = DISTILLERS.get(name).teacher_label(options, teacher) if name in DISTILLERS else teacher
    pair = student if label is None else f"{label}-{student}"
    return f"{pair}/{name}" + (f"-{tag}" if tag else "")


def registered_methods() -> str:
    """Every registered method, comma-separated: the `distiller` axis of the benchmark sweeps
    (`${distill_methods:}`), so a new method joins them without editing a list."""
    from distill.distillers import DISTILLERS

    return ",".join(DISTILLERS.list())


def digest(text: Any) -> str:
    """12 hex digits naming `text` (`${distill_digest:...}`: a search trial's folder, from its
    parameters, so a continued search never reuses an earlier trial's folder)."""
    import hashlib

    return hashlib.sha256(str(text).encode()).hexdigest()[:12]


def sqlite_url(path: str) -> str:
    """`${distill_sqlite:<file>}`: an SQLite URL for an Optuna study file, its folder made
    first (the study is opened before Hydra makes the sweep folder)."""
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


def register_configs() -> None:
    if not OmegaConf.has_resolver("distill_run"):
        OmegaConf.register_new_resolver("distill_run", run_path)
    if not OmegaConf.has_resolver("distill_methods"):
        OmegaConf.register_new_resolver("distill_methods", registered_methods)
    for name, resolver in (("distill_digest", digest), ("distill_sqlite", sqlite_url)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    register_model_options(n for n in list_models() if not n.startswith(ON_DEMAND_MODELS))


# Model families whose names become `teacher=` / `student=` options when a command names them
# (distill.preflight.register_models_named_in), not all at import: Hydra deep-copies every
# stored option on every compose, and timm's 1,371 would make each compose 3x slower.
ON_DEMAND_MODELS = ("timm_",)


def register_model_options(names: Any) -> None:
    """Make registered models `teacher=NAME` / `student=NAME` options. Plain dicts: the schema
    (train_schema, first in the defaults) types them and fills the other keys (a dataclass
    node per model costs 9x more)."""
    cs = ConfigStore.instance()
    stored = cs.repo.get("teacher", {})
    models = set(list_models())
    for name in names:
        if name in models and f"{name}.yaml" not in stored:
            cs.store(group="teacher", name=name, node={"name": name})
            cs.store(group="student", name=name, node={"name": name})


register_configs()
