"""Runs, zoo entries and summaries that cannot lie about what they trained: one
process per run directory, resumed schedules that only grow, a summary whose top-1 is the saved
weights' own, zoo versions that never compete across data, damaged zoo files named.

Fake data: 128 training images in batches of 32, 4 steps an epoch.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from _compose import make_cfg
from distill.app import run
from distill.data import build_data
from distill.distillers.none import Vanilla
from distill.engine.evaluation import evaluate
from distill.engine.preemption import Preempted
from distill.engine.rundir import check_schedule_change
from distill.errors import ConfigError
from distill.models import create_model
from distill.teachers import split_identity
from distill.zoo import TeacherZoo, file_sha256

REPO = Path(__file__).resolve().parents[1]
BASE = ["dataset=fake", "dataset.train_size=128", "dataset.val_size=64", "distiller=none",
        "student=resnet8", "trainer.batch_size=32", "trainer.log_every=1"]


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- one process per run directory -----------------------------------------------------------
def test_a_live_run_directory_refuses_a_second_process_and_a_killed_one_leaves_no_lock(tmp_path):
    """The lock of another process (here: a stand-in that holds it like a running job) refuses
    the run before it touches a file, naming the holder's PID and host; once that process is
    killed with SIGKILL, the same command runs."""
    run_dir = tmp_path / "run"
    cfg = make_cfg(tmp_path, *BASE, "trainer.epochs=1", "zoo.publish=false")
    run(cfg)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from distill.locks import exclusive\n"
         f"with exclusive({str(run_dir / '.lock')!r}):\n print('held', flush=True); time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as err:
            run(make_cfg(tmp_path, *BASE, "trainer.epochs=2", "zoo.publish=false"))
        assert err.value.key == "run_dir"
        assert f"is in use by pid {holder.pid} on host " in err.value.message
        after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
        assert after == before, "the refused process changed the run directory"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    summary = run(make_cfg(tmp_path, *BASE, "trainer.epochs=2", "zoo.publish=false"))
    assert summary["steps"] == 8


def test_a_refused_command_never_removes_a_folder_it_did_not_make(tmp_path, monkeypatch):
    """A live run's folder holds only its lock while it prepares (data, a teacher trained on the
    way): a second command refused there, by the lock or by a bad value, removes nothing. A
    refused command removes the folders it made itself, never one that was there before."""
    monkeypatch.chdir(tmp_path)
    live = tmp_path / "outputs" / "live"
    live.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from distill.locks import exclusive\n"
         f"with exclusive({str(live / '.lock')!r}):\n print('held', flush=True); time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for bad in ([], ["trainer.batch_size=0"]):
            with pytest.raises(ConfigError):
                run(make_cfg(tmp_path, *BASE, "trainer.epochs=1", *bad, run="outputs/live"))
            assert (live / ".lock").is_file()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    mine = tmp_path / "mine" / "empty"
    mine.mkdir(parents=True)
    with pytest.raises(ConfigError):
        run(make_cfg(tmp_path, *BASE, "trainer.batch_size=0", run="mine/empty/a/run"))
    assert mine.is_dir() and not (mine / "a").exists()


# --- resumed schedules -----------------------------------------------------------------------
def _stop_at(monkeypatch, step: int) -> None:
    """SIGUSR1 during `step` (0-based): the run checkpoints that step, mid-epoch, unevaluated."""
    forward = Vanilla.forward

    def signalling_forward(self, images, targets, ctx):
        if ctx.step == step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return forward(self, images, targets, ctx)

    monkeypatch.setattr(Vanilla, "forward", signalling_forward)


def test_a_resumed_run_never_shortens_its_schedule_and_reports_the_weights_it_saves(
        tmp_path, monkeypatch):
    """A teacher run of 3 epochs stopped at step 6 (mid-epoch 2): re-run with trainer.epochs=1
    it is refused (before, it was declared finished at 1.5 epochs and published with the top-1
    of step 4); with a smaller trainer.max_steps it ends where it is, evaluating the weights
    it saves; with more epochs (multistep) it continues."""
    run_dir = tmp_path / "run"
    _stop_at(monkeypatch, 5)
    with pytest.raises(Preempted):
        run(make_cfg(tmp_path, *BASE, "trainer.epochs=3"))
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL, "a library call restores them"
    zoo = TeacherZoo(tmp_path / "zoo")

    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *BASE, "trainer.epochs=1"))
    assert err.value.key == "trainer.epochs" and "not shorten it to 1" in err.value.message
    assert zoo.find("fake", "resnet8") is None and not (run_dir / "summary.json").exists()

    summary = run(make_cfg(tmp_path, *BASE, "trainer.epochs=3", "trainer.max_steps=5"))
    assert summary["steps"] == 6 and summary["stopped_early"]
    assert summary["history"][-1]["step"] == 6, "the saved weights were never evaluated"
    data = build_data({"name": "fake", "train_size": 128, "val_size": 64, "num_classes": 10,
                       "image_size": 32, "seed": 0})
    model = create_model("resnet8", num_classes=10)
    model.load_state_dict(load_file(str(run_dir / "student.safetensors")))
    own = evaluate(model, DataLoader(data.val, batch_size=256), torch.device("cpu"))["top1"]
    assert summary["last_top1"] == pytest.approx(own)
    assert zoo.find("fake", "resnet8") is None, "a run stopped early is never published"

    summary = run(make_cfg(tmp_path, *BASE, "trainer.epochs=4"))
    assert summary["steps"] == 16 and not summary["stopped_early"]
    assert [h["step"] for h in summary["history"]] == [4, 6, 8, 12, 16]
    assert zoo.find("fake", "resnet8").meta["top1"] == summary["last_top1"]


def test_a_teacher_cut_short_on_the_way_is_never_published_from_a_shorter_schedule(
        tmp_path, monkeypatch):
    """The teacher a KD run trains on the way (as TAKD's assistants are) is stopped mid-run;
    the next command asks for fewer teacher epochs. Once that continued the cut run and
    published it as finished; a made model's length is now part of what it is, so the shorter
    request trains its own 1-epoch model in its own folder, published as 1 epoch, which the
    original command does not take: it resumes its teacher, publishes it at its full schedule,
    then distils with it."""
    kd = [*BASE, "distiller=kd", "teacher=resnet8", "teacher.auto_train=true",
          "trainer.max_steps=1"]
    _stop_at(monkeypatch, 5)
    with pytest.raises(Preempted):
        run(make_cfg(tmp_path, *kd, "teacher.auto_train_epochs=3"))
    monkeypatch.undo()
    zoo = TeacherZoo(tmp_path / "zoo")
    run(make_cfg(tmp_path, *kd, "teacher.auto_train_epochs=1", run="short"))
    short = zoo.find("fake", "resnet8")
    assert short.meta["epochs"] == 1 and short.meta["run_dir"].endswith("seed0-1epochs")
    assert zoo.find("fake", "resnet8", min_epochs=3) is None
    summary = run(make_cfg(tmp_path, *kd, "teacher.auto_train_epochs=3"))
    entry = zoo.find("fake", "resnet8", min_epochs=3)
    assert entry.meta["epochs"] == 3 and summary["teachers"][0]["sha256"] == entry.sha256
    trained = json.loads((Path(entry.meta["run_dir"]) / "summary.json").read_text())
    assert trained["steps"] > 5 and not trained["stopped_early"]   # resumed past its cut


def test_lengthening_is_refused_where_it_changes_the_steps_already_taken():
    """Multistep milestones are absolute epochs: more epochs leave every step taken as it was.
    Cosine spreads over the run's length: more epochs change the lr of steps already taken."""
    def config(epochs: int, name: str) -> dict:
        return {"trainer": {"epochs": epochs}, "distiller": {"name": "kd"},
                "scheduler": {"name": name, "milestones": [2], "gamma": 0.1,
                              "warmup_epochs": 0.0, "min_lr_ratio": 0.0}}

    check_schedule_change(config(3, "multistep"), config(5, "multistep"), steps_taken=10,
                          steps_per_epoch=4, follows_run_length=False)
    with pytest.raises(ConfigError, match="step 1 another learning rate") as err:
        check_schedule_change(config(3, "cosine"), config(5, "cosine"), steps_taken=10,
                              steps_per_epoch=4, follows_run_length=False)
    assert err.value.key == "trainer.epochs"
    with pytest.raises(ConfigError, match="follows the run's length"):
        check_schedule_change(config(3, "multistep"), config(5, "multistep"), steps_taken=10,
                              steps_per_epoch=4, follows_run_length=True)


# --- the zoo: splits and data never compete; damaged files are named -------------------------
def _weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_file(create_model("resnet8", num_classes=10).state_dict(), str(path))
    return path


def test_zoo_versions_of_different_data_never_compete(tmp_path):
    """A worse model trained on other data (a one-file subset scoring 100% once blocked the real
    teacher) is its own split's current version and never the other split's."""
    zoo = TeacherZoo(tmp_path / "zoo")
    real = {"test_fraction": 0.2, "split_seed": 0}
    other = {**real, "data_sha256": "ab" * 32}
    a, b, c = (_weights(tmp_path / f"{n}.safetensors", i) for i, n in enumerate("abc"))
    assert zoo.publish("mnist5k", "resnet8", a, {"top1": 90.0, "split": real})
    assert zoo.publish("mnist5k", "resnet8", b, {"top1": 100.0, "split": other})
    assert zoo.find("mnist5k", "resnet8", split=real).sha256 == file_sha256(a)
    assert zoo.find("mnist5k", "resnet8", split=other).sha256 == file_sha256(b)
    assert zoo.publish("mnist5k", "resnet8", c, {"top1": 95.0, "split": real})
    assert zoo.find("mnist5k", "resnet8", split=real).sha256 == file_sha256(c)
    assert zoo.find("mnist5k", "resnet8", split=other).sha256 == file_sha256(b)
    assert zoo.find("mnist5k", "resnet8", split={**real, "split_seed": 1}) is None
    assert zoo.other_splits("mnist5k", "resnet8", real) == [other]


def test_a_current_pointer_from_before_splits_still_names_its_version(tmp_path):
    zoo = TeacherZoo(tmp_path / "zoo")
    split = {"test_fraction": 0.2}
    a, b = _weights(tmp_path / "a.safetensors", 0), _weights(tmp_path / "b.safetensors", 1)
    zoo.publish("d", "m", a, {"top1": 50.0, "split": split})
    zoo.publish("d", "m", b, {"top1": 60.0, "split": split})
    (zoo.entry_dir("d", "m") / "current.json").write_text(json.dumps({"sha256": file_sha256(a)}))
    assert zoo.find("d", "m", split=split).sha256 == file_sha256(a)


def _image_folder(root: Path, colours: dict[str, int]) -> Path:
    """train/ and val/ with 8 and 4 tiny PNGs per class, of each class's grey level."""
    for split, count in (("train", 8), ("val", 4)):
        for name, grey in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (12, 12), (grey + i, grey, grey)).save(folder / f"{i}.png")
    return root


