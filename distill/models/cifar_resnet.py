"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4).

Mirrors the CIFAR-100 KD reference models: CRD/RepDistiller ``models/resnet.py`` and mdistiller
``mdistiller/models/cifar/resnet.py``. Same layers, same attribute names (conv1, bn1, layer1..3,
avgpool, fc; blocks with conv1/bn1/conv2/bn2/downsample), same init, so their published
state_dicts load unchanged. Differences: `forward` returns logits only (no is_feat/preact
flags) and blocks return one tensor. The stage features the reference returns (post-ReLU outputs
of layer1..3) are the outputs of those modules, so forward hooks on them give the same tensors.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from distill.models import cifar_model
from distill.models.common import init_kaiming_fan_out


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class ResNet(nn.Module):
    """ResNet(depth, num_filters): a 3x3 stem then three stages of n blocks, n=(depth-2)//6."""

    def __init__(self, depth: int, num_filters: list[int], block_name: str = "basicblock",
                 num_classes: int = 100):
        super().__init__()
        if block_name.lower() == "basicblock":
            assert (depth - 2) % 6 == 0, "basicblock depth must be 6n+2, e.g. 20, 32, 44, 56, 110"
            n, block = (depth - 2) // 6, BasicBlock
        elif block_name.lower() == "bottleneck":
            assert (depth - 2) % 9 == 0, "bottleneck depth must be 9n+2, e.g. 20, 29, 47, 56, 110"
            n, block = (depth - 2) // 9, Bottleneck
        else:
            raise ValueError("block_name must be 'basicblock' or 'bottleneck'")

        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, num_filters[1], n)
        self.layer2 = self._make_layer(block, num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(block, num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3] * block.expansion, num_classes)

        init_kaiming_fan_out(self)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride,
                          bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x).flatten(1)
        return self.fc(x)


_STAGES = ("layer1", "layer2", "layer3")
_BASE = [16, 16, 32, 64]
_X4 = [32, 64, 128, 256]


def _register(name: str, depth: int, filters: list[int]) -> None:
    def factory(num_classes: int = 100) -> ResNet:
        return ResNet(depth, filters, "basicblock", num_classes=num_classes)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"CIFAR ResNet-{depth}, filters {filters} (reference `{name}`)."
    blocks = (depth - 2) // 6   # per stage; the last one's sum before its ReLU is the preact
    cifar_model(name, family="resnet", stages=_STAGES, classifier="fc",
                preact=tuple(f"{stage}.{blocks - 1}:preact" for stage in _STAGES))(factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, _BASE)
_register("resnet8x4", 8, _X4)
_register("resnet32x4", 32, _X4)
