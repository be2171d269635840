"""Fixtures shared by the whole suite.

`trained_zoo`: one resnet14 teacher on the default fake dataset (256/128 images), auto-trained
once per test session through the real auto-train path (a KD run with teacher.auto_train=true),
for the fake recipe's 2 epochs: a made model shorter than a run's recipe does not serve it. `zoo` gives a test its own copy at tmp_path/zoo, which is where
`make_cfg(tmp_path, ...)` points zoo.root: tests that need a trained teacher take `zoo` and
train nothing themselves.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

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
