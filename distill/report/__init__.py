"""Benchmark tables from finished runs (`python tools/report.py DIR [DIR ...]`).

Each DIR is a run directory or a sweep folder: every folder below it that holds
`.hydra/config.yaml` is a run. Runs are grouped by what changes their result (the config minus
the bookkeeping keys in IGNORED_KEYS, plus the teachers' weights digests), and each group is
averaged over its seeds. A run that did not finish (no summary.json, stopped by
trainer.max_steps, fewer epochs than trainer.epochs) is listed apart with the reason and never
averaged in: a half-trained student would drag a mean down and look like a worse method.

One module per step of the work:
    runs     load_runs(paths)         -> finished runs + unfinished ones (path, reason)
    group    group_runs(runs)         -> groups of runs that differ only in seed (and bookkeeping)
             summarize(groups)        -> one Row per group: mean/std over seeds, gain over vanilla
    render   render_markdown, write_csv
    plot     plot_rows
Everything is a pure function of the files read, except `flops`, which builds the model.
"""
from distill.report.group import (
    IGNORED_KEYS, METRICS, TEACHER_DIGESTS, VANILLA, Group, Row, flops, format_value,
    group_runs, has_teacher, keys_that_differ, method_defaults, num_classes, result_config,
    summarize, teacher_label)
from distill.report.plot import plot_rows
from distill.report.render import (
    CSV_COLUMNS, cell, csv_record, in_column, method_order, pairs,
    render_markdown, write_csv, writing)
from distill.report.runs import Run, Unfinished, find_run_dirs, load_run, load_runs

__all__ = ["CSV_COLUMNS", "IGNORED_KEYS", "METRICS", "TEACHER_DIGESTS", "VANILLA", "Group",
           "Row", "Run", "Unfinished", "cell", "csv_record", "find_run_dirs",
           "flops", "format_value", "group_runs", "has_teacher", "in_column", "keys_that_differ",
           "load_run", "load_runs", "method_defaults", "method_order", "num_classes", "pairs",
           "plot_rows", "render_markdown", "result_config", "summarize", "teacher_label",
           "write_csv", "writing"]
