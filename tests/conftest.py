"""Fixtures shared by the whole suite.

`trained_zoo`: one resnet14 teacher on the default fake dataset (256/128 images), auto-trained
once per test session through the real auto-train path (a KD run with teacher.auto_train=true),
for the fake recipe's 2 epochs: a made model shorter than a run's recipe does not serve it. `zoo` gives a test its own copy at tmp_path/zoo, which is where
`make_cfg(tmp_path, ...)` points zoo.root: tests that need a trained teacher take `zoo` and
train nothing themselves.

Under pytest-xdist (`make test`: one worker per core) every worker and every command a test
starts runs torch on one thread: torch's default of one thread per core, times the workers,
oversubscribes the cores, and OpenMP's spin-waiting then burns the time the other workers need
(the suite took 35 minutes that way on 2 cores).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):   # before torch is imported: its pools read these once
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    # a test that asks for more threads (the golden traces) waits without spinning, so the
    # other workers keep their cores (the 8 traces: 12 s instead of 20 beside a busy core)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _compose import make_cfg  # noqa: E402

SHARED_TEACHER = ("fake", "resnet14")


@pytest.fixture(scope="session")
def trained_zoo(tmp_path_factory) -> Path:
    from distill.app import run

    home = tmp_path_factory.mktemp("shared-zoo")
    run(make_cfg(home, "dataset=fake", "distiller=kd", "student=resnet8", "teacher=resnet14",
                 "teacher.auto_train=true", "trainer.epochs=1",
                 "trainer.max_steps=1"))
    return home / "zoo"


@pytest.fixture
def zoo(trained_zoo: Path, tmp_path: Path) -> Path:
    """This test's copy of the shared zoo (tests publish to it and compare file times)."""
    shutil.copytree(trained_zoo, tmp_path / "zoo")
    return tmp_path / "zoo"
