"""A Comprehensive Overhaul of Feature Distillation (Heo et al., ICCV 2019) with mdistiller's
CIFAR-100 recipe (configs/cifar100/ofd.yaml, OFD defaults of engine/cfg.py: CE 1, FEAT 0.001,
connector kernel 1), which is the official code's (clovaai/overhaul-distillation CIFAR-100:
CE + distillation / batch / 1000).

- Features: the pre-ReLU stage outputs of student and teacher (`ModelSpec.preact`, the
  reference's preact_feats[1:]); when the two counts differ, the deepest k of each, as
  mdistiller's _align_list does.
- One connector per stage, trained with the student: 1x1 conv (no bias) to the teacher's
  channels + BatchNorm, the reference's init. It holds the stage's margin as a buffer.
- Margins: `ofd_margin` of the teacher BatchNorm that makes each teacher feature (the BN
  itself for `bn:preact`, a residual block's last BN for `block:preact`), computed once, here.
  mdistiller builds them from all of get_bn_before_relu() and indexes them by the aligned
  position, so they slip by one stage where the counts differ; here they follow the layers.
- Loss: CE + feat_weight * sum_i ofd_loss_i / 2^(n-i-1), the deepest stage weight 1.
- Teacher: both references run it in train mode, i.e. its BatchNorms normalise with batch
  statistics. `teacher_batch_stats` (default true) does that for this method's teacher forward
  without touching the teacher's running statistics (`batchnorm_batch_statistics`); false
  runs it in eval mode like every other teacher here. Dropout stays off either way.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from distill.distillers.feature_pairs import FeatureDistiller, layer_shapes, stage_pairs
from distill.errors import ConfigError
from distill.features import PREACT_SUFFIX, unwrap_model
from distill.losses.ofd import ofd_loss, ofd_margin
from distill.method import DISTILLERS, BuildInfo
from distill.method.checks import require
from distill.models import MODELS, list_models


@contextlib.contextmanager
def batchnorm_batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """For the duration: every BatchNorm of `model` normalises with the statistics of the batch
    it sees (as in train mode) and updates nothing (running mean, variance and
    num_batches_tracked stay as they are). Their `training` and `track_running_stats` flags are
    restored on exit. Outputs equal a train-mode forward's exactly; only BatchNorm changes mode
    (dropout and the rest keep theirs)."""
    norms = [m for m in unwrap_model(model).modules() if isinstance(m, _BatchNorm)]
    saved = [(m, m.training, m.track_running_stats) for m in norms]
    try:
        for m in norms:
            # train mode without tracking: F.batch_norm gets no running buffers to update
            m.training, m.track_running_stats = True, False
        yield model
    finally:
        for m, training, tracking in saved:
            m.training, m.track_running_stats = training, tracking


class OFDConnector(nn.Module):
    """The reference's connector (overhaul-distillation `build_feature_connector`, mdistiller
    `ConnectorConvBN`): conv k x k (stride 1, padding (k-1)//2, no bias) from the student's
    channels to the teacher's, then BatchNorm; conv weights ~ N(0, 2 / (k k C_teacher)), BN
    weight 1, bias 0. `margin` (C_teacher,) is the stage's constant margin, a buffer so it moves
    with the module and is saved with it."""

    def __init__(self, in_channels: int, out_channels: int, margin: torch.Tensor,
                 kernel_size: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=1,
                              padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.normal_(self.conv.weight, 0.0,
                        math.sqrt(2.0 / (kernel_size * kernel_size * out_channels)))
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.register_buffer("margin", margin.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def preact_norm(model: nn.Module, name: str, key: str) -> _BatchNorm:
    """The BatchNorm whose affine parameters shape the pre-ReLU feature `name` (`x:preact`):
    `x` itself when it is a BatchNorm, else the last BatchNorm child of the residual block `x`
    (what distill.features hooks for it)."""
    if not name.endswith(PREACT_SUFFIX):
        raise ConfigError(f"'{name}' is not a pre-activation feature: OFD takes the teacher's "
                          "maps before their ReLU and its margins from the BatchNorm that makes "
                          "them", key=key, allowed="module names ending in ':preact' that name a "
                                                   "BatchNorm or a residual block with one")
    path = name[: -len(PREACT_SUFFIX)]
    modules = dict(unwrap_model(model).named_modules())
    module = modules.get(path)
    if module is None:
        raise ConfigError(f"no module named '{path}' in {type(unwrap_model(model)).__name__}",
                          key=key, hint="module names are those of model.named_modules()")
    if isinstance(module, _BatchNorm):
        return module
    norms = [c for c in module.children() if isinstance(c, _BatchNorm)]
    if not norms:
        raise ConfigError(f"'{name}' is neither a BatchNorm nor a residual block with one: no "
                          "margin to take", key=key,
                          allowed="module names ending in ':preact' that name a BatchNorm or a "
                                  "residual block with one")
    return norms[-1]


def _models_with_preact() -> list[str]:
    return [n for n in list_models() if MODELS.meta(n).get("preact")]


def stage_weights(count: int) -> list[float]:
    """1 / 2^(n-i-1) for stage i of n, shallow to deep: ..., 1/4, 1/2, 1."""
    return [1.0 / 2 ** (count - i - 1) for i in range(count)]


@DISTILLERS.register("ofd",
                     family="features",
                     summary=("The student's features match the teacher's pre-ReLU features above "
                              "a margin"),
                     published_as=("OFD",),
                     paper=('A Comprehensive Overhaul of Feature Distillation, Heo et al. ICCV '
                            '2019 (code clovaai/overhaul-distillation; mdistiller)'),
                     recipe=('CE 1, 0.001 x the sum over the pre-ReLU stage outputs (weights 1/4, '
                             "1/2, 1) of the partial L2 between the student's map through a "
                             "trained 1x1 conv + BN connector and the teacher's map clamped below "
                             'at a per-channel margin from its BN (`ofd_margin`), summed over '
                             "C,H,W per sample; the teacher's BNs use batch statistics, as the "
                             'reference runs it in train mode, without changing its running '
                             'statistics (`teacher_batch_stats`)'),
                     table_row=14)
class OFD(FeatureDistiller):
    layer_option = "layers"

    def __init__(self, student, teacher, ce_weight: float = 1.0, feat_weight: float = 0.001,
                 teacher_batch_stats: bool = True, student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, *, info: BuildInfo):
        cls = type(self)
        for role, spec, given in (("student", info.student_spec, student_layers),
                                  ("teacher", info.teacher_spec, teacher_layers)):
            if given is None and (spec is None or not spec.preact):
                raise ConfigError(
                    f"the {role} model has no known pre-activation stage outputs: OFD distils "
                    "the maps before each stage's final ReLU", key=cls.option_key(role),
                    allowed="null with a model that declares them ("
                            + ", ".join(_models_with_preact()) + "), or module names ending in "
                            "':preact' (a BatchNorm, or a CIFAR ResNet block)")
        for name in teacher_layers or []:
            preact_norm(teacher, name, cls.option_key("teacher"))
        student_layers, teacher_layers = stage_pairs(cls, student_layers, teacher_layers, info,
                                                     student=student, teacher=teacher,
                                                     what="preact")
        super().__init__(student, teacher, student_layers, teacher_layers)
        connectors = []
        for s, t, name in zip(layer_shapes(student, student_layers, info),
                              layer_shapes(teacher, teacher_layers, info), teacher_layers):
            norm = preact_norm(teacher, name, cls.option_key("teacher"))
            if norm.weight is None or norm.bias is None or norm.weight.shape[0] != t[1]:
                raise ConfigError(f"the BatchNorm of '{name}' has no affine parameters for the "
                                  f"{t[1]} channels of its map: no margin to take",
                                  key=cls.option_key("teacher"))
            connectors.append(OFDConnector(s[1], t[1], ofd_margin(norm.weight, norm.bias)))
        self.add_trained("connectors", nn.ModuleList(connectors), optimizer="main")
        self.layer_weights = stage_weights(len(connectors))
        self.ce_weight, self.feat_weight = ce_weight, feat_weight
        self.teacher_batch_stats = teacher_batch_stats

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", feat_weight=">=0")

    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's maps at `teacher_layers` (no grad), with batch statistics in its
        BatchNorms when `teacher_batch_stats`."""
        mode = batchnorm_batch_statistics(self.teacher) if self.teacher_batch_stats \
            else contextlib.nullcontext()
        with torch.no_grad(), mode:
            self.teacher(images)
        return [self.teacher_hooks.features[n] for n in self.teacher_layers]

    def forward(self, images, targets, ctx):
        logits = self.student(images)
        feats_s = [self.student_hooks.features[n] for n in self.student_layers]
        feats_t = self.teacher_features(images)
        total = sum(w * ofd_loss(c(s), t, c.margin) for w, c, s, t in
                    zip(self.layer_weights, self.connectors, feats_s, feats_t))
        return logits, {"ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
                        "ofd": self.feat_weight * total}
