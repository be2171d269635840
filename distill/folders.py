"""Whether an output folder can be made: one check for the training command (before Hydra
makes its folders), validation (the zoo root) and the tools' path arguments."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def folder_problem(folder: Path, *, write: bool = True) -> str | None:
    """Why `folder` (made with its missing parents) could not be used, or None: a file on its
    path, or (`write`) the nearest folder that exists refusing a new folder. That folder is
    asked by making an empty folder in it and removing it again: os.access answers yes to root
    everywhere, /proc and read-only mounts included. Leaves the file system as it was."""
    for parent in (folder, *folder.parents):
        try:
            found = parent.exists()
        except OSError as exc:   # e.g. a name too long for the file system
            return f"{parent}: {exc.strerror or exc}"
        if not found:
            continue
        if not parent.is_dir():
            return f"{parent} is a file, not a folder"
        if write:
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".distill-write-test-", dir=parent))
            except OSError as exc:
                return (f"{parent} is not writable: a new folder in it fails with "
                        f"'{exc.strerror or exc}'")
        return None
    return None
