"""DAFL (Chen et al., ICCV 2019, "Data-Free Learning of Student Networks"; official
huawei-noah/Data-Efficient-Model-Compression, DAFL/DAFL-train.py): data-free KD with a
generator trained online.

No training image is read (a `DataFree` method): an epoch is `epoch_size` placeholders, batched as any
epoch (trainer.batch_size), and every step makes its own images. Per step, as the reference:
z ~ N(0, I) of `latent_dim`; x = G(z); the frozen teacher (eval mode) gives logits and its pooled
features for x; the generator learns `onehot_weight` x one-hot + `entropy_weight` x
information-entropy + `activation_weight` x activation (`dafl_losses`) through the teacher; the
student learns `kd_weight` x KD at T = `temperature` (1 in the reference: KL summed over classes,
batch mean) on x detached. One backward; both optimizers step: the student's is the run's, the
generator's is Adam at a constant `generator_lr` (optimizer "generator"). Evaluation uses the
real test split.

Defaults: the README's CIFAR-10 command (one-hot 0.05, entropy 5, generator lr 0.02, latent
1000); its `--act 0.01` is rejected by the script's own argparse (it defines `--a`), so the
script's default activation weight 0.1 holds, as it does for anyone who runs that command.
The generator is the reference's DCGAN-style one: linear to 128 x (S/4)^2, BN, 2x nearest
upsampling, conv 128, BN, LeakyReLU 0.2, upsampling, conv 64, BN, LeakyReLU, conv to the image's
channels, Tanh, then a BatchNorm without affine parameters. Its inner BatchNorms have eps 0.8:
the reference passes 0.8 as BatchNorm2d's second positional argument, which is eps (DCGAN code
meant momentum); kept, the published numbers came from it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distill.checkpoint import read_checkpoint
from distill.data.synthetic import StepPlaceholders
from distill.distillers.feature_pairs import default_layers, hooks_on
from distill.errors import ConfigError
from distill.losses import kd_loss
from distill.losses.data_free import dafl_losses
from distill.method import DISTILLERS, BuildInfo, DataFree, Distiller, Traits
from distill.method.checks import OVERFLOW, require


class DAFLGenerator(nn.Module):
    """z [N, latent_dim] -> images [N, C, S, S] (S divisible by 4), the reference's layers."""

    def __init__(self, latent_dim: int, channels: int, size: int):
        super().__init__()
        self.init_size = size // 4
        self.project = nn.Linear(latent_dim, 128 * self.init_size ** 2)
        self.norm0 = nn.BatchNorm2d(128)
        self.block1 = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128, eps=0.8),
                                    nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(nn.Conv2d(128, 64, 3, padding=1), nn.BatchNorm2d(64, eps=0.8),
                                    nn.LeakyReLU(0.2), nn.Conv2d(64, channels, 3, padding=1),
                                    nn.Tanh(), nn.BatchNorm2d(channels, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], 128, self.init_size, self.init_size)
        x = nn.functional.interpolate(self.norm0(x), scale_factor=2)
        x = nn.functional.interpolate(self.block1(x), scale_factor=2)
        return self.block2(x)


@DISTILLERS.register("dafl",
                     family="data-free",
                     summary=("No data: a generator makes images the teacher is sure of; the "
                              "student learns KD on them"),
                     published_as=("DAFL",),
                     published_in=("4i",),
                     paper=('DAFL, Chen et al. ICCV 2019 (code '
                            'huawei-noah/Data-Efficient-Model-Compression)'),
                     recipe=('data-free: a DCGAN-style generator (latent 1000; Adam, lr 0.02 '
                             'constant) trained online through the frozen teacher by 0.05 x '
                             'one-hot (CE to its own arg-max) + 5 x information entropy (log10, of'
                             ' the batch-mean softmax) + 0.1 x activation (-mean abs of the pooled'
                             ' features), while the student learns KD at T=1 on its images (the '
                             "README's CIFAR-10 command; `--act` there is refused by the script's "
                             'own parser, so its default 0.1 holds); an epoch is `epoch_size` '
                             'generated images (120 x 1024)'),
                     edges={"generator_lr": {"huge": OVERFLOW}})
