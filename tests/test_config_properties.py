"""Every key of the config, every boundary value: a clear error naming the key, or a documented
meaning. Generated, not listed: the keys come from the schema (distill.config), from
each registered method's YAML and from the offline datasets' YAMLs, so a new key or method is
walked without editing this file.

A value is set the way a command-line override sets it (into the composed config, where the
schema's types apply), then everything that can refuse a run before its first step runs on it:
validation, the device, the dataset's builder (dataset keys), the distiller built on untrained
models (distiller keys). The outcome must be one of
- refused by the config's types (OmegaConf, what Hydra reports naming the key),
- a ConfigError whose key is the walked key, or whose message names it (a recipe value is
  reported by the key that reads it), or its group for a choice's `name`, or the whole
  `distiller` for "every loss weight is zero" naming the weight,
- accepted, and listed in ACCEPTED with what it means. An accepted value with no meaning listed
  fails, and so does a listed meaning that nothing uses any more.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import logging
import math
from pathlib import Path
from typing import Optional

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from _compose import CONFIG_DIR, make_cfg
from distill.app import run
from distill.config import TrainConfig, declared, flatten
from distill.data import build_data
from distill.errors import ConfigError
from distill.method import DISTILLERS, BuildInfo, teacher_requests
from distill.method.checks import COMMON_EDGES
from distill.models import model_spec
from distill.plan import check_distiller_fits
from distill.validation import resolve_device, validate

BOUNDARY = {"0": 0, "-1": -1, "nan": math.nan, "inf": math.inf, "huge": 1e30, "[]": [],
            "abc": "abc", "ü": "ü", "a/b": "a/b", "../x": "../x", "empty": ""}
STRINGS = {"abc", "ü", "a/b", "../x", "empty"}
NUMBERS = {"0", "-1", "nan", "inf", "huge"}
OFFLINE_DATASETS = ("fake", "digits", "mnist5k")
# labels of a training set big enough for CRD's 16384 negatives from other classes
TRAIN_LABELS = torch.arange(20_000) % 10

# What an accepted value means lives with what declares it: a schema option's declaration
# (distill.config, `accepts`), a method's registration (`edges`) and distill.method.checks'
# COMMON_EDGES. Their keys name the walk's values by kind.
KINDS = {label: {label, "number", "any"} for label in NUMBERS}
KINDS |= {label: {label, "text", "any"} for label in STRINGS} | {"[]": {"[]", "any"}}
BOOLEANS = tuple(k for k, (_, kind) in declared().items() if kind in (bool, Optional[bool]))
# What no declaration holds: OmegaConf's reading of integers as booleans, and the datasets'
# YAML keys (key patterns, boundary labels, meaning).
ACCEPTED = [
    (BOOLEANS, {"0", "-1"}, "OmegaConf's bool: 0 is false, any other integer true"),
    (("dataset.recipe.lr", "dataset.recipe.weight_decay"), {"huge"},
     "as given: a diverging run stops with a non-finite loss error (trainer.on_nonfinite)"),
    (("dataset.recipe.weight_decay",), {"0"}, "no weight decay"),
    (("dataset.recipe.milestones",), {"[]"}, "the lr never decays"),
    (("dataset.seed", "dataset.split_seed"), {"0"}, "seed 0"),
    (("dataset.seed",), {"-1"}, "any integer seeds the fake images"),
]


# one xdist worker runs this module: its fixture walks the whole schema once
pytestmark = pytest.mark.xdist_group("config_properties")


def declared_meanings(group: str, key: str) -> dict[str, str]:
    """What the declaration of `key` says its accepted edge values mean."""
    if key in declared():
        return declared()[key][0].accepts
    if key.startswith("distiller.") and group in DISTILLERS:
        option = key.removeprefix("distiller.")
        edges = {**COMMON_EDGES, **DISTILLERS.meta(group).get("edges", {})}
        return {kind: meaning for pattern, meanings in edges.items()
                if fnmatch.fnmatchcase(option, pattern) for kind, meaning in meanings.items()}
    return {}


def documented(group: str, key: str, label: str) -> str | None:
    meanings = declared_meanings(group, key)
    found = next((meanings[kind] for kind in KINDS[label] if kind in meanings), None)
    if found is not None:
        return found
    for patterns, labels, meaning in ACCEPTED:
        if label in labels and any(fnmatch.fnmatchcase(key, p) for p in patterns):
            return meaning
    return None


@pytest.fixture(scope="module")
def walk(tmp_path_factory) -> dict[tuple[str, str, str], tuple[str, str]]:
    """(group, key, label) -> (outcome, detail) for every walked key and boundary value."""
    logging.getLogger("distill").setLevel(logging.ERROR)
    tmp = tmp_path_factory.mktemp("walk")

    def base(*overrides: str):
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose("train", overrides=[
                "dataset=fake", "teacher=resnet8", "student=resnet8", "trainer.epochs=2",
                f"zoo.root={tmp}/zoo", f"run_dir={tmp}/run", *overrides])

    bases = {"": base()}
    schema = flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig)))
    keys = [("", k) for k in schema
            if k.split(".")[0] not in ("dataset", "distiller", "logger", "tuned")]
    for method in DISTILLERS.list():
        bases[method] = base(f"distiller={method}")
        keys += [(method, f"distiller.{k}") for k in bases[method].distiller if k != "name"]
    for dataset in OFFLINE_DATASETS:
        bases[dataset] = base(f"dataset={dataset}")
        keys += [(dataset, f"dataset.{k}") for k in bases[dataset].dataset
                 if k not in ("name", "recipe")]
    keys += [("", f"dataset.recipe.{k}") for k in bases[""].dataset.recipe]
    try:
        return {(group, key, label): attempt(bases[group], key, value)
                for group, key in keys for label, value in BOUNDARY.items()}
    finally:
        logging.getLogger("distill").setLevel(logging.NOTSET)


def attempt(base, key: str, value) -> tuple[str, str]:
    cfg = copy.deepcopy(base)
    try:
        OmegaConf.update(cfg, key, value, merge=False)
    except OmegaConfBaseException as exc:
        return "types", str(getattr(exc, "full_key", ""))
    try:
        resolved = validate(cfg)
        resolve_device(cfg.device)
        if key.startswith("dataset."):
            build_data(resolved["dataset"])
        if key.startswith("distiller."):
            options = {k: v for k, v in resolved["distiller"].items() if k != "name"}
            requests = teacher_requests(DISTILLERS.get(cfg.distiller.name), options,
                                        resolved["teacher"])
            info = BuildInfo(model_spec("resnet8"), model_spec(requests[0].arch) if requests
                             else None, (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, "resnet8",
                             train_labels=TRAIN_LABELS)
            check_distiller_fits(cfg.distiller.name, "resnet8", requests, options, info)
    except ConfigError as exc:
        return "refused", f"{exc.key}\n{exc.render()}"
    except Exception as exc:   # noqa: BLE001 - what the test is looking for
        return "crashed", f"{type(exc).__name__}: {exc}"
    return "accepted", ""


def names_the_key(key: str, detail: str) -> bool:
    named, _, text = detail.partition("\n")
    option = key.rsplit(".", 1)[-1]
    return (named == key
            or key in text   # e.g. a recipe value reported by the key that reads it
            or (key.endswith(".name") and named == key.rsplit(".", 1)[0])
            or (named == "distiller" and "weight 0" in text and option in text))   # all zero


@pytest.mark.slow   # the whole-schema walk: about 70 s on 2 cores
def test_every_boundary_value_is_refused_by_name_or_documented(walk):
    problems = []
    for (group, key, label), (outcome, detail) in walk.items():
        where = f"{key}={label}" + (f" (with {group})" if group else "")
        if outcome == "crashed":
            problems.append(f"{where}: {detail}")
        elif outcome == "types" and detail != key:
            problems.append(f"{where}: a type error naming {detail!r}")
        elif outcome == "refused" and not names_the_key(key, detail):
            problems.append(f"{where}: refused naming {detail.splitlines()[0]!r}")
        elif outcome == "accepted" and documented(group, key, label) is None:
            problems.append(f"{where}: accepted with no documented meaning (its declaration's "
                            "`accepts`, its method's `edges`, or ACCEPTED here)")
    assert not problems, "\n".join(problems)
    assert len({key for _, key, _ in walk}) > 60   # the walk reached the schema and the YAMLs


@pytest.mark.slow   # the whole-schema walk: about 70 s on 2 cores
def test_every_documented_meaning_is_still_used(walk):
    accepted = {(key, label) for (_, key, label), (outcome, _) in walk.items()
                if outcome == "accepted"}
    for patterns, labels, meaning in ACCEPTED:
        used = {(k, lab) for k, lab in accepted if lab in labels
                and any(fnmatch.fnmatchcase(k, p) for p in patterns)}
        assert used, f"nothing accepts what this documents any more: {meaning}"
    by_key = {}
    for (group, key, label), (outcome, _) in walk.items():
        by_key.setdefault((group, key), set()).add(label if outcome == "accepted" else None)
    unused = []
    for (group, key), labels in by_key.items():
        for kind in declared_meanings(group, key):
            if key.startswith("distiller.") and kind not in DISTILLERS.meta(group).get(
                    "edges", {}).get(key.removeprefix("distiller."), {}):
                continue   # a COMMON_EDGES pattern: used by some method's option, not this one's
            if not any(kind in KINDS[label] for label in labels if label):
                unused.append(f"{key}={kind} (with {group or 'the defaults'})")
    assert not unused, "nothing accepts these documented values any more: " + ", ".join(unused)


def test_accepted_boundary_values_mean_what_they_say(tmp_path):
    """A run with several accepted boundaries at once: the unicode tag names its folder, no
    milestones keeps the lr constant, momentum 0 and weight decay 0 reach the optimizer, an
    all-but-one zero loss weight trains (the recorded config holds every value)."""
    from distill.catalog import run_path

    tag = "ü"
    folder = tmp_path / run_path("kd", "resnet8", "resnet8", tag)
    cfg = make_cfg(tmp_path, "dataset=fake", "dataset.train_size=64", "dataset.val_size=32",
                   "distiller=kd", "distiller.ce_weight=0", "teacher=resnet8",
                   "student=resnet8", f"teacher.checkpoint={_teacher(tmp_path)}",
                   f"tag='{tag}'", "scheduler.milestones=[]", "optimizer.momentum=0",
                   "optimizer.weight_decay=0", "trainer.num_workers=0", "trainer.epochs=2",
                   "trainer.batch_size=16", "trainer.log_every=1", run=str(folder))
    summary = run(cfg)
    assert folder.name == "kd-ü" and (folder / "summary.json").is_file()
    events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    lrs = {e["train/lr"] for e in events if e["event"] == "train"}
    assert lrs == {cfg.optimizer.lr} and summary["steps"] == 8
    assert all(e["train/ce"] == 0 and e["train/kd"] > 0 for e in events if e["event"] == "train")
    recorded = OmegaConf.load(folder / ".hydra" / "config.yaml")
    assert recorded.tag == tag and recorded.optimizer.momentum == 0


def _teacher(tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from distill.models import create_model

    torch.manual_seed(0)
    path = tmp_path / "teacher.safetensors"
    save_file(create_model("resnet8", num_classes=10).state_dict(), str(path))
    return path
