"""tools/bench.py keeps working (a smoke run: tiny models, a few steps; no speed asserted)."""
import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_floor_and_trainer_measurements_run(tmp_path):
    bench = _bench_module()
    cpu = torch.device("cpu")
    assert bench.floor_images_per_sec("fitnet", "resnet14", "resnet8", 4, 2, 1, cpu) > 0
    for path in ("memory", "loader"):
        assert bench.trainer_images_per_sec("kd", "resnet14", "resnet8", 8, 4, 2, tmp_path,
                                            path, "cpu") > 0