class DAFL(DataFree, Distiller):
    # the information-entropy term is not linear in the batch: on shards it would balance
    # each rank's classes, not the batch's (the reference's DataParallel sees the whole batch)
    traits = Traits(needs_images=True, logit_weights=("kd_weight",),
                    unsupported={"ddp": "its information-entropy term needs the whole batch's "
                                        "predictions"})

    def __init__(self, student, teacher, kd_weight: float = 1.0, temperature: float = 1.0,
                 onehot_weight: float = 0.05, entropy_weight: float = 5.0,
                 activation_weight: float = 0.1, latent_dim: int = 1000,
                 generator_lr: float = 0.02, epoch_size: int = 122880,
                 teacher_layer: str | None = None, *, info: BuildInfo):
        super().__init__(student, teacher)
        channels, height, width = info.input_shape
        if height != width or height % 4:
            raise ConfigError(f"the generator makes square images with a side divisible by 4, "
                              f"not {height}x{width}", key="dataset.image_size")
        self.add_trained("generator", DAFLGenerator(latent_dim, channels, height),
                         optimizer="generator")
        layer = teacher_layer or default_layers(info.teacher_spec, "distiller.teacher_layer",
                                                "pooled")[0]
        self.teacher_layer = layer
        self.teacher_features = hooks_on(teacher, [layer], "distiller.teacher_layer")
        self.kd_weight, self.temperature = kd_weight, temperature
        self.weights = {"one_hot": onehot_weight, "entropy": entropy_weight,
                        "activation": activation_weight}
        self.latent_dim, self.generator_lr = latent_dim, generator_lr

    @classmethod
    def check_values(cls, options):
        require(options, kd_weight=">=0", temperature=">0", onehot_weight=">=0",
                entropy_weight=">=0", activation_weight=">=0", latent_dim="int>0",
                generator_lr=">0", epoch_size="int>0")

    @classmethod
    def loss_term_weights(cls, options):
        # the student learns from the KD term alone; the others train the generator
        return {"kd_weight": options.get("kd_weight", 1.0)}

    @classmethod
    def made_images(cls, run_dir, options, input_shape, count):
        """`count` images of the trained generator (from checkpoints/last.pt), in training
        mode as it ran, from a fixed seed."""
        path = Path(run_dir) / "checkpoints" / "last.pt"
        if not path.is_file():
            return None
        generator = DAFLGenerator(options["latent_dim"], input_shape[0], input_shape[1])
        generator.load_state_dict(read_checkpoint(path)["parts"]["generator"])
        z = torch.randn(count, generator.project.in_features,
                        generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return generator.train()(z)

    @classmethod
    def stand_in_training_set(cls, options, data, *, images_used=None):
        # nothing is made before training (made_count None): the generator makes each
        # step's images, so the trainer's own bar and epoch lines are the progress
        return StepPlaceholders(options["epoch_size"])

    def configure_optimizers(self, default):
        groups = self.parameter_groups()
        return {"main": default(groups["main"]),
                "generator": default(groups["generator"], constant=True, name="adamw",
                                     lr=self.generator_lr, weight_decay=0.0)}

    def forward(self, images, targets, ctx):
        z = torch.randn(images.shape[0], self.latent_dim, device=images.device)
        generated = self.generator(z)
        logits_teacher = self.frozen_forward("teacher", generated, input_grad=True)
        terms = dafl_losses(logits_teacher, self.teacher_features.features[self.teacher_layer])
        logits = self.student(generated.detach())
        return logits, {
            **{name: self.weights[name] * value for name, value in terms.items()},
            "kd": self.kd_weight * kd_loss(logits, logits_teacher.detach(), self.temperature)}
