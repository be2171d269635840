"""`-m tune=kd`: an Optuna search through Hydra's Optuna sweeper, each trial an ordinary run,
the study in the sweep folder so the same command continues it."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from distill.models import create_model
from distill.runs import read_run_dir

pytestmark = [pytest.mark.extras, pytest.mark.skipif(
    importlib.util.find_spec("optuna") is None,
    reason="Optuna is not installed (pip install -e '.[tune]')")]

REPO = Path(__file__).resolve().parents[1]


def _search_args(tmp_path: Path, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "tools/train.py", "-m", "tune=kd", f"hydra.sweeper.n_trials={trials}",
            "dataset=fake", "dataset.train_size=32", "dataset.val_size=16", "teacher=resnet14",
            "student=resnet8", f"teacher.checkpoint={tmp_path / 'teacher.safetensors'}",
            "trainer.epochs=1", "trainer.batch_size=16", "device=cpu",
            f"zoo.root={tmp_path / 'zoo'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _search(tmp_path: Path, trials: int, *extra: str) -> str:
    proc = subprocess.run(_search_args(tmp_path, trials, *extra), cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _teacher(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_file(create_model("resnet14", num_classes=10).state_dict(),
              str(tmp_path / "teacher.safetensors"))


def _study(tmp_path: Path):
    import optuna

    return optuna.load_study(study_name="kd", storage=f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}")


@pytest.mark.slow   # three subprocess trials: about 40 s
def test_a_three_trial_search_runs_reports_and_continues(tmp_path):
    import optuna

    _teacher(tmp_path)
    _search(tmp_path, 3)
    trials = sorted((tmp_path / "sweep").glob("trial-*"))
    assert len(trials) == 3
    runs = [read_run_dir(t) for t in trials]
    temperatures = {r.config["distiller"]["temperature"] for r in runs}
    assert len(temperatures) == 3 and all(1.0 <= t <= 8.0 for t in temperatures)
    study = _study(tmp_path)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert sorted(t.value for t in study.trials) == sorted(r.summary["best_top1"] for r in runs)
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(r.summary["best_top1"] for r in runs)
    report = subprocess.run([sys.executable, "tools/report.py", str(tmp_path / "sweep")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0 and report.stdout.count("| fake | resnet14 | resnet8 | kd (") == 3
    # The same command again goes on: two new points, each trained in its own new folder, and
    # no replay of the first command's seeded start-up draws (before: the 2 "new" trials were
    # trials 0 and 1 again, read back from their folders and counted twice by the sampler).
    _search(tmp_path, 2)
    after = sorted((tmp_path / "sweep").glob("trial-*"))
    assert len(after) == 5 and set(trials) < set(after)
    study = _study(tmp_path)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 5
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 5
    new_runs = [read_run_dir(t) for t in sorted(set(after) - set(trials))]
    assert sorted(t.value for t in study.trials[3:]) == sorted(r.summary["best_top1"]
                                                             for r in new_runs)


def test_each_command_draws_its_own_seeded_points():
    from hydra_plugins.distill_sweeper._continuing import command_seed

    seeds = [command_seed(0, n) for n in range(4)] + [command_seed(1, 0)]
    assert len(set(seeds)) == 5 and command_seed(0, 3) == seeds[3]


@pytest.mark.slow   # a sweep of subprocess trials: 25-30 s
def test_a_suggestion_equal_to_a_finished_trial_is_not_run_or_counted(tmp_path):
    """A two-point space: the third trial can only replay; it is recorded as FAIL (replay_of),
    not as a new COMPLETE trial, and the search stops saying the space is used up."""
    import optuna

    _teacher(tmp_path)
    out = _search(tmp_path, 3, "hydra.sweeper.params={distiller.temperature:'choice(2.0,4.0)',"
                  "distiller.kd_weight:'choice(0.5)',distiller.ce_weight:'choice(0.5)'}")
    study = _study(tmp_path)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sorted(t.params["distiller.temperature"] for t in complete) == [2.0, 4.0]
    replays = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert replays and all("replay_of" in t.user_attrs for t in replays)
    assert len(list((tmp_path / "sweep").glob("trial-*"))) == 2
    assert "search space looks used up" in out


@pytest.mark.slow   # a sweep of subprocess trials: 25-30 s
def test_a_trial_stopped_by_sigterm_resumes_as_the_same_trial(tmp_path):
    """SIGTERM mid-trial: the sweep exits 75 with the trial RUNNING (not left there for good:
    the same command runs it first, its run resumes from the checkpoint, the result is told to
    that trial) and then spends its budget on a new point."""
    import optuna

    _teacher(tmp_path)
    slow = ("dataset.train_size=256", "trainer.log_every=1", "logger=jsonl",
            "trainer.progress=false")
    args = _search_args(tmp_path, 1, *slow)
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        events = [p for p in (tmp_path / "sweep").glob("trial-*/metrics.jsonl")
                  if p.read_text().count('"event": "train"') >= 2]
        if events:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    assert proc.wait(timeout=120) == 75, log.read_text()[-3000:]
    study = _study(tmp_path)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.RUNNING]
    stopped = study.trials[0]

    out = _search(tmp_path, 1, *slow)
    assert f"Trial {stopped.number} stopped before it finished" in out
    study = _study(tmp_path)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert study.trials[0].params == stopped.params
    folders = sorted((tmp_path / "sweep").glob("trial-*"))
    assert len(folders) == 2
    resumed = next(f for f in folders if read_run_dir(f).config["distiller"]["temperature"]
                   == stopped.params["distiller.temperature"])
    assert "resum" in (resumed / "train.log").read_text().lower()
    assert study.trials[0].value == read_run_dir(resumed).summary["best_top1"]
