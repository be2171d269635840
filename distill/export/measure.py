"""What an export measures: parameters, FLOPs and CPU latency of a model."""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distill.inputs import InputSpec, call_model
from distill.models.measure import flops_per_item, parameter_count


@dataclass(frozen=True)
class Timing:
    """Median of at least `min_repeats` timed forwards (more while within `budget_s`)."""
    warmup: int = 3
    min_repeats: int = 5
    max_repeats: int = 30
    budget_s: float = 1.0


@contextlib.contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cpu_latency_ms(model: nn.Module, inputs: InputSpec, batch: int,
                   timing: Timing = Timing()) -> float:
    """Median wall time of one forward of a `batch` (full-length sequences), after warm-up
    (allocator, kernel choice)."""
    example = inputs.random(batch)
    if inputs.kind == "tokens":   # every item as long as the sequence may be
        example = {"input_ids": example["input_ids"].clamp(min=1),
                   "attention_mask": torch.ones_like(example["attention_mask"])}
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(timing.warmup):
            call_model(model, example)
        started = time.perf_counter()
        while len(times) < timing.min_repeats or (
                len(times) < timing.max_repeats
                and time.perf_counter() - started < timing.budget_s):
            tick = time.perf_counter()
            call_model(model, example)
            times.append(time.perf_counter() - tick)
    return 1000 * statistics.median(times)


def measure(model: nn.Module, inputs: InputSpec, batches: tuple[int, ...],
            timing: Timing) -> dict[str, Any]:
    """Parameters, FLOPs of one item (an image; a full-length sequence) and CPU latency."""
    one = (torch.zeros(1, *inputs.shape) if inputs.kind == "images"
           else {"input_ids": torch.ones(1, *inputs.shape, dtype=torch.int64),
                 "attention_mask": torch.ones(1, *inputs.shape, dtype=torch.int64)})
    return {"params": parameter_count(model),
            "flops_per_image": flops_per_item(model, one),
            "latency_ms": {str(b): cpu_latency_ms(model, inputs, b, timing) for b in batches}}


