"""`hydra/sweeper=distill_optuna`: Hydra's Optuna sweeper, made to continue a stored study.

configs/tune/*.yaml choose it. Hydra only instantiates sweepers that live under the
`hydra_plugins` namespace, so this module is a thin plugin: its config (Optuna's, with the
sampler left as a config so each command can seed it) and its class. The search loop is in
`_continuing.py`, imported when a sweep starts (Hydra imports every plugin module on every start).
"""
# no `from __future__ import annotations`: Hydra runs this module before it is in sys.modules,
# where dataclasses cannot resolve string annotations
from dataclasses import dataclass
from typing import Any, List

from hydra.core.config_store import ConfigStore

try:
    from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:   # the `tune` extra is not installed: there is no search to offer
    OptunaSweeper = None

if OptunaSweeper is not None:
    class ContinuingOptunaSweeper(OptunaSweeper):
        """The Optuna sweeper with the same options; the same command again goes on with the
        study (`_continuing.py` says how)."""

        def __init__(self, **options: Any) -> None:
            from ._continuing import ContinuingSweep

            self.sweeper = ContinuingSweep(**options)

        def sweep(self, arguments: List[str]) -> None:
            return self.sweeper.sweep(arguments)

    @dataclass
    class ContinuingOptunaSweeperConf(OptunaSweeperConf):
        _target_: str = f"{__name__}.ContinuingOptunaSweeper"
        # the sampler reaches the sweeper as its config: it is built per command, with a seed
        # drawn from the configured one and the study's trial count
        _recursive_: bool = False

    ConfigStore.instance().store(group="hydra/sweeper", name="distill_optuna",
                                 node=ContinuingOptunaSweeperConf, provider="distill")
