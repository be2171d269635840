"""NST, SP, PKT, CC and KD-SVD losses against float64 loop transcriptions of the reference code
(RepDistiller distiller_zoo/*.py), plus their invariants, shape rules and low precision."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.losses import cc_loss, kdsvd_loss, nst_loss, pkt_loss, sp_loss


pytestmark = pytest.mark.fast   # the inner-loop tier (make test-fast): losses against their reference formulas


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _np(x):
    return x.double().numpy()


def _unit(v):
    """v / max(|v|, 1e-12), torch's F.normalize."""
    return v / max(np.sqrt((v * v).sum()), 1e-12)


def _adaptive_avg_pool(f, oh, ow):
    """(C, H, W) -> (C, oh, ow); PyTorch's windows: floor(i*H/oh) to ceil((i+1)*H/oh)."""
    c, h, w = f.shape
    out = np.zeros((c, oh, ow))
    for i in range(oh):
        h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        for j in range(ow):
            w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            out[:, i, j] = f[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return out


def _check_output(loss):
    assert loss.dtype == torch.float32 and loss.dim() == 0


# ---------------------------------------------------------------- NST

def reference_nst(fs, ft):
    """RepDistiller NST.py with full_loss=True, in float64 loops: pool the larger map to the
    smaller, L2-normalise each channel's spatial vector, then mean_{i,j}(t_i.t_j)^2 +
    mean_{i,j}(s_i.s_j)^2 - 2 mean_{i,j}(s_i.t_j)^2, every mean also over the batch."""
    fs, ft = _np(fs), _np(ft)
    oh, ow = min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3])
    terms = {"tt": [], "ss": [], "st": []}
    for n in range(fs.shape[0]):
        s = [_unit(c.ravel()) for c in _adaptive_avg_pool(fs[n], oh, ow)]
        t = [_unit(c.ravel()) for c in _adaptive_avg_pool(ft[n], oh, ow)]
        for key, a, b in (("tt", t, t), ("ss", s, s), ("st", s, t)):
            terms[key] += [float(x @ y) ** 2 for x in a for y in b]
    return np.mean(terms["tt"]) + np.mean(terms["ss"]) - 2 * np.mean(terms["st"])


@pytest.mark.parametrize("shapes", [((3, 4, 8, 8), (3, 6, 4, 4)),     # student larger: pooled
                                    ((3, 5, 4, 4), (3, 3, 6, 6)),     # teacher larger, 6 -> 4
                                    ((2, 4, 5, 5), (2, 7, 5, 5))])    # same size
def test_nst_matches_the_reference_code(shapes):
    fs, ft = _randn(*shapes[0], seed=1).relu(), _randn(*shapes[1], seed=2).relu()
    expected = reference_nst(fs, ft)
    assert expected > 1e-3
    loss = nst_loss(fs, ft)
    _check_output(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_nst_zero_for_identical_rescaled_or_permuted_teacher_channels():
    """An MMD between sets of normalised channel vectors: blind to per-channel positive scale
    and to the channel order."""
    f = _randn(3, 6, 5, 5, seed=3)
    scale = torch.rand(1, 6, 1, 1, generator=torch.Generator().manual_seed(4)) * 10 + 0.1
    assert nst_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert nst_loss(f, f * scale).item() == pytest.approx(0.0, abs=1e-6)
    assert nst_loss(f, f[:, torch.randperm(6)]).item() == pytest.approx(0.0, abs=1e-6)
    assert nst_loss(f, _randn(3, 6, 5, 5, seed=5)).item() > 1e-3


def test_nst_pools_the_larger_feature_and_checks_shapes():
    fs, ft = _randn(2, 3, 8, 8, seed=6), _randn(2, 5, 4, 4, seed=7)
    pooled = F.adaptive_avg_pool2d(fs, (4, 4))
    assert nst_loss(fs, ft).item() == pytest.approx(nst_loss(pooled, ft).item(), rel=1e-6)
    assert nst_loss(ft, fs).item() == pytest.approx(nst_loss(ft, pooled).item(), rel=1e-6)
    with pytest.raises(ValueError, match="4-D"):
        nst_loss(torch.randn(2, 3, 16), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="batch"):
        nst_loss(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4))


