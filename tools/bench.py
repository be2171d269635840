"""Throughput of the trainer against the kernel floor, per method and batch size.

    python tools/bench.py --methods kd --batches 64,128 --out docs/bench-cpu.md

(a) floor: the distiller's training step alone (student forward + backward + SGD step, the
    teacher's forward, the method's losses) on batches already on the device: no data
    pipeline, no logging, no bookkeeping. Nothing the trainer does can be faster.
(b) trainer: `distill.app.run`, the function tools/train.py calls, on fake CIFAR-size data for
    a fixed number of steps; images/s from its own train-loop timing windows (metrics.jsonl),
    the first window (warm-up) left out.
The ratio (b)/(a) is what the framework costs. Each figure is the median of --repeats runs,
interleaved (floor, trainer, floor, trainer, ...) so drifts of a noisy machine hit both.
--teacher-cache adds KD with teacher.cache=views, cold (an empty store) and warm (the same run
again: every row it reads is stored), and the student alone (distiller=none), with a table of
their ratios; --against-torchdistill adds KD in torchdistill 1.1.5.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill import cli_args  # noqa: E402
from distill.catalog import DISTILLERS  # noqa: E402
from distill.config import choices_of  # noqa: E402
from distill.errors import ConfigError  # noqa: E402
from distill.method import (BuildInfo, StepContext, TrainsOnViews,  # noqa: E402
                            build_distiller, teacher_requests)
from distill.models import create_model, list_models, model_spec  # noqa: E402
from distill.validation import method_options  # noqa: E402


def bench_teacher(arch: str) -> torch.nn.Module:
    """An untrained `arch` whose BatchNorm statistics are those of the random images the bench
    feeds it (a few train-mode forwards). Left at their initial unit variance, an untrained
    network's eval-mode activations grow block by block, and feature losses on them (CC's, VID's)
    overflow within a few steps; calibrated, its features have a trained network's scale."""
    model = create_model(arch, num_classes=100)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None   # a plain average over the calibration batches
    generator = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(64, 3, 32, 32, generator=generator))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def floor_images_per_sec(method: str, teacher: str, student: str, batch: int, steps: int,
                         warmup: int, device: torch.device,
                         memory_format: torch.memory_format = torch.channels_last,
                         compile: str = "none") -> float:
    torch.manual_seed(0)
    info = BuildInfo(model_spec(student), model_spec(teacher), (3, 32, 32), num_classes=100,
                     student_arch=student, train_labels=torch.arange(TRAIN_SIZE) % 100)
    cls = DISTILLERS.get(method)
    options = method_options(method, teacher, student, *main_stage_only(method),
                             *made_models(method, teacher, student, None)[1])
    teachers = {r.role: bench_teacher(r.arch)
                for r in teacher_requests(cls, options, {"name": teacher})}
    distiller = build_distiller(method, create_model(student, num_classes=100), teachers,
                                options, info).to(device, memory_format=memory_format)
    for what, parts in (("teacher", distiller.frozen_parts()),
                        ("student", distiller.evaluated_parts())):
        if compile in (what, "both"):
            for module in parts.values():
                module.compile()
    def sgd(params, constant=False, **overrides):
        return torch.optim.SGD(params, lr=BENCH_LR, momentum=0.9, weight_decay=5e-4), None

    optimizers = {name: pair[0] for name, pair in distiller.configure_optimizers(sgd).items()}
    images = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    targets = torch.randint(0, 100, (batch,), device=device)
    # past DKD's warm-up; the main stage; the batch's dataset indices (CRD's memory bank) and
    # the views a method trains on besides (MLKD's strong view; its augmentation is the data
    # pipeline's work, timed in the trainer column only)
    ctx = StepContext(epoch=30, step=0, epochs=240, indices=torch.arange(batch, device=device),
                      views={name: torch.randn_like(images) for name in
                             (distiller.views() if isinstance(distiller, TrainsOnViews) else {})})
    distiller.train()

    class Stepper:   # a manual step's backward and optimizer steps, nothing around them
        def backward(self, loss):
            loss.backward()

        def step(self, name):
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            return True

    def step() -> None:
        if distiller.traits.manual_step:
            distiller.training_step(images, targets, ctx, Stepper())
            return
        _, losses = distiller(images, targets, ctx)
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        for optimizer in optimizers.values():
            optimizer.step()

    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def trainer_images_per_sec(method: str, teacher: str, student: str, batch: int, steps: int,
                           warmup: int, workdir: Path, data_path: str, device: str,
                           compile: str = "none", zoo: Path | None = None,
                           extra: tuple[str, ...] = ()) -> float:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from distill.app import run
    from distill.preflight import register_models_named_in

    def weights_of(arch: str) -> Path:
        path = workdir / f"{arch}.safetensors"
        if not path.exists():
            save_file(bench_teacher(arch).state_dict(), str(path))
        return path

    gen0, made = made_models(method, teacher, student, weights_of)
    weights = weights_of(gen0)
    run_dir = workdir / f"run-{time.monotonic_ns()}"
    # log every `warmup` steps: the first window is the warm-up and is left out
    overrides = [f"distiller={method}", f"teacher={teacher}", f"student={student}",
                 "dataset=fake", "dataset.num_classes=100",
                 f"dataset.train_size={max(batch * (steps + warmup), TRAIN_SIZE)}",
                 "dataset.val_size=100", f"trainer.batch_size={batch}", "trainer.epochs=1",
                 f"trainer.max_steps={steps + warmup}", f"trainer.log_every={warmup}",
                 "trainer.progress=false", f"trainer.data_path={data_path}", "logger=jsonl",
                 f"teacher.checkpoint={weights}", f"zoo.root={zoo or workdir / 'zoo'}",
                 f"device={device}", f"trainer.compile={compile}", f"optimizer.lr={BENCH_LR}",
                 *main_stage_only(method), *made, *extra]
    register_models_named_in(overrides)
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    OmegaConf.set_struct(cfg, False)
    cfg.run_dir = str(run_dir)
    run(cfg)
    windows = [e["train/images_per_sec"] for e in map(json.loads, (run_dir / "metrics.jsonl").open())
               if e.get("event") == "train"]
    return statistics.median(windows[1:])