def test_a_teacher_trained_on_one_image_folder_never_teaches_another(tmp_path):
    """dataset=folder recorded only its options: a teacher trained on one folder was taken for
    another. Now the data digest is part of its identity; the same images elsewhere still match."""
    first = _image_folder(tmp_path / "first", {"a": 10, "b": 200})
    second = _image_folder(tmp_path / "second", {"a": 20, "b": 220})
    common = ["dataset=folder", "dataset.image_size=32", "trainer.batch_size=8",
              "student=resnet8", "teacher=resnet8", "trainer.epochs=1"]
    run(make_cfg(tmp_path, *common, f"dataset.root={first}", "distiller=none", run="teacher"))
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *common, f"dataset.root={second}", "distiller=kd", run="kd2"))
    assert err.value.key == "teacher" and "trained on other data" in err.value.message
    assert not (tmp_path / "kd2").exists(), "a refused run left its folder"
    # the teacher's run resumed on changed data (images swapped between the classes) would
    # publish weights of the old data under the new data's digest: refused
    swap = first / "train" / "swap"
    os.rename(first / "train" / "a", swap)
    os.rename(first / "train" / "b", first / "train" / "a")
    os.rename(swap, first / "train" / "b")
    with pytest.raises(ConfigError, match="the data changed since this run started") as err:
        run(make_cfg(tmp_path, *common, f"dataset.root={first}", "distiller=none", run="teacher"))
    assert err.value.key == "dataset.root"
    os.rename(first / "train" / "a", swap)
    os.rename(first / "train" / "b", first / "train" / "a")
    os.rename(swap, first / "train" / "b")
    moved = tmp_path / "moved"
    os.rename(first, moved)   # the same images in another place are the same data
    summary = run(make_cfg(tmp_path, *common, f"dataset.root={moved}", "distiller=kd",
                           "trainer.max_steps=1", run="kd1"))
    entry = TeacherZoo(tmp_path / "zoo").find_digest("folder", summary["teachers"][0]["sha256"])
    assert entry.meta["split"] == split_identity({"image_size": 32},
                                                 entry.meta["split"]["data_sha256"])


def test_a_damaged_zoo_meta_is_named_before_anything_trains(tmp_path):
    """At lookup (a KD run) and before a teacher run that would publish to it: one error naming
    the file, before any step."""
    zoo = TeacherZoo(tmp_path / "zoo")
    zoo.publish("fake", "resnet8", _weights(tmp_path / "t.safetensors", 0), {"top1": 10.0})
    (meta,) = zoo.entry_dir("fake", "resnet8").glob("*/meta.json")
    meta.write_text('{"top1": 10.0, "sha256": ')
    for method, run_name in (("kd", "kd"), ("none", "teacher")):
        with pytest.raises(ConfigError) as err:
            run(make_cfg(tmp_path, *BASE, f"distiller={method}", "teacher=resnet8",
                         "trainer.epochs=1", run=run_name))
        assert err.value.key == "zoo.root" and str(meta) in err.value.message
        assert not (tmp_path / run_name).exists()
    meta.write_text(json.dumps({"top1": "high"}))
    with pytest.raises(ConfigError, match="'top1' is 'high'"):
        zoo.find("fake", "resnet8")
