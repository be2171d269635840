"""Every torchvision classification model, registered as ``tv_<name>`` (tv_resnet18, tv_vit_b_16...).

Built with ``torchvision.models.get_model(name, weights=None, num_classes=n)``; ``pretrained=True``
loads torchvision's DEFAULT ImageNet weights (downloaded into torch's hub cache) and, when
`num_classes` differs from the checkpoint's, replaces the final Linear with a fresh one.

Registration is lazy: nothing is built at import time. `model_spec("tv_x")` finds the classifier
(the last nn.Linear) by building the model once on the meta device (no memory, no init cost).
"""
from __future__ import annotations

import functools
import warnings

import torch
import torchvision
from torch import nn

from distill.errors import ConfigError
from distill.models import MODELS

# Stage outputs we know for sure; other torchvision models get stages=() (hook by name instead).
_RESNET_LIKE = ("resnet", "resnext", "wide_resnet")
_KNOWN_STAGES = {
    "mobilenet_v2": ("features.3", "features.6", "features.13", "features.18"),
}
_CONVNEXT_STAGES = ("features.1", "features.3", "features.5", "features.7")
_REGNET_STAGES = tuple(f"trunk_output.block{i}" for i in range(1, 5))


def _static_meta(name: str) -> dict:
    if name.startswith(_RESNET_LIKE):
        return {"stages": ("layer1", "layer2", "layer3", "layer4"), "classifier": "fc"}
    if name.startswith("convnext"):
        return {"stages": _CONVNEXT_STAGES}
    if name.startswith("regnet"):
        return {"stages": _REGNET_STAGES, "classifier": "fc"}
    return {"stages": _KNOWN_STAGES.get(name, ())}


def last_linear_name(model: nn.Module) -> str | None:
    """Name of the last nn.Linear registered in `model` (its classifier), or None."""
    found = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = module_name
    return found


@functools.lru_cache(maxsize=None)
def _find_classifier(name: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model = torchvision.models.get_model(name, weights=None)
        except Exception:  # a model whose __init__ cannot run on meta: build it for real once
            model = torchvision.models.get_model(name, weights=None)
    return {"classifier": last_linear_name(model)}


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def build_torchvision(name: str, num_classes: int = 100, pretrained: bool = False) -> nn.Module:
    """torchvision.models.get_model(name) with our num_classes / pretrained conventions."""
    if not pretrained:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT")
    except Exception as exc:  # offline, proxy, corrupt download...
        raise ConfigError(
            f"pretrained weights for tv_{name} could not be downloaded ({type(exc).__name__}: "
            f"{exc})",
            key="model",
            hint=f"put the checkpoint in torch's hub cache ({torch.hub.get_dir()}/checkpoints) "
                 "or use pretrained=false",
        ) from exc
    head = _static_meta(name).get("classifier") or _find_classifier(name)["classifier"]
    if head is not None:
        old = model.get_submodule(head)
        if old.out_features != num_classes:
            _replace_module(model, head, nn.Linear(old.in_features, num_classes,
                                                   bias=old.bias is not None))
            # callers that would use the model as it is (a pretrained teacher) must know
            model.head_replaced = True
    return model


def _register(name: str) -> None:
    def factory(num_classes: int = 100, pretrained: bool = False) -> nn.Module:
        return build_torchvision(name, num_classes=num_classes, pretrained=pretrained)

    factory.__name__ = factory.__qualname__ = f"tv_{name}"
    factory.__doc__ = f"torchvision.models.{name} (weights=None unless pretrained=True)."
    meta = {"input_size": None, "family": "torchvision", **_static_meta(name)}
    meta.setdefault("classifier", None)
    if meta["classifier"] is None:
        meta["resolve"] = functools.partial(_find_classifier, name)
    MODELS.add(f"tv_{name}", factory, **meta)


for _name in torchvision.models.list_models(module=torchvision.models):
    _register(_name)
