"""Command-line values shared by tools/bench.py, tools/report.py and tools/export.py.

Each converter is an argparse `type=`: it returns the value in the form the tool uses, or raises
`argparse.ArgumentTypeError` saying what is wrong and what is allowed. `ArgumentParser` prints
every refusal as one short screen on stderr, `error: --flag: what is wrong`, and exits 2: no
traceback, no usage dump. The checks of output paths leave the file system as it was (a folder
is tried with an empty folder, removed at once), so a refused command changes nothing. Checks
that involve several flags raise `ConfigError` (key = the flag) from a tool's validate step;
`ArgumentParser.parse_checked` reports them the same way.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

from distill.errors import ConfigError, close_matches, unknown_name_error
from distill.folders import folder_problem

Refusal = argparse.ArgumentTypeError


def error(message: str) -> int:
    """Prints the one-screen refusal, `error: ...`, on stderr; returns the exit status, 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def fail(message: str) -> NoReturn:
    """`error(message)`, then exit 2."""
    raise SystemExit(error(message))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-screen errors: `error: --flag: what is wrong` (argparse's own says
    `usage: ...` first and `prog: error: argument --flag: ...` last); unknown flags get close
    matches. Flags are never abbreviated (argparse's default would take `--batch 32` for
    `--batches 32` without a word)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("argument "):        # a bad value: the message names the flag
            fail(message.removeprefix("argument "))
        if message.startswith("unrecognized arguments: "):
            options = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            for token in message.split(": ", 1)[1].split():
                similar = token.startswith("--") and close_matches(token.split("=", 1)[0],
                                                                   options, n=3)
                if similar:
                    message += f"; {token}: did you mean {' or '.join(similar)}?"
        fail(f"{message}\n{self.format_usage().rstrip()}")

    def parse_checked(self, argv: list[str] | None,
                      validate: Callable[[argparse.Namespace], None] | None = None
                      ) -> argparse.Namespace:
        """Parse (each value through its converter), then `validate(args)`, which checks what
        involves several flags and raises ConfigError. Either refusal ends in SystemExit(2)."""
        args = self.parse_args(argv)
        if validate is not None:
            try:
                validate(args)
            except ConfigError as exc:
                fail(exc.render())
        return args


def _refusal(exc: ConfigError) -> Refusal:
    """A ConfigError as an argparse refusal (argparse adds the flag; the key is dropped)."""
    return Refusal("\n".join(filter(None, (exc.message, exc.allowed and f"allowed: {exc.allowed}",
                                           exc.hint))))


# --- values -----------------------------------------------------------------------------------
def non_empty(text: str) -> str:
    if not text.strip():
        raise Refusal(f"expected a value, got {text!r}")
    return text


