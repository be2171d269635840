"""The bit-exact resume check the method tests share: a run straight through, and the same run
cut by trainer.max_steps then resumed, on fake data (64 images in batches of 16, 2 epochs:
8 steps), end with equal weights in every trained part."""
from __future__ import annotations

from pathlib import Path

import torch

from _compose import make_cfg
from _golden import fixed_teacher
from distill.app import run
from distill.checkpoint import read_checkpoint

FAKE_RUN = ["dataset=fake", "dataset.train_size=64", "dataset.val_size=32", "student=resnet8",
            "teacher=resnet14", "trainer.batch_size=16", "trainer.log_every=1", "device=cpu",
            "zoo.publish=false", "trainer.epochs=2"]


def resumes_bit_exactly(tmp_path: Path, *overrides: str, fixed: bool = True
                        ) -> tuple[dict, dict, dict]:
    """(straight summary, resumed summary, straight checkpoint), after asserting both runs took
    the same steps and hold equal parts. `fixed`: the teacher is the fixed random resnet14."""
    args = [*FAKE_RUN, *overrides]
    if fixed:
        args.append(f"teacher.checkpoint={fixed_teacher(tmp_path)}")
    straight = run(make_cfg(tmp_path, *args, run="straight"))
    run(make_cfg(tmp_path, *args, "trainer.max_steps=3", run="resumed"))
    resumed = run(make_cfg(tmp_path, *args, run="resumed"))
    assert straight["steps"] == resumed["steps"] == 8
    a, b = (read_checkpoint(tmp_path / r / "checkpoints" / "last.pt")
            for r in ("straight", "resumed"))
    assert set(a["parts"]) == set(b["parts"])
    for role, state in a["parts"].items():
        for key, value in state.items():
            assert torch.equal(value, b["parts"][role][key]), f"{role}.{key}"
    return straight, resumed, a
