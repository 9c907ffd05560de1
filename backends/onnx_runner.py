"""Run an ONNX file in ONNX Runtime (``OnnxRunner``) and count its nodes (``onnx_node_counts``).

``OnnxRunner(path)`` is a CPU ``InferenceSession`` (all graph optimizations, one inter-op
thread) as a callable, torch images in and torch logits out; it reads back the ``hyq`` and
``hyq_export`` metadata that :mod:`~hyq_fx.backends.onnx_file` writes (the model's
preprocessing as ``model_info``, the export report), for the files of both ONNX exporters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import onnx
import torch


def onnx_node_counts(path: str | os.PathLike[str]) -> dict[str, int]:
    """How many nodes of each op type the ONNX file at ``path`` holds."""
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


class OnnxRunner:
    """An ONNX Runtime CPU session as a callable: ``runner(images) -> logits`` (torch tensors).

    ``threads`` defaults to the usable cores. ``optimized_model_path`` saves the graph as ONNX
    Runtime rewrote it (to see which QLinearConv / MatMulIntegerToFloat kernels it chose).
    ``model_info`` is the preprocessing stored by :func:`export_onnx_qdq` (empty for other
    files), so ``hyq_fx.data.image_folder(dir, runner.model_info)`` works.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        optimized_model_path: str | os.PathLike[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX model at {path}; export one with export_onnx_qdq")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only (not the note on saving optimized models)
        if optimized_model_path is not None:
            opts.optimized_model_filepath = str(optimized_model_path)
        self.path = path
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        props = self.session.get_modelmeta().custom_metadata_map
        self.meta: dict[str, Any] = json.loads(props.get("hyq", "{}"))
        self.export_report: dict[str, Any] = json.loads(props.get("hyq_export", "{}"))
        self.model_info: dict[str, Any] = self.meta.get("model_info", {})

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])
