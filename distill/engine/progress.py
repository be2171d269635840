"""A live progress bar (rich) with epoch, step, every loss term, images/s and ETA.

Shown only on an interactive terminal; in logs and CI the per-epoch log line says the same.
"""
from __future__ import annotations

import io
import logging
import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


class _AboveTheBar(io.TextIOBase):
    """A stream for logging handlers that prints each record above the live bar."""

    def __init__(self, console: Console):
        self.console = console

    def write(self, text: str) -> int:
        if text.strip():
            self.console.print(text.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)
        return len(text)


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
            # console log handlers (Hydra's) would otherwise write through the bar
            self._swapped = []
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and \
                        getattr(handler, "stream", None) in (sys.__stdout__, sys.__stderr__):
                    self._swapped.append((handler, handler.setStream(_AboveTheBar(
                        self.progress.console))))
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            for handler, stream in self._swapped:
                handler.setStream(stream)
            self.progress.stop()

    def update(self, step: int, *, epoch: int, epochs: int, terms: dict[str, float],
               images_per_sec: float) -> None:
        if not self.progress:
            return
        self.progress.update(self.task, completed=step, epoch=f"{epoch}/{epochs}",
                             terms=" ".join(f"{k} {v:.3f}" for k, v in terms.items()),
                             speed=f"{images_per_sec:,.0f} img/s")
