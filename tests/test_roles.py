"""Methods as roles (the method contract, docs/adding-a-method.md): the original eight methods
train exactly as their recorded golden traces, checkpoints and zoo entries of earlier formats
are refused with the fix, a method's parts must be declared, what a method cannot run with is
refused at validation, and a run's teachers are pinned by sha256."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from _compose import make_cfg
from _golden import COMMAND, GOLDEN, ORIGINAL_METHODS, fixed_teacher, machine, method_trace
from distill.app import run
from distill.errors import ConfigError
from distill.method import Distiller, Traits
from distill.method.checks import NEEDS, RUN_FEATURES
from distill.models import create_model
from distill.validation import check_run_features
from distill.zoo import TeacherZoo, file_sha256

TRAINER = {"compile": "none", "precision": "fp32", "channels_last": True}


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


@pytest.fixture
def recording_threads():
    """The traces were recorded with torch's multi-threaded CPU kernels (one thread per core,
    2 there). One thread (each xdist worker's setting) takes other kernels, whose sums round
    otherwise; 2 or more threads give the recorded floats (checked with 2 and 4)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, 2))
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method", ORIGINAL_METHODS)
def test_a_short_training_trace_equals_the_recorded_golden_trace(method, golden, tmp_path,
                                                                  recording_threads):
    """Six steps across an epoch end: every loss term of every step, the top-1s and every
    weight tensor's sum and sum of squares equal what the code before the redesign recorded
    on this kind of machine (tests/_golden.py). On a machine kind with no record, kernels round
    otherwise: every step's loss terms within 1%, the top-1s within one of the 32 images."""
    trace = method_trace(method, tmp_path)
    if machine() in golden:
        assert trace == golden[machine()][method]
        return
    for recorded in golden.values():
        want = recorded[method]
        assert len(trace["losses"]) == len(want["losses"])
        for step, expected in zip(trace["losses"], want["losses"]):
            assert step == pytest.approx(expected, rel=1e-2)
        for key in ("last_top1", "teacher_top1"):
            assert trace[key] == pytest.approx(want[key], abs=100 / 32 + 1e-9)


def test_a_checkpoint_written_before_the_roles_is_refused_by_name(tmp_path, monkeypatch):
    """tests/data/checkpoint_v1_fitnet.pt is step 3 of a fitnet run written by the pre-release
    code before the roles (format 1: student + connectors + one optimizer). It is not resumed:
    the run stops with one error that names the format and how to start over, and the file is
    left as it was."""
    monkeypatch.chdir(tmp_path)   # the old run named its teacher by a relative path
    fixed_teacher(tmp_path)
    run_dir = tmp_path / "v1run"
    (run_dir / "checkpoints").mkdir(parents=True)
    old = run_dir / "checkpoints" / "last.pt"
    shutil.copy(GOLDEN.parent / "checkpoint_v1_fitnet.pt", old)
    command = [c for c in COMMAND if c != "distiller.warmup_epochs=2"]
    with pytest.raises(ConfigError) as exc:
        run(make_cfg(tmp_path, *command, "distiller=fitnet",
                     "teacher.checkpoint=teacher.safetensors", run="v1run"))
    assert exc.value.key == "trainer.resume"
    assert "format-1 checkpoint" in exc.value.render() and "trainer.resume=false" in \
        exc.value.render()
    assert old.read_bytes() == (GOLDEN.parent / "checkpoint_v1_fitnet.pt").read_bytes()
    assert {p.name for p in run_dir.iterdir()} <= {"checkpoints", ".lock"}   # nothing written


def test_a_zoo_entry_of_the_pre_release_layout_is_refused_with_the_fix(tmp_path):
    """model.safetensors directly in <zoo>/<dataset>/<name>/ (before versions): refused naming
    the folder, with the commands that make it a version; after them the teacher is found."""
    folder = tmp_path / "zoo" / "fake" / "resnet8"
    folder.mkdir(parents=True)
    save_file(create_model("resnet8", num_classes=10).state_dict(), str(folder / "model.safetensors"))
    (folder / "meta.json").write_text(json.dumps({"top1": 50.0}))
    zoo = TeacherZoo(tmp_path / "zoo")
    with pytest.raises(ConfigError) as exc:
        zoo.find("fake", "resnet8")
    digest = file_sha256(folder / "model.safetensors")
    assert exc.value.key == "zoo.root" and str(folder) in exc.value.message
    assert f"mkdir {folder / digest[:16]}" in exc.value.hint
    (folder / digest[:16]).mkdir()
    for name in ("model.safetensors", "meta.json"):
        os.replace(folder / name, folder / digest[:16] / name)
    assert zoo.find("fake", "resnet8").sha256 == digest


