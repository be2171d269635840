import math

import numpy as np
import pytest
import torch

from distill.losses import kd_loss


pytestmark = pytest.mark.fast   # the inner-loop tier (make test-fast): a loss against its reference formula


def reference_kd(s: np.ndarray, t: np.ndarray, T: float) -> float:
    """Hinton et al. 2015, written out in float64: T^2 * mean_n sum_c p_t (log p_t - log p_s)."""
    def log_softmax(z):
        z = z / T
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    lp_s, lp_t = log_softmax(s), log_softmax(t)
    return float((np.exp(lp_t) * (lp_t - lp_s)).sum(axis=1).mean() * T * T)


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0, 10.0])
def test_matches_formula(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 100, generator=g) * 3, torch.randn(8, 100, generator=g) * 3
    expected = reference_kd(s.double().numpy(), t.double().numpy(), T)
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)


def test_zero_when_equal_and_positive_otherwise():
    z = torch.randn(4, 10)
    assert kd_loss(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(z, z + torch.randn(4, 10), 4.0).item() > 0


def test_invariant_to_per_sample_logit_shift():
    z, t = torch.randn(4, 10), torch.randn(4, 10)
    shift = torch.randn(4, 1) * 100
    assert kd_loss(z + shift, t, 2.0).item() == pytest.approx(kd_loss(z, t, 2.0).item(), rel=1e-4)


def test_t_squared_scaling_high_temperature_limit():
    """With the T^2 factor, at high T the loss tends to (1/2C) * sum (s~ - t~)^2 for zero-mean
    logits (Hinton et al. 2015, sec. 2.1): the scale no longer depends on T."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(16, 10, generator=g, dtype=torch.float64), torch.randn(16, 10, generator=g, dtype=torch.float64)
    s, t = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    limit = ((s - t) ** 2).sum(1).mean().item() / (2 * 10)
    # (float32 inside kd_loss limits how high T can go before cancellation dominates)
    assert kd_loss(s, t, 100.0).item() == pytest.approx(limit, rel=2e-2)
    assert kd_loss(s, t, 200.0).item() == pytest.approx(limit, rel=2e-2)
    assert kd_loss(s, t, 1.0).item() != pytest.approx(limit, rel=2e-2)


def test_batch_mean_not_class_mean_by_hand():
    """Two samples, T=1. Sample 1: teacher [3/4, 1/4] vs uniform student, KL = 3/4 ln(3/2) +
    1/4 ln(1/2); sample 2: equal, KL = 0. The batch mean halves sample 1's KL (a mean over
    classes too would halve it again, a sum would not halve it)."""
    s = torch.zeros(2, 2)
    t = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(kl / 2, rel=1e-6)


def test_stable_for_huge_logits_at_low_temperature():
    s = torch.tensor([[1e4, -1e4, 0.0], [0.0, 1e4, -1e4]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0], [0.0, 1e4, -1e4]])
    loss = kd_loss(s, t, 0.5)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert torch.isfinite(s.grad).all()


def test_bf16_autocast_gives_a_finite_float32_loss_and_gradient():
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kd_loss(s.bfloat16(), t.bfloat16(), 4.0)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
