"""ReviewKD (Chen, Liu, Zhao & Jia, CVPR 2021, "Distilling Knowledge via Knowledge Review") as
mdistiller runs it on CIFAR-100 (distillers/ReviewKD.py, configs/cifar100/reviewkd.yaml): CE 1
plus `feat_weight` (5) x min((epoch + 1) / warmup_epochs, 1) x `hcl_loss` between the student's
levels fused by a chain of trained attention-based fusion modules (ABF, one per level) and the
teacher's levels.

Levels, shallow -> deep: the student's stage outputs (post-ReLU; mdistiller's STU_PREACT False)
and its pooled feature as a (N, C, 1, 1) map; the teacher's pre-activation stage outputs
(`:preact`, the reference's preact feats[1:]) and its pooled feature. The ABF chain runs deep ->
shallow, each level fused with the residual of the one below it (`ReviewFusion`); its channels and
sizes come from a dry forward of both models, which reproduces the reference's per-pair tables
(`build_review_kd`). The chain trains with the student and is neither evaluated nor exported.
The teacher runs in eval mode under no_grad and the warm-up counts epochs from 1, as in mdistiller.
Authors' code differs: warm-up from epoch 0, teacher in train mode, lr 0.1, batch 128, Nesterov.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from distill.distillers.dkd import warmup_ramp
from distill.distillers.feature_pairs import FeatureDistiller, default_layers, layer_shapes
from distill.errors import ConfigError
from distill.losses.reviewkd import hcl_loss
from distill.method import DISTILLERS, BuildInfo
from distill.method.checks import require

log = logging.getLogger("distill")


class ABF(nn.Module):
    """Attention-based fusion, one level of the review chain (the reference's `ABF`):
    `conv1` (1x1 conv to `mid_channels` + BN) on the student map; unless this is the deepest
    level (`fuse` False), the residual from the level below is resized (nearest) to this map's
    size and the two are mixed by a per-pixel, channel-shared attention (`att_conv`: 1x1 conv
    with bias on the concatenated maps, 2 outputs, sigmoid); the mix is resized (nearest) to the
    teacher's size; `conv2` (3x3 conv to `out_channels` + BN) gives the output. No ReLU anywhere.
    Returns (output, residual): the residual is the mid-channel mix after the resize, which the
    next (shallower) level fuses. Submodule names are the reference's, so state dicts match."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) \
            if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                out_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("ABF: a fusing level needs the residual of the level below")
            residual = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


class ReviewFusion(nn.Module):
    """The chain of ABFs (the reference's `abfs`, deepest first): one per level, mid width
    min(`max_mid_channels`, the deepest student level's channels), every level fusing but the
    deepest. `forward` takes the student maps shallow -> deep and returns the outputs in the
    same order, each with the teacher level's channels and size (`out_sizes`, from the dry run
    unless given)."""

    def __init__(self, in_channels: list[int], out_channels: list[int],
                 out_sizes: list[tuple[int, int]], max_mid_channels: int = 512):
        super().__init__()
        if not (len(in_channels) == len(out_channels) == len(out_sizes)) or not in_channels:
            raise ValueError(f"ReviewFusion: {len(in_channels)} student levels, "
                             f"{len(out_channels)} teacher channels, {len(out_sizes)} sizes")
        self.mid_channels = min(max_mid_channels, in_channels[-1])
        count = len(in_channels)
        self.abfs = nn.ModuleList(
            ABF(c_in, self.mid_channels, c_out, fuse=i < count - 1)
            for i, (c_in, c_out) in enumerate(zip(in_channels, out_channels)))[::-1]
        self.out_sizes = [tuple(s) for s in out_sizes]

    def forward(self, feats: list[torch.Tensor],
                out_sizes: list[tuple[int, int]] | None = None) -> list[torch.Tensor]:
        out_sizes = list(out_sizes) if out_sizes is not None else self.out_sizes
        if len(feats) != len(self.abfs) or len(out_sizes) != len(self.abfs):
            raise ValueError(f"ReviewFusion has {len(self.abfs)} levels, got {len(feats)} maps "
                             f"and {len(out_sizes)} sizes")
        outputs, residual = [], None
        for feat, abf, size in zip(feats[::-1], self.abfs, out_sizes[::-1]):
            out, residual = abf(feat, residual, size)
            outputs.append(out)
        return outputs[::-1]


def as_map(feat: torch.Tensor) -> torch.Tensor:
    """A pooled (N, C) feature as the (N, C, 1, 1) map the reference appends; maps unchanged."""
    return feat[:, :, None, None] if feat.dim() == 2 else feat


@DISTILLERS.register("reviewkd",
                     family="features",
                     summary=("The student's stages, fused deep to shallow, match the teacher's at "
                              "every level"),
                     published_as=("ReviewKD",),
                     published_in=("2f",),
                     paper=('Knowledge Review, Chen et al. CVPR 2021 (code '
                            'dvlab-research/ReviewKD; mdistiller)'),
                     recipe=('CE 1, 5 x HCL (per pair `tuned.reviewkd.feat_weight`: 0.6 '
                             'res56->res20, 1.0 res110->res32, 8.0 res32x4->shufflev2) between the'
                             " student's stage outputs + pooled feature fused deep->shallow by "
                             'trained attention-based fusion modules (width min(512, deepest '
                             "channels)) and the teacher's pre-activation stage outputs + pooled "
                             'feature; linear ramp over 20 epochs; the teacher needs '
                             'pre-activation features (ResNets, WRNs, VGGs) or `teacher_layers`'),
                     table_row=15,
                     edges={"warmup_epochs": {"0": "no warm-up ramp"}})
class ReviewKD(FeatureDistiller):
    layer_option = "layers"

    def __init__(self, student, teacher, ce_weight: float = 1.0, feat_weight: float = 5.0,
                 warmup_epochs: int = 20, max_mid_channel: int = 512,
                 student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, *, info: BuildInfo):
        student_layers, teacher_layers = self.levels(student_layers, teacher_layers, info)
        super().__init__(student, teacher, student_layers, teacher_layers)
        shapes = {}
        for role, model, names in (("student", student, student_layers),
                                   ("teacher", teacher, teacher_layers)):
            shapes[role] = layer_shapes(model, names, info)
            for name, shape in zip(names, shapes[role]):
                if len(shape) not in (2, 4):
                    raise ConfigError(f"'{name}' gives a {tuple(shape)} tensor; ReviewKD fuses "
                                      "(N, C, H, W) maps and (N, C) pooled features",
                                      key=self.option_key(role))
        self.add_trained("fusion", ReviewFusion(
            [s[1] for s in shapes["student"]], [t[1] for t in shapes["teacher"]],
            [tuple(t[2:]) if len(t) == 4 else (1, 1) for t in shapes["teacher"]],
            max_mid_channels=max_mid_channel))
        self.ce_weight, self.feat_weight, self.warmup_epochs = ce_weight, feat_weight, warmup_epochs

    @classmethod
    def levels(cls, student_layers: list[str] | None, teacher_layers: list[str] | None,
               info: BuildInfo) -> tuple[list[str], list[str]]:
        """(student levels, teacher levels), shallow -> deep: the options as given (equal
        lengths), else the student's stage outputs and the teacher's pre-activation stage
        outputs, each followed by its pooled feature. Default lists of different lengths are
        paired from the deepest down, as the reference's zip drops the shallowest student maps."""
        given = student_layers is not None or teacher_layers is not None
        if student_layers is None:
            student_layers = [*default_layers(info.student_spec, cls.option_key("student"),
                                              "stages"),
                              *default_layers(info.student_spec, cls.option_key("student"),
                                              "pooled")]
        if teacher_layers is None:
            spec = info.teacher_spec
            if spec is not None and spec.stages and not spec.preact:
                raise ConfigError(
                    "the teacher model declares no pre-activation stage outputs; ReviewKD "
                    "distils the teacher's stage outputs before their final ReLU (the "
                    "reference's preact features)", key=cls.option_key("teacher"),
                    allowed="a teacher with pre-activation features (the CIFAR ResNets, WRNs, "
                            "VGGs, resnet18/50), or distiller.teacher_layers naming its levels "
                            "shallow -> deep, the last its pooled feature (e.g. 'fc:in'; "
                            "':preact' takes a BatchNorm's or residual block's output before "
                            "its ReLU)")
            teacher_layers = [*default_layers(spec, cls.option_key("teacher"), "preact"),
                              *default_layers(spec, cls.option_key("teacher"), "pooled")]
        student_layers, teacher_layers = list(student_layers), list(teacher_layers)
        if len(student_layers) != len(teacher_layers):
            if given:
                raise ConfigError(f"{len(student_layers)} student levels but "
                                  f"{len(teacher_layers)} teacher levels",
                                  key=cls.option_key("student"),
                                  allowed="lists of the same length, shallow -> deep, paired in "
                                          "order (the last of each: the pooled feature)")
            n = min(len(student_layers), len(teacher_layers))
            student_layers, teacher_layers = student_layers[-n:], teacher_layers[-n:]
            log.info("ReviewKD pairs the deepest %d levels: %s", n,
                     list(zip(student_layers, teacher_layers)))
        return student_layers, teacher_layers

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", feat_weight=">=0", warmup_epochs=">=0",
                max_mid_channel="int>0")

    @classmethod
    def check_schedule(cls, options, epochs):
        # warned, not refused: DKD's ramp of the same kind is not refused either, and short
        # (smoke, test) runs keep the reference's 20 epochs
        warmup = options.get("warmup_epochs", 20)
        if isinstance(warmup, int) and not isinstance(warmup, bool) and warmup > epochs:
            log.warning("distiller.warmup_epochs=%s is longer than the run (%s epochs): the "
                        "ReviewKD term never reaches its full weight", warmup, epochs)

    def ramp(self, epoch: int) -> float:
        return warmup_ramp(epoch, self.warmup_epochs)

    def fuse(self, feats_student: list[torch.Tensor],
             feats_teacher: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(ABF outputs, teacher levels) as `hcl_loss` compares them: pooled features as maps,
        each output at its teacher level's size."""
        feats_teacher = [as_map(f) for f in feats_teacher]
        outputs = self.fusion([as_map(f) for f in feats_student],
                              [tuple(f.shape[-2:]) for f in feats_teacher])
        return outputs, feats_teacher

    def forward(self, images, targets, ctx):
        logits, _, feats_s, feats_t = self.forward_features(images)
        outputs, feats_t = self.fuse(feats_s, feats_t)
        return logits, {"ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
                        "reviewkd": self.feat_weight * self.ramp(ctx.epoch)
                        * hcl_loss(outputs, feats_t)}

