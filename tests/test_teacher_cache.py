"""teacher.cache=views: the teacher's outputs per (image, augmentation view), stored and read
back. A cached run trains the student an uncached run trains; the store never trusts a damaged
or half-written row; methods and datasets it cannot serve are refused."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _compose import make_cfg, write_class_folders
from _golden import fixed_teacher
from _resume import FAKE_RUN, resumes_bit_exactly
from distill.app import run
from distill.data.batched import DeviceBatches, tensor_source
from distill.data.fake import fake
from distill.engine.loaders import IndexedDataset
from distill.engine.teacher_cache import OutputStore, row_checksums
from distill.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _losses(run_dir: Path) -> list[dict[str, float]]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in e.items() if k in ("train/loss", "train/ce", "train/kd")}
            for e in events if e.get("event") == "train"]


def test_view_ids_reproduce_each_path_s_images():
    """The in-memory batches' view ids, and the DataLoader path's ids replayed from the RNG
    state its per-item pipeline started from, render the very images each path trained on."""
    data = fake(num_classes=10, train_size=96, val_size=8)
    images, transform = tensor_source(data.train)
    assert transform.view_count == 162   # (2 * 4 + 1)^2 offsets x 2 flips
    batches = DeviceBatches(data.train, transform, range(96), batch_size=32,
                            device=torch.device("cpu"), seed=3, with_indices=True)
    seen = set()
    for batch, _, extras in batches:
        views = extras["augmentation"]
        seen |= set(views.tolist())
        rendered = transform.normalize(transform.render(images[extras["index"]], views))
        assert torch.equal(rendered, batch)
    assert len(seen) > 40   # many views drawn, not one
    items = IndexedDataset(data.train, augmentation=transform)
    torch.manual_seed(5)
    for index in range(96):
        image, _, extras = items[index]
        rendered = transform.normalize(transform.render(images[index:index + 1],
                                                        torch.tensor([extras["augmentation"]])))
        torch.testing.assert_close(rendered[0], image, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,data_path", [("kd", "memory"), ("kd", "loader"),
                                              ("noisy_kd", "memory")])
def test_cached_runs_train_the_uncached_student(tmp_path, method, data_path):
    """No cache, a cold cache (filled as the run goes) and a warm one (every row stored by the
    cold run): equal losses at every step and equal students after 2 epochs. noisy_kd's noise
    is drawn after the lookup, from the same random stream."""
    args = [*FAKE_RUN, f"distiller={method}", f"trainer.data_path={data_path}",
            f"teacher.checkpoint={fixed_teacher(tmp_path)}"]
    plain = run(make_cfg(tmp_path, *args, run="plain"))
    cold = run(make_cfg(tmp_path, *args, "teacher.cache=views", run="cold"))
    warm = run(make_cfg(tmp_path, *args, "teacher.cache=views", run="warm"))
    assert "teacher_cache" not in plain
    assert cold["teacher_cache"]["read"] + cold["teacher_cache"]["computed"] == 128
    assert cold["teacher_cache"]["computed"] > 100   # 64 images x 162 views: few repeats
    assert (warm["teacher_cache"]["read"], warm["teacher_cache"]["computed"]) == (128, 0)
    reference = _losses(tmp_path / "plain")
    assert len(reference) == 8
    for name in ("cold", "warm"):
        losses = _losses(tmp_path / name)
        assert [e.keys() for e in losses] == [e.keys() for e in reference]
        for got, want in zip(losses, reference):
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5), (name, key)
        students = [load_file(str(tmp_path / r / "student.safetensors")) for r in ("plain", name)]
        for key, value in students[0].items():
            torch.testing.assert_close(students[1][key], value, rtol=1e-4, atol=1e-5)


def test_a_half_filled_store_trains_the_uncached_student(tmp_path):
    """Every other training image stored ahead: each batch is part read, part computed on a
    sub-batch, put back in its place."""
    from hydra import compose, initialize_config_dir

    from distill.app import teacher_cache_jobs
    from distill.config import CONFIG_DIR
    from distill.engine.teacher_cache import fill_store

    args = [*FAKE_RUN, "distiller=kd", f"teacher.checkpoint={fixed_teacher(tmp_path)}",
            f"zoo.root={tmp_path / 'zoo'}"]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        jobs, device = teacher_cache_jobs(compose("train", overrides=args), args)
    (job,) = jobs
    fill_store(job.store, job.teacher.model, job.images, job.transform, job.items[::2],
               batch_size=512, device=device)
    plain = run(make_cfg(tmp_path, *args, run="plain"))
    half = run(make_cfg(tmp_path, *args, "teacher.cache=views", run="half"))
    assert half["teacher_cache"]["read"] == 64 and half["teacher_cache"]["computed"] == 64
    for got, want in zip(_losses(tmp_path / "half"), _losses(tmp_path / "plain")):
        assert got == pytest.approx(want, rel=1e-5)
    students = [load_file(str(tmp_path / r / "student.safetensors")) for r in ("plain", "half")]
    for key, value in students[0].items():
        torch.testing.assert_close(students[1][key], value, rtol=1e-4, atol=1e-5)
    assert plain["last_top1"] == pytest.approx(half["last_top1"])


def test_cached_teacher_answers_in_the_autocast_dtype(tmp_path):
    """Under bf16 autocast a cached teacher returns what the teacher would: bf16 logits, the
    stored rows and the computed ones alike (float32 storage holds bf16 exactly)."""
    from distill.engine.teacher_cache import CachedTeacher

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)).eval()
    cached = CachedTeacher(model, _store(tmp_path / "outputs.bin", rows=8))
    images = torch.randn(4, 3, 2, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(images)
        cached.batch = (images[:2], torch.tensor([0, 1]))
        cached(images[:2])                                   # rows 0, 1 stored
        cached.batch = (images, torch.tensor([0, 1, 2, 3]))  # 0, 1 read; 2, 3 computed
        got = cached(images)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want) and (cached.read, cached.computed) == (2, 4)


def test_each_of_several_teachers_has_its_own_store(tmp_path):
    """multi_teacher: each teacher answers from a store of its own weights; cold and warm runs
    train the uncached student."""
    from safetensors.torch import save_file

    from distill.models import create_model

    torch.manual_seed(77)
    second = tmp_path / "resnet8.safetensors"
    save_file(create_model("resnet8", num_classes=10).state_dict(), str(second))
    args = [*FAKE_RUN, "distiller=multi_teacher", "distiller.teachers=[resnet14,resnet8]",
            f"distiller.teacher_checkpoints=[{fixed_teacher(tmp_path)},{second}]"]
    run(make_cfg(tmp_path, *args, run="plain"))
    cold = run(make_cfg(tmp_path, *args, "teacher.cache=views", run="cold"))
    warm = run(make_cfg(tmp_path, *args, "teacher.cache=views", run="warm"))
    files = cold["teacher_cache"]["files"]
    assert set(files) == {"teacher0", "teacher1"} and len(set(files.values())) == 2
    assert "/resnet14/outputs/" in files["teacher0"] and "/resnet8/outputs/" in files["teacher1"]
    assert (warm["teacher_cache"]["read"], warm["teacher_cache"]["computed"]) == (256, 0)
    for name in ("cold", "warm"):
        for got, want in zip(_losses(tmp_path / name), _losses(tmp_path / "plain")):
            assert got == pytest.approx(want, rel=1e-5)


def test_cached_run_resumes_bit_exactly(tmp_path):
    straight, resumed, _ = resumes_bit_exactly(tmp_path, "distiller=kd", "teacher.cache=views")
    assert straight["teacher_cache"]["computed"] > 0
    assert resumed["teacher_cache"]["computed"] == 0   # the straight run stored every row


def _store(path, rows=12, width=5, dtype="float32"):
    return OutputStore(path, {"test": 1}, rows, width, dtype)


def test_damaged_rows_and_files_are_never_trusted(tmp_path, caplog):
    path = tmp_path / "outputs.bin"
    store = _store(path)
    rows = torch.arange(6)
    values = torch.randn(6, 5)
    store.store(rows, values)
    got, present = _store(path).lookup(torch.arange(12))
    assert present.tolist() == [True] * 6 + [False] * 6
    assert torch.equal(got[:6], values)
    # one flipped bit in row 3's values: that row reads as empty (and is computed again)
    offset = 4096 + 8 * 12 + 4 * (3 * 5 + 2)
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))
    reopened = _store(path)
    _, present = reopened.lookup(rows)
    assert present.tolist() == [True, True, True, False, True, True]
    assert reopened.rejected == 1
    # a tag that vouches for other values (a row two writers wrote at once) is rejected too
    with open(path, "r+b") as f:
        f.seek(4096 + 8 * 12 + 4 * 4 * 5)
        f.write(torch.randn(5).numpy().tobytes())
    assert reopened.lookup(torch.tensor([4]))[1].tolist() == [False]
    assert row_checksums(values[:1], torch.tensor([0])) != row_checksums(values[:1], torch.tensor([1]))
    # a damaged header, or a file of the wrong size: rebuilt empty, with a warning
    for damage in (lambda b: b"garbage" + b[7:], lambda b: b[:-8]):
        path.write_bytes(damage(path.read_bytes()))
        with caplog.at_level("WARNING", logger="distill"):
            rebuilt = _store(path)
        assert "damaged" in caplog.text and rebuilt.filled() == 0
        assert path.stat().st_size == rebuilt.size
        caplog.clear()
    # another key's file at the same path is not read as this one's
    other = OutputStore(path, {"test": 2}, 12, 5, "float32")
    assert other.filled() == 0


WRITER = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from distill.engine.teacher_cache import OutputStore
    path, first, last, offset, go = Path(sys.argv[1]), *map(int, sys.argv[2:5]), Path(sys.argv[5])
    while not go.exists():
        time.sleep(0.001)
    store = OutputStore(path, {"test": "concurrent"}, 6000, 7, "float32")
    for start in range(first, last, 50):
        rows = torch.arange(start, min(start + 50, last))
        store.store(rows, rows[:, None].float() + offset / 10 + torch.arange(7) / 100)
""")


