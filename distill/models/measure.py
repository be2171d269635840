"""What a model costs: parameters and FLOPs (as torch's FlopCounterMode counts them)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distill.inputs import Inputs, call_model, to_device


def parameter_count(model: nn.Module) -> int:
    """Parameters, each counted once (a module shared by two parents too)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_item(model: nn.Module, inputs: Inputs) -> int:
    """FLOPs of one forward on `inputs` (a batch of one item): 2 per multiply-add of the convs
    and matmuls; normalisation, activations and bias additions are not counted."""
    device = next(model.parameters()).device
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        call_model(model, to_device(inputs, device))
    return counter.get_total_flops()


def flops_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """`flops_per_item` of one all-zero image of `input_shape` (C, H, W)."""
    return flops_per_item(model, torch.zeros(1, *input_shape))
