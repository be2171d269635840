"""Benchmark tables from finished runs (`python tools/report.py DIR [DIR ...]`).

Each DIR is a run directory or a sweep folder: every folder below it that holds
`.hydra/config.yaml` is a run. Runs are grouped by what changes their result (the config minus
the bookkeeping keys in IGNORED_KEYS), and each group is averaged over its seeds. A run that did
not finish (no summary.json, stopped by trainer.max_steps, fewer epochs than trainer.epochs) is
listed apart with the reason and never averaged in: a half-trained student would drag a mean down
and look like a worse method.

The order of the work, one function each:
    load_runs(paths)          -> finished runs + unfinished ones (path, reason)
    group_runs(runs)          -> groups of runs that differ only in seed (and bookkeeping)
    summarize(groups)         -> one Row per group: mean/std over seeds, gain over vanilla, ...
    render_markdown / write_csv / plot_rows
Everything is a pure function of the files read, except `flops`, which builds the model.
Per-dataset facts (class count, image size) come from distill.export's DATASET_INPUTS, FLOPs
from distill.export.flops_per_image: one definition of each for both tools.
"""
from __future__ import annotations

import contextlib
import csv
import fnmatch
import functools
import json
import os
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill.config import flatten, schema_defaults
from distill.errors import ConfigError

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
    "world_size",                # ranks (recorded by distill.app): trainer.batch_size is the
                                 # global batch, so 1 GPU and 2 GPUs run the same experiment
)
# Identity keys: the table's rows and columns, not "settings".
NAME_KEYS = ("dataset.name", "teacher.name", "student.name", "distiller.name")
VANILLA = "none"
METRICS = ("best", "last")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


# --- loading ----------------------------------------------------------------------------------
@dataclass
class Run:
    """One finished run: its flattened config, its summary.json and its val top-1 curve."""
    path: Path
    config: dict[str, Any]              # dotted keys, e.g. "distiller.beta"
    summary: dict[str, Any]
    curve: list[tuple[float, float]]    # (epoch, val top-1)

    @property
    def distiller(self) -> str:
        return self.config["distiller.name"]

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


@dataclass
class Unfinished:
    path: Path
    reason: str


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Every run directory at or below `paths`, in input order, sweep jobs in numeric order
    (so job 10 comes after job 9). Raises ConfigError for a path that does not exist and when
    nothing is found."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            what = "not a directory" if path.exists() else "no such directory"
            raise ConfigError(f"{what}: {path}")
        below = []
        for folder, subdirs, _ in os.walk(path):
            if os.path.isfile(os.path.join(folder, ".hydra", "config.yaml")):
                below.append(Path(folder))
                # a run never holds another run; what looks like one below it is an earlier
                # run set aside by trainer.resume=false (RUN/previous/<time>/): not counted
                subdirs[:] = []
            subdirs[:] = [d for d in subdirs if d not in ("checkpoints", "wandb", ".hydra")]
        found += [p for p in sorted(below, key=_natural_key) if p.resolve() not in
                  {f.resolve() for f in found}]
    if not found:
        raise ConfigError("no run directories (folders with .hydra/config.yaml) under "
                          + ", ".join(map(str, paths)))
    return found


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def load_run(path: Path) -> Run | Unfinished:
    """The run in `path`, or why it cannot be counted."""
    try:
        config = flatten(yaml.safe_load((path / ".hydra" / "config.yaml").read_text()) or {})
    except (OSError, ValueError, yaml.YAMLError) as exc:   # ValueError: not UTF-8
        return Unfinished(path, f"unreadable .hydra/config.yaml ({exc.__class__.__name__})")
    missing = [k for k in NAME_KEYS if not config.get(k)]
    if missing:
        return Unfinished(path, f".hydra/config.yaml without {', '.join(missing)}")
    planned = config.get("trainer.epochs")
    summary_file = path / "summary.json"
    if not summary_file.exists():
        epochs = [e for e, _ in curve_from_metrics(path)]
        done = f"last epoch {epochs[-1]:g} of {planned}" if epochs else "no epoch finished"
        return Unfinished(path, f"no summary.json ({done} in metrics.jsonl)")
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError) as exc:
        return Unfinished(path, f"unreadable summary.json ({exc.__class__.__name__})")
    if not isinstance(summary, dict):
        return Unfinished(path, "summary.json is not an object")
    if not all(isinstance(summary.get(k), (int, float)) for k in ("best_top1", "last_top1")):
        return Unfinished(path, "summary.json without best_top1 / last_top1")
    done = summary.get("epochs")
    if summary.get("stopped_early"):
        return Unfinished(path, f"stopped early (trainer.max_steps={config.get('trainer.max_steps')})"
                                f" after {done} of {planned} epochs")
    if isinstance(done, (int, float)) and isinstance(planned, (int, float)) and done < planned:
        return Unfinished(path, f"{done:g} of {planned} epochs done")
    history = summary.get("history")
    curve = [(h["epoch"], h["top1"]) for h in (history if isinstance(history, list) else [])
             if isinstance(h, dict) and "epoch" in h and "top1" in h]
    return Run(path, config, summary, curve or curve_from_metrics(path))


