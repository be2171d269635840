"""Grouping runs into rows: runs whose result-changing config is equal (everything but the
bookkeeping keys in IGNORED_KEYS, and the teachers' weights digests) are seeds of one group;
each group becomes a `Row` with mean and std over seeds and the gain over the vanilla student."""
from __future__ import annotations

import fnmatch
import functools
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from distill.config import CONFIG_DIR, flatten, schema_defaults
from distill.errors import ConfigError
from distill.report.runs import Run
from distill.runs import NAME_KEYS

# Config keys that do not change what a run measures. Runs differing only in these are seeds of
# one experiment; any other key that differs between runs makes a separate row.
IGNORED_KEYS = (
    "seed",                      # what we average over
    "run_dir", "tag",            # names and places: a variant shows up in the keys it changes
    "device",                    # the same training on any device (up to float noise)
    "logger.*", "zoo.*",         # where metrics and teachers are written
    "tuned.*",                   # per-pair values read INTO distiller.* (compared there)
    "teacher.auto_train",        # whether a missing teacher may be trained, not which teacher
    "dataset.root", "dataset.download",   # where the files are, not what they hold
    "trainer.progress", "trainer.resume", "trainer.log_every",   # console, resuming, logging
    "trainer.num_workers",       # loader processes: the same batches
    "trainer.eval_batch_size",   # evaluation in eval mode: batch size does not change top-1
    "trainer.data_path",         # same augmentation, another random stream
    "trainer.compile*",          # torch.compile: same math, other kernels
    "trainer.channels_last",     # memory layout only
    "trainer.on_nonfinite",      # what to do on a NaN step; skipped steps are counted in the run
    "teacher.cache",             # the teacher's outputs stored or computed: the same values
    "world_size",                # ranks (recorded by distill.app): trainer.batch_size is the
                                 # global batch, so 1 GPU and 2 GPUs run the same experiment
)
VANILLA = "none"
METRICS = ("best", "last")
# not a config key: the teachers' weights digests summary.json records, so runs distilled from
# different weights (a teacher retrained, another zoo version) never share a row
TEACHER_DIGESTS = "teacher.sha256"



# --- grouping ---------------------------------------------------------------------------------
def result_config(run: Run) -> dict[str, str]:
    """The keys that change the result, values as canonical strings (hashable, comparable),
    plus the teachers' weights digests (`teacher.sha256`, runs that recorded them). A key
    missing from an older run's config is filled with its schema default (it ran with it), the
    same rule resuming uses. A method without a teacher (vanilla, dml) has its teacher.* keys
    dropped, so one vanilla run serves every pair with that student."""
    defaults = {**schema_defaults(), **method_defaults(run.distiller),
                **dataset_defaults(str(run.config.get("dataset.name")))}
    config = {**{k: v for k, v in defaults.items() if k not in run.config}, **run.config}
    teachers = run.summary.get("teachers")
    if isinstance(teachers, list) and teachers:
        config[TEACHER_DIGESTS] = "+".join(str(t.get("sha256", "?"))[:12] for t in teachers
                                           if isinstance(t, dict))
    teacherless = not has_teacher(run.distiller)
    return {k: format_value(v) for k, v in sorted(config.items())
            if not any(fnmatch.fnmatchcase(k, pattern) for pattern in IGNORED_KEYS)
            and not (teacherless and k.startswith("teacher."))}


@functools.cache
def has_teacher(distiller: str) -> bool:
    """From the method's registry entry; a method this version does not know: unless vanilla."""
    from distill.catalog import DISTILLERS   # imports torch and every method: not at import

    return DISTILLERS.get(distiller).traits.needs_teacher if distiller in DISTILLERS \
        else distiller != VANILLA


def teacher_label(run: Run) -> str | None:
    """The table's teacher of a run: the method's `teacher_label` (e.g. resnet32+resnet20 for
    several teachers), None without a teacher."""
    from distill.catalog import DISTILLERS   # imports torch and every method: not at import
    from distill.method import teacher_label as label_of  # imports torch

    teacher = run.config.get("teacher.name")
    if run.distiller not in DISTILLERS:
        return teacher if has_teacher(run.distiller) else None
    options = {k.removeprefix("distiller."): v for k, v in run.config.items()
               if k.startswith("distiller.")}
    return label_of(DISTILLERS.get(run.distiller), options, teacher)


@functools.cache
def method_defaults(distiller: str) -> dict[str, Any]:
    """distiller.* defaults of configs/distiller/<name>.yaml (literal values only: an
    interpolation depends on the run), to fill options added after an old run was recorded."""
    return _group_defaults("distiller", distiller)


@functools.cache
def dataset_defaults(dataset: str) -> dict[str, Any]:
    """dataset.* defaults of configs/dataset/<name>.yaml, likewise (e.g. student_view, added
    after the first digits runs: those ran without a view, as its null default says)."""
    return _group_defaults("dataset", dataset)


