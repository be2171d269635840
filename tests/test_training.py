"""End-to-end runs through `distill.app.run`, the function tools/train.py calls."""
import json

import pytest
import torch
from safetensors.torch import load_file

from _compose import make_cfg
from distill.app import run
from distill.errors import ConfigError
from distill.zoo import TeacherZoo

FAST = ["dataset=fake", "student=resnet8", "teacher=resnet14", "trainer.epochs=1"]


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_none_run_writes_the_run_directory_contract(tmp_path):
    cfg = make_cfg(tmp_path, *FAST, "distiller=none", "trainer.epochs=2", "logger=tensorboard")
    summary = run(cfg)
    run_dir = tmp_path / "run"
    on_disk = json.loads((run_dir / "summary.json").read_text())
    for key in ("best_top1", "last_top1", "teacher_top1", "train_images_per_sec", "world_size",
                "epochs", "wall_seconds"):
        assert key in on_disk
    assert on_disk["epochs"] == 2 and on_disk["world_size"] == 1 and on_disk["teacher_top1"] is None
    assert on_disk["train_images_per_sec"] > 0
    assert summary["best_top1"] == on_disk["best_top1"] >= on_disk["last_top1"] - 1e-9
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    events = _jsonl(run_dir / "metrics.jsonl")
    assert {e["event"] for e in events} >= {"train", "epoch", "summary"}
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    weights = load_file(str(run_dir / "student.safetensors"))
    assert weights["fc.weight"].shape == (10, 64)
    # a vanilla run publishes itself to the zoo, as teachers are made this way
    entry = TeacherZoo(tmp_path / "zoo").find("fake", "resnet8")
    assert entry is not None and entry.meta["top1"] == on_disk["last_top1"]


def test_vanilla_learns_fake_data(tmp_path):
    summary = run(make_cfg(tmp_path, *FAST, "distiller=none", "trainer.epochs=3"))
    assert summary["best_top1"] > 50.0  # 10 classes: chance is 10%


def test_kd_with_auto_trained_teacher_and_teacher_top1(tmp_path):
    cfg = make_cfg(tmp_path, *FAST, "distiller=kd", "teacher.auto_train=true",
                   "teacher.auto_train_epochs=2")
    summary = run(cfg)
    zoo = TeacherZoo(tmp_path / "zoo")
    entry = zoo.find("fake", "resnet14")
    assert entry is not None and entry.meta["epochs"] == 2
    assert summary["teacher_top1"] == pytest.approx(entry.meta["top1"])
    events = _jsonl(tmp_path / "run" / "metrics.jsonl")
    assert any(e["event"] == "teacher" for e in events)
    train = [e for e in events if e["event"] == "train"]
    assert train and {"train/ce", "train/kd", "train/loss", "train/lr"} <= set(train[0])
    # the second run finds the teacher in the zoo and does not retrain it
    mtime = entry.weights.stat().st_mtime_ns
    run(make_cfg(tmp_path, *FAST, "distiller=kd", "seed=1", run="run2"))
    assert entry.weights.stat().st_mtime_ns == mtime


def test_missing_teacher_names_the_command_that_trains_it(tmp_path):
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *FAST, "distiller=kd"))
    text = str(err.value)
    assert "distiller=none" in text and "student=resnet14" in text and "dataset=fake" in text
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_digits_short_run(tmp_path):
    summary = run(make_cfg(tmp_path, "dataset=digits", "student=resnet8", "distiller=none",
                           "trainer.epochs=1", "trainer.max_steps=8"))
    assert summary["steps"] == 8


