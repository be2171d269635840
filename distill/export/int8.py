"""The int8 model of an export (`student.int8.onnx`): the float ONNX file quantized by
onnxruntime into the QDQ format (QuantizeLinear / DequantizeLinear around each convolution and
matrix product, which onnxruntime's CPU provider runs as int8 kernels: QLinearConv, QGemm).

Weights: int8, per output channel, symmetric (scale = max |w| / 127). For a student trained with
`trainer.quantize=int8` these are exactly the integers it trained on (distill.engine.quantize),
also after the exporter or onnxruntime folds BatchNorm into the convolution: per-channel
symmetric quantization does not change when an output channel is scaled. Activations: uint8,
per tensor, their ranges calibrated (min/max) on `CALIBRATION_IMAGES` training images with the
validation pipeline (no augmentation). Both files are then run in onnxruntime on the whole test
split and timed on the same threads, so their size, latency and top-1 compare directly.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from distill.errors import ConfigError
from distill.export.onnx_file import compact_onnx

CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 32


def quantize_onnx(float_path: Path, out_path: Path, calibration: np.ndarray) -> None:
    """Write the QDQ int8 model of `float_path`, activations calibrated on `calibration`
    (normalised images [N, C, H, W], float32)."""
    try:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                              QuantFormat, QuantType, quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ConfigError("the int8 export needs onnxruntime, which is not installed",
                          key="--int8", hint="pip install 'distill[export]'") from None

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": calibration[i:i + CALIBRATION_BATCH]}
                                 for i in range(0, len(calibration), CALIBRATION_BATCH)])

        def get_next(self):
            return next(self.batches, None)

    prepared = out_path.with_name(out_path.stem + ".pre.onnx")
    try:
        # shape inference and graph optimisation (BatchNorm folded into convolutions) first, as
        # onnxruntime's quantization guide asks
        quant_pre_process(str(float_path), str(prepared))
        quantize_static(str(prepared), str(out_path), Batches(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        compact_onnx(out_path)
    finally:
        prepared.unlink(missing_ok=True)
        for leftover in out_path.parent.glob("*.onnx.data"):
            leftover.unlink(missing_ok=True)


def session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_top1(path: Path, images: np.ndarray, labels: np.ndarray, threads: int,
              batch: int = 256) -> float:
    run = session(path, threads)
    correct = 0
    for start in range(0, len(images), batch):
        (logits,) = run.run(["logits"], {"images": images[start:start + batch]})
        correct += int((logits.argmax(1) == labels[start:start + batch]).sum())
    return 100.0 * correct / len(images)


def onnx_latency_ms(path: Path, input_shape: tuple[int, ...], batch: int, threads: int,
                    warmup: int = 3, repeats: int = 30, budget_s: float = 1.0) -> float:
    """Median wall time of one run of a `batch` in onnxruntime, after warm-up."""
    run = session(path, threads)
    images = np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)
    for _ in range(warmup):
        run.run(["logits"], {"images": images})
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 5 or (len(times) < repeats and time.perf_counter() - started < budget_s):
        tick = time.perf_counter()
        run.run(["logits"], {"images": images})
        times.append(time.perf_counter() - tick)
    return 1000 * statistics.median(times)


def compare_onnx(float_path: Path, int8_path: Path, test: tuple[np.ndarray, np.ndarray],
                 input_shape: tuple[int, ...], batches: tuple[int, ...], threads: int,
                 budget_s: float) -> dict[str, Any]:
    """Size, latency per batch and test top-1 of the float and the int8 file, in onnxruntime."""
    report = {}
    for name, path in (("float32", float_path), ("int8", int8_path)):
        report[name] = {"file": path.name, "bytes": path.stat().st_size,
                        "top1": onnx_top1(path, *test, threads),
                        "latency_ms": {str(b): onnx_latency_ms(path, input_shape, b, threads,
                                                                budget_s=budget_s)
                                       for b in batches}}
    report["size_ratio"] = report["float32"]["bytes"] / report["int8"]["bytes"]
    report["top1_drop"] = report["float32"]["top1"] - report["int8"]["top1"]
    return report


def images_of(dataset, transform, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Up to `count` items of a dataset (spread over it) as (normalised float32 images, int64
    labels). Datasets of uint8 images (a Subset of one too: train_fraction) are read through
    `transform`, the validation pipeline, so calibration images are not augmented; others as
    they yield items."""
    base, positions = dataset, None
    if isinstance(dataset, Subset):
        base, positions = dataset.dataset, torch.as_tensor(dataset.indices)
    total = len(dataset) if count is None else min(count, len(dataset))
    index = torch.linspace(0, len(dataset) - 1, total).round().long()
    images_u8 = getattr(base, "images", None)
    if images_u8 is not None and transform is not None:
        items = index if positions is None else positions[index]
        images = torch.stack([transform(images_u8[i]) for i in items.tolist()])
        labels = base.labels[items]
    else:
        pairs = [dataset[i] for i in index.tolist()]
        images = torch.stack([x for x, _ in pairs])
        labels = torch.tensor([y for _, y in pairs])
    return images.numpy().astype(np.float32), labels.numpy().astype(np.int64)
