"""DIST, logit standardization, CRD's NCE and MLKD against float64 transcriptions of the
reference code (hunto/image_classification_sota dist_kd.py, logit-standardization-KD
KD.py/DKD.py/MLKD.py, RepDistiller crd/criterion.py, Multi-Level-Logit-Distillation
KD_ours.py), their invariants, shape rules and low precision."""
import math

import numpy as np
import pytest
import torch

from distill.losses import (crd_nce_loss, dist_loss, dkd_loss, kd_loss, mlkd_losses,
                            standardize_logits)
from distill.losses.mlkd import fraction_at_most_median

# toy logits with values computed by running the reference code itself (its loss functions
# executed verbatim, float32), recorded here as fixed numbers
Z_S = torch.tensor([[1., 2, 3, 4], [4, 3, 2, 1], [0, 0, 0, 1]])
Z_T = torch.tensor([[1., 2, 3, 5], [5, 3, 2, 0], [1, 0, 0, 0]])
Y = torch.tensor([3, 0, 3])


pytestmark = pytest.mark.fast   # the inner-loop tier (make test-fast): losses against their reference formulas


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# --- DIST ------------------------------------------------------------------------------------
def reference_dist(s, t, beta, gamma, tau):
    """Float64 loops: softmax(z/tau); 1 - mean Pearson r over rows (inter, per sample over the
    classes) and over columns (intra, per class over the batch), each times tau^2."""
    def softmax(z):
        e = np.exp(z / tau - (z / tau).max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def mean_r(a, b):
        rs = []
        for u, v in zip(a, b):
            u, v = u - u.mean(), v - v.mean()
            rs.append((u * v).sum() / (math.sqrt((u * u).sum()) * math.sqrt((v * v).sum()) + 1e-8))
        return sum(rs) / len(rs)
    p_s, p_t = softmax(s), softmax(t)
    return tau**2 * (beta * (1 - mean_r(p_s, p_t)) + gamma * (1 - mean_r(p_s.T, p_t.T)))


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (1.0, 1.0, 4.0), (2.0, 0.5, 2.0)])
def test_dist_matches_the_reference(beta, gamma, tau):
    s, t = _randn(16, 100, seed=1, scale=3), _randn(16, 100, seed=2, scale=3)
    expected = reference_dist(s.double().numpy(), t.double().numpy(), beta, gamma, tau)
    loss = dist_loss(s, t, beta=beta, gamma=gamma, temperature=tau)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dist_equals_the_reference_codes_own_output():
    assert dist_loss(Z_S, Z_T).item() == pytest.approx(0.708594, abs=2e-6)
    assert dist_loss(Z_S, Z_T, temperature=4.0).item() == pytest.approx(8.203950, abs=2e-5)


def test_dist_invariants():
    s, t = _randn(8, 10, seed=3), _randn(8, 10, seed=4)
    base = dist_loss(s, t, temperature=4.0).item()
    # softmax is blind to a per-row shift of the logits
    assert dist_loss(s + _randn(8, 1, seed=5, scale=50), t, temperature=4.0).item() == \
        pytest.approx(base, rel=1e-4)
    # equal inputs: zero up to the reference's eps in the denominator
    assert dist_loss(t, t.clone(), temperature=4.0).item() == pytest.approx(0.0, abs=1e-3)
    assert base > 0.1
    with pytest.raises(ValueError, match="one shape"):
        dist_loss(s, t[:, :5])
    with pytest.raises(ValueError, match="one shape"):
        dist_loss(s[None], t[None])


# --- logit standardization ---------------------------------------------------------------------
def test_standardize_is_the_reference_z_score():
    z = standardize_logits(torch.tensor([[1., 2, 3, 4]]))
    torch.testing.assert_close(z, torch.tensor([[-1.161895, -0.387298, 0.387298, 1.161895]]),
                               rtol=0, atol=1e-6)   # unbiased std (ddof 1), as torch.std


def test_kd_with_standardization_matches_the_reference():
    assert kd_loss(Z_S, Z_T, 4.0).item() == pytest.approx(0.205188, abs=1e-6)
    ls = kd_loss(Z_S, Z_T, 2.0, standardize=True)
    assert ls.item() == pytest.approx(0.407108, abs=1e-6)
    # a positive affine map of each side's logits changes nothing after the z-score
    assert kd_loss(3 * Z_S + 7, 0.5 * Z_T - 1, 2.0, standardize=True).item() == \
        pytest.approx(ls.item(), rel=1e-5)
    # KD+LS with the reference CIFAR weights: 0.1 CE + 9 KD
    total = 0.1 * torch.nn.functional.cross_entropy(Z_S, Y) + 9 * ls
    assert total.item() == pytest.approx(3.718104, abs=1e-5)


