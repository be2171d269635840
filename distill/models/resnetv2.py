"""ImageNet-style ResNet-18/50 adapted to CIFAR (registered as `resnet18`, `resnet50`).

Mirrors CRD/RepDistiller ``models/resnetv2.py`` and mdistiller ``mdistiller/models/cifar/
resnetv2.py`` (``ResNet18``, ``ResNet50``): 3x3 stride-1 stem (conv1, bn1), no max-pool,
layer1..4 with ``shortcut`` Sequentials, ``avgpool`` AdaptiveAvgPool2d(1), ``linear``. Same
attribute names and init (kaiming fan_out convs, BN 1/0, default Linear). `forward` returns
logits only; hooks on layer1..4 give the post-ReLU stage features the reference returns.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from distill.models import cifar_model
from distill.models.common import init_kaiming_fan_out


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block, num_blocks: list[int], num_classes: int = 100,
                 zero_init_residual: bool = False):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * block.expansion, num_classes)

        init_kaiming_fan_out(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.avgpool(out).flatten(1)
        return self.linear(out)


_STAGES = ("layer1", "layer2", "layer3", "layer4")


@cifar_model("resnet18", family="resnetv2", stages=_STAGES, classifier="linear",
             preact=("layer1.1:preact", "layer2.1:preact", "layer3.1:preact", "layer4.1:preact"))
def resnet18(num_classes: int = 100) -> ResNet:
    """CIFAR ResNet-18 (reference `ResNet18` in resnetv2.py)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


@cifar_model("resnet50", family="resnetv2", stages=_STAGES, classifier="linear",
             preact=("layer1.2:preact", "layer2.3:preact", "layer3.5:preact", "layer4.2:preact"))
def resnet50(num_classes: int = 100) -> ResNet:
    """CIFAR ResNet-50 (reference `ResNet50` in resnetv2.py)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
