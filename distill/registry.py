"""One Registry type for every pluggable thing: models, datasets, distillers, trackers.

    MODELS = Registry("model")

    @MODELS.register()            # key = function/class name
    def resnet20(num_classes=100): ...

    MODELS.build("resnet20", num_classes=10)
    MODELS.list("resnet*")        # fnmatch wildcards, sorted

Unknown names raise ConfigError listing close matches, so a typo on the command line is a
one-line fix for the user, not a KeyError traceback.
"""
from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from distill.errors import ConfigError, close_matches, unknown_name_error


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str | None = None, **meta: Any) -> Callable:
        """Decorator: register a class or factory under `name` (default: its __name__).

        `meta` is free-form per-entry information (e.g. a model's feature layers).
        """

        def decorator(obj: Callable) -> Callable:
            self.add(name or obj.__name__, obj, **meta)
            return obj

        return decorator

    def add(self, name: str, obj: Callable, **meta: Any) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = obj
        self._meta[name] = meta

    def get(self, name: str, *, key: str | None = None) -> Callable:
        try:
            return self._entries[name]
        except KeyError:
            raise unknown_name_error(self.kind, name, self.list(), key=key) from None

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def build(self, name: str, /, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def build_from_config(self, name: str, options: Mapping[str, Any], *, key: str,
                          **fixed: Any) -> Any:
        """Build `name` with user options from a config group, naming the config key of any
        unknown or mistyped option (``distiller.temprature`` -> did you mean temperature?).
        `fixed` are the arguments the framework supplies (models, datasets), not the user."""
        factory = self.get(name, key=key)
        check_options(factory, options, key=key, skip=tuple(fixed))
        return factory(**fixed, **options)

    def list(self, pattern: str = "*") -> list[str]:
        """The names a user may choose. An entry registered with `internal=True` (one the
        framework builds for its own runs: a specialist's training for `specialists`) is built
        by name like any other but never listed, suggested or swept."""
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern)
                      and not self._meta[n].get("internal", False))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self.list())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"


# What a config value of each annotated type may be (annotations are strings here, written
# `float`, `str | None`, `list[str] | None`, ...); unknown annotations are not checked.
_TYPE_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "int": ("an integer", lambda v: type(v) is int),
    "bool": ("true or false", lambda v: type(v) is bool),
    "str": ("a string", lambda v: type(v) is str),
    "None": ("null", lambda v: v is None),
    "list[str]": ("a list of strings", lambda v: isinstance(v, (list, tuple))
                  and all(type(x) is str for x in v)),
    # e.g. one weights file per teacher, null where that one comes from the zoo
    "list[str | None]": ("a list of strings or nulls", lambda v: isinstance(v, (list, tuple))
                         and all(x is None or type(x) is str for x in v)),
}


def _union_members(annotation: str) -> list[str]:
    """`list[str | None] | None` -> ['list[str | None]', 'None']: split at the top level only."""
    parts, depth, current = [], 0, ""
    for char in annotation:
        depth += (char == "[") - (char == "]")
        if char == "|" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def _type_problem(annotation: Any, value: Any) -> str | None:
    """What `value` should have been, or None when it fits `annotation`."""
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None)
    parts = _union_members(str(name))
    if not all(p in _TYPE_CHECKS for p in parts):
        return None
    if any(_TYPE_CHECKS[p][1](value) for p in parts):
        return None
    return " or ".join(_TYPE_CHECKS[p][0] for p in parts)


def check_options(factory: Callable, options: Mapping[str, Any], *, key: str,
                  skip: tuple[str, ...] = ()) -> None:
    """Every option must be a keyword of `factory` and fit its annotation."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = inspect.signature(target).parameters
    accepted = {k: p for k, p in params.items()
                if k not in ("self", *skip) and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for option, value in options.items():
        if option not in accepted:
            similar = close_matches(option, accepted)
            raise ConfigError(f"unknown option '{option}'", key=f"{key}.{option}",
                              allowed=", ".join(accepted) or "(none)",
                              hint=f"did you mean: {', '.join(similar)}?" if similar else None)
        wanted = _type_problem(accepted[option].annotation, value)
        if wanted:
            raise ConfigError(f"expected {wanted}, got {value!r}", key=f"{key}.{option}")


__all__ = ["Registry", "ConfigError", "check_options"]
