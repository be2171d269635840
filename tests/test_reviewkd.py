"""ReviewKD (Chen et al., CVPR 2021): `hcl_loss` against a float64 loop transcription of the
reference (mdistiller distillers/ReviewKD.py, dvlab-research/ReviewKD CIFAR-100/model/reviewkd.py),
the ABF chain against the reference's per-pair tables and forward, and the distiller's term. Its
run from the config, resumed bit-exactly: tests/test_crd_dist_mlkd_ofd_reviewkd.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _compose import method_options
from distill.distillers.dkd import warmup_ramp as warmup_factor
from distill.distillers.reviewkd import ABF, ReviewFusion, ReviewKD
from distill.engine.trainer import auxiliary_parameter_count
from distill.errors import ConfigError
from distill.losses.reviewkd import hcl_loss
from distill.method import DISTILLERS, BuildInfo, StepContext, build_distiller
from distill.models import create_model, model_spec


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _levels(sizes, seed, scale=1.0, batch=2):
    return [_randn(batch, 3 + i, h, h, seed=seed + i, scale=scale) for i, h in enumerate(sizes)]


def _check_scalar(loss):
    assert loss.dtype == torch.float32 and loss.dim() == 0 and math.isfinite(loss.item())


# ---------------------------------------------------------------- hcl_loss

def _adaptive_pool(f, size):
    """PyTorch's adaptive average pooling of a (N, C, H, W) float64 array, window by window:
    rows floor(i H / size) .. ceil((i + 1) H / size), likewise columns."""
    n_, c_, h_, w_ = f.shape
    out = np.zeros((n_, c_, size, size))
    for i in range(size):
        r0, r1 = (i * h_) // size, -((-(i + 1) * h_) // size)
        for j in range(size):
            c0, c1 = (j * w_) // size, -((-(j + 1) * w_) // size)
            for n in range(n_):
                for c in range(c_):
                    out[n, c, i, j] = f[n, c, r0:r1, c0:c1].mean()
    return out


def _mse(a, b):
    total = 0.0
    for x, y in zip(a.ravel(), b.ravel()):
        total += (x - y) ** 2
    return total / a.size


def ref_hcl(feats_s, feats_t):
    """The reference's hcl: per level the full-map MSE (weight 1), then for l in 4, 2, 1 below
    the height the MSE of the l x l pooled maps, each weight half the last; divided by the
    weights' sum; summed over levels. Float64."""
    total = 0.0
    for fs, ft in zip(feats_s, feats_t):
        fs, ft = fs.detach().double().numpy(), ft.detach().double().numpy()
        loss, cnt, tot = _mse(fs, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= fs.shape[2]:
                continue
            cnt /= 2.0
            loss += cnt * _mse(_adaptive_pool(fs, size), _adaptive_pool(ft, size))
            tot += cnt
        total += loss / tot
    return total


@pytest.mark.parametrize("sizes", [(8, 4, 2, 1), (7, 3)])   # 7 and 3: overlapping windows
def test_hcl_matches_the_reference_transcription(sizes):
    fs, ft = _levels(sizes, seed=1), _levels(sizes, seed=11)
    loss = hcl_loss(fs, ft)
    _check_scalar(loss)
    assert loss.item() == pytest.approx(ref_hcl(fs, ft), rel=1e-5)
    # summed over levels, not averaged
    parts = [hcl_loss([s], [t]).item() for s, t in zip(fs, ft)]
    assert loss.item() == pytest.approx(sum(parts), rel=1e-6)


@pytest.mark.parametrize("height,norm", [(32, 1.875), (16, 1.875), (8, 1.875), (4, 1.75),
                                         (2, 1.5)])
def test_hcl_level_weights_and_normaliser(height, norm):
    """A +-1 checkerboard difference pools to 0 at every pooled size, so the level loss is the
    full-map MSE (1) over the weights' total: 1 + 1/2 + 1/4 + 1/8 when the map is 8x8 or larger."""
    ft = _randn(2, 3, height, height, seed=3)
    board = (torch.arange(height)[:, None] + torch.arange(height)[None, :]) % 2 * 2.0 - 1.0
    assert hcl_loss([ft + board], [ft]).item() == pytest.approx(1 / norm, rel=1e-6)
    # a difference constant per 4x4 block of an 8x8 map: full and 4x4 MSE c^2, 2x2 and 1x1
    # MSE of the block means
    if height == 8:
        blocks = torch.tensor([[1.0, -1.0], [3.0, 5.0]]).repeat_interleave(4, 0) \
            .repeat_interleave(4, 1)
        full = blocks.pow(2).mean().item()           # 9
        expected = (full + 0.5 * full + 0.25 * full + 0.125 * blocks.mean().item() ** 2) / norm
        assert hcl_loss([ft + blocks], [ft]).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("sizes", [(8, 4, 2, 1), (16,), (1,)])
def test_constant_maps_give_the_squared_difference(sizes):
    a, b = 1.5, -0.25
    fs = [torch.full((2, 3, h, h), a) for h in sizes]
    ft = [torch.full((2, 3, h, h), b) for h in sizes]
    loss = hcl_loss(fs, ft)
    _check_scalar(loss)
    assert loss.item() == len(sizes) * (a - b) ** 2
    assert hcl_loss(fs, fs).item() == 0.0


def test_hcl_shape_errors():
    fs = _levels((8, 4), seed=1)
    with pytest.raises(ValueError, match="level 1"):
        hcl_loss(fs, [fs[0], _randn(2, 4, 2, 2)])
    with pytest.raises(ValueError, match="level 0"):
        hcl_loss([fs[0]], [_randn(2, 4, 8, 8)])   # channels differ
    with pytest.raises(ValueError, match="numbers of levels"):
        hcl_loss(fs, fs[:1])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        hcl_loss([_randn(2, 3)], [_randn(2, 3)])
    with pytest.raises(ValueError, match="at least one"):
        hcl_loss([], [])


def test_hcl_gradients_under_bf16_autocast_and_at_large_scale():
    x = _randn(2, 3, 8, 8, seed=5)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    targets = [_randn(2, 4, 8, 8, seed=6), _randn(2, 4, 1, 1, seed=7)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
        assert out.dtype == torch.bfloat16
        outs = [out, F.adaptive_avg_pool2d(out, 1)]
        loss = hcl_loss(outs, targets)
    loss.backward()
    _check_scalar(loss)
    assert loss.item() == pytest.approx(hcl_loss([o.float() for o in outs], targets).item(),
                                        rel=1e-5)
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0

    big = [f.requires_grad_(True) for f in _levels((8, 4, 2, 1), seed=20, scale=1e3)]
    loss = hcl_loss(big, _levels((8, 4, 2, 1), seed=30, scale=1e3))
    loss.backward()
    _check_scalar(loss)
    assert loss.item() == pytest.approx(ref_hcl(big, _levels((8, 4, 2, 1), seed=30, scale=1e3)),
                                        rel=1e-5)
    assert all(torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0 for f in big)


# ---------------------------------------------------------------- the ABF chain

def _distiller(teacher_name, student_name, classes=100, **options):
    torch.manual_seed(0)
    student = create_model(student_name, num_classes=classes)
    teacher_model = create_model(teacher_name, num_classes=classes)
    info = BuildInfo(model_spec(student_name), model_spec(teacher_name), (3, 32, 32), classes,
                     student_arch=student_name)
    return build_distiller("reviewkd", student, teacher_model,
                           {**method_options("reviewkd", teacher_name, student_name), **options},
                           info)


# the reference's build_review_kd rows (shallow -> deep channels; sizes deep -> shallow) and the
# ABF parameter counts they give
REFERENCE_PAIRS = {
    ("resnet32x4", "resnet8x4"): ([64, 128, 256, 256], [64, 128, 256, 256], [1, 8, 16, 32],
                                  [1, 8, 16, 32], 256, 1_808_774),
    ("resnet56", "resnet20"): ([16, 32, 64, 64], [16, 32, 64, 64], [1, 8, 16, 32],
                               [1, 8, 16, 32], 64, 114_278),
    ("wrn_40_2", "wrn_16_2"): ([32, 64, 128, 128], [32, 64, 128, 128], [1, 8, 16, 32],
                               [1, 8, 16, 32], 128, 453_830),
}


@pytest.mark.parametrize("pair", list(REFERENCE_PAIRS))
def test_abf_chain_reproduces_the_reference_table(pair):
    in_ch, out_ch, shapes, out_shapes, mid, params = REFERENCE_PAIRS[pair]
    d = _distiller(*pair)
    abfs = d.fusion.abfs                          # deepest first, as the reference's
    assert d.fusion.mid_channels == mid == min(512, in_ch[-1])
    assert [a.conv1[0].in_channels for a in abfs] == in_ch[::-1]
    assert [a.conv2[0].out_channels for a in abfs] == out_ch[::-1]
    assert all(a.conv1[0].out_channels == a.conv2[0].in_channels == mid for a in abfs)
    assert abfs[0].att_conv is None and all(a.att_conv is not None for a in abfs[1:])
    assert all(a.att_conv[0].in_channels == 2 * mid and a.att_conv[0].out_channels == 2
               and a.att_conv[0].bias is not None for a in abfs[1:])
    assert sum(p.numel() for p in d.fusion.parameters()) == params
    assert auxiliary_parameter_count(d) == params
    # the reference's state-dict keys (mdistiller's `abfs.*`)
    assert {"abfs.0.conv1.0.weight", "abfs.0.conv2.1.running_mean",
            "abfs.3.att_conv.0.bias"} <= set(d.fusion.state_dict())
    assert [tuple(s) for s in d.fusion.out_sizes[::-1]] == [(h, h) for h in out_shapes]

    x = torch.randn(2, 3, 32, 32)
    d.train()
    d.student(x), d.teacher_logits(x)
    feats_s = [d.student_hooks.features[n] for n in d.student_layers]
    assert [f.shape[-1] if f.dim() == 4 else 1 for f in feats_s][::-1] == shapes
    outputs, feats_t = d.fuse(feats_s, [d.teacher_hooks.features[n] for n in d.teacher_layers])
    expected = [(2, c, h, h) for c, h in zip(out_ch, out_shapes[::-1])]
    assert [tuple(o.shape) for o in outputs] == [tuple(t.shape) for t in feats_t] == expected


def _levels_of(teacher_name, student_name, **options):
    info = BuildInfo(model_spec(student_name), model_spec(teacher_name))
    return ReviewKD.levels(options.get("student_layers"), options.get("teacher_layers"), info)


def test_default_levels_are_student_stages_and_teacher_preacts_then_pooled():
    assert _levels_of("resnet14", "resnet8") == (
        ["layer1", "layer2", "layer3", "fc:in"],
        ["layer1.1:preact", "layer2.1:preact", "layer3.1:preact", "fc:in"])
    assert _levels_of("wrn_40_2", "wrn_16_2") == (
        ["block1", "block2", "block3", "fc:in"],
        ["block2.layer.0.bn1:preact", "block3.layer.0.bn1:preact", "bn1:preact", "fc:in"])
    # default lists of different lengths pair from the deepest (4 student stages + pooled), as
    # the reference's zip drops the shallowest student maps
    assert _levels_of("resnet14", "resnet18")[0] == ["layer2", "layer3", "layer4", "linear:in"]


def test_abf_init_is_the_reference_kaiming_uniform():
    torch.manual_seed(0)
    abf = ABF(64, 32, 16, fuse=True)
    for conv in (abf.conv1[0], abf.conv2[0]):
        fan_in = conv.weight[0].numel()
        bound = math.sqrt(3.0 / fan_in)            # kaiming_uniform_(a=1): gain 1
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
        assert conv.bias is None
    for bn in (abf.conv1[1], abf.conv2[1]):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any()


def _ref_abf(abf, x, y=None, shape=None, out_shape=None):
    """mdistiller ABF.forward, line by line, on the module's own layers."""
    n, _, h, w = x.shape
    x = abf.conv1(x)
    if abf.att_conv is not None:
        y = F.interpolate(y, (shape, shape), mode="nearest")
        z = abf.att_conv(torch.cat([x, y], dim=1))
        x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
    if x.shape[-1] != out_shape:
        x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
    return abf.conv2(x), x


def test_fusion_chain_matches_the_reference_forward():
    """A shufflenet-like student (maps smaller than the teacher's: 16, 8, 4 onto 32, 16, 8) so
    every ABF resizes its output and passes on a residual at the teacher's size, which the next
    level resizes back to its own."""
    torch.manual_seed(0)
    in_ch, out_ch, sizes, out_sizes = [6, 10, 12, 12], [4, 6, 8, 8], [16, 8, 4, 1], [32, 16, 8, 1]
    fusion = ReviewFusion(in_ch, out_ch, [(s, s) for s in out_sizes]).train()
    feats = [_randn(3, c, s, s, seed=40 + i) for i, (c, s) in enumerate(zip(in_ch, sizes))]
    outputs = fusion(feats)
    # mdistiller ReviewKD.forward_train, with its SHAPES / OUT_SHAPES lists (deep -> shallow)
    x, shapes, out_shapes = feats[::-1], sizes[::-1], out_sizes[::-1]
    out, res = _ref_abf(fusion.abfs[0], x[0], out_shape=out_shapes[0])
    results = [out]
    residuals = [res]
    for f, abf, shape, out_shape in zip(x[1:], fusion.abfs[1:], shapes[1:], out_shapes[1:]):
        out, res = _ref_abf(abf, f, res, shape, out_shape)
        results.insert(0, out)
        residuals.append(res)
    assert len(outputs) == len(results) == 4
    for ours, ref, c, s in zip(outputs, results, out_ch, out_sizes):
        assert ours.shape == (3, c, s, s) and torch.allclose(ours, ref, atol=1e-6)
    assert residuals[1].shape[-1] == 8   # the 4x4 level's residual, at the teacher's 8x8
    # the pooled level's residual is broadcast over the next level's pixels by the upsampling
    up = F.interpolate(residuals[0], (4, 4), mode="nearest")
    assert torch.equal(up, residuals[0].expand(-1, -1, 4, 4))


# ---------------------------------------------------------------- the distiller

def test_warmup_factor_by_epoch():
    # mdistiller's min(epoch / 20, 1) with its 1-based epoch; ours is 0-based
    assert [warmup_factor(e, 20) for e in (0, 1, 9, 18, 19, 20, 100)] == [
        0.05, 0.1, 0.5, 0.95, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0 and warmup_factor(0, 1) == 1.0
    assert method_options("reviewkd")["warmup_epochs"] == 20


def test_term_is_the_weighted_hcl_on_the_fusion_outputs():
    d = _distiller("resnet14", "resnet8", classes=10, feat_weight=3.0, warmup_epochs=4)
    assert d.parts["fusion"].optimizer == "main" and not d.parts["fusion"].evaluated
    assert not d.parts["fusion"].frozen and d.exported_role == "student"
    assert d.traits.follows_run_length is False
    d.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits, terms = d(x, y, StepContext(epoch=1, step=0, epochs=10))
    assert set(terms) == {"ce", "reviewkd"}
    assert torch.allclose(terms["ce"], F.cross_entropy(logits, y))
    student, frozen = d.student, d.teacher
    # the teacher in eval mode, no grad; its levels are the sums before the last ReLU of each
    # stage (the reference's preact feats[1:]), then the pooled feature
    assert not frozen.training
    feats_t = [d.teacher_hooks.features[n] for n in d.teacher_layers]
    assert not any(f.requires_grad for f in feats_t)
    outs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, k=k: outs.__setitem__(k, o))
             for k, m in (("t1", frozen.layer1), ("t2", frozen.layer2), ("t3", frozen.layer3),
                          ("s1", student.layer1), ("s2", student.layer2), ("s3", student.layer3))]
    hooks += [net.fc.register_forward_pre_hook(lambda m, a, k=k: outs.__setitem__(k, a[0]))
              for k, net in (("tp", frozen), ("sp", student))]
    with torch.no_grad():
        frozen(x)
    student(x)   # train mode again: batch statistics, the same features
    [h.remove() for h in hooks]
    for i, name in enumerate(("t1", "t2", "t3")):
        assert torch.equal(F.relu(feats_t[i]), outs[name]) and (feats_t[i] < 0).any()
    assert torch.equal(feats_t[3], outs["tp"]) and feats_t[3].shape == (4, 64)
    fused = d.fusion([outs["s1"], outs["s2"], outs["s3"], outs["sp"][:, :, None, None]])
    targets = [*feats_t[:3], outs["tp"][:, :, None, None]]
    expected = 3.0 * (2 / 4) * hcl_loss(fused, targets)   # epoch 1 of a 4-epoch warm-up
    assert torch.allclose(terms["reviewkd"], expected, rtol=1e-5)
    # gradients reach the student and every ABF, never the teacher
    d.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in frozen.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in d.fusion.parameters())
    assert student.layer1[0].conv1.weight.grad.abs().sum() > 0


