"""Pure loss functions: tensors in, a scalar tensor out. No state, no config.

Each reduces to a batch mean, matching the reference code the published tables came from;
the batch-relational ones (rkd, sp, pkt, cc) average over pairs of samples within the batch.
A few helpers of a loss live beside it, tensors in and out (`perturb_logits`, the noisy-teacher
perturbation; `ensemble_probs`, several teachers' soft targets as one distribution).

One rule exports them: every public function of every module of this package is importable
from `distill.losses` (a new loss is its module; no list to extend). Two modules defining the
same public name is an error at import.
"""
import importlib
import inspect
import pkgutil

__all__: list[str] = []
for _module in pkgutil.iter_modules(__path__):
    _loaded = importlib.import_module(f"{__name__}.{_module.name}")
    for _name, _function in inspect.getmembers(_loaded, inspect.isfunction):
        if _name.startswith("_") or _function.__module__ != _loaded.__name__:
            continue
        if _name in globals():
            raise ImportError(f"distill.losses.{_module.name}.{_name} shadows another loss's name")
        globals()[_name] = _function
        __all__.append(_name)
__all__.sort()
