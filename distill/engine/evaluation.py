from __future__ import annotations

import torch
from torch import nn

from distill.inputs import call_model, to_device


class TopKAccuracy:
    """Running top-1/top-5 counts; counts are tensors so DDP can all-reduce them."""

    def __init__(self, device: torch.device, ks: tuple[int, ...] = (1, 5)):
        self.ks = ks
        self.correct = torch.zeros(len(ks), dtype=torch.long, device=device)
        self.total = torch.zeros((), dtype=torch.long, device=device)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        k_max = min(max(self.ks), logits.shape[1])
        top = logits.topk(k_max, dim=1).indices
        hits = top.eq(targets[:, None])
        for i, k in enumerate(self.ks):
            self.correct[i] += hits[:, :k].any(dim=1).sum()
        self.total += targets.numel()

    def compute(self) -> dict[str, float]:
        total = max(int(self.total), 1)
        return {f"top{k}": 100.0 * int(c) / total for k, c in zip(self.ks, self.correct)}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, reduce=None,
             autocast=None, memory_format=torch.preserve_format) -> dict[str, float]:
    """Top-1/top-5 (percent) and mean CE loss of `model` over `loader`. Restores train mode."""
    was_training = model.training
    model.eval()
    metric = TopKAccuracy(device)
    loss_sum = torch.zeros((), device=device)
    for inputs, targets in loader:
        inputs = to_device(inputs, device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        if autocast is not None:
            with autocast():
                logits = call_model(model, inputs)
        else:
            logits = call_model(model, inputs)
        loss_sum += nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        metric.update(logits, targets)
    if reduce is not None:  # sum counts over DDP ranks before dividing
        reduce(metric.correct)
        reduce(metric.total)
        reduce(loss_sum)
    model.train(was_training)
    result = metric.compute()
    result["loss"] = float(loss_sum) / max(int(metric.total), 1)
    return result
