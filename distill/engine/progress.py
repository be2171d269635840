"""A live progress bar (rich) with epoch, step, every loss term, images/s and ETA.

Shown only on an interactive terminal; in logs and CI the per-epoch log line says the same.
"""
from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


class ProgressDisplay:
    def __init__(self, *, enabled: bool, total: int, completed: int = 0):
        console = Console(stderr=True)
        self.enabled = enabled and console.is_terminal
        self.progress = None
        if self.enabled:
            self.progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(),
                TextColumn("step"), MofNCompleteColumn(), TextColumn("{task.fields[terms]}"),
                TextColumn("{task.fields[speed]}"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=console, transient=False)
            self.task = self.progress.add_task("train", total=total, completed=completed,
                                               epoch="-", terms="", speed="")

    def __enter__(self) -> "ProgressDisplay":
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()

    def update(self, step: int, *, epoch: int, epochs: int, terms: dict[str, float],
               images_per_sec: float) -> None:
        if not self.progress:
            return
        self.progress.update(self.task, completed=step, epoch=f"{epoch}/{epochs}",
                             terms=" ".join(f"{k} {v:.3f}" for k, v in terms.items()),
                             speed=f"{images_per_sec:,.0f} img/s")
