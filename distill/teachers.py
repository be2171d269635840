"""Where a run's frozen teachers come from: a weights file, the teacher zoo, a run that trains one
now, torchvision, or, for a teacher that is itself distilled (TAKD's assistants), a KD run from
its own teacher, kept in the zoo.

A method states what it needs as `TeacherRequest`s (distill.method); `TeacherResolver`
turns each into a `ResolvedTeacher`: the model, its weights' sha256, and where it came from.
Runs that make zoo models are ordinary runs of `distill.app.run`, passed in as `train` (this
module does not import the app), each its own job: they use the dataset's own recipe and the
full training split, train to the end, and leave the caller's random state as it was.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from distill import distributed as dist_utils
from distill.catalog import DISTILLERS
from distill.checkpoint import load_weights, preserved_rng
from distill.config import CONFIG_DIR, OptimizerConfig, SchedulerConfig, teacher_run_defaults
from distill.engine.quantize import QUANTIZED_SUFFIX, plain_state_dict, quantize_weights
from distill.errors import ConfigError
from distill.locks import Locked
from distill.method import TeacherRequest
from distill.method.checks import cache_refusal
from distill.models import create_model
from distill.zoo import TeacherZoo, ZooEntry, file_sha256, split_key

log = logging.getLogger("distill")

Train = Callable[..., dict[str, Any]]   # distill.app.run
# Command-line overrides that carry over to the run that trains a missing teacher; the keys
# declared `for_teachers=False` (distill.config: the recipe, early stops, the student's own
# recipe options) do not: a teacher is trained to the end with its dataset's recipe.
TEACHER_RUN_KEYS = ("dataset", "trainer", "seed", "zoo", "device")
# How often rank 0 of a DDP job asks again for a zoo claim another job holds.
CLAIM_POLL_SECONDS = 5.0
# Dataset options that do not change which images are in which split.
# (Which images a folder's check skipped is in its data digest.)
NOT_SPLIT_DEFINING = ("name", "root", "download", "augment", "recipe", "train_fraction",
                      "student_view", "bad_images", "check_images")


def split_identity(dataset: dict, data_digest: str | None = None) -> dict:
    """What a zoo model was trained on: the dataset options that define the train/test split,
    and the digest of the data itself when the user supplied it (an image folder's listing, a
    data file: DatasetBundle.data_digest). A teacher trained on other data, or on another split
    (which may hold this run's test images), is never taken for this one, nor compared with it."""
    identity = {k: v for k, v in dataset.items() if k not in NOT_SPLIT_DEFINING}
    return {**identity, "data_sha256": data_digest} if data_digest else identity


def load_state_into(model: torch.nn.Module, state: dict, *, source: str, key: str,
                    num_classes: int) -> None:
    """Strict load; shape mismatches (usually a class-count mismatch) become one clear error."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()][:4]
        raise ConfigError(f"weights in {source} do not fit this model (dataset has "
                          f"{num_classes} classes):\n  " + "\n  ".join(detail), key=key) from None


def load_model(name: str, source: str, *, key: str, num_classes: int,
               model_options: dict | None = None) -> torch.nn.Module:
    model = create_model(name, num_classes=num_classes, **(model_options or {}))
    state = load_weights(source, key=key, arch=name)
    if any(k.endswith(QUANTIZED_SUFFIX) for k in state):
        # a trainer.quantize=int8 run's checkpoint holds the float shadow weights: the int8
        # model's weights are made from them as the run's student.safetensors was made
        quantize_weights(model)
        load_state_into(model, state, source=source, key=key, num_classes=num_classes)
        state = plain_state_dict(model)
        model = create_model(name, num_classes=num_classes, **(model_options or {}))
    load_state_into(model, state, source=source, key=key, num_classes=num_classes)
    return model


def state_sha256(model: torch.nn.Module) -> str:
    """A digest of a model's weights when there is no file (torchvision's pretrained weights):
    every tensor's name, dtype, shape and bytes, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class ResolvedTeacher:
    role: str
    name: str                  # architecture
    model: torch.nn.Module
    sha256: str
    weights: Path | None       # None: torchvision's pretrained weights
    source: str                # where it came from, for the log

    def record(self) -> dict[str, str]:
        """What a run records of it (checkpoint, summary.json)."""
        return {"role": self.role, "name": self.name, "sha256": self.sha256}


