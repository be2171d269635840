"""The run directory: is it a run to resume, a different experiment, or old files to set aside?"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from distill.config import schema_defaults
from distill.engine.checkpoint import load_latest_checkpoint
from distill.errors import ConfigError

log = logging.getLogger("distill")

# Settings that may differ when a run is resumed; any other difference is a different experiment.
RESUMABLE_CHANGES = ("trainer.max_steps", "trainer.epochs", "trainer.resume", "trainer.num_workers",
                     "trainer.log_every", "trainer.progress", "trainer.eval_batch_size", "logger",
                     "run_dir", "zoo", "teacher.auto_train", "teacher.auto_train_epochs", "device",
                     "trainer.channels_last",   # memory layout only
                     "world_size",   # the global batch is the same on any number of ranks
                     "trainer.data_path",   # the same augmentation, another random stream
                     "trainer.on_nonfinite",   # e.g. resume a stopped run with skip
                     "tuned")   # per-pair values are compared where they are read: distiller.*
# Where the teachers' weights are: may move, because a checkpoint that records the teachers'
# sha256 (format 2) is checked against the weights themselves.
TEACHER_FILES = ("teacher.checkpoint", "distiller.teacher_checkpoints")
RUN_ARTIFACTS = ("metrics.jsonl", "summary.json", "student.safetensors", "checkpoints", "wandb",
                 ".hydra")


def _default_of(path: str) -> Any:
    return schema_defaults().get(path, object())


def config_differences(old: Any, new: Any, prefix: str = "",
                       allowed: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = []
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}{key}"
            if any(path == k or path.startswith(k + ".") for k in allowed):
                continue
            if key not in old and key in new and _default_of(path) == new[key]:
                continue   # added to the schema after that run was recorded
            diffs += config_differences(old.get(key), new.get(key), path + ".", allowed)
        return diffs
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def check_run_dir(run_dir: Path, config: dict, *, resume: bool,
                  teacherless: bool = False) -> dict | None:
    """Read-only: the checkpoint to resume from (None for a fresh start), refusing a directory
    that holds a different experiment or cannot be written. Called before any work starts.
    A method without a teacher ignores the teacher.* keys (one vanilla run serves every pair,
    e.g. the two mobilenetv2 pairs of benchmark=cifar100)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"   # one per process: DDP ranks check at once
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write to {run_dir}: {exc.strerror}", key="run_dir") from None
    found = load_latest_checkpoint(run_dir) if resume else None
    checkpoint = found[0] if found else None
    if checkpoint is not None:
        allowed = (RESUMABLE_CHANGES + (TEACHER_FILES if checkpoint.get("teachers") is not None
                                        else ()) + (("teacher",) if teacherless else ()))
        diffs = config_differences(checkpoint["config"], config, allowed=allowed)
        if diffs:
            raise ConfigError(
                f"{run_dir} holds a run with a different config:\n  " + "\n  ".join(diffs[:10]),
                key="run_dir",
                hint="choose another run directory (hydra.run.dir=... or tag=...), or pass "
                     "trainer.resume=false to start this one over (the old files are kept "
                     "under previous/)")
    return checkpoint


def start_run_dir(run_dir: Path, config: dict, *, resuming: bool, overrides: list[str],
                  resume_step: int | None = None) -> None:
    """Called once everything is built and checked. A fresh start moves an earlier run's files
    aside instead of mixing old and new metrics; a resumed one (from the checkpoint at
    `resume_step`) drops the events it is about to log again. Then the resolved config is
    recorded in .hydra/ (Hydra's own copy is off, so a refused command never overwrites the
    record of a run)."""
    if resuming and resume_step is not None:
        dropped = trim_metrics(run_dir / "metrics.jsonl", resume_step)
        if dropped:
            log.info("metrics.jsonl: dropped %d events past step %d; they are logged again",
                     dropped, resume_step)
    if not resuming:
        old = [run_dir / name for name in RUN_ARTIFACTS if (run_dir / name).exists()]
        old += list(run_dir.glob("events.out.tfevents.*"))
        if old:
            aside = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
            aside.mkdir(parents=True, exist_ok=True)
            for path in old:
                shutil.move(str(path), aside / path.name)
            log.warning("starting over in %s: the earlier run's files are now in %s", run_dir, aside)
    record = run_dir / ".hydra"
    record.mkdir(exist_ok=True)
    write_text_atomic(record / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    write_text_atomic(record / "overrides.yaml", yaml.safe_dump(list(overrides)))


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file and rename it into place: a kill mid-write leaves the old file
    (or none), never half of one that a later resume or report would trip on."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def trim_metrics(path: Path, step: int) -> int:
    """Drop from metrics.jsonl the events past `step` (the checkpoint a run resumes from): the
    resumed run replays those steps and logs them again, as TensorBoard's purge_step does for
    its event files. A line cut short by a kill goes too. Returns how many lines were dropped."""
    if not path.is_file():
        return 0
    original = path.read_text(encoding="utf-8")
    lines = original.splitlines()
    kept = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("step"), int) and event["step"] > step:
            continue
        kept.append(line)
    text = "".join(line + "\n" for line in kept)
    if text != original:   # also mends a last line with no newline
        write_text_atomic(path, text)
    return len(lines) - len(kept)