def test_a_module_that_is_not_a_declared_part_is_refused():
    class Forgetful(Distiller):
        traits = Traits(needs_teacher=False)

        def __init__(self, student):
            super().__init__(student)
            self.head = nn.Linear(4, 4)   # trains nothing unless declared

    with pytest.raises(TypeError, match="Forgetful.head .* not a declared part"):
        Forgetful(nn.Linear(2, 2)).check_declared()
    declared = Forgetful(nn.Linear(2, 2))
    del declared.head
    declared.add_trained("head", nn.Linear(4, 4))
    declared.check_declared()
    assert list(declared.parameter_groups()) == ["main"]
    assert len(declared.parameter_groups()["main"]) == 4


@pytest.mark.parametrize("feature,trainer,world", [
    ("fp16", {"precision": "fp16"}, 1), ("bf16", {"precision": "bf16"}, 1),
    ("compile", {"compile": "student"}, 1), ("channels_last", {}, 1), ("ddp", {}, 2)])
def test_what_a_method_cannot_run_with_is_refused_naming_the_key(feature, trainer, world):
    cls = type("Fussy", (Distiller,), {"traits": Traits(unsupported={feature: "it cannot"})})
    with pytest.raises(ConfigError) as err:
        check_run_features("fussy", cls, {**TRAINER, **trainer}, world)
    assert err.value.key == ("distiller" if feature == "ddp" else RUN_FEATURES[feature])
    assert "distiller 'fussy' cannot run with" in err.value.message and "it cannot" in err.value.message
    fine = {**TRAINER, "channels_last": False}
    check_run_features("fussy", cls, fine, 1)   # nothing turned on: accepted


def test_double_backward_rules_out_compile_and_ddp():
    cls = type("Sobolevish", (Distiller,),
               {"traits": Traits(needs=frozenset({"double_backward"}))})
    for trainer, world, key in (({**TRAINER, "compile": "both"}, 1, "trainer.compile"),
                                (TRAINER, 2, "distiller")):
        with pytest.raises(ConfigError) as err:
            check_run_features("sobolevish", cls, trainer, world)
        assert err.value.key == key
        assert NEEDS["double_backward"]["compile" if world == 1 else "ddp"] in err.value.message
    check_run_features("sobolevish", cls, TRAINER, 1)


BASE = [c for c in COMMAND if not c.startswith(("trainer.max_steps", "distiller.warmup",
                                                 "teacher.auto_train_epochs"))]


def _kd(tmp_path, *extra, run_name="run"):
    return make_cfg(tmp_path, *BASE, "distiller=kd", *extra, run=run_name)


def test_a_swapped_teacher_is_refused_on_resume_and_a_newer_zoo_version_is_not_taken(tmp_path):
    """The checkpoint records each teacher's sha256. A teacher.checkpoint file that now holds
    other weights is refused, naming both digests, with nothing changed; a zoo teacher whose
    entry got a better version since is taken by its recorded digest."""
    teacher = fixed_teacher(tmp_path)
    digest = file_sha256(teacher)
    first = run(_kd(tmp_path, f"teacher.checkpoint={teacher}", "trainer.max_steps=2"))
    assert first["teachers"] == [{"role": "teacher", "name": "resnet14", "sha256": digest,
                                  "top1": first["teacher_top1"]}]
    torch.manual_seed(99)
    save_file(create_model("resnet14", num_classes=10).state_dict(), str(teacher))
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(ConfigError) as err:
        run(_kd(tmp_path, f"teacher.checkpoint={teacher}", "trainer.max_steps=4"))
    assert digest in str(err.value) and file_sha256(teacher) in str(err.value)
    assert err.value.key == "teacher.checkpoint" and "trainer.resume=false" in str(err.value)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before

    # the zoo: version A trains half a run; a better version B is published; the run resumes
    # with A, a new run takes B
    zoo = TeacherZoo(tmp_path / "zoo")
    (tmp_path / "a").mkdir()
    zoo.publish("fake", "resnet14", fixed_teacher(tmp_path / "a"), {"top1": 50.0})
    version_a = zoo.find("fake", "resnet14").sha256
    run(_kd(tmp_path, "trainer.max_steps=2", run_name="zoo-run"))
    zoo.publish("fake", "resnet14", teacher, {"top1": 60.0})
    assert zoo.find("fake", "resnet14").sha256 == file_sha256(teacher) != version_a
    resumed = run(_kd(tmp_path, "trainer.max_steps=4", run_name="zoo-run"))
    fresh = run(_kd(tmp_path, "trainer.max_steps=4", run_name="fresh"))
    assert resumed["teachers"][0]["sha256"] == version_a
    assert fresh["teachers"][0]["sha256"] == file_sha256(teacher)
    assert zoo.find("fake", "resnet14", sha256=version_a) is not None


