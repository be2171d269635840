"""Export a finished run's student for deployment and measure it beside its teacher.

    report = export_run("outputs/demo/kd")        # writes outputs/demo/kd/export/

Writes `student.safetensors` (the weights plus what a deployer needs to feed them: model name,
class count, input shape, mean/std), `student.onnx` (dynamic batch dimension, checked against
torch) and `export.json` (params, FLOPs, CPU latency, test top-1 and file sizes of student and
teacher). Everything is written into a staging folder first and moved into place only when
all of it succeeded, so a failed export never leaves a half-written file behind.

The teacher is the one training used, found by the sha256 the run recorded (a zoo version, or
`teacher.checkpoint` if it still holds those weights; for TAKD, the root of the assistant chain,
by the digests the zoo's links record), never a newer zoo version and never trained; when it
cannot be found the student is still exported and the teacher's numbers say why they are missing.
A vanilla run (distiller=none) has no teacher: its numbers say "vanilla run: no teacher".
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from distill.catalog import DISTILLERS
from distill.checkpoint import save_weights
from distill.data import build_data
from distill.data.views import StudentViewInput
from distill.errors import ConfigError
from distill.export.int8 import CALIBRATION_IMAGES, compare_onnx, images_of, quantize_onnx
from distill.export.measure import Timing, cpu_latency_ms, cpu_threads, measure
from distill.export.onnx_file import (
    ONNX_ATOL, ONNX_CHECK_BATCHES, ExportError, check_onnx, compact_onnx, export_onnx,
    onnx_export_error, onnx_exporter)
from distill.export.run import (
    RUN_DIR_CONTENT, VANILLA_NO_TEACHER, FoundTeacher, TrainedRun, class_count, find_teacher,
    load_exit, load_student, read_run, run_dir_error, teacher_top1)
from distill.method import DataFree
from distill.models import create_model
from distill.models.measure import flops_per_image, parameter_count
from distill.teachers import load_state_into

EXPORT_FILES = ("student.safetensors", "student.onnx", "student.int8.onnx",
                "export.json")   # export.json last


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


def weights_metadata(run: TrainedRun, exit_number: int | None = None) -> dict[str, str]:
    """safetensors metadata is str -> str: lists are JSON. An exit's weights also say which."""
    meta = {"model": run.student, "num_classes": str(run.num_classes),
            "input_shape": json.dumps(list(run.input_shape)), "inputs": run.inputs.kind,
            "dataset": run.config["dataset"]["name"], "run_dir": str(run.path.resolve())}
    if run.model_options:   # what the model is built with besides its classes (vocab_size)
        meta.update(model_options=json.dumps(run.model_options))
    if run.mean and run.std:
        meta.update(mean=json.dumps(list(run.mean)), std=json.dumps(list(run.std)))
    if exit_number is not None:
        meta.update(exit=str(exit_number), method=run.config["distiller"]["name"])
    view = run.config["dataset"].get("student_view")
    if view:   # cross-modal KD: the model takes this rendering of the images, not the images
        meta.update(student_view=str(view))
    return meta


