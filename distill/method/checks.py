"""What a method's options and traits are checked against before anything is built: value
rules (`require`), what every method's options must satisfy (`check_common`), and what a
method's traits rule out (`refused_features`, `cache_refusal`)."""
from __future__ import annotations

import math
from typing import Any

from distill.errors import ConfigError, unknown_name_error
from distill.method.core import Distiller
from distill.method.pieces import DataFree, TrainsOnViews
from distill.models import list_models

# What a method may say it cannot run with (Traits.unsupported), and the config key that turns
# each on: a refused combination names that key.
RUN_FEATURES = {"compile": "trainer.compile", "fp16": "trainer.precision",
                "bf16": "trainer.precision", "ddp": "world_size",
                "channels_last": "trainer.channels_last", "sync_bn": "trainer.sync_bn"}
# What a method may need of the engine (Traits.needs), and what each rules out.
NEEDS = {
    "teacher_input_grad": {},   # gradients through a teacher w.r.t. its input: runs anywhere
    # create_graph=True through the student: torch.compile does not trace a double backward,
    # and DDP's reducer does not see gradients taken by torch.autograd.grad
    "double_backward": {"compile": "torch.compile cannot trace a double backward",
                        "ddp": "DDP does not reduce gradients taken with torch.autograd.grad"},
}

# What an accepted edge value of a method's option means (the tests walk every option with 0,
# -1, a huge number, [] and text): for every method, these; a method's own are its
# registration's `edges={option: {value: meaning}}`.
OVERFLOW = "as given: a loss that overflows stops the run (trainer.on_nonfinite)"
OFF = "that loss term is off (every weight zero is refused)"
NO_INIT = "no init stage: the main stage from step one"
COMMON_EDGES = {"*_weight": {"0": OFF, "huge": OVERFLOW},
                "temperature": {"huge": OVERFLOW}}


_RULES = {">0": (lambda v: v > 0, "a positive (finite) number"),
          ">=0": (lambda v: v >= 0, "zero or a positive (finite) number"),
          "[0,1]": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
          "(0,1]": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
          "int>0": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
          "int>=0": (lambda v: isinstance(v, int) and v >= 0, "zero or a positive integer"),
          "bool": (None, "true or false")}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require(options: dict, **rules: str) -> None:
    """`require(options, temperature=">0", kd_weight=">=0")`: a ConfigError naming the first
    option given in `options` that breaks its rule. Every rule but "bool" wants a finite number."""
    for name, rule in rules.items():
        test, allowed = _RULES[rule]
        value = options.get(name)
        ok = (isinstance(value, bool) if rule == "bool"
              else _is_number(value) and math.isfinite(value) and test(value))
        if name in options and not ok:
            raise ConfigError(f"invalid value {value!r}", key=f"distiller.{name}",
                              allowed=allowed)


def require_models(options: dict, option: str, *, at_least: int, allowed: str) -> list[str]:
    """The option `option` as a list of at least `at_least` registered model names, or a
    ConfigError naming `distiller.<option>` (close matches for a misspelt name)."""
    names = options.get(option)
    if not isinstance(names, (list, tuple)) or len(names) < at_least:
        raise ConfigError(f"invalid value {names!r}", key=f"distiller.{option}", allowed=allowed)
    for name in names:
        if name not in list_models():
            raise unknown_name_error("model", name, list_models(), key=f"distiller.{option}")
    return list(names)


def check_common(cls: type[Distiller], options: dict, epochs: int) -> None:
    """What every method's options must satisfy besides its own check_values: layer options
    are null (the defaults) or name layers; not every loss weight is zero, nor every weight of
    a term on the logits (Traits.logit_weights); then its checks against the run's length."""
    for name, value in options.items():
        if name.startswith(("student_", "teacher_")) and name.endswith(("layer", "layers")) \
                and value is not None:
            names = value if isinstance(value, (list, tuple)) else [value]
            if not names or not all(isinstance(n, str) and n.strip() for n in names):
                raise ConfigError(f"invalid value {value!r}", key=f"distiller.{name}",
                                  allowed="null (the model's default layers) or module names "
                                          "of the model (an empty name or list is not a layer)")
    weights = cls.loss_term_weights(options)
    if weights and not any(w != 0 for w in weights.values()):
        raise ConfigError(f"every loss term has weight 0 ({', '.join(sorted(weights))}): the run "
                          "would train nothing", key="distiller",
                          allowed="at least one positive loss weight")
    on_logits = {k: w for k, w in weights.items() if k in cls.traits.logit_weights}
    if on_logits and not any(w != 0 for w in on_logits.values()):
        raise ConfigError(f"no loss term on the logits ({', '.join(sorted(on_logits))} have weight "
                          "0): the features train, the classifier stays at chance",
                          key="distiller", allowed="a positive weight for one of them")
    cls.check_schedule(options, epochs)


def refused_features(cls: type[Distiller]) -> dict[str, str]:
    """Every RUN_FEATURE method `cls` cannot run with -> why: its own and what its needs rule
    out."""
    refused = dict(cls.traits.unsupported)
    for need in cls.traits.needs:
        for feature, why in NEEDS[need].items():
            refused.setdefault(feature, why)
    return refused


def cache_refusal(cls: type[Distiller]) -> str | None:
    """Why `teacher.cache=views` cannot serve method `cls`, or None when it can."""
    if cls.traits.teacher_outputs_only:
        return None
    if not cls.traits.needs_teacher:
        return "has no teacher"
    if issubclass(cls, DataFree):
        return "trains on images it makes, not on views of the dataset's images"
    if issubclass(cls, TrainsOnViews):
        return "also shows its teacher other views of each image (its own augmentations)"
    if "teacher_input_grad" in cls.traits.needs:
        return "takes gradients through the teacher with respect to its input"
    return "reads its teachers' intermediate features or shows them inputs other than the batch"
