"""DeepInversion (Yin et al., CVPR 2020, "Dreaming to Distill: Data-free Knowledge Transfer via
DeepInversion"; official NVlabs/DeepInversion, cifar10/deepinversion_cifar10.py): data-free KD.

No training image is read (a `DataFree` method). Before the first step the method synthesises
`num_images` images from noise, `batch_size` at a time: Adam (`lr`) on the pixels for
`iterations` steps of `deepinversion_loss` on the frozen teacher in eval mode: CE to the class
each image is made for (0, 1, ..., C-1, 0, ... within every batch, as the reference's fixed
targets), `bn_weight` x the distance of every BatchNorm input's batch mean and variance to its
running statistics, `tv_weight` x total variation, `l2_weight` x the L2 norm, each step on a copy
rolled by up to `jitter` pixels. The images are stored as uint8 pixels, clamped to the valid
range (ours: the reference distils on the float tensors) in the run directory (`synthetic/`, one
file per batch, keyed by the teacher's weights, the synthesis options, the seed and the batch's
position, with the sha256 of its tensors: a resumed or repeated run reads them back, and a file
made otherwise, moved or changed is made again), and the student is distilled on them with the
dataset's crop/flip recipe: `kd_weight` x KD at `temperature` (+ `ce_weight` x CE to the
synthesis classes). Evaluation uses the real test split. A run bounded by trainer.max_steps
makes only the first batches it can draw from (`made_count`); the synthesis logs its progress,
rate and time left (distill.engine.progress.WorkProgress, given by the app).

The defaults are the cifar10 README's "parameters from the paper" (lr 0.05, BN weight 10), the
flags its authors ran for the published numbers; the script's own defaults are lr 0.1, BN 100.
The reference returns the last iterate: its "best" images alias the tensor being optimised. It
has no KD code; the maintainers name T = 3 (NVlabs/DeepInversion#9) and 1000 batches of 256
images for the paper's CIFAR-10 table (#6). The competition term of Adaptive DeepInversion is
off in the reference CIFAR script's defaults, and not here.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from distill.checkpoint import save_weights
from distill.data.synthetic import synthetic_image_set, to_uint8
from distill.errors import ConfigError
from distill.losses import kd_loss
from distill.losses.data_free import bn_statistics_loss, deepinversion_loss
from distill.method import DISTILLERS, BuildInfo, DataFree, Distiller, Traits
from distill.method.checks import require

log = logging.getLogger("distill")
SYNTHETIC_DIR = "synthetic"
# images x Adam steps past which the synthesis is announced as a warning: scale=cpu is 76,800
# (384 x 200), one batch at the paper's scale 512,000 (256 x 2,000), its CIFAR-10 set 512
# million (256,000 x 2,000)
LONG_SYNTHESIS = 100_000
# the options that change the images (a cache made with others is made again)
SYNTHESIS_OPTIONS = ("num_images", "batch_size", "iterations", "lr", "bn_weight", "tv_weight",
                     "l2_weight", "jitter")


@DISTILLERS.register("deepinversion",
                     family="data-free",
                     summary=("No data: images synthesised to match the teacher's BatchNorm "
                              "statistics, then KD"),
                     published_in=("4j",),
                     paper=('DeepInversion, Yin et al. CVPR 2020 (code NVlabs/DeepInversion, '
                            'cifar10 script)'),
                     recipe=('data-free: reads no training image. Before training, `num_images` '
                             '(256000: 1000 batches of 256, as the maintainers give for the '
                             "paper's CIFAR-10 table) are synthesised from noise, `batch_size` 256"
                             ' at a time, by `iterations` 2000 Adam steps (lr 0.05) on the pixels '
                             "of CE to the image's class + 10 x the distance of every teacher "
                             "BatchNorm input's batch mean and variance to its running statistics "
                             '+ 2.5e-5 x total variation, on copies rolled by up to 2 pixels (the '
                             "README's paper parameters; the script's defaults are lr 0.1, BN "
                             'weight 100); stored as uint8 images in `RUN_DIR/synthetic/` (keyed '
                             "by the teacher's weights, the options and the seed: a resumed run "
                             "reads them back) and distilled on with the dataset's crop/flip: KD "
                             'only, T=3 (maintainers); no DDP'),
                     edges={"lr": {"huge": "DeepInversion's Adam lr on the pixels, as given: a "
                                           "diverging synthesis stops with an error naming "
                                           "distiller.lr"},
                            "jitter": {"0": "DeepInversion synthesises without random shifts"}})
class DeepInversion(DataFree, Distiller):
    traits = Traits(needs_images=True,
                    unsupported={"ddp": "the images are synthesised in one process before "
                                        "training; run deepinversion without torchrun"})

    def __init__(self, student, teacher, kd_weight: float = 1.0, ce_weight: float = 0.0,
                 temperature: float = 3.0, num_images: int = 256000, batch_size: int = 256,
                 iterations: int = 2000, lr: float = 0.05, bn_weight: float = 10.0,
                 tv_weight: float = 2.5e-5, l2_weight: float = 0.0, jitter: int = 2,
                 *, info: BuildInfo):
        super().__init__(student, teacher)
        self.kd_weight, self.ce_weight, self.temperature = kd_weight, ce_weight, temperature
        self.synthesis = {"num_images": num_images, "batch_size": batch_size,
                          "iterations": iterations, "lr": lr, "bn_weight": bn_weight,
                          "tv_weight": tv_weight, "l2_weight": l2_weight, "jitter": jitter}
        self.mean, self.std, self.seed = info.mean, info.std, info.seed
        self.image_shape = tuple(info.input_shape)
        if not any(isinstance(m, nn.BatchNorm2d) and m.track_running_stats
                   for m in teacher.modules()):
            raise ConfigError(f"{type(teacher).__name__} has no BatchNorm2d with running "
                              "statistics: DeepInversion makes images that match them",
                              key="teacher", hint="a teacher with BatchNorm (ResNets, VGG-BN, "
                              "WRN, MobileNet, ShuffleNet)")

    @classmethod
    def check_values(cls, options):
        require(options, kd_weight=">=0", ce_weight=">=0", temperature=">0",
                num_images="int>0", batch_size="int>0", iterations="int>0", lr=">0",
                bn_weight=">=0", tv_weight=">=0", l2_weight=">=0", jitter="int>=0")

    @classmethod
    def made_count(cls, options, images_used):
        """All `num_images`, or the whole batches that hold the `images_used` a run bounded by
        trainer.max_steps draws (the first batches of the full set, image for image)."""
        count, batch = options["num_images"], options["batch_size"]
        if images_used is None or images_used >= count:
            return count
        return min(count, -(-images_used // batch) * batch)

    @classmethod
    def stand_in_training_set(cls, options, data, *, images_used=None):
        count, batch = cls.made_count(options, images_used), options["batch_size"]
        if count < options["num_images"]:
            log.warning("deepinversion: this run draws at most %d training images "
                        "(trainer.max_steps x batch): it synthesises %d of the %d images of "
                        "distiller.num_images (the first %d of %d batches) and trains on those",
                        images_used, count, options["num_images"], -(-count // batch),
                        -(-options["num_images"] // batch))
        labels = torch.cat([torch.arange(min(batch, count - start)) % data.num_classes
                            for start in range(0, count, batch)])
        return synthetic_image_set(data, labels)

    @classmethod
    def made_images(cls, run_dir, options, input_shape, count):
        files = sorted((Path(run_dir) / SYNTHETIC_DIR).glob("batch-*.safetensors"))
        batches = []   # the first files that hold `count` images (a batch mixes every class)
        for path in files:
            batches.append(load_file(str(path))["images"])
            if sum(len(b) for b in batches) >= count:
                break
        # uint8: the caller normalises as the dataset does
        return torch.cat(batches)[:count] if batches else None

    def forward(self, images, targets, ctx):
        logits = self.student(images)
        logits_teacher = self.teacher_logits(images)
        terms = {"kd": self.kd_weight * kd_loss(logits, logits_teacher, self.temperature)}
        if self.ce_weight:
            terms["ce"] = self.ce_weight * self.cross_entropy(logits, targets, ctx)
        return logits, terms

    # --- synthesis ---------------------------------------------------------------------------
    def make_training_set(self, dataset, *, run_dir, device, progress):
        folder = Path(run_dir) / SYNTHETIC_DIR
        key = self._cache_key()
        batch, count = self.synthesis["batch_size"], len(dataset)
        batches, iterations = -(-count // batch), self.synthesis["iterations"]
        pending = []   # (index, start, labels) of the batches to make
        for index, start in enumerate(range(0, count, batch)):
            labels = dataset.labels[start:start + batch]
            path = _batch_path(folder, index)
            images, why = _read_batch(path, key, index, labels)
            if images is None:
                pending.append((index, start, labels))
                if why:
                    log.warning("deepinversion: batch %d/%d (%s) is made again: %s", index + 1,
                                batches, path, why)
            else:
                dataset.images[start:start + len(labels)] = images
        to_make = sum(len(labels) for _, _, labels in pending)
        if pending:
            # the paper's scale is hours on a GPU, days on a CPU: said before it starts
            long = to_make * iterations > LONG_SYNTHESIS
            log.log(logging.WARNING if long else logging.INFO,
                    "deepinversion: synthesising %d images (%d batch(es) of up to %d) x %d Adam "
                    "steps each on the teacher before the first training step (%d read back "
                    "from %s); the time left is logged as it goes%s", to_make, len(pending),
                    batch, iterations, count - to_make, folder,
                    "; scale=cpu or scale=smoke (or distiller.num_images, distiller.iterations)"
                    " make fewer" if long else "")
        with progress("deepinversion synthesis", total=count, unit="images") as bar:
            bar.found(count - to_make)
            for index, start, labels in pending:
                def beat(step, index=index, size=len(labels)):
                    bar.beat(size * step / iterations, f"batch {index + 1}/{batches}, Adam "
                             f"step {step}/{iterations}")
                images = self.synthesize(labels.to(device), index, beat=beat).cpu()
                save_weights({"images": images, "labels": labels}, _batch_path(folder, index),
                             metadata={"key": f"{key}/{index}",
                                       "sha256": _checksum(images, labels)})
                dataset.images[start:start + len(labels)] = images
                bar.advance(len(labels), f"batch {index + 1}/{batches} made")
        log.info("deepinversion: %d synthetic images in %s (%d batches made, %d read back)",
                 count, folder, len(pending), batches - len(pending))

    def synthesize(self, targets: torch.Tensor, index: int,
                   beat: Callable[[int], None] | None = None) -> torch.Tensor:
        """One batch of images for `targets`, as uint8 pixels; its noise and jitter come from
        its own seed (run seed, batch index), so the batch is the same whenever it is made.
        `beat(step)` after each Adam step (progress within a long batch)."""
        options, teacher = self.synthesis, self.teacher
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        shape = (len(targets), *self.image_shape)
        pixels = torch.randn(shape, generator=generator).to(targets.device).requires_grad_(True)
        optimizer = torch.optim.Adam([pixels], lr=options["lr"])
        bn_losses: list[torch.Tensor] = []

        def capture(module, inputs, output):
            bn_losses.append(bn_statistics_loss(inputs[0], module.running_mean, module.running_var))

        hooks = [m.register_forward_hook(capture) for m in teacher.modules()
                 if isinstance(m, nn.BatchNorm2d)]
        offsets = torch.randint(-options["jitter"], options["jitter"] + 1,
                                (options["iterations"], 2), generator=generator).tolist()
        try:
            for step, (dx, dy) in enumerate(offsets):
                bn_losses.clear()
                jittered = torch.roll(pixels, shifts=(dx, dy), dims=(2, 3))
                logits = teacher(jittered)
                loss = deepinversion_loss(logits, targets, bn_losses, jittered,
                                          bn_weight=options["bn_weight"],
                                          tv_weight=options["tv_weight"],
                                          l2_weight=options["l2_weight"])
                if not torch.isfinite(loss):   # one host sync a step, outside training
                    raise ConfigError(f"the synthesis of batch {index} diverged (loss "
                                      f"{float(loss.detach())} at Adam step {step + 1})",
                                      key="distiller.lr", hint="a smaller distiller.lr "
                                      "(the paper's 0.05, the script's 0.1)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if beat is not None:
                    beat(step + 1)
        finally:
            for hook in hooks:
                hook.remove()
        return to_uint8(pixels.detach(), self.mean, self.std)

    def _cache_key(self) -> str:
        """What the images depend on: the teacher's weights, the synthesis options, the seed."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.teacher.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digest.update(json.dumps({**self.synthesis, "seed": self.seed, "shape": self.image_shape,
                                  "mean": self.mean, "std": self.std}, sort_keys=True).encode())
        return digest.hexdigest()