def torchdistill_images_per_sec(teacher: str, student: str, batch: int, steps: int, warmup: int,
                                device: torch.device) -> float:
    """KD in torchdistill (pip package; its DistillationBox, KDLoss T=4 alpha=0.9, SGD) on the same
    models and the same fake data with the same per-image pipeline, DataLoader without workers:
    how a torchdistill user trains. Timed over `steps` after `warmup` steps."""
    from torch.utils.data import RandomSampler
    from torchdistill.core.distillation import get_distillation_box

    from distill.data.fake import fake

    torch.manual_seed(0)
    data = fake(num_classes=100, train_size=batch * (steps + warmup), val_size=100)
    models = {"forward_proc": "forward_batch_only", "sequential": [], "frozen_modules": [],
              "forward_hook": {"input": [], "output": []}, "wrapper": None}
    kd = {"student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
          "teacher_module_io": "output", "temperature": 4.0, "alpha": 0.9, "reduction": "batchmean"}
    config = {
        "num_epochs": 1,
        "train_data_loader": {"dataset_id": "train", "kwargs": {"batch_size": batch, "num_workers": 0,
                                                                "drop_last": True},
                              "sampler": {"class_or_func": RandomSampler, "kwargs": {}}},
        "teacher": {**models, "requires_grad": False},
        "student": {**models, "adaptations": None, "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": kd}, "weight": 1.0}}}},
    }
    box = get_distillation_box(create_model(teacher, num_classes=100).to(device),
                               create_model(student, num_classes=100).to(device),
                               {"train": data.train}, config, device, None, False, 1)
    box.pre_epoch_process(epoch=0)
    start = time.perf_counter()
    for i, (images, targets, supp) in enumerate(box.train_data_loader):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        loss = box.forward_process(images.to(device), targets.to(device), supp)
        box.post_forward_process(loss=loss)
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        cpu += f"; GPU {torch.cuda.get_device_name()}"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


# CIFAR-100's training set size: the fake data's, so CRD's memory bank and its 16384 negatives
# are the reference's (a run stops at max_steps, long before an epoch ends)
TRAIN_SIZE = 50_000
# both columns' SGD lr. Speed does not depend on it; stability does: with the bench's untrained
# teacher on random images, CC's and VID's losses go non-finite within 8 steps at the recipe's 0.05.
BENCH_LR = 0.01

DATA_PATHS = [p for p in choices_of("trainer.data_path") if p != "auto"]   # "auto" would be one of these


# classes of the fake CIFAR-100-size data each benchmarked specialist models
BENCH_SUBSETS = [list(range(0, 10)), list(range(10, 20))]


