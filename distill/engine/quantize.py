"""Quantisation-aware training of the student (`trainer.quantize=int8`), for any method.

As Polino et al. 2018 ("Model compression via distillation and quantization"; official
antspy/quantized_distillation) train their quantized students: every step runs on quantized
weights, and the gradient updates full-precision shadow weights (straight-through estimator);
activations stay in floating point while training. The weights of every convolution and linear
layer of the exported student go through `Int8Weights`, a parametrization (the module and its
name stay as they are: forward hooks, feature layers and every method work unchanged):
per-output-channel symmetric int8, scale = max |w| / 127 per channel, round to nearest.
Polino quantizes buckets of 256 weights with min-max scaling; per channel is what int8 runtimes
execute (ONNX QLinearConv, onnxruntime), so the weights trained are exactly the weights run.

Per-channel symmetric quantization is unchanged by scaling an output channel, so folding a
BatchNorm into the convolution before it (what the ONNX export does) keeps the same integers.
`tools/export.py` writes the int8 model (distill.export.int8): these weights, and 8-bit
activations calibrated on training images.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

INT8_MAX = 127
# where a parametrized layer keeps its float (shadow) weight in a state dict
QUANTIZED_SUFFIX = ".parametrizations.weight.original"


class Int8Weights(nn.Module):
    """A weight [out, ...] as the int8 model holds it: round(w / s) * s with s = max|w_c| / 127
    per output channel (a zero channel stays zero). Gradients pass straight through."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        absmax = weight.detach().abs().flatten(1).amax(dim=1)
        scale = (absmax / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny).float()
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0,
                                                      -INT8_MAX, INT8_MAX)


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def quantize_weights(model: nn.Module) -> int:
    """Parametrize every conv and linear weight of `model` with Int8Weights, in place; returns
    how many. The shadow weight stays the same Parameter (optimizers hold it)."""
    layers = quantized_layers(model)
    for layer in layers:
        if not parametrize.is_parametrized(layer, "weight"):
            parametrize.register_parametrization(layer, "weight", Int8Weights())
    return len(layers)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state dict with each quantized weight under its own name, as the int8 model
    holds it (what student.safetensors stores: a float model loads it and computes what the int8
    one does); the model's own state dict when nothing is quantized."""
    plain = {}
    for key, value in model.state_dict().items():
        if key.endswith(QUANTIZED_SUFFIX):
            layer = key[:-len(QUANTIZED_SUFFIX)]
            plain[f"{layer}.weight"] = model.get_submodule(layer).weight.detach()
        else:
            plain[key] = value
    return plain
