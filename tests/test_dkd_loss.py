import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.losses import dkd_loss, kd_loss
from distill.method import StepContext, build_distiller
from distill.models import create_model


pytestmark = pytest.mark.fast   # the inner-loop tier (make test-fast): a loss against its reference formula


def paper_dkd(s, t, y, alpha, beta, T):
    """Zhao et al. 2022, eqs. (1)-(7), transcribed in float64: b = [p_t, 1 - p_t],
    p^_j = p_j / (1 - p_t) over j != t; TCKD = KL(b^T||b^S), NCKD = KL(p^^T||p^^S)."""
    def softmax(z):
        z = z / T
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    ps, pt = softmax(s), softmax(t)
    total = 0.0
    for i, c in enumerate(y):
        bs = np.array([ps[i, c], 1 - ps[i, c]])
        bt = np.array([pt[i, c], 1 - pt[i, c]])
        tckd = (bt * np.log(bt / bs)).sum()
        rest = [j for j in range(s.shape[1]) if j != c]
        qs, qt = ps[i, rest] / (1 - ps[i, c]), pt[i, rest] / (1 - pt[i, c])
        nckd = (qt * np.log(qt / qs)).sum()
        total += alpha * tckd + beta * nckd
    return total / len(y) * T * T


def reference_code_dkd(s, t, y, alpha, beta, T):
    """The reference implementation's formulation (target removed by a -1000 logit offset)."""
    gt = F.one_hot(y, s.shape[1]).float()
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * T**2 / len(y)
    nckd = F.kl_div(F.log_softmax(s / T - 1000 * gt, 1), F.softmax(t / T - 1000 * gt, 1),
                    reduction="sum") * T**2 / len(y)
    return alpha * tckd + beta * nckd


def _inputs(n=6, c=10, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g) * scale, torch.randn(n, c, generator=g) * scale,
            torch.randint(0, c, (n,), generator=g))


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (1.0, 2.0, 1.0), (0.5, 6.0, 2.0)])
def test_matches_the_paper_equations(alpha, beta, T):
    s, t, y = _inputs()
    expected = paper_dkd(s.double().numpy(), t.double().numpy(), y.numpy(), alpha, beta, T)
    assert dkd_loss(s, t, y, alpha, beta, T).item() == pytest.approx(expected, rel=1e-4)


def test_matches_the_reference_code_for_moderate_logits():
    s, t, y = _inputs(seed=3)
    ours = dkd_loss(s, t, y, 1.0, 8.0, 4.0).item()
    assert ours == pytest.approx(reference_code_dkd(s, t, y, 1.0, 8.0, 4.0).item(), rel=1e-4)


def test_kd_decomposes_into_tckd_plus_weighted_nckd():
    """The paper's identity (eq. 7): KD = TCKD + (1 - p_t^T) NCKD, per sample."""
    s, t, y = _inputs(n=4, seed=5)
    T = 4.0
    for i in range(4):
        p_target = F.softmax(t[i:i + 1] / T, 1)[0, y[i]].item()
        dkd = dkd_loss(s[i:i + 1], t[i:i + 1], y[i:i + 1], 1.0, 1.0 - p_target, T)
        assert dkd.item() == pytest.approx(kd_loss(s[i:i + 1], t[i:i + 1], T).item(), rel=1e-4)


def test_zero_when_student_equals_teacher():
    s, _, y = _inputs()
    assert dkd_loss(s, s.clone(), y, 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_terms_scale_linearly_with_their_weights():
    s, t, y = _inputs(seed=7)
    tckd = dkd_loss(s, t, y, 1.0, 0.0, 4.0).item()
    nckd = dkd_loss(s, t, y, 0.0, 1.0, 4.0).item()
    assert tckd > 0 and nckd > 0
    assert dkd_loss(s, t, y, 2.0, 3.0, 4.0).item() == pytest.approx(2 * tckd + 3 * nckd, rel=1e-5)


def test_two_classes_nckd_is_zero_and_all_finite():
    s, t, y = _inputs(n=5, c=2, seed=2)
    s.requires_grad_(True)
    assert dkd_loss(s, t, y, 0.0, 1.0, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    loss = dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(s.grad).all()


def test_large_logits_stay_exact_and_finite():
    s = torch.tensor([[1e4, -1e4, 0.0, 5.0]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0, 3.0]])
    loss = dkd_loss(s, t, torch.tensor([0]), 1.0, 8.0, 0.5)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert torch.isfinite(s.grad).all()


def test_finite_gradients_under_bf16_autocast():
    s, t, y = _inputs(seed=9)
    s.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dkd_loss(s.bfloat16(), t.bfloat16(), y, 1.0, 8.0, 4.0)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_dkd_distiller_ramps_over_the_warmup_epochs():
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet8", num_classes=10)
    distiller = build_distiller("dkd", student, teacher, {"warmup_epochs": 20}).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    full = dkd_loss(student(x), teacher(x), y, 1.0, 8.0, 4.0).item()
    terms = lambda epoch: distiller(x, y, StepContext(epoch=epoch, step=0, epochs=240))[1]  # noqa: E731
    assert terms(0)["dkd"].item() == pytest.approx(full / 20, rel=1e-5)
    assert terms(9)["dkd"].item() == pytest.approx(full / 2, rel=1e-5)
    assert terms(19)["dkd"].item() == pytest.approx(full, rel=1e-5)
    assert terms(100)["dkd"].item() == pytest.approx(full, rel=1e-5)
    assert set(terms(0)) == {"ce", "dkd"}