def positive_int(text: str) -> int:
    """A whole number >= 1 (counts: batch sizes, steps, repeats, threads)."""
    try:
        value = int(text)
    except ValueError:
        raise Refusal(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise Refusal(f"expected a whole number of at least 1, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    """Comma-separated whole numbers >= 1, each once (e.g. `64,128`)."""
    parts = text.split(",")
    if not all(p.strip() for p in parts):
        raise Refusal(f"expected comma-separated whole numbers of at least 1 (e.g. 64,128), "
                      f"got {text!r}")
    values = []
    for part in parts:
        try:
            value = positive_int(part)
        except Refusal as exc:
            raise Refusal(f"{exc} in {text!r}" if len(parts) > 1 else str(exc)) from None
        if value in values:
            raise Refusal(f"{value} is listed twice in {text!r}")
        values.append(value)
    return values


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (nan, inf and 1e999 are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise Refusal(f"expected a finite number of at least 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise Refusal(f"expected a finite number of at least 0, got {text!r}")
    return value


def registered(kind: str, choices: Callable[[], Iterable[str]],
               check: Callable[[str], None] | None = None) -> Callable[[str], str]:
    """A converter for one name of `choices()` (read when the flag is given, so a registry
    is never copied); unknown names list close matches. `check(name)` may raise ConfigError
    for a registered name the tool cannot use."""
    def convert(text: str) -> str:
        name = non_empty(text)
        names = list(choices())
        if name not in names:
            raise _refusal(unknown_name_error(kind, name, names))
        if check is not None:
            try:
                check(name)
            except ConfigError as exc:
                raise _refusal(exc) from None
        return name
    convert.__name__ = kind
    return convert


def registered_list(kind: str, choices: Callable[[], Iterable[str]],
                    check: Callable[[str], None] | None = None) -> Callable[[str], list[str]]:
    """Comma-separated names of `choices()`, each once (see `registered`)."""
    one = registered(kind, choices, check)

    def convert(text: str) -> list[str]:
        parts = text.split(",")
        if not all(p.strip() for p in parts):
            raise Refusal(f"expected comma-separated {kind} names, got {text!r}")
        names = [one(p) for p in parts]
        for name in names:
            if names.count(name) > 1:
                raise Refusal(f"{kind} '{name}' is listed twice in {text!r}")
        return names
    convert.__name__ = f"{kind} list"
    return convert


def device(text: str) -> Any:
    """`auto` (the GPU when there is one), `cpu`, `cuda` or `cuda:N`: a torch.device this
    machine has."""
    import torch  # a tool's flag parser stays light until a device is asked for

    from distill.validation import resolve_device  # imports torch and every method

    try:
        found = resolve_device(non_empty(text))
    except ConfigError as exc:
        raise _refusal(exc) from None
    if found.type not in ("cpu", "cuda"):
        raise Refusal(f"the tools run on cpu or cuda, not {text!r}; allowed: auto, cpu, cuda, "
                      "cuda:N")
    count = torch.cuda.device_count() if found.type == "cuda" else 0
    if found.type == "cuda" and found.index is not None and found.index >= count:
        raise Refusal(f"{text}: this machine has {count} GPU{'s' * (count != 1)}; allowed: auto, "
                      f"cpu, cuda, cuda:0 ... cuda:{count - 1}")
    return found


# --- paths ------------------------------------------------------------------------------------
def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError as exc:   # e.g. a name too long for the file system
        raise Refusal(f"{path}: {exc.strerror or exc}") from None


def existing_dir(text: str) -> Path:
    """A folder that exists."""
    path = Path(non_empty(text))
    if _exists(path) and path.is_dir():
        return path
    raise Refusal(f"{'not a directory' if _exists(path) else 'no such directory'}: {path}")


def output_folder(text: str) -> Path:
    """A folder that is there or can be created (nothing is created here)."""
    path = Path(non_empty(text))
    if _exists(path) and not path.is_dir():
        raise Refusal(f"{path} is a file; expected a folder")
    problem = folder_problem(path)
    if problem:
        raise Refusal(f"cannot create {path}: {problem}")
    return path


def output_file(suffixes: Iterable[str] | Callable[[], Iterable[str]],
                note: Callable[[str], str] | None = None) -> Callable[[str], Path]:
    """A converter for a file to write, named with one of `suffixes` (case-insensitive), in a
    folder that is there or can be created (nothing is created here). `note(suffix)` may add why
    a suffix is missing from the allowed ones."""
    def convert(text: str) -> Path:
        path = Path(non_empty(text))
        if text.endswith(("/", os.sep)) or (_exists(path) and path.is_dir()):
            raise Refusal(f"{path} is a folder; expected a file name")
        allowed = list(suffixes() if callable(suffixes) else suffixes)
        if path.suffix.lower() not in allowed:
            why = (note(path.suffix.lower()) if note else "") or " is not a type written here"
            got = f"file type '{path.suffix}'{why}" if path.suffix else "no file type in the name"
            raise Refusal(f"cannot write {path}: {got}; allowed: {', '.join(allowed)}")
        problem = folder_problem(path.parent)
        if problem:
            raise Refusal(f"cannot write {path}: {problem}")
        return path
    convert.__name__ = "file"
    return convert


def figure_suffixes() -> list[str]:
    """The file types matplotlib can write here (.pgf only where its TeX program is installed)."""
    from matplotlib.figure import Figure

    types = Figure().canvas.get_supported_filetypes()
    return [f".{t}" for t in types if t != "pgf" or shutil.which(_pgf_program())]


def _pgf_program() -> str:
    import matplotlib

    return matplotlib.rcParams["pgf.texsystem"]


def _figure_note(suffix: str) -> str:
    return f" needs {_pgf_program()}, which is not installed" if suffix == ".pgf" else ""


figure_file = output_file(figure_suffixes, _figure_note)
figure_file.__doc__ = "An image file matplotlib can write (see figure_suffixes)."
