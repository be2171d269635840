"""VGG with BatchNorm for CIFAR (vgg8, vgg11, vgg13, vgg16, vgg19).

Mirrors CRD/RepDistiller ``models/vgg.py`` and mdistiller ``mdistiller/models/cifar/vgg.py``:
five conv blocks (block0..block4), pool0..pool3 MaxPool2d(2) between them (pool3 only used for
64x64 inputs), pool4 AdaptiveAvgPool2d(1), classifier Linear(512, n); same init.

One deliberate, function-preserving difference: the reference drops the final ReLU of each block
and applies ``F.relu`` in forward. Here that ReLU stays as the LAST element of each block
Sequential, so a forward hook on ``block_i`` returns the post-ReLU stage feature the reference
returns. A ReLU has no parameters, so state_dict keys (block0.0.weight, block0.1.running_mean,
...) are identical and reference checkpoints load unchanged.
"""
from __future__ import annotations


from torch import nn

from distill.models import cifar_model
from distill.models.common import init_normal_fan_out

CFG = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512],
          [512, 512, 512, 512]],
}


class VGG(nn.Module):
    def __init__(self, cfg: list[list[int]], batch_norm: bool = True, num_classes: int = 100):
        super().__init__()
        self.block0 = self._make_layers(cfg[0], batch_norm, 3)
        self.block1 = self._make_layers(cfg[1], batch_norm, cfg[0][-1])
        self.block2 = self._make_layers(cfg[2], batch_norm, cfg[1][-1])
        self.block3 = self._make_layers(cfg[3], batch_norm, cfg[2][-1])
        self.block4 = self._make_layers(cfg[4], batch_norm, cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        init_normal_fan_out(self)

    def forward(self, x):
        h = x.shape[2]
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)
        if h == 64:
            x = self.pool3(x)
        x = self.pool4(self.block4(x)).flatten(1)
        return self.classifier(x)

    @staticmethod
    def _make_layers(cfg: list[int], batch_norm: bool, in_channels: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for v in cfg:
            layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            in_channels = v
        return nn.Sequential(*layers)  # the final ReLU is kept (see module docstring)



# block0 is the stem, as conv1 is in the ResNets: the stages are the reference's feats[1:],
# the features AT pairs and FitNet picks its hint from.
_STAGES = ("block1", "block2", "block3", "block4")


def _register(name: str, cfg_key: str) -> None:
    def factory(num_classes: int = 100) -> VGG:
        return VGG(CFG[cfg_key], batch_norm=True, num_classes=num_classes)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{name} with BatchNorm, config '{cfg_key}' (reference `{name}_bn`)."
    # preact: each stage's last BatchNorm, before the block's final ReLU (the reference's f_pre);
    # the stem is block0's output before pool0 (the reference's f0)
    last_norm = [3 * len(CFG[cfg_key][int(stage[-1])]) - 2 for stage in _STAGES]
    cifar_model(name, family="vgg", stages=_STAGES, classifier="classifier", stem="block0",
                preact=tuple(f"{stage}.{i}:preact" for stage, i in zip(_STAGES, last_norm))
                )(factory)


for _name, _key in (("vgg8", "S"), ("vgg11", "A"), ("vgg13", "B"), ("vgg16", "D"), ("vgg19", "E")):
    _register(_name, _key)
