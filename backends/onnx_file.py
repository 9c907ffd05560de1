"""What every ONNX file hyq-fx writes shares: tensor names, metadata, a checked atomic save.

The model's ``hyq`` metadata (recipe, bits, preprocessing at the size it was quantized at) and
the exporter's report are stored as JSON metadata properties ``hyq`` and ``hyq_export``, which
:class:`~hyq_fx.backends.onnx_qdq.OnnxRunner` and ``hyq-fx eval`` read back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import onnx
from torch import fx

from hyq_fx.artifact import atomic_output_file
from hyq_fx.quantize import deployed_meta

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "write_model"]

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def write_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    gm: fx.GraphModule,
    report: dict[str, Any],
    *,
    check: bool = True,
) -> Path:
    """Set the metadata of ``gm`` and ``report`` on ``model``, check it (``onnx.checker``, full)
    and save it to ``path``; an interrupted write leaves no partial file."""
    del model.metadata_props[:]
    meta = json.dumps(deployed_meta(gm), default=str)
    onnx.helper.set_model_props(model, {"hyq": meta, "hyq_export": json.dumps(report)})
    if check:
        onnx.checker.check_model(model, full_check=True)
    out = Path(path)
    with atomic_output_file(out) as tmp:
        onnx.save(model, str(tmp))
    return out
