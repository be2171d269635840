"""The run an export reads: a finished run directory (distill.runs reads it), its student's
class count and inputs (images of a shape, or token ids of a length), and its teacher, found
where training took it (never trained)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from safetensors import safe_open
from torch import nn

from distill.catalog import DISTILLERS
from distill.checkpoint import read_checkpoint
from distill.data import dataset_facts
from distill.errors import ConfigError
from distill.inputs import InputSpec
from distill.method import BuildInfo, DerivedModels, build_distiller, teacher_requests
from distill.models import create_model, model_spec
from distill.runs import CONFIG_FILE, SUMMARY_FILE, WEIGHTS_FILE, read_run_dir
from distill.teachers import TeacherResolver, load_model
from distill.zoo import TeacherZoo

RUN_DIR_CONTENT = f"{CONFIG_FILE}, {SUMMARY_FILE} and {WEIGHTS_FILE}"
VANILLA_NO_TEACHER = "vanilla run: no teacher"



@dataclass(frozen=True)
class TrainedRun:
    path: Path
    config: dict            # the resolved config the run recorded in .hydra/config.yaml
    summary: dict           # summary.json
    weights: Path           # student.safetensors
    student: str
    num_classes: int
    input_shape: tuple[int, ...]   # an image's (C, H, W), or the tokens' (length,)
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    inputs: InputSpec = InputSpec("images", (3, 32, 32))
    model_options: dict = field(default_factory=dict)   # e.g. the vocabulary's size


def run_dir_error(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"{path}: {problem} (expected a finished run directory of "
                       f"tools/train.py, holding {RUN_DIR_CONTENT})", key="RUN_DIR")


def read_run(path: str | Path) -> TrainedRun:
    """A finished run directory, or a ConfigError saying which file is missing and why. A run
    stopped early by trainer.max_steps is taken (export.json says so)."""
    path = Path(path)
    if not path.exists():
        raise run_dir_error(path, "no such directory")
    if not path.is_dir():
        raise run_dir_error(path, "not a directory")
    record = read_run_dir(path)
    if record.config_problem == f"no {CONFIG_FILE}":
        raise run_dir_error(path, f"not a training run: {record.config_problem}")
    if record.summary_problem == f"no {SUMMARY_FILE}" and not record.weights.is_file():
        # the trainer writes both at the very end of training
        raise ConfigError(f"{path}: unfinished run: no {SUMMARY_FILE} and no {WEIGHTS_FILE} "
                          "yet; re-run its training command to finish it (it resumes)",
                          key="RUN_DIR")
    for problem in (record.config_problem, record.summary_problem):
        if problem:
            raise run_dir_error(path, problem)
    if not record.weights.is_file():
        raise run_dir_error(path, f"no {WEIGHTS_FILE}")
    config, summary = record.config, record.summary
    student, dataset = config["student"]["name"], config["dataset"]
    facts = dataset_facts(dataset)
    if facts.inputs == "tokens":
        spec = InputSpec("tokens", (facts.sequence_length,),
                         vocab_size=facts.model_options.get("vocab_size"))
    else:
        size = facts.image_size or model_spec(student).input_size
        if size is None:
            raise ConfigError(f"cannot tell the input size of dataset '{dataset['name']}'",
                              key="dataset.image_size")
        spec = InputSpec("images", (3, size, size))
    return TrainedRun(path=path, config=config, summary=summary, weights=record.weights,
                      student=student, num_classes=class_count(record.weights, student, dataset),
                      input_shape=spec.shape,
                      mean=tuple(facts.mean) if facts.mean else None,
                      std=tuple(facts.std) if facts.std else None, inputs=spec,
                      model_options=dict(facts.model_options))


def class_count(weights: Path, model: str, dataset: dict) -> int:
    """From the classifier's weight (what the file really holds), else from the dataset."""
    classifier = model_spec(model).classifier
    try:
        with safe_open(str(weights), framework="pt") as f:
            if classifier and f"{classifier}.weight" in f.keys():  # noqa: SIM118 - not a dict
                return f.get_slice(f"{classifier}.weight").get_shape()[0]
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise run_dir_error(weights.parent, f"student.safetensors is unreadable: "
                                            f"{str(exc).splitlines()[0]}") from None
    count = dataset_facts(dataset).num_classes
    if count is None:
        raise ConfigError(f"cannot tell the class count of {weights}", key="student")
    return count


def load_student(run: TrainedRun) -> nn.Module:
    return load_model(run.student, str(run.weights), key="student.safetensors",
                      num_classes=run.num_classes, model_options=run.model_options).eval()


