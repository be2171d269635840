"""End-to-end runs through `distill.app.run`, the function tools/train.py calls, one test per
scenario. A trained teacher comes from the session's shared zoo (`zoo`, tests/conftest.py):
tests that need one train none themselves."""
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
    summary = run(make_cfg(tmp_path, *FAST, "distiller=none", "trainer.epochs=2",
                           "logger=tensorboard"))
    run_dir = tmp_path / "run"
    on_disk = json.loads((run_dir / "summary.json").read_text())
    for key in ("best_top1", "last_top1", "teacher_top1", "train_images_per_sec", "world_size",
                "epochs", "wall_seconds", "models", "teachers"):
        assert key in on_disk
    assert on_disk["epochs"] == 2 and on_disk["world_size"] == 1 and on_disk["teacher_top1"] is None
    assert on_disk["train_images_per_sec"] > 0 and on_disk["teachers"] == []
    history = on_disk["history"]
    assert summary["best_top1"] == on_disk["best_top1"] == max(h["top1"] for h in history)
    assert on_disk["last_top1"] == history[-1]["top1"]
    assert on_disk["models"] == {"student": {"arch": "resnet8", "best_top1": on_disk["best_top1"],
                                             "last_top1": on_disk["last_top1"],
                                             "params": on_disk["student_params"]}}
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
    assert entry.weights.read_bytes() == (run_dir / "student.safetensors").read_bytes()


@pytest.mark.parametrize("data_path", ["memory", "loader"])
def test_vanilla_learns_fake_data_on_both_data_paths(tmp_path, data_path):
    extra = ["trainer.channels_last=false"] if data_path == "loader" else []
    summary = run(make_cfg(tmp_path, *FAST, "distiller=none", "trainer.epochs=3",
                           f"trainer.data_path={data_path}", *extra))
    assert summary["best_top1"] > 50.0   # 10 classes: chance is 10%


def test_an_auto_trained_teacher_is_complete_in_the_zoo_and_reused(tmp_path, zoo):
    """The shared zoo's resnet14 was auto-trained by a KD run stopped after one step: the
    teacher still trained its recipe's 2 epochs. A later run finds it (nothing trained again),
    evaluates it once at the start and records its digest."""
    entry = TeacherZoo(zoo).find("fake", "resnet14")
    assert entry is not None and entry.meta["epochs"] == 2 and entry.meta["split"]["seed"] == 0
    mtime = entry.weights.stat().st_mtime_ns
    summary = run(make_cfg(tmp_path, *FAST, "distiller=kd", "trainer.max_steps=4"))
    assert entry.weights.stat().st_mtime_ns == mtime
    assert [p.name for p in (zoo / "runs" / "fake" / "resnet14").glob("*/seed*")] == ["seed0-2epochs"]
    assert summary["teacher_top1"] == pytest.approx(entry.meta["top1"])
    assert summary["teachers"] == [{"role": "teacher", "name": "resnet14", "sha256": entry.sha256,
                                    "top1": summary["teacher_top1"]}]
    events = _jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [e["event"] for e in events].count("teacher") == 1
    train = [e for e in events if e["event"] == "train"]
    assert train and {"train/ce", "train/kd", "train/loss", "train/lr"} <= set(train[0])


def test_a_missing_teacher_names_the_command_that_trains_it_and_writes_nothing(tmp_path):
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *FAST, "distiller=kd"))
    text = str(err.value)
    assert "distiller=none" in text and "student=resnet14" in text and "dataset=fake" in text
    assert not (tmp_path / "run" / ".hydra").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_layers_stop_the_run_before_a_teacher_is_trained_for_it(tmp_path):
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *FAST, "distiller=fitnet", "teacher.auto_train=true",
                     "distiller.student_layer=layer3", "distiller.teacher_layer=layer1"))
    assert err.value.key == "distiller.student_layer"
    assert not (tmp_path / "zoo").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_a_stopped_run_resumed_mid_epoch_ends_like_a_straight_one(tmp_path, zoo):
    """FitNet (student + trained regressor) stopped mid-epoch by trainer.max_steps, then the real
    command in the same directory: the same student and connector as one uninterrupted run, bit
    for bit, and the resume logged at the step it happened (fake data: 8 steps an epoch)."""
    base = [*FAST, "distiller=fitnet", "trainer.epochs=2"]
    straight = run(make_cfg(tmp_path, *base, run="straight"))
    smoke = run(make_cfg(tmp_path, *base, "trainer.max_steps=5", run="resumed"))
    assert smoke["steps"] == 5 and smoke["stopped_early"] and smoke["epochs"] == 0.625
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert set(ckpt["parts"]) == {"student", "connector"} and set(ckpt["optimizers"]) == {"main"}
    assert sum(v.numel() for k, v in ckpt["parts"]["connector"].items()
               if "running" not in k and "num_batches" not in k) == straight["connector_params"] > 0
    full = run(make_cfg(tmp_path, *base, run="resumed"))
    assert full["steps"] == 16 and full["epochs"] == 2 and not full["stopped_early"]
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    for part in ("student", "connector"):
        assert all(torch.equal(a["parts"][part][k], b["parts"][part][k])
                   for k in a["parts"][part]), part
    events = _jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [e["step"] for e in events if e["event"] == "resume"] == [5]


