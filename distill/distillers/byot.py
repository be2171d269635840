"""Be Your Own Teacher (Zhang, Song, Gao, Chen, Bao & Ma, ICCV 2019): self-distillation without a
teacher. The student grows an early exit (an auxiliary classifier) after every stage but its
last; its own classifier is the deepest exit, and it teaches the shallower ones. Built as the
official journal-version code does it (ArchipLab-LinfengZhang/pytorch-self-distillation-final,
resnet.py and train.py), which differs from the ICCV paper in its exit heads (attention and
SepConvs, not the paper's bottlenecks) and in its feature term (|fc(f_i) - f_deep|, not
|f_i - f_deep|^2).

Exits (`ExitHead`, generalised from the official ResNet18 as mmrazor's BYOTConnector does):
- after stage i, an attention mask: SepConv(C_i -> C_i, stride 2) -> BN -> ReLU -> bilinear
  upsampling back to the stage's exact size (the official x2; also right for odd sizes) ->
  sigmoid, multiplied with the stage output. The masked map feeds only the exit; the student's
  own path goes on with the stage output unchanged.
- n = round(log2(H_i / H_deep)) SepConvs of stride 2 (H_deep: the last stage's map), channels
  doubling from C_i and the last one giving exactly C_deep (the last stage's channels); a stage
  already at the deepest size gets none (a 1x1 conv + BN + ReLU when its channels differ).
- global average pooling -> the exit's pooled feature (C_deep) -> Linear(C_deep, classes).
On the CIFAR ResNets (16/32/64 channels at 32/16/8): exit1 = attention(16) + SepConv 16->32,
32->64; exit2 = attention(32) + SepConv 32->64; the zoo's resnet18 (64..512 at 32..4) gets
exactly the official heads. Head convs are initialised as the official code (kaiming normal,
fan_out); the deepest exit is the student's own pooled feature (`<classifier>:in`) and logits.

Loss (default step): CE(deepest, y) + sum over exits i of (1 - alpha) CE(out_i, y) + alpha
byot_soft_ce(out_i, deepest.detach(), T) + feature_weight byot_feature_loss(adapter_i(f_i),
f_deep.detach()), with adapter_i a trained Linear(C_deep, C_feature) as the official code's
`adaptation_layers`. Logged as `ce`, `exit_ce`, `exit_kd` and `exit_feat` (sums over exits).
The official code's quirk is kept: the feature term is skipped for the exit right below the
deepest (its `index != 1` on a deepest-first list; its comment says it meant the shallowest), so
that exit has no adapter; mmrazor's BYOT config reproduces this too.

Every exit is evaluated each epoch as a model of its own (`derived_models`: the student cut by
torch.fx after the exit's stage, sharing the live weights, then the exit's head), reported in
summary.json `models` with its params and FLOPs, and exported with `tools/export.py --exit N`.
The official recipe (250 epochs, AutoAugment + Cutout, checkpoint picked by the exits'
ensemble) is not part of the method: runs use this framework's training recipe.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import fx, nn

from distill.distillers.feature_pairs import layer_shapes
from distill.errors import ConfigError
from distill.features import FeatureHooks, unwrap_model
from distill.losses.byot import byot_feature_loss, byot_soft_ce
from distill.method import DISTILLERS, BuildInfo, DerivedModels, Distiller, Traits
from distill.method.checks import OFF, require

# the official train.py's argparse defaults
ALPHA, TEMPERATURE, FEATURE_WEIGHT = 0.3, 3.0, 0.03


class SepConv(nn.Module):
    """The official (DARTS-style) separable conv: depthwise 3x3 of `stride` -> 1x1 -> BN -> ReLU
    -> depthwise 3x3 -> 1x1 to `out_channels` -> BN -> ReLU, no conv bias."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        c = in_channels
        self.op = nn.Sequential(
            nn.Conv2d(c, c, 3, stride=stride, padding=1, groups=c, bias=False),
            nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, stride=1, padding=1, groups=c, bias=False),
            nn.Conv2d(c, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ExitAttention(nn.Module):
    """The official `attentionK` applied: x * sigmoid(up(relu(bn(SepConv(x))))), where `up` is
    bilinear (align_corners False) to x's own size: nn.Upsample(scale_factor=2) on even sizes."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = SepConv(channels, channels, stride=2)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = F.relu(self.bn(self.conv(x)))
        mask = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(mask) * x


def exit_channels(in_channels: int, deep_channels: int, steps: int) -> list[int]:
    """Output channels of the exit's `steps` SepConvs: doubling, capped at `deep_channels`, the
    last exactly `deep_channels` (64 -> [128, 256, 512] for the official ResNet18's exit 1)."""
    return [deep_channels if k == steps else min(in_channels * 2 ** k, deep_channels)
            for k in range(1, steps + 1)]


class ExitHead(nn.Module):
    """One early exit on a stage map: attention, the SepConvs down to the deepest stage's size
    and channels, global average pooling, a linear classifier. Returns (logits, pooled
    feature)."""

    def __init__(self, in_channels: int, deep_channels: int, steps: int, num_classes: int):
        super().__init__()
        self.attention = ExitAttention(in_channels)
        layers: list[nn.Module] = []
        channels = in_channels
        for out in exit_channels(in_channels, deep_channels, steps):
            layers.append(SepConv(channels, out, stride=2))
            channels = out
        if channels != deep_channels:   # a stage already at the deepest size
            layers += [nn.Conv2d(channels, deep_channels, 1, bias=False),
                       nn.BatchNorm2d(deep_channels), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(deep_channels, num_classes)
        for m in self.modules():   # the official ResNet's init (its nn.Linear keep the default)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = F.adaptive_avg_pool2d(self.body(self.attention(x)), 1).flatten(1)
        return self.fc(feature), feature


class _SizedInput(fx.Proxy):
    """The traced input: its batch dimension stays symbolic, the others are the run's input
    shape, so a model that branches on its input size (VGG's `if h == 64`) traces for the size
    it is used at."""

    def __init__(self, node: fx.Node, tracer: fx.Tracer, dims: tuple[int, ...]):
        super().__init__(node, tracer)
        self.fixed_dims = tuple(dims)

    @property
    def shape(self):
        return (self.size(0), *self.fixed_dims)

    def size(self, dim: int | None = None):
        if dim is None:
            return self.shape
        if dim in (0, -1 - len(self.fixed_dims)):
            return self.tracer.create_proxy("call_method", "size", (self, 0), {})
        return self.fixed_dims[dim - 1 if dim > 0 else dim]

    def dim(self) -> int:
        return 1 + len(self.fixed_dims)


class _StageTracer(fx.Tracer):
    """torch.fx's tracer with the named stage modules kept whole (one node each)."""

    def __init__(self, stages: set[str], input_dims: tuple[int, ...]):
        super().__init__()
        self.stages, self.input_dims = stages, input_dims

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.stages or super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        if node.op == "placeholder":
            return _SizedInput(node, self, self.input_dims)
        return super().proxy(node)


def truncated_model(model: nn.Module, stage: str, input_shape: tuple[int, ...],
                    stages: tuple[str, ...] = ()) -> fx.GraphModule:
    """`model` up to the output of its module `stage`, and nothing after it: traced by torch.fx
    (`stage` and the other `stages` kept whole, so what they do inside needs no tracing), the
    stage's output made the graph's output, the dead code removed.
    The GraphModule holds the model's own submodules, so it runs the live weights. A model
    torch.fx cannot trace is a ConfigError naming `student`."""
    model = unwrap_model(model)
    try:
        graph = _StageTracer({stage, *stages}, tuple(input_shape)).trace(model)
    except Exception as exc:  # noqa: BLE001 - torch.fx raises many types for one cause
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"byot cuts the student after each stage for its early exits, and "
                          f"torch.fx cannot trace {type(model).__name__}: "
                          f"{type(exc).__name__}: {first}", key="student",
                          allowed="a student torch.fx can trace (every CIFAR model of the zoo)"
                          ) from None
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == stage]
    if len(calls) != 1:
        raise ConfigError(f"the student's forward calls its stage '{stage}' {len(calls)} times: "
                          "byot needs one call per stage to cut the student there", key="student")
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (calls[0],)
    name = f"{type(model).__name__}_to_{re.sub(r'[^0-9A-Za-z]', '_', stage)}"
    cut = fx.GraphModule(model, graph, class_name=name)
    cut.graph.eliminate_dead_code()
    cut.delete_all_unused_submodules()
    cut.recompile()
    return cut


class ExitModel(nn.Module):
    """An early exit as a model of its own: `body` (the student up to the exit's stage) then
    `head`; returns the exit's logits."""

    def __init__(self, body: nn.Module, head: ExitHead):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))[0]


