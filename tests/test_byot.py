"""BYOT (Be Your Own Teacher): its losses against the official code's formulas, its exit heads on
students of different stage layouts, the exits as models of their own (torch.fx cuts of the
student), a run from the config that resumes bit-exactly, and `tools/export.py --exit`.

Fake data, 64 images in batches of 16 (4 steps an epoch), resnet8, no teacher.
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

from _compose import make_cfg
from distill.app import run
from distill.checkpoint import read_checkpoint
from distill.distillers.byot import BYOT, ExitAttention, ExitHead, SepConv
from distill.errors import ConfigError
from distill.export import cpu_threads, flops_per_image, load_exit, read_run, reload_exported
from distill.losses import kd_loss
from distill.losses.byot import byot_feature_loss, byot_soft_ce
from distill.method import BuildInfo, StepContext, build_distiller, teacher_label
from distill.models import ModelSpec, create_model, model_spec

REPO = Path(__file__).resolve().parents[1]
BASE = ["dataset=fake", "dataset.train_size=64", "dataset.val_size=32", "student=resnet8",
        "trainer.batch_size=16", "trainer.epochs=2", "device=cpu", "zoo.publish=false",
        "trainer.log_every=1", "distiller=byot"]
CTX = StepContext(epoch=0, step=0, epochs=1)


# one xdist worker runs the whole module: its module fixtures build and train once
pytestmark = pytest.mark.xdist_group("byot")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and a second one that another process keeps busy
    slows every op tenfold (a 2-core machine with other work on it)."""
    with cpu_threads(1):
        yield


def build(name: str, classes: int = 10, **options) -> BYOT:
    torch.manual_seed(0)
    student = create_model(name, num_classes=classes)
    return build_distiller("byot", student, None, options,
                           BuildInfo(model_spec(name), None, (3, 32, 32), classes,
                                     student_arch=name))


@pytest.fixture(scope="module")
def resnet8() -> BYOT:
    return build("resnet8")


@pytest.fixture(scope="module")
def mobilenet() -> BYOT:
    return build("mobilenetv2")


# --- (a) the losses: the official train.py's formulas ---------------------------------------------
def _logits(seed: int, shape=(5, 7)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64) * 3


