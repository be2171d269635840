"""Connectors: small trained modules that map a student feature onto the teacher's shape.

They train with the student (they are the distiller's own parameters, so they are in the
optimizer, in checkpoints and in `connector_params`) and are dropped at export.
"""
from __future__ import annotations

import torch
from torch import nn

from distill.errors import ConfigError


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

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]):
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
        self.relu = nn.ReLU(inplace=True)

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
