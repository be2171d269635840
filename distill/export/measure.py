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

from distill.models.measure import flops_per_image, parameter_count


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


def cpu_latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch: int,
                   timing: Timing = Timing()) -> float:
    """Median wall time of one forward of a `batch`, after warm-up (allocator, kernel choice)."""
    images = torch.randn(batch, *input_shape)
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(timing.warmup):
            model(images)
        started = time.perf_counter()
        while len(times) < timing.min_repeats or (
                len(times) < timing.max_repeats
                and time.perf_counter() - started < timing.budget_s):
            tick = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - tick)
    return 1000 * statistics.median(times)


def measure(model: nn.Module, input_shape: tuple[int, ...], batches: tuple[int, ...],
            timing: Timing) -> dict[str, Any]:
    return {"params": parameter_count(model),
            "flops_per_image": flops_per_image(model, input_shape),
            "latency_ms": {str(b): cpu_latency_ms(model, input_shape, b, timing) for b in batches}}


