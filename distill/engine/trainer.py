"""The training loop: read it top to bottom.

    batch -> distiller(inputs, targets, ctx) -> dict of weighted loss terms -> sum -> backward
    -> optimizer step(s) -> scheduler step(s) -> (every `log_every` steps) trackers get every term
    -> end of epoch (or trainer.max_steps): evaluate every evaluated part, checkpoint
    -> end of run: student.safetensors (the exported part) + summary.json.

The trainer knows a method only by its declared parts (the method contract,
docs/adding-a-method.md): frozen teachers, trained parts grouped by optimizer, evaluated parts,
the exported one. A method with
`traits.manual_step` runs its own forward/backward/step calls per batch through `ManualStepper`; the
checkpoints, logging, non-finite policy and preemption around it are the same.

Position in the run is the global step alone: the epoch and the batch within it are derived
from it, and the data order is a function of (seed, epoch), so a resumed run continues exactly
where the checkpoint was taken, also mid-epoch (bit for bit on CPU with num_workers=0).
Everything on disk is written by rank 0 only. Host syncs (`.item()`) happen only on log steps
(and once per optimizer step under trainer.on_nonfinite=skip).

A non-finite loss stops the run or skips the step (distill/engine/nonfinite.py). SIGTERM /
SIGUSR1 stop the run after the current step with a checkpoint (distill/engine/preemption.py).

Under torchrun (DDP), `trainer.batch_size` stays the GLOBAL batch: each of N ranks takes its
slice of every global batch, so a run means the same thing on 1 or 8 processes. On the default
step the distiller is wrapped in DistributedDataParallel (frozen parts ignored); a manual step
averages each optimizer's gradients over the ranks itself.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill import distributed as dist_utils
from distill.checkpoint import save_weights, seed_everything
from distill.config import TrainerConfig, flatten
from distill.data import DatasetBundle
from distill.engine.checkpointer import Checkpointer
from distill.engine.evaluation import evaluate
from distill.engine.loaders import build_loaders
from distill.engine.nonfinite import StepWindow, format_terms, nonfinite_on_any_rank
from distill.engine.optim import build_optimizer, build_scheduler
from distill.engine.preemption import Preempted, PreemptionGuard, signal_name
from distill.engine.progress import ProgressDisplay
from distill.engine.quantize import plain_state_dict, quantize_weights
from distill.engine.rundir import write_text_atomic
from distill.engine.sampler import epoch_seed
from distill.engine.teacher_cache import TeacherCache
from distill.inputs import Inputs, batch_size, map_inputs, to_device
from distill.method import (MAIN_STAGE, DerivedModels, Distiller, SelfSyncedBuffers, Staged,
                            StepContext, TrainsOnViews, WeightedSampling)
from distill.models.measure import flops_per_item, parameter_count
from distill.runs import read_run_dir
from distill.tracking import Trackers, build_trackers

log = logging.getLogger("distill")
# Every schedule advances with the global step, also while its optimizer sits out a step (a
# method's stage that trains other parts, a skipped non-finite step): PyTorch's warning that a
# scheduler stepped before its optimizer is expected there.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before",
                        category=UserWarning)

# what each of trainer.precision's declared choices (distill.config) autocasts to
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RunState:
    """Everything about the run's progress that a checkpoint must carry."""

    global_step: int = 0
    best_top1: float = 0.0         # the exported part's
    last_top1: float = 0.0
    teacher_top1: float | None = None   # the first teacher's
    train_seconds: float = 0.0     # time inside the training loop only (no eval, no checkpoint)
    train_images: int = 0
    wall_seconds: float = 0.0      # summed over every process that worked on this run
    finished: bool = False
    skipped_steps: int = 0         # steps dropped for a non-finite loss (on_nonfinite=skip)
    history: list[dict] = field(default_factory=list)
    models: dict[str, dict] = field(default_factory=dict)        # role -> best/last top-1
    teachers_top1: dict[str, float] = field(default_factory=dict)   # role -> top-1


