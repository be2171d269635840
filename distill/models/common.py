"""Pieces several CIFAR reference architectures share: weight inits and the channel shuffle."""
from __future__ import annotations

import math

from torch import nn


def init_kaiming_fan_out(model: nn.Module) -> None:
    """The ResNet init of the reference code: Kaiming-normal convs (fan_out), BN/GN weight 1."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def init_normal_fan_out(model: nn.Module) -> None:
    """The VGG / MobileNetV2 init of the reference code: conv weights N(0, 2/fan_out), zero conv
    biases, BN weight 1, classifier N(0, 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class ShuffleBlock(nn.Module):
    """Channel shuffle (ShuffleNet): [N, g*c, H, W] -> [N, c*g, H, W]."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.size()
        g = self.groups
        return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)