def test_the_zoo_keeps_every_version_and_the_best_is_current(tmp_path):
    zoo = TeacherZoo(tmp_path / "zoo")
    files = []
    for seed in range(3):
        torch.manual_seed(seed)
        path = tmp_path / f"w{seed}.safetensors"
        save_file({"x": torch.randn(3)}, str(path))
        files.append(path)
    assert zoo.publish("d", "m", files[0], {"top1": 80.0})
    assert not zoo.publish("d", "m", files[1], {"top1": 70.0})   # worse: kept, not current
    assert not zoo.publish("d", "m", files[2], {"top1": 80.0})   # a tie keeps the current one
    assert zoo.find("d", "m").sha256 == file_sha256(files[0])
    for path in files:
        entry = zoo.find("d", "m", sha256=file_sha256(path))
        assert entry is not None and entry.weights.read_bytes() == path.read_bytes()
    torch.manual_seed(7)
    save_file({"x": torch.randn(3)}, str(tmp_path / "best.safetensors"))
    assert zoo.publish("d", "m", tmp_path / "best.safetensors", {"top1": 90.0})
    assert zoo.find("d", "m").sha256 == file_sha256(tmp_path / "best.safetensors")
    assert zoo.find("d", "m").meta["top1"] == 90.0
    assert zoo.publish("d", "m", tmp_path / "best.safetensors", {"top1": 90.0})   # again: no-op
    assert len(zoo.versions("d", "m")) == 4
    assert [(d, m) for d, m, _ in zoo.list()] == [("d", "m")]
    assert not list((tmp_path / "zoo" / "d" / "m").glob(".staging-*"))