def test_same_seed_same_weights_and_resume_is_exact(tmp_path):
    """Two epochs straight == one epoch, then the same command with epochs=2 resuming."""
    straight = make_cfg(tmp_path, *FAST, "distiller=none", "trainer.epochs=2", run="straight")
    run(straight)
    first = make_cfg(tmp_path, *FAST, "distiller=none", "trainer.epochs=1", run="resumed")
    run(first)
    resumed = make_cfg(tmp_path, *FAST, "distiller=none", "trainer.epochs=2", run="resumed")
    summary = run(resumed)
    assert summary["epochs"] == 2 and len(summary["history"]) == 2
    a = load_file(str(tmp_path / "straight" / "student.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    other_seed = make_cfg(tmp_path, *FAST, "distiller=none", "trainer.epochs=2", "seed=5", run="s5")
    run(other_seed)
    c = load_file(str(tmp_path / "s5" / "student.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_refuses_a_different_experiment_in_the_same_directory(tmp_path):
    run(make_cfg(tmp_path, *FAST, "distiller=none"))
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *FAST, "distiller=none", "optimizer.lr=0.01"))
    assert "optimizer.lr" in str(err.value)


def test_zoo_keeps_the_better_model(tmp_path):
    zoo = TeacherZoo(tmp_path / "zoo")
    w = tmp_path / "w.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(w))
    assert zoo.publish("d", "m", w, {"top1": 80.0})
    assert not zoo.publish("d", "m", w, {"top1": 70.0})
    assert zoo.find("d", "m").meta["top1"] == 80.0
    assert zoo.publish("d", "m", w, {"top1": 90.0})
    assert [(d, m) for d, m, _ in zoo.list()] == [("d", "m")]


METHOD_TERM = {"kd": "kd", "dkd": "dkd", "fitnet": "hint", "at": "at", "rkd": "rkd",
               "takd": "kd", "noisy_kd": "kd"}


@pytest.mark.parametrize("method", sorted(METHOD_TERM))
def test_distillers_train_end_to_end_on_digits(tmp_path, method):
    extra = ["distiller.assistants=[resnet8]"] if method == "takd" else []
    cfg = make_cfg(tmp_path, "dataset=digits", "student=resnet8", "teacher=resnet14",
                   f"distiller={method}", "teacher.auto_train=true", "teacher.auto_train_epochs=1",
                   "trainer.epochs=1", "trainer.max_steps=6", "trainer.log_every=3", *extra)
    summary = run(cfg)
    assert summary["steps"] == 6 and summary["teacher_top1"] is not None
    train = [e for e in _jsonl(tmp_path / "run" / "metrics.jsonl") if e["event"] == "train"]
    assert f"train/{METHOD_TERM[method]}" in train[-1] and "train/ce" in train[-1]


def test_takd_trains_its_assistant_once_and_later_runs_reuse_it(tmp_path):
    chain = ["distiller=takd", "distiller.assistants=[resnet8x4]", "teacher.auto_train=true",
             "teacher.auto_train_epochs=1"]
    first = run(make_cfg(tmp_path, *chain, *FAST, run="first"))
    zoo = TeacherZoo(tmp_path / "zoo")
    (name,) = [m for _, m, _ in zoo.list() if m.startswith("resnet8x4@kd-resnet14.")]
    entry = zoo.find("fake", name)
    assert entry.meta["distilled_from"] == "resnet14"
    assert entry.meta["teacher_weights"] == str(zoo.find("fake", "resnet14").weights)
    assert entry.meta["kd"] == {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0}
    # the student's teacher is the assistant, not the root teacher
    assert first["teacher_top1"] == pytest.approx(entry.meta["top1"])
    assistant_runs = tmp_path / "zoo" / "runs" / "fake" / name
    assert [p.name for p in assistant_runs.iterdir()] == ["seed0"]
    mtime = entry.weights.stat().st_mtime_ns
    run(make_cfg(tmp_path, *chain, *FAST, "seed=1", "student=resnet14", run="second"))
    assert entry.weights.stat().st_mtime_ns == mtime
    assert [p.name for p in assistant_runs.iterdir()] == ["seed0"], "the assistant was retrained"
    # a longer chain reuses the cached first link and adds the second
    run(make_cfg(tmp_path, *FAST, "distiller=takd", "distiller.assistants=[resnet8x4,resnet14]",
                 run="third"))
    assert entry.weights.stat().st_mtime_ns == mtime
    assert [m for _, m, _ in zoo.list() if m.startswith("resnet14@kd-resnet8x4.")]
    # other KD options make another link, never a stale cache hit
    run(make_cfg(tmp_path, *chain, *FAST, "distiller.temperature=2.0", run="fourth"))
    assert len([m for _, m, _ in zoo.list() if m.startswith("resnet8x4@kd-resnet14.")]) == 2


def test_bad_layers_stop_the_run_before_a_teacher_is_trained_for_it(tmp_path):
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *FAST, "distiller=fitnet", "teacher.auto_train=true",
                     "distiller.student_layer=layer3", "distiller.teacher_layer=layer1"))
    assert err.value.key == "distiller.student_layer"
    assert not (tmp_path / "zoo").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_the_dataloader_path_in_contiguous_format_trains_too(tmp_path):
    summary = run(make_cfg(tmp_path, *FAST, "distiller=none", "trainer.data_path=loader",
                           "trainer.channels_last=false", "trainer.epochs=3"))
    assert summary["best_top1"] > 50.0   # 10 classes: chance is 10%


