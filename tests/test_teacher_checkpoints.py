"""Teachers given as files: a distill run's own `checkpoints/last.pt` (what its
student.safetensors holds, under an EMA or int8 too), and multi_teacher's
`teacher_checkpoints=[null, <file>]` (null: that teacher from the zoo)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from _compose import make_cfg
from distill.app import run
from distill.checkpoint import read_checkpoint
from distill.errors import ConfigError
from distill.registry import check_options
from distill.teachers import load_model
from distill.zoo import file_sha256

TINY = ("dataset=fake", "student=resnet8", "trainer.epochs=1")


def _student_run(tmp_path, *recipe: str, steps: int = 3, name: str = "student"):
    run(make_cfg(tmp_path, *TINY, "distiller=none", f"trainer.max_steps={steps}", *recipe,
                 run=name))
    return tmp_path / name


@pytest.mark.parametrize("recipe", [(), ("trainer.ema_decay=0.5",), ("trainer.quantize=int8",)],
                         ids=["plain", "ema", "int8"])
def test_a_runs_last_checkpoint_loads_as_the_weights_its_student_safetensors_holds(tmp_path,
                                                                                    recipe):
    folder = _student_run(tmp_path, *recipe)
    last = folder / "checkpoints" / "last.pt"
    exported = load_file(str(folder / "student.safetensors"))
    teacher = load_model("resnet8", str(last), key="teacher.checkpoint", num_classes=10).state_dict()
    assert teacher.keys() == exported.keys()
    for key, value in exported.items():
        torch.testing.assert_close(teacher[key], value, rtol=0, atol=0)
    if recipe:   # not merely the trained part: the EMA, or the int8 weights made from shadows
        part = {k.replace(".parametrizations.weight.original", ".weight"): v
                for k, v in read_checkpoint(last)["parts"]["student"].items()}
        assert part.keys() == exported.keys()
        assert any(not torch.equal(part[k], v) for k, v in exported.items())


def test_a_runs_last_checkpoint_is_a_teacher_and_a_wrong_architecture_is_one_line(tmp_path):
    folder = _student_run(tmp_path)
    last = folder / "checkpoints" / "last.pt"
    summary = run(make_cfg(tmp_path, *TINY, "distiller=kd", "teacher=resnet8",
                           f"teacher.checkpoint={last}", "trainer.max_steps=1", run="kd"))
    student = json.loads((folder / "summary.json").read_text())
    assert summary["teacher_top1"] == student["last_top1"]
    assert summary["teachers"][0]["sha256"] == file_sha256(last)
    with pytest.raises(ConfigError) as refused:
        load_model("resnet14", str(last), key="teacher.checkpoint", num_classes=10)
    message = str(refused.value)
    assert refused.value.key == "teacher.checkpoint"
    assert f"{last} holds a resnet8 (a distill run's checkpoint), not a resnet14" in message
    assert "Missing key" not in message and len(message.splitlines()) <= 3


def test_multi_teacher_takes_null_for_a_zoo_teacher_and_a_file_for_the_other(tmp_path, zoo):
    weights = _student_run(tmp_path, steps=1) / "student.safetensors"
    summary = run(make_cfg(
        tmp_path, *TINY, "distiller=multi_teacher", "teacher=resnet14",
        "distiller.teachers=[resnet14,resnet8]",
        f"distiller.teacher_checkpoints=[null,{weights}]", "trainer.max_steps=1", run="multi"))
    roles = {t["role"]: t for t in summary["teachers"]}
    assert roles["teacher1"]["name"] == "resnet8"
    assert roles["teacher1"]["sha256"] == file_sha256(weights)
    assert roles["teacher0"]["name"] == "resnet14"
    zoo_hashes = {file_sha256(p) for p in zoo.rglob("*.safetensors")}
    assert roles["teacher0"]["sha256"] in zoo_hashes


def test_a_list_of_files_may_hold_nulls_and_nothing_else():
    from distill.distillers.multi_teacher import MultiTeacher

    check_options(MultiTeacher, {"teacher_checkpoints": [None, "a.safetensors"]},
                  key="distiller", skip=("student", "teacher_models"))
    with pytest.raises(ConfigError, match="expected a list of strings or nulls or null, got "
                                          r"\[1, 'a.safetensors'\]") as refused:
        check_options(MultiTeacher, {"teacher_checkpoints": [1, "a.safetensors"]},
                      key="distiller", skip=("student", "teacher_models"))
    assert refused.value.key == "distiller.teacher_checkpoints"
