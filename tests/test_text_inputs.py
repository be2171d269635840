"""Inputs that are not images: fake_text's token ids and attention masks through the whole
engine with TextCNN students and teachers (Kim 2014). The logit methods train on them and resume
bit-exactly, the teacher-output cache serves them, the student exports to ONNX with a dynamic
sequence axis, and every image-only piece refuses them by name. (2 ranks = 1 rank: test_ddp.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from _compose import REPO, make_cfg
from distill.app import run
from distill.data import build_data
from distill.data.fake_text import FIRST_ID, fake_text
from distill.errors import ConfigError
from distill.inputs import call_model
from distill.models import create_model, model_spec

SMALL = ["dataset=fake_text", "dataset.train_size=64", "dataset.val_size=32",
         "teacher=textcnn_wide", "student=textcnn", "trainer.batch_size=16",
         "trainer.log_every=1", "device=cpu"]
METHODS = {"none": [], "kd": [], "dkd": [], "dist": [],
           "multi_teacher": ["distiller.teachers=[textcnn_wide,textcnn_wide]"]}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A textcnn_wide with seeded random weights (what the methods need is its logits)."""
    path = tmp_path_factory.mktemp("teacher") / "textcnn_wide.safetensors"
    torch.manual_seed(7)
    save_file(create_model("textcnn_wide", num_classes=4, vocab_size=1000).state_dict(), str(path))
    return path


def teacher_options(method: str, teacher: Path) -> list[str]:
    if method == "multi_teacher":
        return [f"distiller.teacher_checkpoints=[{teacher},{teacher}]"]
    return [] if method == "none" else [f"teacher.checkpoint={teacher}"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student.safetensors"))


def test_fake_text_is_seeded_and_labelled_by_its_keywords():
    data = fake_text(train_size=64, val_size=32)
    again = fake_text(train_size=64, val_size=32)
    assert torch.equal(data.train.input_ids, again.train.input_ids)
    ids, mask, labels = data.train.input_ids, data.train.attention_mask, data.train.labels
    assert ((ids == 0) == (mask == 0)).all() and (mask.sum(1) >= 8).all()   # padding is id 0
    keywords = 4
    counts = torch.stack([((ids >= FIRST_ID + c * keywords) & (ids < FIRST_ID + (c + 1) * keywords))
                          .sum(1) for c in range(4)], dim=1)
    assert torch.equal(counts.argmax(1), labels)   # the class whose keywords it holds most
    item, label = data.train[3]
    assert set(item) == {"input_ids", "attention_mask"} and label == int(labels[3])
    assert data.inputs == "tokens" and data.model_options == {"vocab_size": 1000}


def test_textcnn_ignores_padding_and_has_kims_layers():
    model = create_model("textcnn", num_classes=4, vocab_size=1000).eval()
    assert model_spec("textcnn").inputs == "tokens"
    assert [c.kernel_size[0] for c in model.convs] == [3, 4, 5]
    assert all(c.out_channels == 100 for c in model.convs)
    ids = torch.randint(1, 1000, (2, 10))
    mask = torch.ones_like(ids)
    short = model(ids, mask)
    padded_ids = torch.cat([ids, torch.zeros(2, 7, dtype=torch.long)], dim=1)
    padded = model(padded_ids, torch.cat([mask, torch.zeros(2, 7, dtype=torch.long)], dim=1))
    torch.testing.assert_close(short, padded)   # the same logits however much padding
    assert call_model(model, {"input_ids": ids, "attention_mask": mask}).shape == (2, 4)


@pytest.mark.parametrize("method", list(METHODS))
def test_logit_methods_train_and_resume_bit_exactly(method, teacher, tmp_path):
    """Each method from the config: 8 steps straight, and 3 steps then resumed to 8, end with
    the same student, bit for bit; every step logged its loss terms."""
    command = [*SMALL, f"distiller={method}", "trainer.epochs=2", *METHODS[method],
               *teacher_options(method, teacher)]
    straight = run(make_cfg(tmp_path, *command, run="straight"))
    run(make_cfg(tmp_path, *command, "trainer.max_steps=3", run="cut"))
    resumed = run(make_cfg(tmp_path, *command, run="cut"))
    assert straight["steps"] == resumed["steps"] == 8
    one, two = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    assert all(torch.equal(one[k], two[k]) for k in one)
    start = create_model("textcnn", num_classes=4, vocab_size=1000).state_dict()
    assert not torch.equal(one["fc.weight"], start["fc.weight"])
    events = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").open()]
    terms = {k for e in events if e["event"] == "train" for k in e}
    assert "train/ce" in terms or "train/dkd" in terms
    assert straight["last_top1"] == resumed["last_top1"]


def test_the_teacher_cache_serves_token_inputs_exactly(teacher, tmp_path):
    """No cache, a cold cache (its first run) and a warm one (read back) train the same student,
    bit for bit; the warm run reads every teacher output and computes none."""
    command = [*SMALL, "distiller=kd", "trainer.epochs=2", f"teacher.checkpoint={teacher}"]
    plain = run(make_cfg(tmp_path, *command, run="plain"))
    cold = run(make_cfg(tmp_path, *command, "teacher.cache=views", run="cold"))
    warm = run(make_cfg(tmp_path, *command, "teacher.cache=views", run="warm"))
    assert cold["teacher_cache"]["computed"] == 64 and warm["teacher_cache"]["computed"] == 0
    assert warm["teacher_cache"]["read"] == 2 * 64 and warm["teacher_cache"]["views_per_image"] == 1
    for name in ("cold", "warm"):
        assert all(torch.equal(weights(tmp_path / "plain")[k], weights(tmp_path / name)[k])
                   for k in weights(tmp_path / "plain"))
    assert plain["last_top1"] == cold["last_top1"] == warm["last_top1"]


def test_the_student_exports_to_onnx_with_a_dynamic_sequence(teacher, tmp_path):
    """student.onnx takes input_ids and attention_mask of any batch and any length: onnxruntime
    on lengths other than the dataset's equals torch."""
    import onnx
    import onnxruntime

    from distill.export import export_run, reload_exported

    run(make_cfg(tmp_path, *SMALL, "distiller=kd", "trainer.epochs=1",
                 f"teacher.checkpoint={teacher}", run="kd"))
    report = export_run(tmp_path / "kd", zoo_root=tmp_path / "zoo")
    assert report["inputs"] == "tokens" and report["input_shape"] == [32]
    assert report["onnx"]["check"] == "onnxruntime" and report["student"]["flops_per_image"] > 0
    path = tmp_path / "kd" / "export" / "student.onnx"
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(str(path)).graph.input}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    model = reload_exported(tmp_path / "kd" / "export" / "student.safetensors")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, length in ((1, 5), (3, 70)):
        ids = torch.randint(1, 1000, (batch, length))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            expected = model(ids, mask).numpy()
        (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, abs(expected).max()))


