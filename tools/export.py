#!/usr/bin/env python
"""Export a finished run's student (safetensors + ONNX) and compare it with its teacher.

    python tools/export.py outputs/demo/kd                 # writes outputs/demo/kd/export/
    python tools/export.py RUN_DIR --out DIR --batch 32 --threads 4 --no-onnx
    python tools/export.py outputs/.../byot --exit 1   # early exit 1 -> RUN_DIR/export-exit1/
    python tools/export.py RUN_DIR --int8   # also student.int8.onnx (automatic for runs trained
                                            # with trainer.quantize=int8)

Prints params, FLOPs, CPU latency, test top-1 and file sizes side by side; the same numbers
go to export.json. Exit status: 0 done, 2 bad input or a model torch.onnx cannot export (use
--no-onnx; nothing written), 1 the ONNX model does not match torch (nothing written).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distill import cli_args
from distill.cli import print_error
from distill.errors import ConfigError
from distill.export import ExportError, Timing, export_run, run_dir_error


def run_dir(text: str) -> Path:
    """A folder (that it is a finished run is checked by export_run, before anything is
    written)."""
    path = Path(cli_args.non_empty(text))
    try:
        problem = None if path.is_dir() else "not a directory" if path.exists() else \
            "no such directory"
    except OSError as exc:   # e.g. a name too long for the file system
        problem = exc.strerror or str(exc)
    if problem:
        raise cli_args.Refusal(run_dir_error(path, problem).message)
    return path


def threads(text: str) -> int:
    count, cores = cli_args.positive_int(text), os.cpu_count() or 1
    if count > cores:
        raise cli_args.Refusal(f"this machine has {cores} CPU cores; expected 1 to {cores}, "
                               f"got {count}")
    return count


def build_parser() -> cli_args.ArgumentParser:
    parser = cli_args.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", type=run_dir,
                        help="a finished run of tools/train.py")
    parser.add_argument("--out", type=cli_args.output_folder,
                        help="output folder (default: RUN_DIR/export)")
    parser.add_argument("--batch", type=cli_args.positive_int, default=64,
                        help="batch size of the second latency measurement (default 64)")
    parser.add_argument("--threads", type=threads, default=1,
                        help="CPU threads for the latency measurements, at most the machine's "
                             "cores (default 1: the most reproducible; more shows what this "
                             "machine can do)")
    parser.add_argument("--zoo", type=cli_args.existing_dir,
                        help="teacher zoo root (default: the run's zoo.root)")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false",
                        help="skip student.onnx (no onnx packages needed)")
    parser.add_argument("--exit", dest="exit_number", metavar="N", type=cli_args.positive_int,
                        help="export early exit N of a run whose method has exits (byot; 1 is "
                             "the shallowest) instead of the student: the student up to that "
                             "exit and its head (default folder: RUN_DIR/export-exitN)")
    parser.add_argument("--int8", action="store_true",
                        help="also write student.int8.onnx (onnxruntime QDQ: int8 weights per "
                             "channel, uint8 activations calibrated on training images) and "
                             "compare it with student.onnx: automatic for a run trained with "
                             "trainer.quantize=int8, post-training quantization for others")
    parser.add_argument("--budget", type=cli_args.non_negative_float, default=1.0,
                        help=f"seconds spent timing each model and batch size: at least "
                             f"{Timing.min_repeats} timed forwards, more while within the "
                             f"budget, at most {Timing.max_repeats} (default 1; 0: "
                             f"{Timing.min_repeats} only)")
    return parser


def validate(args: argparse.Namespace) -> None:
    if args.out is not None and args.out.resolve() == args.run_dir.resolve():
        raise ConfigError(f"{args.out} is the run directory: the export would replace the "
                          "run's own student.safetensors; give another folder (default: "
                          "RUN_DIR/export)", key="--out")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every flag converted and checked (creating nothing); a bad one exits 2 with one error
    screen."""
    return build_parser().parse_checked(argv, validate)


def number(value: float | None, unit: str = "", scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value / scale:,.{digits}f}{unit}"


def ratio(student: float | None, teacher: float | None) -> str:
    return f"{student / teacher:.2f}x" if student is not None and teacher else "-"


