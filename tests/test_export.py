"""tools/export.py and distill.export on a real (tiny) run: a resnet8 student distilled for two
steps from a resnet14 teacher that the run trained into its own zoo."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from _compose import make_cfg
from distill.app import run
from distill.errors import ConfigError
from distill.export import (Timing, export_run, flops_per_image, read_run,
                            reload_exported)
from distill.models import create_model

REPO = Path(__file__).resolve().parents[1]
EXPORT_TOOL = REPO / "tools" / "export.py"
QUICK = Timing(warmup=1, min_repeats=1, max_repeats=1, budget_s=0.0)   # numbers, not benchmarks


# one xdist worker runs this module: its fixture trains the exported run once
pytestmark = pytest.mark.xdist_group("export")


def load_tool():
    spec = importlib.util.spec_from_file_location("export_tool", EXPORT_TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, trained_zoo) -> Path:
    """A finished run written by the real trainer (config, summary, weights), its teacher the
    session's shared zoo teacher (a copy of the zoo beside the run)."""
    home = tmp_path_factory.mktemp("run")
    shutil.copytree(trained_zoo, home / "zoo")
    run(make_cfg(home, "dataset=fake", "student=resnet8", "teacher=resnet14", "distiller=kd",
                 "trainer.epochs=1", "trainer.max_steps=2"))
    return home / "run"


@pytest.fixture(scope="module")
def exported(run_dir) -> dict:
    return export_run(run_dir, batch=3, threads=1, timing=QUICK)


def copy_run(run_dir: Path, dest: Path, edit) -> Path:
    """A copy of the finished run with its recorded config changed by `edit(config)`."""
    (dest / ".hydra").mkdir(parents=True)
    for name in ("summary.json", "student.safetensors"):
        shutil.copy(run_dir / name, dest / name)
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    edit(config)
    (dest / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    return dest


def student_of(run_dir: Path) -> nn.Module:
    model = create_model("resnet8", num_classes=10)
    model.load_state_dict(load_file(str(run_dir / "student.safetensors")))
    return model.eval()


def test_export_writes_weights_onnx_and_the_report(run_dir, exported):
    out = run_dir / "export"
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "student.onnx",
                                                     "student.safetensors"]
    assert json.loads((out / "export.json").read_text()) == exported
    assert not list(run_dir.glob(".export-*"))   # the staging folder is gone
    summary = json.loads((run_dir / "summary.json").read_text())
    student, teacher = exported["student"], exported["teacher"]
    assert student["model"] == "resnet8" and teacher["model"] == "resnet14"
    assert teacher["missing"] is None and Path(teacher["weights"]).is_file()
    assert student["top1"] == summary["last_top1"]
    assert teacher["top1"] == summary["teacher_top1"] is not None
    assert student["params"] == sum(p.numel() for p in student_of(run_dir).parameters())
    assert student["params"] < teacher["params"]
    assert student["flops_per_image"] < teacher["flops_per_image"]
    assert set(student["latency_ms"]) == set(teacher["latency_ms"]) == {"1", "3"}
    assert all(ms > 0 for ms in student["latency_ms"].values())
    assert exported["cpu_threads"] == 1 and exported["input_shape"] == [3, 32, 32]
    assert student["weights_bytes"] == (out / "student.safetensors").stat().st_size
    assert exported["onnx"]["bytes"] == (out / "student.onnx").stat().st_size


def test_exported_weights_reload_into_create_model_with_identical_outputs(run_dir, exported):
    path = run_dir / "export" / "student.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["model"] == "resnet8" and meta["num_classes"] == "10"
    assert json.loads(meta["input_shape"]) == [3, 32, 32]
    assert json.loads(meta["mean"]) == [0.5, 0.5, 0.5] and json.loads(meta["std"]) == [0.25] * 3
    reloaded = create_model(meta["model"], num_classes=int(meta["num_classes"]))
    reloaded.load_state_dict(load_file(str(path)), strict=True)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = student_of(run_dir)(images)
        assert torch.equal(reloaded.eval()(images), expected)
        assert torch.equal(reload_exported(path)(images), expected)


