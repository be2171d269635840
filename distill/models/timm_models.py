"""Every timm model, registered as ``timm_<name>`` (timm_resnet50, timm_mobilenetv3_small_100,
timm_vit_tiny_patch16_224, ...): any of them is a `teacher=` / `student=` option.

Built with ``timm.create_model(name, pretrained=False, num_classes=n)``: random weights, no
network; a teacher's weights come from `teacher.checkpoint` or the zoo. Models with a position
grid (vision transformers) are built with timm's `dynamic_img_size` (and `dynamic_img_pad`), so
they take the dataset's image size, e.g. 32x32 CIFAR images as a 2x2 grid of 16-pixel patches.
Models that take one input size only say so in their ModelSpec (`input_size`), and the app
checks it against the dataset's before anything is built. ``pretrained=True`` loads timm's weights from the Hugging Face cache, or
downloads them when huggingface.co answers within a few seconds; offline it stops with an error
that says where to put them, never hangs.

Registration needs only the names: they are read once per timm version from a small file in the
user's cache (importing timm costs about a second; most runs never build a timm model). The
ModelSpec comes from timm's own metadata, by building the model once on the meta device:
`feature_info` gives the stem and stage outputs (what FitNet, AT and the other feature methods
pair by default) and the deepest reduction (the smallest input that still has one pixel left),
`pretrained_cfg["classifier"]` the classifier, whose input is the pooled feature, and
`fixed_input_size` whether the model takes only its own input size.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import socket
import warnings
from pathlib import Path

import torch
from torch import nn

from distill.errors import ConfigError
from distill.models import MODELS

PREFIX = "timm_"
HUB = ("huggingface.co", 443)
HUB_TIMEOUT_S = 3.0


def timm_version() -> str | None:
    try:
        return importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        return None


def _names_file(version: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "distill" / f"timm-{version}-models.txt"


def timm_names() -> list[str]:
    """timm.list_models() of the installed timm, read from the cache file when it is there."""
    version = timm_version()
    if version is None:
        return []
    path = _names_file(version)
    try:
        names = path.read_text().split()
        if names:
            return names
    except OSError:
        pass
    import timm

    names = timm.list_models()
    try:   # written whole under a temporary name: a reader never sees half a list
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(names) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass   # a read-only home: the next process imports timm again
    return names


def _hub_reachable() -> bool:
    try:
        with socket.create_connection(HUB, timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


DYNAMIC_SIZE = {"dynamic_img_size": True, "dynamic_img_pad": True}


@functools.lru_cache(maxsize=None)
def size_kwargs(name: str) -> dict:
    """timm's options that let a model with a position grid (ViTs and kin) take any input size
    (its position embeddings interpolated to the input's grid, a padded last patch), when its
    class has them; {} for the others (CNNs take any size anyway)."""
    import timm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                timm.create_model(name, pretrained=False, **DYNAMIC_SIZE)
        except TypeError:   # its class has no such options
            return {}
        except Exception:   # another failure on the meta device: the options were taken
            pass
    return dict(DYNAMIC_SIZE)


@functools.lru_cache(maxsize=None)
def _meta_model(name: str) -> nn.Module:
    """The model built on the meta device: its structure, no memory, no init cost."""
    import timm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                return timm.create_model(name, pretrained=False)
        except Exception:   # a model whose __init__ cannot run on meta: build it for real once
            return timm.create_model(name, pretrained=False)


@functools.lru_cache(maxsize=None)
def timm_meta(name: str) -> dict:
    """The ModelSpec fields of timm's `name`, from its own metadata."""
    model = _meta_model(name)
    info = [entry["module"] for entry in getattr(model, "feature_info", []) or []]
    reductions = [entry.get("reduction") for entry in getattr(model, "feature_info", []) or []]
    stem = None
    if len(info) > 1 and reductions[0] is not None and reductions[0] <= 2:
        stem, info = info[0], info[1:]   # a CNN's stem (stride 2 at most), then its stages
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    classifier = cfg.get("classifier")
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0]
    if classifier is not None and not isinstance(_get(model, classifier), nn.Linear):
        classifier = None
    size = cfg.get("input_size")
    fixed = cfg.get("fixed_input_size") and not size_kwargs(name) and size
    return {"stages": tuple(info), "classifier": classifier, "stem": stem,
            "input_size": size[-1] if size else None, "fixed_input": bool(fixed),
            "min_input_size": max((r for r in reductions if r), default=None)}


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def build_timm(name: str, num_classes: int = 100, pretrained: bool = False) -> nn.Module:
    import timm

    kwargs = {"num_classes": num_classes, **size_kwargs(name)}
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if os.environ.get("HF_HUB_OFFLINE") != "1" and not _hub_reachable():
        # the cache only: no request that could hang (huggingface_hub reads its constant)
        import huggingface_hub.constants

        os.environ["HF_HUB_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:
        raise ConfigError(
            f"pretrained weights for {PREFIX}{name} could not be loaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})", key="model",
            hint="offline: download them where huggingface.co is reachable into the Hugging "
                 "Face cache (HF_HOME), or give the weights as teacher.checkpoint=FILE and "
                 "pretrained=false") from None


def _register(name: str) -> None:
    def factory(num_classes: int = 100, pretrained: bool = False) -> nn.Module:
        return build_timm(name, num_classes=num_classes, pretrained=pretrained)

    factory.__name__ = factory.__qualname__ = f"{PREFIX}{name}"
    factory.__doc__ = f"timm.create_model('{name}') (random weights unless pretrained=True)."
    MODELS.add(f"{PREFIX}{name}", factory, family="timm", input_size=None, classifier=None,
               resolve=functools.partial(timm_meta, name))


for _name in timm_names():
    _register(_name)
