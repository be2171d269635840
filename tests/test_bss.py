"""BSS (boundary-supporting samples): the sample choice, the target draw, the attack and the weight schedules
against transcriptions of the official code (bhheo/BSS_distillation) on fixed inputs; the
distiller's step on a planted case where every sample qualifies; and a run from the config that
trains and resumes bit-exactly.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from _resume import resumes_bit_exactly
from distill.losses.bss import (attack_targets, base_samples, boundary_supporting_samples,
                                bss_schedule)
from distill.method import BuildInfo, StepContext, build_distiller
from distill.models import create_model

g = torch.Generator().manual_seed(11)
TEACHER_LOGITS = torch.randn(12, 5, generator=g) * 2
STUDENT_LOGITS = TEACHER_LOGITS + torch.randn(12, 5, generator=g)
TARGETS = TEACHER_LOGITS.argmax(1).clone()
TARGETS[[1, 4]] = (TARGETS[[1, 4]] + 1) % 5           # two samples the teacher gets wrong


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_base_samples_are_the_reference_choice():
    t, s, y = TEACHER_LOGITS.double().numpy(), STUDENT_LOGITS.double().numpy(), TARGETS.numpy()
    ok = [i for i in range(12) if t[i].argmax() == y[i] and s[i].argmax() == y[i]]
    d = (_softmax(t[ok]) - _softmax(s[ok])) ** 2
    score = d.sum(1) - d[np.arange(len(ok)), y[ok]]
    want = [ok[i] for i in np.argsort(-score, kind="stable")[:4]]
    assert base_samples(TEACHER_LOGITS, STUDENT_LOGITS, TARGETS, 4).tolist() == want
    assert sorted(base_samples(TEACHER_LOGITS, STUDENT_LOGITS, TARGETS, 50).tolist()) == ok


def test_targets_are_drawn_from_the_teachers_other_classes_in_proportion():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    torch.manual_seed(0)
    drawn = attack_targets(logits)
    assert (drawn != 0).all()
    p = _softmax(logits[:1].double().numpy())[0, 1:]
    freq = np.bincount(drawn.numpy(), minlength=4)[1:] / len(drawn)
    np.testing.assert_allclose(freq, p / p.sum(), atol=0.01)


class _Linear(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T


def _attack64(weight, images, targets, steps, size, low, high):
    """The reference loop (attack_BSS.py) for a linear teacher z = W x, sample by sample, in
    float64: the gradient of z_k - z_c0 is W_k - W_c0."""
    w, out = weight.double().numpy(), []
    for x, k in zip(images.double().numpy().reshape(len(images), -1), targets.numpy()):
        c0 = (w @ x).argmax()
        for _ in range(steps):
            z = w @ x
            if z.argmax() != c0:
                break
            grad = w[k] - w[c0]
            x = np.clip(x + size * (z[c0] - z[k] + 1e-4) * grad / np.linalg.norm(grad), low, high)
        out.append(x)
    return np.array(out)


@pytest.mark.parametrize("steps", [1, 10])
def test_attack_is_the_reference_loop(steps):
    weight = torch.randn(4, 12, generator=g)
    images = torch.randn(6, 3, 2, 2, generator=g)
    start = (images.flatten(1) @ weight.T).argmax(1)
    targets = (start + 1 + torch.randint(0, 3, (6,), generator=g)) % 4
    got = boundary_supporting_samples(_Linear(weight), images, targets, steps=steps,
                                      step_size=0.3, low=-2.5, high=2.5)
    want = _attack64(weight, images, targets, steps, 0.3, -2.5, 2.5)
    np.testing.assert_allclose(got.flatten(1).double().numpy(), want, atol=1e-5)
    if steps == 10:   # the attack moved every sample off its class (or to the clamp)
        moved = (got.flatten(1) @ weight.T).argmax(1) != start
        assert moved.sum() >= 4


def test_schedules_are_the_references():
    for e, (kd, bss) in {0: (3 * (1 - 1 / 80) + 1, 2 * (1 - 4 / 3 / 80)),
                         39: (3 * (1 - 40 / 80) + 1, 2 * (1 - 4 / 3 * 40 / 80)),
                         59: (3 * (1 - 60 / 80) + 1, 0.0), 79: (1.0, 0.0)}.items():
        got = bss_schedule(e, 80)
        assert got == pytest.approx((kd, bss), abs=1e-12)


def test_step_attacks_the_samples_both_get_right_and_trains_on_them():
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=10)
    student = create_model("resnet8", num_classes=10)
    student.load_state_dict(teacher.state_dict())   # the same predictions: every sample qualifies
    info = BuildInfo(num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    d = build_distiller("bss", student, teacher, {"attack_fraction": 0.5}, info)
    d.eval()   # fixed BN statistics: the student's logits equal the teacher's
    images = torch.randn(8, 3, 32, 32)
    targets = d.teacher(images).argmax(1)
    torch.manual_seed(1)
    _, terms = d(images, targets, StepContext(0, 0, 80))
    assert set(terms) == {"ce", "kd", "bss"}
    # equal networks: the soft CE on the attacked samples is the teacher's entropy there, > 0
    assert terms["bss"].item() > 0 and terms["bss"].requires_grad
    terms["bss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    assert all(p.grad is None for p in d.teacher.parameters())
    _, late = d(images, targets, StepContext(70, 0, 80))   # past 3/4 of the run: no attack
    assert late["bss"].item() == 0


def test_trains_and_resumes_bit_exactly(tmp_path):
    resumes_bit_exactly(tmp_path, "distiller=bss", "distiller.attack_fraction=1.0")


def test_a_confident_teacher_still_has_targets():
    logits = torch.tensor([[200.0, 0.0, -3.0], [0.0, 150.0, 1.0]])   # others underflow in softmax
    drawn = attack_targets(logits.repeat(50, 1))
    assert (drawn.view(50, 2)[:, 0] != 0).all() and (drawn.view(50, 2)[:, 1] != 1).all()
