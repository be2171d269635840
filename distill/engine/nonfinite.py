"""What a NaN/inf loss does (trainer.on_nonfinite).

`stop` (default): the run stops at the next log step, before any checkpoint can take the broken
weights, naming the first bad step since the last log step and each term's value there. `skip`:
the step's updates are dropped (no optimizer step, the trained parts' buffers, e.g. BN
statistics, put back) and counted; one host sync per step. A finite loss can still come with
non-finite gradients, so the weights themselves are checked before every checkpoint.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from distill import distributed as dist_utils


def nonfinite_on_any_rank(loss: torch.Tensor) -> bool:
    """Whether any rank's loss is NaN/inf: all ranks skip a step together. One host sync."""
    bad = (~torch.isfinite(loss.detach())).to(torch.int32).reshape(1)
    dist_utils.all_reduce_sum(bad)
    return bool(bad.item())


def format_terms(names, values) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in zip(names, values))


class StepWindow:
    """(step, its loss terms) since the last log step, kept as they are (a good step costs no
    extra kernel) and stacked only to name the bad step when the logged mean is not finite."""

    def __init__(self, policy: str, last_good_checkpoint: Callable[[], str]):
        self.policy = policy
        self.last_good_checkpoint = last_good_checkpoint
        self.steps: list[tuple[int, list[torch.Tensor]]] = []

    def add(self, step: int, terms: list[torch.Tensor]) -> None:
        self.steps.append((step, terms))

    def check(self, means: dict[str, float], names: list[str]) -> None:
        """At a log step: raise when the mean of a term over the window is not finite."""
        if not all(math.isfinite(v) for v in means.values()):
            raise self.error(names)
        self.steps.clear()

    def error(self, names: list[str]) -> FloatingPointError:
        """Every rank gets here together: the all-reduced mean was non-finite on all of them."""
        values = torch.stack([torch.stack([t.double() for t in terms]) for _, terms in self.steps])
        dist_utils.all_reduce_sum(values)
        values /= dist_utils.world_size()
        bad = (~torch.isfinite(values)).any(dim=1).nonzero().flatten().tolist()
        row = bad[0] if bad else len(self.steps) - 1
        message = (f"non-finite loss at step {self.steps[row][0]}: "
                   f"{format_terms(names, values[row].tolist())}; {self.last_good_checkpoint()}")
        if self.policy == "stop":
            message += "; set trainer.on_nonfinite=skip to skip such steps"
        return FloatingPointError(message)


def check_weights_finite(named_parameters: list[tuple[str, nn.Parameter]], step: int,
                         last_good_checkpoint: str) -> None:
    """A finite loss can still come with non-finite gradients (fp32 has no GradScaler to catch
    them), so before a checkpoint can take the weights they are checked themselves: one host
    sync per checkpoint (the names are looked up only when something is wrong)."""
    finite = torch.stack([torch.isfinite(p).all() for _, p in named_parameters])
    if not finite.all():
        bad = [n for (n, _), ok in zip(named_parameters, finite.tolist()) if not ok]
        raise FloatingPointError(
            f"non-finite weights after step {step} (e.g. {bad[0]}; {len(bad)} tensors) although "
            f"every loss was finite: non-finite gradients; {last_good_checkpoint}, left as it "
            f"was; lower optimizer.lr or use trainer.precision=fp32")
