"""Quantized students (trainer.quantize=int8): the weight quantizer, a QAT run that resumes
bit-exactly and saves weights on the int8 grid, and its export to an int8 ONNX file that runs in
onnxruntime beside the float one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _compose import make_cfg
from _resume import resumes_bit_exactly
from distill.engine.quantize import Int8Weights, plain_state_dict, quantize_weights
from distill.errors import ConfigError
from distill.export import Timing, export_run, read_run
from distill.export.int8 import images_of, session
from distill.models import create_model
from distill.validation import validate

QUICK = Timing(warmup=1, min_repeats=1, max_repeats=1, budget_s=0.0)


def on_int8_grid(weight: torch.Tensor) -> bool:
    """Every output channel is an integer multiple in [-127, 127] of max|w_c| / 127."""
    scale = weight.abs().flatten(1).amax(1).clamp_min(1e-30) / 127
    steps = weight / scale.view(-1, *[1] * (weight.ndim - 1))
    return bool((steps - steps.round()).abs().max() < 1e-3 and steps.abs().max() <= 127 + 1e-3)


def test_int8_weights_per_channel_and_the_same_after_folding_a_batchnorm():
    torch.manual_seed(0)
    weight = torch.randn(8, 4, 3, 3) * torch.logspace(-3, 1, 8).view(-1, 1, 1, 1)
    weight[3] = 0.0   # an all-zero channel stays zero
    quantized = Int8Weights()(weight)
    assert on_int8_grid(quantized) and torch.equal(quantized[3], torch.zeros(4, 3, 3))
    scale = weight.abs().flatten(1).amax(1) / 127
    assert ((quantized - weight).abs().flatten(1).amax(1) <= scale / 2 + 1e-7).all()
    # a BatchNorm folded into the conv scales each output channel (also by a negative number):
    # the quantized weights scale with it, so the int8 model keeps the trained integers
    fold = torch.tensor([0.3, -2.0, 5.0, 1.0, -0.01, 7.0, 0.9, -1.1]).view(-1, 1, 1, 1)
    assert torch.allclose(Int8Weights()(quantized * fold), quantized * fold, rtol=1e-5, atol=0)
    # gradients pass straight through to the shadow weights
    shadow = weight.clone().requires_grad_(True)
    (Int8Weights()(shadow) * 3.0).sum().backward()
    assert torch.equal(shadow.grad, torch.full_like(weight, 3.0))
    # the model is left as it was: same modules, same names; the weights it saves are plain
    model = create_model("resnet8", num_classes=10)
    assert quantize_weights(model) == 10
    saved = plain_state_dict(model)
    assert set(saved) == set(create_model("resnet8", num_classes=10).state_dict())
    assert all(on_int8_grid(saved[f"{n}.weight"]) for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


def test_a_bad_quantize_value_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="none, int8") as error:
        validate(make_cfg(tmp_path, "trainer.quantize=int4"))
    assert error.value.key == "trainer.quantize"


def test_qat_run_resumes_bit_exactly_and_exports_an_int8_onnx(tmp_path):
    straight, _, checkpoint = resumes_bit_exactly(tmp_path, "distiller=kd",
                                                  "trainer.quantize=int8")
    # the student trained through the quantizer (its shadow weights are in the checkpoint)
    assert "conv1.parametrizations.weight.original" in checkpoint["parts"]["student"]
    run_dir = tmp_path / "straight"
    weights = load_file(str(run_dir / "student.safetensors"))
    assert set(weights) == set(create_model("resnet8", num_classes=10).state_dict())
    assert all(on_int8_grid(w) for k, w in weights.items() if k.endswith("weight") and w.ndim > 1
               and "bn" not in k)
    report = export_run(run_dir, batch=4, threads=1, timing=QUICK)   # int8: the run trained so
    int8 = report["int8"]
    out = run_dir / "export"
    assert (out / "student.int8.onnx").stat().st_size == int8["int8"]["bytes"]
    assert int8["size_ratio"] > 3.2 and int8["weights"].startswith("trained on int8 weights")
    # student.safetensors (plain weights) scores what the quantized model scored in training
    assert int8["float32"]["top1"] == pytest.approx(straight["last_top1"])
    # the int8 file holds exactly the integers the student trained on: the multiset of its
    # int8 weight tensors equals the trained ones' (up to each channel's sign: folding a
    # BatchNorm with a negative scale into a convolution flips that channel)
    import onnx
    from onnx import numpy_helper
    stored = [numpy_helper.to_array(t) for t in onnx.load(str(out / "student.int8.onnx")).graph
              .initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    trained = []
    for key, w in weights.items():
        if key.endswith("weight") and w.ndim > 1:
            scale = w.abs().flatten(1).amax(1).clamp_min(1e-30) / 127
            trained.append((w / scale.view(-1, *[1] * (w.ndim - 1))).round().to(torch.int8)
                           .numpy())

    def canonical(q):
        return q.shape, np.abs(q).tobytes()

    assert len(stored) == len(trained) == 10
    assert sorted(map(canonical, stored)) == sorted(map(canonical, trained))
    # onnxruntime runs it as int8 kernels (QLinearConv once its graph is optimised)
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    onnxruntime.InferenceSession(str(out / "student.int8.onnx"), options,
                                 providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node}
    assert "QLinearConv" in ops
    # and it predicts what the float file predicts on the test images
    from distill.data import build_data
    data = build_data(read_run(run_dir).config["dataset"])
    images, labels = images_of(data.val, data.val.transform)
    float_logits = session(out / "student.onnx", 1).run(["logits"], {"images": images})[0]
    int8_logits = session(out / "student.int8.onnx", 1).run(["logits"], {"images": images})[0]
    agree = float((float_logits.argmax(1) == int8_logits.argmax(1)).mean())
    assert agree >= 0.9
    assert int8["float32"]["top1"] == pytest.approx(100 * float(
        (float_logits.argmax(1) == labels).mean()))
    assert np.abs(int8_logits - float_logits).max() < 0.2 * np.abs(float_logits).max()



def test_teachers_trained_for_an_int8_run_are_float(tmp_path):
    """A teacher or assistant a quantized run trains goes to the zoo, where every model is a
    float one: the run's trainer.quantize is not passed on."""
    from distill.teachers import teacher_run_config, teacher_training_command

    cfg = make_cfg(tmp_path, "dataset=fake", "trainer.quantize=int8")
    assert cfg.trainer.quantize == "int8"
    assert teacher_run_config(cfg, "resnet14", False, {"name": "fake"}).trainer.quantize == "none"
    command = teacher_training_command(cfg, ["trainer.quantize=int8", "trainer.log_every=5"])
    assert "quantize" not in command and "trainer.log_every=5" in command
