"""A batch's inputs: an image tensor, or a mapping of named tensors (`input_ids`,
`attention_mask`, ...). The few operations the engine, the methods and the tools need on them,
without knowing which they hold."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """`model(inputs)`, or `model(**inputs)` for a mapping of named input tensors."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def map_inputs(inputs: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """`fn` applied to the tensor, or to every tensor of the mapping."""
    if isinstance(inputs, Mapping):
        return {name: fn(value) for name, value in inputs.items()}
    return fn(inputs)


def to_device(inputs: Inputs, device: torch.device, *, non_blocking: bool = False,
              memory_format: torch.memory_format | None = None) -> Inputs:
    """On `device`; `memory_format` (channels_last) applies to 4-D image batches only."""
    def move(tensor: torch.Tensor) -> torch.Tensor:
        if memory_format is not None and tensor.ndim == 4:
            return tensor.to(device, non_blocking=non_blocking, memory_format=memory_format)
        return tensor.to(device, non_blocking=non_blocking)

    return map_inputs(inputs, move)


def batch_size(inputs: Inputs) -> int:
    """How many items the batch holds (the first dimension of its tensors)."""
    if isinstance(inputs, Mapping):
        return next(iter(inputs.values())).shape[0]
    return inputs.shape[0]


def is_image_batch(inputs: Any) -> bool:
    """An (N, C, H, W) float tensor: what image-only pieces need."""
    return isinstance(inputs, torch.Tensor) and inputs.ndim == 4 and inputs.is_floating_point()


class InputSpec:
    """What a model takes, without a dataset at hand (an export, a benchmark): images of one
    shape, or token ids and their attention mask, up to a length, from a vocabulary."""

    def __init__(self, kind: str, shape: tuple[int, ...], vocab_size: int | None = None):
        if kind not in ("images", "tokens"):
            raise ValueError(f"unknown kind of inputs {kind!r}")
        self.kind, self.shape, self.vocab_size = kind, tuple(shape), vocab_size

    @property
    def names(self) -> list[str]:
        """The ONNX graph's input names."""
        return ["images"] if self.kind == "images" else ["input_ids", "attention_mask"]

    def random(self, batch: int, length: int | None = None,
               generator: torch.Generator | None = None) -> Inputs:
        """A random batch: normal pixels, or token ids with a random length per item (at least
        one token, the rest padding with id 0)."""
        if self.kind == "images":
            return torch.randn(batch, *self.shape, generator=generator)
        length = length or self.shape[0]
        ids = torch.randint(1, self.vocab_size, (batch, length), generator=generator)
        lengths = torch.randint(1, length + 1, (batch,), generator=generator)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.int64)
        return {"input_ids": ids * mask, "attention_mask": mask}

    def __repr__(self) -> str:
        return f"InputSpec({self.kind!r}, {self.shape}" + (
            f", vocab_size={self.vocab_size})" if self.vocab_size else ")")
