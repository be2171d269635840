"""Connectors: small trained modules that map a student feature onto the teacher's shape.

They train with the student (they are the distiller's own parameters, so they are in the
optimizer, in checkpoints and in `connector_params`) and are dropped at export.
"""
from __future__ import annotations

import torch
from torch import nn

from distill.errors import ConfigError
from distill.losses.vid import vid_log_scale_init


class ConvRegressor(nn.Module):
    """FitNets' convolutional regressor, as CRD and mdistiller build it (`ConvReg`): a conv that
    maps the student map (C_s, H_s, W_s) to the teacher's (C_t, H_t, W_t), then BatchNorm and
    ReLU (the hint is a post-ReLU stage output, so the regressor ends in a ReLU too).

    The conv is picked from the two spatial sizes, in the reference's order:
      H_s == 2 H_t  -> 3x3 conv, stride 2, padding 1
      2 H_s == H_t  -> 4x4 transposed conv, stride 2, padding 1
      H_s >= H_t    -> conv with kernel (1 + H_s - H_t, 1 + W_s - W_t), no padding (1x1 if equal)
    Any other pair cannot be bridged (`bridgeable` says so before anything is built).
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...],
                 relu: bool = True):
        super().__init__()
        kind = conv_kind(student_shape, teacher_shape)
        if kind is None:
            raise ValueError(f"no conv regressor maps {tuple(student_shape)} to {tuple(teacher_shape)}")
        (_, c_s, h_s, w_s), (_, c_t, h_t, w_t) = student_shape, teacher_shape
        if kind == "down":
            self.conv = nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
        elif kind == "up":
            self.conv = nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
        else:
            self.conv = nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
        self.bn = nn.BatchNorm2d(c_t)
        # without: the reference's use_relu=False (AB maps onto pre-activation features)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def conv_kind(student_shape, teacher_shape) -> str | None:
    if len(student_shape) != 4 or len(teacher_shape) != 4:
        return None
    (_, _, h_s, w_s), (_, _, h_t, w_t) = student_shape, teacher_shape
    if h_s == 2 * h_t and w_s == 2 * w_t:
        return "down"
    if 2 * h_s == h_t and 2 * w_s == w_t:
        return "up"
    if h_s >= h_t and w_s >= w_t:
        return "valid"
    return None


def build_connector(student_shape, teacher_shape, *, keys: tuple[str, str]) -> nn.Module:
    """A ConvRegressor for two feature maps, a Linear layer for two feature vectors; anything
    else is a ConfigError naming both shapes and the options that pick the layers (`keys`)."""
    student_shape, teacher_shape = tuple(student_shape), tuple(teacher_shape)
    if len(student_shape) == len(teacher_shape) == 2:
        return nn.Linear(student_shape[1], teacher_shape[1])
    if conv_kind(student_shape, teacher_shape) is not None:
        return ConvRegressor(student_shape, teacher_shape)
    raise ConfigError(
        f"no connector maps the student feature {student_shape[1:]} onto the teacher feature "
        f"{teacher_shape[1:]}", key=keys[0],
        allowed="two feature maps (C,H,W) where the student's H,W are the teacher's, twice them, "
                "half them, or larger; or two feature vectors",
        hint=f"pick other layers with {keys[0]}=... and {keys[1]}=...")


class VIDRegressor(nn.Module):
    """VID's per-layer head (RepDistiller distiller_zoo/VID.py, the authors' code): three 1x1
    convolutions without bias (student channels -> teacher channels -> teacher channels ->
    teacher channels, ReLU between) predicting the teacher map's mean, and a learned
    per-channel `log_scale` whose softplus (+ eps) is the predicted variance, initialised to
    `init_var`."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int,
                 init_var: float = 5.0, eps: float = 1e-5):
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, 1, bias=False))
        self.log_scale = nn.Parameter(torch.full((out_channels,),
                                                 vid_log_scale_init(init_var, eps)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.regressor(x)


def _factor_block(widths: list[int], *, transpose: bool, batch_norm: bool) -> nn.Sequential:
    """3x3 convolutions (stride 1, padding 1, bias) through `widths`, each followed by BN (or
    nothing) and LeakyReLU(0.1): the layout of RepDistiller's Paraphraser and Translator (its
    no-BN slots are empty, so the state-dict keys are the reference's)."""
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    layers: list[nn.Module] = []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [conv(c_in, c_out, 3, 1, 1),
                   nn.BatchNorm2d(c_out) if batch_norm else nn.Identity(),
                   nn.LeakyReLU(0.1, inplace=True)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Factor Transfer's teacher-side autoencoder (RepDistiller models/util.py, no BN): an
    encoder to `rate` x the teacher's channels (the factor) and a transposed decoder back."""

    def __init__(self, channels: int, rate: float = 0.5):
        super().__init__()
        factor = int(channels * rate)
        self.encoder = _factor_block([channels, channels, factor, factor], transpose=False,
                                     batch_norm=False)
        self.decoder = _factor_block([factor, factor, channels, channels], transpose=True,
                                     batch_norm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction (the init stage's target is `x` itself)."""
        return self.decoder(self.encoder(x))


class Translator(nn.Module):
    """Factor Transfer's student-side encoder (RepDistiller models/util.py, with BN): the
    student map to the teacher factor's width."""

    def __init__(self, in_channels: int, teacher_channels: int, rate: float = 0.5):
        super().__init__()
        factor = int(teacher_channels * rate)
        self.encoder = _factor_block([in_channels, in_channels, factor, factor], transpose=False,
                                     batch_norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)