# ---------------------------------------------------------------- SP

def reference_sp(fs, ft):
    """RepDistiller SP.py in float64 loops: G = f f^T of the flattened features, each row divided
    by its L2 norm; sum over all N^2 entries of (G_t - G_s)^2, divided by N^2."""
    fs, ft = _np(fs).reshape(len(fs), -1), _np(ft).reshape(len(ft), -1)
    n = len(fs)

    def gram(f):
        g = np.array([[float(f[i] @ f[j]) for j in range(n)] for i in range(n)])
        return np.array([_unit(row) for row in g])

    gs, gt = gram(fs), gram(ft)
    return sum((gt[i, j] - gs[i, j]) ** 2 for i in range(n) for j in range(n)) / (n * n)


def test_sp_matches_the_reference_code():
    fs, ft = _randn(6, 4, 5, 5, seed=10).relu(), _randn(6, 9, 3, 3, seed=11).relu()   # C, HW differ
    expected = reference_sp(fs, ft)
    assert expected > 1e-4
    loss = sp_loss(fs, ft)
    _check_output(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # signed features and flat (N, D) input with a different width
    s, t = _randn(5, 7, seed=12), _randn(5, 3, seed=13)
    assert sp_loss(s, t).item() == pytest.approx(reference_sp(s, t), rel=1e-5)


def test_sp_zero_for_identical_or_scaled_teacher_and_checks_batch():
    f = _randn(5, 3, 4, 4, seed=14)
    assert sp_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert sp_loss(f, 42.0 * f).item() == pytest.approx(0.0, abs=1e-7)
    assert sp_loss(f, _randn(5, 3, 4, 4, seed=15)).item() > 1e-3
    with pytest.raises(ValueError, match="batch"):
        sp_loss(torch.randn(4, 3, 4, 4), torch.randn(5, 3, 4, 4))


# ---------------------------------------------------------------- PKT

def reference_pkt(s, t, eps=1e-7):
    """RepDistiller PKT.py in float64 loops: rows divided by (norm + eps), cosine kernel rescaled
    to (K + 1) / 2, rows divided by their sums (self-pair kept), then the mean over all N^2
    entries of p_t * log((p_t + eps) / (p_s + eps))."""
    s, t = _np(s).reshape(len(s), -1), _np(t).reshape(len(t), -1)
    n = len(s)

    def probs(x):
        x = np.array([row / (np.sqrt((row * row).sum()) + eps) for row in x])
        k = np.array([[(float(x[i] @ x[j]) + 1.0) / 2.0 for j in range(n)] for i in range(n)])
        return np.array([row / row.sum() for row in k])

    ps, pt = probs(s), probs(t)
    return sum(pt[i, j] * math.log((pt[i, j] + eps) / (ps[i, j] + eps))
               for i in range(n) for j in range(n)) / (n * n)


def test_pkt_matches_the_reference_code():
    s, t = _randn(7, 5, seed=20), _randn(7, 12, seed=21)        # widths differ
    expected = reference_pkt(s, t)
    assert expected > 1e-4
    loss = pkt_loss(s, t)
    _check_output(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert pkt_loss(s, t, eps=1e-3).item() == pytest.approx(reference_pkt(s, t, 1e-3), rel=1e-5)


def test_pkt_zero_for_identical_or_rescaled_teacher_and_checks_batch():
    s = _randn(6, 8, seed=22)
    rows = torch.rand(6, 1, generator=torch.Generator().manual_seed(23)) * 5 + 0.5
    assert pkt_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert pkt_loss(s, s * rows).item() == pytest.approx(0.0, abs=1e-6)
    # a zero row normalises to 0 (cosine 0 with everything), not NaN
    z = s.clone()
    z[2] = 0
    assert math.isfinite(pkt_loss(z, s).item())
    with pytest.raises(ValueError, match="batch"):
        pkt_loss(torch.randn(4, 8), torch.randn(5, 8))


# ---------------------------------------------------------------- CC

def reference_cc(s, t):
    """RepDistiller CC.py (Correlation) in float64 loops: d_i = |s_i - t_i|; the mean over the
    N - 1 neighbouring pairs (i, i+1) of sum_k d_i[k] * d_{i+1}[k]."""
    s, t = _np(s), _np(t)
    d = np.abs(s - t)
    return sum(float(d[i] @ d[i + 1]) for i in range(len(d) - 1)) / (len(d) - 1)


def test_cc_matches_the_reference_code():
    s, t = _randn(6, 9, seed=30), _randn(6, 9, seed=31)
    expected = reference_cc(s, t)
    assert expected > 0.1
    loss = cc_loss(s, t)
    _check_output(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_cc_zero_for_identical_and_shape_rules():
    s = _randn(5, 4, seed=32)
    assert cc_loss(s, s.clone()).item() == 0.0
    assert cc_loss(s, s + 1.0).item() == pytest.approx(4.0, rel=1e-6)   # |d| = 1 in all 4 dims
    with pytest.raises(ValueError, match="same shape"):
        cc_loss(torch.randn(4, 8), torch.randn(4, 6))
    with pytest.raises(ValueError, match="same shape"):
        cc_loss(torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="at least 2"):
        cc_loss(torch.randn(1, 8), torch.randn(1, 8))


# ---------------------------------------------------------------- KD-SVD

def reference_kdsvd(gs, gt, k):
    """RepDistiller KDSVD.py in float64 loops. Per stage and sample: SVD of the (H*W, C) matrix;
    teacher keeps k, student k + 3 right singular vectors (L2-normalised; singular values
    L2-normalised over the kept ones). Teacher vectors get the sign whose largest-|entry| is
    positive (the fixed choice kdsvd_loss documents); each teacher vector j takes the student
    vector with the largest |cosine|, times that cosine's sign. Both are scaled by the teacher's
    values. Then for neighbouring stages: sum over c, c', j of
    (exp(-(vs_l[c,j] - vs_{l-1}[c',j])^2 / 8) - exp(-(vt_l[c,j] - vt_{l-1}[c',j])^2 / 8))^2,
    summed over stages and samples and divided by N."""
    n = gs[0].shape[0]

    def top(f, m):
        x = f.reshape(f.shape[0], -1).T                       # (H*W, C)
        _, sv, vh = np.linalg.svd(x, full_matrices=False)
        return _unit(sv[:m]), [_unit(vh[i]) for i in range(min(m, len(sv)))]

    total = 0.0
    for b in range(n):
        prev = None
        for fs, ft in zip(gs, gt):
            sv_t, vt = top(_np(ft)[b], k)
            _, vs = top(_np(fs)[b], k + 3)
            vt = [v if v[np.argmax(np.abs(v))] > 0 else -v for v in vt]
            aligned = []
            for v in vt:
                cos = [float(u @ v) for u in vs]
                best = int(np.argmax(np.abs(cos)))
                aligned.append(np.sign(cos[best]) * vs[best])
            vt = [sv_t[j] * vt[j] for j in range(len(vt))]
            vs = [sv_t[j] * aligned[j] for j in range(len(vt))]
            if prev is not None:
                ps, pt = prev
                for j in range(len(vt)):
                    for c in range(len(vs[j])):
                        for c2 in range(len(ps[j])):
                            rs = math.exp(-(vs[j][c] - ps[j][c2]) ** 2 / 8)
                            rt = math.exp(-(vt[j][c] - pt[j][c2]) ** 2 / 8)
                            total += (rs - rt) ** 2
            prev = (vs, vt)
    return total / n


def _stages(seed, batch=3, relu=True, teacher_hw=None):
    """Three stages with 6, 10, 12 channels at 6x6, 4x4, 2x2 (teacher spatial sizes optional)."""
    shapes = [(6, 6), (10, 4), (12, 2)]
    out = []
    for i, (c, hw) in enumerate(shapes):
        hw = teacher_hw[i] if teacher_hw else hw
        f = _randn(batch, c, hw, hw, seed=seed + i)
        out.append(f.relu() if relu else f)
    return out


@pytest.mark.parametrize("k,relu", [(1, True), (2, True), (1, False), (3, False)])
def test_kdsvd_matches_the_reference_code(k, relu):
    gs, gt = _stages(40, relu=relu), _stages(50, relu=relu, teacher_hw=[5, 5, 3])  # HW differs
    expected = reference_kdsvd(gs, gt, k)
    assert expected > 1e-4
    loss = kdsvd_loss(gs, gt, k)
    _check_output(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kdsvd_zero_for_identical_and_blind_to_feature_signs():
    gs, gt = _stages(60, relu=False), _stages(70, relu=False)
    assert kdsvd_loss(gs, [g.clone() for g in gs]).item() == pytest.approx(0.0, abs=1e-6)
    base = kdsvd_loss(gs, gt).item()
    assert base > 1e-3
    # the SVD's sign freedom does not leak into the loss: flipped inputs give the same value
    flipped_t = [-g if i % 2 else g for i, g in enumerate(gt)]
    assert kdsvd_loss(gs, flipped_t).item() == pytest.approx(base, rel=1e-5)
    assert kdsvd_loss([-g for g in gs], gt).item() == pytest.approx(base, rel=1e-5)


def test_kdsvd_shape_rules():
    gs, gt = _stages(80), _stages(90)
    with pytest.raises(ValueError, match="channel counts differ at stage 1"):
        kdsvd_loss(gs, [gt[0], _randn(3, 11, 4, 4), gt[2]])
    with pytest.raises(ValueError, match="batch"):
        kdsvd_loss(gs, [gt[0], gt[1][:2], gt[2]])
    with pytest.raises(ValueError, match="3 student features but 2"):
        kdsvd_loss(gs, gt[:2])
    with pytest.raises(ValueError, match="at least 2"):
        kdsvd_loss(gs[:1], gt[:1])
    with pytest.raises(ValueError, match="4-D"):
        kdsvd_loss([g.flatten(2) for g in gs], gt)
    with pytest.raises(ValueError, match="k must"):
        kdsvd_loss(gs, gt, k=0)


# ---------------------------------------------------------------- low precision and scale

def _two_stage(in_ch, channels):
    return torch.nn.ModuleList([torch.nn.Conv2d(in_ch, channels[0], 3, padding=1),
                                torch.nn.Conv2d(channels[0], channels[1], 3, stride=2, padding=1)])


def _run_stages(convs, x):
    feats = []
    for conv in convs:
        x = conv(x).relu()
        feats.append(x)
    return feats


CASES = {
    "nst": (nst_loss, lambda: (torch.nn.Conv2d(3, 4, 3, padding=1),
                               torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)), (4, 3, 8, 8)),
    "sp": (sp_loss, lambda: (torch.nn.Conv2d(3, 4, 3, padding=1),
                             torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)), (4, 3, 8, 8)),
    "pkt": (pkt_loss, lambda: (torch.nn.Linear(10, 8), torch.nn.Linear(10, 16)), (6, 10)),
    "cc": (cc_loss, lambda: (torch.nn.Linear(10, 8), torch.nn.Linear(10, 8)), (6, 10)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_finite_float32_under_bf16_autocast(name):
    """Features from bf16 layers: the loss is float32, equals the float32 computation on the same
    features (the Gram products do not run in bf16), and backpropagates finite gradients."""
    loss_fn, layers, shape = CASES[name]
    torch.manual_seed(0)
    layer_s, layer_t = layers()
    x = _randn(*shape, seed=100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feat_s, feat_t = layer_s(x), layer_t(x)
        assert feat_s.dtype == torch.bfloat16
        loss = loss_fn(feat_s, feat_t)
    loss.backward()
    _check_output(loss)
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert loss.item() == pytest.approx(loss_fn(feat_s.float(), feat_t.float()).item(), rel=1e-5)
    assert torch.isfinite(layer_s.weight.grad).all() and layer_s.weight.grad.abs().sum() > 0


def test_kdsvd_finite_float32_under_bf16_autocast():
    torch.manual_seed(0)
    student, teacher = _two_stage(3, (6, 10)), _two_stage(3, (6, 10))
    x = _randn(3, 3, 8, 8, seed=101)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gs, gt = _run_stages(student, x), _run_stages(teacher, x)
        assert gs[0].dtype == torch.bfloat16
        loss = kdsvd_loss(gs, gt)
    loss.backward()
    _check_output(loss)
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert loss.item() == pytest.approx(
        kdsvd_loss([g.float() for g in gs], [g.float() for g in gt]).item(), rel=1e-5)
    for conv in student:
        assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["nst", "sp", "pkt", "cc", "kdsvd"])
def test_finite_gradients_with_large_inputs(name):
    if name == "kdsvd":
        s = [g * 1e3 for g in _stages(110, relu=False)]
        t = [g * 1e3 for g in _stages(120, relu=False)]
        for g in s:
            g.requires_grad_(True)
        loss, leaves = kdsvd_loss(s, t), s
    else:
        fn = {"nst": nst_loss, "sp": sp_loss, "pkt": pkt_loss, "cc": cc_loss}[name]
        shape = (4, 5, 6, 6) if name in ("nst", "sp") else (6, 8)
        s = _randn(*shape, seed=130, scale=1e3).requires_grad_(True)
        loss, leaves = fn(s, _randn(*shape, seed=131, scale=1e3)), [s]
    loss.backward()
    _check_output(loss)
    assert math.isfinite(loss.item()) and loss.item() > 0
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_kdsvd_of_non_finite_features_is_nan_not_an_svd_error():
    """Diverged weights give non-finite maps; an SVD of them raises. The loss is NaN instead, so
    trainer.on_nonfinite reports the step (seen on digits: KD-SVD at the reference weight)."""
    from distill.losses import kdsvd_loss

    fs = [torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2)]
    ft = [torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2)]
    fs[1][0, 0, 0, 0] = float("nan")
    loss = kdsvd_loss(fs, ft)
    assert loss.dim() == 0 and torch.isnan(loss)


@pytest.mark.parametrize("rows, channels", [(16, 6), (5, 9), (7, 7)])
def test_kdsvd_svd_gradient_is_the_textbook_one_where_singular_values_are_distinct(rows, channels):
    """KD-SVD's own SVD backward equals torch.linalg.svd's where that one is defined (random
    matrices: distinct, non-zero singular values), for tall, wide and square (H*W, C) matrices."""
    from distill.losses.kdsvd import _SingularValuesAndRightVectors

    x = _randn(3, rows, channels, seed=140).double().requires_grad_(True)
    r = min(rows, channels)
    w_s, w_v = _randn(3, r, seed=141).double(), _randn(3, channels, r, seed=142).double()

    def objective(s, v):  # v * v: blind to the arbitrary sign of each singular vector
        return (s * w_s).sum() + (v * v * w_v).sum()

    ours, = torch.autograd.grad(objective(*_SingularValuesAndRightVectors.apply(x)), x)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    textbook, = torch.autograd.grad(objective(s, vh.transpose(1, 2)), x)
    torch.testing.assert_close(ours, textbook, rtol=1e-10, atol=1e-12)


def test_kdsvd_gradient_is_finite_where_singular_values_coincide():
    """A 2x2 ReLU stage with dead positions has repeated zero singular values; torch's SVD
    backward divides by their zero gap (NaN weights on digits after ~37 steps). Ours leaves the
    degenerate pairs out and stays finite, with the loss itself unchanged."""
    a = torch.relu(_randn(4, 16, 4, 4, seed=150))
    b = torch.relu(_randn(4, 32, 2, 2, seed=151))
    b[:, :, 1, :] = 0                      # two of the four positions dead in every sample
    x = b.flatten(2).transpose(1, 2)
    assert (torch.linalg.svdvals(x)[:, 2:] < 1e-5).all()   # two zero singular values each
    fs = [a.requires_grad_(True), b.requires_grad_(True)]
    ft = [torch.relu(_randn(4, 16, 4, 4, seed=152)), torch.relu(_randn(4, 32, 2, 2, seed=153))]
    loss = kdsvd_loss(fs, ft)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    for f in fs:
        assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
