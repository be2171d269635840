"""Model zoo: one registry, one factory.

    from distill.models import create_model, list_models, model_spec

    net = create_model("resnet32x4", num_classes=100)   # CIFAR zoo (faithful to CRD/mdistiller)
    net = create_model("tv_resnet18", num_classes=10)   # any torchvision classifier, prefix tv_
    net = create_model("timm_vit_tiny_patch16_224", num_classes=10)   # any timm model, prefix timm_
    list_models("wrn_*")                                # fnmatch wildcards
    model_spec("resnet20")  # ModelSpec(stages=('layer1', 'layer2', 'layer3'), classifier='fc', ...)

Models return logits only. Intermediate features are read with forward hooks on the module names
in `model_spec(name).stages` (see `distill.features`); the pooled feature is the INPUT of the
`classifier` module (hook name ``"<classifier>:in"``).

Each factory is registered with ``MODELS.register(name, stages=..., classifier=..., input_size=...,
family=...)``. Registering never builds a model, so importing this package stays cheap.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from distill.errors import ConfigError
from distill.registry import Registry

MODELS = Registry("model")


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of the framework needs to know about a model without building it.

    stages:     module names whose OUTPUTS are the stage feature maps (shallow -> deep)
    classifier: name of the final nn.Linear; its INPUT is the pooled feature (None if there is none)
    input_size: expected input resolution (32 for the CIFAR zoo, None when any size works)
    family:     architecture family, e.g. "resnet", "wrn", "torchvision"
    stem:       where the stem's output is read (default: the first stage's input)
    preact:     the stage outputs before their final ReLU (None where not declared)
    min_input_size: the smallest input that still leaves the deepest stage one pixel (its total
                stride; None where not declared)
    fixed_input: the model takes `input_size` images only (checked before a run builds anything;
                the CIFAR zoo's 32 is what it is built for, and several of it take other sizes)
    inputs:     "images" (a (N, 3, H, W) tensor) or "tokens" (called with `input_ids` and
                `attention_mask`, distill.inputs)
    """

    stages: tuple[str, ...]
    classifier: str | None
    input_size: int | None
    family: str
    stem: str | None = None                 # the stem's output (feat[0] of the reference code)
    preact: tuple[str, ...] | None = None   # the stages' pre-activation outputs (`name:preact`)
    min_input_size: int | None = None
    fixed_input: bool = False
    inputs: str = "images"


def cifar_model(name: str, *, family: str, stages: tuple[str, ...], classifier: str,
                stem: str | None = None, preact: tuple[str, ...] | None = None) -> Callable:
    """Decorator registering a CIFAR-zoo factory `fn(num_classes=100) -> nn.Module`."""
    return MODELS.register(name, stages=tuple(stages), classifier=classifier, input_size=32,
                           family=family, stem=stem or f"{stages[0]}:in",
                           preact=tuple(preact) if preact else None)


def create_model(name: str, num_classes: int = 100, **kwargs: Any) -> nn.Module:
    """Build the registered model `name` with a `num_classes`-way classifier."""
    factory = MODELS.get(name, key="model")
    try:
        inspect.signature(factory).bind(num_classes=num_classes, **kwargs)
    except TypeError as exc:
        params = [p for p in inspect.signature(factory).parameters if p != "num_classes"]
        raise ConfigError(f"bad arguments for model '{name}': {exc}", key="model",
                          allowed=", ".join(params) or "num_classes only") from None
    return factory(num_classes=num_classes, **kwargs)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching an fnmatch `pattern`, sorted."""
    return MODELS.list(pattern)


def model_spec(name: str) -> ModelSpec:
    """The `ModelSpec` of a registered model (torchvision classifiers are found lazily)."""
    MODELS.get(name, key="model")  # unknown name -> ConfigError with close matches
    meta = dict(MODELS.meta(name))
    if meta.get("classifier") is None and callable(meta.get("resolve")):
        meta.update(meta["resolve"]())
    return ModelSpec(stages=tuple(meta.get("stages", ())), classifier=meta.get("classifier"),
                     input_size=meta.get("input_size"), family=meta.get("family", "unknown"),
                     stem=meta.get("stem"), preact=meta.get("preact"),
                     min_input_size=meta.get("min_input_size"),
                     fixed_input=bool(meta.get("fixed_input", False)),
                     inputs=meta.get("inputs", "images"))


# Importing the modules registers their models (order = nothing depends on it).
from distill.models import (  # noqa: E402,F401
    cifar_resnet,
    mobilenetv2,
    resnetv2,
    shufflenetv1,
    shufflenetv2,
    textcnn,
    timm_models,
    torchvision_models,
    vgg,
    wrn,
)

__all__ = ["MODELS", "ModelSpec", "create_model", "list_models", "model_spec", "cifar_model"]