@DISTILLERS.register("byot",
                     family="self",
                     summary=("No teacher: the student's deepest exit teaches exits added after "
                              "its stages"),
                     published_in=("4e",),
                     paper=('Be Your Own Teacher, Zhang et al. ICCV 2019 (code '
                            'ArchipLab-LinfengZhang/pytorch-self-distillation-final)'),
                     recipe=('no teacher; an exit (attention + SepConvs + fc) after every student '
                             'stage but the last; CE on the deepest, 0.7 CE + 0.3 soft CE (T=3) '
                             'from the deepest and 0.03 x an adapted feature distance on the '
                             'others (as the code); every exit evaluated and reported with params '
                             'and FLOPs, `tools/export.py RUN --exit N` exports one; one process '
                             "only (the code's feature term is a norm over the whole batch, which "
                             'DDP shards would shrink)'),
                     edges={"alpha": {"0": OFF}})
class BYOT(DerivedModels, Distiller):
    traits = Traits(needs_teacher=False, needs_images=True, logit_weights=("ce_weight", "alpha"),
                    unsupported={"ddp": "the official feature term is the L2 norm of the whole "
                                        "batch's difference (torch.dist), which each rank's shard "
                                        "would shrink by sqrt(ranks)"})

    def __init__(self, student, alpha: float = ALPHA, temperature: float = TEMPERATURE,
                 feature_weight: float = FEATURE_WEIGHT, *, info: BuildInfo):
        super().__init__(student, None)
        spec = info.student_spec
        if spec is None or len(spec.stages) < 2 or not spec.classifier:
            raise ConfigError("byot puts an early exit after every stage of the student but its "
                              "last, and takes the deepest feature at its classifier's input: "
                              f"{info.student_arch or 'this student'} has no known stage "
                              "modules (two or more) and classifier", key="student",
                              allowed="a model of the zoo with stages (e.g. resnet8, wrn_16_2, "
                                      "mobilenetv2, vgg8)")
        self.all_stages = tuple(spec.stages)
        self.stage_layers = list(spec.stages[:-1])
        self.feature_layer = f"{spec.classifier}:in"
        *stage_shapes, deep, feature = layer_shapes(student, [*spec.stages, self.feature_layer],
                                                    info)
        if any(len(s) != 4 for s in (*stage_shapes, deep)):
            raise ConfigError(f"the student's stages {list(spec.stages)} give "
                              f"{[tuple(s[1:]) for s in (*stage_shapes, deep)]} outputs: byot's "
                              "exits need (C, H, W) feature maps", key="student")
        deep_channels, feature_dim = deep[1], math.prod(feature[1:])
        heads = []
        for shape in stage_shapes:
            ratio = max(shape[2] / deep[2], shape[3] / deep[3])
            steps = max(0, round(math.log2(ratio)))
            heads.append(ExitHead(shape[1], deep_channels, steps, info.num_classes))
        # the official quirk: no feature term (no adapter) for the exit right below the deepest
        adapters = [nn.Linear(deep_channels, feature_dim) for _ in heads[:-1]]
        self.add_trained("exits", nn.ModuleList(heads))
        self.add_trained("adapters", nn.ModuleList(adapters))
        self.hooks = FeatureHooks(student, [*self.stage_layers, self.feature_layer])
        self.input_shape = tuple(info.input_shape)
        self.alpha, self.temperature, self.feature_weight = alpha, temperature, feature_weight
        self.derived_models()   # a student torch.fx cannot cut is refused now

    @classmethod
    def check_values(cls, options):
        require(options, alpha="[0,1]", temperature=">0", feature_weight=">=0")

    @classmethod
    def loss_term_weights(cls, options):
        """The deepest exit's CE has the fixed weight 1 (the official code's): a run always
        trains its classifier; alpha and feature_weight weigh the exits' terms."""
        return {"ce_weight": 1.0, "alpha": options.get("alpha", ALPHA),
                "feature_weight": options.get("feature_weight", FEATURE_WEIGHT)}

    def derived_models(self) -> dict[str, nn.Module]:
        """exit1 (after the first stage) .. exitN (after the last stage but one), each the
        student cut by torch.fx after that stage, then the exit's head: only what the exit
        needs runs. Built on each call from the live modules (tracing takes milliseconds), so
        they follow the student to any device; never children of the distiller."""
        models = {}
        for i, (stage, head) in enumerate(zip(self.stage_layers, self.exits), start=1):
            body = truncated_model(self.student, stage, self.input_shape, self.all_stages)
            model = ExitModel(body, head)
            # the root flags follow the student: evaluate() restores the mode it finds here
            model.training = model.body.training = unwrap_model(self.student).training
            models[f"exit{i}"] = model
        return models

    def forward(self, images, targets, ctx):
        logits = self.student(images)
        deep_logits = logits.detach()
        deep_feature = self.hooks.features[self.feature_layer].flatten(1).detach()
        exit_ce, exit_kd, exit_feat = [], [], []
        for i, (stage, head) in enumerate(zip(self.stage_layers, self.exits)):
            out, feature = head(self.hooks.features[stage])
            exit_ce.append(self.cross_entropy(out, targets, ctx))
            exit_kd.append(byot_soft_ce(out, deep_logits, self.temperature))
            if i < len(self.adapters):
                exit_feat.append(byot_feature_loss(self.adapters[i](feature), deep_feature))
        terms = {"ce": self.cross_entropy(logits, targets, ctx),
                 "exit_ce": (1 - self.alpha) * sum(exit_ce),
                 "exit_kd": self.alpha * sum(exit_kd)}
        if exit_feat:
            terms["exit_feat"] = self.feature_weight * sum(exit_feat)
        return logits, terms
