"""Check group choices on the command line before Hydra composes anything.

Hydra's own error for `student=resnet2` lists every option of the group (hundreds, with the
torchvision models); this names the bad value and its close matches in one short screen.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from hydra.core.config_store import ConfigStore

from distill.errors import ConfigError, unknown_name_error

GROUPS = ("dataset", "teacher", "student", "distiller", "optimizer", "scheduler", "trainer",
          "logger", "experiment", "benchmark")
# Hydra creates these folders before distill runs, so a bad one must be caught here
_OUTPUT_DIR = re.compile(r"^\+{0,2}(?P<key>run_dir|hydra\.(?:run|sweep)\.dir)=(?P<value>.+)$")
_CHOICE = re.compile(r"^\+{0,2}(?P<group>[a-z_]+)=(?P<value>.*)$")


def group_options(group: str, config_dir: Path) -> set[str]:
    folder = config_dir / group
    options = {str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml")}
    stored = ConfigStore.instance().repo.get(group, {})
    options |= {name.removesuffix(".yaml") for name in stored}
    return options


def _values(raw: str) -> list[str]:
    """`a`, `a,b` (multirun sweep), `[a,b]` (several configs of one group), `null`."""
    raw = raw.strip()
    if raw.startswith(("choice(", "range(", "glob(", "interval(")):
        return []  # Hydra sweep functions: leave them to Hydra
    raw = raw.strip("[]")
    return [v.strip().strip("'\"") for v in raw.split(",") if v.strip()]


def check_output_dir(arg: str) -> None:
    """A run or sweep folder that cannot be made (a file on its path) stops here, naming it,
    instead of as a traceback from inside Hydra."""
    match = _OUTPUT_DIR.match(arg)
    if not match or "${" in match["value"]:
        return
    path = Path(match["value"]).expanduser().absolute()
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"cannot write {path}: {parent} is a file, not a folder",
                                  key="run_dir", hint=f"choose another {match['key']}")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"cannot write {path}: {parent} is not writable",
                                  key="run_dir", hint=f"choose another {match['key']}")
            return


def check_overrides(argv: list[str], config_dir: Path) -> None:
    for arg in argv:
        check_output_dir(arg)
        match = _CHOICE.match(arg)
        if not match or match["group"] not in GROUPS:
            continue
        group = match["group"]
        options = group_options(group, config_dir)
        for value in _values(match["value"]):
            if value in ("null", "none") and group in ("experiment", "logger"):
                continue
            if value not in options:
                raise unknown_name_error(group, value, options, key=group)
