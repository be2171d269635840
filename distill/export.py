"""Export a finished run's student for deployment and measure it beside its teacher.

    report = export_run("outputs/demo/kd")        # writes outputs/demo/kd/export/

Writes `student.safetensors` (the weights plus what a deployer needs to feed them: model name,
class count, input shape, mean/std), `student.onnx` (dynamic batch dimension, checked against
torch) and `export.json` (params, FLOPs, CPU latency, test top-1 and file sizes of student and
teacher). Everything is written into a staging folder first and moved into place only when
all of it succeeded, so a failed export never leaves a half-written file behind.

The teacher is found the way training found it (`teacher.checkpoint`, else the zoo); when it
cannot be found the student is still exported and the teacher's numbers say why they are missing.
A vanilla run (distiller=none) has no teacher: its numbers say "vanilla run: no teacher".
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distill.data.cifar import CIFAR10, CIFAR100
from distill.data.digits import DIGITS_MEAN, DIGITS_STD
from distill.data.fake import FAKE_MEAN, FAKE_STD
from distill.data.mnist5k import MNIST5K_MEAN, MNIST5K_STD
from distill.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from distill.engine.checkpoint import save_weights
from distill.errors import ConfigError
from distill.models import create_model, model_spec
from distill.teachers import load_model, load_state_into, teacher_weights
from distill.zoo import TeacherZoo

EXPORT_FILES = ("student.safetensors", "student.onnx", "export.json")   # export.json last
RUN_DIR_CONTENT = ".hydra/config.yaml, summary.json and student.safetensors"
ONNX_CHECK_BATCHES = (1, 3)   # neither is the batch of 2 exported with: proves the batch is dynamic
ONNX_ATOL = 1e-4              # per unit of logit magnitude: float32 rounding grows with it

VANILLA_NO_TEACHER = "vanilla run: no teacher"


class DatasetInputs(NamedTuple):
    """What a dataset feeds a model; None where only the run's dataset config can tell."""
    image_size: int | None
    num_classes: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


# The one table of per-dataset facts (tools/export.py and tools/report.py both read it), taken
# from the dataset modules' constants instead of building the dataset: the CIFAR and ImageNet
# builders need their data files, and neither an export nor a report does. A run's recorded
# dataset.image_size / dataset.num_classes win over it (see dataset_inputs).
DATASET_INPUTS: dict[str, DatasetInputs] = {
    "digits": DatasetInputs(32, 10, DIGITS_MEAN, DIGITS_STD),
    "mnist5k": DatasetInputs(32, 10, MNIST5K_MEAN, MNIST5K_STD),
    "cifar10": DatasetInputs(32, 10, CIFAR10.mean, CIFAR10.std),
    "cifar100": DatasetInputs(32, 100, CIFAR100.mean, CIFAR100.std),
    "fake": DatasetInputs(32, 10, FAKE_MEAN, FAKE_STD),   # size and classes: config keys
    "tiny_imagenet": DatasetInputs(64, 200, IMAGENET_MEAN, IMAGENET_STD),
    # ILSVRC-2012; a subset's count comes from the classifier in student.safetensors
    "imagenet": DatasetInputs(224, 1000, IMAGENET_MEAN, IMAGENET_STD),
    # class folders: read like ImageNet; size from dataset.image_size, classes from the weights
    "folder": DatasetInputs(None, None, IMAGENET_MEAN, IMAGENET_STD),
}
UNKNOWN_DATASET = DatasetInputs(None, None, None, None)


def dataset_inputs(dataset: dict) -> DatasetInputs:
    """DATASET_INPUTS' entry for a run's dataset config, its own image_size / num_classes on top."""
    known = DATASET_INPUTS.get(dataset.get("name"), UNKNOWN_DATASET)
    return known._replace(image_size=dataset.get("image_size") or known.image_size,
                          num_classes=dataset.get("num_classes") or known.num_classes)


class ExportError(Exception):
    """The exported model does not behave like the torch one (not a problem with the input)."""


# --- the run ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainedRun:
    path: Path
    config: dict            # the resolved config the run recorded in .hydra/config.yaml
    summary: dict           # summary.json
    weights: Path           # student.safetensors
    student: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


def run_dir_error(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"{path}: {problem} (expected a finished run directory of "
                       f"tools/train.py, holding {RUN_DIR_CONTENT})", key="RUN_DIR")


