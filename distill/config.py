"""The config schema, and the one declaration of every teacher, optimizer, scheduler, trainer
and zoo option.

Each option is declared once, here, with `option(default, help, ...)`: its type (the
annotation, which Hydra checks at compose time), its default, what it allows (`choices`, or a
`rule` and the `allowed` text errors show), whether a resumed run may change it, whether a run
that trains a zoo teacher keeps it or takes its default, and what an accepted edge value means.
Validation (distill.validation), the teacher runs (distill.teachers), resume (engine/rundir), the
property walk of the tests and the option reference (docs/options.md, `python tools/options.py`)
all read these declarations.

The groups that differ per choice (dataset, distiller, logger) stay free-form here; their keys
are checked against the builder's signature (Registry.build_from_config). Every registered model
is an entry of the `teacher` and `student` groups (`teacher=NAME` without a YAML file each).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from distill.errors import ConfigError, close_matches
from distill.models import list_models

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"   # the checkout's Hydra configs


@dataclass(frozen=True)
class Option:
    """What one option is besides its type and default."""

    help: str
    choices: tuple[Any, ...] | None = None
    rule: Callable[[Any, Any], bool] | None = None   # (value, whole config) -> acceptable
    allowed: str | Callable[[], str] | None = None    # what `rule` accepts, as errors say it
    resumable: bool = False    # may differ when a run resumes (a setting, not the experiment)
    for_teachers: bool = True  # False: a run that trains a zoo teacher takes the default
    # accepted edge values and what they mean: "0", "-1", "huge", "[]", "number" (any number),
    # "text" (any text) or "any" (the tests walk every option with such values)
    accepts: dict[str, str] = field(default_factory=dict)

    def allowed_text(self) -> str:
        if self.choices is not None:
            return ", ".join(map(str, self.choices))
        return self.allowed() if callable(self.allowed) else (self.allowed or "")


def option(default: Any, help: str, **meta: Any) -> Any:
    """A schema field declared once: `epochs: int = option(240, "...", rule=...)`."""
    meta = {"option": Option(help=help, **meta)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _at_least(low: int) -> Callable[[Any, Any], bool]:
    return lambda v, cfg: v >= low


def _optional_at_least(low: int) -> Callable[[Any, Any], bool]:
    return lambda v, cfg: v is None or v >= low


def compile_backends() -> list[str]:
    import torch._dynamo   # only when compiling: importing dynamo costs a second

    return torch._dynamo.list_backends(exclude_tags=())


# numpy's seeds are 32-bit, and ranks above 0 add 7919 x rank to the seed
MAX_SEED = 2**31 - 1
SCALES = ("full", "cpu", "smoke")
FOLDER = "a folder, relative to the working directory"
TAG = "text of one folder name part: letters, digits, _ . + - ('' is no tag)"


def scaled(scale: str, *values: Any) -> Any:
    """`${distill_scaled:${scale},FULL,CPU,SMOKE}` in a method's YAML: the value for the run's
    `scale`, so the cost of an expensive method is set beside its defaults."""
    return values[SCALES.index(scale)] if scale in SCALES else values[0]


@dataclass
class StudentConfig:
    name: str = MISSING
    pretrained: bool = option(False, "start from the model family's pretrained weights "
                              "(torchvision, timm: needs the network or a filled hub cache)")


@dataclass
class TeacherConfig(StudentConfig):
    checkpoint: Optional[str] = option(
        None, "the teacher's weights file; null: the zoo's entry for (dataset, name)",
        rule=lambda v, cfg: v is None or v.strip() != "",
        allowed="null (the zoo) or the path of a weights file")
    auto_train: bool = option(False, "no weights anywhere: train the teacher first (and keep "
                              "it in the zoo)", resumable=True)
    auto_train_epochs: Optional[int] = option(
        None, "epochs of that run; null: the dataset recipe's", rule=_optional_at_least(1),
        allowed="null (the dataset recipe's epochs) or at least 1", resumable=True)
    cache: str = option("none", "views: keep the teacher's outputs per (image, augmentation "
                        "view) and read them back (exact)", choices=("none", "views"),
                        resumable=True)
    cache_dtype: str = option("float32", "float32 (exact) or float16 (half the disk, rounded) "
                              "storage of the teacher cache", choices=("float32", "float16"))


@dataclass
class OptimizerConfig:
    name: str = option("sgd", "the optimizer", choices=("sgd", "adamw"))
    lr: float = option("${dataset.recipe.lr}", "base learning rate",
                       rule=lambda v, cfg: v > 0, allowed="a positive number",
                       accepts={"huge": "as given: a diverging run stops with a non-finite loss "
                                        "error (trainer.on_nonfinite)"})
    momentum: float = option(0.9, "SGD momentum", rule=lambda v, cfg: 0 <= v < 1,
                             allowed="in [0, 1)", accepts={"0": "SGD without momentum"})
    weight_decay: float = option(
        "${dataset.recipe.weight_decay}", "L2 weight decay", rule=lambda v, cfg: v >= 0,
        allowed="zero or positive",
        accepts={"0": "no weight decay", "huge": "as given: a diverging run stops with a "
                 "non-finite loss error (trainer.on_nonfinite)"})
    nesterov: bool = option(False, "Nesterov momentum (SGD)",
                            rule=lambda v, cfg: not (v and cfg.optimizer.momentum == 0),
                            allowed="false when momentum is 0 (Nesterov needs momentum)")
    decay_norm_and_bias: bool = option(True, "false: no weight decay on norm layers and biases "
                                       "(timm's recipes)")


@dataclass
class SchedulerConfig:
    name: str = option("multistep", "the learning-rate schedule",
                       choices=("multistep", "cosine", "constant"))
    milestones: list[int] = option(
        "${dataset.recipe.milestones}", "epochs at which lr *= gamma (multistep)",
        rule=lambda v, cfg: all(m >= 1 for m in v) and all(a < b for a, b in zip(v, v[1:])),
        allowed="epochs (at least 1) in increasing order, e.g. [150,180,210]; [] for none",
        accepts={"[]": "the lr never decays"})
    gamma: float = option(0.1, "the multistep decay factor", rule=lambda v, cfg: 0 < v <= 1,
                          allowed="a decay factor in (0, 1]")
    warmup_epochs: float = option(
        0.0, "linear warm-up from 0, in epochs (fractions allowed)",
        rule=lambda v, cfg: 0 <= v <= cfg.trainer.epochs,
        allowed="zero or positive, at most trainer.epochs (a longer ramp never reaches the "
                "base lr)", accepts={"0": "no warm-up"})
    min_lr_ratio: float = option(0.0, "the cosine floor, as a fraction of the base lr",
                                 rule=lambda v, cfg: 0 <= v <= 1,
                                 allowed="in [0, 1]: the cosine floor as a fraction of the base lr",
                                 accepts={"0": "cosine decays to zero"})


@dataclass
class TrainerConfig:
    epochs: int = option("${dataset.recipe.epochs}", "epochs of the main stage (a method's "
                         "stages come first); a resumed run may lengthen it, not shorten it",
                         rule=_at_least(1), allowed="at least 1", resumable=True,
                         for_teachers=False)
    batch_size: int = option("${dataset.recipe.batch_size}", "the global batch: under torchrun "
                             "each of N ranks takes 1/N", rule=_at_least(1), allowed="at least 1",
                             for_teachers=False)
    eval_batch_size: int = option(256, "batch of the evaluation", rule=_at_least(1),
                                  allowed="at least 1", resumable=True)
    max_steps: Optional[int] = option(None, "stop after this many optimizer steps (smoke runs)",
                                      rule=_optional_at_least(1), allowed="null or at least 1",
                                      resumable=True, for_teachers=False)
    num_workers: int = option(0, "DataLoader worker processes (in-memory datasets need none)",
                              rule=_at_least(0), allowed="zero or positive", resumable=True,
                              accepts={"0": "data loaded in the training process"})
    log_every: int = option(20, "steps between logged loss terms", rule=_at_least(1),
                            allowed="at least 1", resumable=True)
    precision: str = option("fp32", "autocast precision", choices=("fp32", "bf16", "fp16"))
    resume: bool = option(True, "re-running in the same run directory continues from its "
                          "checkpoint", resumable=True)
    progress: bool = option(True, "a live progress bar", resumable=True)
    sync_bn: bool = option(False, "torchrun on GPUs: BatchNorm statistics over all ranks "
                           "(SyncBatchNorm)")
    data_path: str = option("auto", "memory: in-memory image datasets batched and augmented "
                            "on the device; loader: DataLoaders; auto: memory where it can",
                            choices=("auto", "memory", "loader"), resumable=True)
    channels_last: Optional[bool] = option(
        None, "NHWC convolutions; null: on for image inputs (measured faster, "
        "docs/bench-cpu.md), off for others", resumable=True)
    compile: str = option("none", "torch.compile the teachers, the evaluated parts, or both",
                          choices=("none", "teacher", "student", "both"))
    compile_backend: str = option(
        "inductor", "torch.compile backend (aot_eager, eager: to debug)",
        rule=lambda v, cfg: cfg.trainer.compile == "none" or v in compile_backends(),
        allowed=lambda: ", ".join(compile_backends()),
        accepts={"any": "read only with trainer.compile != none, and then checked against "
                        "torch's backends"})
    on_nonfinite: str = option("stop", "a NaN/inf loss stops the run (last good checkpoint "
                               "kept), or its step is skipped and counted",
                               choices=("stop", "skip"), resumable=True)
    max_skipped_fraction: float = option(
        0.25, "on_nonfinite=skip: more than this fraction of an epoch's steps skipped stops the "
        "run (exit 3, nothing published): a run that mostly skips is not training",
        rule=lambda v, cfg: 0 <= v < 1, allowed="in [0, 1)", resumable=True,
        accepts={"0": "any skipped step stops the run at its epoch's end"})
    quantize: str = option("none", "int8: the student trains on int8 weights and exports an "
                           "int8 ONNX", choices=("none", "int8"), for_teachers=False)
    accumulate: int = option(1, "gradient accumulation: an optimizer step every N batches",
                             rule=_at_least(1), allowed="at least 1 (batches per optimizer step)",
                             for_teachers=False)
    clip_grad_norm: Optional[float] = option(
        None, "clip each optimizer's gradients to this L2 norm",
        rule=lambda v, cfg: v is None or 0 < v < math.inf,
        allowed="null (no clipping) or a positive norm", for_teachers=False,
        accepts={"huge": "a norm no gradient reaches: nothing is clipped"})
    ema_decay: Optional[float] = option(
        None, "e.g. 0.9998: an EMA of the student, evaluated and exported",
        rule=lambda v, cfg: v is None or (0 < v < 1 and cfg.trainer.quantize == "none"),
        allowed="null (no EMA) or a decay in (0, 1), e.g. 0.9998; null with "
                "trainer.quantize=int8 (the int8 export is the trained student's)",
        for_teachers=False)
    label_smoothing: float = option(0.0, "label smoothing of every method's CE term",
                                    rule=lambda v, cfg: 0 <= v < 1, allowed="in [0, 1)",
                                    for_teachers=False, accepts={"0": "no label smoothing"})


@dataclass
class ZooConfig:
    root: str = option("zoo", "the teacher zoo's folder ($DISTILL_ZOO)",
                       rule=lambda v, cfg: v.strip() != "", resumable=True,
                       allowed="a folder (default: zoo, or $DISTILL_ZOO)",
                       accepts={"number": FOLDER, "text": FOLDER})
    publish: bool = option(True, "`distiller=none` runs publish their weights for (dataset, "
                           "model)", resumable=True)


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
    seed: int = option(0, "seeds the models, the data order and the augmentation",
                       rule=lambda v, cfg: 0 <= v <= MAX_SEED,
                       allowed=f"an integer in [0, {MAX_SEED}]", accepts={"0": "seed 0"})
    device: str = option("auto", "auto (the GPU when there is one), cpu, cuda or cuda:N",
                         resumable=True)
    tag: str = option("", "appended to the run directory name, to keep variants apart",
                      accepts={"number": TAG, "text": TAG})
    scale: str = option("full", "full: every method's reference settings; cpu, smoke: the "
                        "smaller settings the expensive methods' YAMLs give for a CPU run and "
                        "for a smoke test (`${distill_scaled:${scale},FULL,CPU,SMOKE}`)",
                        choices=SCALES)
    # Per-pair hyperparameters of the reference configs, by method (experiment files set them,
    # e.g. tuned.dkd.beta); a method's YAML reads its entry, and the command line still wins.
    tuned: Any = field(default_factory=dict)
    run_dir: str = option(MISSING, "the run's folder (default: outputs/<dataset>/<pair>/"
                          "<method>/seed<N>)", accepts={"number": FOLDER, "text": FOLDER})


GROUPS = {"student": StudentConfig, "teacher": TeacherConfig, "optimizer": OptimizerConfig,
          "scheduler": SchedulerConfig, "trainer": TrainerConfig, "zoo": ZooConfig}


@functools.cache
def declared() -> dict[str, tuple[Option, type]]:
    """Every declared option by dotted key -> (its declaration, its type annotation)."""
    options = {}
    for prefix, schema in (("", TrainConfig), *((f"{g}.", s) for g, s in GROUPS.items())):
        hints = typing.get_type_hints(schema)
        for f in fields(schema):
            if "option" in f.metadata:
                options[prefix + f.name] = (f.metadata["option"], hints[f.name])
    return options


def choices_of(key: str) -> tuple[Any, ...]:
    """The declared choices of option `key` (e.g. trainer.data_path)."""
    return declared()[key][0].choices


def resumable_keys() -> tuple[str, ...]:
    return tuple(k for k, (o, _) in declared().items() if o.resumable)


def teacher_run_defaults() -> dict[str, Any]:
    """The options a run that trains a zoo teacher does not take from the command that needs
    it, with the schema's defaults (the recipe's epochs and batch, no early stop, ...)."""
    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig), resolve=False))
    return {k: defaults[k] for k, (o, _) in declared().items() if not o.for_teachers}


def is_float_option(key: str) -> bool:
    """Whether `key` is declared a float (null allowed): what must be finite."""
    entry = declared().get(key)
    return entry is not None and float in (typing.get_args(entry[1]) or (entry[1],))


def option_reference() -> str:
    """docs/options.md: every declared option with its type, default, what it allows and its
    help, generated from the declarations (tools/options.py writes it)."""
    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig), resolve=False))
    lines = ["# Options", "",
             "Generated from the declarations in `distill/config.py` by `python tools/gen_docs.py`;",
             "do not edit. Dataset, distiller and logger options are each choice's YAML file",
             "(`configs/<group>/<name>.yaml`); a method's options are its class's keyword",
             "arguments.", ""]
    group = None
    for key, (opt, kind) in declared().items():
        head = key.split(".")[0] if "." in key else "top level"
        if head != group:
            group = head
            lines += ["", f"## {group}", "", "| key | type | default | allowed | |",
                      "|---|---|---|---|---|"]
        allowed = opt.allowed_text() if not callable(opt.allowed) else "a backend torch lists"
        notes = [opt.help] + (["may change when the run resumes"] if opt.resumable else []) + \
                ([] if opt.for_teachers else ["a zoo teacher's run takes the default"])
        cells = [f"`{key}`", _type_name(kind), f"`{_as_yaml(defaults.get(key))}`", allowed,
                 "; ".join(notes)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _as_yaml(value: Any) -> str:
    """A default as a command line or YAML file writes it."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return '""' if value == "" else str(value)


def _type_name(kind: Any) -> str:
    args = typing.get_args(kind)
    if type(None) in args:   # Optional[X]
        return _type_name(next(a for a in args if a is not type(None))) + " or null"
    return kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")


def check_known_keys(cfg: Any) -> None:
    """Keys added with `+key=value` that the schema does not know (`+trainer.epoch=3`, `+foo=1`)
    get past Hydra; stop them here, naming the key and its close matches, instead of training
    with a typo or failing deep inside a builder."""
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


def digest(text: Any) -> str:
    """12 hex digits naming `text` (`${distill_digest:...}`: a search trial's folder, from its
    parameters, so a continued search never reuses an earlier trial's folder)."""
    return hashlib.sha256(str(text).encode()).hexdigest()[:12]


def sqlite_url(path: str) -> str:
    """`${distill_sqlite:<file>}`: an SQLite URL for an Optuna study file, its folder made
    first (the study is opened before Hydra makes the sweep folder)."""
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


def register_configs() -> None:
    """The schema, the model options and the resolvers that need no method (the run-directory
    and method-list resolvers are distill.catalog's: they know the methods)."""
    for name, resolver in (("distill_digest", digest), ("distill_sqlite", sqlite_url),
                           ("distill_scaled", scaled)):
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
