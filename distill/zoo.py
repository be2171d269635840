"""The teacher zoo: trained weights per (dataset, name), found by distillation runs.

Layout (root is `zoo.root`, default ./zoo, or $DISTILL_ZOO):

    <root>/<dataset>/<name>/<sha256[:16]>/model.safetensors   one folder per published version,
    <root>/<dataset>/<name>/<sha256[:16]>/meta.json            never changed once written
    <root>/<dataset>/<name>/current.json                       the version new runs take, per split

An entry of the pre-release layout (model.safetensors and meta.json directly in <name>/,
before versions) is refused by name, with the two commands that make it a version.

`<name>` is an architecture (`resnet56`) or a distilled model (`resnet32@kd-resnet56.1a2b3c4d`).
A version's meta.json records the split it was trained on (`split`: the dataset options that
define it, plus the digest of user-supplied data: distill.teachers.split_identity). Versions of
different splits never compete: a lookup sees only its own split's versions, and each split has
its own current version. Publishing never replaces weights: a model that beats the current
version's top-1 becomes the current version, and every older one stays loadable by its sha256,
which is what a run records of its teachers, so resuming or exporting an older run finds the
very teacher it used. A damaged meta.json stops the lookup with its path (never guessed at).

Writes are safe when a sweep's jobs run in parallel: a version folder is written under a temporary
name and renamed into place, current.json is replaced atomically under a lock, and `claim`
makes one run train a missing model while the others wait for it (distill.locks).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.errors import ConfigError
from distill.locks import exclusive

log = logging.getLogger("distill")

WEIGHTS, META, CURRENT = "model.safetensors", "meta.json", "current.json"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ZooEntry:
    weights: Path
    meta: dict[str, Any]

    @property
    def sha256(self) -> str:
        """The weights' digest as published (meta.json); computed for pre-version entries."""
        return self.meta.get("sha256") or file_sha256(self.weights)


