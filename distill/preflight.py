"""Check group choices on the command line before Hydra composes anything.

Hydra's own error for `student=resnet2` lists every option of the group (hundreds, with the
torchvision models); this names the bad value and its close matches in one short screen.
"""
from __future__ import annotations

import re
from pathlib import Path

from hydra.core.config_store import ConfigStore

from distill.folders import folder_problem
from distill.errors import ConfigError, unknown_name_error

GROUPS = ("dataset", "teacher", "student", "distiller", "optimizer", "scheduler",
          "logger", "experiment", "benchmark")
# Hydra creates these folders before distill runs, so a bad one must be caught here
_OUTPUT_DIR = re.compile(r"^\+{0,2}(?P<key>run_dir|hydra\.(?:run|sweep)\.dir)=(?P<value>.*)$")
_CHOICE = re.compile(r"^\+{0,2}(?P<group>[a-z_]+)=(?P<value>.*)$")
_TAG_ARG = re.compile(r"^\+{0,2}tag=(?P<value>.*)$")
# A tag is one part of one folder name: letters, digits, _ . + - (no separators, no '..')
_TAG = re.compile(r"^\w[\w.+-]{0,99}$")
NAME_MAX = 255   # bytes of one path component (Linux, macOS)
PATH_MAX = 4000  # bytes of a whole path, with room below the OS's 4096 for file names


def check_tag(tag: str) -> None:
    """`tag` goes into the run directory's name: it must stay one folder name inside outputs/."""
    if tag != "" and not (_TAG.match(tag) and ".." not in tag):
        raise ConfigError(f"invalid value {tag!r}", key="tag",
                          allowed="up to 100 letters, digits, '_', '.', '+', '-' (starting with "
                                  "a letter or digit; no '/', no '..'), or empty")


def group_options(group: str, config_dir: Path) -> set[str]:
    folder = config_dir / group
    options = {str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml")}
    stored = ConfigStore.instance().repo.get(group, {})
    options |= {name.removesuffix(".yaml") for name in stored}
    if group in MODEL_GROUPS:   # every registered model, those stored on demand too
        from distill.models import list_models  # imports torch: only for a model group

        options |= set(list_models())
    return options


MODEL_GROUPS = ("teacher", "student")


def register_models_named_in(overrides: list[str]) -> None:
    """Make the models that `teacher=` / `student=` overrides name (sweep lists too) Hydra
    options before a compose: timm's are stored on demand (distill.config.ON_DEMAND_MODELS)."""
    from distill.config import register_model_options  # imports torch: models are named

    names = []
    for arg in overrides:
        match = _CHOICE.match(arg)
        if match and match["group"] in MODEL_GROUPS:
            raw = match["value"].strip()
            if raw.startswith("choice(") and raw.endswith(")"):
                raw = raw[len("choice("):-1]
            names += _values(raw)
    register_model_options(names)


def _values(raw: str) -> list[str]:
    """`a`, `a,b` (multirun sweep), `[a,b]` (several configs of one group), `null`."""
    raw = raw.strip()
    if raw.startswith(("choice(", "range(", "glob(", "interval(")):
        return []  # Hydra sweep functions: leave them to Hydra
    raw = raw.strip("[]")
    return [v.strip().strip("'\"") for v in raw.split(",") if v.strip()]


def check_output_dir(arg: str) -> None:
    """A run or sweep folder that cannot be made (a file on its path, or a nearest existing
    folder that refuses new folders, e.g. /proc) stops here, naming it, instead of as a
    traceback from inside Hydra, which makes the folder before distill sees the config."""
    match = _OUTPUT_DIR.match(arg)
    if not match or "${" in match["value"]:
        return
    if not match["value"].strip():
        raise ConfigError(f"{match['key']} is empty: the run would write into the working "
                          "directory", key="run_dir", allowed="a folder for the run, e.g. outputs/my-run")
    path = Path(match["value"]).expanduser().absolute()
    too_long = next((part for part in path.parts if len(part.encode()) > NAME_MAX), None)
    if too_long is not None or len(str(path).encode()) > PATH_MAX:
        what = (f"the folder name {too_long[:40]!r}... is longer than {NAME_MAX} bytes"
                if too_long else f"the path is longer than {PATH_MAX} bytes")
        raise ConfigError(f"cannot create {str(path)[:80]}...: {what}", key="run_dir",
                          hint=f"choose a shorter {match['key']}")
    problem = folder_problem(path)
    if problem:
        raise ConfigError(f"cannot write {path}: {problem}", key="run_dir",
                          hint=f"choose another {match['key']}")


def check_overrides(argv: list[str], config_dir: Path) -> None:
    for arg in argv:
        check_output_dir(arg)
        tag = _TAG_ARG.match(arg)
        if tag:
            for value in _values(tag["value"]) or [""]:
                check_tag(value)
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
    register_models_named_in(argv)
