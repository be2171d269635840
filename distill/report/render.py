"""The table as markdown and CSV: one table per dataset (a row per method, a column per pair),
then every group in detail, then what was skipped or not finished."""
from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import Any

from distill.errors import ConfigError
from distill.report.group import Row, flops
from distill.report.runs import Unfinished

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
    """The published CIFAR-100 table's order, so rows of ours line up with it: each method's
    registration says its row (`table_row`: vanilla first as the baseline, then the CRD paper's
    Table 1, which RepDistiller's and mdistiller's tables follow, then the later methods as the
    DKD paper and the logit-standardization README list them); methods it does not have follow,
    in the order the sweeps ran them."""
    from distill.catalog import DISTILLERS   # imports torch and every method: not at import

    labels = list(dict.fromkeys(r.method for r in rows))

    def rank(label: str) -> float:
        name = label.split(" ")[0]
        row = DISTILLERS.meta(name).get("table_row") if name in DISTILLERS else None
        return row if row is not None else float("inf")

    return sorted(labels, key=rank)


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
            _si(r.student_params),
            _si(r.flops if r.flops is not None else flops(r.student, r.num_classes, r.image_size)),
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
            "flops": blank(row.flops if row.flops is not None
                           else flops(row.student, row.num_classes, row.image_size)),
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


def write_csv(rows: list[Row], path: str | Path, option: str = "--csv") -> None:
    with writing(path, option) as target, open(target, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_record(r) for r in rows)