def made_models(method: str, teacher: str, student: str,
                weights_of: Callable[[str], Path] | None) -> tuple[str, list[str]]:
    """(the architecture `teacher.checkpoint` must be, overrides) that give a method whose
    teachers are made from other teachers (zoo runs of the whole recipe) weights files instead:
    what is timed is the method's step, not the runs that make its models. Born-Again: one
    generation, of the student's architecture; specialists: two given subsets, each specialist
    the teacher's bench weights. `weights_of(arch)` writes a bench model's weights (None: the
    floor column, which builds the models itself)."""
    files = weights_of or (lambda arch: Path(f"{arch}.safetensors"))
    if method == "born_again":
        return student, ["distiller.generations=1"]
    if method == "specialists":
        subsets = ",".join("[" + ",".join(map(str, s)) + "]" for s in BENCH_SUBSETS)
        checkpoints = ",".join(str(files(teacher)) for _ in BENCH_SUBSETS)
        return teacher, [f"distiller.subsets=[{subsets}]",
                         f"distiller.specialist_checkpoints=[{checkpoints}]"]
    return teacher, []


def main_stage_only(method: str) -> list[str]:
    """Overrides that leave a method's stages out (init_epochs=0): what is timed, in both
    columns, is its main stage, where a run spends trainer.epochs of its time."""
    return ["distiller.init_epochs=0"] if "init_epochs" in method_options(method, "resnet56",
                                                                         "resnet20") else []


def data_paths(text: str) -> list[str]:
    """Comma-separated trainer data paths; `both` is memory,loader."""
    names = cli_args.registered_list("data path", lambda: [*DATA_PATHS, "both"])(text)
    paths = [p for name in names for p in (DATA_PATHS if name == "both" else [name])]
    if len(set(paths)) < len(paths):
        raise cli_args.Refusal(f"{text!r} names a data path twice (both = memory,loader)")
    return paths


OUT_SUFFIXES = (".md", ".markdown", ".txt")


def build_parser() -> cli_args.ArgumentParser:
    parser = cli_args.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = cli_args.registered("model", list_models)
    parser.add_argument("--teacher", default="resnet56", type=model)
    parser.add_argument("--student", default="resnet20", type=model)
    parser.add_argument("--methods", default=None,
                        type=cli_args.registered_list("method", DISTILLERS.list),
                        help="comma-separated (default: every registered method; a method "
                             "with stages is timed in its main stage)")
    parser.add_argument("--batches", default="64,128", type=cli_args.positive_int_list,
                        help="comma-separated batch sizes (default 64,128)")
    parser.add_argument("--steps", type=cli_args.positive_int, default=20,
                        help="timed steps per measurement")
    parser.add_argument("--warmup", type=cli_args.positive_int, default=5,
                        help="untimed steps before them (also the trainer's logging window)")
    parser.add_argument("--repeats", type=cli_args.positive_int, default=3,
                        help="measurements per figure (the median is reported)")
    parser.add_argument("--data-paths", default="memory", type=data_paths,
                        help="trainer data paths to measure, comma-separated: memory, loader; "
                             "both = memory,loader")
    parser.add_argument("--device", default="auto", type=cli_args.device,
                        help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--compile", default="none", choices=choices_of("trainer.compile"),
                        help="torch.compile in both measurements (warm-up steps absorb the compile)")
    parser.add_argument("--out", type=cli_args.output_file(OUT_SUFFIXES),
                        help="write the markdown table here (.md, .markdown or .txt)")
    parser.add_argument("--against-torchdistill", action="store_true",
                        help="also time KD in torchdistill (pip install torchdistill==1.1.5)")
    parser.add_argument("--teacher-cache", action="store_true",
                        help="also time KD with teacher.cache=views, cold (an empty cache) and "
                             "warm (every row the run reads stored), and the student alone "
                             "(distiller=none)")
    return parser