# --- runs that make zoo models ------------------------------------------------------------------
def teacher_training_command(cfg: DictConfig, overrides: list[str], arch: str | None = None,
                             pretrained: bool | None = None) -> str:
    """The exact command that trains and publishes a missing teacher: vanilla training of the
    architecture with the dataset's own recipe (and lr) on the full training split."""
    def keep(override: str) -> bool:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in ("dataset", "dataset.train_fraction", "dataset.student_view") \
                or key.startswith(tuple(teacher_run_defaults())):
            return False
        return key.split(".")[0] in TEACHER_RUN_KEYS

    args = ["python", "tools/train.py", "distiller=none", f"student={arch or cfg.teacher.name}",
            f"dataset={cfg.dataset.name}", *filter(keep, overrides)]
    if cfg.teacher.pretrained if pretrained is None else pretrained:
        args.append("student.pretrained=true")
    if cfg.teacher.auto_train_epochs:
        args.append(f"trainer.epochs={cfg.teacher.auto_train_epochs}")
    return shlex.join(args)


def made_epochs(cfg: DictConfig) -> int | None:
    """How long the runs that make this run's zoo models train: teacher.auto_train_epochs,
    else the dataset recipe's (None for a config without one, e.g. a finished run's read back
    by the export, which looks teachers up by digest). A made model shorter than that does not
    serve this run."""
    epochs = cfg.teacher.auto_train_epochs or OmegaConf.select(cfg, "dataset.recipe.epochs")
    return int(epochs) if epochs else None


