"""Exact resume wherever a run died, and checkpoints that cannot be trusted.

One real `tools/train.py` process (deep mutual learning: two peers, two optimizers) is killed with SIGKILL in the middle of an epoch, after it has
written two epoch-end checkpoints. Copies of its run directory are then resumed:

- as it was, by re-running the same command (a subprocess),
- with `checkpoints/last.pt` truncated, overwritten with garbage, or replaced by a pickle that
  would run code (in-process, which saves a ~7 s interpreter start each): resume falls back to
  `prev.pt` with a warning naming `last.pt`,
- with no readable checkpoint left (a subprocess): exit 2, one error naming both files, nothing
  changed, never a silent restart from zero.

Every resumed run must end with the very weights of one uninterrupted run of the same command.
Checkpoints are written at epoch ends, so a killed run replays from the last one; with the data
order a function of (seed, epoch) and the RNG states in the checkpoint, the replay is bit-exact.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _compose import make_cfg
from _planted import PlantedCode
from distill.app import run
from distill.checkpoint import (CHECKPOINT_KEYS, atomic_torch_save, load_latest_checkpoint,
                                       read_checkpoint)
from distill.engine.rundir import trim_metrics
from distill.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "tools" / "train.py"
SPE, EPOCHS = 4, 4     # 64 fake images in batches of 16: four steps an epoch
# DML: a manual step with two peers and two optimizers, so resume restores every part and
# optimizer by role (the default step's resume: tests/test_training.py, tests/test_roles.py)
COMMAND = ["dataset=fake", "dataset.train_size=64", "dataset.val_size=32", "distiller=dml",
           "student=resnet8", f"trainer.epochs={EPOCHS}", "trainer.batch_size=16",
           "trainer.log_every=1", "zoo.publish=false"]
FALLBACKS = ("truncated", "garbage", "planted")
GARBAGE_HEAD = b"\xff"   # not a pickle opcode: torch's weights_only unpickler stops at it
# why resume skips each damaged last.pt, as its warning says it
FALLBACK_REASONS = {"truncated": "failed finding central directory",
                    "garbage": "UnpicklingError: Unsupported operand 255",
                    "planted": "posix.system"}


# one xdist worker runs this module: its fixture runs the kill -9 and resume commands once
pytestmark = pytest.mark.xdist_group("resume")


@dataclass
class Runs:
    home: Path
    killed_at: int              # the last step the killed process logged
    killed_checkpoint: int      # the step of its newest checkpoint
    reference: dict[str, torch.Tensor]
    resumed: subprocess.CompletedProcess
    refused: subprocess.CompletedProcess
    refused_before: dict[str, bytes]
    fallback_logs: dict[str, list[tuple[str, str]]]   # (level, message) of each run
    marker: Path

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.home / name / "student.safetensors"))


def _cli(run_dir: Path, home: Path) -> tuple[list[str], dict]:
    args = [sys.executable, str(TRAIN), *COMMAND, "logger=tensorboard", "trainer.progress=false",
            f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "FORCE_COLOR")}
    env.update(DISTILL_ZOO=str(home / "zoo"), DISTILL_DATA=str(home / "data"),
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return args, env


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:   # the line being written right now
            pass
    return events


def _last_train_step(run_dir: Path) -> int:
    return max((e["step"] for e in _events(run_dir) if e["event"] == "train"), default=0)


def _kill_mid_epoch(proc: subprocess.Popen, run_dir: Path) -> None:
    """SIGKILL once the process trains inside epoch 3 or later (two checkpoints exist by then),
    early in the epoch: the steps it takes before the signal lands stay inside that epoch."""
    deadline = time.monotonic() + 400
    while proc.poll() is None and time.monotonic() < deadline:
        step = _last_train_step(run_dir)
        if step > 2 * SPE and step % SPE in (1, 2):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()


def _files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run dir and its bytes, but Hydra's own log, which each command appends to,
    and the lock file, which names whichever process held the directory last."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in ("train.log", ".lock")}


class _Collect(logging.Handler):
    """(level, message) of every record the `distill` logger emits while it is attached."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[tuple[str, str]] = []

    def emit(self, record):
        self.messages.append((record.levelname, record.getMessage()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    home = tmp_path_factory.mktemp("resume")
    marker = home / "PLANTED_CODE_RAN"

    # 1. the run to kill, in a subprocess; meanwhile the uninterrupted reference, in-process
    killed = home / "killed"
    args, env = _cli(killed, home)
    with open(home / "killed.log", "w") as log:   # files, not pipes: nothing can block on them
        proc = subprocess.Popen(args, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
    watcher = threading.Thread(target=_kill_mid_epoch, args=(proc, killed))
    watcher.start()
    try:
        run(make_cfg(home, *COMMAND, run="reference"))
    finally:
        watcher.join()
    assert proc.returncode == -signal.SIGKILL, \
        f"exit {proc.returncode}, not killed:\n{(home / 'killed.log').read_text()}"
    killed_at = _last_train_step(killed)
    killed_checkpoint = torch.load(killed / "checkpoints" / "last.pt",
                                   weights_only=True)["state"]["global_step"]

    # 2. copies of the killed run dir, damaged in different ways
    for name in ("resumed", "refused", *FALLBACKS):
        shutil.copytree(killed, home / name)
    last = "checkpoints/last.pt"
    size = (killed / last).stat().st_size
    (home / "truncated" / last).write_bytes((killed / last).read_bytes()[:size // 2])
    # random bytes after one that is no pickle opcode: the reason to expect is fixed
    (home / "garbage" / last).write_bytes(GARBAGE_HEAD + os.urandom(size - 1))
    torch.save({"student": PlantedCode(marker)}, home / "planted" / last)
    torch.save({"student": PlantedCode(marker)}, home / "refused" / last)
    prev = home / "refused" / "checkpoints" / "prev.pt"
    prev.write_bytes(prev.read_bytes()[:1000])
    refused_before = _files(home / "refused")

    # 3. the same command again, in subprocesses, while the fallbacks resume in-process
    started = {}
    for name in ("resumed", "refused"):
        with open(home / f"{name}.out", "w") as out, open(home / f"{name}.err", "w") as err:
            started[name] = subprocess.Popen(_cli(home / name, home)[0], cwd=home, env=env,
                                             stdout=out, stderr=err)
    fallback_logs = {}
    logger = logging.getLogger("distill")
    level = logger.level
    for name in FALLBACKS:
        handler = _Collect()
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            run(make_cfg(home, *COMMAND, run=name))
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        fallback_logs[name] = handler.messages
    results = {}
    for name, p in started.items():
        p.wait(timeout=400)
        results[name] = subprocess.CompletedProcess(p.args, p.returncode,
                                                    (home / f"{name}.out").read_text(),
                                                    (home / f"{name}.err").read_text())
    reference = load_file(str(home / "reference" / "student.safetensors"))
    return Runs(home, killed_at, killed_checkpoint, reference, results["resumed"],
                results["refused"], refused_before, fallback_logs, marker)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow   # the kill -9 commands of the module fixture: about 30 s
def test_kill_9_mid_epoch_then_the_same_command_ends_bit_exact(runs):
    # the kill landed mid-epoch, after the epoch-2 checkpoint, and lost work past it
    assert runs.killed_checkpoint >= 2 * SPE and runs.killed_checkpoint % SPE == 0
    assert runs.killed_checkpoint < runs.killed_at < EPOCHS * SPE and runs.killed_at % SPE
    assert not (runs.home / "killed" / "summary.json").exists()
    r = runs.resumed
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert f"resuming {runs.home / 'resumed'} at step {runs.killed_checkpoint}" in r.stdout
    summary = json.loads((runs.home / "resumed" / "summary.json").read_text())
    assert summary["steps"] == EPOCHS * SPE and not summary["stopped_early"]
    assert [h["step"] for h in summary["history"]] == [SPE * (e + 1) for e in range(EPOCHS)]
    assert _same(runs.weights("resumed"), runs.reference)
    reference = json.loads((runs.home / "reference" / "summary.json").read_text())
    assert summary["models"] == reference["models"]   # the second peer too
    assert set(summary["models"]) == {"peer0", "peer1"}


@pytest.mark.slow   # the kill -9 commands of the module fixture: about 30 s
def test_resume_logs_each_step_once(runs):
    """The steps the killed process logged past its checkpoint are replayed: metrics.jsonl and
    TensorBoard hold each step once (the replay's values), the resume marked by one event."""
    events = _events(runs.home / "resumed")
    train = [e["step"] for e in events if e["event"] == "train"]
    assert train == list(range(1, EPOCHS * SPE + 1)), \
        "replayed steps logged twice: does app.run pass resume_step to start_run_dir?"
    epoch_ends = [SPE * (e + 1) for e in range(EPOCHS)]
    assert [e["step"] for e in events if e["event"] == "epoch"] == epoch_ends
    assert [e["step"] for e in events if e["event"] == "resume"] == [runs.killed_checkpoint]
    assert len([e for e in events if e["event"] == "summary"]) == 1
    reference = {e["step"]: e["train/loss"] for e in _events(runs.home / "reference")
                 if e["event"] == "train"}
    assert {e["step"]: e["train/loss"] for e in events if e["event"] == "train"} == reference

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(runs.home / "resumed"))
    board.Reload()
    steps = [s.step for s in board.Scalars("train/loss")]
    assert len(steps) == len(set(steps)), f"TensorBoard holds a step twice: {steps}"
    assert set(steps) >= set(range(runs.killed_checkpoint + 1, EPOCHS * SPE + 1))


@pytest.mark.slow   # the kill -9 commands of the module fixture: about 30 s
@pytest.mark.parametrize("damage", FALLBACKS)
def test_a_damaged_last_checkpoint_falls_back_to_prev(runs, damage):
    """last.pt truncated, garbage, or a pickle carrying code: a warning names it, the run
    resumes from prev.pt (one epoch earlier) and still ends bit-exact; planted code never runs."""
    warnings = [m for level, m in runs.fallback_logs[damage] if level == "WARNING"]
    last = runs.home / damage / "checkpoints" / "last.pt"
    prev = runs.home / damage / "checkpoints" / "prev.pt"
    assert any(str(last) in m and f"resuming from {prev}" in m and FALLBACK_REASONS[damage] in m
               for m in warnings), warnings
    infos = [m for level, m in runs.fallback_logs[damage] if level == "INFO"]
    assert any(f"at step {runs.killed_checkpoint - SPE} " in m for m in infos), infos
    assert _same(runs.weights(damage), runs.reference)
    assert not runs.marker.exists(), "the planted pickle ran"


def test_a_planted_checkpoint_is_live_code(tmp_path):
    """The control: what resume refused really runs code when unpickled without weights_only."""
    control = tmp_path / "control"
    torch.save({"student": PlantedCode(control)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert control.exists()


@pytest.mark.slow   # the kill -9 commands of the module fixture: about 30 s
def test_no_readable_checkpoint_stops_with_one_error_and_changes_nothing(runs):
    """last.pt carries code and prev.pt is truncated: never a silent start from zero."""
    r = runs.refused
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: trainer.resume: cannot resume"), r.stderr
    folder = runs.home / "refused" / "checkpoints"
    assert f"{folder / 'last.pt'}: UnpicklingError" in r.stderr and "posix.system" in r.stderr
    assert f"{folder / 'prev.pt'}: " in r.stderr and "trainer.resume=false" in r.stderr
    assert len(lines) <= 8, r.stderr
    assert _files(runs.home / "refused") == runs.refused_before
    assert not runs.marker.exists(), "the planted pickle ran"


# --- the pieces, without training --------------------------------------------------------------
def _checkpoint(step: int) -> dict:
    return {**{k: {} for k in CHECKPOINT_KEYS}, "state": {"global_step": step}}


def test_checkpoint_rotation_keeps_prev_when_last_is_damaged(tmp_path):
    folder = tmp_path / "checkpoints"
    atomic_torch_save(_checkpoint(1), folder / "last.pt")
    atomic_torch_save(_checkpoint(2), folder / "last.pt")
    (folder / "last.pt").write_bytes(b"\0" * 100)          # damaged after it was written
    atomic_torch_save(_checkpoint(3), folder / "last.pt")  # the next epoch end of the resumed run
    assert torch.load(folder / "prev.pt", weights_only=True)["state"]["global_step"] == 1
    assert torch.load(folder / "last.pt", weights_only=True)["state"]["global_step"] == 3
    assert (folder / "last.pt.unreadable").read_bytes() == b"\0" * 100
    atomic_torch_save(_checkpoint(4), folder / "last.pt")
    assert torch.load(folder / "prev.pt", weights_only=True)["state"]["global_step"] == 3


@pytest.mark.parametrize("damage", ["planted", "not-ours", "truncated"])
def test_a_rejected_last_checkpoint_never_replaces_prev(tmp_path, damage):
    """last.pt rejected at resume, even a valid zip archive (a pickle carrying code, a file
    without our keys): the run resumes from prev.pt, and its first save must keep that prev.pt,
    not demote the rejected last.pt over it."""
    folder = tmp_path / "checkpoints"
    atomic_torch_save(_checkpoint(1), folder / "last.pt")
    atomic_torch_save(_checkpoint(2), folder / "last.pt")
    marker = tmp_path / "PLANTED_CODE_RAN"
    last = folder / "last.pt"
    if damage == "planted":
        torch.save({"student": PlantedCode(marker)}, last)
    elif damage == "not-ours":
        torch.save({"student": {}}, last)
    else:
        last.write_bytes(last.read_bytes()[:200])
    rejected = last.read_bytes()
    assert damage == "truncated" or zipfile.is_zipfile(last)   # passes a zip-format check
    ckpt, path = load_latest_checkpoint(tmp_path)                  # resume
    assert path.name == "prev.pt" and ckpt["state"]["global_step"] == 1
    atomic_torch_save(_checkpoint(2), folder / "last.pt")          # its first save
    assert torch.load(folder / "prev.pt", weights_only=True)["state"]["global_step"] == 1
    assert torch.load(folder / "last.pt", weights_only=True)["state"]["global_step"] == 2
    assert (folder / "last.pt.unreadable").read_bytes() == rejected
    atomic_torch_save(_checkpoint(3), folder / "last.pt")          # a good last.pt: rotated
    assert torch.load(folder / "prev.pt", weights_only=True)["state"]["global_step"] == 2
    assert not marker.exists(), "the planted pickle ran"


def test_why_each_damaged_last_checkpoint_is_skipped(tmp_path):
    """The reasons test_a_damaged_last_checkpoint_falls_back_to_prev expects, without training."""
    good = tmp_path / "good.pt"
    torch.save(_checkpoint(1), good)
    damaged = {"truncated": good.read_bytes()[:len(good.read_bytes()) // 2],
               "garbage": GARBAGE_HEAD + os.urandom(4096)}
    torch.save({"student": PlantedCode(tmp_path / "PLANTED_CODE_RAN")}, tmp_path / "planted.pt")
    damaged["planted"] = (tmp_path / "planted.pt").read_bytes()
    for damage in FALLBACKS:
        path = tmp_path / f"{damage}.pt"
        path.write_bytes(damaged[damage])
        with pytest.raises(ValueError, match=re.escape(FALLBACK_REASONS[damage])):
            read_checkpoint(path)
    assert not (tmp_path / "PLANTED_CODE_RAN").exists()


def test_latest_checkpoint_choice(tmp_path, caplog):
    assert load_latest_checkpoint(tmp_path) is None                   # a fresh run
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save(_checkpoint(1), folder / "prev.pt")                   # killed between renames
    with caplog.at_level(logging.WARNING, logger="distill"):
        _, path = load_latest_checkpoint(tmp_path)
    assert path.name == "prev.pt" and "last.pt is missing" in caplog.text
    torch.save({"student": {}}, folder / "last.pt")                  # loads, but is not ours
    torch.save([1, 2], folder / "prev.pt")
    with pytest.raises(ConfigError) as err:
        load_latest_checkpoint(tmp_path)
    assert err.value.key == "trainer.resume"
    assert "last.pt: not a distill training checkpoint (no parts" in str(err.value)
    assert "prev.pt: not a distill training checkpoint" in str(err.value)


def test_trim_metrics_drops_what_the_resumed_run_logs_again(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"event": "teacher", "step": 0}, {"event": "train", "step": 4},
             {"event": "epoch", "step": 4}, {"event": "summary"}, {"event": "train", "step": 5}]
    path.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"event": "tra')
    assert trim_metrics(path, 4) == 2   # step 5 and the line a kill cut short
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:4]
    mtime = path.stat().st_mtime_ns
    assert trim_metrics(path, 4) == 0 and path.stat().st_mtime_ns == mtime
    assert trim_metrics(tmp_path / "none.jsonl", 4) == 0
