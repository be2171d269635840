"""Adversarial KD (Xu, Hsu & Huang 2018): its GAN and L1 losses against float64 transcriptions, the
alternating step (each optimizer moves only its own part, the teacher never), and a run from
the config that trains and resumes bit-exactly with both parts and both optimizers checkpointed.

Fake data, 64 images in batches of 16 (4 steps an epoch), resnet14 -> resnet8, a fixed random
teacher, as tests/test_crd_dist_mlkd_ofd_reviewkd.py.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from _resume import resumes_bit_exactly
from distill.losses.adversarial import discriminator_loss, generator_loss, logits_l1_loss
from distill.method import BuildInfo, StepContext, build_distiller
from distill.models import create_model

g = torch.Generator().manual_seed(0)
SCORES_T, SCORES_S = torch.randn(8, generator=g) * 3, torch.randn(8, generator=g) * 3
LOGITS_S, LOGITS_T = torch.randn(8, 5, generator=g) * 4, torch.randn(8, 5, generator=g) * 4


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def test_losses_match_float64_transcriptions():
    t, s = SCORES_T.double().numpy(), SCORES_S.double().numpy()
    d = -(_log_sigmoid(t).mean() + np.log1p(-1 / (1 + np.exp(-s))).mean())
    gen = -_log_sigmoid(s).mean()
    l1 = np.abs(LOGITS_S.double().numpy() - LOGITS_T.double().numpy()).sum(1).mean()
    for got, want in ((discriminator_loss(SCORES_T, SCORES_S), d), (generator_loss(SCORES_S), gen),
                      (logits_l1_loss(LOGITS_S, LOGITS_T), l1)):
        assert got.dtype == torch.float32 and got.dim() == 0
        assert got.item() == pytest.approx(want, rel=1e-5)


def test_loss_invariants():
    assert logits_l1_loss(LOGITS_T, LOGITS_T).item() == 0
    assert logits_l1_loss(LOGITS_S, LOGITS_T).item() == logits_l1_loss(LOGITS_T, LOGITS_S).item()
    big = torch.full((4,), 50.0)
    # a perfect discriminator costs ~0, a fooled one a lot; the student wants high scores
    assert discriminator_loss(big, -big).item() < 1e-6 < discriminator_loss(-big, big).item()
    assert generator_loss(big).item() < 1e-6 and generator_loss(-big).item() == pytest.approx(50)
    assert discriminator_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(2 * math.log(2))
    assert generator_loss(torch.zeros(3)).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_losses_are_finite_with_grads_under_bf16_autocast(scale):
    t = (SCORES_T * scale).bfloat16().requires_grad_()
    s = (SCORES_S * scale).bfloat16().requires_grad_()
    ls = (LOGITS_S * scale).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [discriminator_loss(t, s), generator_loss(s), logits_l1_loss(ls, LOGITS_T * scale)]
    for loss in losses:
        assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    sum(losses).backward()
    for x in (t, s, ls):
        assert torch.isfinite(x.grad.float()).all() and x.grad.abs().sum() > 0


class _Step:
    """A ManualStep that records each optimizer step's effect on every part."""

    def __init__(self, optimizers, distiller):
        self.optimizers, self.distiller, self.changed = optimizers, distiller, []

    def backward(self, loss):
        loss.backward()

    def step(self, name):
        before = self._snapshot()
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)
        after = self._snapshot()
        self.changed.append((name, {role for role in before
                                    if any(not torch.equal(a, b)
                                           for a, b in zip(before[role], after[role]))}))
        return True

    def _snapshot(self):
        return {role: [p.detach().clone() for p in self.distiller.part(role).parameters()]
                for role in ("student", "discriminator", "teacher")}


@pytest.mark.parametrize("options,terms", [
    ({}, {"disc", "ce", "kd", "adv"}),
    ({"conditional": False, "category_weight": 1.0, "l1_weight": 1.0},
     {"disc", "disc_category", "ce", "kd", "adv", "l1"})])
def test_step_alternates_and_leaves_no_stale_gradients(options, terms):
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet14", num_classes=10)
    distiller = build_distiller("adversarial_kd", student, teacher, options,
                                BuildInfo(num_classes=10))
    distiller.train()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    groups = distiller.parameter_groups()
    assert set(groups) == {"main", "discriminator"}
    optimizers = {name: torch.optim.SGD(params, lr=0.1) for name, params in groups.items()}
    step = _Step(optimizers, distiller)
    images, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for i in range(2):
        logged = distiller.training_step(images, targets, StepContext(0, i, 1), step)
        assert set(logged) == terms
        assert all(math.isfinite(v.item()) and not v.requires_grad for v in logged.values())
        # the student's backward left no gradient in the discriminator, nor anything anywhere
        assert all(p.grad is None for p in distiller.parameters())
        assert all(p.requires_grad for p in distiller.discriminator.parameters())
    assert step.changed == [("discriminator", {"discriminator"}), ("main", {"student"})] * 2
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())


def test_options_are_checked():
    from distill.distillers.adversarial_kd import AdversarialKD
    from distill.errors import ConfigError
    for bad in ({"hidden": 0}, {"layers": 1.5}, {"conditional": 1}, {"adv_weight": -1},
                {"temperature": 0}):
        with pytest.raises(ConfigError) as exc:
            AdversarialKD.check_values(bad)
        assert exc.value.key == f"distiller.{next(iter(bad))}"
    distiller = build_distiller("adversarial_kd", create_model("resnet8", num_classes=10),
                                create_model("resnet8", num_classes=10),
                                {"category_weight": 0, "layers": 1}, BuildInfo(num_classes=10))
    assert len(list(distiller.discriminator.parameters())) == 2   # one Linear(10 -> 1)


def test_trains_and_resumes_bit_exactly(tmp_path):
    straight, resumed, a = resumes_bit_exactly(tmp_path, "distiller=adversarial_kd")
    assert set(a["parts"]) == {"student", "discriminator"}
    assert set(a["optimizers"]) == {"main", "discriminator"}
    # the discriminator's own optimizer: Adam at the constant disc_lr, no weight decay
    disc = a["optimizers"]["discriminator"]
    assert all("exp_avg" in state for state in disc["state"].values())
    assert [(g["lr"], g["weight_decay"]) for g in disc["param_groups"]] == [(2e-4, 0.0)]
    assert straight["last_top1"] == resumed["last_top1"]
    events = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").open()]
    last = [e for e in events if e["event"] == "train"][-1]
    logged = {k[len("train/"):] for k in last if k.startswith("train/")}
    assert logged - {"loss", "lr", "epoch", "images_per_sec"} == {"disc", "ce", "kd", "adv"}
    assert all(last[f"train/{t}"] > 0 for t in ("disc", "ce", "kd", "adv"))
