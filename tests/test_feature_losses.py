import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.losses import at_loss, attention_map, fitnet_loss, perturb_logits, rkd_loss


pytestmark = pytest.mark.fast   # the inner-loop tier (make test-fast): losses against their reference formulas


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _huber(x):
    x = abs(x)
    return 0.5 * x * x if x < 1 else x - 0.5


# ---------------------------------------------------------------- attention transfer

def paper_at(fs, ft, p):
    """Zagoruyko & Komodakis 2017, eq. 2 with the reference code's channel mean, in float64 loops:
    Q = sum_c |A_c|^p / C per sample, divided by its L2 norm; mean of (Q_s - Q_t)^2 over N*H*W."""
    fs, ft = fs.double().numpy(), ft.double().numpy()
    total, count = 0.0, 0
    for n in range(fs.shape[0]):
        maps = []
        for f in (fs[n], ft[n]):
            q = np.zeros(f.shape[1:])
            for c in range(f.shape[0]):
                q += np.abs(f[c]) ** p
            q = (q / f.shape[0]).reshape(-1)
            maps.append(q / np.sqrt((q * q).sum()))
        for a, b in zip(*maps):
            total += (a - b) ** 2
            count += 1
    return total / count


@pytest.mark.parametrize("p", [1, 2, 3])
def test_at_matches_the_paper_equation(p):
    fs, ft = _randn(3, 4, 5, 6, seed=1), _randn(3, 7, 5, 6, seed=2)   # channel counts differ
    expected = paper_at(fs, ft, p)
    assert expected > 0
    assert at_loss(fs, ft, p).item() == pytest.approx(expected, rel=1e-5)


def test_attention_map_shape_and_unit_norm():
    a = attention_map(_randn(2, 3, 4, 5, seed=3))
    assert a.shape == (2, 20) and a.dtype == torch.float32
    assert torch.allclose(a.norm(dim=1), torch.ones(2))


def test_at_zero_for_identical_and_positively_scaled_teacher():
    f = _randn(4, 8, 6, 6, seed=4)
    assert at_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-9)
    assert at_loss(f, 7.5 * f).item() == pytest.approx(0.0, abs=1e-9)
    assert at_loss(f, _randn(4, 8, 6, 6, seed=5)).item() > 1e-4


def test_at_pools_the_larger_feature_before_the_map():
    fs, ft = _randn(2, 3, 8, 8, seed=6), _randn(2, 5, 4, 4, seed=7)
    pooled = F.adaptive_avg_pool2d(fs, (4, 4))
    assert at_loss(fs, ft).item() == pytest.approx(at_loss(pooled, ft).item(), rel=1e-6)
    # teacher larger: the teacher is pooled instead
    assert at_loss(ft, fs).item() == pytest.approx(at_loss(ft, pooled).item(), rel=1e-6)
    # pooling the feature is not the same as pooling the attention map
    map_pooled = F.adaptive_avg_pool2d(fs.pow(2).mean(1, keepdim=True), (4, 4))
    other = (F.normalize(map_pooled.flatten(1)) - attention_map(ft)).pow(2).mean()
    assert at_loss(fs, ft).item() != pytest.approx(other.item(), rel=1e-3)


def test_at_rejects_bad_shapes():
    with pytest.raises(ValueError, match="4-D"):
        at_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="batch"):
        at_loss(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4))


def _bf16_loss_backward(loss_fn, layer_s, layer_t, x):
    """Features made by bf16 layers under CPU autocast: the loss is float32, finite, equal to
    the float32 computation (e.g. RKD's Gram products do not run in bf16), and backpropagates."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feat_s, feat_t = layer_s(x), layer_t(x)
        assert feat_s.dtype == torch.bfloat16
        loss = loss_fn(feat_s, feat_t)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert loss.item() == pytest.approx(loss_fn(feat_s.float(), feat_t.float()).item(), rel=1e-5)


def test_at_finite_under_bf16_autocast_and_large_features():
    x = _randn(2, 3, 8, 8, seed=8)
    conv_s, conv_t = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)
    _bf16_loss_backward(at_loss, conv_s, conv_t, x)
    for param in (conv_s.weight, conv_t.weight):
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0

    big_s = (_randn(2, 4, 6, 6, seed=9, scale=1e3)).requires_grad_(True)
    big_t = _randn(2, 4, 6, 6, seed=10, scale=1e3)
    loss = at_loss(big_s, big_t, p=3)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert torch.isfinite(big_s.grad).all()


# ---------------------------------------------------------------- relational KD

def paper_rkd(s, t, wd, wa):
    """Park et al. 2019, eqs. 3-7, written out with loops in float64. psi_D(i, j) = |x_i - x_j| / mu,
    mu = mean over pairs i != j; psi_A(i, j, k) = cos of the angle at x_j between x_i - x_j and
    x_k - x_j (0 when either vector is zero). Huber (smooth L1, delta 1) averaged over all N^2 /
    N^3 entries; the angle entries are stored at [j, i, k], the reference code's layout."""
    s, t = s.double().reshape(len(s), -1).numpy(), t.double().reshape(len(t), -1).numpy()
    n = len(s)

    def psi_d(x):
        d = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                if i != j:
                    d[i, j] = np.sqrt(((x[i] - x[j]) ** 2).sum())
        return d / (d.sum() / (n * (n - 1)))

    def psi_a(x):
        a = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u, v = x[i] - x[j], x[k] - x[j]
                    nu, nv = np.sqrt((u * u).sum()), np.sqrt((v * v).sum())
                    a[j, i, k] = 0.0 if nu == 0 or nv == 0 else (u * v).sum() / (nu * nv)
        return a

    ds, dt, as_, at = psi_d(s), psi_d(t), psi_a(s), psi_a(t)
    loss_d = sum(_huber(a - b) for a, b in zip(ds.ravel(), dt.ravel())) / ds.size
    loss_a = sum(_huber(a - b) for a, b in zip(as_.ravel(), at.ravel())) / as_.size
    return wd * loss_d + wa * loss_a, loss_d, loss_a


