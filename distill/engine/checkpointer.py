"""A run's training state on disk: every trained part by role, every optimizer and schedule by
name, the grad scaler, the run state, RNG states, tracker ids, the config and the teachers'
digests (format 2, distill.checkpoint), written by rank 0 to checkpoints/last.pt."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from distill.checkpoint import FORMAT, atomic_torch_save, rng_state, set_rng_state
from distill.engine.nonfinite import check_weights_finite
from distill.method import Distiller

log = logging.getLogger("distill")


class Checkpointer:
    def __init__(self, run_dir: Path, *, main: bool):
        self.path = Path(run_dir) / "checkpoints" / "last.pt"
        self.main = main
        self.step: int | None = None    # the step of last.pt, when known

    def last_good(self) -> str:
        if self.step is None:
            return "no checkpoint was written before it"
        return f"the last good checkpoint is {self.path} (step {self.step})"

    def save(self, distiller: Distiller, optimizers: dict, schedulers: dict,
             scaler: torch.amp.GradScaler, *, state: dict, trackers: dict, config: dict,
             teachers: list[dict], step: int, averages: dict | None = None,
             exported: dict | None = None) -> None:
        """On every rank (their weights are the same): the weights are checked finite first;
        rank 0 writes."""
        named = [(f"{role}.{n}", p) for role, module in distiller.trained_parts().items()
                 for n, p in module.named_parameters()]
        check_weights_finite(named, step, self.last_good())
        self.step = step
        if not self.main:
            return
        atomic_torch_save({
            "format": FORMAT,
            "parts": {role: module.state_dict()
                      for role, module in distiller.trained_parts().items()},
            "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
            "schedulers": {name: s.state_dict() for name, s in schedulers.items()},
            "scaler": scaler.state_dict(),
            "state": state,
            "rng": rng_state(),
            "trackers": trackers,
            "config": config,
            "teachers": teachers,
            **({"averages": averages} if averages else {}),   # trainer.ema_decay's model
            # what student.safetensors holds ({role, arch}): a checkpoint given as a teacher
            **({"exported": exported} if exported else {}),
        }, self.path)

    def restore(self, ckpt: dict[str, Any], distiller: Distiller, optimizers: dict,
                schedulers: dict, scaler: torch.amp.GradScaler) -> dict:
        """Load everything but the run state, which is returned; the RNG states last."""
        trained = distiller.trained_parts()
        if set(ckpt["parts"]) != set(trained):
            raise RuntimeError(f"the checkpoint holds parts {sorted(ckpt['parts'])}, this "
                               f"method has {sorted(trained)}")
        for role, module in trained.items():
            module.load_state_dict(ckpt["parts"][role])
        for kind, mine, saved in (("optimizers", optimizers, ckpt["optimizers"]),
                                  ("schedulers", schedulers, ckpt["schedulers"])):
            if set(mine) != set(saved):
                raise RuntimeError(f"the checkpoint holds {kind} {sorted(saved)}, this method "
                                   f"has {sorted(mine)}")
            for name, item in mine.items():
                item.load_state_dict(saved[name])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.step = ckpt["state"]["global_step"]
        return ckpt["state"]