def test_a_step_under_bf16_autocast_is_finite():
    """bf16 student, teacher and ABFs (the residual resized and mixed in bf16): a float32 term
    and finite gradients for every ABF parameter."""
    d = _distiller("resnet14", "resnet8", classes=10).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, terms = d(x, y, StepContext(epoch=30, step=0, epochs=40))
    assert terms["reviewkd"].dtype == torch.float32 and torch.isfinite(terms["reviewkd"])
    sum(terms.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in d.fusion.parameters())


def test_teacher_without_preact_features_is_a_clear_error():
    for teacher_name in ("shufflenetv1", "mobilenetv2"):
        with pytest.raises(ConfigError) as err:
            _levels_of(teacher_name, "resnet8")
        assert err.value.key == "distiller.teacher_layers"
        assert "pre-activation" in err.value.message and "teacher_layers" in err.value.allowed
    # named by hand, any teacher works
    d = _distiller("shufflenetv1", "resnet8", classes=10,
                   teacher_layers=["layer1", "layer2", "layer3", "linear:in"])
    _, terms = d(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]),
                 StepContext(epoch=0, step=0, epochs=1))
    assert torch.isfinite(terms["reviewkd"])


def test_level_counts_that_cannot_be_paired_are_refused():
    with pytest.raises(ConfigError) as err:
        _levels_of("resnet14", "resnet8", student_layers=["layer3", "fc:in"],
                   teacher_layers=["fc:in"])
    assert err.value.key == "distiller.student_layers" and "same length" in err.value.allowed
    with pytest.raises(ConfigError) as err:
        DISTILLERS.get("reviewkd").check_values({"max_mid_channel": 0})
    assert err.value.key == "distiller.max_mid_channel"


def test_config_defaults_and_tuned_weight():
    assert method_options("reviewkd") == {"ce_weight": 1.0, "feat_weight": 5.0,
                                          "warmup_epochs": 20, "max_mid_channel": 512,
                                          "student_layers": None, "teacher_layers": None}
    tuned = method_options("reviewkd", "resnet56", "resnet20",
                           "+tuned.reviewkd.feat_weight=0.6")
    assert tuned["feat_weight"] == 0.6
    assert ReviewKD.loss_term_weights(tuned) == {"ce_weight": 1.0, "feat_weight": 0.6}
