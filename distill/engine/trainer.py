"""The training loop: read it top to bottom.

    batch -> distiller(images, targets, ctx) -> dict of weighted loss terms -> sum -> backward
    -> optimizer step -> scheduler step -> (every `log_every` steps) trackers get every term
    -> end of epoch (or trainer.max_steps): evaluate, checkpoint
    -> end of run: student.safetensors + summary.json.

Position in the run is the global optimizer step alone: the epoch and the batch within it are
derived from it, and the data order is a function of (seed, epoch), so a resumed run continues
exactly where the checkpoint was taken, also mid-epoch (bit for bit on CPU with num_workers=0).
Everything on disk is written by rank 0 only. Host syncs (`.item()`) happen only on log steps
(and once per step under trainer.on_nonfinite=skip).

A non-finite loss stops the run at the next log step (trainer.on_nonfinite=stop), before any
checkpoint could take the broken weights, naming the first bad step and each term's value; or,
with on_nonfinite=skip, the step is dropped: no optimizer update, the student's buffers (BN
statistics) put back, and RunState.skipped_steps counts it. SIGTERM / SIGUSR1 stop the run after
the current step with a checkpoint (distill/engine/preemption.py).

Under torchrun (DDP), `trainer.batch_size` stays the GLOBAL batch: each of N ranks takes its
slice of every global batch, so a run means the same thing on 1 or 8 processes, and the
distiller (student and connectors, never the teacher) is wrapped in DistributedDataParallel.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from distill.config import flatten
from distill.data import DatasetBundle
from distill.data.batched import BatchTransform, DeviceBatches, batch_transform_of
from distill.distillers import Distiller, StepContext
from distill.engine import distributed as dist_utils
from distill.engine.checkpoint import atomic_torch_save, rng_state, save_weights, set_rng_state
from distill.engine.evaluation import evaluate
from distill.engine.optim import build_optimizer, build_scheduler
from distill.engine.preemption import Preempted, PreemptionGuard, signal_name
from distill.engine.progress import ProgressDisplay
from distill.engine.rundir import write_text_atomic
from distill.engine.sampler import EpochSampler, epoch_seed
from distill.errors import ConfigError
from distill.tracking import Trackers, build_trackers

log = logging.getLogger("distill")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainerOptions:
    epochs: int
    batch_size: int
    eval_batch_size: int = 256
    max_steps: int | None = None
    num_workers: int = 0
    log_every: int = 20
    precision: str = "fp32"
    resume: bool = True
    progress: bool = True
    sync_bn: bool = False      # DDP on GPUs: batch statistics over all ranks (SyncBatchNorm)
    data_path: str = "auto"    # memory (in-memory datasets, batched on the device) | loader
    channels_last: bool = True  # NHWC convolutions: faster on this CPU and on tensor-core GPUs
    compile: str = "none"      # torch.compile the teacher, the student, or both
    compile_backend: str = "inductor"
    on_nonfinite: str = "stop"  # stop | skip: what a non-finite loss does (NONFINITE_POLICIES)


@dataclass
class RunState:
    """Everything about the run's progress that a checkpoint must carry."""

    global_step: int = 0
    best_top1: float = 0.0
    last_top1: float = 0.0
    teacher_top1: float | None = None
    train_seconds: float = 0.0     # time inside the training loop only (no eval, no checkpoint)
    train_images: int = 0
    wall_seconds: float = 0.0      # summed over every process that worked on this run
    finished: bool = False
    skipped_steps: int = 0         # steps dropped for a non-finite loss (on_nonfinite=skip)
    history: list[dict] = field(default_factory=list)