def read_run(path: str | Path) -> TrainedRun:
    """A finished run directory, or a ConfigError saying which file is missing and why."""
    path = Path(path)
    if not path.exists():
        raise run_dir_error(path, "no such directory")
    if not path.is_dir():
        raise run_dir_error(path, "not a directory")
    config_file, summary_file = path / ".hydra" / "config.yaml", path / "summary.json"
    weights = path / "student.safetensors"
    if not config_file.is_file():
        raise run_dir_error(path, "not a training run: no .hydra/config.yaml")
    if not summary_file.is_file() and not weights.is_file():
        # the trainer writes both at the very end of training
        raise ConfigError(f"{path}: unfinished run: no summary.json and no student.safetensors "
                          "yet; re-run its training command to finish it (it resumes)",
                          key="RUN_DIR")
    for file in (summary_file, weights):
        if not file.is_file():
            raise run_dir_error(path, f"no {file.name}")
    try:
        config = yaml.safe_load(config_file.read_text())
        summary = json.loads(summary_file.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise run_dir_error(path, f"unreadable {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0]}") from None
    if not isinstance(summary, dict) or not all(
            isinstance(config, dict) and isinstance(config.get(group), dict)
            and "name" in config[group] for group in ("dataset", "teacher", "student")):
        raise run_dir_error(path, "summary.json or .hydra/config.yaml is not a run's "
                                  "(no dataset/teacher/student names)")
    student, dataset = config["student"]["name"], config["dataset"]
    inputs = dataset_inputs(dataset)
    mean, std = inputs.mean, inputs.std
    size = inputs.image_size or model_spec(student).input_size
    if size is None:
        raise ConfigError(f"cannot tell the input size of dataset '{dataset['name']}'",
                          key="dataset.image_size")
    return TrainedRun(path=path, config=config, summary=summary, weights=weights, student=student,
                      num_classes=class_count(weights, student, dataset),
                      input_shape=(3, size, size),
                      mean=tuple(mean) if mean else None, std=tuple(std) if std else None)


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
    count = dataset_inputs(dataset).num_classes
    if count is None:
        raise ConfigError(f"cannot tell the class count of {weights}", key="student")
    return count


def load_student(run: TrainedRun) -> nn.Module:
    return load_model(run.student, str(run.weights), key="student.safetensors",
                      num_classes=run.num_classes).eval()


@dataclass(frozen=True)
class FoundTeacher:
    model: nn.Module | None
    name: str | None         # None for a vanilla run
    weights: Path | None     # None for torchvision's pretrained weights or when not found
    top1: float | None
    missing: str | None = None   # why there is no model


def find_teacher(run: TrainedRun, zoo_root: str | Path | None = None) -> FoundTeacher:
    """The run's teacher from where training took it; never trains one. A vanilla run
    (distiller=none) has none: its teacher.* keys are the unused defaults."""
    cfg = run.config
    if (cfg.get("distiller") or {}).get("name") == "none":
        return FoundTeacher(None, None, None, None, missing=VANILLA_NO_TEACHER)
    name = cfg["teacher"]["name"]
    # defaults for keys older runs did not record; auto_train off: an export never trains
    teacher = OmegaConf.create({"pretrained": False, "checkpoint": None, "auto_train_epochs": None,
                                **cfg["teacher"], "auto_train": False})
    lookup = OmegaConf.create({**cfg, "teacher": teacher})
    zoo = TeacherZoo(zoo_root or cfg.get("zoo", {}).get("root", "zoo"))

    def no_training(*_args: Any, **_kwargs: Any) -> dict:
        raise AssertionError("auto_train is off")

    try:
        source, key = teacher_weights(lookup, cfg["dataset"], zoo, [], train=no_training)
        if source is None:   # torchvision's pretrained weights, as training used them
            model = create_model(name, num_classes=run.num_classes, pretrained=True)
        else:
            model = load_model(name, source, key=key, num_classes=run.num_classes)
    except (ConfigError, OSError) as exc:   # OSError: pretrained weights not downloadable
        reason = exc.message if isinstance(exc, ConfigError) else str(exc)
        return FoundTeacher(None, name, None, None, missing=reason.splitlines()[0])
    return FoundTeacher(model.eval(), name, Path(source) if source else None,
                        teacher_top1(run, zoo, name))


def teacher_top1(run: TrainedRun, zoo: TeacherZoo, name: str) -> float | None:
    """summary.json's teacher_top1 (measured by the run on its test split); vanilla runs have
    none, and in TAKD it is the last assistant's: then the zoo's record of the teacher."""
    takd = bool(run.config.get("distiller", {}).get("assistants"))
    if run.summary.get("teacher_top1") is not None and not takd:
        return run.summary["teacher_top1"]
    entry = zoo.find(run.config["dataset"]["name"], name)
    return entry.meta.get("top1") if entry and not run.config["teacher"].get("checkpoint") else None


# --- measurements -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Median of at least `min_repeats` timed forwards (more while within `budget_s`)."""
    warmup: int = 3
    min_repeats: int = 5
    max_repeats: int = 30
    budget_s: float = 1.0


@contextlib.contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward at batch 1, as torch counts them: 2 per multiply-add of the convs
    and matmuls; normalisation, activations and bias additions are not counted."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape))
    return counter.get_total_flops()


def cpu_latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch: int,
                   timing: Timing = Timing()) -> float:
    """Median wall time of one forward of a `batch`, after warm-up (allocator, kernel choice)."""
    images = torch.randn(batch, *input_shape)
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(timing.warmup):
            model(images)
        started = time.perf_counter()
        while len(times) < timing.min_repeats or (
                len(times) < timing.max_repeats
                and time.perf_counter() - started < timing.budget_s):
            tick = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - tick)
    return 1000 * statistics.median(times)


