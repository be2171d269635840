"""Distillation methods: one small file each, registered in distill.method.DISTILLERS by the
name used in configs. Importing this package imports every module in it, so a new method is
its file and its YAML: no list to extend. The few modules that are no method (feature pairing,
connectors) register nothing.
"""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