def curve_from_metrics(path: Path) -> list[tuple[float, float]]:
    """(epoch, val top-1) from the "epoch" events of metrics.jsonl; a resumed run may log an
    epoch twice: the last one wins."""
    points: dict[float, float] = {}
    try:
        with open(path / "metrics.jsonl") as lines:
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue   # a line cut short by a kill
                if (isinstance(event, dict) and event.get("event") == "epoch"
                        and isinstance(event.get("epoch"), (int, float)) and "val/top1" in event):
                    points[event["epoch"]] = event["val/top1"]
    except (OSError, ValueError):   # ValueError: not UTF-8
        return []
    return sorted(points.items())


def load_runs(paths: list[str | Path]) -> tuple[list[Run], list[Unfinished]]:
    runs, unfinished = [], []
    for path in find_run_dirs(paths):
        loaded = load_run(path)
        (runs if isinstance(loaded, Run) else unfinished).append(loaded)
    return runs, unfinished


# --- grouping ---------------------------------------------------------------------------------
def result_config(run: Run) -> dict[str, str]:
    """The keys that change the result, values as canonical strings (hashable, comparable).
    A key missing from an older run's config is filled with its schema default (it ran with it),
    the same rule resuming uses. Vanilla training has no teacher: its teacher.* keys are dropped,
    so one vanilla run serves every pair with that student."""
    # private, but the one place the schema defaults are computed (the rule resuming uses)

    defaults = {**schema_defaults(), **method_defaults(run.distiller)}
    config = {**{k: v for k, v in defaults.items() if k not in run.config}, **run.config}
    return {k: format_value(v) for k, v in sorted(config.items())
            if not any(fnmatch.fnmatchcase(k, pattern) for pattern in IGNORED_KEYS)
            and not (run.distiller == VANILLA and k.startswith("teacher."))}


