"""OFD (Heo et al., ICCV 2019): `ofd_loss` and `ofd_margin` against float64 transcriptions of the
reference code (clovaai/overhaul-distillation CIFAR-100/distiller.py, mdistiller OFD.py) and the
hand-checked numbers of its summary; the distiller's layers, margins, connectors and terms; the
teacher's batch-statistics forward that leaves its running statistics alone; a clear refusal for
models without pre-activation features. Its run from the config, resumed bit-exactly:
tests/test_crd_dist_mlkd_ofd_reviewkd.py.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _compose import make_cfg, method_options
from distill.app import run
from distill.distillers.ofd import batchnorm_batch_statistics
from distill.engine.trainer import auxiliary_parameter_count
from distill.errors import ConfigError
from distill.features import FeatureHooks
from distill.losses.ofd import ofd_loss, ofd_margin
from distill.method import BuildInfo, StepContext, build_distiller
from distill.models import create_model, model_spec


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _check_scalar(loss):
    assert loss.dtype == torch.float32 and loss.dim() == 0 and math.isfinite(loss.item())


def _margins(channels, seed):
    """Reference-like margins: ofd_margin of random BN affine parameters (all negative)."""
    g = torch.Generator().manual_seed(seed)
    return ofd_margin(torch.rand(channels, generator=g) * 2 + 0.1,
                      torch.randn(channels, generator=g) * 2)


# ---------------------------------------------------------------- ofd_loss

def ref_ofd(fs, ft, margin):
    """overhaul-distillation `distillation_loss` in float64 loops, with mdistiller's reduction
    and pooling: t' = max(t, m_c) (t adaptive-avg-pooled to the student's H, W), (s - t')^2
    where s > t' or t' > 0, summed over everything, over the batch size."""
    s, t, m = fs.double().numpy(), ft.double().numpy(), margin.double().numpy()
    n_, c_, h_, w_ = s.shape
    th, tw = t.shape[2:]
    total = 0.0
    for n in range(n_):
        for c in range(c_):
            for h in range(h_):
                for w in range(w_):
                    h0, h1 = (h * th) // h_, -((-(h + 1) * th) // h_)
                    w0, w1 = (w * tw) // w_, -((-(w + 1) * tw) // w_)
                    tt = max(float(t[n, c, h0:h1, w0:w1].mean()), float(m[c]))
                    if s[n, c, h, w] > tt or tt > 0:
                        total += (s[n, c, h, w] - tt) ** 2
    return total / n_


def md_feat_loss(source, target, margin):
    """mdistiller OFD.py `feat_loss` (three masked terms, abs, mean over the batch, sum), float64."""
    source, target = source.double(), target.double()
    margin = margin.double().view(1, -1, 1, 1)
    loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin)).double()
            + (source - target) ** 2 * ((source > target) & (target > margin)
                                        & (target <= 0)).double()
            + (source - target) ** 2 * (target > 0).double())
    return torch.abs(loss).mean(dim=0).sum().item()


@pytest.mark.parametrize("shapes", [((3, 4, 5, 5), (3, 4, 5, 5)),
                                    ((2, 3, 4, 4), (2, 3, 8, 8)),     # teacher pooled 8 -> 4
                                    ((2, 3, 3, 3), (2, 3, 7, 5))])    # uneven windows
def test_ofd_loss_matches_the_reference_formula(shapes):
    fs, ft = _randn(*shapes[0], seed=1), _randn(*shapes[1], seed=2)
    margin = _margins(shapes[0][1], seed=3)
    loss = ofd_loss(fs, ft, margin)
    _check_scalar(loss)
    assert loss.item() == pytest.approx(ref_ofd(fs, ft, margin), rel=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_ofd_loss_equals_mdistillers_three_term_form(seed):
    fs, ft = _randn(4, 6, 5, 5, seed=seed, scale=2.0), _randn(4, 6, 5, 5, seed=seed + 10, scale=2.0)
    margin = _margins(6, seed=seed + 20)
    assert (margin < 0).all()
    assert ofd_loss(fs, ft, margin).item() == pytest.approx(md_feat_loss(fs, ft, margin), rel=1e-5)


@pytest.mark.parametrize("t,s,expected", [
    (1.0, 0.0, 1.0),      # positive teacher: always (s - t)^2
    (-0.2, 0.0, 0.04),    # margin < t <= 0, student above: (s - t)^2
    (-0.2, -0.3, 0.0),    # student below a negative teacher: free
    (-1.0, 0.0, 0.25),    # teacher below the margin: the target is the margin
    (-1.0, -0.7, 0.0),    # student below the margin (the clamped target): free
    (-1.0, -2.0, 0.0),
])
def test_ofd_loss_hand_checked_mask_cases(t, s, expected):
    margin = torch.tensor([-0.5])
    loss = ofd_loss(torch.tensor([[[[s]]]]), torch.tensor([[[[t]]]]), margin)
    assert loss.item() == pytest.approx(expected, abs=1e-7)
    assert md_feat_loss(torch.tensor([[[[s]]]]), torch.tensor([[[[t]]]]), margin) == \
        pytest.approx(expected, abs=1e-7)


def test_ofd_loss_invariants():
    ft, margin = _randn(3, 4, 4, 4, seed=4, scale=2.0), _margins(4, seed=5)
    # the teacher itself costs nothing (below the margin it is below max(t, m))
    assert ofd_loss(ft.clone(), ft, margin).item() == 0.0
    # any student below a non-positive target costs nothing
    below = torch.minimum(ft, margin.view(1, -1, 1, 1)) - 1.0
    assert ofd_loss(below, ft.clamp(max=0), margin).item() == 0.0
    # a batch duplicated: the loss is a per-sample mean
    fs = _randn(3, 4, 4, 4, seed=6)
    assert ofd_loss(torch.cat([fs, fs]), torch.cat([ft, ft]), margin).item() == \
        pytest.approx(ofd_loss(fs, ft, margin).item(), rel=1e-6)
    # the sum over C, H, W of the masked squares over N
    assert ofd_loss(fs, ft, margin).item() == pytest.approx(ref_ofd(fs, ft, margin), rel=1e-5)
    # pooling: the same as the teacher pooled beforehand
    big = _randn(3, 4, 8, 8, seed=7)
    assert torch.allclose(ofd_loss(fs, big, margin),
                          ofd_loss(fs, F.adaptive_avg_pool2d(big, (4, 4)), margin))


def test_ofd_loss_gradients_reach_the_student_only():
    fs = _randn(2, 3, 4, 4, seed=8).requires_grad_(True)
    ft = _randn(2, 3, 4, 4, seed=9).requires_grad_(True)
    margin = _margins(3, seed=10).requires_grad_(True)
    ofd_loss(fs, ft, margin).backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert ft.grad is None and margin.grad is None
    # d/ds of sum (s - t')^2 [mask] / N
    t = torch.maximum(ft.detach(), margin.detach().view(1, -1, 1, 1))
    mask = (fs.detach() > t) | (t > 0)
    assert torch.allclose(fs.grad, 2 * (fs.detach() - t) * mask / 2)


def test_ofd_loss_rejects_bad_shapes():
    margin = torch.full((3,), -0.5)
    with pytest.raises(ValueError, match="channels"):
        ofd_loss(torch.randn(2, 4, 4, 4), torch.randn(2, 3, 4, 4), margin)
    with pytest.raises(ValueError, match="batch size"):
        ofd_loss(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4), margin)
    with pytest.raises(ValueError, match=r"margin must have shape \(3,\)"):
        ofd_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), margin.view(1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"margin must have shape \(3,\)"):
        ofd_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="4-D"):
        ofd_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), margin)


def test_ofd_loss_gradients_under_bf16_autocast_and_at_large_scale():
    x = _randn(2, 3, 6, 6, seed=11)
    connector = torch.nn.Conv2d(3, 4, 1, bias=False)
    target, margin = _randn(2, 4, 6, 6, seed=12), _margins(4, seed=13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        source = connector(x)
        assert source.dtype == torch.bfloat16
        loss = ofd_loss(source, target.bfloat16(), margin)
    loss.backward()
    _check_scalar(loss)
    assert loss.item() == pytest.approx(ofd_loss(source.float(), target.bfloat16().float(),
                                                 margin).item(), rel=1e-5)
    assert torch.isfinite(connector.weight.grad).all() and connector.weight.grad.abs().sum() > 0

    big = _randn(2, 4, 6, 6, seed=14, scale=1e3).requires_grad_(True)
    target = _randn(2, 4, 6, 6, seed=15, scale=1e3)
    loss = ofd_loss(big, target, margin)
    loss.backward()
    _check_scalar(loss)
    assert loss.item() == pytest.approx(ref_ofd(big.detach(), target, margin), rel=1e-5)
    assert torch.isfinite(big.grad).all()


# ---------------------------------------------------------------- ofd_margin

@pytest.mark.parametrize("gamma,beta,expected", [
    (1.0, 0.0, -0.7978845608), (2.0, 1.0, -1.2821555407), (1.0, -1.0, -1.2875999709),
    (0.5, 0.2, -0.3343780859), (1.0, 3.0, -0.2830986549),   # Phi(-3) = 0.00135: the formula
    (1.0, 3.2, -3.0), (-1.0, 0.0, -0.7978845608), (1.0, 4.0, -3.0)])
def test_ofd_margin_values(gamma, beta, expected):
    margin = ofd_margin(torch.tensor([gamma]), torch.tensor([beta]))
    assert margin.shape == (1,) and margin.dtype == torch.float32
    assert margin.item() == pytest.approx(expected, abs=1e-6)


def _ref_margin(s, m):
    """get_margin_from_BN for one channel, scipy's norm.cdf written with math.erfc."""
    s = abs(s)
    cdf = 0.5 * math.erfc((m / s) / math.sqrt(2))
    if cdf > 0.001:
        return -s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf + m
    return -3 * s


def test_ofd_margin_matches_the_reference_per_channel():
    g = torch.Generator().manual_seed(16)
    gamma, beta = torch.randn(200, generator=g) * 2, torch.randn(200, generator=g) * 4
    margin = ofd_margin(gamma, beta)
    expected = [_ref_margin(s, m) for s, m in zip(gamma.double().tolist(), beta.double().tolist())]
    assert np.allclose(margin.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert (margin < 0).all()
    # gamma 0 (the reference divides by zero): the limits, finite
    zero = ofd_margin(torch.zeros(3), torch.tensor([-1.0, 0.0, 2.0]))
    assert zero.tolist() == [-1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"\(C,\)"):
        ofd_margin(torch.ones(2, 2), torch.ones(2, 2))


# ---------------------------------------------------------------- the distiller

def _build(teacher_arch="resnet14", student_arch="resnet8", randomise_bn=True, **options):
    torch.manual_seed(0)
    student = create_model(student_arch, num_classes=10)
    teacher = create_model(teacher_arch, num_classes=10)
    if randomise_bn:   # margins that differ from channel to channel and layer to layer
        g = torch.Generator().manual_seed(1)
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.data = torch.rand(m.num_features, generator=g) * 1.5 + 0.1
                m.bias.data = torch.randn(m.num_features, generator=g)
                m.running_mean.data = torch.randn(m.num_features, generator=g) * 0.1
                m.running_var.data = torch.rand(m.num_features, generator=g) + 0.5
    info = BuildInfo(model_spec(student_arch), model_spec(teacher_arch), (3, 32, 32), 10,
                     student_arch=student_arch)
    options = {**method_options("ofd", teacher_arch, student_arch), **options}
    return build_distiller("ofd", student, teacher, options, info).train()


def test_defaults_are_mdistillers_cifar100_recipe():
    assert method_options("ofd") == {"ce_weight": 1.0, "feat_weight": 0.001,
                                     "teacher_batch_stats": True, "student_layers": None,
                                     "teacher_layers": None}


def test_connectors_are_the_references():
    """resnet32x4 -> resnet8x4: three 1x1 conv (no bias) + BN, 86,912 parameters, conv weights
    ~ N(0, 2 / C_teacher), BN 1 and 0; trained with the student by the main optimizer."""
    d = _build("resnet32x4", "resnet8x4", randomise_bn=False)
    assert d.layer_weights == [0.25, 0.5, 1.0]
    assert sum(p.numel() for p in d.connectors.parameters()) == 86912
    for c, (s_ch, t_ch) in zip(d.connectors, [(64, 64), (128, 128), (256, 256)]):
        assert c.conv.weight.shape == (t_ch, s_ch, 1, 1) and c.conv.bias is None
        assert c.conv.weight.std().item() == pytest.approx(math.sqrt(2 / t_ch), rel=0.05)
        assert abs(c.conv.weight.mean().item()) < 0.1 * math.sqrt(2 / t_ch)
        assert torch.equal(c.bn.weight, torch.ones(t_ch)) and torch.equal(c.bn.bias,
                                                                          torch.zeros(t_ch))
        assert c.margin.shape == (t_ch,) and "margin" in c.state_dict()
    main = {id(p) for p in d.parameter_groups()["main"]}
    assert {id(p) for p in d.connectors.parameters()} <= main
    assert auxiliary_parameter_count(d) == 86912


def test_term_is_the_weighted_loss_on_the_reference_layers_with_their_bns_margins():
    d = _build(feat_weight=3.0)
    assert d.student_layers == ["layer1.0:preact", "layer2.0:preact", "layer3.0:preact"]
    assert d.teacher_layers == ["layer1.1:preact", "layer2.1:preact", "layer3.1:preact"]
    teacher = d.teacher
    for c, stage in zip(d.connectors, (teacher.layer1, teacher.layer2, teacher.layer3)):
        bn = stage[-1].bn2   # the reference's get_bn_before_relu
        assert torch.equal(c.margin, ofd_margin(bn.weight, bn.bias))
    x, y = _randn(4, 3, 32, 32, seed=17), torch.randint(0, 10, (4,))
    logits, terms = d(x, y, StepContext(epoch=0, step=0, epochs=1))
    assert set(terms) == {"ce", "ofd"}
    assert torch.allclose(terms["ce"], F.cross_entropy(logits, y))
    feats_s = [d.student_hooks.features[n] for n in d.student_layers]
    feats_t = [d.teacher_hooks.features[n] for n in d.teacher_layers]
    # the teacher maps: pre-ReLU sums of the last block of each stage, batch statistics
    ref = copy.deepcopy(teacher).train()
    with FeatureHooks(ref, d.teacher_layers) as hooks, torch.no_grad():
        ref(x)
        for n, f in zip(d.teacher_layers, feats_t):
            assert torch.equal(f, hooks.features[n])
            assert (f < 0).any()   # before the ReLU
    expected = sum(w * ofd_loss(c(s), t, c.margin) for w, c, s, t in
                   zip([0.25, 0.5, 1.0], d.connectors, feats_s, feats_t))
    assert torch.allclose(terms["ofd"], 3.0 * expected)
    assert terms["ofd"].item() == pytest.approx(
        3.0 * sum(w * ref_ofd(c(s).detach(), t, c.margin) for w, c, s, t in
                  zip([0.25, 0.5, 1.0], d.connectors, feats_s, feats_t)), rel=1e-4)
    terms["ofd"].backward()
    assert all(p.grad is not None for p in d.connectors.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_batch_stats_false_runs_the_teacher_in_eval_mode():
    d = _build(teacher_batch_stats=False)
    x, y = _randn(4, 3, 32, 32, seed=18), torch.randint(0, 10, (4,))
    d(x, y, StepContext(epoch=0, step=0, epochs=1))
    ref = copy.deepcopy(d.teacher).eval()
    with FeatureHooks(ref, d.teacher_layers) as hooks, torch.no_grad():
        ref(x)
        for n in d.teacher_layers:
            assert torch.equal(d.teacher_hooks.features[n], hooks.features[n])


@pytest.mark.parametrize("teacher_arch,norms", [
    # mdistiller's get_bn_before_relu for WRN: the BN after each stage output
    ("wrn_16_1", ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"]),
    # 4 teacher stages, 3 student stages: the deepest 3 of each, margins aligned the same way
    # (mdistiller pairs the student's stage i with margins[i] of all four: one stage off)
    ("vgg8", ["block2.1", "block3.1", "block4.1"]),
])
def test_margins_come_from_the_bn_of_each_aligned_teacher_layer(teacher_arch, norms):
    d = _build(teacher_arch, "resnet8")
    spec = model_spec(teacher_arch)
    assert d.teacher_layers == list(spec.preact[-3:])
    assert len(d.student_layers) == len(d.teacher_layers) == len(d.connectors) == 3
    modules = dict(d.teacher.named_modules())
    for c, name in zip(d.connectors, norms):
        bn = modules[name]
        assert isinstance(bn, torch.nn.BatchNorm2d) and c.margin.shape == bn.weight.shape
        assert torch.equal(c.margin, ofd_margin(bn.weight, bn.bias))
    x, y = _randn(2, 3, 32, 32, seed=19), torch.randint(0, 10, (2,))
    _, terms = d(x, y, StepContext(epoch=0, step=0, epochs=1))
    assert math.isfinite(terms["ofd"].item()) and terms["ofd"].item() > 0


def test_a_training_step_leaves_the_teachers_running_statistics_alone():
    d = _build()
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    optimizer = torch.optim.SGD(d.parameter_groups()["main"], lr=0.1)
    x, y = _randn(8, 3, 32, 32, seed=20), torch.randint(0, 10, (8,))
    for step in range(2):
        _, terms = d(x, y, StepContext(epoch=0, step=step, epochs=1))
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
    after = d.teacher.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())   # num_batches_tracked too
    norms = [m for m in d.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.training and m.track_running_stats for m in norms)
    # the features equal a train-mode forward, which would have moved the statistics
    ref = copy.deepcopy(d.teacher).train()
    with FeatureHooks(ref, d.teacher_layers) as hooks, torch.no_grad():
        ref(x)
        for n in d.teacher_layers:
            assert torch.equal(d.teacher_hooks.features[n], hooks.features[n])
    assert not torch.equal(ref.layer1[0].bn1.running_mean, d.teacher.layer1[0].bn1.running_mean)


def test_batch_statistics_context_restores_the_flags_even_on_error():
    model = create_model("resnet8", num_classes=10).eval()
    model.layer1[0].bn1.train()    # a mixed state comes back as it was
    flags = {n: (m.training, getattr(m, "track_running_stats", None))
             for n, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="boom"), batchnorm_batch_statistics(model):
        assert all(m.training and not m.track_running_stats for m in model.modules()
                   if isinstance(m, torch.nn.BatchNorm2d))
        assert not model.fc.training
        raise RuntimeError("boom")
    assert flags == {n: (m.training, getattr(m, "track_running_stats", None))
                     for n, m in model.named_modules()}


@pytest.mark.parametrize("student,teacher,key", [
    ("mobilenetv2", "resnet14", "distiller.student_layers"),
    ("shufflenetv1", "resnet14", "distiller.student_layers"),
    ("resnet8", "shufflenetv2", "distiller.teacher_layers"),
])
def test_models_without_preact_features_are_refused_by_name(student, teacher, key):
    info = BuildInfo(model_spec(student), model_spec(teacher), (3, 32, 32), 10)
    with pytest.raises(ConfigError) as exc:
        build_distiller("ofd", create_model(student, num_classes=10),
                        create_model(teacher, num_classes=10), {}, info)
    assert exc.value.key == key and "pre-activation" in exc.value.message
    assert "resnet8" in exc.value.allowed and "':preact'" in exc.value.allowed
    assert "mobilenetv2" not in exc.value.allowed


def test_bad_layer_options_are_refused_by_name():
    with pytest.raises(ConfigError) as exc:   # a post-ReLU teacher map has no margin
        _build(teacher_layers=["layer1", "layer2", "layer3"])
    assert exc.value.key == "distiller.teacher_layers" and "':preact'" in exc.value.allowed
    with pytest.raises(ConfigError) as exc:
        _build(teacher_layers=["layer9.1:preact"])
    assert exc.value.key == "distiller.teacher_layers"
    with pytest.raises(ConfigError) as exc:   # unequal counts when given
        _build(student_layers=["layer3.0:preact"])
    assert exc.value.key == "distiller.student_layers"
    # pairs chosen by hand: one stage, weight 1, the block's last BN
    d = _build(student_layers=["layer3.0:preact"], teacher_layers=["layer3.1:preact"])
    assert d.layer_weights == [1.0]
    assert torch.equal(d.connectors[0].margin,
                       ofd_margin(d.teacher.layer3[1].bn2.weight, d.teacher.layer3[1].bn2.bias))


def test_a_run_with_a_mobilenet_student_is_refused_before_anything_is_written(tmp_path):
    cfg = make_cfg(tmp_path, "dataset=fake", "dataset.train_size=64", "dataset.val_size=32",
                   "student=mobilenetv2", "teacher=resnet14", "distiller=ofd", "device=cpu",
                   run="refused")
    with pytest.raises(ConfigError) as exc:
        run(cfg)
    assert exc.value.key == "distiller.student_layers"
    assert not (tmp_path / "refused").exists()