def test_rkd_matches_the_paper_equations():
    s, t = _randn(5, 6, seed=11), _randn(5, 2, 3, seed=12) * 4   # different D, teacher not flat
    expected, loss_d, loss_a = paper_rkd(s, t, 25.0, 50.0)
    assert loss_d > 0 and loss_a > 0
    assert rkd_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert rkd_loss(s, t, 1.0, 0.0).item() == pytest.approx(loss_d, rel=1e-5)
    assert rkd_loss(s, t, 0.0, 1.0).item() == pytest.approx(loss_a, rel=1e-5)


def test_rkd_matches_the_paper_in_the_linear_huber_regime():
    """A cubed teacher makes some normalised distance differences exceed 1, so Huber's linear
    branch (|x| - 0.5) is exercised too, with non-default weights."""
    s, t = _randn(4, 3, seed=13), _randn(4, 3, seed=14) ** 3
    expected = paper_rkd(s, t, 40.0, 7.0)[0]
    assert rkd_loss(s, t, 40.0, 7.0).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_weights_combine_linearly():
    s, t = _randn(6, 8, seed=15), _randn(6, 4, seed=16)
    d, a = rkd_loss(s, t, 1.0, 0.0).item(), rkd_loss(s, t, 0.0, 1.0).item()
    assert d > 0 and a > 0
    assert rkd_loss(s, t).item() == pytest.approx(25 * d + 50 * a, rel=1e-5)


def test_rkd_zero_for_a_similarity_transformed_teacher():
    """Distances up to the mean-scale and angles are invariant to scaling (c > 0), rotation and
    translation, also when the teacher lives in a higher dimension (isometric zero padding)."""
    s = _randn(7, 5, seed=17)
    q, _ = torch.linalg.qr(_randn(9, 9, seed=18).double())
    padded = torch.cat([s.double(), torch.zeros(7, 4, dtype=torch.float64)], 1)
    t = (3.7 * padded @ q + _randn(1, 9, seed=19).double()).float()
    assert rkd_loss(s, t).item() == pytest.approx(0.0, abs=1e-5)
    assert rkd_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_loss(s, _randn(7, 9, seed=20)).item() > 0.1


def test_rkd_gradient_reaches_student_only():
    s = _randn(5, 4, seed=21).requires_grad_(True)
    t = _randn(5, 4, seed=22).requires_grad_(True)
    rkd_loss(s, t).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("integer_valued", [False, True])
def test_rkd_finite_gradients_with_identical_student_rows(integer_valued):
    """Random floats: the squared distance of the equal pair comes out slightly negative;
    small integers: it is exactly 0, where sqrt has an infinite derivative unless the eps
    clamp cuts the gradient."""
    base = _randn(5, 4, seed=23)
    if integer_valued:
        base = torch.randint(-3, 4, (5, 4), generator=torch.Generator().manual_seed(23)).float()
    base[1] = base[0]
    s = base.clone().requires_grad_(True)
    t = _randn(5, 4, seed=24)
    t[3] = t[2]
    loss = rkd_loss(s, t)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_rkd_batch_of_two_is_degenerate_but_finite_and_batch_of_one_raises():
    s, t = _randn(2, 4, seed=25).requires_grad_(True), _randn(2, 4, seed=26)
    loss = rkd_loss(s, t)
    loss.backward()
    # two points: normalised distance is 1 and the only angle entry is 1 on both sides
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    assert torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="at least 2"):
        rkd_loss(torch.randn(1, 4), torch.randn(1, 4))