def test_dkd_on_standardized_logits_matches_the_reference():
    s, t = standardize_logits(Z_S), standardize_logits(Z_T)
    assert dkd_loss(Z_S, Z_T, Y, 1.0, 8.0, 4.0).item() == pytest.approx(0.701443, abs=1e-5)
    assert dkd_loss(s, t, Y, 9.0, 72.0, 2.0).item() == pytest.approx(14.716653, abs=1e-4)


def test_standardized_kd_finite_under_bf16_autocast_and_large_logits():
    s = _randn(8, 100, seed=6, scale=1e3).requires_grad_(True)
    t = _randn(8, 100, seed=7, scale=1e3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kd_loss(s.bfloat16(), t.bfloat16(), 2.0, standardize=True) + \
            dist_loss(s.bfloat16(), t.bfloat16(), temperature=4.0)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# --- CRD's NCE ---------------------------------------------------------------------------------
def reference_nce(x, n_data):
    """RepDistiller ContrastLoss in float64 loops."""
    b, k1 = x.shape
    m, pn, eps = k1 - 1, 1.0 / n_data, 1e-7
    total = 0.0
    for i in range(b):
        total += math.log(x[i, 0] / (x[i, 0] + m * pn + eps))
        for j in range(1, k1):
            total += math.log(m * pn / (x[i, j] + m * pn + eps))
    return -total / b


def test_crd_nce_matches_the_reference():
    scores = torch.rand(6, 17, 1, generator=torch.Generator().manual_seed(8)) * 3 + 1e-3
    expected = reference_nce(scores[:, :, 0].double().numpy(), 500)
    loss = crd_nce_loss(scores, 500)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert crd_nce_loss(scores[:, :, 0], 500).item() == loss.item()   # (B, K+1) alike


def test_crd_nce_rewards_a_high_positive_and_low_negatives():
    low = torch.full((4, 9), 1e-3)
    good, bad = low.clone(), low.clone()
    good[:, 0], bad[:, 1:] = 10.0, 10.0
    assert crd_nce_loss(good, 100) < crd_nce_loss(low, 100) < crd_nce_loss(bad, 100)


def test_crd_nce_shape_rules():
    with pytest.raises(ValueError, match="K\\+1"):
        crd_nce_loss(torch.rand(4, 1), 10)
    with pytest.raises(ValueError, match="K\\+1"):
        crd_nce_loss(torch.rand(4, 5, 2), 10)
    with pytest.raises(ValueError, match="n_data"):
        crd_nce_loss(torch.rand(4, 5), 0)


# --- MLKD --------------------------------------------------------------------------------------
def _mlkd_inputs():
    g = torch.Generator().manual_seed(0)
    sw, ss = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    tw, ts = 2 * torch.randn(4, 5, generator=g), 2 * torch.randn(4, 5, generator=g)
    return sw, ss, tw, ts, torch.tensor([0, 1, 2, 3])


def reference_mlkd(sw, ss, tw, ts, T, standardize):
    """KD_ours.forward_train in float64 numpy, weights off: per temperature KD (T^2 KL, batch
    mean; z-scored logits with ddof 1 when `standardize`), class Gram and batch Gram squared
    differences, the masks as the code applies them (a scalar loss times a 0/1 vector, averaged)."""
    def softmax(z, t):
        e = np.exp(z / t - (z / t).max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def z(x):
        return (x - x.mean(1, keepdims=True)) / (x.std(1, ddof=1, keepdims=True) + 1e-7)

    def kd(s, t, temp):
        if standardize:
            s, t = z(s), z(t)
        p_s, p_t = softmax(s, temp), softmax(t, temp)
        return (p_t * (np.log(p_t) - np.log(p_s))).sum(1).mean() * temp * temp

    def cc(s, t, temp):
        p_s, p_t = softmax(s, temp), softmax(t, temp)
        return ((p_t.T @ p_t - p_s.T @ p_s) ** 2).sum() / p_s.shape[1]

    def bc(s, t, temp):
        p_s, p_t = softmax(s, temp), softmax(t, temp)
        return ((p_t @ p_t.T - p_s @ p_s.T) ** 2).sum() / p_s.shape[0]

    temps = [T, 3.0, 5.0, 2.0, 6.0]
    p = softmax(tw, 1.0)
    conf, class_conf = p.max(1), p.sum(0)
    mask = (conf <= np.percentile(conf, 50)).astype(float)
    class_mask = (class_conf <= np.percentile(class_conf, 50)).astype(float)
    kd_weak = sum((kd(sw, tw, t) * mask).mean() for t in temps)
    kd_strong = (sum(kd(ss, ts, t) for t in temps[:3]) + kd(sw, tw, 2.0) + kd(sw, tw, 6.0))
    return {"kd": kd_weak + kd_strong,
            "cc": sum((cc(sw, tw, t) * class_mask).mean() for t in temps),
            "bc": sum((bc(sw, tw, t) * mask).mean() for t in temps)}


@pytest.mark.parametrize("T,standardize", [(4.0, False), (2.0, True), (3.0, False)])
def test_mlkd_matches_a_transcription_of_the_reference(T, standardize):
    sw, ss, tw, ts = (_randn(16, 10, seed=20 + i, scale=1 + i) for i in range(4))
    expected = reference_mlkd(*(x.double().numpy() for x in (sw, ss, tw, ts)), T, standardize)
    terms = mlkd_losses(sw, ss, tw, ts, T, standardize)
    for name in ("kd", "cc", "bc"):
        assert terms[name].dim() == 0 and terms[name].dtype == torch.float32
        assert terms[name].item() == pytest.approx(expected[name], rel=1e-5), name


def test_mlkd_equals_the_reference_codes_own_output():
    """Numbers from running KD_ours.forward_train itself (weights in: CE 0.1 on each view, 0.9
    on every distillation term; LS: the logit-standardization fork's MLKD at T 2, weight 9)."""
    sw, ss, tw, ts, y = _mlkd_inputs()
    ce = 0.1 * (torch.nn.functional.cross_entropy(sw, y) + torch.nn.functional.cross_entropy(ss, y))
    assert ce.item() == pytest.approx(0.396044, abs=1e-6)
    terms = mlkd_losses(sw, ss, tw, ts, 4.0)
    assert 0.9 * terms["kd"].item() == pytest.approx(7.104777, abs=1e-5)
    assert 0.9 * terms["cc"].item() == pytest.approx(0.054650, abs=1e-6)
    assert 0.9 * terms["bc"].item() == pytest.approx(0.004364, abs=1e-6)
    ls = mlkd_losses(sw, ss, tw, ts, 2.0, standardize=True)
    assert 9 * ls["kd"].item() == pytest.approx(51.088402, abs=1e-4)
    assert 9 * ls["cc"].item() == pytest.approx(0.750422, abs=1e-5)
    assert 9 * ls["bc"].item() == pytest.approx(0.072122, abs=1e-6)


def test_mlkd_invariants():
    sw, ss, tw, ts, _ = _mlkd_inputs()
    same = mlkd_losses(tw, ts, tw, ts)
    assert all(v.item() == pytest.approx(0.0, abs=1e-6) for v in same.values())
    # the class and batch terms read the weak view only, as the reference's loss does
    other = mlkd_losses(sw, ss + 5 * torch.randn(4, 5), tw, ts)
    base = mlkd_losses(sw, ss, tw, ts)
    assert other["cc"].item() == base["cc"].item() and other["bc"].item() == base["bc"].item()
    assert other["kd"].item() != base["kd"].item()
    # the masks are shares of the batch and of the classes at or below the median
    assert fraction_at_most_median(torch.tensor([3.0, 1, 2, 4])).item() == 0.5
    assert fraction_at_most_median(torch.arange(7.0)).item() == pytest.approx(4 / 7)


def test_mlkd_finite_under_bf16_autocast_and_large_logits():
    s = _randn(8, 100, seed=30, scale=1e3).requires_grad_(True)
    t = _randn(8, 100, seed=31, scale=1e3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = mlkd_losses(s.bfloat16(), s.bfloat16() * 0.5, t.bfloat16(), t.bfloat16(),
                            standardize=True)
    total = sum(terms.values())
    total.backward()
    assert total.dtype == torch.float32 and math.isfinite(total.item())
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