def load_exit(run: TrainedRun, number: int) -> nn.Module:
    """Early exit `number` of the run (BYOT's `exitN`, 1 the shallowest): its method rebuilt
    from the recorded config on the exported student, the other trained parts (the exit heads)
    from checkpoints/last.pt. A ConfigError naming --exit when the run's method has no exits or
    not that one; nothing is written either way."""
    options = {k: v for k, v in run.config["distiller"].items() if k != "name"}
    method = run.config["distiller"]["name"]
    cls = DISTILLERS.get(method, key="distiller")
    if not issubclass(cls, DerivedModels):
        with_exits = [m for m in DISTILLERS.list()
                      if issubclass(DISTILLERS.get(m), DerivedModels)]
        raise ConfigError(f"this {method} run has no early exits (runs of {', '.join(with_exits)} "
                          "have them)", key="--exit",
                          allowed="no --exit: the run's student is exported")
    requests = teacher_requests(cls, options, {"pretrained": False, "checkpoint": None,
                                               **run.config["teacher"]})
    # stand-ins of the teachers' architectures: an exit is made of trained parts only
    teachers = {r.role: create_model(r.arch, num_classes=run.num_classes, **run.model_options)
                for r in requests}
    info = BuildInfo(student_spec=model_spec(run.student),
                     teacher_spec=model_spec(requests[0].arch) if requests else None,
                     input_shape=run.input_shape, num_classes=run.num_classes,
                     student_arch=run.student, seed=run.config.get("seed", 0),
                     **({"mean": run.mean, "std": run.std} if run.mean and run.std else {}))
    distiller = build_distiller(method, load_student(run), teachers, options, info)
    names = list(distiller.derived_models())
    if f"exit{number}" not in names:
        raise ConfigError(f"this {method} run has {len(names)} early exits, not an exit "
                          f"{number}", key="--exit",
                          allowed=", ".join(name.removeprefix("exit") for name in names))
    path = run.path / "checkpoints" / "last.pt"
    try:
        parts = read_checkpoint(path)["parts"]
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise run_dir_error(run.path, f"the exit heads are saved only in checkpoints/last.pt, "
                                      f"which cannot be read: {reason}") from None
    for role, module in distiller.trained_parts().items():
        if role == distiller.exported_role:   # the student: student.safetensors, as exported
            continue
        if role not in parts:
            raise run_dir_error(run.path, f"checkpoints/last.pt holds no '{role}' (the exit "
                                          "heads): not a checkpoint of this run's method")
        module.load_state_dict(parts[role])
    return distiller.derived_models()[f"exit{number}"].eval()


@dataclass(frozen=True)
class FoundTeacher:
    model: nn.Module | None
    name: str | None         # None for a vanilla run
    weights: Path | None     # None for torchvision's pretrained weights or when not found
    top1: float | None
    missing: str | None = None   # why there is no model


def find_teacher(run: TrainedRun, zoo_root: str | Path | None = None) -> FoundTeacher:
    """The teacher to compare the student with, from where training took it; never trains
    one. It is the first teacher the method asked for, or, for a distilled one (TAKD's
    assistant), the teacher at the root of its chain. A teacher the run recorded by sha256 is
    found by that digest, so a newer zoo version does not replace it. A method without a
    teacher (vanilla) has none: its teacher.* keys are the unused defaults."""

    cfg = run.config
    method = (cfg.get("distiller") or {}).get("name")
    cls = DISTILLERS.get(method, key="distiller")
    options = {k: v for k, v in cfg["distiller"].items() if k != "name"}
    # defaults for keys older runs did not record; auto_train off: an export never trains
    teacher = {"pretrained": False, "checkpoint": None, "auto_train_epochs": None,
               **cfg["teacher"], "auto_train": False}
    requests = teacher_requests(cls, options, teacher)
    if not requests:
        return FoundTeacher(None, None, None, None, missing=VANILLA_NO_TEACHER if method == "none"
                            else f"{method} run: no teacher")
    zoo = TeacherZoo(zoo_root or cfg.get("zoo", {}).get("root", "zoo"))
    recorded = {t.get("role"): t for t in run.summary.get("teachers") or [] if isinstance(t, dict)}
    request = requests[0]
    pinned = recorded.get(request.role, {}).get("sha256")
    # up a distilled chain: each zoo link records the digest of the teacher it was made from
    while request.distilled_from is not None:
        link = zoo.find_digest(cfg["dataset"]["name"], pinned) if pinned else None
        pinned = link.meta.get("teacher_sha256") if link is not None else None
        request = request.distilled_from
    lookup = OmegaConf.create({**cfg, "teacher": teacher})
    resolver = TeacherResolver(lookup, cfg["dataset"], run.num_classes, zoo, [], train=None,
                               model_options=run.model_options)
    try:
        found = resolver.resolve(request, pinned)
    except (ConfigError, OSError) as exc:   # OSError: pretrained weights not downloadable
        reason = exc.message if isinstance(exc, ConfigError) else str(exc)
        return FoundTeacher(None, request.arch, None, None, missing=reason.splitlines()[0])
    return FoundTeacher(found.model.eval(), request.arch, found.weights,
                        teacher_top1(run, zoo, found.sha256, request is requests[0]))


def teacher_top1(run: TrainedRun, zoo: TeacherZoo, sha256: str, used: bool) -> float | None:
    """The run's own measurement when that teacher is the one `used` in training (its test
    split); else (TAKD's root teacher) the zoo's record of the version with that digest."""
    if used:
        recorded = [t.get("top1") for t in run.summary.get("teachers") or []
                    if isinstance(t, dict) and t.get("sha256") == sha256]
        return recorded[0] if recorded else run.summary.get("teacher_top1")
    entry = zoo.find_digest(run.config["dataset"]["name"], sha256)
    return entry.meta.get("top1") if entry is not None else None
