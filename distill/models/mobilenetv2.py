"""MobileNetV2 for CIFAR, half width (registered as `mobilenetv2`).

Mirrors CRD/RepDistiller ``models/mobilenetv2.py`` and mdistiller
``mdistiller/models/cifar/mobilenetv2.py``, entry point ``mobile_half`` =
``MobileNetV2(T=6, feature_dim=num_classes, input_size=32, width_mult=0.5)``: stem conv_bn with
stride 2, seven groups of InvertedResidual blocks in ``blocks`` (a ModuleList of Sequentials;
every block has the full pw/dw/pw-linear ``conv`` Sequential, also for t=1), ``conv2`` 1x1 to 1280
channels, ``avgpool`` AvgPool2d(input_size // 16, ceil_mode=True), ``classifier`` =
Sequential(Linear). Same attribute names and init; `forward` returns logits only.

Stage features (as in the reference): outputs of blocks.1, blocks.2, blocks.4, blocks.6. They are
the linear bottleneck outputs (no ReLU), exactly what the reference returns.
"""
from __future__ import annotations


from torch import nn

from distill.models import cifar_model
from distill.models.common import init_normal_fan_out


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        assert stride in (1, 2)
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        hidden = inp * expand_ratio
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),  # pointwise expand
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depthwise
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),  # pointwise linear
            nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, T: int, feature_dim: int, input_size: int = 32, width_mult: float = 1.0):
        super().__init__()
        setting = [  # t, c, n, s
            [1, 16, 1, 1],
            [T, 24, 2, 1],
            [T, 32, 3, 2],
            [T, 64, 4, 2],
            [T, 96, 3, 1],
            [T, 160, 3, 2],
            [T, 320, 1, 1],
        ]
        assert input_size % 32 == 0
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(3, input_channel, 2)

        self.blocks = nn.ModuleList()
        for t, c, n, s in setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))

        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn(input_channel, self.last_channel)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, feature_dim))
        self.avgpool = nn.AvgPool2d(input_size // 16, ceil_mode=True)
        init_normal_fan_out(self)

    def forward(self, x):
        out = self.conv1(x)
        for block in self.blocks:
            out = block(out)
        out = self.avgpool(self.conv2(out)).flatten(1)
        return self.classifier(out)



@cifar_model("mobilenetv2", family="mobilenetv2",
             stages=("blocks.1", "blocks.2", "blocks.4", "blocks.6"), classifier="classifier.0")
def mobilenetv2(num_classes: int = 100) -> MobileNetV2:
    """Half-width CIFAR MobileNetV2 (reference `mobile_half`)."""
    return MobileNetV2(T=6, feature_dim=num_classes, input_size=32, width_mult=0.5)