def test_a_different_experiment_in_the_run_directory_is_refused_and_left_alone(tmp_path):
    run(make_cfg(tmp_path, *FAST, "distiller=none"))
    record = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *FAST, "distiller=none", "optimizer.lr=0.01"))
    assert "optimizer.lr" in str(err.value)
    assert (tmp_path / "run" / ".hydra" / "config.yaml").read_text() == record


def test_runs_recorded_before_a_config_key_existed_still_resume(tmp_path):
    """A checkpoint whose config lacks keys added later (here trainer.sync_bn and
    trainer.channels_last) ran with their defaults: resuming it is not a different experiment."""
    run(make_cfg(tmp_path, *FAST, "distiller=none", "trainer.max_steps=2"))
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    for key in ("sync_bn", "channels_last"):
        del ckpt["config"]["trainer"][key]
    torch.save(ckpt, path)
    summary = run(make_cfg(tmp_path, *FAST, "distiller=none"))
    assert summary["steps"] == 8 and not summary["stopped_early"]
    with pytest.raises(ConfigError, match="trainer.sync_bn"):   # a non-default value is a change
        run(make_cfg(tmp_path, *FAST, "distiller=none", "trainer.epochs=2", "trainer.sync_bn=true"))


@pytest.mark.slow   # torch.compile's first compile: about 8 s
def test_compiled_student_and_teacher_train_like_eager_ones(tmp_path, zoo):
    """trainer.compile=both (dynamo's `eager` backend here: the graph capture without inductor's
    minute of C++ compiling) keeps FitNet's hooks, connector and checkpoints working, and gives
    the weights of the uncompiled run."""
    base = [*FAST, "distiller=fitnet", "trainer.max_steps=3"]
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


def test_rkd_drops_a_last_batch_of_one(tmp_path, zoo):
    """256 fake images in batches of 51 leave one image for the epoch's last step: RKD's loss
    is 0 on fewer than 3 items (Traits.min_batch), so that batch is dropped, not trained on."""
    summary = run(make_cfg(tmp_path, *FAST, "distiller=rkd", "trainer.batch_size=51"))
    assert summary["steps"] == 5 and summary["epochs"] == 1


