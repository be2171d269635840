"""Reading a run directory: the one reader of what a finished run leaves behind
(`.hydra/config.yaml`, `summary.json`, `metrics.jsonl`), shared by tools/report.py (which lists
what cannot be counted, with the reason), tools/export.py (which refuses it) and the trainer
(a finished run re-run returns its recorded summary).

`read_run_dir` never raises for what is in the files: each problem is a sentence in the record,
and each tool decides what it may live with (a report skips a smoke run that trainer.max_steps
stopped; an export takes it and says so).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distill.config import flatten

CONFIG_FILE = Path(".hydra") / "config.yaml"
SUMMARY_FILE = "summary.json"
WEIGHTS_FILE = "student.safetensors"
METRICS_FILE = "metrics.jsonl"
# what every run's recorded config names: the rows and columns of a table
NAME_KEYS = ("dataset.name", "teacher.name", "student.name", "distiller.name")


@dataclass(frozen=True)
class RunRecord:
    path: Path
    config: dict[str, Any] | None     # the resolved config the run recorded (nested)
    summary: dict[str, Any] | None    # summary.json
    config_problem: str | None        # why `config` is missing or unusable
    summary_problem: str | None       # why `summary` is missing or unusable

    @property
    def flat_config(self) -> dict[str, Any]:
        return flatten(self.config or {})

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE

    def incomplete(self) -> str | None:
        """Why a run with a summary did not train its whole schedule, or None: stopped early by
        trainer.max_steps, or fewer epochs than trainer.epochs."""
        config, summary = self.flat_config, self.summary or {}
        planned, done = config.get("trainer.epochs"), summary.get("epochs")
        if summary.get("stopped_early"):
            return (f"stopped early (trainer.max_steps={config.get('trainer.max_steps')}) after "
                    f"{done} of {planned} epochs")
        if isinstance(done, (int, float)) and isinstance(planned, (int, float)) and done < planned:
            return f"{done:g} of {planned} epochs done"
        return None

    def finished_problem(self) -> str | None:
        """Why this is not a finished run of its whole schedule (what a table may average)."""
        if self.config_problem:
            return self.config_problem
        if self.summary_problem == f"no {SUMMARY_FILE}":
            epochs = [e for e, _ in self.curve_from_metrics()]
            done = (f"last epoch {epochs[-1]:g} of {self.flat_config.get('trainer.epochs')}"
                    if epochs else "no epoch finished")
            return f"no {SUMMARY_FILE} ({done} in {METRICS_FILE})"
        return self.summary_problem or self.incomplete()

    def curve(self) -> list[tuple[float, float]]:
        """(epoch, val top-1) of the exported model: summary.json's history, else metrics.jsonl."""
        history = (self.summary or {}).get("history")
        curve = [(h["epoch"], h["top1"]) for h in (history if isinstance(history, list) else [])
                 if isinstance(h, dict) and "epoch" in h and "top1" in h]
        return curve or self.curve_from_metrics()

    def curve_from_metrics(self) -> list[tuple[float, float]]:
        """(epoch, val top-1) from the "epoch" events of metrics.jsonl; a resumed run may log an
        epoch twice: the last one wins."""
        points: dict[float, float] = {}
        try:
            with open(self.path / METRICS_FILE) as lines:
                for line in lines:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue   # a line cut short by a kill
                    if (isinstance(event, dict) and event.get("event") == "epoch"
                            and isinstance(event.get("epoch"), (int, float))
                            and "val/top1" in event):
                        points[event["epoch"]] = event["val/top1"]
        except (OSError, ValueError):   # ValueError: not UTF-8
            return []
        return sorted(points.items())


def read_run_dir(path: str | Path) -> RunRecord:
    path = Path(path)
    config, config_problem = _read_config(path)
    summary, summary_problem = _read_summary(path)
    return RunRecord(path, config, summary, config_problem, summary_problem)


def _read_config(path: Path) -> tuple[dict | None, str | None]:
    file = path / CONFIG_FILE
    if not file.is_file():
        return None, f"no {CONFIG_FILE}"
    try:
        config = yaml.safe_load(file.read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError) as exc:   # ValueError: not UTF-8
        return None, f"unreadable {CONFIG_FILE} ({exc.__class__.__name__})"
    if not isinstance(config, dict):
        return None, f"{CONFIG_FILE} is not a mapping"
    flat = flatten(config)
    missing = [k for k in NAME_KEYS if not flat.get(k)]
    if missing:
        return None, f"{CONFIG_FILE} without {', '.join(missing)}"
    return config, None


def _read_summary(path: Path) -> tuple[dict | None, str | None]:
    file = path / SUMMARY_FILE
    if not file.exists():
        return None, f"no {SUMMARY_FILE}"
    try:
        summary = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        return None, f"unreadable {SUMMARY_FILE} ({exc.__class__.__name__})"
    if not isinstance(summary, dict):
        return None, f"{SUMMARY_FILE} is not an object"
    if not all(isinstance(summary.get(k), (int, float)) for k in ("best_top1", "last_top1")):
        return None, f"{SUMMARY_FILE} without best_top1 / last_top1"
    return summary, None