def zoo_run_config(cfg: DictConfig, *, student: str, distiller: dict | DictConfig,
                   zoo_name: str, split: dict) -> DictConfig:
    """A run that makes a zoo model from cfg: same data, the dataset's recipe (or
    teacher.auto_train_epochs), the full training split, to the end (no max_steps), in
    <zoo.root>/runs/<dataset>/<zoo_name>/<split key>/seed<N>-<epochs>epochs (models of other
    data, splits or lengths are other runs)."""
    zcfg = copy.deepcopy(cfg)
    OmegaConf.set_struct(zcfg, False)
    zcfg.student.name = student
    zcfg.student.pretrained = False
    zcfg.distiller = distiller
    for group, option, schema in (("optimizer", "sgd", OptimizerConfig),
                                  ("scheduler", "multistep", SchedulerConfig)):
        zcfg[group] = OmegaConf.merge(OmegaConf.structured(schema),
                                      OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml"))
    # the dataset's recipe, to the end, a float model (whatever its user trains), none of the
    # student's recipe options: the declared defaults of the options not for teachers
    for key, default in teacher_run_defaults().items():
        OmegaConf.update(zcfg, key, default, merge=False)
    if cfg.teacher.auto_train_epochs:
        zcfg.trainer.epochs = cfg.teacher.auto_train_epochs
    if cache_refusal(DISTILLERS.get(distiller["name"])) is not None:
        zcfg.teacher.cache = "none"   # e.g. a teacher's own vanilla run: nothing to cache
    zcfg.teacher.cache_dtype = "float32"   # a zoo model learns from exact targets (or none)
    zcfg.dataset.pop("train_fraction", None)
    zcfg.dataset.pop("student_view", None)   # zoo models see the image (cross-modal KD's teacher)
    zcfg.tuned = {}
    zcfg.run_dir = str(Path(cfg.zoo.root) / "runs" / cfg.dataset.name / zoo_name
                       / split_key(split) / f"seed{cfg.seed}-{made_epochs(cfg)}epochs")
    zcfg.tag = ""
    return zcfg


def teacher_run_config(cfg: DictConfig, arch: str, pretrained: bool, split: dict) -> DictConfig:
    """The vanilla run that trains a teacher of `arch` and publishes it to the zoo."""
    tcfg = zoo_run_config(cfg, student=arch, zoo_name=arch, split=split,
                          distiller=OmegaConf.load(CONFIG_DIR / "distiller" / "none.yaml"))
    tcfg.student.pretrained = pretrained
    tcfg.teacher.auto_train = False
    tcfg.zoo.publish = True
    return tcfg


def link_fingerprint(parent_weights: str | None, parent_name: str, kd_options: dict) -> str:
    """8 hex digits naming one KD link: the parent's exact weights and the KD options. A model
    distilled from other weights (a retrained teacher, another teacher.checkpoint) or with
    another temperature is another zoo entry, never a stale cache hit."""
    digest = hashlib.sha256()
    if parent_weights is None:
        digest.update(f"torchvision-pretrained:{parent_name}".encode())
    else:
        with open(parent_weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    digest.update(json.dumps(kd_options, sort_keys=True).encode())
    return digest.hexdigest()[:8]


# --- resolving requests -------------------------------------------------------------------------
class TeacherResolver:
    """Finds (and, where allowed, trains) the teachers of one run.

    Under DDP every rank resolves, but rank 0 decides: what the zoo holds is read by rank 0 and
    broadcast, so all ranks take the same weights even while another job publishes, and all of
    them take part in any run that trains a missing model."""

    def __init__(self, cfg: DictConfig, dataset: dict, num_classes: int, zoo: TeacherZoo,
                 overrides: list[str], train: Train | None, data_digest: str | None = None,
                 model_options: dict | None = None):
        """`data_digest`: the run's DatasetBundle.data_digest (user-supplied data);
        `model_options`: what models of the data are built with (DatasetBundle)."""
        self.cfg, self.dataset, self.num_classes = cfg, dataset, num_classes
        self.model_options = dict(model_options or {})
        self.split = split_identity(dataset, data_digest)
        self.zoo, self.overrides, self.train = zoo, overrides, train
        self.min_epochs = made_epochs(cfg)

    def _find(self, name: str) -> ZooEntry | None:
        """The zoo's current `name` for this run's data and split, as rank 0 sees it; a model
        the zoo made shorter than this run would make it is not taken (made_epochs)."""
        return dist_utils.on_main(lambda: self.zoo.find(self.dataset["name"], name,
                                                        split=self.split,
                                                        min_epochs=self.min_epochs))

    def _other_data(self, name: str) -> str:
        """For a 'not in the zoo' error: what the zoo holds of `name` for other data, or made
        by a shorter run."""
        others = dist_utils.on_main(
            lambda: self.zoo.other_splits(self.dataset["name"], name, self.split))
        shorter = dist_utils.on_main(lambda: self.zoo.find(self.dataset["name"], name,
                                                           split=self.split))
        if shorter is not None and self.zoo.made_shorter(shorter, self.min_epochs):
            epochs = shorter.meta.get("epochs")
            return (f"; it holds one made by a shorter run ({epochs} epochs; this run's zoo models "
                    f"train {self.min_epochs}), which does not serve a longer run: "
                    f"teacher.auto_train_epochs={epochs} takes it")
        if not others:
            return ""
        return (f"; it holds {len(others)} trained on other data or another split (e.g. "
                f"{others[0]}; this run: {self.split}), which never teach this one")

    def _find_digest(self, sha256: str) -> ZooEntry | None:
        return dist_utils.on_main(lambda: self.zoo.find_digest(self.dataset["name"], sha256))

    # where the weights are
    def weights(self, request: TeacherRequest, *, may_train: bool = True) -> tuple[str | None, str]:
        """(weights file, config key it came from) of `request`: its checkpoint, else the zoo,
        else a run that makes it now (teacher.auto_train, or a distilled link). (None, ...)
        means torchvision's pretrained weights; no weights at all stops with the command that
        trains them."""
        if request.checkpoint:
            return request.checkpoint, request.checkpoint_key
        if request.distilled_from is not None:
            return str(self._distilled(request, may_train).weights), request.key
        entry = self._find(request.arch)
        if entry is None and self.cfg.teacher.auto_train and self.train and may_train:
            with self._claim(request.arch) as missing:
                if missing:
                    log.info("no %s teacher for %s in the zoo: training one first",
                             request.arch, self.dataset["name"])
                    self._train(teacher_run_config(self.cfg, request.arch, request.pretrained,
                                                   self.split))
            entry = self._find(request.arch)
        if entry is not None:
            log.info("teacher %s from the zoo: %s", request.arch, entry.weights)
            return str(entry.weights), request.key
        if request.pretrained:
            return None, f"{request.key}.pretrained"
        raise ConfigError(
            f"no trained '{request.arch}' for dataset '{self.dataset['name']}' in the teacher zoo "
            f"({self.zoo.root}){self._other_data(request.arch)}", key=request.key,
            hint="train it first:\n  " + teacher_training_command(
                self.cfg, self.overrides, request.arch, request.pretrained)
                 + f"\nor add teacher.auto_train=true to train it now, or point "
                   f"{request.checkpoint_key}=... at a weights file")

    def _distilled(self, request: TeacherRequest, may_train: bool) -> ZooEntry:
        """The zoo entry `<arch>@<made_by>-<parent>.<fingerprint>` of a distilled link (KD:
        `@kd-`), made now when missing (after its parent). The zoo always keeps links, whatever zoo.publish says: the
        next link, and every later run, loads them from there."""
        parent = request.distilled_from
        parent_weights, _ = self.weights(parent, may_train=may_train)
        zoo_name = (f"{request.arch}@{request.made_by}-{parent.arch}."
                    f"{link_fingerprint(parent_weights, parent.arch, request.distill_options)}")
        name = self.dataset["name"]
        entry = self._find(zoo_name)
        if entry is None and self.train is not None and may_train:
            with self._claim(zoo_name) as missing:
                if missing:
                    log.info("training %s (%s from %s) for the zoo", request.arch,
                             request.made_by, parent.arch)
                    acfg = zoo_run_config(self.cfg, student=request.arch, zoo_name=zoo_name,
                                          split=self.split,
                                          distiller={"name": request.made_by,
                                                     **request.distill_options})
                    acfg.teacher.name = parent.arch
                    acfg.teacher.pretrained = parent.pretrained and parent_weights is None
                    acfg.teacher.checkpoint = parent_weights
                    acfg.teacher.auto_train = False
                    summary = self._train(acfg)
                    meta = {"top1": summary["last_top1"], "best_top1": summary["best_top1"],
                            "epochs": summary["epochs"], "seed": self.cfg.seed,
                            "run_dir": str(Path(acfg.run_dir).resolve()),
                            "num_classes": self.num_classes, "split": self.split,
                            "distilled_from": parent.arch, "teacher_weights": parent_weights,
                            "teacher_sha256": (summary.get("teachers") or [{}])[0].get("sha256"),
                            request.made_by: request.distill_options}
                    weights = Path(acfg.run_dir) / "student.safetensors"
                    dist_utils.on_main(lambda: self.zoo.publish(name, zoo_name, weights, meta))
            entry = self._find(zoo_name)
        if entry is None:
            raise ConfigError(f"no {zoo_name} in the teacher zoo ({self.zoo.root})"
                              f"{self._other_data(zoo_name)}",
                              key=request.key, hint="run the distillation once to make it")
        log.info("%s from the zoo: %s (top-1 %s)", zoo_name, entry.weights, entry.meta.get("top1"))
        return entry

    @contextlib.contextmanager
    def _claim(self, zoo_name: str) -> Iterator[bool]:
        """Held while this job makes a zoo entry; yields whether it is still missing (another
        job may have made it while this one waited). Under DDP rank 0 holds the claim and tells
        the other ranks, which then train with it. While another job holds it, rank 0 tries
        again every few seconds and every rank hears each answer: a rank left inside one
        collective for the hours a teacher may train would hit the process group's timeout."""
        name = self.dataset["name"]
        with contextlib.ExitStack() as stack:
            if dist_utils.world_size() == 1:
                stack.enter_context(self.zoo.claim(name, zoo_name))
            else:
                told = False
                while True:
                    holder = None
                    if dist_utils.is_main_process():
                        try:
                            stack.enter_context(self.zoo.claim(name, zoo_name, wait=False))
                        except Locked as exc:
                            holder = exc.holder
                    holder = dist_utils.broadcast_object(holder)
                    if holder is None:
                        break
                    if not told and dist_utils.is_main_process():
                        log.info("waiting for %s, which is training %s/%s for the zoo", holder,
                                 name, zoo_name)
                    told = True
                    time.sleep(CLAIM_POLL_SECONDS)
            yield dist_utils.on_main(
                lambda: self.zoo.find(name, zoo_name, split=self.split,
                                      min_epochs=self.min_epochs) is None)

    def _train(self, config: DictConfig) -> dict[str, Any]:
        """A run that makes a zoo model: its own job, which leaves this run's random state (and
        so its student's initialisation) exactly as it was."""
        with preserved_rng():
            try:
                return self.train(config, overrides=[])
            except ConfigError as exc:   # e.g. its run directory holds a run it cannot resume
                # its trainer.epochs is this run's teacher.auto_train_epochs (or the recipe's)
                key = "teacher.auto_train_epochs" if exc.key == "trainer.epochs" else exc.key
                raise ConfigError(f"the run that makes a zoo model for this one, in "
                                  f"{config.run_dir}: {exc.message}", key=key,
                                  allowed=exc.allowed, hint=exc.hint) from None

    # the model
    def resolve(self, request: TeacherRequest, pinned: str | None = None) -> ResolvedTeacher:
        """The teacher of `request`. `pinned` (a resumed run's recorded sha256) must be met: a
        teacher from the zoo is taken by that digest (a better version may have become the
        current one since), torchvision's pretrained weights by theirs; weights named by a
        checkpoint option must still have it; otherwise the run is refused. Nothing is trained
        for a pinned request."""
        if pinned is not None and not request.checkpoint:
            found = self._pinned(request, pinned)
            if found is not None:
                return found
        try:
            source, key = self.weights(request, may_train=pinned is None)
        except ConfigError as exc:
            if pinned is None:
                raise
            raise ConfigError(
                f"the {request.role} ({request.arch}) this run started with (sha256 {pinned}) "
                f"is not in the teacher zoo ({self.zoo.root}) any more", key=exc.key,
                hint="put it back (the zoo version, or teacher.checkpoint=PATH), or start over "
                     "with trainer.resume=false (the old files go under previous/), or use "
                     "another run directory") from None
        if source is None:
            model = self._pretrained(request)
            digest, where = state_sha256(model), "torchvision's pretrained weights"
        else:
            digest, where = file_sha256(source), source
        if pinned is not None and digest != pinned:
            raise ConfigError(
                f"the {request.role} ({request.arch}) is not the one this run started with: "
                f"{where} has sha256 {digest}, the checkpoint recorded {pinned}, and the zoo "
                f"({self.zoo.root}) holds no weights with that digest", key=key,
                hint="put the original weights back, or start over with trainer.resume=false "
                     "(the old files go under previous/), or use another run directory")
        if source is not None:
            model = load_model(request.arch, source, key=key, num_classes=self.num_classes,
                               model_options=self.model_options)
        return ResolvedTeacher(request.role, request.arch, model, digest,
                               None if source is None else Path(source), where)

    def _pinned(self, request: TeacherRequest, pinned: str) -> ResolvedTeacher | None:
        """The weights with digest `pinned`: a zoo version, or torchvision's pretrained ones."""
        entry = self._find_digest(pinned)
        made = request.made_by if request.distilled_from is not None else None
        if entry is not None and made is not None and made in entry.meta \
                and entry.meta[made] != request.distill_options:
            # e.g. a specialist of other classes: the options were derived again and differ
            raise ConfigError(
                f"the {request.role} this run started with (sha256 {pinned[:16]}) was made by "
                f"{made} with {entry.meta[made]}, but the run now asks for "
                f"{request.distill_options}", key=request.key,
                hint="give the options by hand as they were (the log of the first start has "
                     "them), or start over with trainer.resume=false")
        if entry is not None and file_sha256(entry.weights) == pinned:
            log.info("%s %s: the weights this run started with (sha256 %s): %s",
                     request.role, request.arch, pinned[:16], entry.weights)
            model = load_model(request.arch, str(entry.weights), key=request.key,
                               num_classes=self.num_classes, model_options=self.model_options)
            return ResolvedTeacher(request.role, request.arch, model, pinned, entry.weights,
                                   str(entry.weights))
        if request.pretrained:
            try:
                model = self._pretrained(request)
            except (ConfigError, OSError):   # no hub cache, no network, or not a fitting head
                return None
            if state_sha256(model) == pinned:
                return ResolvedTeacher(request.role, request.arch, model, pinned, None,
                                       "torchvision's pretrained weights")
        return None

    def _pretrained(self, request: TeacherRequest) -> torch.nn.Module:
        teacher = create_model(request.arch, num_classes=self.num_classes, pretrained=True,
                               **self.model_options)
        if getattr(teacher, "head_replaced", False):
            raise ConfigError(
                f"{request.arch}'s pretrained head has a different number of classes than the "
                f"dataset ({self.num_classes}); distilling from an untrained head would teach "
                f"noise", key=f"{request.key}.pretrained",
                hint="fine-tune it first:\n  " + teacher_training_command(
                    self.cfg, self.overrides, request.arch, True))
        log.info("teacher %s: torchvision's pretrained weights, as they are", request.arch)
        return teacher
