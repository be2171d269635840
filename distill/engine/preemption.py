"""Preemption: a signal asks the run to stop at the next step boundary with a checkpoint.

SIGTERM (what SLURM, Kubernetes and torchrun send first), SIGUSR1 and SIGINT (Ctrl-C) set a flag
instead of killing the process. The command exits EXIT_PREEMPTED (75) after SIGTERM/SIGUSR1 and
EXIT_INTERRUPTED (130, the shell's code for Ctrl-C) after SIGINT; either way re-running the
same command resumes. More signals while the run stops change nothing, up to the moment the
process exits (a second SIGTERM a moment after the first must not kill it mid-checkpoint);
only a third Ctrl-C gives up waiting (KeyboardInterrupt: files already written stay whole,
since every one is renamed into place). The trainer asks `stop_signal()` after every optimizer step; under DDP the
ranks add up their flags on log steps, so every rank finishes the same step and stops together
even when the signal reached only some of them. Rank 0 then writes `checkpoints/last.pt` (renamed into
place, so never half-written), and `Preempted` ends the run with EXIT_PREEMPTED. Re-running the
same command in the same run directory resumes from that step, bit for bit on CPU.

Cost: a flag read per step. Under DDP the ranks add up their flags only on logging steps
(`trainer.log_every`) and at epoch ends, where the trainer syncs anyway, so the stop comes up to
log_every steps after the signal and no step pays for an extra host sync.

Hydra's submitit launcher (hydra/launcher=slurm), read from hydra_submitit_launcher 1.2 and
submitit 1.5 -- not run on a SLURM cluster here:
- SLURM sends submitit's signal (USR2, or $SUBMITIT_PREEMPT_SIGNAL) `hydra.launcher.signal_delay_s`
  seconds before the time limit. Inside a submitit job we catch that signal as well, and once the
  checkpoint is written we hand it to submitit's own handler, which requeues the job (rank 0) and
  exits. Without this, submitit would requeue at once and lose the steps since the last epoch's
  checkpoint. signal_delay_s must cover one step plus writing a checkpoint. submitit requeues a
  run that hit its time limit only while `hydra.launcher.max_num_timeout` (0 in
  configs/hydra/launcher/slurm.yaml) allows; otherwise the job ends, and re-running the command
  resumes from the checkpoint.
- A SLURM preemption (SIGTERM) is handled as above; SLURM itself requeues the job when the
  partition's PreemptMode is REQUEUE.
- The requeued job runs the same Hydra job again: the sweep directory's `${now:...}` is cached
  in the pickled config (checked: it survives pickling, and Hydra copies it into each job's
  config), so the job lands in the same run directory and resumes from the checkpoint.
The hand-over is tested in-process with a stand-in for submitit's handler
(tests/test_preemption.py); SIGTERM and SIGUSR1 with real processes, also under torchrun.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

import torch

from distill import distributed as dist_utils

# EX_TEMPFAIL (sysexits.h): "try again later" -- the run is fine and resumes when re-run
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130   # 128 + SIGINT, as a shell reports Ctrl-C; also resumes when re-run
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
FORCE_AFTER_INTERRUPTS = 3   # Ctrl-C pressed this often stops waiting for the step
# SIGINTs closer together than this are one press (under torchrun the terminal's and torchrun's
# forwarded copy arrive together)
SAME_PRESS_SECONDS = 0.5
_exit_on_stop = False


def exit_on_stop(enabled: bool = True) -> None:
    """Called by an entry point whose process ends when a run stops on a signal (the command
    line): from then on, signals that come after the stop are ignored until the process is
    gone, so a second SIGTERM cannot turn exit 75 into death by signal (143). In a process that
    goes on (a notebook, a test), the handlers that were there before are put back instead."""
    global _exit_on_stop
    _exit_on_stop = enabled


class Preempted(Exception):
    """The run stopped on a signal after writing its checkpoint; re-run the command to resume."""

    def __init__(self, message: str, signum: int = 0):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_PREEMPTED




def _submitit_signal() -> signal.Signals | None:
    """The signal submitit's job handler requeues on, when this process is a submitit job."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


class PreemptionGuard:
    """`with PreemptionGuard() as guard:` catches the signals for the duration of the block
    (main thread only: Python delivers signals there) and restores the previous handlers."""

    def __init__(self, device: torch.device | None = None):
        self.device = device or torch.device("cpu")
        self.received = 0            # the first signal's number; 0 while none came
        self.interrupts = 0          # Ctrl-C presses
        self._last_interrupt = -math.inf
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # A second SIGTERM changes nothing on purpose: SLURM and torchrun may both deliver one
        # to a worker, and dying on the second would lose the checkpoint. A hung run still
        # stops on a third Ctrl-C, or SIGKILL.
        self.received = self.received or signum
        if signum == signal.SIGINT:
            now = time.monotonic()
            if now - self._last_interrupt >= SAME_PRESS_SECONDS:
                self.interrupts += 1
            self._last_interrupt = now
            if self.interrupts >= FORCE_AFTER_INTERRUPTS:
                raise KeyboardInterrupt

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            return self   # signal.signal would raise; the process keeps its handlers
        for sig in {*SIGNALS, _submitit_signal()} - {None}:
            if signal.getsignal(sig) is None:   # a handler set from C: left to it
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        stopping = exc_type is Preempted
        for sig, handler in self._previous.items():
            # After a stop the process is on its way out: where the previous handler would kill
            # it (SIG_DFL) or raise (Python's Ctrl-C handler), later signals are ignored instead,
            # so another SIGTERM cannot turn exit 75 into death by signal (143). SIG_IGN, not a
            # Python function: the interpreter puts SIG_DFL back for those while it exits.
            late = (stopping and _exit_on_stop
                    and handler in (signal.SIG_DFL, signal.default_int_handler))
            signal.signal(sig, signal.SIG_IGN if late else handler)
        previous = self._previous.get(self.received)
        if stopping and callable(previous) and previous is not signal.default_int_handler:
            # e.g. submitit's handler: it requeues the job now that the checkpoint is written
            # (and may exit the process itself). SIG_DFL / SIG_IGN are not callable: skipped.
            previous(self.received, None)

    def stop_signal(self, collective: bool = True) -> int:
        """Nonzero when any rank received a signal: this rank's signal number, or -1 when only
        another rank got one. Called at the same point of every step on every rank; under DDP
        the ranks compare flags only where `collective` is true (the trainer's log steps, which
        sync anyway), so a signal costs up to `trainer.log_every` steps of delay, never a host
        sync per step."""
        if dist_utils.world_size() == 1:
            return self.received
        if not collective:
            return 0
        flag = torch.tensor([1 if self.received else 0], device=self.device)
        dist_utils.all_reduce_sum(flag)
        return (self.received or -1) if flag.item() else 0


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name if signum > 0 else "a signal to another rank"
