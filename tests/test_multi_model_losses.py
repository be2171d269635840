"""Several teachers (`ensemble_probs`, multi_teacher) and several students (dml): each against a
transcription of its paper's formula on fixed inputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import ensemble_probs, kd_loss
from distill.method import BuildInfo, StepContext, build_distiller

CTX = StepContext(epoch=0, step=0, epochs=1)


pytestmark = pytest.mark.fast   # the inner-loop tier (make test-fast): losses against their reference formulas


def test_ensemble_of_two_teachers_by_hand():
    """Teacher a says [1/4, 3/4], teacher b [3/4, 1/4] (T=1), weights 3:1.
    Arithmetic: 3/4 a + 1/4 b = [3/8, 5/8]. Geometric: softmax(3/4 log a + 1/4 log b), whose
    odds are (3/4 / 1/4)^(3/4 - 1/4) = sqrt(3): [1/(1+sqrt 3), sqrt 3/(1+sqrt 3)]."""
    a = torch.tensor([[0.0, math.log(3)]])
    b = torch.tensor([[math.log(3), 0.0]])
    arithmetic = ensemble_probs([a, b], 1.0, "arithmetic", [3, 1])
    geometric = ensemble_probs([a, b], 1.0, "geometric", [3, 1])
    assert torch.allclose(arithmetic, torch.tensor([[3 / 8, 5 / 8]]), atol=1e-6)
    r = math.sqrt(3)
    assert torch.allclose(geometric, torch.tensor([[1 / (1 + r), r / (1 + r)]]), atol=1e-6)
    # equal weights by default: the two opinions cancel
    assert torch.allclose(ensemble_probs([a, b], 1.0), torch.full((1, 2), 0.5), atol=1e-6)


@pytest.mark.parametrize("mode", ["arithmetic", "geometric"])
def test_ensemble_matches_its_formula_at_temperature(mode):
    torch.manual_seed(0)
    logits = [torch.randn(6, 9) * 4 for _ in range(3)]
    weights, T = [0.5, 2.0, 1.5], 3.0
    w = [x / sum(weights) for x in weights]
    if mode == "arithmetic":
        expected = sum(wi * F.softmax(z / T, dim=1) for wi, z in zip(w, logits))
    else:
        expected = F.softmax(sum(wi * F.log_softmax(z / T, dim=1) for wi, z in zip(w, logits)), 1)
    got = ensemble_probs(logits, T, mode, weights)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(1), torch.ones(6))
    # weights are normalised: scaling them changes nothing; a zero weight drops a teacher
    assert torch.allclose(ensemble_probs(logits, T, mode, [10 * x for x in weights]), got)
    assert torch.allclose(ensemble_probs(logits, T, mode, [1, 0, 0]),
                          F.softmax(logits[0] / T, dim=1), atol=1e-6)


def test_ensemble_stays_finite_where_probabilities_underflow():
    z = torch.tensor([[1e4, -1e4, 0.0]])
    for mode in ("arithmetic", "geometric"):
        p = ensemble_probs([z, -z], 0.5, mode)
        assert torch.isfinite(p).all() and torch.allclose(p.sum(1), torch.ones(1))


def test_ensemble_refuses_bad_weights_and_modes():
    z = [torch.zeros(1, 3)] * 2
    for kwargs in ({"weights": [1.0]}, {"weights": [-1.0, 2.0]}, {"weights": [0.0, 0.0]},
                   {"mode": "harmonic"}):
        with pytest.raises(ValueError):
            ensemble_probs(z, 1.0, **kwargs)


def test_multi_teacher_kd_term_is_kl_to_the_ensemble():
    """kd = kd_weight * T^2 * batch mean of sum_c q_c (log q_c - log softmax(s/T)_c), q the
    weighted mean of the teachers' softmax(z/T); with one teacher it is plain KD."""
    torch.manual_seed(1)
    student = nn.Linear(8, 5)
    teachers = {f"teacher{i}": nn.Linear(8, 5) for i in range(2)}
    x, y = torch.randn(4, 8), torch.randint(0, 5, (4,))
    distiller = build_distiller("multi_teacher", student, teachers,
                                {"teachers": ["a", "b"], "weights": [1.0, 3.0], "kd_weight": 0.9,
                                 "ce_weight": 0.1, "temperature": 2.0})
    logits, terms = distiller(x, y, CTX)
    with torch.no_grad():
        q = 0.25 * F.softmax(teachers["teacher0"](x) / 2, 1) + 0.75 * F.softmax(teachers["teacher1"](x) / 2, 1)
        s = F.log_softmax(student(x) / 2, 1)
        expected = 0.9 * 4 * (q * (q.log() - s)).sum(1).mean()
    assert torch.allclose(terms["kd"], expected, atol=1e-6)
    assert torch.allclose(terms["ce"], 0.1 * F.cross_entropy(logits, y))
    assert all(not p.requires_grad for t in teachers.values() for p in t.parameters())
    single = build_distiller("multi_teacher", student, {"teacher0": teachers["teacher0"]},
                             {"teachers": ["a"]})
    with torch.no_grad():
        plain = 0.9 * kd_loss(student(x), teachers["teacher0"](x), 4.0)
    assert torch.allclose(single(x, y, CTX)[1]["kd"], plain, atol=1e-6)


