"""A live progress bar (rich) with epoch, step, every loss term, images/s and ETA.

Shown only on an interactive terminal; in logs and CI the per-epoch log line says the same.
WorkProgress is the same bar for work done before training (a data-free method's synthesis),
with log lines of its own: such work may take hours before the first epoch line.
"""
from __future__ import annotations

import io
import logging
import sys
import time

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


LONG_WORK_S = 600   # work estimated to take longer is announced as a warning


def duration(seconds: float) -> str:
    """12 s, 4 min 05 s, 3 h 20 min: a time for a log line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class WorkProgress(ProgressDisplay):
    """`total` units of work before training (`what`: e.g. "deepinversion synthesis"), as a
    live bar when `enabled` on a terminal, and as log lines everywhere: one at each `advance`
    (a finished piece) and one at least every `every_s` seconds of a long piece (`beat`), each
    with the units done, their rate and the time left. Units found done (`found`, e.g. read
    back from the run directory) count as done but not in the rate."""

    def __init__(self, what: str, *, total: int, unit: str = "images", enabled: bool,
                 every_s: float = 30.0, logger: logging.Logger | None = None):
        console = Console(stderr=True)
        self.enabled = enabled and console.is_terminal
        self.progress = None
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.log = logger or logging.getLogger("distill")
        self.done = self.made = 0
        self.estimated = False   # the estimate of the whole is logged once, at the first rate
        self.started = self.last_line = time.perf_counter()
        if self.enabled:
            self.progress = Progress(
                TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(),
                TextColumn(unit), TextColumn("{task.fields[speed]}"), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False)
            self.task = self.progress.add_task(what, total=total, speed="")

    def rate(self, partial: float = 0.0) -> float:
        """Units made per second by this process so far (`partial`: of the piece under way)."""
        return (self.made + partial) / max(time.perf_counter() - self.started, 1e-9)

    def seconds_left(self, partial: float = 0.0) -> float | None:
        rate = self.rate(partial)
        return (self.total - self.done - partial) / rate if rate > 0 else None

    def found(self, count: int) -> None:
        self.done += count
        self._show(0.0)

    def advance(self, count: int, note: str) -> None:
        """`count` units made; logs `note` (which piece) with the counts, rate and time left."""
        self.done += count
        self.made += count
        self._line(note, 0.0)

    def beat(self, partial: float, note: str) -> None:
        """Within a piece: `partial` units' worth of it done; a log line when the last one is
        `every_s` old."""
        if time.perf_counter() - self.last_line >= self.every_s:
            self._line(note, partial)
        else:
            self._show(partial)

    def _line(self, note: str, partial: float) -> None:
        left = self.seconds_left(partial)
        self.log.info("%s: %s; %d/%d %s, %.2f %s/s, %s so far, %s", self.what, note,
                      self.done, self.total, self.unit, self.rate(partial), self.unit,
                      duration(time.perf_counter() - self.started),
                      f"about {duration(left)} left" if left is not None else "time unknown")
        self.last_line = time.perf_counter()
        self._show(partial)
        if not self.estimated and left is not None and self.done + partial < self.total:
            # the first measured rate, with work left: the estimate of the whole
            self.estimated = True
            self.log.log(logging.WARNING if left > LONG_WORK_S else logging.INFO,
                         "%s: at %.2f %s/s, the %d %s to make take about %s (%s left)",
                         self.what, self.rate(partial), self.unit,
                         self.total - self.done + self.made, self.unit,   # found ones aside
                         duration(time.perf_counter() - self.started + left), duration(left))

    def _show(self, partial: float) -> None:
        if self.progress:
            self.progress.update(self.task, completed=self.done + partial,
                                 speed=f"{self.rate(partial):,.2f} {self.unit}/s")