def _group_defaults(group: str, option: str) -> dict[str, Any]:
    try:
        defaults = yaml.safe_load((CONFIG_DIR / group / f"{option}.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(defaults, dict):
        return {}
    defaults = {k: v for k, v in defaults.items() if not str(k).startswith(("#", "defaults"))}
    return {k: v for k, v in flatten({group: defaults}).items()
            if not (isinstance(v, str) and "${" in v)}


def format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(format_value, value)) + "]"
    return str(value)


@dataclass
class Group:
    config: dict[str, str]          # result_config shared by all its runs
    runs: list[Run]
    label: str = ""                 # distiller + the keys that tell apart rows of one pair
    settings: str = ""              # every key that differs between the inputs' runs


def keys_that_differ(configs: list[dict[str, str]], missing_is_a_value: bool) -> set[str]:
    """Keys with more than one value among `configs` (a missing key counting as a value, or not)."""
    keys = {k for c in configs for k in c}
    if missing_is_a_value:
        return {k for k in keys if len({c.get(k) for c in configs}) > 1}
    return {k for k in keys if len({c[k] for c in configs if k in c}) > 1}


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs with equal result_config are seeds of one group (groups in order of first run).

    Each group gets a `label`: the distiller name plus the keys that differ between groups of one
    table cell (same dataset, teacher, student, distiller), e.g. "dkd (beta=2)". A key that
    differs only between pairs (a per-pair tuned value) does not split the row; it is shown in
    `settings` of the detail table, as is every other key that differs anywhere in the inputs.
    distiller.* keys are compared among groups of the same distiller only. Runs of one cell
    distilled from different teacher weights are split by `teacher.sha256`, never averaged.
    """
    by_config: dict[tuple, Group] = {}
    for run in runs:
        config = result_config(run)
        by_config.setdefault(tuple(config.items()), Group(config, [])).runs.append(run)
    groups = list(by_config.values())

    cells: dict[tuple, list[dict]] = defaultdict(list)
    by_distiller: dict[str, list[dict]] = defaultdict(list)
    for g in groups:
        cells[tuple(g.config.get(k) for k in NAME_KEYS)].append(g.config)
        by_distiller[g.config["distiller.name"]].append(g.config)
    splits: dict[str, set[str]] = defaultdict(set)   # distiller -> keys that split its rows
    for cell, configs in cells.items():   # cell[-1]: NAME_KEYS ends with distiller.name
        splits[cell[-1]] |= keys_that_differ(configs, missing_is_a_value=True) - set(NAME_KEYS)
    # a setting outside the distiller (optimizer.lr, ...) that splits one method splits them all
    shared_splits = {k for keys in splits.values() for k in keys if not k.startswith("distiller.")}
    differing = keys_that_differ([g.config for g in groups], missing_is_a_value=False)

    for g in groups:
        name = g.config["distiller.name"]
        own_differing = keys_that_differ(by_distiller[name], missing_is_a_value=False)
        # the teachers' digests differ between pairs anyway: shown only where they split a cell
        shown = [k for k in g.config if k not in NAME_KEYS
                 and (k != TEACHER_DIGESTS or k in shared_splits) and
                 (k in own_differing if k.startswith("distiller.") else k in differing)]
        split = [k for k in g.config if k not in NAME_KEYS and
                 (k in splits[name] if k.startswith("distiller.") else k in shared_splits)]
        g.label = name + (f" ({', '.join(_setting(k, g.config[k]) for k in split)})" if split else "")
        g.settings = ", ".join(_setting(k, g.config[k]) for k in shown)
    return groups


def _setting(key: str, value: str) -> str:
    return f"{key.removeprefix('distiller.')}={value}"


# --- aggregation ------------------------------------------------------------------------------
@dataclass
class Row:
    """One group, summarized: the long-form table's row."""
    dataset: str
    teacher: str | None             # None for vanilla training
    student: str
    distiller: str
    method: str                     # the label
    settings: str
    seeds: list
    best: list[float]               # per seed
    last: list[float]
    teacher_top1: float | None
    student_params: int | None
    num_classes: int | None
    image_size: int | None
    wall_seconds: float | None
    skipped: list[int]              # per seed: steps trainer.on_nonfinite=skip dropped
    curve: list[tuple[float, float]]   # (epoch, mean val top-1 over seeds)
    runs: list[Path]
    config: dict[str, str] = field(repr=False, default_factory=dict)
    gain: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(METRICS))
    flops: int | None = None        # recorded by the run (a derived model); else computed

    @property
    def n(self) -> int:
        return len(self.seeds)

    def mean(self, metric: str) -> float:
        return statistics.fmean(getattr(self, metric))

    def std(self, metric: str) -> float | None:
        """Sample std (ddof=1); None for one seed: there is no spread to show, and 0 would
        claim a precision one run cannot have."""
        values = getattr(self, metric)
        return statistics.stdev(values) if len(values) > 1 else None

    @property
    def skipped_steps(self) -> int:
        return sum(self.skipped)

    @property
    def pair(self) -> str:
        return f"{self.teacher} -> {self.student}" if self.teacher else self.student


