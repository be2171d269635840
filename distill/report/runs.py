"""Finding and loading runs: every folder at or below the given paths that holds
`.hydra/config.yaml` is a run; each is read by distill.runs and is either a finished `Run` or an
`Unfinished` one with the reason (never averaged in)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.errors import ConfigError
from distill.runs import read_run_dir


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
    record = read_run_dir(path)
    problem = record.finished_problem()
    if problem:
        return Unfinished(path, problem)
    return Run(path, record.flat_config, record.summary, record.curve())


def load_runs(paths: list[str | Path]) -> tuple[list[Run], list[Unfinished]]:
    runs, unfinished = [], []
    for path in find_run_dirs(paths):
        loaded = load_run(path)
        (runs if isinstance(loaded, Run) else unfinished).append(loaded)
    return runs, unfinished