@pytest.mark.slow   # an assistant trained, then three runs: about 30 s
def test_takd_trains_its_assistant_once_and_later_runs_reuse_it(tmp_path, zoo):
    chain = ["distiller=takd", "distiller.assistants=[resnet8x4]", "teacher.auto_train_epochs=1",
             "trainer.max_steps=2"]
    first = run(make_cfg(tmp_path, *chain, *FAST, run="first"))
    zoo_ = TeacherZoo(zoo)
    root = zoo_.find("fake", "resnet14")
    (name,) = [m for _, m, _ in zoo_.list() if m.startswith("resnet8x4@kd-resnet14.")]
    entry = zoo_.find("fake", name)
    assert entry.meta["distilled_from"] == "resnet14"
    assert entry.meta["teacher_weights"] == str(root.weights)
    assert entry.meta["teacher_sha256"] == root.sha256
    assert entry.meta["kd"] == {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0}
    # the student's teacher is the assistant, not the root teacher
    assert first["teacher_top1"] == pytest.approx(entry.meta["top1"])
    assert first["teachers"][0]["sha256"] == entry.sha256 != root.sha256
    assistant_runs = zoo / "runs" / "fake" / name
    assert [p.name for p in assistant_runs.glob("*/seed*")] == ["seed0-1epochs"]
    mtime = entry.weights.stat().st_mtime_ns
    run(make_cfg(tmp_path, *chain, *FAST, "seed=1", "student=resnet14", run="second"))
    assert entry.weights.stat().st_mtime_ns == mtime
    assert [p.name for p in assistant_runs.glob("*/seed*")] == ["seed0-1epochs"], "the assistant was retrained"
    # a longer chain reuses the cached first link and adds the second
    run(make_cfg(tmp_path, *FAST, "distiller=takd", "distiller.assistants=[resnet8x4,resnet14]",
                 "teacher.auto_train_epochs=1", "trainer.max_steps=2", run="third"))
    assert entry.weights.stat().st_mtime_ns == mtime
    assert [m for _, m, _ in zoo_.list() if m.startswith("resnet14@kd-resnet8x4.")]
    # other KD options make another link, never a stale cache hit
    run(make_cfg(tmp_path, *chain, *FAST, "distiller.temperature=2.0", run="fourth"))
    assert len([m for _, m, _ in zoo_.list() if m.startswith("resnet8x4@kd-resnet14.")]) == 2


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


def test_runs_stopped_early_or_on_part_of_the_data_are_not_published(tmp_path):
    smoke = run(make_cfg(tmp_path, *FAST, "distiller=none", "trainer.max_steps=3"))
    assert smoke["stopped_early"]
    run(make_cfg(tmp_path, *FAST, "distiller=none", "dataset.train_fraction=0.5", run="half"))
    assert TeacherZoo(tmp_path / "zoo").find("fake", "resnet8") is None


def test_zoo_teacher_from_another_split_is_refused(tmp_path, zoo):
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *FAST, "distiller=kd", "dataset.seed=1", run="kd"))
    assert err.value.key == "teacher" and "split" in str(err.value)


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


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_demo_setting_kd_beats_vanilla(tmp_path):
    """The claim `make demo` shows: with 5% of digits, KD from a resnet32 teacher trained on all
    of it beats the same student trained on labels alone (about 5 minutes on 2 cores)."""
    vanilla = run(make_cfg(tmp_path, "experiment=demo", "distiller=none", run="none"))
    kd = run(make_cfg(tmp_path, "experiment=demo", "distiller=kd", run="kd"))
    assert kd["teacher_top1"] > 95.0
    assert kd["last_top1"] > vanilla["last_top1"]


def test_a_smoke_length_zoo_model_never_serves_a_full_run(tmp_path):
    """A teacher made by a smoke run (teacher.auto_train_epochs=1) was reused silently by a
    later run of the recipe's length. How long a made model trained is part of what it is: the
    full run refuses it (naming the option that takes it) or, allowed to, trains its own."""
    from distill.errors import ConfigError

    smoke = ["dataset=fake", "dataset.train_size=64", "dataset.val_size=32", "distiller=kd",
             "student=resnet8", "teacher=resnet8", "trainer.max_steps=1"]
    run(make_cfg(tmp_path, *smoke, "teacher.auto_train=true", "teacher.auto_train_epochs=1",
                 run="smoke"))
    short = TeacherZoo(tmp_path / "zoo").find("fake", "resnet8")
    assert short.meta["epochs"] == 1
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *smoke, run="full"))
    assert err.value.key == "teacher" and "made by a shorter run (1 epochs" in err.value.message
    assert "teacher.auto_train_epochs=1 takes it" in err.value.message
    summary = run(make_cfg(tmp_path, *smoke, "teacher.auto_train=true", run="full"))
    assert summary["teachers"][0]["sha256"] != short.sha256
    made = sorted(p.name for p in (tmp_path / "zoo" / "runs" / "fake" / "resnet8").glob("*/seed*"))
    assert made == ["seed0-1epochs", "seed0-2epochs"]
    # told to accept the short one: the smoke length takes the zoo's current (any length >= 1)
    again = run(make_cfg(tmp_path, *smoke, "teacher.auto_train_epochs=1", run="smoke2"))
    assert again["teachers"][0]["sha256"] in {short.sha256, summary["teachers"][0]["sha256"]}
