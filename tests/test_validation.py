"""Bad values are refused by `validate`, before any data is read or file written."""
import pytest

from _compose import make_cfg
from distill.app import run
from distill.errors import ConfigError

BASE = ["dataset=fake", "student=resnet8", "trainer.epochs=1"]


@pytest.mark.parametrize("overrides,key", [
    (["optimizer.name=adam"], "optimizer.name"),
    (["optimizer.momentum=0", "optimizer.nesterov=true"], "optimizer.nesterov"),
    (["optimizer.weight_decay=-1"], "optimizer.weight_decay"),
    (["scheduler.name=step"], "scheduler.name"),
    (["trainer.precision=fp8"], "trainer.precision"),
    (["trainer.batch_size=0"], "trainer.batch_size"),
    (["distiller=kd", "distiller.temperature=0"], "distiller.temperature"),
    (["distiller=dkd", "distiller.warmup_epochs=-1"], "distiller.warmup_epochs"),
    (["distiller=kd", "distiller.kd_weight=-0.5"], "distiller.kd_weight"),
    (["student.pretrained=true"], "student.pretrained"),
    (["device=cuda:0"], "device"),
])
def test_bad_values_fail_before_anything_is_written(tmp_path, overrides, key):
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *BASE, *overrides))
    assert err.value.key == key, err.value
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_global_batch_must_split_evenly_over_torchrun_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")   # what torchrun --nproc_per_node=3 sets
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *BASE, "trainer.batch_size=64"))
    assert err.value.key == "trainer.batch_size" and "multiple of 3" in str(err.value)


def test_sync_bn_needs_gpus_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *BASE, "trainer.sync_bn=true", "device=cpu"))
    assert err.value.key == "trainer.sync_bn"


def test_pretrained_teacher_with_a_replaced_head_is_refused(tmp_path, monkeypatch):
    import torch
    import torchvision

    def fake_get_model(name, weights=None, num_classes=1000):
        return torchvision.models.resnet18(num_classes=1000)  # stands in for the download

    monkeypatch.setattr(torchvision.models, "get_model", fake_get_model)
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *BASE, "distiller=kd", "teacher=tv_resnet18",
                     "teacher.pretrained=true"))
    assert err.value.key == "teacher.pretrained"
    assert "student.pretrained=true" in str(err.value) and "student=tv_resnet18" in str(err.value)
    del torch


def test_a_gpu_index_is_refused_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *BASE, "device=cuda:1"))
    assert err.value.key == "device" and "LOCAL_RANK" in str(err.value)


def test_unknown_compile_backend_names_the_choices(tmp_path):
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *BASE, "trainer.compile=student", "trainer.compile_backend=inductr"))
    assert err.value.key == "trainer.compile_backend" and "inductor" in str(err.value)
