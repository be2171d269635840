import json
import re

import pytest

from _compose import make_cfg
from distill.app import run
from distill.tracking import build_trackers

FAST = ["dataset=fake", "student=resnet8", "distiller=none", "trainer.epochs=1", "trainer.log_every=2"]


def test_jsonl_and_tensorboard_get_every_term(tmp_path):
    trackers = build_trackers({"tensorboard": {"flush_secs": 1}}, tmp_path, config={"a": 1},
                              run_name="t")
    trackers.log({"train/ce": 1.5, "train/kd": 0.5}, step=1, event="train")
    trackers.log({"val/top1": 50.0}, step=2, event="epoch")
    trackers.finish({"optimizer.lr": 0.05, "distiller.name": "kd"}, {"best_top1": 50.0})
    trackers.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {**lines[0], "event": "train", "step": 1, "train/ce": 1.5, "train/kd": 0.5}
    assert lines[-1]["event"] == "summary" and lines[-1]["best_top1"] == 50.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/ce", "train/kd", "val/top1"} <= set(scalars)
    assert acc.Scalars("train/kd")[0].value == pytest.approx(0.5)


def test_training_logs_lr_throughput_and_epoch_metrics_to_tensorboard(tmp_path):
    run(make_cfg(tmp_path, *FAST, "logger=tensorboard"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/ce", "train/lr", "train/images_per_sec", "val/top1", "val/top5"} <= tags
    assert len(acc.Scalars("train/ce")) >= 4  # 8 steps, logged every 2


def test_wandb_runs_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    run(make_cfg(tmp_path, *FAST, "logger=[tensorboard,wandb]"))
    offline_runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert offline_runs, "W&B should have written an offline run under run_dir/wandb"
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))


def test_a_wandb_failure_never_stops_training(tmp_path, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("wandb is down")

    monkeypatch.setattr(wandb, "init", broken_init)
    summary = run(make_cfg(tmp_path, *FAST, "logger=wandb"))
    assert summary["epochs"] == 1
    assert (tmp_path / "run" / "summary.json").is_file()


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    """The W&B run id is in the checkpoint: a run stopped at step 4 of 8 and resumed logs into
    the same W&B run (offline: both processes write `offline-run-*-<id>` folders)."""
    import torch

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path))
    run(make_cfg(tmp_path, *FAST, "logger=wandb", "trainer.max_steps=4"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    first_id = torch.load(ckpt, weights_only=True)["trackers"]["wandb"]["id"]
    summary = run(make_cfg(tmp_path, *FAST, "logger=wandb"))
    assert summary["steps"] == 8, "the second call resumed and finished the run"
    assert torch.load(ckpt, weights_only=True)["trackers"]["wandb"]["id"] == first_id
    folders = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>, with W&B's "-1" suffix when both started within the same second
    pattern = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{first_id}(-\d+)?")
    assert len(folders) == 2 and all(pattern.fullmatch(f.name) for f in folders), folders
