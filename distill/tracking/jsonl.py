from __future__ import annotations

import json
import time
from pathlib import Path

from distill.tracking.base import Tracker


class JsonlTracker(Tracker):
    """`metrics.jsonl`: one JSON object per event, appended and flushed, so a crash loses nothing
    already logged and plain tools (jq, pandas.read_json(lines=True)) can read a live run."""

    name = "jsonl"

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()

    def log(self, metrics, *, step, event):
        self._write({"event": event, "step": step, "time": round(time.time(), 3), **metrics})

    def finish(self, hparams, summary):
        self._write({"event": "summary", "time": round(time.time(), 3), **summary})

    def close(self):
        if not self._file.closed:
            self._file.close()
