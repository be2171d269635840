"""Determinism on CPU: the same seed gives the same losses and weights, another seed does not.

KD with a teacher, so the teacher's forward pass is on the path too. (tests/test_training.py
checks the same for vanilla training, with resume in the middle.)
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from _compose import make_cfg
from distill.app import run
from distill.models import create_model

# 64 fake images in batches of 16, two epochs: eight steps, each logged
COMMAND = ["dataset=fake", "dataset.train_size=64", "dataset.val_size=32", "distiller=kd",
           "teacher=resnet8", "student=resnet8", "trainer.epochs=2", "trainer.batch_size=16",
           "trainer.log_every=1", "device=cpu"]
# measured, so they differ between identical runs
CLOCKS = ("time", "train/images_per_sec")


# one xdist worker runs this module: its fixture trains the compared runs once
pytestmark = pytest.mark.xdist_group("determinism")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("determinism")
    torch.manual_seed(123)
    teacher = home / "teacher.safetensors"
    save_file(create_model("resnet8", num_classes=10).state_dict(), str(teacher))
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run(make_cfg(home, *COMMAND, f"teacher.checkpoint={teacher}", f"seed={seed}", run=name))

    def result(name):
        lines = (home / name / "metrics.jsonl").read_text().splitlines()
        events = [json.loads(line) for line in lines]
        values = [{k: v for k, v in e.items() if k not in CLOCKS}
                  for e in events if e["event"] in ("train", "epoch", "teacher")]
        return values, load_file(str(home / name / "student.safetensors"))
    return {name: result(name) for name in "abc"}


def test_same_seed_same_losses_and_weights(runs):
    (events_a, weights_a), (events_b, weights_b) = runs["a"], runs["b"]
    train = [e for e in events_a if e["event"] == "train"]
    assert [e["step"] for e in train] == list(range(1, 9))
    assert {"train/ce", "train/kd", "train/loss"} <= set(train[0])
    assert events_a == events_b   # every loss term, lr, val metric and the teacher's accuracy
    assert set(weights_a) == set(weights_b)
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_another_seed_gives_other_losses_and_weights(runs):
    (events_a, weights_a), (events_c, weights_c) = runs["a"], runs["c"]
    losses = [[e["train/kd"] for e in events if e["event"] == "train"]
              for events in (events_a, events_c)]
    assert losses[0] != losses[1]
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)
    # the teacher is fixed weights on a fixed validation set: the seed does not change it
    teacher = [[e for e in events if e["event"] == "teacher"] for events in (events_a, events_c)]
    assert teacher[0] == teacher[1] and teacher[0]
