"""`-m tune=kd`: an Optuna search through Hydra's Optuna sweeper, each trial an ordinary run,
the study in the sweep folder so the same command continues it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from distill.models import create_model
from distill.runs import read_run_dir

REPO = Path(__file__).resolve().parents[1]


def _search(tmp_path: Path, trials: int) -> None:
    args = [sys.executable, "tools/train.py", "-m", "tune=kd", f"hydra.sweeper.n_trials={trials}",
            "dataset=fake", "dataset.train_size=32", "dataset.val_size=16", "teacher=resnet14",
            "student=resnet8", f"teacher.checkpoint={tmp_path / 'teacher.safetensors'}",
            "trainer.epochs=1", "trainer.batch_size=16", "device=cpu",
            f"zoo.root={tmp_path / 'zoo'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_a_three_trial_search_runs_reports_and_continues(tmp_path):
    import optuna

    torch.manual_seed(0)
    save_file(create_model("resnet14", num_classes=10).state_dict(),
              str(tmp_path / "teacher.safetensors"))
    _search(tmp_path, 3)
    trials = sorted((tmp_path / "sweep").glob("trial-*"))
    assert len(trials) == 3
    runs = [read_run_dir(t) for t in trials]
    temperatures = {r.config["distiller"]["temperature"] for r in runs}
    assert len(temperatures) == 3 and all(1.0 <= t <= 8.0 for t in temperatures)
    storage = f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}"
    study = optuna.load_study(study_name="kd", storage=storage)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert sorted(t.value for t in study.trials) == sorted(r.summary["best_top1"] for r in runs)
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(r.summary["best_top1"] for r in runs)
    report = subprocess.run([sys.executable, "tools/report.py", str(tmp_path / "sweep")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0 and report.stdout.count("| fake | resnet14 | resnet8 | kd (") == 3
    # the same command again: the seeded sampler suggests the first trial's parameters again,
    # whose finished run is read back, not trained; the study keeps every result
    _search(tmp_path, 1)
    assert sorted((tmp_path / "sweep").glob("trial-*")) == trials
    study = optuna.load_study(study_name="kd", storage=storage)
    assert len(study.trials) == 4 and study.trials[3].params == study.trials[0].params
    assert study.trials[3].value == study.trials[0].value