@pytest.mark.slow   # two training processes
def test_two_runs_that_need_the_same_missing_teacher_train_it_once(tmp_path):
    """Two processes with teacher.auto_train and different seeds need the same missing teacher
    while another process (this test) holds its claim: both wait, naming the holder; once it is
    released, one trains the teacher and the other waits again and takes it from the zoo."""
    import subprocess
    import sys
    import time

    from _compose import REPO

    env = {**os.environ, "DISTILL_ZOO": str(tmp_path / "zoo"), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logs = [tmp_path / f"run{seed}.log" for seed in (0, 1)]
    with TeacherZoo(tmp_path / "zoo").claim("fake", "resnet14"):
        procs = []
        for seed, log in zip((0, 1), logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, str(REPO / "tools" / "train.py"), "dataset=fake",
                     "distiller=kd", "student=resnet8", "teacher=resnet14",
                     "teacher.auto_train=true", "teacher.auto_train_epochs=1",
                     "trainer.max_steps=2", "trainer.progress=false", "logger=jsonl",
                     f"seed={seed}", f"hydra.run.dir={tmp_path / f'run{seed}'}"],
                    cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 240
        while not all(f"waiting for pid {os.getpid()} on host" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [log.read_text()[-2000:] for log in logs]
            time.sleep(0.2)
    for p in procs:
        p.wait(timeout=300)
    assert [p.returncode for p in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    trained = sorted(p.name for p in (tmp_path / "zoo" / "runs" / "fake" / "resnet14").glob("*/seed*"))
    assert len(trained) == 1, trained
    digests = {json.loads((tmp_path / f"run{s}" / "summary.json").read_text())["teachers"][0]["sha256"]
               for s in (0, 1)}
    assert len(digests) == 1 and TeacherZoo(tmp_path / "zoo").find("fake", "resnet14").sha256 in digests


def test_a_teacher_trained_on_the_way_leaves_the_callers_random_state_alone(tmp_path):
    """The run that makes a missing zoo model is a job of its own: whatever randomness it
    consumes, the run that asked for it continues from the random state it had."""
    import random

    import numpy as np
    from omegaconf import OmegaConf

    from distill.method import TeacherRequest
    from distill.teachers import TeacherResolver

    def train(config, overrides):   # stands in for distill.app.run: consumes every stream
        torch.rand(1000), np.random.rand(1000), random.random()
        weights = tmp_path / "made.safetensors"
        save_file(create_model("resnet8", num_classes=10).state_dict(), str(weights))
        TeacherZoo(tmp_path / "zoo").publish("fake", "resnet8", weights, {"top1": 1.0})
        return {}

    cfg = make_cfg(tmp_path, "dataset=fake", "teacher.auto_train=true")
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    resolver = TeacherResolver(cfg, dataset, 10, TeacherZoo(tmp_path / "zoo"), [], train)
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    resolver.weights(TeacherRequest("teacher", "resnet8"))
    after = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    assert torch.equal(after[0], torch.rand(3)) and (after[1] == np.random.rand(3)).all()
    assert after[2] == random.random()
    assert TeacherZoo(tmp_path / "zoo").find("fake", "resnet8") is not None


def test_what_a_method_may_need_reaches_it(tmp_path, monkeypatch):
    """The dataset's normalisation and pixel range at build time, the schedule's length at every
    step, and gradients through a frozen teacher with respect to its input, on request."""
    from distill.method import BuildInfo
    from distill.distillers.kd import KD

    from distill.distillers.bss import pixel_range

    info = BuildInfo(mean=(0.5, 0.25, 0.0), std=(0.25, 0.5, 1.0))
    assert pixel_range(info.mean, info.std) == ((-2.0, -0.5, 0.0), (2.0, 1.5, 1.0))

    seen = []
    forward = KD.forward

    def recording(self, images, targets, ctx):
        seen.append((ctx.step, ctx.steps_per_epoch, ctx.total_steps))
        return forward(self, images, targets, ctx)

    monkeypatch.setattr(KD, "forward", recording)
    summary = run(_kd(tmp_path, f"teacher.checkpoint={fixed_teacher(tmp_path)}",
                      "trainer.max_steps=6"))
    assert seen == [(step, 4, 6) for step in range(6)] and summary["steps"] == 6

    from distill.method import build_distiller

    teacher = create_model("resnet8", num_classes=10)
    distiller = build_distiller("kd", create_model("resnet8", num_classes=10), teacher, {})
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    assert not distiller.frozen_forward("teacher", images).requires_grad
    distiller.frozen_forward("teacher", images, input_grad=True).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_multi_teacher_resumes_bit_exactly(tmp_path):
    """Two fixed teachers from weights files: a run stopped mid-epoch by trainer.max_steps and
    resumed ends with the weights of an uninterrupted one, and records both teachers."""
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = tmp_path / f"t{seed}.safetensors"
        save_file(create_model("resnet8", num_classes=10).state_dict(), str(path))
        paths.append(str(path))
    base = [*BASE, "distiller=multi_teacher", "distiller.teachers=[resnet8,resnet14]",
            f"distiller.teacher_checkpoints=[{paths[0]},{fixed_teacher(tmp_path)}]"]
    straight = run(make_cfg(tmp_path, *base, run="straight"))
    run(make_cfg(tmp_path, *base, "trainer.max_steps=3", run="resumed"))
    resumed = run(make_cfg(tmp_path, *base, run="resumed"))
    a, b = (load_file(str(tmp_path / r / "student.safetensors")) for r in ("straight", "resumed"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [t["name"] for t in resumed["teachers"]] == ["resnet8", "resnet14"]
    assert resumed["teachers"] == straight["teachers"]
    assert resumed["teachers"][1]["sha256"] == file_sha256(fixed_teacher(tmp_path))