@pytest.mark.parametrize("override,key", [
    ("distiller=fitnet", "distiller"), ("distiller=mlkd", "distiller"),
    ("student=resnet8", "student"), ("trainer.channels_last=true", "trainer.channels_last"),
    ("+dataset.student_view=grayscale", "dataset.student_view"),
    ("trainer.quantize=int8", "trainer.quantize"), ("trainer.data_path=memory", "trainer.data_path")])
def test_image_only_pieces_refuse_token_inputs_by_name(override, key, teacher, tmp_path):
    with pytest.raises(ConfigError) as exc:
        run(make_cfg(tmp_path, *SMALL, override, f"teacher.checkpoint={teacher}"))
    assert exc.value.key == key
    assert not (tmp_path / "run").exists()   # refused before the run directory was made


@pytest.mark.slow   # a teacher and a student trained in a subprocess
def test_the_text_command_trains_a_teacher_then_distils(tmp_path):
    """`tools/train.py dataset=fake_text teacher=textcnn_wide student=textcnn distiller=kd
    teacher.auto_train=true`, at a smaller scale: the missing teacher is trained into the zoo,
    then the student learns from it; exit 0, one run directory with its summary."""
    env = {**os.environ, "DISTILL_ZOO": str(tmp_path / "zoo"), "CUDA_VISIBLE_DEVICES": "",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), "dataset=fake_text",
         "teacher=textcnn_wide", "student=textcnn", "distiller=kd", "teacher.auto_train=true",
         "dataset.train_size=96", "dataset.val_size=64", "trainer.epochs=2",
         "teacher.auto_train_epochs=2", "trainer.progress=false", "logger=jsonl"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary,) = (tmp_path / "outputs").rglob("summary.json")
    record = json.loads(summary.read_text())
    assert summary.parent.relative_to(tmp_path / "outputs").as_posix() == \
        "fake_text/textcnn_wide-textcnn/kd/seed0"
    assert record["teachers"][0]["name"] == "textcnn_wide" and record["teacher_top1"] > 25
    assert list((tmp_path / "zoo" / "fake_text" / "textcnn_wide").glob("*/model.safetensors"))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_text_command_at_full_scale(tmp_path):
    """The text command of docs/datasets.md (the dataset's 6-epoch recipe for both): the student
    learns the rule (measured: teacher 97.7%, student 95.3% top-1; chance is 25%)."""
    env = {**os.environ, "DISTILL_ZOO": str(tmp_path / "zoo"), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), "dataset=fake_text",
         "teacher=textcnn_wide", "student=textcnn", "distiller=kd", "teacher.auto_train=true",
         "trainer.progress=false", "logger=jsonl"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary,) = (tmp_path / "outputs").rglob("summary.json")
    assert json.loads(summary.read_text())["last_top1"] > 80


def test_build_data_gives_what_models_need(tmp_path):
    data = build_data({"name": "fake_text", "vocab_size": 500, "max_len": 12, "min_len": 6})
    assert data.model_options == {"vocab_size": 500} and data.image_size is None
    assert data.val[0][0]["input_ids"].shape == (12,)
