from __future__ import annotations

from pathlib import Path

from distill.tracking import TRACKERS
from distill.tracking.base import Tracker


@TRACKERS.register("tensorboard")
class TensorBoardTracker(Tracker):
    """Event files in the run directory; hparams with the final metrics at the end."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, *, config: dict, run_name: str, resume_state=None,
                 flush_secs: int = 30):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step on resume drops events past the resumed step, so curves are not duplicated
        purge = resume_state.get("step") if resume_state else None
        self.writer = SummaryWriter(log_dir=str(run_dir), flush_secs=flush_secs, purge_step=purge)

    def log(self, metrics, *, step, event):
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)

    def finish(self, hparams, summary):
        scalars = {f"hparam/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                 for k, v in hparams.items()}
        self.writer.add_hparams(clean, scalars, run_name=".")
        self.writer.flush()

    def close(self):
        self.writer.close()
