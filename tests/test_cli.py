"""The command line, end to end, in subprocesses: bad input gives one short error screen (no
traceback), good input gives a complete run directory.

Each subprocess pays ~4 s of imports, so the commands the selected tests need are started
together once per module (as many at a time as there are CPU cores) and each test checks its own
result. Nothing is written into the repository: every command gets its own temporary
hydra.run.dir / hydra.sweep.dir, teacher zoo (DISTILL_ZOO) and data root (DISTILL_DATA).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from _planted import PlantedCode
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "tools" / "train.py"
CONSOLE_SCRIPT = Path(sys.executable).with_name("distill-train")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
SMOKE = ["trainer.max_steps=2", "logger=jsonl", "trainer.progress=false"]
METHODS = ["none", "kd", "dkd", "fitnet", "at", "rkd", "takd", "noisy_kd"]


@dataclass(repr=False)
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    home: Path          # this command's private temporary folder

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __repr__(self) -> str:  # shown by failing asserts
        return (f"$ {' '.join(self.args)}\nexit {self.returncode}\n--- stdout\n{self.stdout[-3000:]}"
                f"\n--- stderr\n{self.stderr[-3000:]}")


# --- the bad-input table ----------------------------------------------------------------------
# id: (overrides, exit code (None: any non-zero, Hydra's own compose errors), key named first,
#      regexes the output must match, xfail reason or None)
# `{home}` is the command's temporary folder; `{t10}`/`{t100}` are resnet8 weight files for 10 and
# 100 classes, `{evil}` a .pt pickle that would run code, `{garbage}` a damaged .safetensors. Unless a case sets them, commands get dataset=fake distiller=none
# trainer.epochs=1, so a wrongly accepted command trains briefly instead of downloading.
BAD = {
    "unknown-distiller": (["distiller=kdd"], 2, "distiller",
                          [r"'kdd'", r"did you mean:[^\n]*\bkd\b"], None),
    "unknown-student": (["student=resnet2"], 2, "student",
                        [r"'resnet2'", r"did you mean:[^\n]*\bresnet20\b"], None),
    "unknown-teacher": (["distiller=kd", "teacher=resnet5"], 2, "teacher",
                        [r"'resnet5'", r"did you mean:[^\n]*\bresnet56\b"], None),
    "unknown-dataset": (["dataset=cifar1000"], 2, "dataset",
                        [r"'cifar1000'", r"did you mean:[^\n]*\bcifar100\b"], None),
    "unknown-logger": (["logger=tensorbord"], 2, "logger",
                       [r"'tensorbord'", r"did you mean:[^\n]*\btensorboard\b"], None),
    "unknown-distiller-option": (
        ["distiller=kd", "+distiller.temprature=2", "teacher=resnet8", "teacher.checkpoint={t10}"],
        2, "distiller.temprature", [r"\btemperature\b"], None),
    "unknown-distiller-option-before-teacher-lookup": (
        ["distiller=kd", "+distiller.temprature=2"], 2, "distiller.temprature",
        [r"\btemperature\b"], None),
    "unknown-distiller-option-without-plus": (
        ["distiller=kd", "distiller.temprature=2"], None, None, [r"distiller\.temprature"], None),
    "wrong-type": (["optimizer.lr=abc"], None, None, [r"optimizer\.lr", r"abc"], None),
    "wrong-type-in-recipe": (
        ["dataset.recipe.lr=abc"], 2, "optimizer.lr", [r"dataset\.recipe\.lr", r"abc"], None),
    "negative-lr": (["optimizer.lr=-0.1"], 2, "optimizer.lr", [r"-0\.1"], None),
    "zero-epochs": (["trainer.epochs=0"], 2, "trainer.epochs", [r"\b0\b"], None),
    "missing-dataset-files": (
        ["dataset=cifar100", "dataset.root={home}/nodata", "dataset.download=false"], 2,
        "dataset.root", [r"cifar-100-python\.tar\.gz", re.escape("nodata")], None),
    "missing-teacher": (
        ["distiller=kd", "teacher=resnet8"], 2, "teacher",
        [r"distiller=none", r"student=resnet8", r"dataset=fake", r"teacher\.auto_train=true"],
        None),
    "unbridgeable-hint-layers": (
        ["distiller=fitnet", "teacher=resnet8", "teacher.checkpoint={t10}",
         "distiller.student_layer=layer3", "distiller.teacher_layer=layer1"], 2,
        "distiller.student_layer", [r"no connector", r"\(64, 8, 8\)", r"\(16, 32, 32\)"], None),
    "unknown-hint-layer": (
        ["distiller=fitnet", "teacher=resnet8", "teacher.checkpoint={t10}",
         "distiller.student_layer=layr2"], 2, "distiller.student_layer",
        [r"'layr2'", r"did you mean:[^\n]*\blayer2\b"], None),
    "hint-layer-not-a-string": (
        ["distiller=fitnet", "distiller.student_layer=[layer2]"], 2, "distiller.student_layer",
        [r"expected a string or null"], None),
    "attention-layers-not-a-list": (
        ["distiller=at", "distiller.student_layers=layer2"], 2, "distiller.student_layers",
        [r"expected a list of strings or null"], None),
    "unknown-assistant": (
        ["distiller=takd", "distiller.assistants=[resnet3]"], 2, "distiller.assistants",
        [r"'resnet3'", r"did you mean:[^\n]*\bresnet32\b"], None),
    "noise-fraction-out-of-range": (
        ["distiller=noisy_kd", "distiller.fraction=1.5"], 2, "distiller.fraction",
        [r"1\.5", r"\[0, 1\]"], None),
    "class-count-mismatch": (
        ["distiller=kd", "teacher=resnet8", "teacher.checkpoint={t100}"], 2, "teacher.checkpoint",
        [r"size mismatch", r"\b10 classes\b", r"\b100\b"], None),
    "unknown-top-level-key": (["trainr.epochs=3"], None, None, [r"'trainr'"], None),
    "unknown-trainer-key-with-plus": (
        ["+trainer.epoch=3"], 2, "trainer.epoch", [r"did you mean:[^\n]*\bepochs\b"], None),
    "unknown-top-level-key-with-plus": (["+lr=0.1"], 2, "lr", [r"unknown key"], None),
    "int-not-a-number": (
        ["trainer.batch_size=abc"], None, None, [r"trainer\.batch_size", r"'abc'", r"Integer"],
        None),
    "missing-mandatory-value": (
        ["student.name=???"], 2, "student.name", [r"Missing mandatory value"], None),
    "null-for-a-required-value": (
        ["optimizer.lr=null"], None, None, [r"optimizer\.lr", r"not Optional"], None),
    "null-data-root": (
        ["dataset=cifar100", "dataset.root=null"], 2, "dataset.root", [r"expected a string"],
        None),
    "unwritable-run-dir": (
        ["hydra.run.dir={t10}/run"], 2, "run_dir", [r"cannot write", re.escape("resnet8_10")],
        None),
    "unwritable-run-dir-by-its-own-key": (
        ["run_dir={t10}/run"], 2, "run_dir", [r"cannot write", r"is a file, not a folder"], None),
    "teacher-checkpoint-carries-code": (
        ["distiller=kd", "teacher=resnet8", "teacher.checkpoint={evil}"], 2,
        "teacher.checkpoint", [r"refused to load", r"not a plain weights file", r"posix\.system"],
        None),
    "teacher-checkpoint-damaged": (
        ["distiller=kd", "teacher=resnet8", "teacher.checkpoint={garbage}"], 2,
        "teacher.checkpoint", [r"not a valid safetensors file"], None),
}


def bad_args(case: str, home: Path, weights: dict[str, Path]) -> list[str]:
    overrides = [o.format(home=home, **weights) for o in BAD[case][0]]
    defaults = {"dataset": "dataset=fake", "distiller": "distiller=none",
                "trainer.epochs": "trainer.epochs=1"}
    for key, value in defaults.items():
        if not any(o.split("=", 1)[0] == key for o in overrides):
            overrides.append(value)
    return [*overrides, *SMOKE]


# --- positive commands ------------------------------------------------------------------------
def good_args(name: str, home: Path) -> list[str]:
    if name == "multirun":
        return ["-m", "distiller=none,kd", "dataset=fake", "student=resnet8", "teacher=resnet8",
                "teacher.auto_train=true", "trainer.epochs=1", *SMOKE,
                f"hydra.sweep.dir={home}/sweep"]
    if name == "every-method":
        return ["-m", f"distiller={','.join(METHODS)}", "dataset=fake", "student=resnet8",
                "teacher=resnet14", "teacher.auto_train=true", "teacher.auto_train_epochs=1",
                *SMOKE, f"hydra.sweep.dir={home}/sweep"]
    if name == "benchmark":   # the command line narrows the benchmark's grid to one job
        return ["-m", "benchmark=digits", "distiller=none", "seed=1", "trainer.epochs=1", *SMOKE,
                f"hydra.sweep.dir={home}/sweep"]
    if name == "console-script":
        return ["--cfg", "job", "distiller=none", "student=resnet8", "dataset=digits"]
    if name == "help":
        return ["--help"]
    raise KeyError(name)


def needs_runs(*names: str):
    """Declare which positive commands a test reads (so only selected tests start commands)."""
    def mark(fn):
        fn.cli_runs = names
        return fn
    return mark


# --- running ----------------------------------------------------------------------------------
def _run(name: str, home: Path, weights: dict[str, Path]) -> Result:
    home.mkdir(parents=True)
    if name in BAD:
        program, args = [sys.executable, str(TRAIN)], bad_args(name, home, weights)
    elif name == "console-script":
        program, args = [str(CONSOLE_SCRIPT)], good_args(name, home)
    else:
        program, args = [sys.executable, str(TRAIN)], good_args(name, home)
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args = [*args, f"hydra.run.dir={home}/run"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("HYDRA_FULL_ERROR", "FORCE_COLOR", "CUDA_VISIBLE_DEVICES")}
    env.update(DISTILL_ZOO=str(home / "zoo"), DISTILL_DATA=str(home / "data"),
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", COLUMNS="120")
    if not Path(program[0]).exists():
        return Result(program + args, -1, "", f"{program[0]} does not exist", home)
    try:
        proc = subprocess.run(program + args, cwd=home, env=env, capture_output=True, text=True,
                              timeout=180)
    except subprocess.TimeoutExpired as exc:
        return Result(program + args, -9, str(exc.stdout), f"timed out\n{exc.stderr}", home)
    return Result(program + args, proc.returncode, ANSI.sub("", proc.stdout),
                  ANSI.sub("", proc.stderr), home)


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory) -> dict[str, Path]:
    """resnet8 weights for 10 classes (fits dataset=fake) and for 100 classes (does not); a
    checkpoint that would run code when unpickled (creating `marker`), and a damaged one."""
    import torch
    from safetensors.torch import save_file

    from distill.models import create_model

    folder = tmp_path_factory.mktemp("weights")
    paths = {}
    for classes in (10, 100):
        paths[f"t{classes}"] = folder / f"resnet8_{classes}.safetensors"
        save_file(create_model("resnet8", num_classes=classes).state_dict(), paths[f"t{classes}"])
    paths["marker"] = folder / "PLANTED_CODE_RAN"
    paths["evil"] = folder / "evil.pt"
    torch.save({"model": PlantedCode(paths["marker"])}, paths["evil"])
    paths["garbage"] = folder / "damaged.safetensors"
    paths["garbage"].write_bytes(paths["t10"].read_bytes()[:1000])
    return paths


@pytest.fixture(scope="module")
def results(request, tmp_path_factory, teacher_weights) -> dict[str, Result]:
    """Run every command the selected tests of this module need, several at a time."""
    wanted: list[str] = []
    for item in request.session.items:
        if item.module is not request.module:
            continue
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "case" in callspec.params:
            wanted.append(callspec.params["case"])
        wanted.extend(getattr(item.function, "cli_runs", ()))
    # the longest ones first
    wanted = sorted(set(wanted), key=lambda n: n not in ("every-method", "multirun"))
    root = tmp_path_factory.mktemp("cli")
    workers = max(2, min(len(wanted), os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {n: pool.submit(_run, n, root / n, teacher_weights) for n in wanted}
    return {n: f.result() for n, f in futures.items()}


# --- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=spec[4])) if spec[4] else c
    for c, spec in BAD.items()])
def test_bad_input(results, teacher_weights, case):
    _, code, key, patterns, _ = BAD[case]
    r = results[case]
    assert r.returncode != 0, r
    assert r.returncode not in (-9, -1), r
    assert "Traceback" not in r.output, r
    if code is not None:
        # a ConfigError: exit 2 and one short `error: key: message` screen on stderr
        assert r.returncode == code, r
        lines = r.stderr.strip().splitlines()
        assert lines and lines[0].startswith(f"error: {key}: "), r
        assert len(lines) <= 8, r
    for pattern in patterns:
        assert re.search(pattern, r.output), f"no match for {pattern!r}\n{r}"
    assert not (r.home / "run" / "summary.json").exists(), "a bad command must not train"
    # refused before the run record is written: nothing half-written to mistake for a run
    assert not (r.home / "run" / ".hydra").exists(), "the run record was written"
    assert not (r.home / "run" / "metrics.jsonl").exists(), "metrics were written"
    assert not teacher_weights["marker"].exists(), "a planted pickle ran"


# --- good input -------------------------------------------------------------------------------
@needs_runs("console-script")
def test_console_script_cfg_job_prints_composed_config(results):
    """`distill-train --cfg job ...` (the installed entry point) prints the composed config."""
    r = results["console-script"]
    assert CONSOLE_SCRIPT.exists(), f"{CONSOLE_SCRIPT} missing: is the package installed?"
    assert r.returncode == 0, r
    assert "Traceback" not in r.output, r
    assert re.search(r"^distiller:", r.stdout, re.M), r
    cfg = OmegaConf.create(r.stdout)
    assert cfg.distiller.name == "none"
    assert cfg.student.name == "resnet8"
    assert cfg.dataset.name == "digits"
    assert not (r.home / "run").exists(), "--cfg job must not start the job"


@needs_runs("help")
def test_help(results):
    r = results["help"]
    assert r.returncode == 0, r
    assert "Traceback" not in r.output, r
    groups = dict(re.findall(r"^(\w+): (.+)$", r.stdout.split("== Config ==")[0], re.M))
    for group in ("dataset", "teacher", "student", "distiller", "optimizer", "scheduler",
                  "trainer", "logger", "experiment"):
        assert group in groups, f"--help does not list the {group} group\n{r}"
    assert {"kd", "none"} <= set(groups["distiller"].split(", "))
    assert {"resnet20", "tv_resnet18"} <= set(groups["student"].split(", "))
    assert "cifar100" in groups["dataset"].split(", ")


SUMMARY_KEYS = {"best_top1", "last_top1", "world_size", "epochs", "wall_seconds",
                "train_images_per_sec"}


@needs_runs("multirun")
def test_multirun_gives_each_job_a_complete_run_dir(results):
    from safetensors.torch import load_file

    r = results["multirun"]
    assert r.returncode == 0, r
    assert "Traceback" not in r.output, r
    sweep = r.home / "sweep"
    job_dirs = sorted(p.parent.parent for p in sweep.rglob(".hydra/config.yaml"))
    assert len(job_dirs) == 2, f"{job_dirs}\n{r}"
    assert job_dirs[0] != job_dirs[1]
    assert not (r.home / "run").exists(), "-m jobs belong under the sweep dir"

    by_method = {}
    for job in job_dirs:
        assert sweep in job.parents
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        assert Path(cfg.run_dir).resolve() == job.resolve(), "run_dir must be the job's own dir"
        summary = json.loads((job / "summary.json").read_text())
        assert SUMMARY_KEYS <= set(summary), sorted(summary)
        # trainer.max_steps=2 of the 8 steps in a fake-data epoch
        assert summary["world_size"] == 1 and summary["steps"] == 2
        assert summary["epochs"] == 0.25 and summary["stopped_early"] is True
        assert 0 <= summary["last_top1"] <= summary["best_top1"] <= 100
        assert summary["wall_seconds"] > 0 and summary["train_images_per_sec"] > 0
        events = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()
                  if line.strip()]
        assert events and all(isinstance(e, dict) for e in events)
        weights = load_file(job / "student.safetensors")
        assert weights and "fc.weight" in weights and weights["fc.weight"].shape[0] == 10
        assert (job / "checkpoints").is_dir() and any((job / "checkpoints").iterdir())
        by_method[cfg.distiller.name] = summary
    assert set(by_method) == {"none", "kd"}
    assert by_method["kd"]["teacher_top1"] is not None
    assert by_method["none"].get("teacher_top1") is None
    # the vanilla job (or the kd job's auto-train) left the teacher in this run's private zoo
    assert (r.home / "zoo" / "fake" / "resnet8").is_dir()


@needs_runs("benchmark")
def test_benchmark_grid_narrowed_from_the_command_line(results):
    r = results["benchmark"]
    assert r.returncode == 0, r
    jobs = sorted(p.parent.parent for p in (r.home / "sweep").rglob(".hydra/config.yaml"))
    assert jobs == [r.home / "sweep" / "none" / "seed1"], jobs   # subdir: <distiller>/seed<N>
    cfg = OmegaConf.load(jobs[0] / ".hydra" / "config.yaml")
    assert (cfg.dataset.name, cfg.student.name, cfg.dataset.train_fraction) == \
        ("digits", "resnet8", 0.05), "the benchmark's experiment=demo applies"
    assert json.loads((jobs[0] / "summary.json").read_text())["steps"] == 2


# the loss terms each method logs (besides train/loss)
METHOD_TERMS = {"none": {"ce"}, "kd": {"ce", "kd"}, "dkd": {"ce", "dkd"}, "fitnet": {"ce", "hint"},
                "at": {"ce", "at"}, "rkd": {"ce", "rkd"}, "takd": {"ce", "kd"},
                "noisy_kd": {"ce", "kd"}}


@needs_runs("every-method")
def test_every_method_trains_from_the_command_line(results):
    """One sweep over all eight methods: each job trains, logs its own loss terms and writes its
    summary; TAKD first distils its assistant (resnet32, the default chain) into the zoo."""
    r = results["every-method"]
    assert r.returncode == 0, r
    assert "Traceback" not in r.output, r
    seen = {}
    for job in sorted(p.parent.parent for p in (r.home / "sweep").rglob(".hydra/config.yaml")):
        method = OmegaConf.load(job / ".hydra" / "config.yaml").distiller.name
        summary = json.loads((job / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["stopped_early"] is True
        events = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        train = [e for e in events if e["event"] == "train"]
        terms = {k[len("train/"):] for k in train[-1] if k.startswith("train/")}
        assert METHOD_TERMS[method] <= terms, (method, terms)
        assert not {"ce", "kd", "dkd", "hint", "at", "rkd"} - METHOD_TERMS[method] & terms
        seen[method] = summary
    assert set(seen) == set(METHODS), f"{sorted(seen)}\n{r}"
    assert seen["fitnet"]["connector_params"] > 0 and seen["kd"]["connector_params"] == 0
    assert all(seen[m]["teacher_top1"] is not None for m in METHODS if m != "none")
    zoo = r.home / "zoo" / "fake"
    assert (zoo / "resnet14" / "model.safetensors").is_file()
    assert len(list(zoo.glob("resnet32@kd-resnet14.*/model.safetensors"))) == 1