def summarize(groups: list[Group]) -> list[Row]:
    rows = []
    for group in groups:
        row = _row(group)
        rows += [row, *_derived_rows(row, group)]
    vanilla = {_baseline_key(r.config): r for r in rows if r.distiller == VANILLA}
    for row in rows:
        base = vanilla.get(_baseline_key(row.config))
        if row.distiller != VANILLA and base is not None:
            row.gain = {m: row.mean(m) - base.mean(m) for m in METRICS}
    return rows


def _baseline_key(config: dict[str, str]) -> tuple:
    """The vanilla run to compare with: same dataset, student and every setting that is not the
    distiller's or the teacher's (recipe, epochs, train_fraction, ...)."""
    return tuple((k, v) for k, v in config.items()
                 if not k.startswith(("distiller.", "teacher.")))


def _mean_of(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.fmean(values) if values else None


def _row(group: Group) -> Row:
    from distill.data import dataset_facts  # imports torch: not at module import

    runs, config = group.runs, group.config
    first = runs[0]
    epochs: dict[float, list[float]] = defaultdict(list)
    for run in runs:
        for epoch, top1 in run.curve:
            epochs[epoch].append(top1)
    dataset_cfg = {k.removeprefix("dataset."): v for k, v in first.config.items()
                   if k.startswith("dataset.")}
    inputs = dataset_facts(dataset_cfg)
    return Row(
        dataset=config["dataset.name"], teacher=teacher_label(first),
        student=config["student.name"], distiller=config["distiller.name"], method=group.label,
        settings=group.settings, seeds=[r.seed for r in runs],
        best=[r.summary["best_top1"] for r in runs], last=[r.summary["last_top1"] for r in runs],
        teacher_top1=_mean_of([r.summary.get("teacher_top1") for r in runs]),
        student_params=first.summary.get("student_params"),
        num_classes=num_classes(first.path, config["student.name"], dataset_cfg),
        image_size=int(inputs.image_size) if inputs.image_size else None,
        wall_seconds=_mean_of([r.summary.get("wall_seconds") for r in runs]),
        skipped=[_count(r.summary.get("skipped_steps")) for r in runs],
        curve=[(e, statistics.fmean(v)) for e, v in sorted(epochs.items())],
        runs=[r.path for r in runs], config=config)


def _derived_rows(row: Row, group: Group) -> list[Row]:
    """A row per model the runs derived from their student (BYOT's early exits: the entries of
    summary.json `models` with recorded FLOPs), named `<method>:<name>` (e.g. byot:exit1), with
    its own top-1, params, FLOPs and curve; compared with the same vanilla student."""
    first = group.runs[0].summary.get("models") or {}
    names = [n for n, e in first.items() if isinstance(e, dict) and "flops" in e]
    rows = []
    for name in names:
        entries = [(r.summary.get("models") or {}).get(name) or {} for r in group.runs]
        if not all(isinstance(e.get("best_top1"), (int, float)) for e in entries):
            continue
        epochs: dict[float, list[float]] = defaultdict(list)
        for run in group.runs:
            for point in run.summary.get("history") or []:
                top1 = ((point.get("models") or {}).get(name) or {}).get("top1")
                if isinstance(top1, (int, float)):
                    epochs[point["epoch"]].append(top1)
        rows.append(replace(row, method=f"{row.method}:{name}",
                            best=[e["best_top1"] for e in entries],
                            last=[e["last_top1"] for e in entries],
                            student_params=entries[0].get("params"), flops=entries[0]["flops"],
                            curve=[(e, statistics.fmean(v)) for e, v in sorted(epochs.items())],
                            gain=dict.fromkeys(METRICS)))
    return rows


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def num_classes(run_dir: Path, student: str, dataset_cfg: dict[str, Any]) -> int | None:
    """Classes of the trained student: the rows of its classifier in student.safetensors (as
    export.class_count reads them, through safetensors), else what the dataset config or the
    dataset registry says; None when nothing tells."""
    from distill.data import dataset_facts  # imports torch: not at module import
    from distill.export import class_count  # imports torch and every method

    try:
        return int(class_count(run_dir / "student.safetensors", student, dataset_cfg))
    except ConfigError:   # no or a damaged file, an unknown model, an unknown dataset
        value = dataset_facts(dataset_cfg).num_classes
        return int(value) if value else None


@functools.cache
def flops(model: str, classes: int | None, image_size: int | None) -> int | None:
    """export.flops_per_image of `model` built for `classes` at `image_size` (one forward pass
    of one image; a multiply-add is 2). None when the model cannot be built or run."""
    if classes is None or image_size is None:
        return None
    try:
        from distill.models import create_model  # imports torch: not at module import
        from distill.models.measure import flops_per_image  # imports torch

        net = create_model(model, num_classes=classes).eval()
        return flops_per_image(net, (3, image_size, image_size))
    except Exception:   # noqa: BLE001 - any failure to build or run: the table shows "?"
        return None