@functools.cache
def method_defaults(distiller: str) -> dict[str, Any]:
    """distiller.* defaults of configs/distiller/<name>.yaml (literal values only: an
    interpolation depends on the run), to fill options added after an old run was recorded."""
    try:
        defaults = yaml.safe_load((CONFIG_DIR / "distiller" / f"{distiller}.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return {k: v for k, v in flatten({"distiller": defaults or {}}).items()
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
    distiller.* keys are compared among groups of the same distiller only.
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
        shown = [k for k in g.config if k not in NAME_KEYS and
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
    rows = [_row(g) for g in groups]
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
    from distill.export import dataset_inputs  # imports torch: not at module import

    runs, config = group.runs, group.config
    first = runs[0]
    epochs: dict[float, list[float]] = defaultdict(list)
    for run in runs:
        for epoch, top1 in run.curve:
            epochs[epoch].append(top1)
    dataset_cfg = {k.removeprefix("dataset."): v for k, v in first.config.items()
                   if k.startswith("dataset.")}
    inputs = dataset_inputs(dataset_cfg)
    return Row(
        dataset=config["dataset.name"], teacher=config.get("teacher.name"),
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


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def num_classes(run_dir: Path, student: str, dataset_cfg: dict[str, Any]) -> int | None:
    """Classes of the trained student: the rows of its classifier in student.safetensors (as
    export.class_count reads them, through safetensors), else what the dataset config or
    DATASET_INPUTS says; None when nothing tells."""
    from distill.export import class_count, dataset_inputs

    try:
        return int(class_count(run_dir / "student.safetensors", student, dataset_cfg))
    except ConfigError:   # no or a damaged file, an unknown model, an unknown dataset
        value = dataset_inputs(dataset_cfg).num_classes
        return int(value) if value else None


@functools.cache
def flops(model: str, classes: int | None, image_size: int | None) -> int | None:
    """export.flops_per_image of `model` built for `classes` at `image_size` (one forward pass
    of one image; a multiply-add is 2). None when the model cannot be built or run."""
    if classes is None or image_size is None:
        return None
    try:
        from distill.export import flops_per_image
        from distill.models import create_model

        net = create_model(model, num_classes=classes).eval()
        return flops_per_image(net, (3, image_size, image_size))
    except Exception:   # noqa: BLE001 - any failure to build or run: the table shows "?"
        return None


# --- rendering --------------------------------------------------------------------------------
def cell(row: Row, metric: str, with_gain: bool = True) -> str:
    """"93.89 ± 0.56 (3) +7.22": mean ± std over seeds, (seeds), gain over vanilla."""
    std = row.std(metric)
    text = f"{row.mean(metric):.2f}" + (f" ± {std:.2f}" if std is not None else "") + f" ({row.n})"
    gain = row.gain[metric]
    return text + (f" {gain:+.2f}" if with_gain and gain is not None else "")


def _si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "?"
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{prefix}{unit}"
    return f"{value:g}{unit}"


def _minutes(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds / 60:.1f} min"


def pairs(rows: list[Row]) -> list[tuple[str, str | None, str]]:
    """Table columns: (dataset, teacher, student) in order of appearance; a student trained only
    without a teacher gets a column of its own."""
    found = list(dict.fromkeys((r.dataset, r.teacher, r.student) for r in rows if r.teacher))
    students = {(d, s) for d, _, s in found}
    found += list(dict.fromkeys((r.dataset, None, r.student) for r in rows
                                if not r.teacher and (r.dataset, r.student) not in students))
    return found


def in_column(row: Row, column: tuple[str, str | None, str]) -> bool:
    dataset, teacher, student = column
    return (row.dataset, row.student) == (dataset, student) and row.teacher in (teacher, None)


def method_order(rows: list[Row]) -> list[str]:
    """Vanilla first (it is the baseline), then methods in the order the sweeps ran them."""
    labels = list(dict.fromkeys(r.method for r in rows))
    return sorted(labels, key=lambda m: m.split(" ")[0] != VANILLA)


def render_markdown(rows: list[Row], unfinished: list[Unfinished], metric: str = "last") -> str:
    out: list[str] = []
    for dataset in dict.fromkeys(r.dataset for r in rows):
        these = [r for r in rows if r.dataset == dataset]
        columns = pairs(these)
        out += [f"### {dataset}: {metric} top-1 (%)", "",
                (f"mean ± std over seeds (number of seeds), then the gain over the vanilla "
                 f"student (distiller=none, same settings) in {metric} top-1 points."), "",
                "| method | " + " | ".join(_column_name(c) for c in columns) + " |",
                "|---" * (len(columns) + 1) + "|",
                "| teacher | " + " | ".join(_teacher_cell(these, c) for c in columns) + " |"]
        for method in method_order(these):
            cells = []
            for column in columns:
                found = [r for r in these if r.method == method and in_column(r, column)]
                cells.append(" / ".join(cell(r, metric) for r in found))
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        if any(" to " in _teacher_cell(these, c) for c in columns):
            out += ["", ("teacher: a range where runs report different teachers' top-1 (TAKD "
                         "reports its last assistant's); each group's is in the table below.")]
        out.append("")

    out += [f"### All groups ({metric} top-1 decides the gain)", "",
            ("| dataset | teacher | student | method | settings | n | best top-1 | last top-1 "
             "| gain | teacher top-1 | student params | FLOPs | wall (mean) | skipped steps |"),
            "|---" * 14 + "|"]
    for r in rows:
        gain = r.gain[metric]
        out.append("| " + " | ".join([
            r.dataset, r.teacher or "", r.student, r.method, r.settings, str(r.n),
            cell(r, "best", with_gain=False), cell(r, "last", with_gain=False),
            "" if gain is None else f"{gain:+.2f}",
            "" if r.teacher_top1 is None else f"{r.teacher_top1:.2f}",
            _si(r.student_params), _si(flops(r.student, r.num_classes, r.image_size)),
            _minutes(r.wall_seconds), str(r.skipped_steps) if r.skipped_steps else ""]) + " |")
    out += ["", ("std: sample std over seeds (none shown for one seed); FLOPs: one forward pass "
                 "of one image at the dataset's size, as torch.utils.flop_counter counts them (a "
                 "multiply-add is 2); wall: mean over seeds; skipped steps: total over seeds."), ""]
    skipping = [r for r in rows if r.skipped_steps]
    if skipping:
        which = "; ".join(f"{r.method} {r.pair}: {r.skipped_steps} step"
                          f"{'s' * (r.skipped_steps != 1)} in {sum(1 for k in r.skipped if k)} "
                          f"of {r.n} run{'s' * (r.n != 1)}" for r in skipping)
        out += [("Skipped steps: trainer.on_nonfinite=skip dropped the optimizer steps whose "
                 "loss was not finite, so these runs took fewer steps than planned (averaged in "
                 f"all the same): {which}."), ""]
    repeated = [(r, seed) for r in rows for seed in dict.fromkeys(r.seeds) if r.seeds.count(seed) > 1]
    if repeated:
        out += ["Repeated seeds (the same config and seed run more than once; each run counts): "
                + "; ".join(f"{r.method} {r.pair} seed {seed}: "
                            + ", ".join(f"`{p}`" for p, s in zip(r.runs, r.seeds) if s == seed)
                            for r, seed in repeated), ""]
    if unfinished:
        out += ["### Unfinished runs (not averaged in)", ""]
        out += [f"- `{u.path}`: {u.reason}" for u in unfinished]
        out.append("")
    return "\n".join(out)


def _column_name(column: tuple[str, str | None, str]) -> str:
    _, teacher, student = column
    return f"{teacher} -> {student}" if teacher else f"{student} (no teacher)"


def _teacher_cell(rows: list[Row], column: tuple) -> str:
    """The teacher's top-1 as the runs report it. TAKD reports its last assistant's, so a column
    can hold two values: shown as a range rather than averaged into one."""
    values = sorted({round(r.teacher_top1, 2) for r in rows
                     if r.teacher and in_column(r, column) and r.teacher_top1 is not None})
    return "" if not values else " to ".join(f"{v:.2f}" for v in dict.fromkeys([values[0], values[-1]]))


CSV_COLUMNS = ("dataset", "teacher", "student", "distiller", "method", "settings", "n", "seeds",
               "best_mean", "best_std", "last_mean", "last_std", "gain_best", "gain_last",
               "teacher_top1", "student_params", "flops", "num_classes", "image_size",
               "wall_seconds", "skipped_steps", "runs")


def csv_record(row: Row) -> dict[str, Any]:
    """The long-form row: full precision, "" where there is no value."""
    def blank(v: Any) -> Any:
        return "" if v is None else v
    return {"dataset": row.dataset, "teacher": blank(row.teacher), "student": row.student,
            "distiller": row.distiller, "method": row.method, "settings": row.settings,
            "n": row.n, "seeds": " ".join(map(str, row.seeds)),
            "best_mean": row.mean("best"), "best_std": blank(row.std("best")),
            "last_mean": row.mean("last"), "last_std": blank(row.std("last")),
            "gain_best": blank(row.gain["best"]), "gain_last": blank(row.gain["last"]),
            "teacher_top1": blank(row.teacher_top1), "student_params": blank(row.student_params),
            "flops": blank(flops(row.student, row.num_classes, row.image_size)),
            "num_classes": blank(row.num_classes), "image_size": blank(row.image_size),
            "wall_seconds": blank(row.wall_seconds), "skipped_steps": row.skipped_steps,
            "runs": " ".join(map(str, row.runs))}


@contextlib.contextmanager
def writing(path: str | Path, option: str):
    """Creates `path`'s folder; an OSError while writing `path` becomes one ConfigError naming
    the command-line `option` and why, e.g. a folder on the way that is a regular file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield path
    except OSError as exc:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        why = (f"{blocker} is a file, not a folder" if blocker is not None
               else f"{path} is a folder" if path.is_dir() else exc.strerror or str(exc))
        raise ConfigError(f"cannot write {path}: {why}", key=option) from None


def check_writable(path: str | Path, option: str) -> None:
    """Before any output is written: a ConfigError when `path` cannot be written (its folder
    cannot be created, or it is a folder)."""
    with writing(path, option) as target:
        if target.is_dir():
            raise IsADirectoryError(target)


def write_csv(rows: list[Row], path: str | Path, option: str = "--csv") -> None:
    with writing(path, option) as target, open(target, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_record(r) for r in rows)


def plot_rows(rows: list[Row], path: str | Path, metric: str = "last",
              option: str = "--plot") -> None:
    """A PNG: top, grouped bars of mean top-1 with std error bars (a group per pair); below,
    one panel per pair with each method's val top-1 curve (mean over seeds)."""
    import matplotlib
    matplotlib.use("Agg")   # files only: no display needed
    import matplotlib.pyplot as plt

    columns = [(c, [r for r in rows if in_column(r, c)]) for c in pairs(rows)]
    methods = method_order(rows)
    colour = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    per_row = min(3, len(columns))
    curve_rows = -(-len(columns) // per_row)
    fig = plt.figure(figsize=(max(8.0, 4.0 * per_row), 4.0 + 3.5 * curve_rows))
    grid = fig.add_gridspec(1 + curve_rows, per_row, height_ratios=[1.2] + [1] * curve_rows)

    bars = fig.add_subplot(grid[0, :])
    width = 0.8 / max(1, max(len(rs) for _, rs in columns))
    lows = []
    for x, (column, members) in enumerate(columns):
        members = sorted(members, key=lambda r: methods.index(r.method))
        for i, r in enumerate(members):
            mean, std = r.mean(metric), r.std(metric) or 0.0
            lows.append(mean - std)
            bars.bar(x - 0.4 + width * (i + 0.5), mean, width, yerr=std, capsize=3,
                     color=colour[r.method], label=r.method)
    handles = dict(zip(*reversed(bars.get_legend_handles_labels())))   # one entry per method
    bars.legend(handles.values(), handles.keys(), fontsize="small", loc="upper left",
                bbox_to_anchor=(1.0, 1.0))
    several_datasets = len({c[0] for c, _ in columns}) > 1
    bars.set_xticks(range(len(columns)), [(f"{c[0]}: " if several_datasets else "")
                                          + _column_name(c) for c, _ in columns])
    bars.set_ylim(max(0.0, min(lows) - 5), 100)
    bars.set_ylabel(f"{metric} top-1 (%)")
    bars.set_title(f"{metric} top-1, mean ± std over seeds")

    for i, (column, members) in enumerate(columns):
        ax = fig.add_subplot(grid[1 + i // per_row, i % per_row])
        for r in sorted(members, key=lambda r: methods.index(r.method)):
            if r.curve:
                ax.plot(*zip(*r.curve), color=colour[r.method], label=r.method, linewidth=1.2)
        ax.set_title(f"{column[0]}: {_column_name(column)}", fontsize="medium")
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with writing(path, option) as target:
            fig.savefig(target, dpi=100)
    finally:
        plt.close(fig)