def validate(args: argparse.Namespace) -> None:
    if args.methods is None:
        args.methods = DISTILLERS.list()
    for flag, on in (("--against-torchdistill", args.against_torchdistill),
                     ("--teacher-cache", args.teacher_cache)):
        if on and "kd" not in args.methods:
            raise ConfigError("it times KD only; add kd to --methods", key=flag)
    if args.against_torchdistill:
        try:
            import torchdistill  # noqa: F401
        except ImportError:
            raise ConfigError("torchdistill is not installed (pip install torchdistill==1.1.5)",
                              key="--against-torchdistill") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every flag converted and checked; a bad one exits 2 with one error screen."""
    return build_parser().parse_checked(argv, validate)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except SystemExit as exc:   # a refused flag (its error is printed) or --help
        return exc.code
    try:
        table = measure_all(args, argv)
    except ConfigError as exc:   # e.g. a method that cannot run with this teacher and student
        return cli_args.error(exc.render())   # nothing was written
    except FloatingPointError as exc:   # a non-finite loss in a trainer measurement
        cli_args.error(f"{exc} (the bench's untrained teacher on random images); nothing was "
                       "written; --methods leaves a method out")
        return 3
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return 0


def measure_all(args: argparse.Namespace, argv: list[str]) -> str:
    """Every measurement; the markdown table."""
    import logging
    logging.getLogger("distill").setLevel(logging.WARNING)

    device, rows = args.device, []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for batch in args.batches:
                floors, trainers = [], {p: [] for p in args.data_paths}
                for _ in range(args.repeats):
                    floors.append(floor_images_per_sec(method, args.teacher, args.student, batch,
                                                       args.steps, args.warmup, device,
                                                       compile=args.compile))
                    for path in args.data_paths:
                        try:
                            trainers[path].append(trainer_images_per_sec(
                                method, args.teacher, args.student, batch, args.steps,
                                args.warmup, Path(tmp), path, str(device), args.compile))
                        except FloatingPointError as exc:   # its advice names a temporary run
                            raise FloatingPointError(
                                f"{method}, batch {batch}: {str(exc).split(';')[0]}") from None
                    if args.teacher_cache and method == "kd":
                        # a fresh store: the cold run fills the rows the warm run (same seed,
                        # same views) then reads
                        zoo = Path(tmp) / f"cache-{time.monotonic_ns()}"
                        for column in ("cold cache", "warm cache"):
                            trainers.setdefault(column, []).append(trainer_images_per_sec(
                                method, args.teacher, args.student, batch, args.steps,
                                args.warmup, Path(tmp), "memory", str(device), args.compile,
                                zoo=zoo, extra=("teacher.cache=views",)))
                        trainers.setdefault("student alone", []).append(trainer_images_per_sec(
                            "none", args.teacher, args.student, batch, args.steps, args.warmup,
                            Path(tmp), "memory", str(device), args.compile))
                    if args.against_torchdistill and method == "kd":
                        trainers.setdefault("torchdistill", []).append(torchdistill_images_per_sec(
                            args.teacher, args.student, batch, args.steps, args.warmup, device))
                floor = statistics.median(floors)
                row = {"method": method, "batch": batch, "floor": floor}
                for path, values in trainers.items():
                    row[path] = statistics.median(values)
                rows.append(row)
                print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()), flush=True)

    paths = list(args.data_paths)
    if args.teacher_cache:
        paths += ["cold cache", "warm cache", "student alone"]
    if args.against_torchdistill:
        paths.append("torchdistill")
    header = ("| method | batch | floor img/s | "
              + " | ".join(f"trainer ({p}) img/s | {p} / floor" for p in paths) + " |")
    lines = [f"{args.teacher} -> {args.student}, CIFAR-size (3x32x32, 100 classes), "
             f"{device.type}; {machine()}; torch.compile: {args.compile}; "
             f"median of {args.repeats} interleaved runs of "
             f"{args.steps} steps after {args.warmup} warm-up steps.", "",
             "```", "python tools/bench.py " + " ".join(argv), "```", "",
             header, "|" + "---|" * (3 + 2 * len(paths))]
    for row in rows:
        cells = [row["method"], str(row["batch"]), f"{row['floor']:.0f}"]
        for p in paths:
            cells += [f"{row[p]:.0f}", f"{row[p] / row['floor']:.2f}"] if p in row else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    if args.teacher_cache:
        lines += cache_ratios(rows, args.against_torchdistill)
    return "\n".join(lines) + "\n"


def cache_ratios(rows: list[dict], torchdistill: bool) -> list[str]:
    """The teacher-output cache's table: warm-cache KD against the student alone, no cache
    (the memory column) and torchdistill."""
    header = ("| batch | warm cache / student alone | warm cache / no cache | cold cache / no cache"
              + (" | warm cache / torchdistill" if torchdistill else "") + " |")
    lines = ["", "Teacher-output cache (teacher.cache=views), KD:", "", header,
             "|" + "---|" * (4 + torchdistill)]
    for row in rows:
        if "warm cache" not in row:
            continue
        uncached = row.get("memory")   # the cached runs take the in-memory path too
        cells = [str(row["batch"]), f"{row['warm cache'] / row['student alone']:.2f}",
                 f"{row['warm cache'] / uncached:.2f}" if uncached else "",
                 f"{row['cold cache'] / uncached:.2f}" if uncached else ""]
        if torchdistill:
            cells.append(f"{row['warm cache'] / row['torchdistill']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
