"""The training options of ImageNet-scale recipes: gradient accumulation, gradient clipping, an
EMA of the student, no weight decay on norms and biases, label smoothing of the CE term."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from _resume import resumes_bit_exactly
from distill.checkpoint import read_checkpoint
from distill.config import TrainerConfig
from distill.data import TensorImageDataset
from distill.data.fake import fake
from distill.engine.optim import build_optimizer
from distill.engine.trainer import Trainer, clip_gradients
from distill.method import StepContext, build_distiller
from distill.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_worker import tiny_net  # noqa: E402


def _train(run_dir: Path, *, batch: int, accumulate: int, method: str = "kd",
           optimizer: str = "sgd") -> dict:
    """The real Trainer, BN-free models, no augmentation: 200 images, 7 optimizer steps."""
    run_dir.mkdir(parents=True)
    data = fake(train_size=200, val_size=32)
    data = dataclasses.replace(data, train=TensorImageDataset(
        data.train.images, data.train.labels, data.val.transform))
    if method == "dml":
        from distill.models import MODELS

        if "tiny_net" not in MODELS:
            MODELS.register("tiny_net")(lambda num_classes=10: tiny_net(1))
        from distill.method import BuildInfo
        distiller = build_distiller("dml", tiny_net(0), None, {"peers": ["tiny_net", "tiny_net"]},
                                    BuildInfo(num_classes=10, student_arch="tiny_net"))
    else:
        distiller = build_distiller("kd", tiny_net(0), tiny_net(1), {})
    trainer = Trainer(
        distiller, data, options=TrainerConfig(epochs=2, batch_size=batch, accumulate=accumulate,
                                                max_steps=7, progress=False),
        optimizer={"name": optimizer, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        scheduler={"name": "multistep", "milestones": []}, run_dir=run_dir,
        device=torch.device("cpu"), loggers={}, config={}, run_name="acc", seed=0)
    return trainer.fit()


def test_accumulating_n_batches_equals_one_batch_n_times_larger(tmp_path):
    """32 images a step as 1 x 32, 2 x 16 and 4 x 8 (the epoch's last step: one batch of 8 in
    all three): the same student after 7 steps, a whole epoch."""
    weights = {}
    for batch, accumulate in ((32, 1), (16, 2), (8, 4)):
        summary = _train(tmp_path / f"b{batch}", batch=batch, accumulate=accumulate)
        assert summary["steps"] == 7 and summary["images_per_step"] == 32
        weights[batch] = load_file(str(tmp_path / f"b{batch}" / "student.safetensors"))
    init = tiny_net(0).state_dict()
    assert all((weights[32][k] - init[k]).abs().max() > 1e-3 for k in init if k.endswith("weight"))
    for batch in (16, 8):
        for key, value in weights[32].items():
            torch.testing.assert_close(weights[batch][key], value, rtol=1e-5, atol=1e-6)


def test_accumulating_more_batches_than_an_epoch_has_steps_once_per_epoch_and_says_so(
        tmp_path, caplog):
    """200 images in 7 batches of 32: trainer.accumulate=10 cannot gather 10, a step ends with
    its epoch, so each step is the epoch's 7 batches (200 images), as with accumulate=7 (the
    same student); summary.json says 200, not 320, and the start warns with the figures."""
    with caplog.at_level("WARNING", logger="distill"):
        summary = _train(tmp_path / "a10", batch=32, accumulate=10)
    assert summary["steps"] == 2 and summary["images_per_step"] == 200
    warning = [r.getMessage() for r in caplog.records if "trainer.accumulate" in r.getMessage()]
    assert warning == ["trainer.accumulate=10 is more than the 7 batches of an epoch: a step ends "
                       "with its epoch, so each optimizer step uses 7 batches (200 images), one "
                       "step per epoch"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="distill"):
        assert _train(tmp_path / "a7", batch=32, accumulate=7)["images_per_step"] == 200
    assert not [r for r in caplog.records if "trainer.accumulate" in r.getMessage()]
    ten, seven = (load_file(str(tmp_path / r / "student.safetensors")) for r in ("a10", "a7"))
    for key, value in seven.items():
        torch.testing.assert_close(ten[key], value, rtol=0, atol=0)


def test_a_manual_step_method_steps_each_optimizer_once_per_group(tmp_path):
    """DML steps its peers itself: under trainer.accumulate=2 each peer's optimizer takes one
    step per two batches (AdamW counts them)."""
    summary = _train(tmp_path / "dml", batch=16, accumulate=2, method="dml", optimizer="adamw")
    assert summary["steps"] == 7
    ckpt = read_checkpoint(tmp_path / "dml" / "checkpoints" / "last.pt")
    for peer in ("peer0", "peer1"):
        steps = {float(s["step"]) for s in ckpt["optimizers"][peer]["state"].values()}
        assert steps == {7.0}


def test_recipe_options_resume_bit_exactly(tmp_path):
    """Accumulation (cut mid-epoch, mid-group position restored), clipping, no decay on norms
    and biases and label smoothing together, and the EMA: a run cut and resumed ends where the
    straight one does, the EMA included; the EMA is evaluated and exported."""
    straight, resumed, ckpt = resumes_bit_exactly(
        tmp_path, "trainer.accumulate=2", "trainer.clip_grad_norm=0.5", "trainer.ema_decay=0.9",
        "trainer.label_smoothing=0.1", "optimizer.decay_norm_and_bias=false",
        "++dataset.train_size=128")
    assert straight["images_per_step"] == 32 and straight["exported"] == "ema"
    assert set(straight["models"]) == {"student", "ema"}
    assert straight["last_top1"] == straight["models"]["ema"]["last_top1"]
    other = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key, value in ckpt["averages"]["ema"].items():
        assert torch.equal(value, other["averages"]["ema"][key]), key
    exported = load_file(str(tmp_path / "straight" / "student.safetensors"))
    ema = {k.removeprefix("module."): v for k, v in ckpt["averages"]["ema"].items()
           if k.startswith("module.")}
    assert exported.keys() == ema.keys()
    assert all(torch.equal(exported[k], ema[k]) for k in exported)
    assert any(not torch.equal(exported[k], ckpt["parts"]["student"][k]) for k in exported)


def test_ema_follows_the_reference_formula():
    """ema <- p at the first update, then ema <- d * ema + (1 - d) * p."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = torch.nn.Linear(3, 2)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    expected = None
    for _ in range(4):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update_parameters(model)
        expected = model.weight.clone() if expected is None else 0.9 * expected + 0.1 * model.weight
    torch.testing.assert_close(ema.module.weight, expected)