def export_run(run_dir: str | Path, out: str | Path | None = None, *, batch: int = 64,
               onnx: bool = True, threads: int = 1, zoo_root: str | Path | None = None,
               timing: Timing = Timing(), exit_number: int | None = None,
               int8: bool = False) -> dict[str, Any]:
    """Export the student of a finished run into `out` (default RUN_DIR/export) and measure it
    and its teacher. Returns what export.json holds. With `exit_number` N, the run's early
    exit N (BYOT's; the student up to that exit plus its head) takes the student's place, in
    RUN_DIR/export-exitN by default, with its top-1 from summary.json `models`.

    Latency is measured on `threads` CPU threads, 1 by default: single-thread numbers are the
    ones another machine can reproduce, and they do not collapse when other work shares the
    cores (on a busy 2-core machine, 2-thread medians of resnet8 swung from 4 ms to 300 ms).

    A run trained with `trainer.quantize=int8`, or `int8=True` for any run (post-training
    quantization), also gets `student.int8.onnx` (distill.export.int8), and export.json `int8`
    compares it with student.onnx in onnxruntime: bytes, latency, test top-1."""
    run = read_run(run_dir)
    trained_int8 = run.config.get("trainer", {}).get("quantize", "none") == "int8"
    int8 = int8 or trained_int8
    default = "export" if exit_number is None else f"export-exit{exit_number}"
    out = Path(out) if out is not None else run.path / default
    check_output_folder(out)
    exporter = onnx_exporter() if onnx else None   # before any work: a missing package is input
    if int8 and run.inputs.kind != "images":
        raise ConfigError(f"the int8 model's activations are calibrated on images; this run's "
                          f"inputs are {run.inputs.kind}", key="--int8",
                          allowed="no --int8 for this run")
    if int8 and exporter is None:
        raise ConfigError("the int8 model is made from student.onnx: --no-onnx leaves none"
                          + (" (this run trained with trainer.quantize=int8)" if trained_int8
                             else ""), key="--no-onnx")
    if exit_number is None:
        student, name, numbers = load_student(run), run.student, run.summary
    else:   # refused (--exit) before anything is written when the run has no such exit
        student, name = load_exit(run, exit_number), f"{run.student}:exit{exit_number}"
        numbers = (run.summary.get("models") or {}).get(f"exit{exit_number}") or {}
    teacher = find_teacher(run, zoo_root)
    batches = tuple(dict.fromkeys((1, batch)))
    with staged_export(out) as staging:
        save_weights(student.state_dict(), staging / "student.safetensors",
                     weights_metadata(run, exit_number))
        onnx_report = None
        if exporter:
            try:
                export_onnx(student, run.inputs, staging / "student.onnx", exporter)
            except Exception as exc:  # noqa: BLE001 - torch.onnx raises many types for one cause
                raise onnx_export_error(name, exporter, exc) from None
            compact_onnx(staging / "student.onnx")   # checked below, as written
            onnx_report = {"file": "student.onnx", "exporter": exporter,
                           **check_onnx(student, staging / "student.onnx", run.inputs),
                           "bytes": (staging / "student.onnx").stat().st_size}
        # other work on the machine makes CPU timings meaningless: record how busy it was
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        int8_report = (int8_export(run, staging, batches, threads, timing, trained_int8)
                       if int8 else None)
        with cpu_threads(threads):
            student_numbers = measure(student, run.inputs, batches, timing)
            teacher_numbers = (measure(teacher.model, run.inputs, batches, timing)
                               if teacher.model is not None else None)
        report = {
            "run_dir": str(run.path.resolve()), "out": str(out.resolve()),
            "dataset": run.config["dataset"]["name"], "num_classes": run.num_classes,
            "inputs": run.inputs.kind, "input_shape": list(run.input_shape),
            "mean": list(run.mean) if run.mean else None, "std": list(run.std) if run.std else None,
            "cpu_threads": threads, "cpu_count": os.cpu_count(), "load_average_1m": load,
            "batches": list(batches), "torch": torch.__version__,
            "stopped_early": run.summary.get("stopped_early", False),
            "student": {"model": name, **student_numbers,
                        "top1": numbers.get("last_top1"),
                        "best_top1": numbers.get("best_top1"),
                        "weights_bytes": (staging / "student.safetensors").stat().st_size},
            "teacher": {"model": teacher.name, "missing": teacher.missing,
                        **(teacher_numbers or {}), "top1": teacher.top1,
                        "weights": str(teacher.weights) if teacher.weights else None,
                        "weights_bytes": teacher.weights.stat().st_size if teacher.weights
                        else None},
            "onnx": onnx_report,
            **({"int8": int8_report} if int8_report else {}),
            **({"exit": exit_number} if exit_number is not None else {}),
            **({"student_view": run.config["dataset"]["student_view"]}
               if run.config["dataset"].get("student_view") else {}),
        }
        (staging / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def int8_export(run: TrainedRun, staging: Path, batches: tuple[int, ...], threads: int,
                timing: Timing, trained_int8: bool) -> dict[str, Any]:
    """student.int8.onnx from student.onnx, activations calibrated on training images, and
    both files measured in onnxruntime on the test split (a cross-modal student's on its view)."""
    dataset = run.config["dataset"]
    method = DISTILLERS.get(run.config["distiller"]["name"])
    options = {k: v for k, v in run.config["distiller"].items() if k != "name"}
    data_free = issubclass(method, DataFree)
    data = build_data(dataset, training_split=not data_free)
    if data_free:   # calibrated on the images it made: no training image is read
        made = method.made_images(run.path, options, run.input_shape, CALIBRATION_IMAGES)
        if made is None:
            raise run_dir_error(run.path, "the images this data-free run trained on are gone "
                                          "(synthetic/ or checkpoints/last.pt): nothing to "
                                          "calibrate the int8 model on")
        if made.dtype == torch.uint8:
            made = torch.stack([data.val.transform(image) for image in made])
        calibration, source = made.float().numpy(), f"{len(made)} images the method made"
    else:
        calibration, _ = images_of(data.train, getattr(data.val, "transform", None),
                                   CALIBRATION_IMAGES)
        source = f"{len(calibration)} training images"
    test = images_of(data.val, getattr(data.val, "transform", None))
    view = dataset.get("student_view")
    if view:
        render = StudentViewInput(view, data.mean, data.std)
        calibration, test = (render(None, (torch.from_numpy(calibration),))[0].numpy(),
                             (render(None, (torch.from_numpy(test[0]),))[0].numpy(), test[1]))
    quantize_onnx(staging / "student.onnx", staging / "student.int8.onnx", calibration)
    report = compare_onnx(staging / "student.onnx", staging / "student.int8.onnx", test,
                          run.input_shape, batches, threads, timing.budget_s)
    return {"weights": "trained on int8 weights (trainer.quantize=int8)" if trained_int8
            else "post-training quantization of float weights",
            "calibration": source, **report}


def reload_exported(path: str | Path) -> nn.Module:
    """The model of an exported student.safetensors, from its own metadata alone."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    if "exit" in meta:
        raise ConfigError(f"{path} is early exit {meta['exit']} of a {meta.get('method')} run, "
                          f"not a whole {meta['model']}: its ONNX file beside it runs it",
                          key="weights")
    model = create_model(meta["model"], num_classes=int(meta["num_classes"]),
                         **json.loads(meta.get("model_options", "{}")))
    load_state_into(model, load_file(str(path)), source=str(path), key="weights",
                    num_classes=int(meta["num_classes"]))
    return model.eval()


__all__ = ["EXPORT_FILES", "ONNX_ATOL", "ONNX_CHECK_BATCHES", "RUN_DIR_CONTENT",
           "VANILLA_NO_TEACHER", "ExportError", "FoundTeacher", "Timing", "TrainedRun",
           "check_onnx", "class_count", "cpu_latency_ms", "cpu_threads", "export_onnx",
           "export_run", "find_teacher", "flops_per_image", "load_exit", "load_student", "measure",
           "onnx_export_error", "onnx_exporter", "parameter_count", "read_run",
           "reload_exported", "run_dir_error", "teacher_top1"]
