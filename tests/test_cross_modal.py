"""Cross-modal KD: the student's views against their definitions, the view in front
of the student only (the teacher sees the image), aligned with the teacher's augmented batch by
construction; a run without labels for the student (ce_weight 0) that trains and resumes
bit-exactly; zoo models never see the view; methods that cut the student are refused.
"""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from _compose import make_cfg
from _resume import FAKE_RUN, resumes_bit_exactly
from distill.app import run
from distill.data.views import apply_student_view, edges, grayscale, low_res
from distill.errors import ConfigError
from distill.method import BuildInfo, build_distiller
from distill.models import create_model
from distill.teachers import teacher_run_config

MEAN = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
STD = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
g = torch.Generator().manual_seed(5)
PIXELS = torch.rand(2, 3, 8, 8, generator=g)
IMAGES = (PIXELS - MEAN) / STD


def test_views_are_their_definitions():
    gray = grayscale(IMAGES, MEAN, STD) * STD + MEAN
    luma = 0.299 * PIXELS[:, 0] + 0.587 * PIXELS[:, 1] + 0.114 * PIXELS[:, 2]
    for c in range(3):
        torch.testing.assert_close(gray[:, c], luma)
    small = low_res(IMAGES, MEAN, STD) * STD + MEAN
    blocks = PIXELS.unfold(2, 4, 4).unfold(3, 4, 4).mean((-1, -2))    # (2, 3, 2, 2)
    # bilinear upsampling of 2x2 block means by 4: the pixel at (1.5, 1.5) of each block is the
    # block mean exactly at the corners of the image
    torch.testing.assert_close(small[:, :, 0, 0], blocks[:, :, 0, 0])
    torch.testing.assert_close(small[:, :, -1, -1], blocks[:, :, -1, -1])
    flat = ((torch.full_like(PIXELS, 0.7) - MEAN) / STD)
    torch.testing.assert_close(low_res(flat, MEAN, STD), flat)
    torch.testing.assert_close(edges(flat, MEAN, STD) * STD + MEAN, torch.zeros_like(flat),
                               atol=1e-6, rtol=0)
    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1.0                                 # a vertical edge, white on the right
    magnitude = (edges((step - MEAN) / STD, MEAN, STD) * STD + MEAN)[0, 0]
    assert magnitude[:, 3:5].min() == pytest.approx(4 / (4 * math.sqrt(2)))   # Sobel: 1+2+1
    assert magnitude[:, :3].abs().max() < 1e-6 and magnitude[:, 5:].abs().max() < 1e-6


def test_the_view_is_in_front_of_the_student_only(tmp_path):
    torch.manual_seed(0)
    teacher, student = create_model("resnet8", num_classes=10), create_model("resnet8", num_classes=10)
    student.load_state_dict(teacher.state_dict())
    d = build_distiller("kd", student, teacher, {}, BuildInfo(num_classes=10)).eval()
    apply_student_view(d.evaluated_parts().values(), "grayscale", tuple(MEAN.flatten().tolist()),
                       tuple(STD.flatten().tolist()))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(d.student(images), d.teacher(grayscale(images, MEAN, STD)))
        assert not torch.allclose(d.student(images), d.teacher(images))
    assert set(student.state_dict()) == set(teacher.state_dict())   # the model is unchanged
    # a method that cuts models of its own from the student (BYOT's exits) is refused in the
    # plan: the cut models would skip the view
    with pytest.raises(ConfigError) as exc:
        run(make_cfg(tmp_path, "dataset=fake", "distiller=byot", "student=resnet8",
                     "dataset.student_view=edges", run="byot"))
    assert exc.value.key == "dataset.student_view" and not (tmp_path / "byot").exists()


VIEW = ["distiller=kd", "distiller.ce_weight=0", "dataset.student_view=edges"]


def test_trains_without_labels_and_resumes_bit_exactly(tmp_path):
    resumes_bit_exactly(tmp_path, *VIEW)
    args = [*FAKE_RUN, *VIEW]
    recorded = OmegaConf.load(tmp_path / "straight" / ".hydra" / "config.yaml")
    assert recorded.dataset.student_view == "edges"
    # a teacher trained for such a run sees the images, and the same zoo teacher serves it
    zoo_run = teacher_run_config(make_cfg(tmp_path, *args), "resnet14", False, {"name": "fake"})
    assert "student_view" not in zoo_run.dataset
    with pytest.raises(ConfigError) as exc:
        run(make_cfg(tmp_path, *FAKE_RUN, *VIEW[:-1], "dataset.student_view=greyscale", run="bad"))
    assert exc.value.key == "dataset.student_view" and "grayscale" in exc.value.message
    assert not (tmp_path / "bad").exists()


def test_a_vanilla_run_on_a_view_is_never_published_as_a_teacher(tmp_path):
    args = [a for a in FAKE_RUN if not a.startswith("zoo.publish")]
    run(make_cfg(tmp_path, *args, "dataset.student_view=edges", "distiller=none",
                 "zoo.publish=true", run="vanilla"))
    assert not (tmp_path / "zoo" / "fake").exists()
