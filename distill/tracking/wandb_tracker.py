from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path

from distill.tracking import TRACKERS
from distill.tracking.base import Tracker

log = logging.getLogger(__name__)


def _online_possible(host: str = "api.wandb.ai", timeout: float = 2.0) -> bool:
    if not os.environ.get("WANDB_API_KEY") and not (Path.home() / ".netrc").exists():
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@TRACKERS.register("wandb")
class WandbTracker(Tracker):
    """Weights & Biases. Offline (files under run_dir/wandb, `wandb sync` later) when there is
    no key or no network. Any W&B failure is logged once and disables W&B: it must never stop
    a training run."""

    name = "wandb"

    def __init__(self, run_dir: Path, *, config: dict, run_name: str, resume_state=None,
                 project: str = "distill", entity: str | None = None, mode: str = "auto",
                 tags: list | None = None):
        self.run = None
        try:
            import wandb

            if mode == "auto":
                mode = "online" if _online_possible() else "offline"
            run_id = (resume_state or {}).get("id") or uuid.uuid4().hex[:8]
            self.run = wandb.init(project=project, entity=entity, name=run_name, id=run_id,
                                  resume="allow", dir=str(run_dir), config=config, mode=mode,
                                  tags=list(tags or []), settings=wandb.Settings(silent=True))
        except Exception as exc:  # noqa: BLE001 - tracking must not stop training
            self._disable(exc)

    def _disable(self, exc: Exception) -> None:
        log.warning("W&B disabled after an error (training continues): %s", exc)
        self.run = None

    def log(self, metrics, *, step, event):
        if self.run is None:
            return
        try:
            self.run.log(dict(metrics), step=step)
        except Exception as exc:  # noqa: BLE001
            self._disable(exc)

    def finish(self, hparams, summary):
        if self.run is None:
            return
        try:
            self.run.summary.update(dict(summary))
        except Exception as exc:  # noqa: BLE001
            self._disable(exc)

    def close(self):
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as exc:  # noqa: BLE001
                self._disable(exc)

    def resume_state(self):
        return {"id": self.run.id} if self.run is not None else None
