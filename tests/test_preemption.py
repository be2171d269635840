"""Preemption: SIGTERM / SIGUSR1 stop a real training process after the current step with a
checkpoint and exit code 75; the same command then finishes the run bit for bit as if it had never
stopped; under torchrun too (slow). Plus the hand-over to submitit's requeue handler, in-process.

The three commands (uninterrupted, SIGTERM, SIGUSR1) start together once per module: each pays
~5-20 s of imports on this machine. Each signal is sent once its run has logged a few steps.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _compose import make_cfg
from distill.app import run
from distill.distillers.none import Vanilla
from distill.engine.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "tools" / "train.py"
# 256 fake images in batches of 16: 16 steps an epoch, 48 in all; every step logged
RUN = ["dataset=fake", "distiller=none", "student=resnet8", "trainer.epochs=3",
       "trainer.batch_size=16", "trainer.log_every=1", "zoo.publish=false"]
ARGS = [*RUN, "logger=jsonl", "trainer.progress=false"]   # make_cfg sets these two itself
TOTAL_STEPS = 48
SIGNAL_AFTER_STEPS = 3


# one xdist worker runs this module: its fixture drives the signalled jobs once
pytestmark = pytest.mark.xdist_group("preemption")


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
               DISTILL_ZOO=str(home / "zoo"))
    return env


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _train_steps(run_dir: Path) -> int:
    return sum(e["event"] == "train" for e in _events(run_dir))


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


class Job:
    """One training command, its output in a file (a pipe could fill and block it), and the
    signal to send it once it has logged a few steps: to the process, or with `group` to its
    whole process group, as SLURM does."""

    def __init__(self, home: Path, name: str, *extra: str, send: signal.Signals | None = None,
                 group: bool = False, launcher: tuple[str, ...] = (sys.executable,),
                 repeat: float | None = None):
        self.run_dir = home / name
        self.log = home / f"{name}.log"
        self.args = [*launcher, str(TRAIN), *ARGS, *extra, f"hydra.run.dir={self.run_dir}"]
        self.send, self.group = send, group
        self.repeat = repeat   # send the signal again every `repeat` s until the job exits
        self.sent = 0
        self.last_sent = 0.0
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.args, cwd=home, env=_env(home), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=group)
        self.signalled_at: float | None = None
        self.exited_at: float | None = None

    @property
    def output(self) -> str:
        return self.log.read_text()

    def rerun(self) -> subprocess.CompletedProcess:
        home = self.run_dir.parent
        return subprocess.run(self.args, check=False, cwd=home, env=_env(home),
                              capture_output=True, text=True, timeout=300)


def drive(jobs: dict[str, Job], timeout: float = 300) -> dict[str, Job]:
    """Signal each job once it has logged SIGNAL_AFTER_STEPS steps; note when each exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(j.exited_at is None for j in jobs.values()):
        for job in jobs.values():
            if job.exited_at is not None:
                continue
            if job.proc.poll() is not None:   # exited (also before its signal: reported below)
                job.exited_at = time.monotonic()
            elif job.send and ((job.signalled_at is None
                                and _train_steps(job.run_dir) >= SIGNAL_AFTER_STEPS)
                               or (job.repeat and job.signalled_at is not None
                                   and time.monotonic() - job.last_sent >= job.repeat)):
                job.last_sent = time.monotonic()
                job.signalled_at = job.signalled_at or job.last_sent
                job.sent += 1
                if job.group:
                    os.killpg(job.proc.pid, job.send)
                else:
                    job.proc.send_signal(job.send)
        time.sleep(0.02)
    for job in jobs.values():
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()
    return jobs


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, Job]:
    home = tmp_path_factory.mktemp("preempt")
    return drive({
        "straight": Job(home, "straight"),
        "sigterm": Job(home, "sigterm", send=signal.SIGTERM),
        # the DataLoader path with a worker, which the group signal reaches too: forked inside
        # fit, it inherits the handler and must not die mid-step
        "sigusr1": Job(home, "sigusr1", "trainer.data_path=loader", "trainer.num_workers=1",
                       send=signal.SIGUSR1, group=True),
        # Ctrl-C (twice: the second while the run stops), and SIGTERM every 10 ms until the
        # process is gone: late signals must never turn the stop into a death by signal
        "sigint": Job(home, "sigint", send=signal.SIGINT, repeat=0.05),
        "sigterm_storm": Job(home, "sigterm_storm", send=signal.SIGTERM, repeat=0.01),
    })