def official_soft_ce(outputs: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    """train.py `CrossEntropy`: -(log_softmax(out / T) * softmax(targets / T)).sum(1).mean()."""
    def log_softmax(z):
        z = z / temperature
        shifted = z - z.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    return float(-(log_softmax(outputs) * np.exp(log_softmax(targets))).sum(axis=1).mean())


@pytest.mark.parametrize("temperature", [1.0, 3.0, 0.5])
def test_soft_ce_is_the_official_cross_entropy_without_t_squared(temperature):
    s, t = _logits(0), _logits(1)
    got = byot_soft_ce(s, t, temperature)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(official_soft_ce(s.numpy(), t.numpy(), temperature),
                                       rel=1e-6)
    # KL(p_t || p_s) plus the teacher's entropy: the reference KD loss over T^2, plus H(p_t)
    entropy = byot_soft_ce(t, t, temperature)
    assert (got - entropy).item() == pytest.approx(
        kd_loss(s, t, temperature).item() / temperature ** 2, rel=1e-5)


def test_feature_loss_is_torch_dist_the_l2_norm_of_the_whole_batch_difference():
    f, g = _logits(2, (4, 9)), _logits(3, (4, 9))
    got = byot_feature_loss(f, g)
    assert got.dtype == torch.float32
    expected = math.sqrt(((f.numpy() - g.numpy()) ** 2).sum())   # neither squared nor averaged
    assert got.item() == pytest.approx(expected, rel=1e-6)


# --- (b) the exit heads ------------------------------------------------------------------------
def _plan(head: ExitHead) -> list[tuple[int, int]]:
    return [(m.op[0].in_channels, m.op[5].out_channels) for m in head.body
            if isinstance(m, SepConv)]


def test_resnet8_exits_follow_the_official_heads_down_to_the_last_stage(resnet8):
    """16/32/64 channels at 32/16/8: exit1 two SepConvs, exit2 one, pooled 64-d features; the
    feature term (and an adapter) only for exit1, the official code's quirk."""
    d = resnet8
    assert d.stage_layers == ["layer1", "layer2"] and d.feature_layer == "fc:in"
    assert [_plan(h) for h in d.exits] == [[(16, 32), (32, 64)], [(32, 64)]]
    assert [h.attention.bn.num_features for h in d.exits] == [16, 32]
    assert [h.fc.in_features for h in d.exits] == [64, 64]
    assert [(a.in_features, a.out_features) for a in d.adapters] == [(64, 64)]
    for head, (c, size) in zip(d.exits, [(16, 32), (32, 16)]):
        logits, feature = head(torch.randn(3, c, size, size))
        assert logits.shape == (3, 10) and feature.shape == (3, 64)


def test_mobilenetv2_exits_reach_the_deepest_stage_from_four_sizes(mobilenet):
    """Stages of 12/16/48/160 channels at 16/8/4/2; the pooled feature (1280) is not the last
    stage's: the heads end at 160 channels, the adapters map 160 -> 1280."""
    d = mobilenet
    assert d.stage_layers == ["blocks.1", "blocks.2", "blocks.4"]
    assert [_plan(h) for h in d.exits] == [[(12, 24), (24, 48), (48, 160)],
                                          [(16, 32), (32, 160)], [(48, 160)]]
    assert [(a.in_features, a.out_features) for a in d.adapters] == [(160, 1280)] * 2
    for head, (c, size) in zip(d.exits, [(12, 16), (16, 8), (48, 4)]):
        logits, feature = head(torch.randn(2, c, size, size))
        assert logits.shape == (2, 10) and feature.shape == (2, 160)


def test_the_zoo_resnet18_gets_exactly_the_official_heads():
    d = build("resnet18")
    assert [_plan(h) for h in d.exits] == [[(64, 128), (128, 256), (256, 512)],
                                          [(128, 256), (256, 512)], [(256, 512)]]
    assert [(a.in_features, a.out_features) for a in d.adapters] == [(512, 512)] * 2


def test_attention_keeps_any_size_and_is_the_official_x2_upsampling_on_even_ones():
    torch.manual_seed(0)
    attention = ExitAttention(4).eval()
    odd = torch.randn(2, 4, 7, 7)
    assert attention(odd).shape == odd.shape
    x = torch.randn(2, 4, 8, 8)
    official = nn.Sequential(attention.conv, attention.bn, nn.ReLU(),
                             nn.Upsample(scale_factor=2, mode="bilinear"), nn.Sigmoid())
    assert torch.allclose(attention(x), official(x) * x, atol=1e-6)


def test_a_stage_at_the_deepest_size_gets_no_sepconv_and_a_1x1_conv_for_its_channels():
    same, wider = ExitHead(8, 8, 0, 5), ExitHead(8, 16, 0, 5)
    assert len(same.body) == 0
    assert isinstance(wider.body[0], nn.Conv2d) and wider.body[0].kernel_size == (1, 1)
    assert wider(torch.randn(2, 8, 4, 4))[1].shape == (2, 16)


def test_forward_terms_are_the_official_loss(resnet8):
    d = resnet8
    d.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits, terms = d(x, y, CTX)
    assert set(terms) == {"ce", "exit_ce", "exit_kd", "exit_feat"}
    feats = dict(d.hooks.features)
    (out1, f1), (out2, _) = d.exits[0](feats["layer1"]), d.exits[1](feats["layer2"])
    alpha, temperature = 0.3, 3.0
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    ce = F.cross_entropy(out1, y) + F.cross_entropy(out2, y)
    assert terms["exit_ce"].item() == pytest.approx((1 - alpha) * ce.item(), rel=1e-5)
    kd = byot_soft_ce(out1, logits, temperature) + byot_soft_ce(out2, logits, temperature)
    assert terms["exit_kd"].item() == pytest.approx(alpha * kd.item(), rel=1e-5)
    feat = torch.dist(d.adapters[0](f1), feats["fc:in"])   # exit1 only: the official quirk
    assert terms["exit_feat"].item() == pytest.approx(0.03 * feat.item(), rel=1e-5)
    sum(terms.values()).backward()   # the deepest targets are detached: only the exits learn them
    assert all(p.grad is not None for p in d.exits.parameters())


@pytest.mark.parametrize("which", ["resnet8", "mobilenet"])
def test_each_exit_model_is_the_hooked_computation_and_costs_less_than_the_student(
        which, request):
    d = request.getfixturevalue(which)
    d.eval()
    x = torch.randn(3, 3, 32, 32)
    exits = d.derived_models()
    assert list(exits) == [f"exit{i}" for i in range(1, len(d.stage_layers) + 1)]
    with torch.no_grad():
        d.student(x)
        feats = dict(d.hooks.features)
        for head, stage, model in zip(d.exits, d.stage_layers, exits.values()):
            assert torch.equal(model(x), head(feats[stage])[0]), stage
    student_flops = flops_per_image(d.student, (3, 32, 32))
    flops = [flops_per_image(m, (3, 32, 32)) for m in exits.values()]
    assert flops == sorted(flops) and flops[-1] < student_flops
    # the cut holds nothing after its stage; nothing of it is a part of the distiller
    deepest = dict(exits[f"exit{len(exits)}"].body.named_modules())
    assert d.all_stages[-1] not in deepest and d.feature_layer[:-3] not in deepest
    assert all(k.split(".")[0] in ("student", "exits", "adapters") for k in d.state_dict())


def test_exit_models_run_the_live_weights_and_keep_the_students_mode():
    d = build("resnet8")
    d.train()
    exit1 = d.derived_models()["exit1"]
    assert exit1.training
    x = torch.randn(2, 3, 32, 32)
    exit1.eval()
    before = exit1(x)
    with torch.no_grad():
        d.student.conv1.weight.add_(0.1)
    assert not torch.equal(exit1(x), before)
    exit1.train(True)   # what the trainer's evaluate() restores: the mode it found
    assert all(m.training for m in d.student.modules())


class _Branchy(nn.Module):
    """Stages, but a forward torch.fx cannot trace (a branch on the data)."""

    def __init__(self):
        super().__init__()
        self.layer1, self.layer2 = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 8, 3, 2, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.layer1(x)
        if x.sum() > 0:
            x = x * 2
        return self.fc(self.layer2(x).mean((2, 3)))


@pytest.mark.parametrize("stages", [("layer1", "layer2"), ("layer2",)])
def test_students_it_cannot_cut_are_refused_naming_student(stages):
    spec = ModelSpec(stages=stages, classifier="fc", input_size=32, family="test")
    with pytest.raises(ConfigError) as err:
        build_distiller("byot", _Branchy(), None, {}, BuildInfo(spec, None, (3, 32, 32), 10))
    assert err.value.key == "student"
    assert ("torch.fx" in err.value.message) == (len(stages) == 2)


def test_options_are_checked_and_no_weight_can_leave_nothing_to_train():
    for bad in ({"alpha": 1.5}, {"temperature": 0}, {"feature_weight": -1}):
        with pytest.raises(ConfigError) as err:
            BYOT.check_values(bad)
        assert err.value.key == f"distiller.{next(iter(bad))}"
    weights = BYOT.loss_term_weights({"alpha": 0.0, "feature_weight": 0.0})
    assert weights["ce_weight"] == 1.0   # the deepest CE: fixed, so every run trains
    assert teacher_label(BYOT, {}, "resnet56") is None


# --- (c) a run from the config ------------------------------------------------------------------
def _parts(run_dir: Path) -> dict:
    return read_checkpoint(run_dir / "checkpoints" / "last.pt")["parts"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A straight 2-epoch run, and the same run cut at step 3 and resumed."""
    home = tmp_path_factory.mktemp("byot")
    run(make_cfg(home, *BASE, run="straight"))
    run(make_cfg(home, *BASE, "trainer.max_steps=3", run="resumed"))
    run(make_cfg(home, *BASE, run="resumed"))
    return home


def test_runs_reports_its_exits_and_resumes_bit_exactly(runs):
    straight, resumed = (json.loads((runs / name / "summary.json").read_text())
                         for name in ("straight", "resumed"))
    assert straight["steps"] == resumed["steps"] == 8 and straight["teachers"] == []
    a, b = _parts(runs / "straight"), _parts(runs / "resumed")
    assert set(a) == set(b) == {"student", "exits", "adapters"}
    for role in a:
        for key, value in a[role].items():
            assert torch.equal(value, b[role][key]), f"{role}.{key}"
    assert straight["models"] == resumed["models"]
    models = straight["models"]
    assert set(models) == {"student", "exit1", "exit2"}
    assert models["exit1"]["arch"] == "resnet8:exit1"
    assert 0 < models["exit1"]["flops"] < models["exit2"]["flops"]
    assert 0 < models["exit1"]["params"] < models["exit2"]["params"] < models["student"]["params"]
    events = [json.loads(line) for line in (runs / "straight" / "metrics.jsonl").open()]
    last = [e for e in events if e["event"] == "train"][-1]
    terms = {k[len("train/"):] for k in last if k.startswith("train/")}
    assert terms - {"loss", "lr", "epoch", "images_per_sec"} == {"ce", "exit_ce", "exit_kd",
                                                                 "exit_feat"}


# --- (d) exporting one exit ---------------------------------------------------------------------
def load_tool():
    spec = importlib.util.spec_from_file_location("export_tool", REPO / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_of_an_exit_is_the_cut_student_and_its_head(runs, capsys):
    pytest.importorskip("onnx")
    run_dir = runs / "straight"
    code = load_tool().main([str(run_dir), "--exit", "1", "--batch", "2", "--budget", "0"])
    assert code == 0, capsys.readouterr().err
    assert "student resnet8:exit1" in " ".join(capsys.readouterr().out.split())
    out = run_dir / "export-exit1"
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "student.onnx",
                                                     "student.safetensors"]
    report = json.loads((out / "export.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())["models"]["exit1"]
    student = report["student"]
    assert report["exit"] == 1 and student["model"] == "resnet8:exit1"
    assert (student["params"], student["flops_per_image"]) == (summary["params"], summary["flops"])
    assert student["top1"] == summary["last_top1"] and report["teacher"]["model"] is None
    assert report["onnx"]["max_abs_diff"] <= 1e-4 or "checker" in report["onnx"]["check"]
    # the weights are the checkpoint's heads and the exported student's layers
    model = load_exit(read_run(run_dir), 1)
    weights = load_file(str(out / "student.safetensors"))
    assert set(weights) == set(model.state_dict())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    heads = _parts(run_dir)["exits"]
    assert torch.equal(weights["head.fc.weight"], heads["0.fc.weight"])
    with pytest.raises(ConfigError, match="early exit 1"):
        reload_exported(out / "student.safetensors")


def test_exits_a_run_does_not_have_are_refused_with_exit_2_and_nothing_written(runs, tmp_path,
                                                                              capsys):
    tool, run_dir = load_tool(), runs / "straight"
    assert tool.main([str(run_dir), "--exit", "9", "--no-onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --exit:") and "allowed: 1, 2" in err
    assert not (run_dir / "export-exit9").exists()
    plain = tmp_path / "kd"   # the same run, recorded as a KD run: no exits
    (plain / ".hydra").mkdir(parents=True)
    for name in ("summary.json", "student.safetensors"):
        shutil.copy(run_dir / name, plain / name)
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    config["distiller"] = {"name": "kd", "ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0}
    (plain / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    before = sorted(p.name for p in plain.rglob("*"))
    assert tool.main([str(plain), "--exit", "1", "--no-onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --exit: this kd run has no early exits") and "byot" in err
    assert len(err.strip().splitlines()) <= 3
    assert sorted(p.name for p in plain.rglob("*")) == before
