from __future__ import annotations

from typing import Any, Mapping


class Tracker:
    """One logging backend. `log` gets scalars for one event; `finish` the hparams and summary."""

    name = "tracker"

    def log(self, metrics: Mapping[str, float], *, step: int, event: str) -> None:
        raise NotImplementedError

    def finish(self, hparams: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def resume_state(self) -> dict | None:
        """What a resumed run needs to continue this backend (e.g. the W&B run id)."""
        return None


class Trackers(Tracker):
    """Fan-out to several trackers (an empty one on non-zero ranks)."""

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers = trackers or []

    def log(self, metrics, *, step, event):
        for t in self.trackers:
            t.log(metrics, step=step, event=event)

    def finish(self, hparams, summary):
        for t in self.trackers:
            t.finish(hparams, summary)

    def close(self):
        for t in self.trackers:
            t.close()

    def resume_states(self) -> dict[str, dict]:
        return {t.name: s for t in self.trackers if (s := t.resume_state()) is not None}
