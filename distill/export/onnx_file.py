"""The ONNX file of an export: written by torch.onnx with a dynamic batch dimension, then run
with onnxruntime and compared with torch."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import ConfigError
from distill.inputs import InputSpec, call_model

ONNX_CHECK_BATCHES = (1, 3)   # neither is the batch of 2 exported with: proves the batch is dynamic
ONNX_ATOL = 1e-4              # per unit of logit magnitude: float32 rounding grows with it


class ExportError(Exception):
    """The exported model does not behave like the torch one (not a problem with the input)."""


def onnx_exporter() -> str:
    """torch's exporter that can run here: `dynamo` (torch.export based, the default since
    torch 2.9) needs onnx and onnxscript; the older `torchscript` one needs only onnx."""
    have = {name: importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript")}
    if have["onnx"] and have["onnxscript"]:
        return "dynamo"
    if have["onnx"]:
        return "torchscript"
    raise ConfigError("ONNX export needs the onnx package (and onnxscript for torch's current "
                      "exporter), which is not installed", key="--no-onnx",
                      hint="pip install 'distill[export]', or pass --no-onnx")


def export_onnx(model: nn.Module, inputs: InputSpec, path: Path, exporter: str) -> None:
    """`images` [batch, C, H, W] -> `logits` [batch, classes], the batch dynamic; or
    `input_ids`, `attention_mask` [batch, sequence] -> `logits`, batch and sequence dynamic.
    One file."""
    # batch 2, not 1: torch.export specialises dimensions of size 1
    example = inputs.random(2, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch")
    if inputs.kind == "images":
        args, kwargs, axes = (example,), {}, {"images": {0: "batch"}}
        shapes: Any = ({0: batch},)
    else:
        sequence = torch.export.Dim("sequence", min=2, max=max(2, 4 * inputs.shape[0]))
        args, kwargs = (), example
        axes = {name: {0: "batch", 1: "sequence"} for name in inputs.names}
        shapes = {name: {0: batch, 1: sequence} for name in inputs.names}
    names = {"input_names": inputs.names, "output_names": ["logits"]}
    if exporter == "dynamo":
        torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=True,
                          external_data=False, dynamic_shapes=shapes, verbose=False, **names)
    else:
        with warnings.catch_warnings():   # chosen knowingly: the only exporter without onnxscript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, args or (), str(path), kwargs=kwargs, dynamo=False,
                              dynamic_axes={**axes, "logits": {0: "batch"}}, **names)


def compact_onnx(path: Path) -> None:
    """Rewrite an ONNX file without what running it does not need: node names, doc strings and
    metadata (the dynamo exporter records each node's Python stack), shape annotations of
    inner tensors, and long inner tensor names (short ids instead). The graph's inputs and
    outputs keep their names; the computation is unchanged. For a small model these are a
    tenth of the file or more."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for a in node.attribute):
        return   # names used inside subgraphs (If, Loop) would need renaming there too
    keep = {v.name for v in (*graph.input, *graph.output)}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
        tensor.doc_string = ""
    for index, node in enumerate(graph.node):
        node.name = f"n{index}"
        node.doc_string = ""
        del node.metadata_props[:]
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del graph.value_info[:]
    del graph.metadata_props[:]
    graph.doc_string = model.doc_string = ""
    onnx.save(model, str(path))


def onnx_export_error(model: str, exporter: str, exc: BaseException) -> ConfigError:
    """torch.onnx could not export this model (an operator or a pattern it does not support):
    one line naming it and what to do, instead of the exporter's pages of traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
    return ConfigError(f"torch.onnx ({exporter} exporter) cannot export {model}: {reason}; pass "
                       f"--no-onnx to export the weights without student.onnx (nothing was "
                       f"written)", key="--no-onnx")


def check_onnx(model: nn.Module, path: Path, inputs: InputSpec) -> dict[str, Any]:
    """Run the file with onnxruntime on random batches (token batches of other lengths than the
    export's too) and compare with torch; without onnxruntime, only validate the graph with
    onnx's checker."""
    if importlib.util.find_spec("onnxruntime") is None:
        import onnx

        onnx.checker.check_model(str(path), full_check=True)
        return {"check": "onnx.checker (onnxruntime not installed: outputs not compared)"}
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst, scale = 0.0, 1.0
    generator = torch.Generator().manual_seed(0)
    for batch in ONNX_CHECK_BATCHES:
        length = None if inputs.kind == "images" else max(2, inputs.shape[0] // batch)
        example = inputs.random(batch, length, generator=generator)
        with torch.inference_mode():
            expected = call_model(model, example).numpy()
        feed = ({"images": example.numpy()} if inputs.kind == "images"
                else {name: value.numpy() for name, value in example.items()})
        (got,) = session.run(["logits"], feed)
        if got.shape != expected.shape:
            raise ExportError(f"ONNX model gives {got.shape} logits for a batch of {batch}, "
                              f"torch gives {expected.shape}")
        worst = max(worst, float(abs(got - expected).max()))
        scale = max(scale, float(abs(expected).max()))
    if worst > ONNX_ATOL * scale:
        raise ExportError(f"ONNX model differs from torch by up to {worst:.2e} (allowed "
                          f"{ONNX_ATOL * scale:.2e} for logits up to {scale:.1f})")
    return {"check": "onnxruntime", "batches": list(ONNX_CHECK_BATCHES), "max_abs_diff": worst}


