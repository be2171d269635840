"""The command line, end to end: bad input gives one short error screen (no traceback), good
input gives a complete run directory.

The good commands run in subprocesses, which pay ~4 s of imports each, so they are started
together once per module (as many at a time as there are CPU cores) and each test checks its own
result. The bad-input table runs meanwhile in this process, through the same entry point
(`distill.cli.main`, what tools/train.py calls) with sys.argv, the environment and the working
directory of a command: the same exit codes and screens, a second each instead of four.
Nothing is written into the repository: every command gets its own temporary
hydra.run.dir / hydra.sweep.dir, teacher zoo (DISTILL_ZOO) and data root (DISTILL_DATA).
"""
from __future__ import annotations

import json
import os
import re
import shutil
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
# commands that start from a copy of the session's shared zoo (a resnet14 teacher for fake)
WITH_SHARED_ZOO = ("every-method",)


# one xdist worker runs this module: its fixture starts every command once, inside the setup of
# the module's first test, whose timeout must cover them all (the every-method sweep included)
pytestmark = [pytest.mark.xdist_group("cli"), pytest.mark.timeout(900)]


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
    # root may write anywhere by os.access, /proc included, yet nothing can be made there
    "uncreatable-run-dir": (
        ["hydra.run.dir=/proc/distill-nope/run"], 2, "run_dir",
        [r"cannot write /proc/distill-nope/run", r"/proc is not writable"], None),
    # the zoo is checked before its first lock (the teacher's claim) or folder
    "zoo-root-is-a-file": (
        ["distiller=kd", "teacher=resnet8", "teacher.auto_train=true", "zoo.root={t10}"], 2,
        "zoo.root", [re.escape("resnet8_10.safetensors is a file, not a folder")], None),
    "zoo-root-below-a-file-publishes": (
        ["zoo.root={t10}/zoo"], 2, "zoo.root", [r"teacher zoo: .*is a file, not a folder"], None),
    "teacher-checkpoint-carries-code": (
        ["distiller=kd", "teacher=resnet8", "teacher.checkpoint={evil}"], 2,
        "teacher.checkpoint", [r"refused to load", r"not a plain weights file", r"posix\.system"],
        None),
    "teacher-checkpoint-damaged": (
        ["distiller=kd", "teacher=resnet8", "teacher.checkpoint={garbage}"], 2,
        "teacher.checkpoint", [r"not a valid safetensors file"], None),
    # paths: run directories are built from validated parts
    "tag-leaves-the-outputs-tree": (["tag=../../escaped"], 2, "tag", [r"no '/', no '\.\.'"], None),
    "tag-with-a-separator": (["tag=a/b"], 2, "tag", [r"'a/b'"], None),
    "tag-too-long": (["tag=" + "x" * 300], 2, "tag", [r"up to 100"], None),
    "empty-run-dir": (["run_dir="], 2, "run_dir", [r"working directory"], None),
    "run-dir-name-too-long": (["hydra.run.dir={home}/" + "x" * 300], 2, "run_dir",
                              [r"longer than 255 bytes"], None),
    "seed-out-of-range": (["seed=-1"], 2, "seed", [r"\[0, 2147483647\]"], None),
    # configurations that would train nothing
    "hint-stage-covers-the-run": (
        ["distiller=fitnet", "distiller.hint_epochs=1"], 2, "distiller.hint_epochs",
        [r"hints only"], None),
    "every-loss-weight-zero": (
        ["distiller=kd", "distiller.ce_weight=0", "distiller.kd_weight=0"], 2, "distiller",
        [r"train nothing", r"ce_weight", r"kd_weight"], None),
    "every-dkd-weight-zero": (
        ["distiller=dkd", "distiller.ce_weight=0", "distiller.alpha=0", "distiller.beta=0"], 2,
        "distiller", [r"alpha", r"beta"], None),
    "negative-milestone": (["scheduler.milestones=[-1]"], 2, "scheduler.milestones",
                           [r"increasing order"], None),
    "unsorted-milestones": (["scheduler.milestones=[20,10]"], 2, "scheduler.milestones",
                            [r"increasing order"], None),
    "cosine-floor-above-the-base-lr": (["scheduler=cosine", "scheduler.min_lr_ratio=2"], 2,
                                       "scheduler.min_lr_ratio", [r"\[0, 1\]"], None),
    "empty-attention-layer-list": (["distiller=at", "distiller.student_layers=[]"], 2,
                                   "distiller.student_layers", [r"empty"], None),
    "empty-hint-layer-name": (["distiller=fitnet", "distiller.student_layer=''"], 2,
                              "distiller.student_layer", [r"empty"], None),
    "zero-auto-train-epochs": (
        ["distiller=kd", "teacher.auto_train=true", "teacher.auto_train_epochs=0"], 2,
        "teacher.auto_train_epochs", [r"null \(the dataset recipe's epochs\)"], None),
    "infinite-warmup": (["scheduler.warmup_epochs=inf"], 2, "scheduler.warmup_epochs",
                        [r"finite"], None),
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
    if name == "multirun":   # the cheapest whole sweep with a baseline: 2 epochs of 2 steps
        return ["-m", "distiller=none,kd", "dataset=fake", "dataset.train_size=32",
                "dataset.val_size=16", "trainer.batch_size=16", "trainer.epochs=2",
                "student=resnet8", "teacher=resnet8", "logger=jsonl", "trainer.progress=false",
                f"hydra.sweep.dir={home}/sweep"]
    if name == "every-method":   # every registered method; several teachers: two of them
        from distill.method import DISTILLERS

        return ["-m", f"distiller={','.join(DISTILLERS.list())}", "dataset=fake",
                "student=resnet8", "teacher=resnet14", "teacher.auto_train=true",
                "teacher.auto_train_epochs=1", "+tuned.multi_teacher.teachers=[resnet14,resnet8]",
                "+tuned.crd.nce_k=64",   # negatives for 256 training images
                "scale=smoke",   # the expensive methods' smoke-test settings (their YAMLs)
                *SMOKE, f"hydra.sweep.dir={home}/sweep"]
    if name == "digits-several-models":   # several teachers, several students, whole epochs
        return ["-m", "distiller=multi_teacher,dml", "dataset=digits", "student=resnet8",
                "teacher=resnet14", "teacher.auto_train=true", "teacher.auto_train_epochs=1",
                "+tuned.multi_teacher.teachers=[resnet14,resnet8]", "trainer.epochs=1",
                "logger=jsonl", "trainer.progress=false", f"hydra.sweep.dir={home}/sweep"]
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
def _environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HYDRA_FULL_ERROR", "FORCE_COLOR", "CUDA_VISIBLE_DEVICES")}
    env.update(DISTILL_ZOO=str(home / "zoo"), DISTILL_DATA=str(home / "data"),
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", COLUMNS="120")
    return env


def _run_in_process(name: str, home: Path, weights: dict[str, Path]) -> Result:
    """A bad command through distill.cli.main in this process: its argv, environment and working
    directory, stdout and stderr captured, the exit code from SystemExit."""
    import contextlib
    import io

    from hydra.core.global_hydra import GlobalHydra

    from distill.cli import main

    home.mkdir(parents=True)
    args = bad_args(name, home, weights)
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args = [*args, f"hydra.run.dir={home}/run"]
    saved = (sys.argv, dict(os.environ), os.getcwd())
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [str(TRAIN), *args]
    os.environ.clear()
    os.environ.update(_environment(home))
    os.chdir(home)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        GlobalHydra.instance().clear()
        sys.argv = saved[0]
        os.environ.clear()
        os.environ.update(saved[1])
        os.chdir(saved[2])
    return Result([str(TRAIN), *args], code, ANSI.sub("", out.getvalue()),
                  ANSI.sub("", err.getvalue()), home)


def _run(name: str, home: Path, weights: dict[str, Path], zoo: Path) -> Result:
    home.mkdir(parents=True)
    if name in WITH_SHARED_ZOO:
        shutil.copytree(zoo, home / "zoo")
    if name == "console-script":
        program, args = [str(CONSOLE_SCRIPT)], good_args(name, home)
    else:
        program, args = [sys.executable, str(TRAIN)], good_args(name, home)
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args = [*args, f"hydra.run.dir={home}/run"]
    env = _environment(home)
    if not Path(program[0]).exists():
        return Result(program + args, -1, "", f"{program[0]} does not exist", home)
    try:
        proc = subprocess.run(program + args, cwd=home, env=env, capture_output=True, text=True,
                              timeout=600)   # a hang guard; every-method takes ~2 min
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
def results(request, tmp_path_factory, teacher_weights, trained_zoo) -> dict[str, Result]:
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
    wanted = sorted(set(wanted), key=lambda n: n not in ("every-method", "digits-several-models",
                                                         "multirun"))
    root = tmp_path_factory.mktemp("cli")
    good = [n for n in wanted if n not in BAD]
    workers = max(1, min(len(good), (os.cpu_count() or 2) - 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {n: pool.submit(_run, n, root / n, teacher_weights, trained_zoo)
                   for n in good}
        done = {n: _run_in_process(n, root / n, teacher_weights) for n in wanted if n in BAD}
    return {**done, **{n: f.result() for n, f in futures.items()}}


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
    # Hydra makes the run folder before distill reads the config: a refusal removes it again
    assert not (r.home / "run").exists(), "a refused command left its run folder behind"
    # refused before the run record is written: nothing half-written to mistake for a run
    assert not (r.home / "run" / ".hydra").exists(), "the run record was written"
    assert not (r.home / "run" / "metrics.jsonl").exists(), "metrics were written"
    assert not teacher_weights["marker"].exists(), "a planted pickle ran"


@pytest.mark.slow   # a subprocess per folder: about 25 s
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_folders_nobody_can_make_are_refused_before_hydra_makes_them(tmp_path):
    """Through tools/train.py itself: the run folder's own key (run_dir, which hydra.run.dir
    reads), a sweep folder under -m, and a zoo that $DISTILL_ZOO points at a file. /proc takes
    no new folder even from root, for whom os.access says it may write anywhere."""
    zoo_file = tmp_path / "zoo-file"
    zoo_file.write_text("not a zoo")
    commands = {
        "run_dir": (["run_dir=/proc/distill-nope/x"], {},
                    [r"^error: run_dir: cannot write /proc/distill-nope/x: /proc is not writable",
                     r"choose another run_dir"]),
        "sweep": (["-m", "hydra.sweep.dir=/proc/distill-nope/sweep"], {},
                  [r"^error: run_dir: cannot write /proc/distill-nope/sweep",
                   r"choose another hydra\.sweep\.dir"]),
        "env-zoo": (["distiller=kd", "teacher=resnet8", "teacher.auto_train=true"],
                    {"DISTILL_ZOO": str(zoo_file)},
                    [r"^error: zoo\.root: .*\(from \$DISTILL_ZOO\)",
                     re.escape(f"{zoo_file} is a file, not a folder")]),
    }
    for name, (args, env, patterns) in commands.items():
        home = tmp_path / name
        home.mkdir()
        proc = subprocess.run(
            [sys.executable, str(TRAIN), "dataset=digits", "student=resnet8", "trainer.epochs=1",
             *(["distiller=none"] if "distiller=kd" not in args else []), *args],
            cwd=home, env={**_environment(home), **env}, capture_output=True, text=True,
            timeout=300)
        r = Result(proc.args, proc.returncode, ANSI.sub("", proc.stdout),
                   ANSI.sub("", proc.stderr), home)
        assert r.returncode == 2, r
        assert "Traceback" not in r.output, r
        for pattern in patterns:
            assert re.search(pattern, r.stderr, re.M), f"no match for {pattern!r}\n{r}"
        assert list(home.iterdir()) == [], f"left behind: {list(home.rglob('*'))}\n{r}"
    assert zoo_file.read_text() == "not a zoo"


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
                  "logger", "experiment"):
        assert group in groups, f"--help does not list the {group} group\n{r}"
    # trainer.* has no choices to pick: its keys are the schema's (docs/options.md)
    assert "\ntrainer:\n" in r.stdout.split("== Config ==")[1]
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
        # 2 epochs of 32 images in batches of 16
        assert summary["world_size"] == 1 and summary["steps"] == 4
        assert summary["epochs"] == 2 and summary["stopped_early"] is False
        assert summary["best_top1"] == max(h["top1"] for h in summary["history"])
        assert summary["last_top1"] == summary["history"][-1]["top1"]
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
    # the vanilla job published the teacher the kd job took from this run's private zoo
    from distill.zoo import TeacherZoo

    published = TeacherZoo(r.home / "zoo").find("fake", "resnet8")
    assert by_method["kd"]["teachers"][0]["sha256"] == published.sha256
    assert published.weights.read_bytes() == (job_dirs[0] / "student.safetensors").read_bytes() \
        or published.weights.read_bytes() == (job_dirs[1] / "student.safetensors").read_bytes()


@needs_runs("multirun")
def test_the_report_of_a_real_sweep(results, tmp_path, capsys):
    """tools/report.py on the sweep above: one column for the pair, each method's mean over its
    one seed, no spread for one seed, and KD's gain over the vanilla run of the same settings."""
    import csv
    import importlib.util

    import pytest

    spec = importlib.util.spec_from_file_location("report_tool", REPO / "tools" / "report.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    sweep = results["multirun"].home / "sweep"
    assert tool.main([str(sweep), "--csv", str(tmp_path / "t.csv")]) == 0
    assert "| method | resnet8 -> resnet8 |" in capsys.readouterr().out
    summaries = {}
    for job in sorted(sweep.glob("[0-9]*")):
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        summaries[cfg.distiller.name] = json.loads((job / "summary.json").read_text())["last_top1"]
    with open(tmp_path / "t.csv", newline="") as f:
        records = {rec["distiller"]: rec for rec in csv.DictReader(f)}
    assert set(records) == {"none", "kd"}
    for name, last in summaries.items():
        assert records[name]["n"] == "1" and records[name]["seeds"] == "0"
        assert float(records[name]["last_mean"]) == pytest.approx(last)
        assert records[name]["last_std"] == ""   # one seed: no spread
        assert records[name]["num_classes"] == "10" and int(records[name]["flops"]) > 0
    assert records["none"]["gain_last"] == ""
    assert float(records["kd"]["gain_last"]) == pytest.approx(summaries["kd"] - summaries["none"])


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


@pytest.mark.slow   # 32 jobs in one subprocess sweep: about 2 minutes on 2 cores
@needs_runs("every-method")
def test_every_method_trains_from_the_command_line(results):
    """One sweep over every registered method, from the shared zoo's resnet14: each job trains,
    logs loss terms and writes its summary with every teacher it used; TAKD first distils its
    assistant (resnet32, the default chain) into the zoo, multi_teacher trains its second
    teacher (resnet8) first."""
    from distill.method import DISTILLERS
    from distill.zoo import TeacherZoo

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
        assert "loss" in terms and len(terms - {"loss", "lr", "epoch", "images_per_sec"}) >= 1
        seen[method] = summary
    assert set(seen) == set(DISTILLERS.list()), f"{sorted(seen)}\n{r}"
    assert seen["fitnet"]["connector_params"] > 0 and seen["kd"]["connector_params"] == 0
    for method, summary in seen.items():
        assert (summary["teacher_top1"] is not None) == bool(summary["teachers"]), method
    assert [t["name"] for t in seen["multi_teacher"]["teachers"]] == ["resnet14", "resnet8"]
    assert not seen["none"]["teachers"] and not seen["dml"]["teachers"]
    assert set(seen["dml"]["models"]) == {"peer0", "peer1"}
    zoo = TeacherZoo(r.home / "zoo")
    names = [name for _, name, _ in zoo.list()]
    assert {"resnet14", "resnet8"} <= set(names)
    assert len([n for n in names if n.startswith("resnet32@kd-resnet14.")]) == 1
    # the run's teacher was the shared zoo's resnet14, not a second one
    assert seen["kd"]["teachers"][0]["sha256"] == zoo.find("fake", "resnet14").sha256
    assert len(zoo.versions("fake", "resnet14")) == 1


@pytest.mark.slow   # two teachers trained first, then two methods for whole epochs of digits
@needs_runs("digits-several-models")
def test_several_teachers_and_several_students_train_on_digits(results):
    """multi_teacher (two teachers trained first) and dml (two peers) from the command line on
    real data, one whole epoch each."""
    r = results["digits-several-models"]
    assert r.returncode == 0, r
    jobs = {OmegaConf.load(p).distiller.name: p.parent.parent
            for p in (r.home / "sweep").rglob(".hydra/config.yaml")}
    multi = json.loads((jobs["multi_teacher"] / "summary.json").read_text())
    dml = json.loads((jobs["dml"] / "summary.json").read_text())
    assert multi["epochs"] == dml["epochs"] == 1 and not multi["stopped_early"]
    assert [t["role"] for t in multi["teachers"]] == ["teacher0", "teacher1"]
    assert all(len(t["sha256"]) == 64 and t["top1"] > 10 for t in multi["teachers"])
    assert set(dml["models"]) == {"peer0", "peer1"} and dml["teachers"] == []
    assert dml["best_top1"] == dml["models"]["peer0"]["best_top1"]
    assert all(m["arch"] == "resnet8" and m["params"] == dml["student_params"]
               for m in dml["models"].values())
