"""`hydra/launcher=ray` (hydra-ray-launcher): a sweep's jobs as Ray tasks, on a local Ray
instance the command starts itself with 2 CPUs; its run folders equal the basic launcher's."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.models import create_model

# a local Ray instance and its worker processes: about a minute on 2 cores
pytestmark = [pytest.mark.extras, pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray is not installed (pip install -e '.[ray]')")]

REPO = Path(__file__).resolve().parents[1]
SAME = ("best_top1", "last_top1", "teacher_top1", "steps", "epochs", "world_size",
        "global_batch_size", "teachers", "models", "history")


def _sweep(tmp_path: Path, name: str, *launcher: str) -> Path:
    sweep = tmp_path / name
    args = [sys.executable, "tools/train.py", "-m", *launcher, "seed=0,1", "dataset=fake",
            "dataset.train_size=32", "dataset.val_size=16", "teacher=resnet14", "student=resnet8",
            f"teacher.checkpoint={tmp_path / 'teacher.safetensors'}", "trainer.epochs=1",
            "trainer.batch_size=16", "device=cpu", f"zoo.root={tmp_path / 'zoo'}",
            f"hydra.sweep.dir={sweep}"]
    # Ray's session folder holds UNIX sockets: a path under 108 bytes, not in tmp_path
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmp}
    try:
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return sweep


def _files(run: Path) -> set[str]:
    """The run folder's files, TensorBoard's (named by host, pid and time) by kind only."""
    return {"events.out.tfevents" if p.name.startswith("events.out.tfevents") else
            str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def test_a_ray_sweep_writes_what_the_basic_launcher_writes(tmp_path):
    torch.manual_seed(0)
    save_file(create_model("resnet14", num_classes=10).state_dict(),
              str(tmp_path / "teacher.safetensors"))
    basic = _sweep(tmp_path, "basic")
    ray = _sweep(tmp_path, "ray", "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2")
    for job in ("0", "1"):
        assert _files(ray / job) == _files(basic / job)
        summaries = [json.loads((s / job / "summary.json").read_text()) for s in (basic, ray)]
        assert {k: summaries[0][k] for k in SAME} == {k: summaries[1][k] for k in SAME}
        students = [load_file(str(s / job / "student.safetensors")) for s in (basic, ray)]
        assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])
    configs = [(ray / j / ".hydra" / "config.yaml").read_text() for j in ("0", "1")]
    assert "seed: 0" in configs[0] and "seed: 1" in configs[1]   # two jobs, not one twice
