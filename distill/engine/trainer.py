"""The training loop: read it top to bottom.

    batch -> distiller(images, targets, ctx) -> dict of weighted loss terms -> sum -> backward
    -> optimizer step -> scheduler step -> (every `log_every` steps) trackers get every term
    -> end of epoch: evaluate, checkpoint -> end of run: student.safetensors + summary.json.

Everything on disk is written by rank 0 only. Host syncs (`.item()`) happen only on logging steps.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from distill.data import DatasetBundle
from distill.distillers import Distiller, StepContext
from distill.engine import distributed as dist_utils
from distill.engine.checkpoint import (atomic_torch_save, load_training_state, rng_state,
                                       save_weights, set_rng_state)
from distill.engine.evaluation import evaluate
from distill.engine.optim import build_optimizer, build_scheduler
from distill.engine.progress import ProgressDisplay
from distill.errors import ConfigError
from distill.tracking import Trackers, build_trackers

log = logging.getLogger("distill")

# Settings that may differ when a run is resumed; any other difference is a different experiment.
RESUMABLE_CHANGES = ("trainer.max_steps", "trainer.epochs", "trainer.resume", "trainer.num_workers",
                     "trainer.log_every", "trainer.progress", "trainer.eval_batch_size", "logger",
                     "run_dir", "zoo", "teacher.auto_train", "teacher.auto_train_epochs")


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


@dataclass
class RunState:
    epoch: int = 0                 # epochs completed
    global_step: int = 0
    best_top1: float = 0.0
    last_top1: float = 0.0
    teacher_top1: float | None = None
    train_seconds: float = 0.0     # time inside the training loop only (no eval, no checkpoint)
    train_images: int = 0
    history: list[dict] = field(default_factory=list)


def _autocast_factory(precision: str, device: torch.device):
    if precision == "fp32":
        return None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ConfigError(f"unknown precision '{precision}'", key="trainer.precision",
                          allowed="fp32, bf16, fp16")
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = []
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}{key}"
            if any(path == k or path.startswith(k + ".") for k in RESUMABLE_CHANGES):
                continue
            diffs += _config_differences(old.get(key), new.get(key), path + ".")
        return diffs
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


class Trainer:
    def __init__(self, distiller: Distiller, data: DatasetBundle, *, options: TrainerOptions,
                 optimizer: dict, scheduler: dict, run_dir: Path, device: torch.device,
                 loggers: dict, config: dict, run_name: str, seed: int):
        self.distiller = distiller.to(device)
        self.data = data
        self.opt = options
        self.run_dir = Path(run_dir)
        self.device = device
        self.config = config
        self.run_name = run_name
        self.seed = seed
        self.main = dist_utils.is_main_process()

        self.generator = torch.Generator().manual_seed(seed)  # shuffling order, checkpointed
        self.train_loader = DataLoader(data.train, batch_size=options.batch_size, shuffle=True,
                                       num_workers=options.num_workers, generator=self.generator,
                                       pin_memory=device.type == "cuda", drop_last=False,
                                       persistent_workers=options.num_workers > 0)
        self.val_loader = DataLoader(data.val, batch_size=options.eval_batch_size, shuffle=False,
                                     num_workers=options.num_workers,
                                     pin_memory=device.type == "cuda")
        self.steps_per_epoch = len(self.train_loader)
        self.optimizer = build_optimizer(distiller.trainable_parameters(), **optimizer)
        self.scheduler = build_scheduler(self.optimizer, steps_per_epoch=self.steps_per_epoch,
                                         epochs=options.epochs, **scheduler)
        self.autocast = _autocast_factory(options.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=options.precision == "fp16")
        self.state = RunState()
        self.trackers = Trackers()
        self.loggers = loggers

    # --- checkpoints -----------------------------------------------------------------------
    def _checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    def save_checkpoint(self) -> None:
        if not self.main:
            return
        atomic_torch_save({
            "student": self.distiller.student.state_dict(),
            "connectors": self.distiller.connector_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": self.state.__dict__,
            "rng": rng_state(),
            "loader_generator": self.generator.get_state(),
            "trackers": self.trackers.resume_states(),
            "config": self.config,
        }, self._checkpoint_path())

    def try_resume(self) -> dict | None:
        if not self.opt.resume:
            return None
        ckpt = load_training_state(self.run_dir)
        if ckpt is None:
            return None
        diffs = _config_differences(ckpt["config"], self.config)
        if diffs:
            raise ConfigError(
                f"{self.run_dir} holds a run with a different config:\n  " + "\n  ".join(diffs[:10]),
                key="run_dir",
                hint="choose another run directory (hydra.run.dir=... or tag=...), or pass "
                     "trainer.resume=false to start this one over")
        self.distiller.student.load_state_dict(ckpt["student"])
        self.distiller.load_connector_state_dict(ckpt["connectors"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = RunState(**ckpt["state"])
        set_rng_state(ckpt["rng"])
        self.generator.set_state(ckpt["loader_generator"])
        log.info("resumed from %s at epoch %d (step %d)", self._checkpoint_path(),
                 self.state.epoch, self.state.global_step)
        return ckpt

    # --- the loop ---------------------------------------------------------------------------
    def total_steps(self) -> int:
        steps = self.opt.epochs * self.steps_per_epoch
        return min(steps, self.opt.max_steps) if self.opt.max_steps else steps

    def _done(self) -> bool:
        return (self.state.epoch >= self.opt.epochs
                or bool(self.opt.max_steps and self.state.global_step >= self.opt.max_steps))

    def fit(self) -> dict[str, Any]:
        wall_start = time.perf_counter()
        ckpt = self.try_resume()
        if self.main:
            resume_state = dict(ckpt["trackers"]) if ckpt else {}
            if ckpt:
                resume_state["tensorboard"] = {"step": self.state.global_step + 1}
            self.trackers = build_trackers(self.loggers, self.run_dir, config=self.config,
                                           run_name=self.run_name, resume_state=resume_state)
        try:
            if self.distiller.teacher is not None and self.state.teacher_top1 is None:
                teacher_metrics = evaluate(self.distiller.teacher, self.val_loader, self.device,
                                           reduce=dist_utils.all_reduce_sum, autocast=self.autocast)
                self.state.teacher_top1 = teacher_metrics["top1"]
                log.info("teacher top-1 %.2f%% (top-5 %.2f%%)", teacher_metrics["top1"],
                         teacher_metrics["top5"])
                self.trackers.log({"teacher/top1": teacher_metrics["top1"],
                                   "teacher/top5": teacher_metrics["top5"]}, step=0, event="teacher")
            with ProgressDisplay(enabled=self.opt.progress and self.main,
                                 total=self.total_steps(), completed=self.state.global_step) as bar:
                while not self._done():
                    epoch_terms = self._train_epoch(bar)
                    self._end_epoch(epoch_terms)
            return self._finish(wall_start)
        finally:
            self.trackers.close()

    def _train_epoch(self, bar: ProgressDisplay) -> dict[str, float]:
        """One pass over the training data; returns the epoch's mean of every loss term."""
        self.distiller.train()
        epoch = self.state.epoch
        sums: dict[str, torch.Tensor] = {}
        window_images, window_start = 0, time.perf_counter()
        epoch_start = time.perf_counter()
        images_seen = 0
        for batch_index, (images, targets) in enumerate(self.train_loader):
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            ctx = StepContext(epoch=epoch, step=self.state.global_step, epochs=self.opt.epochs)
            with self.autocast() if self.autocast else contextlib.nullcontext():
                _, losses = self.distiller(images, targets, ctx)
            loss = sum(losses.values())
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.state.global_step += 1
            images_seen += images.shape[0]
            window_images += images.shape[0]
            for name, value in losses.items():
                sums[name] = sums.get(name, 0) + value.detach()
            sums["loss"] = sums.get("loss", 0) + loss.detach()

            last_of_epoch = batch_index == self.steps_per_epoch - 1 or self._done()
            if self.state.global_step % self.opt.log_every == 0 or last_of_epoch:
                now = time.perf_counter()
                terms = {k: float(v) / self._steps_in(sums) for k, v in sums.items()}
                self._check_finite(terms)
                speed = window_images * dist_utils.world_size() / max(now - window_start, 1e-9)
                self.trackers.log({**{f"train/{k}": v for k, v in terms.items()},
                                   "train/lr": self.optimizer.param_groups[0]["lr"],
                                   "train/images_per_sec": speed, "train/epoch": epoch},
                                  step=self.state.global_step, event="train")
                bar.update(self.state.global_step, epoch=epoch + 1, epochs=self.opt.epochs,
                           terms=terms, images_per_sec=speed)
                window_images, window_start = 0, now
            if self._done():
                break
        self.state.train_seconds += time.perf_counter() - epoch_start
        self.state.train_images += images_seen * dist_utils.world_size()
        return {k: float(v) / self._steps_in(sums) for k, v in sums.items()}

    def _steps_in(self, sums: dict) -> int:
        # every step adds to "loss", so its count is the number of steps since the epoch start
        return max(1, self.state.global_step - self.state.epoch * self.steps_per_epoch)

    @staticmethod
    def _check_finite(terms: dict[str, float]) -> None:
        bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
        if bad:
            raise FloatingPointError(f"non-finite loss: {bad} (all terms: {terms})")

    def _end_epoch(self, epoch_terms: dict[str, float]) -> None:
        metrics = evaluate(self.distiller.student, self.val_loader, self.device,
                           reduce=dist_utils.all_reduce_sum, autocast=self.autocast)
        self.state.epoch += 1
        # a run stopped by max_steps mid-epoch still ends with an evaluated, checkpointed model
        self.state.last_top1 = metrics["top1"]
        self.state.best_top1 = max(self.state.best_top1, metrics["top1"])
        record = {"epoch": self.state.epoch, "val/top1": metrics["top1"],
                  "val/top5": metrics["top5"], "val/loss": metrics["loss"],
                  "val/best_top1": self.state.best_top1,
                  **{f"epoch/{k}": v for k, v in epoch_terms.items()}}
        self.state.history.append({"epoch": self.state.epoch, "top1": metrics["top1"]})
        self.trackers.log(record, step=self.state.global_step, event="epoch")
        terms = "  ".join(f"{k} {v:.4f}" for k, v in epoch_terms.items())
        log.info("epoch %d/%d  %s  val top-1 %.2f%% (best %.2f%%)  top-5 %.2f%%",
                 self.state.epoch, self.opt.epochs, terms, metrics["top1"], self.state.best_top1,
                 metrics["top5"])
        self.save_checkpoint()

    def _finish(self, wall_start: float) -> dict[str, Any]:
        student = self.distiller.student
        n_params = sum(p.numel() for p in student.parameters())
        summary = {
            "best_top1": self.state.best_top1,
            "last_top1": self.state.last_top1,
            "teacher_top1": self.state.teacher_top1,
            "train_images_per_sec": (self.state.train_images / self.state.train_seconds
                                     if self.state.train_seconds else None),
            "world_size": dist_utils.world_size(),
            "global_batch_size": self.opt.batch_size * dist_utils.world_size(),
            "epochs": self.state.epoch,
            "steps": self.state.global_step,
            "wall_seconds": time.perf_counter() - wall_start,
            "student_params": n_params,
            "connector_params": self.distiller.connector_parameter_count(),
            "history": self.state.history,
        }
        if self.main:
            save_weights(student.state_dict(), self.run_dir / "student.safetensors",
                         metadata={"top1": self.state.last_top1})
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            hparams = {k: v for k, v in _flatten(self.config).items()
                       if not k.startswith(("logger", "zoo", "run_dir"))}
            self.trackers.finish(hparams, {k: v for k, v in summary.items() if k != "history"})
        return summary


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}
