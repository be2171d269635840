"""tools/bench.py keeps working (a smoke run: tiny models, a few steps; no speed asserted)."""
import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow   # the benchmark's own timed runs
def test_floor_and_trainer_measurements_run(tmp_path):
    bench = _bench_module()
    cpu = torch.device("cpu")
    assert bench.floor_images_per_sec("fitnet", "resnet14", "resnet8", 4, 2, 1, cpu) > 0
    for path in ("memory", "loader"):
        assert bench.trainer_images_per_sec("kd", "resnet14", "resnet8", 8, 4, 2, tmp_path,
                                            path, "cpu") > 0


def test_a_non_finite_loss_while_timing_is_a_one_screen_error(tmp_path, monkeypatch, capsys):
    bench = _bench_module()
    monkeypatch.setattr(bench, "floor_images_per_sec", lambda *a, **k: 1.0)

    def diverging(*args, **kwargs):   # what the trainer raises (trainer.on_nonfinite=stop)
        raise FloatingPointError("non-finite loss at step 3: ce=nan; the last good checkpoint is "
                                 "/tmp/x/run/checkpoints/last.pt (step 2); set ...")
    monkeypatch.setattr(bench, "trainer_images_per_sec", diverging)
    out = tmp_path / "bench.md"
    code = bench.main(["--methods", "cc", "--batches", "8", "--repeats", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 3 and not out.exists()
    assert err.startswith("error: cc, batch 8: non-finite loss at step 3") and "Traceback" not in err
    assert "checkpoint" not in err and "--methods" in err   # no advice about a deleted temp run
