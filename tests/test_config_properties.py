"""Every key of the config, every boundary value: a clear error naming the key, or a documented
meaning (issue 12). Generated, not listed: the keys come from the schema (distill.config), from
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

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from _compose import CONFIG_DIR, make_cfg
from distill.app import run
from distill.data import build_data
from distill.plan import check_distiller_fits
from distill.config import TrainConfig, flatten
from distill.method import DISTILLERS, BuildInfo, teacher_requests
from distill.errors import ConfigError
from distill.models import model_spec
from distill.validation import resolve_device, validate

BOUNDARY = {"0": 0, "-1": -1, "nan": math.nan, "inf": math.inf, "huge": 1e30, "[]": [],
            "abc": "abc", "ü": "ü", "a/b": "a/b", "../x": "../x", "empty": ""}
STRINGS = {"abc", "ü", "a/b", "../x", "empty"}
NUMBERS = {"0", "-1", "nan", "inf", "huge"}
BOOLEANS = ("teacher.pretrained", "student.pretrained", "teacher.auto_train",
            "optimizer.nesterov", "trainer.resume", "trainer.progress", "trainer.sync_bn",
            "trainer.channels_last", "zoo.publish", "optimizer.decay_norm_and_bias")
OFFLINE_DATASETS = ("fake", "digits", "mnist5k")

# (key patterns, boundary labels, what the accepted value means)
# labels of a training set big enough for CRD's 16384 negatives from other classes
TRAIN_LABELS = torch.arange(20_000) % 10

ACCEPTED = [
    (BOOLEANS, {"0", "-1"}, "OmegaConf's bool: 0 is false, any other integer true"),
    (("tag",), NUMBERS - {"-1"} | STRINGS - {"a/b", "../x"},
     "text of one folder name part: letters, digits, _ . + - ('' is no tag)"),
    (("run_dir", "zoo.root"), NUMBERS | STRINGS - {"empty"},
     "a folder, relative to the working directory"),
    (("trainer.compile_backend",), NUMBERS | STRINGS,
     "read only with trainer.compile != none, and then checked against torch's backends"),
    (("optimizer.lr", "optimizer.weight_decay", "dataset.recipe.lr",
      "dataset.recipe.weight_decay"), {"huge"},
     "as given: a diverging run stops with a non-finite loss error (trainer.on_nonfinite)"),
    (("optimizer.momentum",), {"0"}, "SGD without momentum"),
    (("optimizer.weight_decay", "dataset.recipe.weight_decay"), {"0"}, "no weight decay"),
    (("scheduler.milestones", "dataset.recipe.milestones"), {"[]"}, "the lr never decays"),
    (("scheduler.warmup_epochs",), {"0"}, "no warm-up"),
    (("scheduler.min_lr_ratio",), {"0"}, "cosine decays to zero"),
    (("trainer.num_workers",), {"0"}, "data loaded in the training process"),
    (("seed", "dataset.seed", "dataset.split_seed"), {"0"}, "seed 0"),
    (("dataset.seed",), {"-1"}, "any integer seeds the fake images"),
    (("distiller.*_weight", "distiller.alpha", "distiller.beta", "distiller.gamma"), {"0"},
     "that loss term is off (every weight zero is refused)"),
    (("distiller.*_weight", "distiller.alpha", "distiller.beta", "distiller.gamma",
      "distiller.temperature",
      "distiller.p", "distiller.sigma", "distiller.init_lr", "distiller.init_var",
      "distiller.margin", "distiller.nce_t", "distiller.kd_start", "distiller.kd_end",
      "distiller.bss_start", "distiller.step_size", "distiller.disc_lr",
      "distiller.generator_lr"), {"huge"},
     "as given: a loss that overflows stops the run (trainer.on_nonfinite)"),
    (("distiller.lr",), {"huge"},
     "DeepInversion's Adam lr on the pixels, as given: a diverging synthesis stops with an "
     "error naming distiller.lr"),
    (("distiller.jitter",), {"0"}, "DeepInversion synthesises without random shifts"),
    (("distiller.kd_start", "distiller.kd_end"), {"0"},
     "BSS's KD weight is 0 at that end of its ramp"),
    (("distiller.bss_start", "distiller.attack_fraction"), {"0"},
     "BSS attacks no sample: its KD schedule alone"),
    (("distiller.warmup_epochs",), {"0"}, "no warm-up ramp (DKD, ReviewKD)"),
    (("distiller.hint_epochs",), {"0"}, "FitNet in one stage (the reference recipe)"),
    (("distiller.init_epochs",), {"0"}, "no init stage: the main stage from step one"),
    (("distiller.margin",), {"0"}, "AB on the activation boundary itself, without a margin"),
    (("distiller.sigma",), {"0"}, "noisy_kd without noise: plain KD"),
    (("distiller.fraction",), {"0"}, "noisy_kd noises no example: plain KD"),
    (("distiller.nce_m",), {"0"}, "CRD's memory bank takes each new embedding as it is"),
    (("trainer.clip_grad_norm",), {"huge"}, "a norm no gradient reaches: nothing is clipped"),
    (("trainer.label_smoothing",), {"0"}, "no label smoothing"),
]


def documented(key: str, label: str) -> str | None:
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
        elif outcome == "accepted" and documented(key, label) is None:
            problems.append(f"{where}: accepted with no documented meaning (ACCEPTED)")
    assert not problems, "\n".join(problems)
    assert len({key for _, key, _ in walk}) > 60   # the walk reached the schema and the YAMLs


def test_every_documented_meaning_is_still_used(walk):
    accepted = {(key, label) for (_, key, label), (outcome, _) in walk.items()
                if outcome == "accepted"}
    for patterns, labels, meaning in ACCEPTED:
        used = {(k, lab) for k, lab in accepted if lab in labels
                and any(fnmatch.fnmatchcase(k, p) for p in patterns)}
        assert used, f"nothing accepts what this documents any more: {meaning}"


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