class Trainer:
    def __init__(self, distiller: Distiller, data: DatasetBundle, *, options: TrainerOptions,
                 optimizer: dict, scheduler: dict, run_dir: Path, device: torch.device,
                 loggers: dict, config: dict, run_name: str, seed: int,
                 checkpoint: dict | None = None):
        self.distiller = distiller
        self.opt = options
        self.run_dir = Path(run_dir)
        self.device = device
        self.config = config
        self.run_name = run_name
        self.loggers = loggers
        self.main = dist_utils.is_main_process()

        self.seed = seed
        self.world_size, rank = dist_utils.world_size(), dist_utils.rank()
        self.sampler = EpochSampler(len(data.train), seed, global_batch=options.batch_size,
                                    rank=rank, world_size=self.world_size)
        # Each DataLoader iterator draws a worker base seed from its generator (the global RNG
        # if it has none). Own generators keep the global RNG, which the per-sample
        # augmentation uses and checkpoints carry, independent of when loaders are iterated.
        self.worker_seeds = torch.Generator()
        per_rank = options.batch_size // self.world_size
        # each rank evaluates every world_size-th image; the counts are summed over ranks
        val_indices = list(range(rank, len(data.val), self.world_size))
        on_device = data_path_transforms(data, options.data_path)
        if on_device is not None:
            train_tf, val_tf = on_device
            self.train_loader = DeviceBatches(data.train, train_tf, self.sampler,
                                              batch_size=per_rank, device=device, seed=seed, rank=rank)
            self.val_loader = DeviceBatches(data.val, val_tf, val_indices,
                                            batch_size=options.eval_batch_size, device=device)
        else:
            self.train_loader = DataLoader(data.train, batch_size=per_rank, sampler=self.sampler,
                                           num_workers=options.num_workers,
                                           generator=self.worker_seeds, drop_last=False,
                                           pin_memory=device.type == "cuda")
            self.val_loader = DataLoader(data.val, batch_size=options.eval_batch_size,
                                         sampler=val_indices, num_workers=options.num_workers,
                                         generator=torch.Generator().manual_seed(seed),
                                         pin_memory=device.type == "cuda")
        self.steps_per_epoch = self.sampler.steps
        self.memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
        distiller.to(memory_format=self.memory_format)
        # in place (nn.Module.compile): state-dict keys, hooks and checkpoints stay as they are
        if options.compile in ("teacher", "both") and distiller.teacher is not None:
            distiller.teacher.compile(backend=options.compile_backend)
        if options.compile in ("student", "both"):
            distiller.student.compile(backend=options.compile_backend)
        self.model = self._wrap(distiller, sync_bn=options.sync_bn)
        self.optimizer = build_optimizer(distiller.trainable_parameters(), **optimizer)
        self.scheduler = build_scheduler(self.optimizer, steps_per_epoch=self.steps_per_epoch,
                                         epochs=options.epochs, **scheduler)
        dtype = PRECISIONS[options.precision]
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=options.precision == "fp16")
        self.state = RunState()
        self.checkpoint_step: int | None = None   # the step of checkpoints/last.pt, when known
        self.stop_signal = 0                      # set when a signal asks the run to stop
        self.trackers = Trackers()
        self.tracker_resume: dict = {}
        if checkpoint is not None:
            self._restore(checkpoint)

    def _wrap(self, distiller: Distiller, *, sync_bn: bool) -> nn.Module:
        """The distiller as the training step calls it: itself, or in DDP when there are ranks.
        The teacher is never synchronised: it is frozen and identical everywhere."""
        if self.world_size == 1:
            return distiller
        if sync_bn:
            for name, child in distiller.named_children():
                if name != "teacher":
                    setattr(distiller, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        frozen = [n for n, _ in distiller.named_parameters() if n.startswith("teacher.")]
        frozen += [n for n, _ in distiller.named_buffers() if n.startswith("teacher.")]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            distiller, frozen)
        return nn.parallel.DistributedDataParallel(
            distiller, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=distiller.may_leave_parameters_unused)

    def _sync_buffers(self) -> None:
        dist_utils.broadcast_tensors(b for n, b in self.distiller.named_buffers()
                                     if not n.startswith("teacher."))

    # --- checkpoints -----------------------------------------------------------------------
    def _restore(self, ckpt: dict) -> None:
        self.distiller.student.load_state_dict(ckpt["student"])
        self.distiller.load_connector_state_dict(ckpt["connectors"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = RunState(**ckpt["state"])
        self.checkpoint_step = self.state.global_step
        set_rng_state(ckpt["rng"])
        if dist_utils.rank() > 0:   # the checkpoint holds rank 0's stream; others get their own
            torch.manual_seed(epoch_seed(self.seed + 7919 * dist_utils.rank(), self.state.global_step))
        # TensorBoard drops events past the checkpoint, so resumed curves are not duplicated
        self.tracker_resume = {**ckpt["trackers"], "tensorboard": {"step": self.state.global_step + 1}}
        log.info("resuming %s at step %d (epoch %d)", self.run_dir, self.state.global_step,
                 self.state.global_step // self.steps_per_epoch + 1)

    def save_checkpoint(self) -> None:
        self._check_weights_finite()   # on every rank: their weights are the same
        self.checkpoint_step = self.state.global_step
        if not self.main:
            return
        atomic_torch_save({
            "student": self.distiller.student.state_dict(),
            "connectors": self.distiller.connector_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": asdict(self.state),
            "rng": rng_state(),
            "trackers": self.trackers.resume_states(),
            "config": self.config,
        }, self.run_dir / "checkpoints" / "last.pt")

    # --- the loop ---------------------------------------------------------------------------
    def total_steps(self) -> int:
        steps = self.opt.epochs * self.steps_per_epoch
        return min(steps, self.opt.max_steps) if self.opt.max_steps else steps

    def _done(self) -> bool:
        return self.state.global_step >= self.total_steps()

    def _tick_wall_clock(self) -> None:
        now = time.perf_counter()
        self.state.wall_seconds += now - self._wall_mark
        self._wall_mark = now

    def fit(self) -> dict[str, Any]:
        """Train to the end (or to max_steps) and return the summary. A run that had already
        finished returns its summary untouched."""
        self._wall_mark = time.perf_counter()
        if self.state.finished and self._done() and (self.run_dir / "summary.json").is_file():
            log.info("%s is already finished; nothing to do", self.run_dir)
            return json.loads((self.run_dir / "summary.json").read_text())
        self.state.finished = False   # e.g. resumed with more epochs than it had
        # outermost, so trackers are closed before a submitit handler may requeue and exit
        with PreemptionGuard(self.device) as guard:
            return self._train(guard)

    def _train(self, guard: PreemptionGuard) -> dict[str, Any]:
        if self.main:
            self.trackers = build_trackers(self.loggers, self.run_dir, config=self.config,
                                           run_name=self.run_name,
                                           resume_state=self.tracker_resume)
        try:
            if self.state.global_step:
                self.trackers.log({"resumed_at_step": self.state.global_step},
                                  step=self.state.global_step, event="resume")
            if self.distiller.teacher is not None and self.state.teacher_top1 is None:
                self._evaluate_teacher()
            with ProgressDisplay(enabled=self.opt.progress and self.main,
                                 total=self.total_steps(), completed=self.state.global_step) as bar:
                while not self._done():
                    epoch, first_batch = divmod(self.state.global_step, self.steps_per_epoch)
                    self.sampler.set_epoch(epoch, first_batch)
                    if isinstance(self.train_loader, DeviceBatches):
                        self.train_loader.set_epoch(epoch, first_batch)
                    self.worker_seeds.manual_seed(   # rank 0: the single-process seed
                        epoch_seed(self.seed + 7919 * dist_utils.rank(), epoch))
                    epoch_terms = self._train_epoch(epoch, bar, guard)
                    if self.stop_signal and self.state.global_step % self.steps_per_epoch:
                        # mid-epoch: save the step, no evaluation (it may not fit the grace
                        # period); the resumed run evaluates at the end of this epoch
                        self._tick_wall_clock()
                        self.save_checkpoint()
                    else:
                        self._end_epoch(epoch, epoch_terms)
                    if self.stop_signal:
                        dist_utils.barrier()   # no rank exits before rank 0's checkpoint is on disk
                        raise self._preempted()
            return self._finish()
        finally:
            self.trackers.close()

    def _preempted(self) -> Preempted:
        step = self.state.global_step
        message = (f"preempted by {signal_name(self.stop_signal)} at step {step}; checkpoint "
                   f"written; re-run the same command to resume")
        self.trackers.log({"preempted_at_step": step}, step=step, event="preempted")
        if self.main:
            log.warning(message)
        return Preempted(message)

    def _evaluate_teacher(self) -> None:
        metrics = evaluate(self.distiller.teacher, self.val_loader, self.device,
                           reduce=dist_utils.all_reduce_sum, autocast=self.autocast,
                           memory_format=self.memory_format)
        self.state.teacher_top1 = metrics["top1"]
        log.info("teacher top-1 %.2f%% (top-5 %.2f%%)", metrics["top1"], metrics["top5"])
        self.trackers.log({"teacher/top1": metrics["top1"], "teacher/top5": metrics["top5"]},
                          step=self.state.global_step, event="teacher")

    def _train_epoch(self, epoch: int, bar: ProgressDisplay, guard: PreemptionGuard
                     ) -> dict[str, float]:
        """Train from the current position to the end of `epoch` (or max_steps, or a stop
        signal); returns the mean of every loss term over the steps applied."""
        self.distiller.train()
        skip_nonfinite = self.opt.on_nonfinite == "skip"
        buffers = [b for n, b in self.distiller.named_buffers() if not n.startswith("teacher.")]
        sums: dict[str, torch.Tensor] = {}
        # (step, its terms) since the last log step: kept as they are, stacked only to name a
        # bad step, so a good step costs no extra kernel
        window: list[tuple[int, list[torch.Tensor]]] = []
        applied = images_seen = window_images = 0
        epoch_start = window_start = time.perf_counter()
        for images, targets in self.train_loader:
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            targets = targets.to(self.device, non_blocking=True)
            ctx = StepContext(epoch=epoch, step=self.state.global_step, epochs=self.opt.epochs)
            saved = [b.clone() for b in buffers] if skip_nonfinite else []
            with self.autocast() if self.autocast else contextlib.nullcontext():
                _, losses = self.model(images, targets, ctx)
            loss = sum(losses.values())
            self.optimizer.zero_grad(set_to_none=True)
            # backward even for a step about to be skipped: DDP expects every forward's backward
            self.scaler.scale(loss).backward()
            if skip_nonfinite and _nonfinite_on_any_rank(loss):
                for buffer, value in zip(buffers, saved):
                    buffer.copy_(value)
                self.state.skipped_steps += 1
                if self.main:
                    log.warning("step %d skipped: non-finite loss (%s); %d skipped so far",
                                self.state.global_step + 1, _format_terms(
                                    list(losses), [float(v.detach()) for v in losses.values()]),
                                self.state.skipped_steps)
            else:
                self.scaler.step(self.optimizer)   # fp16: GradScaler still skips inf gradients
                self.scaler.update()
                applied += 1
                window.append((self.state.global_step + 1,
                               [v.detach() for v in losses.values()]))
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0) + value.detach()
                sums["loss"] = sums.get("loss", 0) + loss.detach()
            lr = self.optimizer.param_groups[0]["lr"]   # the lr this step used
            self.scheduler.step()
            self.state.global_step += 1
            images_seen += images.shape[0]
            window_images += images.shape[0]

            end_of_epoch = self.state.global_step % self.steps_per_epoch == 0 or self._done()
            log_step = self.state.global_step % self.opt.log_every == 0 or end_of_epoch
            # every rank stops after the same step (under DDP they compare on log steps only);
            # at the last step there is nothing to stop
            self.stop_signal = 0 if self._done() else guard.stop_signal(collective=log_step)
            if log_step or self.stop_signal:   # checked before any checkpoint takes the weights
                now = time.perf_counter()
                terms = _mean_over_ranks(sums, max(applied, 1))   # the host sync
                if not all(math.isfinite(v) for v in terms.values()):
                    raise self._nonfinite_error(window, list(losses))
                window.clear()
                speed = window_images * self.world_size / max(now - window_start, 1e-9)
                skipped = ({"train/skipped_steps": self.state.skipped_steps}
                           if skip_nonfinite else {})
                self.trackers.log({**{f"train/{k}": v for k, v in terms.items()},
                                   "train/lr": lr, "train/images_per_sec": speed,
                                   "train/epoch": epoch, **skipped},
                                  step=self.state.global_step, event="train")
                bar.update(self.state.global_step, epoch=epoch + 1, epochs=self.opt.epochs,
                           terms=terms, images_per_sec=speed)
                window_images, window_start = 0, now
            if self._done() or self.stop_signal:
                break
        self.state.train_seconds += time.perf_counter() - epoch_start
        self.state.train_images += images_seen * self.world_size
        return _mean_over_ranks(sums, max(applied, 1))

    def _nonfinite_error(self, window: list[tuple[int, list[torch.Tensor]]],
                         names: list[str]) -> FloatingPointError:
        """The error for a non-finite mean loss: the first bad step since the last log step and
        each term's value there (mean over ranks), and where the last good checkpoint is. Every
        rank gets here together: the all-reduced mean was non-finite on all of them."""
        values = torch.stack([torch.stack([t.double() for t in terms]) for _, terms in window])
        dist_utils.all_reduce_sum(values)
        values /= self.world_size
        bad = (~torch.isfinite(values)).any(dim=1).nonzero().flatten().tolist()
        row = bad[0] if bad else len(window) - 1
        message = (f"non-finite loss at step {window[row][0]}: "
                   f"{_format_terms(names, values[row].tolist())}; {self._last_good_checkpoint()}")
        if self.opt.on_nonfinite == "stop":
            message += "; set trainer.on_nonfinite=skip to skip such steps"
        return FloatingPointError(message)

    def _end_epoch(self, epoch: int, epoch_terms: dict[str, float]) -> None:
        self._sync_buffers()
        metrics = evaluate(self.distiller.student, self.val_loader, self.device,
                           reduce=dist_utils.all_reduce_sum, autocast=self.autocast,
                           memory_format=self.memory_format)
        # a run stopped by max_steps mid-epoch still ends with an evaluated, checkpointed model
        completed = self.state.global_step / self.steps_per_epoch
        self.state.last_top1 = metrics["top1"]
        self.state.best_top1 = max(self.state.best_top1, metrics["top1"])
        self.state.history.append({"epoch": _whole_or_fraction(completed),
                                   "step": self.state.global_step,
                                   "top1": metrics["top1"], "top5": metrics["top5"]})
        self.trackers.log({"epoch": _whole_or_fraction(completed), "val/top1": metrics["top1"],
                           "val/top5": metrics["top5"], "val/loss": metrics["loss"],
                           "val/best_top1": self.state.best_top1,
                           **{f"epoch/{k}": v for k, v in epoch_terms.items()}},
                          step=self.state.global_step, event="epoch")
        terms = "  ".join(f"{k} {v:.4f}" for k, v in epoch_terms.items())
        log.info("epoch %s/%d  %s  val top-1 %.2f%% (best %.2f%%)  top-5 %.2f%%",
                 _whole_or_fraction(completed), self.opt.epochs, terms, metrics["top1"], self.state.best_top1, metrics["top5"])
        self._tick_wall_clock()
        self.save_checkpoint()

    def _check_weights_finite(self) -> None:
        """A finite loss can still come with non-finite gradients (fp32 has no GradScaler to
        catch them), so before a checkpoint can take the weights they are checked themselves:
        one host sync per checkpoint (the names are looked up only when something is wrong)."""
        params = [(n, p) for n, p in self.distiller.named_parameters()
                  if not n.startswith("teacher.")]
        finite = torch.stack([torch.isfinite(p).all() for _, p in params])
        if not finite.all():
            bad = [n for (n, _), ok in zip(params, finite.tolist()) if not ok]
            raise FloatingPointError(
                f"non-finite weights after step {self.state.global_step} (e.g. {bad[0]}; "
                f"{len(bad)} tensors) although every loss was finite: non-finite gradients; "
                f"{self._last_good_checkpoint()}, left as it was; lower optimizer.lr or use "
                f"trainer.precision=fp32")

    def _last_good_checkpoint(self) -> str:
        if self.checkpoint_step is None:
            return "no checkpoint was written before it"
        return (f"the last good checkpoint is {self.run_dir / 'checkpoints' / 'last.pt'} "
                f"(step {self.checkpoint_step})")

    def _finish(self) -> dict[str, Any]:
        self.state.finished = True
        self._tick_wall_clock()
        student = self.distiller.student
        completed_all = self.state.global_step >= self.opt.epochs * self.steps_per_epoch
        summary = {
            "best_top1": self.state.best_top1,
            "last_top1": self.state.last_top1,
            "teacher_top1": self.state.teacher_top1,
            "train_images_per_sec": (self.state.train_images / self.state.train_seconds
                                     if self.state.train_seconds else None),
            "world_size": self.world_size,
            "global_batch_size": self.opt.batch_size,   # trainer.batch_size is global
            "per_rank_batch_size": self.opt.batch_size // self.world_size,
            "epochs": _whole_or_fraction(self.state.global_step / self.steps_per_epoch),
            "steps": self.state.global_step,
            "stopped_early": not completed_all,   # trainer.max_steps ended it
            "skipped_steps": self.state.skipped_steps,   # non-finite losses (on_nonfinite=skip)
            "wall_seconds": self.state.wall_seconds,
            "student_params": sum(p.numel() for p in student.parameters()),
            "connector_params": self.distiller.connector_parameter_count(),
            "history": self.state.history,
        }
        if self.main:
            self.save_checkpoint()   # records `finished`, so re-running the command is a no-op
            save_weights(student.state_dict(), self.run_dir / "student.safetensors",
                         metadata={"top1": self.state.last_top1})
            write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            hparams = {k: v for k, v in flatten(self.config).items()
                       if not k.startswith(("logger", "zoo", "run_dir"))}
            self.trackers.finish(hparams, {k: v for k, v in summary.items() if k != "history"})
        return summary


DATA_PATHS = ("auto", "memory", "loader")
NONFINITE_POLICIES = ("stop", "skip")
COMPILE_CHOICES = ("none", "teacher", "student", "both")


def data_path_transforms(data: DatasetBundle, data_path: str
                         ) -> tuple[BatchTransform, BatchTransform] | None:
    """The (train, val) batch transforms of the in-memory path, or None for the DataLoader path.
    `auto` takes the in-memory path whenever both splits allow it; `memory` insists."""
    if data_path == "loader":
        return None
    train_tf, val_tf = batch_transform_of(data.train), batch_transform_of(data.val)
    if train_tf is None or val_tf is None:
        if data_path == "memory":
            raise ConfigError("this dataset is not held in memory as uint8 tensors with the "
                              "crop/flip/normalise recipe", key="trainer.data_path",
                              allowed="auto or loader for this dataset")
        return None
    return train_tf, val_tf


def _mean_over_ranks(sums: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
    """Each loss term's mean over the steps taken and over all ranks (one all-reduce)."""
    if not sums:
        return {}
    names = list(sums)   # the same order on every rank: each rank's distiller made the same terms
    values = torch.stack([torch.as_tensor(sums[n], dtype=torch.float64) for n in names])
    dist_utils.all_reduce_sum(values)
    return {n: float(v) / (steps * dist_utils.world_size()) for n, v in zip(names, values)}


def _whole_or_fraction(x: float) -> int | float:
    return int(x) if x == int(x) else round(x, 4)


def _nonfinite_on_any_rank(loss: torch.Tensor) -> bool:
    """Whether any rank's loss is NaN/inf: all ranks skip a step together. One host sync."""
    bad = (~torch.isfinite(loss.detach())).to(torch.int32).reshape(1)
    dist_utils.all_reduce_sum(bad)
    return bool(bad.item())


def _format_terms(names, values) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in zip(names, values))