def split_key(split: dict | None) -> str:
    """16 hex digits naming a split identity (current.json's key, zoo run folders)."""
    return hashlib.sha256(json.dumps(split, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict:
    """A pointer file: missing or damaged reads as no pointer (lookups fall back on top-1)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# meta.json keys a lookup or a publication reads, and the types they must have
_META_TYPES = {"top1": (int, float), "sha256": str, "split": dict, "published": str}


def read_meta(path: Path) -> dict:
    """A version's meta.json; {} when there is none (an entry from before meta files). One that
    cannot be read, is not a JSON object, or has a key of the wrong type is a ConfigError
    naming it: a guessed meta would let a model trained on other data pass as this split's."""
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problem = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise ConfigError(f"damaged teacher zoo file {path}: {problem}", key="zoo.root",
                          hint=f"restore it, or remove the folder {path.parent} (that version is "
                               "then gone) and run again") from None
    if not isinstance(value, dict):
        problem = f"a JSON {type(value).__name__}, not an object"
    else:
        problem = next((f"'{k}' is {value[k]!r}" for k, t in _META_TYPES.items()
                        if value.get(k) is not None and (not isinstance(value[k], t)
                                                         or isinstance(value[k], bool))), None)
        if problem is None:
            return value
    raise ConfigError(f"damaged teacher zoo file {path}: {problem}", key="zoo.root",
                      hint=f"restore it, or remove the folder {path.parent} (that version is "
                           "then gone) and run again")


def refuse_unversioned(folder: Path) -> None:
    """A ConfigError for an entry of the pre-release layout in `folder`, naming the commands
    that make it a version (its folder is named by the weights' digest)."""
    weights = folder / WEIGHTS
    if not weights.is_file():
        return
    version = folder / file_sha256(weights)[:16]
    raise ConfigError(f"{folder} holds a teacher in the zoo layout of a pre-release version "
                      f"(model.safetensors directly in it, no version folder)", key="zoo.root",
                      hint=f"make it a version:\n  mkdir {version}\n  mv {weights} "
                           f"{folder / META} {version}/\nor delete both files and train the "
                           "teacher again (teacher.auto_train=true)")


def _write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


class TeacherZoo:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def entry_dir(self, dataset: str, name: str) -> Path:
        return self.root / dataset / name

    def versions(self, dataset: str, name: str) -> list[ZooEntry]:
        """Every published version, in publication order."""
        folder = self.entry_dir(dataset, name)
        refuse_unversioned(folder)
        found = [ZooEntry(p, read_meta(p.parent / META))
                 for p in folder.glob(f"*/{WEIGHTS}") if not p.parent.name.startswith(".")]
        return sorted(found, key=lambda e: str(e.meta.get("published", "")))

    def _pointers(self, dataset: str, name: str, versions: list[ZooEntry]) -> dict[str, str]:
        """split key -> sha256 of that split's current version. current.json of one pointer
        (before splits had their own) points for the split of the version it names."""
        recorded = _read_json(self.entry_dir(dataset, name) / CURRENT)
        by_split = recorded.get("splits")
        if isinstance(by_split, dict):
            return {k: v["sha256"] for k, v in by_split.items()
                    if isinstance(v, dict) and isinstance(v.get("sha256"), str)}
        named = next((e for e in versions if recorded.get("sha256")
                      and e.meta.get("sha256") == recorded["sha256"]), None)
        return {split_key(named.meta.get("split")): named.meta["sha256"]} if named else {}

    def made_here(self, entry: ZooEntry) -> bool:
        """Whether the zoo made this version itself (an auto-trained teacher, a distilled link:
        their runs live in <root>/runs/), not a user's own run that published it."""
        run_dir = entry.meta.get("run_dir")
        return isinstance(run_dir, str) and Path(run_dir).is_relative_to(self.root / "runs")

    def find(self, dataset: str, name: str, sha256: str | None = None,
             split: dict | None = None, min_epochs: int | None = None) -> ZooEntry | None:
        """The version with that `sha256`, else the current version for `split` (a split
        identity; None: any split). Versions published before splits were recorded match a
        split of packaged data only (no `data_sha256`). `min_epochs`: a version the zoo made
        with fewer epochs (a smoke run's teacher.auto_train_epochs=1) is not taken: how long a
        made model trained is part of what it is."""
        versions = self.versions(dataset, name)
        if sha256 is not None:
            return next((e for e in versions if e.sha256 == sha256), None)
        if min_epochs is not None:
            versions = [e for e in versions if not self.made_shorter(e, min_epochs)]
        if split is not None:
            # a version from before splits were recorded may be taken for packaged data (whose
            # options say it all), never for data of the user's, which it cannot be told from
            legacy_ok = "data_sha256" not in split
            versions = [e for e in versions if e.meta.get("split") == split
                        or (legacy_ok and e.meta.get("split") is None)]
        if not versions:
            return None
        pointers = self._pointers(dataset, name, versions)
        current = (pointers.get(split_key(split)) if split is not None
                   else next(iter(pointers.values()), None))
        chosen = next((e for e in versions if current and e.meta.get("sha256") == current), None)
        # no (valid) pointer: a crash between a version's rename and the pointer's update: the
        # best top-1, the newest among equals
        return chosen or max(reversed(versions), key=lambda e: e.meta.get("top1", -1))

    def made_shorter(self, entry: ZooEntry, epochs: int) -> bool:
        return self.made_here(entry) and int(entry.meta.get("epochs", 0)) < epochs

    def other_splits(self, dataset: str, name: str, split: dict) -> list[dict]:
        """The splits (other than `split`) that versions of (dataset, name) were trained on."""
        found = []
        for entry in self.versions(dataset, name):
            trained_on = entry.meta.get("split")
            if trained_on not in (None, split) and trained_on not in found:
                found.append(trained_on)
        return found

    def find_digest(self, dataset: str, sha256: str) -> ZooEntry | None:
        """The version of any name of `dataset` whose weights have this digest."""
        folder = self.root / dataset
        for candidate in folder.glob(f"*/{sha256[:16]}/{WEIGHTS}"):
            entry = ZooEntry(candidate, read_meta(candidate.parent / META))
            if entry.sha256 == sha256:
                return entry
        for unversioned in folder.glob(f"*/{WEIGHTS}"):
            refuse_unversioned(unversioned.parent)
        return None

    def publish(self, dataset: str, name: str, weights: Path, meta: dict[str, Any]) -> bool:
        """Add `weights` as a version of (dataset, name); it becomes the current version of its
        split (`meta["split"]`) when its top-1 beats that split's current one. Returns whether
        it did."""
        digest = file_sha256(weights)
        folder = self.entry_dir(dataset, name)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {**meta, "sha256": digest, "published": time.strftime("%Y-%m-%d %H:%M:%S")}
        split = meta.get("split")
        with exclusive(folder / ".lock", what=f"publishes {dataset}/{name}"):
            version = folder / digest[:16]
            versions = self.versions(dataset, name)
            current = self.find(dataset, name, split=split)
            if version.is_dir() and current is not None and current.sha256 == digest:
                return True   # published before (e.g. a finished run run again): nothing to do
            if not version.is_dir():
                staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
                shutil.copyfile(weights, staging / WEIGHTS)
                _write_json_atomic(staging / META, meta)
                os.rename(staging, version)   # a reader sees the whole version or none
            better = (current is None or current.sha256 == digest
                      or meta.get("top1", -1) > current.meta.get("top1", -1))
            if not better:
                log.info("zoo keeps %s/%s as the current version (top-1 %.2f >= %.2f of this "
                         "run); this run's weights are version %s", dataset, name,
                         current.meta.get("top1", float("nan")), meta.get("top1", float("nan")),
                         digest[:16])
                return False
            pointers = {k: {"sha256": v} for k, v in self._pointers(dataset, name, versions).items()}
            pointers[split_key(split)] = {"sha256": digest, "top1": meta.get("top1")}
            _write_json_atomic(folder / CURRENT, {"splits": pointers})
        log.info("published %s/%s to the teacher zoo: %s (top-1 %.2f, sha256 %s)", dataset, name,
                 version, meta.get("top1", float("nan")), digest[:16])
        return True

    @contextmanager
    def claim(self, dataset: str, name: str, *, wait: bool = True) -> Iterator[None]:
        """Held while this process makes (dataset, name): another run that needs it waits, then
        finds it published, instead of training a second copy into the same folders. With
        `wait=False`, distill.locks.Locked says who holds it instead."""
        with exclusive(self.entry_dir(dataset, name) / ".claim", wait=wait,
                       what=f"is training {dataset}/{name} for the zoo"):
            yield

    def list(self) -> list[tuple[str, str, dict]]:
        """(dataset, name, meta of the current version) of every entry."""
        names = {(p.parent.parent.name, p.parent.name) for p in self.root.glob(f"*/*/{CURRENT}")}
        names |= {(p.parent.parent.name, p.parent.name) for p in self.root.glob(f"*/*/{WEIGHTS}")}
        names |= {(p.parent.parent.parent.name, p.parent.parent.name)
                  for p in self.root.glob(f"*/*/*/{WEIGHTS}") if not p.parent.name.startswith(".")}
        entries = [(d, n, self.find(d, n)) for d, n in sorted(names) if d != "runs"]
        return [(d, n, e.meta) for d, n, e in entries if e is not None]