def test_runs_recorded_before_a_config_key_existed_still_resume(tmp_path):
    """A checkpoint whose config lacks keys added later (here trainer.sync_bn and
    trainer.channels_last) ran with their defaults: resuming it is not a different experiment."""
    cfg = make_cfg(tmp_path, *FAST, "distiller=none", "trainer.max_steps=2")
    run(cfg)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    for key in ("sync_bn", "channels_last"):
        del ckpt["config"]["trainer"][key]
    torch.save(ckpt, path)
    summary = run(make_cfg(tmp_path, *FAST, "distiller=none"))
    assert summary["steps"] == 8 and not summary["stopped_early"]
    with pytest.raises(ConfigError, match="trainer.sync_bn"):   # a non-default value is a change
        run(make_cfg(tmp_path, *FAST, "distiller=none", "trainer.epochs=2", "trainer.sync_bn=true"))


def test_compiled_student_and_teacher_train_like_eager_ones(tmp_path):
    """trainer.compile=both (dynamo's `eager` backend here: the graph capture without inductor's
    minute of C++ compiling) keeps FitNet's hooks, connector and checkpoints working, and gives
    the weights of the uncompiled run."""
    base = [*FAST, "distiller=fitnet", "teacher.auto_train=true", "teacher.auto_train_epochs=1",
            "trainer.max_steps=3"]
    import torch._dynamo

    plain = run(make_cfg(tmp_path, *base, run="plain"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = run(make_cfg(tmp_path, *base, "trainer.compile=both",
                            "trainer.compile_backend=eager", run="compiled"))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2   # student and teacher
    assert not torch._dynamo.utils.counters["graph_break"], "the feature hooks broke the graph"
    assert compiled["steps"] == plain["steps"] == 3
    a = load_file(str(tmp_path / "plain" / "student.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "student.safetensors"))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_rkd_survives_a_last_batch_of_one(tmp_path):
    """256 fake images in batches of 51 leave one image for the epoch's last step."""
    summary = run(make_cfg(tmp_path, *FAST, "distiller=rkd", "teacher.auto_train=true",
                           "teacher.auto_train_epochs=1", "trainer.batch_size=51"))
    assert summary["steps"] == 6 and summary["epochs"] == 1


def test_connectors_are_checkpointed_and_resume_exactly(tmp_path):
    """FitNet's regressor is trained, saved with the student and restored on resume: a run
    stopped after 3 steps and resumed ends where a straight run ends."""
    base = [*FAST, "distiller=fitnet", "teacher.auto_train=true", "teacher.auto_train_epochs=1"]
    straight = run(make_cfg(tmp_path, *base, run="straight"))
    run(make_cfg(tmp_path, *base, "trainer.max_steps=3", run="resumed"))
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["connectors"] and all(k.startswith("connector.") for k in ckpt["connectors"])
    assert sum(v.numel() for k, v in ckpt["connectors"].items()
               if "running" not in k and "num_batches" not in k) == straight["connector_params"]
    run(make_cfg(tmp_path, *base, run="resumed"))
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    for part in ("student", "connectors"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@pytest.mark.slow
def test_demo_setting_kd_beats_vanilla(tmp_path):
    """The claim `make demo` shows: with 5% of digits, KD from a resnet32 teacher trained on all
    of it beats the same student trained on labels alone (about 5 minutes on 2 cores)."""
    vanilla = run(make_cfg(tmp_path, "experiment=demo", "distiller=none", run="none"))
    kd = run(make_cfg(tmp_path, "experiment=demo", "distiller=kd", run="kd"))
    assert kd["teacher_top1"] > 95.0
    assert kd["last_top1"] > vanilla["last_top1"]


def test_resume_mid_epoch_after_max_steps_is_exact(tmp_path):
    """A smoke run stopped mid-epoch by trainer.max_steps, then the real command in the same
    directory, ends with the same weights as one uninterrupted run (fake data: 8 steps/epoch)."""
    run(make_cfg(tmp_path, *FAST, "distiller=none", "trainer.epochs=2", run="straight"))
    smoke = run(make_cfg(tmp_path, *FAST, "distiller=none", "trainer.epochs=2",
                         "trainer.max_steps=5", run="resumed"))
    assert smoke["steps"] == 5 and smoke["stopped_early"] and smoke["epochs"] == 0.625
    full = run(make_cfg(tmp_path, *FAST, "distiller=none", "trainer.epochs=2", run="resumed"))
    assert full["steps"] == 16 and full["epochs"] == 2 and not full["stopped_early"]
    a = load_file(str(tmp_path / "straight" / "student.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    events = _jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [e["step"] for e in events if e["event"] == "resume"] == [5]


def test_rerunning_a_finished_run_changes_nothing(tmp_path):
    first = run(make_cfg(tmp_path, *FAST, "distiller=none"))
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir() if p.is_file()}
    again = run(make_cfg(tmp_path, *FAST, "distiller=none"))
    assert again == first
    for p in (tmp_path / "run").iterdir():
        if p.is_file() and p.name in ("summary.json", "student.safetensors", "metrics.jsonl"):
            assert p.stat().st_mtime_ns == files[p.name], p.name


def test_starting_over_keeps_the_old_files_aside(tmp_path):
    run(make_cfg(tmp_path, *FAST, "distiller=none"))
    run(make_cfg(tmp_path, *FAST, "distiller=none", "optimizer.lr=0.01", "trainer.resume=false"))
    previous = list((tmp_path / "run" / "previous").iterdir())
    assert len(previous) == 1 and (previous[0] / "summary.json").is_file()
    events = _jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len([e for e in events if e["event"] == "summary"]) == 1


def test_a_refused_resume_leaves_the_run_record_alone(tmp_path):
    run(make_cfg(tmp_path, *FAST, "distiller=none"))
    record = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    with pytest.raises(ConfigError):
        run(make_cfg(tmp_path, *FAST, "distiller=none", "optimizer.lr=0.01"))
    assert (tmp_path / "run" / ".hydra" / "config.yaml").read_text() == record


def test_runs_stopped_early_are_not_published_and_auto_train_trains_to_the_end(tmp_path):
    smoke = run(make_cfg(tmp_path, *FAST, "distiller=none", "trainer.max_steps=3"))
    assert smoke["stopped_early"]
    assert TeacherZoo(tmp_path / "zoo").find("fake", "resnet8") is None
    # auto_train ignores the student's max_steps and zoo.publish=false: the teacher is complete
    run(make_cfg(tmp_path, *FAST, "distiller=kd", "trainer.max_steps=3", "zoo.publish=false",
                 "teacher.auto_train=true", "teacher.auto_train_epochs=1", run="kd"))
    entry = TeacherZoo(tmp_path / "zoo").find("fake", "resnet14")
    assert entry is not None and entry.meta["epochs"] == 1


def test_zoo_teacher_from_another_split_is_refused(tmp_path):
    run(make_cfg(tmp_path, *FAST, "distiller=none", "student=resnet14", run="teacher"))
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *FAST, "distiller=kd", "dataset.seed=1", run="kd"))
    assert err.value.key == "teacher" and "split" in str(err.value)


def test_a_command_that_fails_before_training_writes_no_run_record(tmp_path):
    with pytest.raises(ConfigError):
        run(make_cfg(tmp_path, *FAST, "distiller=kd"))   # no teacher in the zoo
    assert not (tmp_path / "run" / ".hydra").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_unwritable_run_dir_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = make_cfg(tmp_path, *FAST, "distiller=none")
    from omegaconf import OmegaConf
    OmegaConf.set_struct(cfg, False)
    cfg.run_dir = str(blocker / "run")
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert err.value.key == "run_dir"
