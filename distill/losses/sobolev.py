"""Stochastic Sobolev training (Czarnecki, Osindero, Jaderberg, Swirszcz & Pascanu, NeurIPS 2017):
the student matches the teacher's derivatives with respect to the input, along random
projections of the outputs, besides the outputs themselves. Float32 (also under autocast).
"""
from __future__ import annotations

import torch
from torch import nn


def input_gradient_gap(logits_student: torch.Tensor, images_student: torch.Tensor,
                       logits_teacher: torch.Tensor, images_teacher: torch.Tensor,
                       v: torch.Tensor) -> torch.Tensor:
    """`sobolev_loss` from forwards already taken: the logits of each model on its own leaf copy
    of the images (requires_grad), so a method that needs the student's logits anyway forwards
    it once. The student's gradient keeps its graph (create_graph: the loss trains the student
    through a double backward); the teacher's does not."""
    (grad_student,) = torch.autograd.grad((logits_student.float() * v).sum(), images_student,
                                          create_graph=True)
    (grad_teacher,) = torch.autograd.grad((logits_teacher.float() * v).sum(), images_teacher)
    gap = grad_student.float() - grad_teacher.float()
    return gap.pow(2).flatten(1).sum(1).mean()


def sobolev_loss(student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
    """The batch mean of || grad_x <v, s(x)> - grad_x <v, t(x)> ||^2, the squared L2 norm summed
    over every input element, with s, t the logits of `student` and `teacher` and `v` (N, C)
    one projection of the outputs per sample (the paper draws it from the unit sphere). Each
    gradient is of the batch's sum of <v_i, logits_i>, so a model whose samples interact
    (BatchNorm in training mode) is differentiated as it runs. The student's gradient keeps its
    graph, so the loss trains it (double backward); the teacher's does not."""
    x_student = images.detach().requires_grad_(True)
    x_teacher = images.detach().requires_grad_(True)
    with torch.enable_grad():
        return input_gradient_gap(student(x_student), x_student, teacher(x_teacher), x_teacher, v)


def unit_sphere(count: int, dims: int, generator: torch.Generator) -> torch.Tensor:
    """(count, dims) directions drawn uniformly on the unit sphere (normalised Gaussians)."""
    v = torch.randn(count, dims, generator=generator, dtype=torch.float32)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