@pytest.mark.slow   # two training processes
def test_two_processes_filling_one_cache_lose_and_corrupt_nothing(tmp_path):
    """Two writers start together on a missing file (both create it) and write the same rows
    0-3999 at the same time, with different values; one also writes rows 4000-5999 alone.
    Every row only one wrote is stored; a row both wrote holds one writer's values whole, or
    reads as empty; never a mix."""
    path, go = tmp_path / "shared.bin", tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), *spans, str(go)],
                                cwd=REPO) for spans in (("0", "4000", "1"), ("0", "6000", "2"))]
    go.touch()
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    store = OutputStore(path, {"test": "concurrent"}, 6000, 7, "float32")
    values, present = store.lookup(torch.arange(6000))
    assert bool(present[4000:].all())
    rows = torch.arange(6000)[:, None].float() + torch.arange(7) / 100
    for row in range(6000):
        if present[row]:
            assert any(torch.allclose(values[row], rows[row] + offset / 10, atol=0)
                       for offset in (1, 2)), row
    assert int(present.sum()) >= 5900   # torn rows are rare; they read as empty
    assert not list(tmp_path.glob(".*.tmp"))   # no temporary file left behind


@pytest.mark.parametrize("method,reason", [("fitnet", "intermediate features"),
                                           ("mlkd", "other views of each image"), ("dml", "no teacher"),
                                           ("sobolev", "gradients through the teacher")])
