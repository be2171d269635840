"""The teacher zoo: trained weights per (dataset, architecture), found by distillation runs.

Layout (root is `zoo.root`, default ./zoo, or $DISTILL_ZOO):

    <root>/<dataset>/<model>/model.safetensors
    <root>/<dataset>/<model>/meta.json      top-1, epochs, seed, the run that made it, date

A `distiller=none` run publishes its final weights here unless the zoo already holds a better
model for the same (dataset, architecture).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("distill")


@dataclass(frozen=True)
class ZooEntry:
    weights: Path
    meta: dict[str, Any]


class TeacherZoo:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def entry_dir(self, dataset: str, model: str) -> Path:
        return self.root / dataset / model

    def find(self, dataset: str, model: str) -> ZooEntry | None:
        folder = self.entry_dir(dataset, model)
        weights = folder / "model.safetensors"
        if not weights.is_file():
            return None
        meta_file = folder / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        return ZooEntry(weights, meta)

    def publish(self, dataset: str, model: str, weights: Path, meta: dict[str, Any]) -> bool:
        """Copy `weights` into the zoo unless a better model is already there. Returns whether
        it was published."""
        current = self.find(dataset, model)
        if current and current.meta.get("top1", -1) > meta.get("top1", -1):
            log.info("zoo keeps %s/%s (top-1 %.2f > %.2f of this run)", dataset, model,
                     current.meta["top1"], meta["top1"])
            return False
        folder = self.entry_dir(dataset, model)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "model.safetensors.tmp"
        shutil.copyfile(weights, tmp)
        os.replace(tmp, folder / "model.safetensors")
        meta = {**meta, "published": time.strftime("%Y-%m-%d %H:%M:%S")}
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        log.info("published %s/%s to the teacher zoo: %s (top-1 %.2f)", dataset, model, folder,
                 meta.get("top1", float("nan")))
        return True

    def list(self) -> list[tuple[str, str, dict]]:
        return [(p.parent.parent.name, p.parent.name, json.loads((p.parent / "meta.json").read_text())
                 if (p.parent / "meta.json").is_file() else {})
                for p in sorted(self.root.glob("*/*/model.safetensors"))]
