"""Portable ONNX: the integer graph written by ``torch.onnx``'s exporter, standard operators only.

The fake-quant GraphModule is lowered to :func:`hyq_fx.integer_graph.integer_graph` (quantize /
dequantize ops with integer weights), captured by ``torch.export`` with a dynamic batch
dimension, and translated by ``torch.onnx.export(..., dynamo=True)``: onnxscript's torchlib
maps every ATen op and ``quantized_decomposed`` op (``QuantizeLinear`` / ``DequantizeLinear``),
so an architecture needs no exporter code of its own. The file holds int8 / uint8 weights
behind ``DequantizeLinear`` and activation ``QuantizeLinear`` → ``DequantizeLinear`` pairs (the
"QDQ format" every ONNX runtime reads); ONNX Runtime fuses them into integer kernels where it
can. For ONNX Runtime's fastest kernels (``QLinearConv`` on requantized outputs, its contrib
operators) use :func:`hyq_fx.backends.onnx_qdq.export_onnx_qdq` (``hyq-fx export --to
onnxruntime``).

The input shape is the one the model was quantized at (``gm.meta["hyq"]["input_shape"]``); an
``example_input`` of another ``C×H×W`` is an error, since shapes inside the graph (token
counts, position tables) were traced at that size. The batch dimension is dynamic unless the
graph fixes it (then the file is exported at the example's batch and its report says so).

Invariant checked by ``tests/test_onnx_export.py``: ONNX Runtime's logits match the fake-quant
model (SQNR bound, same top-1) at batch 1 and 8, weights are integer initializers, and the file
contains only operators of the standard domain.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import fx

from hyq_fx.integer_graph import IntegerGraphError, integer_graph
from hyq_fx.quantize import input_shape

from .onnx_file import INPUT_NAME, OUTPUT_NAME, write_model
from .onnx_qdq import ExportError

__all__ = ["DEFAULT_OPSET", "export_onnx", "export_onnx_artifact"]

DEFAULT_OPSET = 20  # Gelu and the QDQ ops ONNX Runtime and OpenVINO read
MAX_BATCH = 4096
BATCH_DIM = "batch"


def _example(gm: fx.GraphModule, example_input: torch.Tensor | None) -> torch.Tensor:
    recorded = input_shape(gm)
    if example_input is None:
        if recorded is None:
            raise ExportError(
                "the model records no input shape (it was not made by hyq_fx.quantize): "
                "pass example_input, one image batch [N, C, H, W] of the deployed size"
            )
        return torch.zeros(2, *recorded)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise ExportError("example_input must be an image batch tensor [N, C, H, W]")
    if recorded is not None and tuple(example_input.shape[1:]) != recorded:
        raise ExportError(
            f"example_input has shape {tuple(example_input.shape)} but the model was quantized "
            f"at {('N', *recorded)}: export at that size, or quantize again at the new one"
        )
    x = example_input.detach().float()[:2]
    return x if x.shape[0] == 2 else x.repeat(2, *([1] * (x.dim() - 1)))


def _exported_program(module: fx.GraphModule, x: torch.Tensor) -> tuple[Any, bool]:
    """``torch.export`` with a dynamic batch, or a static one where the graph fixes it."""
    batch = {0: torch.export.Dim(BATCH_DIM, min=1, max=MAX_BATCH)}
    with torch.no_grad():
        try:
            return torch.export.export(module, (x,), dynamic_shapes=(batch,), strict=False), True
        except Exception as dynamic_error:  # e.g. a reshape that fixes the batch size
            try:
                return torch.export.export(module, (x[:1],), strict=False), False
            except Exception:
                raise _failed("torch.export", dynamic_error) from dynamic_error


def _failed(step: str, exc: BaseException) -> ExportError:
    first = (str(exc).strip().splitlines() or [""])[0][:400]
    return ExportError(
        f"{step} could not export the quantized graph: {type(exc).__name__}: {first} (check "
        "that the model runs on an input of the size it was quantized at)"
    )


def _rename_batch(model: onnx.ModelProto, dynamic: bool) -> None:
    """The symbolic batch dimension (torch names it ``s0``-like) is called ``batch``."""
    if not dynamic:
        return
    symbol = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = BATCH_DIM


def export_onnx(
    gm: fx.GraphModule,
    path: str | os.PathLike[str],
    example_input: torch.Tensor | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
) -> Path:
    """Write ``gm`` (a calibrated hyq-fx GraphModule) to ``path`` as a portable QDQ ONNX model.

    ``example_input``: an image batch of the deployed size (default: zeros of the size the model
    was quantized at). The model's ``hyq`` metadata (recipe, bits, preprocessing) and an export
    report (``hyq_export``: exporter, opset, dynamic batch, Q/DQ counts) are stored as metadata
    properties, so ``OnnxRunner`` and ``hyq-fx eval`` read the file like any other.
    """
    if not isinstance(gm, fx.GraphModule):
        raise ExportError(f"export_onnx needs a torch.fx.GraphModule, got {type(gm).__name__}")
    x = _example(gm, example_input)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ExportError(f"the module takes {len(placeholders)} inputs; only one is supported")
    try:
        module = integer_graph(gm, x).eval()
    except IntegerGraphError as exc:
        raise ExportError(str(exc)) from exc
    program, dynamic = _exported_program(module, x)
    try:
        onnx_program = torch.onnx.export(
            program, (x,), dynamo=True, opset_version=opset, optimize=True, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        )  # fmt: skip
    except Exception as exc:
        raise _failed("torch.onnx", exc) from exc
    model = onnx_program.model_proto
    _rename_batch(model, dynamic)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    report = {
        "exporter": "torch.onnx",
        "flavour": "portable",
        "opset": opset,
        "dynamic_batch": dynamic,
        "input_shape": list(x.shape[1:]),
        "n_quantize_linear": ops.get("QuantizeLinear", 0),
        "n_dequantize_linear": ops.get("DequantizeLinear", 0),
    }
    return write_model(model, path, gm, report, check=check)


def export_onnx_artifact(
    out_dir: str | os.PathLike[str],
    onnx_path: str | os.PathLike[str] | None = None,
    *,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export the quantized model saved in ``out_dir`` (``hyq-fx quantize --out``) to
    ``onnx_path`` (default ``out_dir/model.qdq.onnx``) with :func:`export_onnx`."""
    from hyq_fx.artifact import load

    path = Path(onnx_path) if onnx_path is not None else Path(out_dir) / "model.qdq.onnx"
    return export_onnx(load(out_dir), path, opset=opset)
