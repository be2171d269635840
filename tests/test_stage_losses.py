"""VID, AB, FT and FSP losses against float64 loop transcriptions of the reference code
(RepDistiller distiller_zoo/{VID,AB,FT,FSP}.py), plus invariants, shape rules and precision."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    ab_loss,
    fsp_loss,
    fsp_matrix,
    ft_loss,
    vid_log_scale_init,
    vid_loss,
)


pytestmark = pytest.mark.fast   # the inner-loop tier (make test-fast): losses against their reference formulas


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _block_pool(f, h, w):
    """Adaptive average pooling of a (C, H, W) float64 array when H, W are multiples of h, w."""
    c, H, W = f.shape
    return f.reshape(c, h, H // h, w, W // w).mean(axis=(2, 4))


def _check_scalar(loss):
    assert loss.dtype == torch.float32 and loss.dim() == 0 and math.isfinite(loss.item())


# ---------------------------------------------------------------- VID

def ref_vid(pred, target, log_scale, eps=1e-5):
    """0.5 * ((mu - t)^2 / var_c + log var_c), var_c = log(1 + exp(a_c)) + eps, averaged over
    every (n, c, h, w), in float64 loops."""
    pred, target, a = pred.double().numpy(), target.double().numpy(), log_scale.double().numpy()
    n_, c_, h_, w_ = pred.shape
    total = 0.0
    for n in range(n_):
        for c in range(c_):
            var = math.log(1.0 + math.exp(a[c])) + eps
            for h in range(h_):
                for w in range(w_):
                    total += 0.5 * ((pred[n, c, h, w] - target[n, c, h, w]) ** 2 / var + math.log(var))
    return total / pred.size


def test_vid_matches_the_reference_formula():
    pred, target = _randn(3, 4, 5, 2, seed=1), _randn(3, 4, 5, 2, seed=2)
    log_scale = torch.tensor([-3.0, 0.0, 1.5, 4.0])
    expected = ref_vid(pred, target, log_scale)
    loss = vid_loss(pred, target, log_scale)
    _check_scalar(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert vid_loss(pred, target, log_scale, eps=0.1).item() == pytest.approx(
        ref_vid(pred, target, log_scale, eps=0.1), rel=1e-5)


def test_vid_init_and_the_log_variance_term_for_a_perfect_prediction():
    init = vid_log_scale_init(5.0, 1e-5)
    assert init == pytest.approx(math.log(math.exp(5.0 - 1e-5) - 1.0), rel=1e-12)
    assert vid_log_scale_init(200.0) == pytest.approx(200.0 - 1e-5, rel=1e-12)   # no overflow
    f = _randn(2, 3, 4, 4, seed=3)
    # var = softplus(init) + eps = 5 exactly: only 0.5 * log 5 is left
    loss = vid_loss(f, f.clone(), torch.full((3,), init))
    assert loss.item() == pytest.approx(0.5 * math.log(5.0), rel=1e-6)
    log_scale = torch.tensor([-1.0, 0.5, 3.0])
    var = F.softplus(log_scale.double()) + 1e-5
    assert vid_loss(f, f.clone(), log_scale).item() == pytest.approx(0.5 * var.log().mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="exceed eps"):
        vid_log_scale_init(1e-6)


def test_vid_accepts_vectors_and_rejects_bad_shapes():
    pred, target, a = _randn(4, 3, seed=4), _randn(4, 3, seed=5), torch.tensor([0.0, 1.0, 2.0])
    var = F.softplus(a.double()) + 1e-5
    expected = (0.5 * ((pred.double() - target.double()) ** 2 / var + var.log())).mean().item()
    assert vid_loss(pred, target, a).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        vid_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="log_scale"):
        vid_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"\(N, C"):
        vid_loss(torch.randn(3), torch.randn(3), torch.zeros(3))


def test_vid_gradients_under_bf16_autocast_and_at_large_scale():
    x = _randn(2, 4, 6, 6, seed=6)
    regressor = torch.nn.Conv2d(4, 5, 1, bias=False)
    log_scale = torch.nn.Parameter(torch.full((5,), vid_log_scale_init()))
    target = _randn(2, 5, 6, 6, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = regressor(x)
        assert pred.dtype == torch.bfloat16
        loss = vid_loss(pred, target, log_scale)
    loss.backward()
    _check_scalar(loss)
    assert loss.item() == pytest.approx(vid_loss(pred.float(), target, log_scale).item(), rel=1e-5)
    for g in (regressor.weight.grad, log_scale.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0

    big = _randn(2, 5, 4, 4, seed=8, scale=1e3).requires_grad_(True)
    a = torch.zeros(5, requires_grad=True)
    loss = vid_loss(big, _randn(2, 5, 4, 4, seed=9, scale=1e3), a)
    loss.backward()
    _check_scalar(loss)
    assert torch.isfinite(big.grad).all() and torch.isfinite(a.grad).all()


# ---------------------------------------------------------------- AB

def ref_ab(source, target, margin):
    """criterion_alternative_l2 element by element, then / batch / 1000 * 3, float64."""
    s, t = source.double().numpy().ravel(), target.double().numpy().ravel()
    total = 0.0
    for a, b in zip(s, t):
        total += (a + margin) ** 2 * float(a > -margin and b <= 0)
        total += (a - margin) ** 2 * float(a <= margin and b > 0)
    return total / source.shape[0] / 1000 * 3


@pytest.mark.parametrize("margin", [1.0, 0.5])
def test_ab_matches_the_reference_formula(margin):
    source, target = _randn(3, 4, 5, 5, seed=10, scale=1.5), _randn(3, 4, 5, 5, seed=11)
    expected = ref_ab(source, target, margin)
    assert expected > 0
    loss = ab_loss(source, target, margin)
    _check_scalar(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ab_zero_beyond_the_margin_on_the_teachers_side():
    target = _randn(2, 3, 4, 4, seed=12)
    target[0, 0, 0, 0] = 0.0                       # t == 0 counts as "off" (t <= 0)
    depth = _randn(2, 3, 4, 4, seed=13).abs()
    source = torch.where(target > 0, 1.0 + depth, -1.0 - depth)
    assert ab_loss(source, target).item() == 0.0
    # exactly on the margin is also free
    assert ab_loss(torch.where(target > 0, 1.0, -1.0), target).item() == 0.0
    # inside the margin costs (margin - |s|)^2 per element: 0.5^2 for each of the 96 here
    inside = torch.where(target > 0, 0.5, -0.5)
    assert ab_loss(inside, target).item() == pytest.approx(0.25 * 96 / 2 / 1000 * 3, rel=1e-6)


def test_ab_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        ab_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))


def test_ab_gradients_under_bf16_autocast_and_at_large_scale():
    x = _randn(2, 3, 6, 6, seed=14)
    connector = torch.nn.Conv2d(3, 4, 1)
    target = _randn(2, 4, 6, 6, seed=15)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        source = connector(x)
        assert source.dtype == torch.bfloat16
        loss = ab_loss(source, target)
    loss.backward()
    _check_scalar(loss)
    assert loss.item() == pytest.approx(ab_loss(source.float(), target).item(), rel=1e-5)
    assert torch.isfinite(connector.weight.grad).all() and connector.weight.grad.abs().sum() > 0

    big = _randn(2, 4, 6, 6, seed=16, scale=1e3).requires_grad_(True)
    loss = ab_loss(big, _randn(2, 4, 6, 6, seed=17, scale=1e3))
    loss.backward()
    _check_scalar(loss)
    assert loss.item() > 0 and torch.isfinite(big.grad).all()


# ---------------------------------------------------------------- FT

def ref_ft(fs, ft, p):
    """Per sample Q = mean_c f_c^2 flattened, / its L2 norm; mean over N*H*W of |Q_s - Q_t|^p.
    The larger factor is block-average pooled to the smaller size first."""
    fs, ft = fs.double().numpy(), ft.double().numpy()
    h, w = min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3])
    total, count = 0.0, 0
    for n in range(fs.shape[0]):
        maps = []
        for f in (fs[n], ft[n]):
            f = _block_pool(f, h, w)
            q = np.zeros((h, w))
            for c in range(f.shape[0]):
                q += f[c] ** 2
            q = (q / f.shape[0]).reshape(-1)
            maps.append(q / np.sqrt((q * q).sum()))
        for a, b in zip(*maps):
            total += abs(a - b) ** p
            count += 1
    return total / count


@pytest.mark.parametrize("p", [1, 2])
def test_ft_matches_the_reference_formula(p):
    fs, ft = _randn(3, 4, 5, 6, seed=20), _randn(3, 6, 5, 6, seed=21)     # channels differ
    expected = ref_ft(fs, ft, p)
    assert expected > 0
    loss = ft_loss(fs, ft, p)
    _check_scalar(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ft_pools_the_larger_factor():
    fs, ft = _randn(2, 4, 8, 8, seed=22), _randn(2, 4, 4, 4, seed=23)
    assert ft_loss(fs, ft).item() == pytest.approx(ref_ft(fs, ft, 1), rel=1e-5)
    assert ft_loss(ft, fs).item() == pytest.approx(ref_ft(ft, fs, 1), rel=1e-5)
    pooled = F.adaptive_avg_pool2d(fs, (4, 4))
    assert ft_loss(fs, ft).item() == pytest.approx(ft_loss(pooled, ft).item(), rel=1e-6)


def test_ft_zero_for_identical_and_scaled_factors():
    f = _randn(3, 4, 5, 5, seed=24)
    assert ft_loss(f, f.clone()).item() == 0.0
    assert ft_loss(f, -3.0 * f).item() == pytest.approx(0.0, abs=1e-7)
    assert ft_loss(f, _randn(3, 4, 5, 5, seed=25)).item() > 1e-3


def test_ft_rejects_bad_shapes():
    with pytest.raises(ValueError, match="4-D"):
        ft_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="batch"):
        ft_loss(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4))


def test_ft_gradients_under_bf16_autocast_and_at_large_scale():
    x = _randn(2, 3, 6, 6, seed=26)
    translator = torch.nn.Conv2d(3, 4, 3, padding=1)
    factor_t = _randn(2, 4, 6, 6, seed=27)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        factor_s = translator(x)
        assert factor_s.dtype == torch.bfloat16
        loss = ft_loss(factor_s, factor_t)
    loss.backward()
    _check_scalar(loss)
    assert loss.item() == pytest.approx(ft_loss(factor_s.float(), factor_t).item(), rel=1e-5)
    assert torch.isfinite(translator.weight.grad).all() and translator.weight.grad.abs().sum() > 0

    big = _randn(2, 4, 6, 6, seed=28, scale=1e3).requires_grad_(True)
    loss = ft_loss(big, _randn(2, 4, 6, 6, seed=29, scale=1e3), p=2)
    loss.backward()
    _check_scalar(loss)
    assert loss.item() > 0 and torch.isfinite(big.grad).all()


# ---------------------------------------------------------------- FSP

def ref_fsp(feats_s, feats_t):
    """For each consecutive pair: pool the larger map to the smaller, G[n, j, i] =
    sum_hw top_j * bottom_i / (H*W); mean over (n, j, i) of (G_s - G_t)^2; sum over pairs."""
    def gram(bot, top):
        bot, top = bot.double().numpy(), top.double().numpy()
        h, w = min(bot.shape[2], top.shape[2]), min(bot.shape[3], top.shape[3])
        g = np.zeros((bot.shape[0], top.shape[1], bot.shape[1]))
        for n in range(bot.shape[0]):
            b, t = _block_pool(bot[n], h, w), _block_pool(top[n], h, w)
            for j in range(t.shape[0]):
                for i in range(b.shape[0]):
                    g[n, j, i] = (t[j] * b[i]).sum() / (h * w)
        return g

    total = 0.0
    for k in range(len(feats_s) - 1):
        gs, gt = gram(feats_s[k], feats_s[k + 1]), gram(feats_t[k], feats_t[k + 1])
        total += ((gs - gt) ** 2).sum() / gs.size
    return total


def _stack(seed, sizes, channels=(3, 3, 5, 6), n=2, scale=1.0):
    return [_randn(n, c, s, s, seed=seed + i, scale=scale) for i, (c, s) in enumerate(zip(channels, sizes))]


def test_fsp_matches_the_reference_formula():
    # teacher maps twice the student's size: allowed, FSP matrices are channel x channel
    fs, ft = _stack(30, (8, 8, 4, 2)), _stack(40, (16, 8, 8, 4))
    expected = ref_fsp(fs, ft)
    assert expected > 0
    loss = fsp_loss(fs, ft)
    _check_scalar(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_fsp_matrix_layout_and_pooling():
    bot, top = _randn(2, 3, 8, 8, seed=50), _randn(2, 5, 4, 4, seed=51)
    g = fsp_matrix(bot, top)
    assert g.shape == (2, 5, 3) and g.dtype == torch.float32
    pooled = F.adaptive_avg_pool2d(bot, (4, 4))
    manual = torch.einsum("nihw,njhw->nji", pooled, top) / 16
    assert torch.allclose(g, manual, rtol=1e-5, atol=1e-6)
    # the top map is pooled when it is the larger one
    assert torch.allclose(fsp_matrix(top, bot), torch.einsum("nihw,njhw->nji", top, pooled) / 16,
                          rtol=1e-5, atol=1e-6)
    # pooling inside fsp_loss equals pooling by hand
    fs, ft = [bot, top], [_randn(2, 3, 4, 4, seed=52), _randn(2, 5, 4, 4, seed=53)]
    assert fsp_loss(fs, ft).item() == pytest.approx(fsp_loss([pooled, top], ft).item(), rel=1e-6)


def test_fsp_zero_for_identical_features():
    fs = _stack(60, (8, 8, 4, 2))
    assert fsp_loss(fs, [f.clone() for f in fs]).item() == 0.0
    assert fsp_loss(fs, _stack(70, (8, 8, 4, 2))).item() > 1e-3


def test_fsp_rejects_bad_inputs():
    fs = _stack(80, (8, 8, 4, 2))
    ft = _stack(90, (8, 8, 4, 2), channels=(3, 3, 5, 7))
    with pytest.raises(ValueError, match="pair 2.*channel counts must be equal"):
        fsp_loss(fs, ft)
    with pytest.raises(ValueError, match="numbers of feature maps"):
        fsp_loss(fs, fs[:3])
    with pytest.raises(ValueError, match="at least 2"):
        fsp_loss(fs[:1], fs[:1])
    with pytest.raises(ValueError, match="batch"):
        fsp_loss(fs, _stack(80, (8, 8, 4, 2), n=3))
    with pytest.raises(ValueError, match="4-D"):
        fsp_loss([torch.randn(2, 3, 4), torch.randn(2, 3, 4, 4)], fs[:2])


def test_fsp_gradients_under_bf16_autocast_and_at_large_scale():
    x = _randn(2, 3, 8, 8, seed=100)
    convs = [torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)]
    teacher = [_randn(2, 4, 8, 8, seed=101), _randn(2, 6, 4, 4, seed=102)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f1 = convs[0](x)
        f2 = convs[1](f1)
        assert f2.dtype == torch.bfloat16
        loss = fsp_loss([f1, f2], teacher)
    loss.backward()
    _check_scalar(loss)
    # autocast is off inside: the Gram products are float32, equal to the float32 computation
    assert loss.item() == pytest.approx(fsp_loss([f1.float(), f2.float()], teacher).item(), rel=1e-5)
    for conv in convs:
        assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0

    big = [f.requires_grad_(True) for f in _stack(110, (8, 8, 4, 2), scale=1e3)]
    loss = fsp_loss(big, _stack(120, (8, 8, 4, 2), scale=1e3))
    loss.backward()
    _check_scalar(loss)
    assert loss.item() > 0 and all(torch.isfinite(f.grad).all() for f in big)