def measure(model: nn.Module, input_shape: tuple[int, ...], batches: tuple[int, ...],
            timing: Timing) -> dict[str, Any]:
    return {"params": parameter_count(model),
            "flops_per_image": flops_per_image(model, input_shape),
            "latency_ms": {str(b): cpu_latency_ms(model, input_shape, b, timing) for b in batches}}


# --- ONNX -------------------------------------------------------------------------------------
def onnx_exporter() -> str:
    """torch's exporter that can run here: `dynamo` (torch.export based, the default since
    torch 2.9) needs onnx and onnxscript; the older `torchscript` one needs only onnx."""
    have = {name: importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript")}
    if have["onnx"] and have["onnxscript"]:
        return "dynamo"
    if have["onnx"]:
        return "torchscript"
    raise ConfigError("ONNX export needs the onnx package (and onnxscript for torch's current "
                      "exporter), which is not installed", key="--no-onnx",
                      hint="pip install 'distill[export]', or pass --no-onnx")


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path, exporter: str) -> None:
    """`images` [batch, C, H, W] -> `logits` [batch, classes], batch dynamic, one file."""
    example = (torch.randn(2, *input_shape),)   # not 1: torch.export specialises size-1 dims
    names = {"input_names": ["images"], "output_names": ["logits"]}
    if exporter == "dynamo":
        torch.onnx.export(model, example, str(path), dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False, **names)
    else:
        with warnings.catch_warnings():   # chosen knowingly: the only exporter without onnxscript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, example, str(path), dynamo=False,
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                              **names)


def onnx_export_error(model: str, exporter: str, exc: BaseException) -> ConfigError:
    """torch.onnx could not export this model (an operator or a pattern it does not support):
    one line naming it and what to do, instead of the exporter's pages of traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
    return ConfigError(f"torch.onnx ({exporter} exporter) cannot export {model}: {reason}; pass "
                       f"--no-onnx to export the weights without student.onnx (nothing was "
                       f"written)", key="--no-onnx")


def check_onnx(model: nn.Module, path: Path, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Run the file with onnxruntime on random batches and compare with torch; without
    onnxruntime, only validate the graph with onnx's checker."""
    if importlib.util.find_spec("onnxruntime") is None:
        import onnx

        onnx.checker.check_model(str(path), full_check=True)
        return {"check": "onnx.checker (onnxruntime not installed: outputs not compared)"}
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst, scale = 0.0, 1.0
    for batch in ONNX_CHECK_BATCHES:
        images = torch.randn(batch, *input_shape)
        with torch.inference_mode():
            expected = model(images).numpy()
        (got,) = session.run(["logits"], {"images": images.numpy()})
        if got.shape != expected.shape:
            raise ExportError(f"ONNX model gives {got.shape} logits for a batch of {batch}, "
                              f"torch gives {expected.shape}")
        worst = max(worst, float(abs(got - expected).max()))
        scale = max(scale, float(abs(expected).max()))
    if worst > ONNX_ATOL * scale:
        raise ExportError(f"ONNX model differs from torch by up to {worst:.2e} (allowed "
                          f"{ONNX_ATOL * scale:.2e} for logits up to {scale:.1f})")
    return {"check": "onnxruntime", "batches": list(ONNX_CHECK_BATCHES), "max_abs_diff": worst}