@pytest.mark.extras   # onnxruntime: the export extra
def test_onnx_runs_in_onnxruntime_like_torch_on_any_batch(run_dir, exported):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(run_dir / "export" / "student.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert not isinstance(session.get_inputs()[0].shape[0], int)   # a named, dynamic batch
    student = student_of(run_dir)
    for batch in (1, 3):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = student(images).numpy()
        (got,) = session.run(["logits"], {"images": images.numpy()})
        assert got.shape == (batch, 10)
        assert abs(got - expected).max() <= 1e-4
    assert exported["onnx"]["check"] == "onnxruntime" and exported["onnx"]["max_abs_diff"] <= 1e-4


@pytest.mark.extras   # onnxruntime: the export extra
def test_the_torchscript_exporter_is_the_fallback_without_onnxscript(run_dir, tmp_path,
                                                                     monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr("distill.export.onnx_exporter", lambda: "torchscript")
    report = export_run(run_dir, tmp_path / "out", batch=2, timing=QUICK)
    assert report["onnx"]["exporter"] == "torchscript"
    assert report["onnx"]["max_abs_diff"] <= 1e-4 and report["onnx"]["batches"] == [1, 3]


def test_flops_of_a_conv_and_a_linear_equal_the_analytic_count():
    cin, cout, k, size, classes = 3, 8, 3, 16, 10
    model = nn.Sequential(nn.Conv2d(cin, cout, k, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(cout * size * size, classes))
    analytic = 2 * cin * cout * k * k * size * size + 2 * (cout * size * size) * classes
    assert flops_per_image(model, (cin, size, size)) == analytic


def test_resnet8_flops_equal_a_count_over_its_layers(exported):
    """Independent count: every conv and linear layer's multiply-adds from its output shape."""
    model = create_model("resnet8", num_classes=10).eval()
    counted = []

    def count(module, _inputs, output):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per_output = module.in_channels // module.groups * kh * kw
            counted.append(2 * per_output * output.numel())
        elif isinstance(module, nn.Linear):
            counted.append(2 * module.in_features * module.out_features)

    hooks = [module.register_forward_hook(count) for module in model.modules()]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert len(counted) == 10   # 7 convs + 2 shortcut 1x1 convs + the classifier
    assert flops_per_image(model, (3, 32, 32)) == sum(counted)
    assert exported["student"]["flops_per_image"] == sum(counted)


def test_a_missing_teacher_still_exports_the_student(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "student.onnx").write_text("from an earlier export")
    report = export_run(run_dir, out, batch=2, onnx=False, zoo_root=tmp_path / "empty-zoo",
                        timing=QUICK)
    assert report["teacher"]["model"] == "resnet14" and "params" not in report["teacher"]
    assert "resnet14" in report["teacher"]["missing"]
    assert "not in the teacher zoo" in report["teacher"]["missing"]
    assert report["onnx"] is None
    # the stale ONNX file would not match these weights
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "student.safetensors"]


def broken_export(*args, **_kwargs):
    """torch.onnx.export on a model it cannot export, after writing part of the file."""
    Path(args[2]).write_bytes(b"half an onnx file")
    raise RuntimeError("exporter crashed\n(pages of exporter diagnostics)")


def test_a_failed_export_leaves_nothing_half_written(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(ConfigError, match="RuntimeError: exporter crashed; pass --no-onnx"):
        export_run(run_dir, out, batch=2, timing=QUICK)
    assert list(tmp_path.iterdir()) == []   # neither out/ nor a staging folder
    # an earlier export stays exactly as it was
    export_run(run_dir, out, batch=2, onnx=False, timing=QUICK)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match="exporter crashed"):
        export_run(run_dir, out, batch=2, timing=QUICK)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_prints_teacher_and_student_side_by_side(run_dir, tmp_path, capsys):
    code = load_tool().main([str(run_dir), "--out", str(tmp_path / "out"), "--no-onnx",
                             "--batch", "2", "--threads", "1", "--budget", "0"])
    printed = capsys.readouterr().out
    assert code == 0
    for text in ("teacher resnet14", "student resnet8", "params", "FLOPs / image",
                 "CPU latency, batch 1", "CPU latency, batch 2", "test top-1", "1 CPU thread,",
                 "78,042"):
        assert text in printed
    assert (tmp_path / "out" / "export.json").is_file()


def test_cli_a_model_torch_onnx_cannot_export_is_one_error_line_suggesting_no_onnx(
        run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.onnx, "export", broken_export)
    out = tmp_path / "out"
    assert load_tool().main([str(run_dir), "--out", str(out), "--budget", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert line == ("error: --no-onnx: torch.onnx (dynamo exporter) cannot export resnet8: "
                    "RuntimeError: exporter crashed; pass --no-onnx to export the weights "
                    "without student.onnx (nothing was written)")
    assert list(tmp_path.iterdir()) == []


def test_cli_an_output_folder_that_cannot_be_created_is_one_error_line(run_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker / "export", blocker / "deeper" / "export"):
        assert load_tool().main([str(run_dir), "--out", str(out), "--no-onnx"]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.strip().splitlines() == [
            f"error: --out: cannot create {out}: {blocker} is a file, not a folder"]
    assert list(tmp_path.iterdir()) == [blocker]


def test_vanilla_run_exports_without_a_teacher(run_dir, tmp_path, capsys):
    """distiller=none: teacher.* are the unused defaults (resnet14 here, and the run's zoo does
    hold one): no teacher is looked up, measured or shown."""
    def vanilla(config):
        config["distiller"] = {"name": "none"}

    vanilla_run = copy_run(run_dir, tmp_path / "vanilla", vanilla)
    report = export_run(vanilla_run, tmp_path / "out", batch=2, onnx=False, timing=QUICK)
    assert report["teacher"]["model"] is None
    assert report["teacher"]["missing"] == "vanilla run: no teacher"
    assert "params" not in report["teacher"] and report["teacher"]["top1"] is None
    assert load_tool().main([str(vanilla_run), "--out", str(tmp_path / "cli"), "--no-onnx",
                             "--batch", "2", "--budget", "0"]) == 0
    printed = capsys.readouterr().out
    assert "vanilla run: no teacher, student resnet8" in " ".join(printed.split())  # title wraps
    assert "resnet14" not in printed and "unavailable" not in printed


@pytest.mark.parametrize("dataset", ["mnist5k", "folder"])
def test_input_facts_of_every_dataset_come_from_the_dataset_registry(run_dir, tmp_path, dataset):
    """mnist5k's mean/std are the ones its images were normalised with in training (pinned
    here as numbers); a folder run is fed like ImageNet at its config's dataset.image_size."""
    def retarget(config):
        config["dataset"] = ({"name": "mnist5k", "path": None, "augment": True}
                             if dataset == "mnist5k" else
                             {"name": "folder", "root": "/images", "image_size": 48})

    moved = copy_run(run_dir, tmp_path / dataset, retarget)
    found = read_run(moved)
    expected = (((0.1004,) * 3, (0.2754,) * 3, 32) if dataset == "mnist5k"
                else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 48))
    assert (found.mean, found.std, found.input_shape[1]) == expected
    assert found.num_classes == 10   # from the weights
    if dataset == "folder":
        return
    export_run(moved, tmp_path / "out", batch=2, onnx=False, zoo_root=tmp_path / "no-zoo",
               timing=QUICK)
    with safe_open(str(tmp_path / "out" / "student.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert tuple(json.loads(meta["mean"])) == expected[0]
    assert tuple(json.loads(meta["std"])) == expected[1]
    assert meta["dataset"] == "mnist5k" and json.loads(meta["input_shape"]) == [3, 32, 32]


@pytest.mark.slow   # the export tool in a subprocess (its imports: about 10 s)
def test_cli_missing_run_dir_is_one_error_line_and_exit_2(tmp_path):
    missing = tmp_path / "no-such-run"
    result = subprocess.run([sys.executable, str(EXPORT_TOOL), str(missing)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "no such directory" in lines[0]
    assert "student.safetensors" in lines[0]   # says what a run directory holds
    assert not missing.exists()


@pytest.mark.parametrize("case", ["empty", "unfinished", "no-weights"])
def test_directories_that_are_not_finished_runs_exit_2(run_dir, tmp_path, capsys, case):
    bad = tmp_path / case
    (bad / ".hydra").mkdir(parents=True)
    if case != "empty":
        shutil.copy(run_dir / ".hydra" / "config.yaml", bad / ".hydra" / "config.yaml")
    if case == "unfinished":
        (bad / "checkpoints").mkdir()
    if case == "no-weights":
        shutil.copy(run_dir / "summary.json", bad / "summary.json")
    expected = {"empty": "no .hydra/config.yaml", "unfinished": "unfinished run",
                "no-weights": "no student.safetensors"}[case]
    with pytest.raises(ConfigError, match=expected):
        read_run(bad)
    assert load_tool().main([str(bad)]) == 2
    error = capsys.readouterr().err
    assert str(bad) in error and expected in error
    assert not (bad / "export").exists()