def test_methods_the_cache_cannot_serve_are_refused(tmp_path, method, reason):
    from distill.validation import validate

    with pytest.raises(ConfigError) as exc:
        validate(make_cfg(tmp_path, f"distiller={method}", "teacher.cache=views"))
    assert exc.value.key == "teacher.cache" and reason in exc.value.message
    assert "views serves" in exc.value.allowed and "kd, " in exc.value.allowed


def test_random_resized_crop_is_refused_before_anything_is_made(tmp_path):
    write_class_folders(tmp_path / "data", size=40, per_class=2)
    cfg = make_cfg(tmp_path, "dataset=imagenet", f"dataset.root={tmp_path / 'data'}",
                   "dataset.image_size=32", "teacher=resnet8", "student=resnet8",
                   "teacher.auto_train=true", "teacher.cache=views", "device=cpu", run="refused")
    with pytest.raises(ConfigError) as exc:
        run(cfg)
    assert exc.value.key == "teacher.cache" and "RandomResizedCrop" in exc.value.message
    assert not (tmp_path / "refused").exists() and not (tmp_path / "zoo").exists()


@pytest.mark.slow   # the cache tool's fill and a run in float16: about 10 s
def test_cache_teacher_tool_fills_ahead_and_reports_float16_rounding(tmp_path, capsys):
    """tools/cache_teacher.py prints the size, fills every (image, view) row; a run then
    computes no teacher output. A run on part of the data fills that part; float16 storage
    reports its effect on the KD loss. A method the cache cannot serve exits 2."""
    sys.path.insert(0, str(REPO / "tools"))
    import cache_teacher

    data = ["dataset=fake", "dataset.train_size=20", "dataset.val_size=16", "teacher=resnet14", "student=resnet8", "device=cpu",
            f"teacher.checkpoint={fixed_teacher(tmp_path)}", f"zoo.root={tmp_path / 'zoo'}"]
    assert cache_teacher.main(["--batch-size", "256", *data]) == 0
    out = capsys.readouterr().out
    assert "20 images x 162 views x 10 outputs, float32" in out and "3,240 rows computed" in out
    assert cache_teacher.main(data) == 0   # filled: nothing left to compute
    assert "0 rows computed" in capsys.readouterr().out
    summary = run(make_cfg(tmp_path, *data, "trainer.epochs=2", "trainer.batch_size=8",
                           "teacher.cache=views", run="warm"))
    assert (summary["teacher_cache"]["read"], summary["teacher_cache"]["computed"]) == (40, 0)
    # a run on a part of the training set (dataset.train_fraction) needs that part's rows only
    assert cache_teacher.main([*data, "teacher.cache_dtype=float16",
                               "dataset.train_fraction=0.5"]) == 0
    out = capsys.readouterr().out
    assert "float16 rounding" in out and "KD loss (T=4)" in out
    assert "this run's 10 images: 1,620 rows" in out and "1,620 rows computed" in out
    assert len(list((tmp_path / "zoo").rglob("*-float16.bin"))) == 1
    assert cache_teacher.main([*data, "distiller=fitnet"]) == 2
    assert "teacher.cache" in capsys.readouterr().err


