"""Wide ResNets for CIFAR (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Mirrors CRD/RepDistiller ``models/wrn.py`` and mdistiller ``mdistiller/models/cifar/wrn.py``
(pre-activation WideResNet, n=(depth-4)//6 blocks per group). Same attribute names (conv1,
block1..3 each a NetworkBlock with ``.layer``, blocks with bn1/relu1/conv1/bn2/relu2/conv2/
convShortcut; bn1, fc) and the same init, so published state_dicts load unchanged. `forward`
returns logits only.

Stage features: hooks on block1..3 give the raw block outputs (the residual sums, before the next
block's BN-ReLU). That is exactly mdistiller's ``feats``. RepDistiller instead returns
``F.relu(block_i output)`` (and ``bn+relu`` with preact=True); a distiller that wants those can
apply the ReLU to the hooked tensor.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill.models import cifar_model


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, dropRate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1,
                               bias=False)
        self.droprate = dropRate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None if self.equalInOut else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x):
        # As in the reference: when the width changes, the shortcut also sees the BN-ReLU'd input.
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.equalInOut else self.convShortcut(act)
        return torch.add(shortcut, out)


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, block, stride, dropRate=0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                  dropRate)
            for i in range(int(nb_layers))
        ])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, widen_factor: int = 1, dropRate: float = 0.0):
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        assert (depth - 4) % 6 == 0, "depth should be 6n+4"
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], BasicBlock, 1, dropRate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], BasicBlock, 2, dropRate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], BasicBlock, 2, dropRate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8).reshape(-1, self.nChannels)
        return self.fc(out)


def _register(depth: int, width: int) -> None:
    name = f"wrn_{depth}_{width}"

    def factory(num_classes: int = 100) -> WideResNet:
        return WideResNet(depth=depth, num_classes=num_classes, widen_factor=width)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"WRN-{depth}-{width} for 32x32 inputs (reference `{name}`)."
    # the reference's preact features: each stage output through the next block's first BN
    # (the final bn1 for the last), before the ReLU that follows it
    cifar_model(name, family="wrn", stages=("block1", "block2", "block3"), classifier="fc",
                stem="conv1", preact=("block2.layer.0.bn1:preact", "block3.layer.0.bn1:preact",
                                      "bn1:preact"))(factory)


for _depth, _width in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _width)
