"""Exclusive locks between processes, for the zoo (one run trains a missing teacher, the others
wait for it) and run directories.

`fcntl.flock` locks belong to the open file: the OS releases them when the holder exits, also on
kill -9, so a dead run never leaves a lock stuck. The holder writes its PID and host into the
lock file, so whoever has to wait (or is refused) can say who holds it.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("distill")


class Locked(Exception):
    """The lock is held by another process (`holder`: its "pid P on host H", when known)."""

    def __init__(self, path: Path, holder: str):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is locked by {holder}")


def holder_of(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


@contextlib.contextmanager
def exclusive(path: str | Path, *, wait: bool = True, what: str = "") -> Iterator[None]:
    """Hold an exclusive lock on `path` for the `with` block. `wait=False` raises Locked when
    another process holds it; `wait=True` blocks, logging who holds it and `what` it does."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_of(path)
            if not wait:
                raise Locked(path, holder) from None
            log.info("waiting for %s, which %s", holder, what or f"holds {path}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