class ManualStepper:
    """The `step` a manual `training_step` drives: backward through the grad scaler (outside
    autocast), and optimizer steps that average gradients over DDP ranks and apply the
    non-finite policy (a skipped update puts its parts' buffers back and zeroes its grads)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer],
                 scaler: torch.amp.GradScaler, *, skip_nonfinite: bool,
                 group_buffers: dict[str, list[torch.Tensor]],
                 clip_grad_norm: float | None = None):
        self.optimizers = optimizers
        self._scaler, self._skip_nonfinite = scaler, skip_nonfinite
        self._group_buffers = group_buffers
        self._clip = clip_grad_norm
        self._saved: dict[str, list[torch.Tensor]] = {}
        self._loss: torch.Tensor | None = None   # the group's losses summed (non-finite check)
        self._first, self._last, self._scale = True, True, 1.0
        self.skipped = False
        self.stepped = False   # GradScaler.update() needs a scaler.step() before it

    def begin(self, *, first: bool = True, last: bool = True, scale: float = 1.0) -> None:
        """A batch; under trainer.accumulate, the `first` and `last` of a group of batches whose
        gradients one optimizer step takes, each loss times `scale` (1 / the group's size)."""
        self._first, self._last, self._scale = first, last, scale
        self.skipped, self.stepped = False, False
        if first:
            self._loss = None
            if self._skip_nonfinite:
                self._saved = {g: [b.clone() for b in bufs]
                               for g, bufs in self._group_buffers.items()}

    def backward(self, loss: torch.Tensor) -> None:
        self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()
        with torch.autocast(loss.device.type, enabled=False):
            self._scaler.scale(loss * self._scale if self._scale != 1.0 else loss).backward()

    def step(self, name: str) -> bool:
        """Step optimizer `name` on the gradients of the backward calls so far (of the whole
        group of batches under trainer.accumulate: before its last batch nothing is stepped);
        returns whether it did."""
        if not self._last:
            return False
        optimizer = self.optimizers[name]
        if self._skip_nonfinite and self._loss is not None and nonfinite_on_any_rank(self._loss):
            for buffer, value in zip(self._group_buffers[name], self._saved[name]):
                buffer.copy_(value)
            optimizer.zero_grad(set_to_none=True)
            self.skipped = True
            return False
        average_gradients(optimizer)
        clip_gradients(optimizer, self._scaler, self._clip)
        self._scaler.step(optimizer)
        self.stepped = True
        optimizer.zero_grad(set_to_none=True)
        return True


def clip_gradients(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   max_norm: float | None) -> None:
    """Clip the optimizer's gradients to `max_norm` (their joint L2 norm), unscaled first under
    fp16 (GradScaler.step then does not unscale them twice)."""
    if max_norm is None:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if params:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Mean of each gradient over the ranks (what DDP does on backward). A parameter that got a
    gradient on some ranks only (a data-dependent branch) gets zeros on the others, as under
    DDP, so every rank reduces tensors of the same sizes; one that got none anywhere keeps
    None. Two all-reduces (which parameters have gradients, then the gradients) and one host
    sync for the first, per optimizer step and only under DDP."""
    world = dist_utils.world_size()
    if world == 1:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                            device=params[0].device)
    dist_utils.all_reduce_sum(has_grad)
    for p, anywhere in zip(params, has_grad.tolist()):
        if anywhere and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist_utils.all_reduce_sum(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


class Trainer:
    def __init__(self, distiller: Distiller, data: DatasetBundle, *, options: TrainerConfig,
                 optimizer: dict, scheduler: dict, run_dir: Path, device: torch.device,
                 loggers: dict, config: dict, run_name: str, seed: int,
                 checkpoint: dict | None = None, teachers: list[dict] | None = None,
                 teacher_cache: TeacherCache | None = None):
        # training starts from the seed (other augmentations and noise on other ranks); a
        # resumed run restores the checkpoint's random state instead (_restore)
        seed_everything(seed + 7919 * dist_utils.rank())
        self.distiller = distiller
        self.opt = options
        self.run_dir = Path(run_dir)
        self.device = device
        self.config = config
        self.run_name = run_name
        self.loggers = loggers
        self.teachers = list(teachers or [])   # {role, name, sha256} of each frozen part
        self.main = dist_utils.is_main_process()
        self.seed = seed
        self.world_size = dist_utils.world_size()
        self.teacher_cache = teacher_cache   # teacher.cache=views: the teachers answer from it
        self.loaders = build_loaders(
            data, data_path=options.data_path, batch_size=options.batch_size,
            eval_batch_size=options.eval_batch_size, num_workers=options.num_workers,
            device=device, seed=seed, rank=dist_utils.rank(), world_size=self.world_size,
            views=distiller.views() if isinstance(distiller, TrainsOnViews) else {},
            sample_weights=(distiller.sample_weights()
                            if isinstance(distiller, WeightedSampling) else None),
            augmentation_ids=teacher_cache is not None, min_batch=distiller.traits.min_batch)
        # an optimizer step is trainer.accumulate batches: position and schedules count steps
        self.accumulate = options.accumulate
        self.batches_per_epoch = self.loaders.steps_per_epoch
        self.steps_per_epoch = -(-self.batches_per_epoch // self.accumulate)
        # a step never reaches past its epoch's end (_train_epoch): under an accumulate larger
        # than an epoch, each step is the epoch's batches, all its images
        epoch_images = min(self.loaders.sampler.size, self.batches_per_epoch * options.batch_size)
        self.images_per_step = min(options.batch_size * self.accumulate, epoch_images)
        if self.accumulate > self.batches_per_epoch and self.main:
            log.warning("trainer.accumulate=%d is more than the %d batches of an epoch: a step "
                        "ends with its epoch, so each optimizer step uses %d batches (%d images), "
                        "one step per epoch", self.accumulate, self.batches_per_epoch,
                        self.batches_per_epoch, self.images_per_step)
        sampler = self.loaders.sampler
        dropped = max(sampler.size - sampler.steps * sampler.global_batch, 0)
        if dropped and self.main:   # steps_per_epoch drops a last batch too small to train on
            log.info("each epoch's last batch (%d items) is dropped, not trained on: a batch "
                     "needs at least %d item(s) per process (%d process(es); the method's "
                     "smallest batch, Traits.min_batch)", dropped, distiller.traits.min_batch,
                     self.world_size)
        self.example = data.val[0][0]   # one item's inputs: FLOPs of derived models (summary)
        if options.quantize == "int8":   # before the optimizers: they take the shadow weights
            count = quantize_weights(distiller.exported)
            log.info("trainer.quantize=int8: the student's %d conv and linear layers train on "
                     "int8 weights", count)
        # trainer.channels_last=null: NHWC for image inputs (measured faster), nothing else
        channels_last = (data.inputs == "images" if options.channels_last is None
                         else options.channels_last)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        distiller.to(memory_format=self.memory_format)
        # in place (nn.Module.compile): state-dict keys, hooks and checkpoints stay as they are
        compiled = {"teacher": distiller.frozen_parts(), "student": distiller.evaluated_parts()}
        for what in ("teacher", "student"):
            if options.compile in (what, "both"):
                for module in compiled[what].values():
                    module.compile(backend=options.compile_backend)
        self.model = self._wrap(distiller, sync_bn=options.sync_bn)

        # a method's stages come first; trainer.epochs (and the schedule) is the main stage's
        self.stages = distiller.stages() if isinstance(distiller, Staged) else []
        self.stage_starts = {}   # stage name -> its first epoch
        first = 0
        for stage in self.stages:
            self.stage_starts[stage.name] = first
            first += stage.epochs
        self.stage_starts[MAIN_STAGE] = first
        self.epochs = first + options.epochs   # the run's, stages included

        def default_optimizer(params, *, constant: bool = False,
                              **overrides) -> tuple[torch.optim.Optimizer, Any]:
            opt = build_optimizer(params, **{**optimizer, **overrides})
            schedule = ({**scheduler, "name": "constant", "warmup_epochs": 0.0} if constant
                        else {**scheduler, "start_epoch": first})
            return opt, build_scheduler(opt, steps_per_epoch=self.steps_per_epoch,
                                        epochs=options.epochs, **schedule)

        configured = distiller.configure_optimizers(default_optimizer)
        self.optimizers = {name: pair[0] for name, pair in configured.items()}
        self.schedulers = {name: pair[1] for name, pair in configured.items()}
        dtype = PRECISIONS[options.precision]
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=options.precision == "fp16")
        self.stepper = None
        if distiller.traits.manual_step:
            groups = {name: [b for role, part in distiller.parts.items()
                             if part.optimizer == name for b in distiller.part(role).buffers()]
                      for name in self.optimizers}
            self.stepper = ManualStepper(self.optimizers, self.scaler,
                                         skip_nonfinite=options.on_nonfinite == "skip",
                                         group_buffers=groups,
                                         clip_grad_norm=options.clip_grad_norm)
        # trainer.ema_decay: an exponential moving average of the exported part's weights and
        # buffers, updated after every optimizer step; evaluated as `ema` and exported
        self.ema = (torch.optim.swa_utils.AveragedModel(
            distiller.exported, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(
                options.ema_decay), use_buffers=True)
            if options.ema_decay is not None else None)
        self.state = RunState()
        self.checkpointer = Checkpointer(self.run_dir, main=self.main)
        self.stop_signal = 0                      # set when a signal asks the run to stop
        self.trackers = Trackers()
        self.tracker_resume: dict = {}
        if checkpoint is not None:
            self._restore(checkpoint)

    def _wrap(self, distiller: Distiller, *, sync_bn: bool) -> nn.Module:
        """The distiller as the training step calls it. One process: itself. DDP, default step:
        in DistributedDataParallel, the frozen parts ignored (they are identical everywhere and
        never change), and the buffers the method keeps equal itself. DDP, manual step: itself, its trained parts made equal on every rank
        (ManualStepper averages the gradients)."""
        if self.world_size == 1:
            return distiller
        if sync_bn:
            for role, module in distiller.trained_parts().items():
                setattr(distiller, role, nn.SyncBatchNorm.convert_sync_batchnorm(module))
        if distiller.traits.manual_step:
            dist_utils.broadcast_tensors([*(p.data for params in distiller.parameter_groups().values()
                                            for p in params), *trained_buffers(distiller)])
            return distiller
        frozen = {id(t) for module in distiller.frozen_parts().values()
                  for t in (*module.parameters(), *module.buffers())}
        if isinstance(distiller, SelfSyncedBuffers):
            frozen |= {id(t) for t in distiller.self_synced_buffers()}
        ignored = [n for n, t in (*distiller.named_parameters(), *distiller.named_buffers())
                   if id(t) in frozen]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            distiller, ignored)
        return nn.parallel.DistributedDataParallel(
            distiller, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=distiller.traits.unused_parameters)

    def _sync_buffers(self) -> None:
        dist_utils.broadcast_tensors(trained_buffers(self.distiller))

    # --- checkpoints -----------------------------------------------------------------------
    def _restore(self, ckpt: dict) -> None:
        state = self.checkpointer.restore(ckpt, self.distiller, self.optimizers, self.schedulers,
                                          self.scaler)
        self.state = RunState(**state)
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["averages"]["ema"])
        if dist_utils.rank() > 0:   # the checkpoint holds rank 0's stream; others get their own
            torch.manual_seed(epoch_seed(self.seed + 7919 * dist_utils.rank(), self.state.global_step))
        # TensorBoard drops events past the checkpoint, so resumed curves are not duplicated
        self.tracker_resume = {**ckpt["trackers"], "tensorboard": {"step": self.state.global_step + 1}}
        log.info("resuming %s at step %d (epoch %d)", self.run_dir, self.state.global_step,
                 self.state.global_step // self.steps_per_epoch + 1)

    def save_checkpoint(self) -> None:
        self.checkpointer.save(
            self.distiller, self.optimizers, self.schedulers, self.scaler,
            state=asdict(self.state), trackers=self.trackers.resume_states(),
            config=self.config, teachers=self.teachers, step=self.state.global_step,
            averages={"ema": self.ema.state_dict()} if self.ema is not None else None,
            exported={"role": self.exported_name,
                      "arch": self.distiller.parts[self.distiller.exported_role].arch})

    # --- the loop ---------------------------------------------------------------------------
    def stage_of(self, epoch: int) -> tuple[str, int]:
        """(stage name, epoch within it) of a 0-based epoch of the run."""
        name = max((n for n, first in self.stage_starts.items() if first <= epoch),
                   key=self.stage_starts.get)
        return name, epoch - self.stage_starts[name]

    def total_steps(self) -> int:
        steps = self.epochs * self.steps_per_epoch
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
        recorded = read_run_dir(self.run_dir).summary if self.state.finished else None
        if recorded is not None and self._done():
            log.info("%s is already finished; nothing to do", self.run_dir)
            return recorded
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
            self._evaluate_teachers()
            with ProgressDisplay(enabled=self.opt.progress and self.main,
                                 total=self.total_steps(), completed=self.state.global_step) as bar:
                while not self._done():
                    epoch, first_step = divmod(self.state.global_step, self.steps_per_epoch)
                    self.loaders.start_epoch(epoch, first_step * self.accumulate)
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
                if self._last_evaluated_step() != self.state.global_step:
                    # resumed past where a shorter trainer.max_steps ends: the summary (and a
                    # zoo publication) reports the weights it saves, never an earlier evaluation
                    self._end_epoch(self.state.global_step // self.steps_per_epoch, {})
            return self._finish()
        finally:
            self.trackers.close()

    def _last_evaluated_step(self) -> int | None:
        return self.state.history[-1]["step"] if self.state.history else None

    def _preempted(self) -> Preempted:
        step = self.state.global_step
        message = (f"preempted by {signal_name(self.stop_signal)} at step {step}; checkpoint "
                   f"written; re-run the same command to resume")
        self.trackers.log({"preempted_at_step": step}, step=step, event="preempted")
        if self.main:
            log.warning(message)
        return Preempted(message, self.stop_signal)

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate(model, self.loaders.val, self.device, reduce=dist_utils.all_reduce_sum,
                        autocast=self.autocast, memory_format=self.memory_format)

    def _evaluate_teachers(self) -> None:
        """Each frozen part once per run (a resumed run keeps the numbers it had)."""
        for role, model in self.distiller.frozen_parts().items():
            if role in self.state.teachers_top1:
                continue
            metrics = self._evaluate(model)
            self.state.teachers_top1[role] = metrics["top1"]
            if self.state.teacher_top1 is None:
                self.state.teacher_top1 = metrics["top1"]
            log.info("%s top-1 %.2f%% (top-5 %.2f%%)", role, metrics["top1"], metrics["top5"])
            prefix = "teacher" if role == "teacher" else f"teacher/{role}"
            self.trackers.log({f"{prefix}/top1": metrics["top1"], f"{prefix}/top5": metrics["top5"]},
                              step=self.state.global_step, event="teacher")

    def _train_epoch(self, epoch: int, bar: ProgressDisplay, guard: PreemptionGuard
                     ) -> dict[str, float]:
        """Train from the current position to the end of `epoch` (or max_steps, or a stop
        signal); returns the mean of every loss term over the steps applied."""
        self.distiller.train()
        skip_nonfinite = self.opt.on_nonfinite == "skip"
        buffers = list(trained_buffers(self.distiller)) if skip_nonfinite else []
        sums: dict[str, torch.Tensor] = {}
        window = StepWindow(self.opt.on_nonfinite, self.checkpointer.last_good)
        applied = skipped_here = images_seen = window_images = 0
        epoch_start = window_start = time.perf_counter()
        first_optimizer = next(iter(self.optimizers.values()))
        whole_epoch = self.state.global_step % self.steps_per_epoch == 0   # not a resumed tail
        stage, stage_epoch = self.stage_of(epoch)
        if self.stages and self.main and self.state.global_step == epoch * self.steps_per_epoch \
                and stage_epoch == 0:
            log.info("stage %s: epochs %d-%d of %d", stage, epoch + 1,
                     epoch + (self.opt.epochs if stage == MAIN_STAGE else
                              next(s.epochs for s in self.stages if s.name == stage)),
                     self.epochs)
        batch = (self.state.global_step % self.steps_per_epoch) * self.accumulate
        group: dict[str, torch.Tensor] = {}   # the loss terms of this step's batches, summed
        for inputs, targets, extras in self.loaders.train:
            # trainer.accumulate: batches [start, start + size) make one optimizer step
            start = batch - batch % self.accumulate
            size = min(self.accumulate, self.batches_per_epoch - start)
            first, last = batch == start, batch == start + size - 1
            batch += 1
            inputs = to_device(inputs, self.device, non_blocking=True,
                               memory_format=self.memory_format)
            targets = targets.to(self.device, non_blocking=True)
            ctx = StepContext(epoch=epoch, step=self.state.global_step, epochs=self.epochs,
                              steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps(),
                              stage=stage, stage_epoch=stage_epoch,
                              indices=extras["index"].to(self.device, non_blocking=True),
                              views={name: view.to(self.device, non_blocking=True,
                                                   memory_format=self.memory_format)
                                     for name, view in extras.items()
                                     if name not in ("index", "augmentation")},
                              label_smoothing=self.opt.label_smoothing)
            lr = first_optimizer.param_groups[0]["lr"]   # the lr this step uses
            cached = (self.teacher_cache.serving(inputs, extras["index"], extras["augmentation"])
                      if self.teacher_cache is not None else contextlib.nullcontext())
            with cached:
                if self.stepper is not None:
                    losses, skipped = self._manual_step(inputs, targets, ctx, first=first,
                                                        last=last, scale=1.0 / size)
                else:
                    losses, skipped = self._default_step(inputs, targets, ctx, skip_nonfinite,
                                                         buffers, first=first, last=last,
                                                         scale=1.0 / size)
            images_seen += batch_size(inputs)
            window_images += batch_size(inputs)
            for name, value in losses.items():
                group[name] = group.get(name, 0) + value.detach() / size
            if not last:
                continue
            losses, group = group, {}   # what the step's batches gave, on average
            if self.ema is not None and not skipped:
                self.ema.update_parameters(self.distiller.exported)
            loss = sum(losses.values())
            if skipped:
                self.state.skipped_steps += 1
                skipped_here += 1
                if self.main:
                    log.warning("step %d skipped: non-finite loss (%s); %d skipped so far",
                                self.state.global_step + 1, format_terms(
                                    list(losses), [float(v.detach()) for v in losses.values()]),
                                self.state.skipped_steps)
            else:
                applied += 1
                window.add(self.state.global_step + 1, [v.detach() for v in losses.values()])
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0) + value.detach()
                sums["loss"] = sums.get("loss", 0) + loss.detach()
            for scheduler in self.schedulers.values():
                scheduler.step()
            self.state.global_step += 1

            end_of_epoch = self.state.global_step % self.steps_per_epoch == 0 or self._done()
            log_step = self.state.global_step % self.opt.log_every == 0 or end_of_epoch
            # every rank stops after the same step (under DDP they compare on log steps only);
            # at the last step there is nothing to stop
            self.stop_signal = 0 if self._done() else guard.stop_signal(collective=log_step)
            if log_step or self.stop_signal:   # checked before any checkpoint takes the weights
                now = time.perf_counter()
                terms = _mean_over_ranks(sums, max(applied, 1))   # the host sync
                window.check(terms, list(losses))
                speed = window_images * self.world_size / max(now - window_start, 1e-9)
                skipped_count = ({"train/skipped_steps": self.state.skipped_steps}
                                 if skip_nonfinite else {})
                self.trackers.log({**{f"train/{k}": v for k, v in terms.items()},
                                   "train/lr": lr, "train/images_per_sec": speed,
                                   "train/epoch": epoch, **skipped_count},
                                  step=self.state.global_step, event="train")
                bar.update(self.state.global_step, epoch=epoch + 1, epochs=self.epochs,
                           terms=terms, images_per_sec=speed)
                window_images, window_start = 0, now
            if self._done() or self.stop_signal:
                break
        self.state.train_seconds += time.perf_counter() - epoch_start
        self.state.train_images += images_seen * self.world_size
        # Skipped steps are bounded twice, so finishing never publishes barely trained weights
        # as a result: the run's share so far (lr=1e30 skipped 7 of 8 steps and said done), and
        # every step of an epoch (a teacher that starts giving NaN late in a long run).
        skipped, steps = self.state.skipped_steps, self.state.global_step
        bound = self.opt.max_skipped_fraction
        if images_seen and not self.stop_signal and (
                skipped > bound * steps or (whole_epoch and not applied)):
            share = (f"every step of epoch {epoch + 1}" if whole_epoch and not applied else
                     f"more than trainer.max_skipped_fraction={bound:g} of the steps")
            raise FloatingPointError(
                f"{skipped} of the run's {steps} steps so far had a non-finite loss and were "
                f"skipped (trainer.on_nonfinite=skip), {share}: the run is not training, so it "
                f"stops here; {self.checkpointer.last_good()}")
        return _mean_over_ranks(sums, max(applied, 1))

    def _default_step(self, inputs: Inputs, targets: torch.Tensor, ctx: StepContext,
                      skip_nonfinite: bool, buffers: list[torch.Tensor], *, first: bool = True,
                      last: bool = True, scale: float = 1.0
                      ) -> tuple[dict[str, torch.Tensor], bool]:
        """One forward, the sum of the weighted terms, one backward, every optimizer stepped
        once. Under trainer.accumulate a step is a group of batches: the gradients of each
        (its loss times `scale`) add up from the `first` to the `last`, whose backward alone
        DDP all-reduces, and which steps. Returns the terms and whether the step was skipped
        (non-finite, policy skip)."""
        if first:
            self._saved_buffers = [b.clone() for b in buffers]
            self._group_loss = None
            for optimizer in self.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
        no_sync = getattr(self.model, "no_sync", None)   # DDP: all-reduce on the last only
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            with self.autocast() if self.autocast else contextlib.nullcontext():
                _, losses = self.model(inputs, targets, ctx)
            loss = sum(losses.values())
            # backward even for a step about to be skipped: DDP expects every forward's backward
            self.scaler.scale(loss * scale if scale != 1.0 else loss).backward()
        self._group_loss = loss.detach() if first else self._group_loss + loss.detach()
        if not last:
            return losses, False
        if skip_nonfinite and nonfinite_on_any_rank(self._group_loss):
            for buffer, value in zip(buffers, self._saved_buffers):
                buffer.copy_(value)
            return losses, True
        for optimizer in self.optimizers.values():
            clip_gradients(optimizer, self.scaler, self.opt.clip_grad_norm)
            self.scaler.step(optimizer)   # fp16: GradScaler still skips inf gradients
        self.scaler.update()
        return losses, False

    def _manual_step(self, inputs: Inputs, targets: torch.Tensor, ctx: StepContext,
                     *, first: bool = True, last: bool = True, scale: float = 1.0
                     ) -> tuple[dict[str, torch.Tensor], bool]:
        self.stepper.begin(first=first, last=last, scale=scale)
        with self.autocast() if self.autocast else contextlib.nullcontext():
            losses = self.distiller.training_step(inputs, targets, ctx, self.stepper)
        if self.stepper.stepped:
            self.scaler.update()
        return losses, self.stepper.skipped

    def _end_epoch(self, epoch: int, epoch_terms: dict[str, float]) -> None:
        self._sync_buffers()
        completed = _whole_or_fraction(self.state.global_step / self.steps_per_epoch)
        results = {role: self._evaluate(model) for role, model in self._evaluated().items()}
        exported = self.exported_name
        metrics = results[exported]
        # a run stopped by max_steps mid-epoch still ends with an evaluated, checkpointed model
        for role, result in results.items():
            record = self.state.models.setdefault(role, {"best_top1": 0.0, "last_top1": 0.0})
            record["last_top1"] = result["top1"]
            record["best_top1"] = max(record["best_top1"], result["top1"])
        self.state.last_top1 = metrics["top1"]
        self.state.best_top1 = max(self.state.best_top1, metrics["top1"])
        others = {role: r for role, r in results.items() if role != exported}
        entry = {"epoch": completed, "step": self.state.global_step,
                 "top1": metrics["top1"], "top5": metrics["top5"]}
        if self.stages:
            entry["stage"] = self.stage_of(epoch)[0]
        if others:
            entry["models"] = {role: {"top1": r["top1"], "top5": r["top5"]}
                               for role, r in results.items()}
        self.state.history.append(entry)
        per_part = {f"val/{role}/{k}": r[k] for role, r in others.items() for k in ("top1", "top5")}
        cache = self._teacher_cache_counts()
        self.trackers.log({"epoch": completed, "val/top1": metrics["top1"],
                           "val/top5": metrics["top5"], "val/loss": metrics["loss"],
                           "val/best_top1": self.state.best_top1, **per_part,
                           **{f"epoch/{k}": v for k, v in epoch_terms.items()}, **cache},
                          step=self.state.global_step, event="epoch")
        if cache:
            looked_up = cache["teacher_cache/read"] + cache["teacher_cache/computed"]
            log.info("teacher cache: %d of %d teacher outputs read so far (%.0f%%), %d computed",
                     cache["teacher_cache/read"], looked_up,
                     100.0 * cache["teacher_cache/read"] / max(looked_up, 1),
                     cache["teacher_cache/computed"])
        terms = "  ".join(f"{k} {v:.4f}" for k, v in epoch_terms.items())
        also = "".join(f"  {role} {r['top1']:.2f}%" for role, r in others.items())
        if self.stages:
            terms = f"[{self.stage_of(epoch)[0]}]  {terms}"
        log.info("epoch %s/%d  %s  val top-1 %.2f%% (best %.2f%%)  top-5 %.2f%%%s",
                 completed, self.epochs, terms, metrics["top1"], self.state.best_top1,
                 metrics["top5"], also)
        self._tick_wall_clock()
        self.save_checkpoint()

    @property
    def exported_name(self) -> str:
        """What student.safetensors holds and best/last top-1 measure: the EMA when there is
        one (trainer.ema_decay), else the method's exported part."""
        return "ema" if self.ema is not None else self.distiller.exported_role

    def _evaluated(self) -> dict[str, nn.Module]:
        models = {**self.distiller.evaluated_parts(), **self._derived_models()}
        if self.ema is not None:
            models["ema"] = self.ema.module
        return models

    def _derived_models(self) -> dict[str, nn.Module]:
        return (self.distiller.derived_models() if isinstance(self.distiller, DerivedModels)
                else {})

    def _teacher_cache_counts(self) -> dict[str, int]:
        """Teacher outputs read from the cache and computed, by this run's processes since they
        started (summed over ranks); {} without the cache."""
        if self.teacher_cache is None:
            return {}
        counts = torch.tensor([*self.teacher_cache.counts(), self.teacher_cache.rejected()],
                              dtype=torch.float64, device=self.device)
        dist_utils.all_reduce_sum(counts)
        read, computed, rejected = (int(v) for v in counts.tolist())
        return {"teacher_cache/read": read, "teacher_cache/computed": computed,
                "teacher_cache/rejected": rejected}

    def _ema_summary(self) -> dict[str, dict]:
        """summary.json's entry of the EMA (trainer.ema_decay), the student's architecture."""
        if self.ema is None:
            return {}
        arch = self.distiller.parts[self.distiller.exported_role].arch
        return {"ema": {"arch": arch, "decay": self.opt.ema_decay,
                        **self.state.models.get("ema", {"best_top1": 0.0, "last_top1": 0.0}),
                        "params": sum(p.numel() for p in self.ema.module.parameters())}}

    def _derived_summaries(self) -> dict[str, dict]:
        """summary.json's entries of the derived models (BYOT's exits): top-1, params, FLOPs."""
        entries = {}
        for name, model in self._derived_models().items():
            was_training = model.training
            model.eval()
            flops = flops_per_item(model, map_inputs(self.example, lambda t: t.unsqueeze(0)))
            model.train(was_training)
            entries[name] = {"arch": f"{self.distiller.parts[self.distiller.exported_role].arch}"
                                     f":{name}",
                             **self.state.models.get(name, {"best_top1": 0.0, "last_top1": 0.0}),
                             "params": parameter_count(model), "flops": flops}
        return entries

    def _finish(self) -> dict[str, Any]:
        self.state.finished = True
        self._tick_wall_clock()
        exported = self.distiller.exported
        completed_all = self.state.global_step >= self.epochs * self.steps_per_epoch
        parts = self.distiller.parts
        summary = {
            "best_top1": self.state.best_top1,
            "last_top1": self.state.last_top1,
            "teacher_top1": self.state.teacher_top1,
            "train_images_per_sec": (self.state.train_images / self.state.train_seconds
                                     if self.state.train_seconds else None),
            "world_size": self.world_size,
            "global_batch_size": self.opt.batch_size,   # trainer.batch_size is global
            "per_rank_batch_size": self.opt.batch_size // self.world_size,
            # trainer.accumulate batches per optimizer step, at most an epoch's
            "images_per_step": self.images_per_step,
            "epochs": _whole_or_fraction(self.state.global_step / self.steps_per_epoch),
            "steps": self.state.global_step,
            "stopped_early": not completed_all,   # trainer.max_steps ended it
            "skipped_steps": self.state.skipped_steps,   # non-finite losses (on_nonfinite=skip)
            "wall_seconds": self.state.wall_seconds,
            "student_params": sum(p.numel() for p in exported.parameters()),
            "connector_params": auxiliary_parameter_count(self.distiller),
            "models": {**{role: {"arch": parts[role].arch,
                                 **self.state.models.get(role, {"best_top1": 0.0,
                                                                "last_top1": 0.0}),
                                 "params": sum(p.numel() for p in model.parameters())}
                          for role, model in self.distiller.evaluated_parts().items()},
                       **self._derived_summaries(), **self._ema_summary()},
            "exported": self.exported_name,   # the model student.safetensors holds
            "teachers": [{**t, "top1": self.state.teachers_top1.get(t["role"])}
                         for t in self.teachers],
            "history": self.state.history,
        }
        if self.teacher_cache is not None:   # this process's lookups (a resumed run: since resume)
            self.teacher_cache.flush()
            cache = self._teacher_cache_counts()
            summary["teacher_cache"] = {**self.teacher_cache.describe(),
                                        **{k.split("/")[1]: v for k, v in cache.items()}}
        if self.main:
            self.save_checkpoint()   # records `finished`, so re-running the command is a no-op
            weights = self.ema.module if self.ema is not None else exported
            save_weights(plain_state_dict(weights), self.run_dir / "student.safetensors",
                         metadata={"top1": self.state.last_top1})
            write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            hparams = {k: v for k, v in flatten(self.config).items()
                       if not k.startswith(("logger", "zoo", "run_dir"))}
            self.trackers.finish(hparams, {k: v for k, v in summary.items()
                                           if k not in ("history", "models", "teachers")})
        return summary


def trained_buffers(distiller: Distiller) -> list[torch.Tensor]:
    return [b for module in distiller.trained_parts().values() for b in module.buffers()]


def auxiliary_parameter_count(distiller: Distiller) -> int:
    """Parameters of trained parts that are not evaluated (connectors, discriminators)."""
    return sum(p.numel() for role, part in distiller.parts.items()
               if not part.frozen and not part.evaluated
               for p in distiller.part(role).parameters())


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