def _batch_path(folder: Path, index: int) -> Path:
    return folder / f"batch-{index:05d}.safetensors"


def _checksum(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of a batch's tensors (their bytes, dtypes and shapes)."""
    digest = hashlib.sha256()
    for tensor in (images, labels):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _read_batch(path: Path, key: str, index: int, labels: torch.Tensor
                ) -> tuple[torch.Tensor | None, str]:
    """Batch `index`'s stored images when its file is whole, was made by this run's synthesis
    (`key`: teacher, options, seed) as batch `index` (its key ends in /<index>), and its
    tensors still have the sha256 written beside them; else (None, why) and it is made again
    (why is empty when there is no file). A batch file of another position, of other options
    or changed since it was written is never trusted. Files of the earlier format (the run key
    alone, no position or checksum) cannot be verified, so they are made again, not read."""
    if not path.is_file():
        return None, ""
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        stored = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged file is made again, never trusted
        return None, f"the file is damaged ({type(exc).__name__})"
    run_key, _, position = meta.get("key", "").rpartition("/")
    if not run_key or "sha256" not in meta:
        return None, ("it was written before batch files recorded their position and sha256 "
                      "and cannot be verified")
    if run_key != key:
        return None, "it was made by another synthesis (teacher, options or seed)"
    if position != str(index):
        return None, f"it holds batch {position} of this run, not batch {index}"
    images, stored_labels = stored.get("images"), stored.get("labels")
    if (images is None or stored_labels is None
            or _checksum(images, stored_labels) != meta["sha256"]):
        return None, "its tensors do not match the sha256 written with them (changed since)"
    if images.dtype != torch.uint8 or not torch.equal(stored_labels,
                                                      labels.to(stored_labels.dtype)):
        return None, "its labels are not this batch's"
    return images, ""
