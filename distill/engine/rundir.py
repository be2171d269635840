"""The run directory: is it a run to resume, a different experiment, or old files to set aside?
Who may write it (one process: `locked`), and what a refused command leaves in it (nothing:
`discard_if_unused`)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from distill import distributed as dist_utils
from distill.checkpoint import load_latest_checkpoint
from distill.config import resumable_keys, schema_defaults
from distill.engine.optim import lr_factor_fn
from distill.errors import ConfigError
from distill.locks import Locked, exclusive

log = logging.getLogger("distill")

# Settings that may differ when a run is resumed (the declared options marked resumable, in
# distill.config, and these); any other difference is a different experiment. `trainer.epochs`
# may grow (never shrink) while the steps already taken keep their learning rate and the
# method does not follow the run's length (check_schedule_change).
RESUMABLE_CHANGES = (*resumable_keys(), "logger", "run_dir",
                     "world_size",   # the global batch is the same on any number of ranks
                     "tuned",   # per-pair values are compared where they are read: distiller.*
                     "data_sha256")   # compared once the data is read (distill.plan)
# Where the teachers' weights are: may move, because a checkpoint that records the teachers'
# sha256 (format 2) is checked against the weights themselves.
TEACHER_FILES = ("teacher.checkpoint", "distiller.teacher_checkpoints")
LOCK_FILE = ".lock"   # held by the process that runs in the directory (distill.locks)
HYDRA_LOG = "train.log"   # Hydra's job log (hydra.job.name in configs/train.yaml)
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


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Held for the whole run: a second process started in the same directory (the same command
    twice, two sweeps over one folder) is refused before it reads or writes anything, naming the
    holder's PID and host. An flock: a killed run never leaves it stuck. Under DDP rank 0 holds
    it for the job and every rank hears whether it got it."""
    with contextlib.ExitStack() as stack:
        holder = None
        if dist_utils.is_main_process():
            try:
                stack.enter_context(exclusive(run_dir / LOCK_FILE, wait=False))
            except Locked as exc:
                holder = exc.holder
            except OSError as exc:
                holder = f"! {exc.strerror or exc}"
        holder = dist_utils.broadcast_object(holder)
        if holder is not None and holder.startswith("! "):
            raise ConfigError(f"cannot write to {run_dir}: {holder[2:]}", key="run_dir")
        if holder is not None:
            raise ConfigError(
                f"{run_dir} is in use by {holder}: one run directory holds one running process",
                key="run_dir",
                hint="wait for that run to end (re-running the command then resumes it), or "
                     "choose another run directory (tag=..., hydra.run.dir=...). The lock dies "
                     "with its process, so a killed run never blocks the directory.")
        yield


# The first missing folder of every run directory this process is about to make (or watched
# Hydra make: distill.cli.NoteNewFolders): a refused command removes what it made, nothing else.
_NEW_FOLDERS: set[Path] = set()


def note_new_folders(path: str | Path) -> None:
    """Call before `path` is created: remembers its first ancestor that does not exist yet, so
    `discard_if_unused` knows which folders this command made."""
    path = Path(path).absolute()
    top = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        top = folder
    if top is not None:
        _NEW_FOLDERS.add(top)


def discard_if_unused(run_dir: Path, *, locked_here: bool = True) -> None:
    """After a refused command: remove the run directory if this command made it and nothing
    but the lock and Hydra's job log is in it (a folder that held a run has its .hydra/ record),
    with the empty folders above it that it made too, so a typo leaves no trace. A folder that
    existed before the command is never removed, nor one another process holds the lock of:
    `locked_here=False` (refused before taking it) takes it first, or leaves the folder."""
    run_dir = run_dir.absolute()
    top = next((t for t in _NEW_FOLDERS if t == run_dir or t in run_dir.parents), None)
    if top is None or not run_dir.is_dir():
        return
    if not locked_here:
        try:
            with exclusive(run_dir / LOCK_FILE, wait=False):
                discard_if_unused(run_dir)
        except (Locked, OSError):
            pass
        return
    try:
        if {p.name for p in run_dir.iterdir()} - {LOCK_FILE, HYDRA_LOG}:
            return
        _close_file_logs(run_dir)
        (run_dir / HYDRA_LOG).unlink(missing_ok=True)
        (run_dir / LOCK_FILE).unlink(missing_ok=True)   # still held: released when the run ends
        folder = run_dir
        while True:
            folder.rmdir()   # OSError once a folder holds something else
            if folder == top:
                _NEW_FOLDERS.discard(top)
                return
            folder = folder.parent
    except OSError:   # not empty (another job's files), or gone
        return


def _close_file_logs(folder: Path) -> None:
    """Detach the logging handlers that write into `folder` (Hydra's job log) before it goes:
    a later record would recreate the file, or fail on the missing folder."""
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    for logger in loggers:
        for handler in list(logger.handlers):
            path = getattr(handler, "baseFilename", None)
            if path is not None and Path(path).parent == folder:
                logger.removeHandler(handler)
                handler.close()


def check_schedule_change(old: dict, new: dict, *, steps_taken: int, steps_per_epoch: int,
                          follows_run_length: bool) -> None:
    """A resumed run may lengthen its schedule (`trainer.epochs` up), never shorten it: a shorter
    one would be declared finished (and published) at a point the recorded schedule never
    ended. Lengthening is refused too when the steps already taken would have had another
    learning rate (cosine over more epochs) or the method follows the run's length."""
    before, after = old["trainer"]["epochs"], new["trainer"]["epochs"]
    if after == before:
        return
    hint = ("resume with trainer.epochs=" + str(before) + ", or start over with "
            "trainer.resume=false (the old files go under previous/), or use another run "
            "directory (tag=...)")
    if after < before:
        raise ConfigError(f"the run in this directory was started for {before} epochs; a "
                          f"resumed run may extend its schedule, not shorten it to {after}",
                          key="trainer.epochs", hint=hint)
    old_lr = lr_factor_fn(epochs=before, steps_per_epoch=steps_per_epoch, **old["scheduler"])
    new_lr = lr_factor_fn(epochs=after, steps_per_epoch=steps_per_epoch, **new["scheduler"])
    changed = next((s for s in range(steps_taken + 1) if old_lr(s) != new_lr(s)), None)
    if changed is not None or follows_run_length:
        why = (f"the {new['scheduler']['name']} schedule over {after} epochs gives step "
               f"{changed} another learning rate than the one it trained with"
               if changed is not None else
               f"distiller '{new['distiller']['name']}' follows the run's length")
        raise ConfigError(f"cannot extend this run from {before} to {after} epochs: {why}",
                          key="trainer.epochs", hint=hint)


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