def test_clipping_bounds_the_joint_gradient_norm():
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    (model(torch.randn(8, 4)) * 100).sum().backward()
    assert torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) > 1.0
    clip_gradients(optimizer, torch.amp.GradScaler("cpu", enabled=False), 1.0)
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert float(norm) == pytest.approx(1.0, rel=1e-5)


def test_no_decay_on_norms_and_biases():
    model = create_model("resnet8", num_classes=10)
    groups = build_optimizer(model.parameters(), lr=0.1, weight_decay=5e-4,
                             decay_norm_and_bias=False).param_groups
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert all(p.ndim > 1 for p in groups[0]["params"])
    norms_and_biases = {id(p) for m in model.modules() for p in m.parameters(recurse=False)
                        if isinstance(m, torch.nn.BatchNorm2d) or p.ndim == 1}
    assert {id(p) for p in groups[1]["params"]} == norms_and_biases
    assert len(build_optimizer(model.parameters(), lr=0.1).param_groups) == 1   # the default


def test_label_smoothing_matches_its_formula():
    """CE with smoothing eps: (1 - eps) * NLL of the label + eps * mean over classes of -log p."""
    distiller = build_distiller("kd", tiny_net(0), tiny_net(1), {})
    ctx = StepContext(0, 0, 1, label_smoothing=0.1)   # the trainer passes the run's value
    logits, targets = torch.randn(6, 10), torch.randint(0, 10, (6,))
    log_p = F.log_softmax(logits, dim=1)
    expected = (0.9 * -log_p[torch.arange(6), targets] + 0.1 * -log_p.mean(1)).mean()
    torch.testing.assert_close(distiller.cross_entropy(logits, targets, ctx), expected)
