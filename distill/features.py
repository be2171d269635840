"""Read intermediate features with forward hooks; models stay unmodified.

    hooks = FeatureHooks(student, ["layer1", "layer2", "layer3", "fc:in"])
    logits = student(images)
    hooks.features["layer3"]   # output of module `layer3` in this forward
    hooks.features["fc:in"]    # first positional INPUT of `fc` = the pooled feature
    hooks.remove()             # or: with FeatureHooks(...) as hooks: ...

Names are module paths from `model.named_modules()` (``""`` is the model itself). Wrappers are
looked through: DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``). Captured
tensors keep their autograd graph, so losses on them backpropagate into the model.

Caveat: a module whose output is later modified in place (e.g. a BatchNorm followed by
``ReLU(inplace=True)``) will show the modified tensor; hook the activation instead, or ask for
``name:preact``.

Pre-activation features (``name:preact``, what AB and OFD distil): for a BatchNorm, a copy of
its output taken before anything modifies it in place; for a residual block whose forward ends
in ``relu(bn_last(...) + identity)`` (the CIFAR ResNets' BasicBlock and Bottleneck, with a
``downsample`` or ``shortcut`` branch), that sum before the ReLU, assembled from hooks on its
last BatchNorm, its shortcut and its input, since the sum itself is no module's output.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from distill.errors import ConfigError, close_matches

INPUT_SUFFIX = ":in"
PREACT_SUFFIX = ":preact"
SHORTCUTS = ("downsample", "shortcut")   # the residual branch's module name in our model zoo


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP/DataParallel (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _split(name: str) -> tuple[str, bool]:
    """"fc:in" -> ("fc", True); "layer1" -> ("layer1", False); "x:preact" -> ("x", False)."""
    if name.endswith(INPUT_SUFFIX):
        return name[: -len(INPUT_SUFFIX)], True
    return name.removesuffix(PREACT_SUFFIX), False


class FeatureHooks:
    """Forward hooks on named modules; `.features` maps each requested name to its tensor.

    The dict is cleared when the (unwrapped) model's forward starts, so after a forward it holds
    exactly what that forward produced.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.names = list(dict.fromkeys(names))
        self.features: dict[str, Any] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        root = unwrap_model(model)
        modules = dict(root.named_modules())
        missing = [n for n in self.names if _split(n)[0] not in modules]
        if missing:
            wanted = _split(missing[0])[0]
            similar = close_matches(wanted, [m for m in modules if m])
            msg = f"no module named '{wanted}' in {type(root).__name__}"
            if similar:
                msg += f"; did you mean: {', '.join(similar)}?"
            raise ConfigError(msg, key="features",
                              hint="module names are those of model.named_modules(); "
                                   "add ':in' to capture a module's input")
        self._handles.append(root.register_forward_pre_hook(self._clear))
        for name in self.names:
            module_name, want_input = _split(name)
            if name.endswith(PREACT_SUFFIX):
                self._hook_preact(name, modules[module_name])
                continue
            self._handles.append(
                modules[module_name].register_forward_hook(self._capture(name, want_input)))

    def _hook_preact(self, name: str, module: nn.Module) -> None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            self._handles.append(module.register_forward_hook(
                lambda m, args, out: self.features.__setitem__(name, out.clone())))
            return
        norms = [c for c in module.children() if isinstance(c, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            raise ConfigError(f"'{name}' is neither a BatchNorm nor a residual block with one: "
                              "no pre-activation to take", key="features",
                              hint="name a BatchNorm, or a block of the CIFAR ResNets")
        shortcut = next((getattr(module, n) for n in SHORTCUTS
                         if isinstance(getattr(module, n, None), nn.Module)), None)
        parts: dict[str, torch.Tensor] = {}
        self._handles.append(module.register_forward_pre_hook(
            lambda m, args: parts.__setitem__("input", args[0])))
        self._handles.append(norms[-1].register_forward_hook(
            lambda m, args, out: parts.__setitem__("branch", out.clone())))
        if shortcut is not None:
            self._handles.append(shortcut.register_forward_hook(
                lambda m, args, out: parts.__setitem__("identity", out)))

        def assemble(m: nn.Module, args: tuple, out: Any) -> None:
            self.features[name] = parts["branch"] + parts.get("identity", parts["input"])
            parts.clear()

        self._handles.append(module.register_forward_hook(assemble))

    def _clear(self, module: nn.Module, args: Any) -> None:
        self.features.clear()

    def _capture(self, name: str, want_input: bool):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.features[name] = args[0] if want_input else output

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._handles else "removed"
        return f"FeatureHooks({self.names}, {state})"


def feature_shapes(model: nn.Module, names: Iterable[str],
                   input_shape: Sequence[int]) -> dict[str, torch.Size]:
    """Shapes of the named features for an input of `input_shape` (batch dim included).

    One dry forward in eval mode under no_grad; every module's train/eval flag is restored after.
    Use it to size connectors and check shapes before training starts.
    """
    root = unwrap_model(model)
    modes = {m: m.training for m in root.modules()}
    param = next(iter(root.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    root.eval()
    try:
        with FeatureHooks(root, names) as hooks, torch.no_grad():
            root(torch.zeros(*input_shape, device=device, dtype=dtype))
            missing = [n for n in hooks.names if n not in hooks.features]
            if missing:
                raise ConfigError(f"modules {missing} did not run in the forward pass of "
                                  f"{type(root).__name__} for input {tuple(input_shape)}",
                                  key="features")
            return {n: hooks.features[n].shape for n in hooks.names}
    finally:
        for module, was_training in modes.items():
            module.training = was_training


__all__ = ["FeatureHooks", "feature_shapes", "unwrap_model"]
