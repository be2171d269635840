"""Sobolev KD: `sobolev_loss` against input Jacobians computed independently with
torch.func on small models, its gradient with respect to the student's weights (the double
backward) against torch.func's, the seeded directions, and a run from the config that trains
and resumes bit-exactly.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from _compose import make_cfg
from _resume import FAKE_RUN, resumes_bit_exactly
from distill.errors import ConfigError
from distill.losses import sobolev_loss
from distill.losses.sobolev import unit_sphere
from distill.method import BuildInfo, StepContext, build_distiller
from distill.models import create_model
from distill.validation import validate

C = 5


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 16), nn.Softplus(), nn.Linear(16, C))


STUDENT, TEACHER = _net(0), _net(1).requires_grad_(False)
g = torch.Generator().manual_seed(7)
IMAGES = torch.randn(6, 3, 6, 6, generator=g)
V = unit_sphere(6, C, g)


def _reference(params: dict, images: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The definition, one sample at a time: J_s(x_i) and J_t(x_i) by jacrev, their rows
    projected on v_i, the squared L2 norm of the difference over the input, the mean."""
    def jac(model, p):
        one = lambda x: functional_call(model, p, (x[None],))[0]   # noqa: E731
        return vmap(jacrev(one))(images)            # (N, C, 3, 6, 6)
    teacher = dict(TEACHER.named_parameters())
    gap = (torch.einsum("nc,nc...->n...", v, jac(STUDENT, params))
           - torch.einsum("nc,nc...->n...", v, jac(TEACHER, teacher)))
    return gap.pow(2).flatten(1).sum(1).mean()


def test_loss_and_its_weight_gradient_match_torch_func_jacobians():
    params = {k: p.detach() for k, p in STUDENT.named_parameters()}
    want = _reference(params, IMAGES, V)
    got = sobolev_loss(STUDENT, TEACHER, IMAGES, V)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # the student trains through it: d loss / d weights (double backward) as torch.func has it
    STUDENT.zero_grad()
    got.backward()
    want_grads = grad(_reference)(params, IMAGES, V)
    for name, p in STUDENT.named_parameters():   # the last bias moves no input gradient: None
        got_grad = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got_grad, want_grads[name], rtol=1e-4, atol=1e-6)
    assert STUDENT[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in TEACHER.parameters())
    assert IMAGES.grad is None
    # a student equal to its teacher has nothing to learn; zero directions give zero
    assert sobolev_loss(TEACHER, TEACHER, IMAGES, V).item() == 0
    assert sobolev_loss(STUDENT, TEACHER, IMAGES, torch.zeros_like(V)).item() == 0


def test_directions_are_unit_and_a_function_of_seed_and_step():
    d = build_distiller("sobolev", create_model("resnet8", num_classes=10),
                        create_model("resnet8", num_classes=10), {},
                        BuildInfo(num_classes=10, seed=3))
    a, b = d.directions(8, 10, step=5), d.directions(8, 10, step=5)
    assert torch.equal(a, b) and not torch.equal(a, d.directions(8, 10, step=6))
    torch.testing.assert_close(a.norm(dim=1), torch.ones(8))
    d.train()
    images, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits, terms = d(images, targets, StepContext(0, 5, 1))
    assert set(terms) == {"ce", "kd", "sobolev"} and terms["sobolev"].requires_grad
    sum(terms.values()).backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())


def test_trains_and_resumes_bit_exactly(tmp_path):
    resumes_bit_exactly(tmp_path, "distiller=sobolev")
    args = [*FAKE_RUN, "distiller=sobolev"]
    # torch.compile cannot trace the double backward: refused before anything is built
    with pytest.raises(ConfigError) as exc:
        validate(make_cfg(tmp_path, *args, "trainer.compile=student", run="compiled"))
    assert exc.value.key == "trainer.compile" and "double backward" in exc.value.message
