#!/usr/bin/env python
"""Fill the teacher-output cache ahead of a sweep, so every run of it starts warm.

    python tools/cache_teacher.py dataset=cifar100 teacher=resnet56
    python tools/cache_teacher.py dataset=digits teacher=resnet32 teacher.cache_dtype=float16
    python tools/cache_teacher.py distiller=multi_teacher distiller.teachers=[resnet56,resnet110]

Takes the overrides of tools/train.py and fills the cache that command would read with
teacher.cache=views: the outputs of each of its teachers (found or made as the run would) for
every image it trains on (dataset.train_fraction: its part) in every augmentation view. Prints each cache's size first, then a
progress bar; a cut fill goes on where it stopped. float16 storage also reports what its
rounding does to the KD loss. Exit status: 0 done, 2 bad input (nothing filled).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill import cli_args  # noqa: E402
from distill.cli import print_error  # noqa: E402
from distill.errors import ConfigError  # noqa: E402


def build_parser() -> cli_args.ArgumentParser:
    parser = cli_args.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=cli_args.positive_int, default=512,
                        help="images per teacher forward (default 512)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides of tools/train.py (dataset=, teacher=, distiller=, "
                             "teacher.cache_dtype=, device=, trainer.precision=, ...)")
    return parser


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_checked(argv)
    except SystemExit as exc:   # a refused flag (its error is printed) or --help
        return exc.code
    from hydra import compose, initialize_config_dir

    from distill.app import teacher_cache_jobs
    from distill.config import CONFIG_DIR
    from distill.engine.teacher_cache import ROUNDING_TEMPERATURE, fill_store
    from distill.preflight import check_overrides

    console = Console(stderr=True, highlight=False)
    try:
        check_overrides(args.overrides, CONFIG_DIR)
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=args.overrides)
        jobs, device = teacher_cache_jobs(cfg, args.overrides)
    except ConfigError as exc:
        print_error(exc)
        return 2
    import torch

    for job in jobs:
        store, teacher = job.store, job.teacher
        filled = store.filled()
        views, images = job.transform.view_count, store.rows // job.transform.view_count
        part = (f"; this run's {len(job.items):,} images: {len(job.items) * views:,} rows"
                if len(job.items) < images else "")
        print(f"{teacher.role} {teacher.name} (sha256 {teacher.sha256[:16]}): {images:,} images "
              f"x {views} views x {store.width} outputs, {store.dtype}: {size_text(store.size)} "
              f"when full, at {store.path or 'memory (the zoo folder is not writable)'}; "
              f"{filled:,} of {store.rows:,} rows stored{part}", flush=True)
        start = time.perf_counter()
        with Progress(TextColumn(f"[bold]{teacher.role}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                      console=console, disable=not console.is_terminal) as progress:
            task = progress.add_task("fill", total=len(job.items) * views)
            report = fill_store(store, teacher.model, job.images, job.transform, job.items,
                                batch_size=args.batch_size, device=device,
                                precision=cfg.trainer.precision,
                                memory_format=(torch.channels_last if cfg.trainer.channels_last
                                               else torch.contiguous_format),
                                on_batch=lambda rows: progress.advance(task, rows))
        seconds = time.perf_counter() - start
        print(f"{teacher.role}: {report.computed:,} rows computed in {seconds:.1f} s "
              f"({report.computed / max(seconds, 1e-9):,.0f} rows/s), {report.already:,} were "
              f"stored already", flush=True)
        if store.dtype != "float32" and report.computed:
            print(f"{teacher.role}: {store.dtype} rounding, measured on the {report.computed:,} "
                  f"rows computed now: KD loss (T={ROUNDING_TEMPERATURE:g}) of the exact logits "
                  f"against the stored ones {report.kd_loss_mean:.3g} on average, "
                  f"{report.kd_loss_max:.3g} at most (batch means); largest logit error "
                  f"{report.logit_error_max:.3g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
