#!/usr/bin/env python
"""The offline demo behind `make demo`: on scikit-learn's real handwritten digits, train a
resnet32 teacher on the whole training split (once; it is kept in the teacher zoo), then a resnet8
student on 5% of it, twice: without (distiller=none) and with knowledge distillation
(distiller=kd), and print them side by side.

It runs the same command a user would type, so what you see is what tools/train.py does.
Re-running it resumes: finished runs are not trained again (delete outputs/demo and zoo/ to redo).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
SWEEP_DIR = REPO / "outputs" / "demo"


def main() -> int:
    console = Console()
    command = [sys.executable, "tools/train.py", "-m", "experiment=demo", "distiller=none,kd",
               f"hydra.sweep.dir={SWEEP_DIR}", "hydra.sweep.subdir=${distiller.name}",
               *sys.argv[1:]]
    console.print("[bold]running:[/]", " ".join(["python", *command[1:]]))
    start = time.perf_counter()
    if subprocess.call(command, cwd=REPO) != 0:
        console.print("[bold red]the demo run failed[/] (see the messages above)")
        return 1
    wall = time.perf_counter() - start

    from distill.models import create_model
    from distill.runs import read_run_dir
    from distill.zoo import TeacherZoo

    vanilla, kd = (read_run_dir(SWEEP_DIR / name).summary for name in ("none", "kd"))
    zoo_root = Path(os.environ.get("DISTILL_ZOO", REPO / "zoo"))
    # the version this KD run used (the zoo may hold newer ones)
    teacher = TeacherZoo(zoo_root).find("digits", "resnet32", sha256=kd["teachers"][0]["sha256"])
    teacher_meta = teacher.meta if teacher is not None else {}

    teacher_params = sum(p.numel() for p in create_model("resnet32", num_classes=10).parameters())

    table = Table(title="digits (scikit-learn): teacher trained on 1437 images, students on 72; "
                        "top-1 on the 360 test images")
    for column in ("model", "role", "params", "best top-1 %", "last top-1 %"):
        table.add_column(column, justify="right" if column not in ("model", "role") else "left")
    table.add_row("resnet32", "teacher (all 1437 images)", f"{teacher_params:,}",
                  f"{teacher_meta.get('best_top1', float('nan')):.2f}", f"{kd['teacher_top1']:.2f}")
    table.add_row("resnet8", "vanilla student (CE)", f"{vanilla['student_params']:,}",
                  f"{vanilla['best_top1']:.2f}", f"{vanilla['last_top1']:.2f}")
    table.add_row("resnet8", "KD student (T=4)", f"{kd['student_params']:,}",
                  f"{kd['best_top1']:.2f}", f"{kd['last_top1']:.2f}")
    console.print(table)
    console.print(f"KD - vanilla (last top-1): {kd['last_top1'] - vanilla['last_top1']:+.2f} points; "
                  f"wall time {wall:.0f} s. Runs: {SWEEP_DIR}/none, {SWEEP_DIR}/kd; "
                  f"teacher: {teacher.weights if teacher is not None else 'not in the zoo'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