class SGDStep:
    """A stand-in for the trainer's ManualStepper: plain backward and SGD steps."""

    def __init__(self, distiller, lr):
        self.optimizers = {role: torch.optim.SGD(distiller.part(role).parameters(), lr=lr)
                           for role in distiller.peer_roles}

    def backward(self, loss):
        loss.backward()

    def step(self, name):
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)
        return True


def test_dml_updates_the_peers_in_turn_each_learning_from_the_others_latest_predictions():
    """Zhang et al. 2018, Algorithm 1 (K=2): peer 0 minimises CE + KL(p1 || p0) at the current
    weights and steps; then peer 1 minimises CE + KL(p0' || p1) against peer 0's predictions
    after that step. Checked against the update computed by hand."""
    torch.manual_seed(2)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    peer0 = nn.Linear(4, 3)
    distiller = build_distiller("dml", peer0, None, {"peers": ["resnet8", "resnet8"]},
                                BuildInfo(num_classes=3, student_arch="resnet8"))
    distiller.peer1 = nn.Linear(4, 3)   # small stand-ins for the registry's resnet8
    w0 = {k: v.clone() for k, v in distiller.peer0.state_dict().items()}
    w1 = {k: v.clone() for k, v in distiller.peer1.state_dict().items()}

    def kl(p_logits, q_logits):   # KL(softmax(p) || softmax(q)), batch mean
        p = F.softmax(p_logits, 1)
        return (p * (F.log_softmax(p_logits, 1) - F.log_softmax(q_logits, 1))).sum(1).mean()

    lr = 0.5
    # peer 0 by hand
    a = nn.Linear(4, 3)
    a.load_state_dict(w0)
    b = nn.Linear(4, 3)
    b.load_state_dict(w1)
    kl0 = kl(b(x).detach(), a(x))
    loss0 = F.cross_entropy(a(x), y) + kl0
    grads = torch.autograd.grad(loss0, list(a.parameters()))
    with torch.no_grad():
        for p, g in zip(a.parameters(), grads):
            p -= lr * g
    kl1 = kl(a(x).detach(), b(x))   # peer 1 learns from peer 0 after its update

    terms = distiller.training_step(x, y, CTX, SGDStep(distiller, lr))
    assert torch.allclose(terms["peer0/kl"], kl0.detach(), atol=1e-6)
    assert torch.allclose(terms["peer1/kl"], kl1.detach(), atol=1e-6)
    assert torch.allclose(distiller.peer0.weight, a.weight, atol=1e-6)


def test_dml_refreshed_predictions_leave_batchnorm_statistics_as_one_forward_does():
    torch.manual_seed(3)

    def net():
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))

    distiller = build_distiller("dml", net(), None, {"peers": ["resnet8", "resnet8"]},
                                BuildInfo(num_classes=3, student_arch="resnet8"))
    distiller.peer1 = net()
    distiller.train()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    distiller.training_step(x, y, CTX, SGDStep(distiller, 0.1))
    for role in distiller.peer_roles:
        assert int(distiller.part(role)[1].num_batches_tracked) == 1, role


def test_dml_needs_two_peers_and_the_student_first():
    from distill.distillers.dml import DML
    from distill.errors import ConfigError

    with pytest.raises(ConfigError, match="distiller.peers"):
        DML.check_values({"peers": ["resnet8"]})
    with pytest.raises(ConfigError) as err:
        build_distiller("dml", nn.Linear(2, 2), None, {"peers": ["resnet20", "resnet8"]},
                        BuildInfo(num_classes=2, student_arch="resnet8"))
    assert err.value.key == "distiller.peers" and "student=resnet20" in err.value.hint