# --- writing ----------------------------------------------------------------------------------
def check_output_folder(out: Path) -> None:
    """A ConfigError (--out) when `out` cannot become the export folder: it is a file, or a
    folder it would be created in is one. Checked before any work, so nothing is written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; the export is a folder", key="--out")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"cannot create {out}: {parent} is a file, not a folder",
                                  key="--out")
            return


@contextlib.contextmanager
def staged_export(out: Path) -> Iterator[Path]:
    """A staging folder beside `out` (same file system, so moves are atomic renames). When the
    block succeeds its files replace `out`'s, export.json last; stale ones (a student.onnx from
    an earlier export, now --no-onnx) are removed. When it fails, `out` is left as it was."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", suffix=".tmp", dir=out.parent))
    except OSError as exc:   # e.g. a read-only folder
        raise ConfigError(f"cannot create {out}: {exc.strerror or exc}", key="--out") from None
    try:
        yield staging
        out.mkdir(exist_ok=True)
        for name in EXPORT_FILES:
            if (staging / name).exists():
                os.replace(staging / name, out / name)
            else:
                (out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def weights_metadata(run: TrainedRun) -> dict[str, str]:
    """safetensors metadata is str -> str: lists are JSON."""
    meta = {"model": run.student, "num_classes": str(run.num_classes),
            "input_shape": json.dumps(list(run.input_shape)),
            "dataset": run.config["dataset"]["name"], "run_dir": str(run.path.resolve())}
    if run.mean and run.std:
        meta.update(mean=json.dumps(list(run.mean)), std=json.dumps(list(run.std)))
    return meta


def export_run(run_dir: str | Path, out: str | Path | None = None, *, batch: int = 64,
               onnx: bool = True, threads: int = 1, zoo_root: str | Path | None = None,
               timing: Timing = Timing()) -> dict[str, Any]:
    """Export the student of a finished run into `out` (default RUN_DIR/export) and measure it
    and its teacher. Returns what export.json holds.

    Latency is measured on `threads` CPU threads, 1 by default: single-thread numbers are the
    ones another machine can reproduce, and they do not collapse when other work shares the
    cores (on a busy 2-core machine, 2-thread medians of resnet8 swung from 4 ms to 300 ms)."""
    run = read_run(run_dir)
    out = Path(out) if out is not None else run.path / "export"
    check_output_folder(out)
    exporter = onnx_exporter() if onnx else None   # before any work: a missing package is input
    student = load_student(run)
    teacher = find_teacher(run, zoo_root)
    batches = tuple(dict.fromkeys((1, batch)))
    with staged_export(out) as staging:
        save_weights(student.state_dict(), staging / "student.safetensors", weights_metadata(run))
        onnx_report = None
        if exporter:
            try:
                export_onnx(student, run.input_shape, staging / "student.onnx", exporter)
            except Exception as exc:  # noqa: BLE001 - torch.onnx raises many types for one cause
                raise onnx_export_error(run.student, exporter, exc) from None
            onnx_report = {"file": "student.onnx", "exporter": exporter,
                           **check_onnx(student, staging / "student.onnx", run.input_shape),
                           "bytes": (staging / "student.onnx").stat().st_size}
        # other work on the machine makes CPU timings meaningless: record how busy it was
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        with cpu_threads(threads):
            student_numbers = measure(student, run.input_shape, batches, timing)
            teacher_numbers = (measure(teacher.model, run.input_shape, batches, timing)
                               if teacher.model is not None else None)
        report = {
            "run_dir": str(run.path.resolve()), "out": str(out.resolve()),
            "dataset": run.config["dataset"]["name"], "num_classes": run.num_classes,
            "input_shape": list(run.input_shape),
            "mean": list(run.mean) if run.mean else None, "std": list(run.std) if run.std else None,
            "cpu_threads": threads, "cpu_count": os.cpu_count(), "load_average_1m": load,
            "batches": list(batches), "torch": torch.__version__,
            "stopped_early": run.summary.get("stopped_early", False),
            "student": {"model": run.student, **student_numbers,
                        "top1": run.summary.get("last_top1"),
                        "best_top1": run.summary.get("best_top1"),
                        "weights_bytes": (staging / "student.safetensors").stat().st_size},
            "teacher": {"model": teacher.name, "missing": teacher.missing,
                        **(teacher_numbers or {}), "top1": teacher.top1,
                        "weights": str(teacher.weights) if teacher.weights else None,
                        "weights_bytes": teacher.weights.stat().st_size if teacher.weights
                        else None},
            "onnx": onnx_report,
        }
        (staging / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def reload_exported(path: str | Path) -> nn.Module:
    """The model of an exported student.safetensors, from its own metadata alone."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    model = create_model(meta["model"], num_classes=int(meta["num_classes"]))
    load_state_into(model, load_file(str(path)), source=str(path), key="weights",
                    num_classes=int(meta["num_classes"]))
    return model.eval()
