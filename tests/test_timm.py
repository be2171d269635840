"""timm models as teachers and students (`timm_<name>`): built offline, their default feature
layers from timm's own `feature_info`, input sizes checked before anything is built."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _compose import make_cfg
from distill.app import run
from distill.errors import ConfigError
from distill.models import create_model, list_models, model_spec

CNN, SMALL_CNN, VIT = "timm_resnet10t", "timm_mobilenetv3_small_050", "timm_vit_tiny_patch16_224"


def test_timm_models_are_registered_with_timm_s_own_metadata():
    assert {CNN, SMALL_CNN, VIT} <= set(list_models("timm_*"))
    assert len(list_models("timm_*")) > 1000
    cnn = model_spec(CNN)
    assert (cnn.stem, cnn.stages, cnn.classifier) == ("act1", ("layer1", "layer2", "layer3",
                                                                "layer4"), "fc")
    assert cnn.min_input_size == 32 and not cnn.fixed_input
    vit = model_spec(VIT)   # dynamic_img_size: any input size
    assert vit.stages == tuple(f"blocks.{i}" for i in range(12)) and vit.classifier == "head"
    assert not vit.fixed_input and vit.min_input_size == 16
    assert model_spec("timm_mixer_s16_224").fixed_input   # no dynamic size: 224 only
    assert create_model(VIT, num_classes=7)(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def _weights(tmp_path: Path, arch: str) -> Path:
    path = tmp_path / f"{arch}.safetensors"
    torch.manual_seed(0)
    save_file(create_model(arch, num_classes=10).state_dict(), str(path))
    return path


@pytest.mark.parametrize("method,teacher,student", [("kd", CNN, VIT), ("rkd", VIT, CNN),
                                                    ("fitnet", CNN, SMALL_CNN)])
def test_timm_teachers_and_students_train(tmp_path, method, teacher, student):
    """A CNN and a ViT as teacher and as student: KD, RKD (pooled features: the input of the
    classifier timm names) and FitNet (a stage of each model from feature_info, no layer
    option given)."""
    summary = run(make_cfg(tmp_path, "dataset=fake", "dataset.train_size=32",
                           "dataset.val_size=16", f"distiller={method}", f"teacher={teacher}",
                           f"student={student}", f"teacher.checkpoint={_weights(tmp_path, teacher)}",
                           "trainer.batch_size=16", "trainer.max_steps=2", "device=cpu"))
    assert summary["steps"] == 2 and summary["teachers"][0]["name"] == teacher
    assert summary["models"]["student"]["arch"] == student
    if method == "fitnet":   # its connector maps the student's stage to the teacher's
        assert summary["connector_params"] > 0


def test_a_fixed_input_size_is_checked_before_anything_is_made(tmp_path):
    cfg = make_cfg(tmp_path, "dataset=fake", "student=timm_mixer_s16_224", "teacher=resnet8",
                   "teacher.auto_train=true", "device=cpu", run="refused")
    with pytest.raises(ConfigError) as exc:
        run(cfg)
    assert exc.value.key == "student" and "224x224 images only" in exc.value.message
    assert not (tmp_path / "refused").exists() and not (tmp_path / "zoo").exists()


def test_pretrained_offline_is_a_clear_error_not_a_hang(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from distill.models import timm_models

    monkeypatch.setattr(timm_models, "_hub_reachable", lambda: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ConfigError) as exc:
        create_model(CNN, num_classes=10, pretrained=True)
    assert "Hugging Face cache" in exc.value.hint and "teacher.checkpoint" in exc.value.hint