def test_rkd_finite_under_bf16_autocast_and_large_embeddings():
    x = _randn(6, 10, seed=27)
    lin_s, lin_t = torch.nn.Linear(10, 8), torch.nn.Linear(10, 16)
    _bf16_loss_backward(rkd_loss, lin_s, lin_t, x)
    assert torch.isfinite(lin_s.weight.grad).all() and lin_s.weight.grad.abs().sum() > 0

    big = _randn(6, 8, seed=28, scale=1e3).requires_grad_(True)
    loss = rkd_loss(big, _randn(6, 8, seed=29, scale=1e3))
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert torch.isfinite(big.grad).all()


# ---------------------------------------------------------------- FitNets

def test_fitnet_matches_mean_squared_difference():
    s, t = _randn(2, 3, 4, 4, seed=30), _randn(2, 3, 4, 4, seed=31)
    a, b = s.double().numpy().ravel(), t.double().numpy().ravel()
    expected = sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)
    assert fitnet_loss(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_fitnet_zero_when_equal_and_quadratic_in_scale():
    s, t = _randn(3, 5, seed=32), _randn(3, 5, seed=33)
    assert fitnet_loss(s, s.clone()).item() == 0.0
    assert fitnet_loss(2 * s, 2 * t).item() == pytest.approx(4 * fitnet_loss(s, t).item(), rel=1e-6)


def test_fitnet_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 5, 4, 4\)"):
        fitnet_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))


def test_fitnet_finite_under_bf16_autocast():
    x = _randn(2, 3, 6, 6, seed=34)
    regressor = torch.nn.Conv2d(3, 5, 1)
    t = _randn(2, 5, 6, 6, seed=35, scale=100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fs = regressor(x)
        assert fs.dtype == torch.bfloat16
        loss = fitnet_loss(fs, t)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert torch.isfinite(regressor.weight.grad).all() and regressor.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- noisy teacher

def _logits(n, c, seed=40):
    return torch.rand(n, c, generator=torch.Generator().manual_seed(seed)) + 1.0   # in [1, 2)


def test_perturb_reproduces_with_the_documented_draw_order():
    """Draw order: one float32 uniform per row (perturbed iff u < fraction), then float32
    normal noise of the full logits shape; z' = z * (1 + sigma * n) on the selected rows."""
    z = _randn(12, 5, seed=41)
    out = perturb_logits(z, 0.3, 0.5, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    u = torch.rand(12, generator=g, dtype=torch.float32)
    noise = torch.randn(12, 5, generator=g, dtype=torch.float32)
    assert 0 < int((u < 0.5).sum()) < 12
    for i in range(12):
        if u[i] < 0.5:
            assert torch.equal(out[i], z[i] * (1 + noise[i] * 0.3))
        else:
            assert torch.equal(out[i], z[i])
    again = perturb_logits(z, 0.3, 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, again)


def test_perturb_global_rng_when_no_generator():
    z = _randn(8, 4, seed=42)
    torch.manual_seed(3)
    a = perturb_logits(z, 0.2, 1.0)
    torch.manual_seed(3)
    b = perturb_logits(z, 0.2, 1.0)
    assert torch.equal(a, b) and not torch.equal(a, z)


def test_perturb_noop_cases_return_a_copy():
    z = _randn(6, 4, seed=43)
    for sigma, fraction in [(0.0, 1.0), (0.5, 0.0)]:
        out = perturb_logits(z, sigma, fraction, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, z) and out.data_ptr() != z.data_ptr()


def test_perturb_noise_scale_and_independence():
    z = _logits(20000, 10)
    out = perturb_logits(z, 0.2, 1.0, generator=torch.Generator().manual_seed(1))
    xi = (out / z - 1).double()
    assert xi.std().item() == pytest.approx(0.2, rel=0.03)
    assert abs(xi.mean().item()) < 0.01
    # independent per element, not one factor per row
    assert xi.std(dim=1).mean().item() > 0.15


def test_perturb_selects_rows_with_the_given_probability():
    z = _logits(10000, 10)
    out = perturb_logits(z, 0.5, 0.3, generator=torch.Generator().manual_seed(2))
    changed = (out != z).any(dim=1)
    assert abs(changed.float().mean().item() - 0.3) < 0.03


def test_perturb_keeps_dtype_and_input_and_leaves_unselected_rows_bitwise():
    z = _randn(64, 10, seed=44).bfloat16()
    before = z.clone()
    out = perturb_logits(z, 0.5, 0.5, generator=torch.Generator().manual_seed(3))
    assert out.dtype == torch.bfloat16 and torch.equal(z, before)
    g = torch.Generator().manual_seed(3)
    selected = torch.rand(64, generator=g) < 0.5
    assert 0 < int(selected.sum()) < 64
    assert torch.equal(out[~selected], z[~selected])
    assert not torch.equal(out[selected], z[selected])


@pytest.mark.parametrize("sigma,fraction", [(-0.1, 0.5), (float("nan"), 0.5), (0.1, -0.01),
                                            (0.1, 1.5)])
def test_perturb_rejects_bad_arguments(sigma, fraction):
    with pytest.raises(ValueError):
        perturb_logits(torch.randn(3, 4), sigma, fraction)
