"""ShuffleNetV1 for CIFAR (registered as `shufflenetv1`).

Mirrors CRD/RepDistiller ``models/ShuffleNetv1.py`` and mdistiller
``mdistiller/models/cifar/ShuffleNetv1.py``, entry point ``ShuffleV1``: out_planes [240, 480, 960],
blocks [4, 8, 4], groups 3, stem conv1 1x1 3->24 + bn1 (no max-pool), layer1..3, avg-pool 4,
``linear``. Same attribute names; like the reference it keeps PyTorch's default init. `forward`
returns logits only and blocks return one tensor (the reference's is_last blocks also return the
pre-ReLU sum; hooks on layer1..3 give the post-ReLU stage features the reference returns).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.models import cifar_model
from distill.models.common import ShuffleBlock


class Bottleneck(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1,
                               groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        out = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(out)


class ShuffleNet(nn.Module):
    def __init__(self, cfg: dict, num_classes: int = 100):
        super().__init__()
        out_planes, num_blocks, groups = cfg["out_planes"], cfg["num_blocks"], cfg["groups"]
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            stride = 2 if i == 0 else 1
            cat_planes = self.in_planes if i == 0 else 0  # the stride-2 shortcut is concatenated
            layers.append(Bottleneck(self.in_planes, out_planes - cat_planes, stride, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, 4).flatten(1)
        return self.linear(out)


@cifar_model("shufflenetv1", family="shufflenet", stages=("layer1", "layer2", "layer3"),
             classifier="linear")
def shufflenetv1(num_classes: int = 100) -> ShuffleNet:
    """CIFAR ShuffleNetV1, groups 3 (reference `ShuffleV1`)."""
    cfg = {"out_planes": [240, 480, 960], "num_blocks": [4, 8, 4], "groups": 3}
    return ShuffleNet(cfg, num_classes=num_classes)
