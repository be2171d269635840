"""User-facing errors.

A `ConfigError` is a problem with what the user asked for (a name, a value, a missing file), not a
bug. Entry points catch it and print one short screen, with no traceback, and exit non-zero.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(Exception):
    """A bad config key/value or missing input, reported to the user without a traceback.

    `key` names the config key at fault (e.g. ``student``, ``optimizer.lr``); `allowed` says what
    would have been accepted; `hint` is a next step (a command to run, a path to create).
    """

    def __init__(self, message: str, *, key: str | None = None, allowed: str | None = None,
                 hint: str | None = None):
        self.message = message
        self.key = key
        self.allowed = allowed
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.key}: {self.message}" if self.key else self.message]
        if self.allowed:
            lines.append(f"allowed: {self.allowed}")
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


def close_matches(name: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """Up to `n` choices that look like `name` (typos, case, a missing prefix)."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    found = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.6)
    # substring hits catch e.g. "resnet" -> resnet20, tv_resnet18 that difflib ranks low
    found += [c for c in lowered if name.lower() in c and c not in found]
    # a choice that starts with what was typed is the likeliest fix (resnet2 -> resnet20)
    found.sort(key=lambda c: not c.startswith(name.lower()))
    return [lowered[c] for c in found[:n]]


def unknown_name_error(kind: str, name: str, choices: Iterable[str], *, key: str | None = None,
                       max_listed: int = 40) -> ConfigError:
    """The error for a name that is not registered: close matches first, then what exists."""
    choices = sorted(choices)
    similar = close_matches(name, choices)
    message = f"unknown {kind} '{name}'"
    if similar:
        message += f"; did you mean: {', '.join(similar)}?"
    listed = ", ".join(choices[:max_listed])
    if len(choices) > max_listed:
        listed += f", ... ({len(choices)} in all)"
    return ConfigError(message, key=key or kind, allowed=listed)
