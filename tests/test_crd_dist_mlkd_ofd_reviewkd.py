"""The strongest published methods (CRD, DIST, MLKD, OFD, ReviewKD) end to end, and CRD's memory bank against a
transcription of RepDistiller's ContrastMemory: each method (CRD, DIST, MLKD on both data paths,
OFD, ReviewKD) trains from its config and resumes bit-exactly from a checkpoint; the training
batches carry their samples' dataset indices on both data paths.

Fake data, 64 images in batches of 16 (4 steps an epoch), resnet14 -> resnet8, a fixed random
teacher (no teacher training).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from _compose import make_cfg, write_class_folders
from _golden import fixed_teacher
from distill.app import run
from distill.checkpoint import read_checkpoint
from distill.data.fake import fake
from distill.distillers.crd import ContrastMemory
from distill.engine.loaders import build_loaders
from distill.losses import crd_nce_loss

BASE = ["dataset=fake", "dataset.train_size=64", "dataset.val_size=32", "student=resnet8",
        "teacher=resnet14", "trainer.batch_size=16", "trainer.log_every=1", "device=cpu",
        "zoo.publish=false", "trainer.epochs=2"]
RUNS = {   # each method with the options that make it fit 64 images; MLKD on both data paths
    "crd": ["distiller=crd", "distiller.nce_k=16"],
    "dist": ["distiller=dist"],
    "mlkd": ["distiller=mlkd"],
    "mlkd-loader": ["distiller=mlkd", "trainer.data_path=loader"],
    "ofd": ["distiller=ofd"],
    "reviewkd": ["distiller=reviewkd"],
}
# (loss terms logged, trained parts checkpointed) of each run
EXPECTED = {"crd": ({"ce", "crd"}, {"student", "embed_student", "embed_teacher", "memory"}),
            "dist": ({"ce", "dist"}, {"student"}),
            "mlkd": ({"ce", "kd", "cc", "bc"}, {"student"}),
            "mlkd-loader": ({"ce", "kd", "cc", "bc"}, {"student"}),
            "ofd": ({"ce", "ofd"}, {"student", "connectors"}),
            "reviewkd": ({"ce", "reviewkd"}, {"student", "fusion"})}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return fixed_teacher(tmp_path_factory.mktemp("teacher"))


def _parts(run_dir):
    return read_checkpoint(run_dir / "checkpoints" / "last.pt")["parts"]


@pytest.mark.parametrize("name", list(RUNS))
def test_trains_and_resumes_bit_exactly(name, teacher, tmp_path):
    args = [*BASE, *RUNS[name], f"teacher.checkpoint={teacher}"]
    straight = run(make_cfg(tmp_path, *args, run="straight"))
    run(make_cfg(tmp_path, *args, "trainer.max_steps=3", run="resumed"))
    resumed = run(make_cfg(tmp_path, *args, run="resumed"))
    assert straight["steps"] == resumed["steps"] == 8
    a, b = _parts(tmp_path / "straight"), _parts(tmp_path / "resumed")
    terms, parts = EXPECTED[name]
    assert set(a) == set(b) == parts
    for role in a:
        for key, value in a[role].items():
            assert torch.equal(value, b[role][key]), f"{role}.{key}"
    assert straight["last_top1"] == resumed["last_top1"]
    events = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").open()]
    last = [e for e in events if e["event"] == "train"][-1]
    logged = {k[len("train/"):] for k in last if k.startswith("train/")}
    assert logged - {"loss", "lr", "epoch", "images_per_sec"} == terms
    assert all(last[f"train/{t}"] > 0 for t in terms)
    if name == "crd":   # the bank holds every sample, renormalised rows, Z estimated
        memory = a["memory"]
        assert memory["bank_student"].shape == (64, 128)
        assert torch.allclose(memory["bank_teacher"].norm(dim=1), torch.ones(64), atol=1e-5)
        assert (memory["normalizers"] > 0).all()


# --- CRD's memory bank ---------------------------------------------------------------------------
def _memory(n=40, classes=4, k=6, momentum=0.5, replace=False, seed=3):
    labels = torch.arange(n) % classes
    return ContrastMemory(8, labels, k, 0.07, momentum, seed, replace), labels


def test_memory_starts_uniform_in_the_reference_range():
    memory, _ = _memory(n=2000)
    stdv = 1 / math.sqrt(8 / 3)
    for bank in (memory.bank_student, memory.bank_teacher):
        assert bank.abs().max() <= stdv and bank.min() < -0.9 * stdv and bank.max() > 0.9 * stdv
        assert bank.pow(2).sum(1).mean().item() == pytest.approx(1.0, abs=0.05)
    assert (memory.normalizers < 0).all()   # Z not estimated yet
    assert set(memory.state_dict()) == {"bank_student", "bank_teacher", "normalizers"}


@pytest.mark.parametrize("replace", [False, True])
def test_negatives_come_from_other_classes(replace):
    memory, labels = _memory(n=60, classes=3, k=40 if not replace else 100, replace=replace)
    anchors = torch.arange(60)
    negatives = memory.sample_negatives(anchors, torch.Generator().manual_seed(0))
    assert negatives.shape == (60, memory.num_negatives)
    assert (labels[negatives] != labels[anchors][:, None]).all()
    if not replace:   # without replacement: K distinct samples per row
        assert all(len(set(row.tolist())) == 40 for row in negatives)
    # every other-class sample is drawn about equally often (uniform noise distribution)
    counts = torch.bincount(negatives.flatten(), minlength=60).float()
    assert counts.min() > 0.5 * counts.mean()


def reference_scores(bank_s, bank_t, v_s, v_t, contrast, index, n, temperature, momentum, z):
    """RepDistiller ContrastMemory.forward in float64 numpy: scores of the student embedding
    against the teacher bank and vice versa, Z = mean x n on the first call, then the momentum
    update of both banks at `index`, rows renormalised."""
    out_s = np.exp(np.einsum("bkd,bd->bk", bank_t[contrast], v_s) / temperature)
    out_t = np.exp(np.einsum("bkd,bd->bk", bank_s[contrast], v_t) / temperature)
    if z is None:
        z = (out_s.mean() * n, out_t.mean() * n)
    new_s, new_t = bank_s.copy(), bank_t.copy()
    for bank, v in ((new_s, v_s), (new_t, v_t)):
        mixed = bank[index] * momentum + v * (1 - momentum)
        bank[index] = mixed / np.sqrt((mixed ** 2).sum(1, keepdims=True))
    return out_s / z[0], out_t / z[1], new_s, new_t, z


def test_memory_scores_and_updates_as_the_reference(monkeypatch):
    memory, _ = _memory()
    g = torch.Generator().manual_seed(5)
    z = None
    for step in range(2):   # Z from the first call only
        index = torch.randperm(40, generator=g)[:5]
        negatives = torch.randint(0, 40, (5, 6), generator=g)
        monkeypatch.setattr(memory, "sample_negatives", lambda anchors, gen: negatives)
        v_s = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
        v_t = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
        bank_s, bank_t = memory.bank_student.double().numpy(), memory.bank_teacher.double().numpy()
        contrast = torch.cat([index[:, None], negatives], 1).numpy()
        exp_s, exp_t, new_s, new_t, z = reference_scores(
            bank_s, bank_t, v_s.double().numpy(), v_t.double().numpy(), contrast, index.numpy(),
            40, 0.07, 0.5, z)
        out_s, out_t = memory(v_s, v_t, index, step)
        assert out_s.shape == (5, 7, 1)
        np.testing.assert_allclose(out_s[:, :, 0].numpy(), exp_s, rtol=1e-4)
        np.testing.assert_allclose(out_t[:, :, 0].numpy(), exp_t, rtol=1e-4)
        np.testing.assert_allclose(memory.bank_student.numpy(), new_s, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(memory.bank_teacher.numpy(), new_t, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(memory.normalizers.numpy(), z, rtol=1e-5)
        loss = crd_nce_loss(out_s, 40) + crd_nce_loss(out_t, 40)
        assert math.isfinite(loss.item()) and loss.item() > 0


def test_crd_scores_stay_float32_under_autocast():
    memory, _ = _memory()
    v = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_s, out_t = memory(v, v, torch.arange(4), 0)
    assert out_s.dtype == out_t.dtype == torch.float32 and torch.isfinite(out_s).all()


# --- the dataset index on both data paths ----------------------------------------------------
@pytest.mark.parametrize("data_path", ["memory", "loader"])
def test_training_batches_carry_their_dataset_indices(data_path):
    data = fake(train_size=50, val_size=8)
    loaders = build_loaders(data, data_path=data_path, batch_size=16, eval_batch_size=8,
                            num_workers=0, device=torch.device("cpu"), seed=0, rank=0,
                            world_size=1)
    loaders.start_epoch(1, 0)
    seen = []
    for images, labels, extras in loaders.train:
        index = extras["index"]
        assert index.dtype == torch.long and len(index) == len(labels) == len(images)
        assert torch.equal(labels, data.train.labels[index])
        seen += index.tolist()
    assert seen == list(loaders.sampler)   # the sampler's order, every sample once
    assert sorted(seen) == list(range(50))


# --- the variants' terms: KD and DKD on standardized logits, CRD+KD ----------------------------
def _build(method, **options):
    from _compose import method_options
    from distill.method import BuildInfo, build_distiller
    from distill.models import create_model, model_spec

    torch.manual_seed(0)
    info = BuildInfo(model_spec("resnet8"), model_spec("resnet14"), (3, 32, 32), 10,
                     student_arch="resnet8", train_labels=torch.arange(64) % 10)
    return build_distiller(method, create_model("resnet8", num_classes=10),
                           create_model("resnet14", num_classes=10),
                           {**method_options(method), **options}, info).train()


def test_standardize_and_kd_weight_change_exactly_the_terms_they_name():
    from distill.method import StepContext
    from distill.losses import dkd_loss, kd_loss, standardize_logits

    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    ctx = StepContext(epoch=30, step=0, epochs=40, indices=torch.arange(16))
    kd = _build("kd", standardize=True, temperature=2.0, kd_weight=9.0)
    logits, terms = kd(x, y, ctx)
    teacher = kd.teacher(x)
    torch.testing.assert_close(terms["kd"], 9.0 * kd_loss(logits, teacher, 2.0, standardize=True))
    dkd = _build("dkd", standardize=True, temperature=2.0, alpha=9.0, beta=72.0)
    logits, terms = dkd(x, y, ctx)
    expected = dkd_loss(standardize_logits(logits), standardize_logits(dkd.teacher(x)), y,
                        9.0, 72.0, 2.0)
    torch.testing.assert_close(terms["dkd"], expected)   # past the warm-up: ramp 1
    crd = _build("crd", nce_k=16, kd_weight=1.0)
    logits, terms = crd(x, y, ctx)
    assert set(terms) == {"ce", "kd", "crd"}
    torch.testing.assert_close(terms["kd"], kd_loss(logits, crd.teacher(x), 4.0))
    assert set(_build("crd", nce_k=16)(x, y, ctx)[1]) == {"ce", "crd"}


def test_mlkd_on_data_it_cannot_view_is_refused_before_anything_is_written(tmp_path):
    """MLKD's strong view is made from uint8 image tensors; a folder dataset (read as files) is
    refused by name before a teacher is trained for it: no run directory, no zoo entry."""
    from distill.errors import ConfigError

    write_class_folders(tmp_path / "data", size=32, per_class=3)
    cfg = make_cfg(tmp_path, "dataset=folder", f"dataset.root={tmp_path / 'data'}",
                   "dataset.image_size=32", "distiller=mlkd", "teacher=resnet8",
                   "student=resnet8", "teacher.auto_train=true", "device=cpu", run="refused")
    with pytest.raises(ConfigError) as exc:
        run(cfg)
    assert exc.value.key == "dataset" and "extra views" in exc.value.message
    assert not (tmp_path / "refused").exists() and not (tmp_path / "zoo").exists()


def test_crd_scores_equal_the_references_gather_and_survive_the_bank_update():
    """The scores through bank @ embedding^T equal the reference's gathered rows times the
    embedding, values and gradients, and the backward still works after the bank's in-place
    momentum update (which follows the scoring in every step)."""
    from distill.distillers.crd import _dot_with_rows

    g = torch.Generator().manual_seed(7)
    bank = torch.randn(50, 8, generator=g, dtype=torch.float64)
    rows = torch.randint(0, 50, (4, 9), generator=g)
    v1 = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v2 = v1.detach().clone().requires_grad_(True)
    ours = _dot_with_rows(bank, v1, rows)
    reference = torch.bmm(bank[rows], v2[:, :, None])[:, :, 0]
    torch.testing.assert_close(ours, reference)
    bank.mul_(0.5)   # the update, before the backward
    weights = torch.randn(4, 9, generator=g, dtype=torch.float64)
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(v1.grad, v2.grad)
