"""Experiment tracking behind one small interface: JSONL (always), TensorBoard, W&B.

    trackers = build_trackers({"tensorboard": {}}, run_dir, config=..., run_name=...)
    trackers.log({"train/loss": 0.3}, step=10, event="train")
    trackers.finish(hparams, summary)

Only rank 0 builds trackers; other ranks get an empty `Trackers`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.registry import Registry
from distill.tracking.base import Tracker, Trackers
from distill.tracking.jsonl import JsonlTracker

TRACKERS = Registry("logger")

# registering the optional backends (their heavy imports happen on construction only)
from distill.tracking import tensorboard, wandb_tracker  # noqa: E402,F401


def build_trackers(backends: dict[str, dict[str, Any]], run_dir: Path, *, config: dict,
                   run_name: str, resume_state: dict | None = None) -> Trackers:
    """JSONL plus one tracker per entry of `backends` (the composed `logger` config group)."""
    resume_state = resume_state or {}
    trackers: list[Tracker] = [JsonlTracker(run_dir)]
    for name, options in backends.items():
        cls = TRACKERS.get(name, key="logger")
        trackers.append(cls(run_dir, config=config, run_name=run_name,
                            resume_state=resume_state.get(name), **(options or {})))
    return Trackers(trackers)


__all__ = ["TRACKERS", "Tracker", "Trackers", "build_trackers"]