def _check_preempted(job: Job, signame: str, exit_code: int | None = EXIT_PREEMPTED) -> int:
    """The checks every preempted run passes; returns the step of its checkpoint."""
    assert job.signalled_at is not None, f"the run ended before the signal:\n{job.output[-3000:]}"
    if exit_code is None:   # torchrun: its own non-zero code
        assert job.proc.returncode != 0, job.output[-3000:]
    else:
        assert job.proc.returncode == exit_code, job.output[-3000:]
    assert job.exited_at - job.signalled_at < 30
    state = _checkpoint(job.run_dir)["state"]
    step = state["global_step"]
    assert SIGNAL_AFTER_STEPS <= step < TOTAL_STEPS and not state["finished"]
    assert f"preempted by {signame} at step {step}; checkpoint written" in job.output
    if exit_code is not None:   # torchrun prints its own traceback for the signal it got
        assert "Traceback" not in job.output
    assert [e["step"] for e in _events(job.run_dir) if e["event"] == "preempted"] == [step]
    assert not (job.run_dir / "summary.json").exists()
    return step


@pytest.mark.slow   # the signalled training subprocesses of the module fixture: about 40 s
def test_sigterm_checkpoints_the_step_and_the_rerun_equals_an_uninterrupted_run(jobs):
    job, straight = jobs["sigterm"], jobs["straight"]
    step = _check_preempted(job, "SIGTERM")
    assert straight.proc.returncode == 0, straight.output[-3000:]

    _check_resume_equals(job, straight, step)


def _check_resume_equals(job: Job, straight: Job, step: int) -> None:
    """Re-running the preempted command resumes at `step` and ends with the weights of the run
    that was never stopped, bit for bit."""
    rerun = job.rerun()
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    resumed = [e for e in _events(job.run_dir) if e["event"] == "resume"]
    assert [e["resumed_at_step"] for e in resumed] == [step]
    a = load_file(str(straight.run_dir / "student.safetensors"))
    b = load_file(str(job.run_dir / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((job.run_dir / "summary.json").read_text())
    assert summary["steps"] == TOTAL_STEPS and [h["epoch"] for h in summary["history"]] == [1, 2, 3]


@pytest.mark.slow   # the signalled training subprocesses of the module fixture: about 40 s
def test_sigusr1_to_the_process_group_with_loader_workers(jobs):
    _check_preempted(jobs["sigusr1"], "SIGUSR1")


@pytest.mark.slow   # the signalled training subprocesses of the module fixture: about 40 s
def test_ctrl_c_stops_like_sigterm_with_its_own_exit_code(jobs):
    job = jobs["sigint"]
    _check_preempted(job, "SIGINT", exit_code=EXIT_INTERRUPTED)
    assert job.sent >= 1


@pytest.mark.slow   # the signalled training subprocesses of the module fixture: about 40 s
def test_signals_while_the_run_stops_never_kill_it(jobs):
    """SIGTERM every 10 ms from the first until the process has exited: still exit 75, one
    checkpoint, no traceback (before, a late SIGTERM could end it with 143)."""
    job = jobs["sigterm_storm"]
    _check_preempted(job, "SIGTERM")
    assert job.sent >= 3, job.sent


@pytest.mark.slow
def test_torchrun_forwards_sigterm_and_both_ranks_stop_at_one_step(tmp_path):
    """Two gloo ranks under torchrun, which answers SIGTERM by sending it to its workers (and
    exits with its own code, 1): one checkpoint at one step, and the re-run equals a run that was
    never stopped. 30-60 s on 2 CPU cores: marked slow."""
    jobs = drive({"straight": Job(tmp_path, "straight", launcher=tuple(TORCHRUN)),
                  "sigterm": Job(tmp_path, "sigterm", send=signal.SIGTERM,
                                 launcher=tuple(TORCHRUN))})
    assert jobs["straight"].proc.returncode == 0, jobs["straight"].output[-3000:]
    step = _check_preempted(jobs["sigterm"], "SIGTERM", exit_code=None)
    _check_resume_equals(jobs["sigterm"], jobs["straight"], step)


# --- in-process: the hand-over to a previous (submitit) handler -----------------------------------
def test_submitit_handler_runs_after_the_checkpoint(tmp_path, monkeypatch):
    """Inside a submitit job its requeue signal (USR2) is caught too; once the checkpoint of the
    step is written, the handler that was there before (submitit's requeue) gets the signal."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    run_dir = tmp_path / "run"
    calls = []

    def submitit_like(signum, frame):
        calls.append((signum, _checkpoint(run_dir)["state"]["global_step"]))

    forward = Vanilla.forward

    def signalling_forward(self, images, targets, ctx):
        if ctx.step == 2:   # during the third step
            os.kill(os.getpid(), signal.SIGUSR2)
        return forward(self, images, targets, ctx)

    monkeypatch.setattr(Vanilla, "forward", signalling_forward)
    previous = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        with pytest.raises(Preempted, match="preempted by SIGUSR2 at step 3"):
            run(make_cfg(tmp_path, *RUN))
        assert calls == [(signal.SIGUSR2, 3)]
        assert signal.getsignal(signal.SIGUSR2) is submitit_like, "handlers are restored"
        # in a process that goes on (not the command line), the handlers are put back
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