def comparison_table(report: dict) -> Table:
    student, teacher = report["student"], report["teacher"]
    onnx = report["onnx"]
    if teacher["model"] is None:   # distiller=none
        which = teacher["missing"]
    else:
        which = f"teacher {teacher['model']}{' (unavailable)' if teacher['missing'] else ''}"
    tokens = report.get("inputs") == "tokens"
    shape = (f"{report['input_shape'][0]} tokens" if tokens
             else "x".join(map(str, report["input_shape"])))
    table = Table(title=f"{report['dataset']} ({shape}, {report['num_classes']} classes): "
                        f"{which}, student {student['model']}")
    for column in ("", "teacher", "student", "student / teacher"):
        table.add_column(column, justify="left" if not column else "right")

    def row(label: str, key: str, fmt) -> None:
        s, t = student.get(key), teacher.get(key)
        table.add_row(label, fmt(t), fmt(s), ratio(s, t))

    row("params", "params", lambda v: number(v, digits=0))
    row("FLOPs / sequence" if tokens else "FLOPs / image", "flops_per_image",
        lambda v: number(v, " M", 1e6, 1))
    for b in report["batches"]:
        s, t = student["latency_ms"][str(b)], (teacher.get("latency_ms") or {}).get(str(b))
        table.add_row(f"CPU latency, batch {b}", number(t, " ms"), number(s, " ms"), ratio(s, t))
    table.add_row("test top-1 (last)", number(teacher.get("top1"), " %"),
                  number(student["top1"], " %"), "-")
    row("weights file", "weights_bytes", lambda v: number(v, " MB", 1e6, 2))
    table.add_row("ONNX file", "-", number(onnx["bytes"], " MB", 1e6, 2) if onnx else "skipped",
                  "-")
    return table


def int8_table(report: dict) -> Table:
    """The float and the int8 ONNX file side by side, as onnxruntime runs them."""
    int8 = report["int8"]
    table = Table(title="student.onnx (float32) and student.int8.onnx, in onnxruntime")
    for column in ("", "float32", "int8", "int8 / float32"):
        table.add_column(column, justify="left" if not column else "right")
    f32, i8 = int8["float32"], int8["int8"]
    table.add_row("file", number(f32["bytes"], " MB", 1e6, 3), number(i8["bytes"], " MB", 1e6, 3),
                  f"1/{int8['size_ratio']:.2f}")
    for b in report["batches"]:
        a, q = f32["latency_ms"][str(b)], i8["latency_ms"][str(b)]
        table.add_row(f"CPU latency, batch {b}", number(a, " ms"), number(q, " ms"), ratio(q, a))
    table.add_row("test top-1", number(f32["top1"], " %"), number(i8["top1"], " %"),
                  f"{-int8['top1_drop']:+.2f} points")
    return table


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:   # a refused flag (its error is printed) or --help
        return exc.code
    try:
        report = export_run(args.run_dir, args.out, batch=args.batch, onnx=args.onnx,
                            threads=args.threads, zoo_root=args.zoo,
                            timing=Timing(budget_s=args.budget), exit_number=args.exit_number,
                            int8=args.int8)
    except ConfigError as exc:
        print_error(exc)
        return 2
    except ExportError as exc:
        print_error(exc)
        return 1
    console = Console(highlight=False, soft_wrap=True)
    console.print(comparison_table(report))
    if report.get("int8"):
        console.print(int8_table(report))
    notes = [(f"CPU latency: median ms per batch, torch.inference_mode, "
              f"{report['cpu_threads']} CPU thread{'s' * (report['cpu_threads'] != 1)}, "
              f"torch {report['torch']}"),
             "FLOPs: torch.utils.flop_counter (2 per multiply-add of convs and matmuls)"]
    load, cores = report["load_average_1m"], report["cpu_count"]
    if load is not None and cores and load > cores:
        notes.append(f"warning: the machine was busy (load average {load:.1f} on {cores} "
                     f"cores): the latencies above are not reliable")
    if report["teacher"]["missing"] and report["teacher"]["model"] is not None:
        notes.append(f"teacher {report['teacher']['model']} unavailable: "
                     f"{report['teacher']['missing']}")
    if report["stopped_early"]:
        notes.append("this run was stopped early by trainer.max_steps: a smoke run")
    onnx = report["onnx"]
    if onnx and "max_abs_diff" in onnx:
        axes = "dynamic batch and sequence" if report.get("inputs") == "tokens" else "dynamic batch"
        notes.append(f"ONNX ({onnx['exporter']} exporter, {axes}): onnxruntime matches "
                     f"torch on batches {', '.join(map(str, onnx['batches']))} "
                     f"(max abs diff {onnx['max_abs_diff']:.1e})")
    elif onnx:
        notes.append(f"ONNX ({onnx['exporter']} exporter): {onnx['check']}")
    if report.get("int8"):
        notes.append(f"int8: {report['int8']['weights']}; activations calibrated on "
                     f"{report['int8']['calibration']}; both files run in onnxruntime "
                     f"(CPU, {report['cpu_threads']} thread{'s' * (report['cpu_threads'] != 1)})")
    notes.append(f"written: {report['out']}/ (student.safetensors, "
                 f"{'student.onnx, ' if onnx else ''}"
                 f"{'student.int8.onnx, ' if report.get('int8') else ''}export.json)")
    for note in notes:
        console.print(note, markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