def test_a_write_that_fails_is_reported_once_and_the_run_goes_on(tmp_path, caplog):
    import os

    store = _store(tmp_path / "outputs.bin")
    os.close(store._fd)   # as a full disk would: every write fails
    store._fd = os.open(tmp_path / "outputs.bin", os.O_RDONLY)
    with caplog.at_level("WARNING", logger="distill"):
        store.store(torch.tensor([1]), torch.randn(1, 5))
        store.store(torch.tensor([2]), torch.randn(1, 5))
    assert caplog.text.count("cannot write") == 1 and store.write_failed
    assert store.lookup(torch.tensor([1, 2]))[1].tolist() == [False, False]


def test_a_store_that_cannot_be_written_keeps_rows_in_memory(tmp_path, caplog):
    (tmp_path / "not-a-folder").write_text("")
    with caplog.at_level("WARNING", logger="distill"):
        store = _store(tmp_path / "not-a-folder" / "outputs.bin")
    assert store.path is None and "in memory only" in caplog.text
    values = torch.randn(3, 5)
    store.store(torch.tensor([7, 1, 4]), values)
    got, present = store.lookup(torch.tensor([1, 2, 4, 7]))
    assert present.tolist() == [True, False, True, True]
    assert torch.equal(got[[3, 0, 2]], values)
