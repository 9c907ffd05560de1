"""What the ONNX QDQ export reads from the fx graph by running it, and the node helpers that
the translator and its op handlers share.

Shapes: the module is run at two batch sizes (``_Recorder``, an ``fx.Interpreter`` that keeps
every node's output shape); dims that differ between the runs are batch-dependent (``_merge``
makes them ``None``), and the one batch-dependent dimension of a reshape becomes ``-1`` in the
ONNX graph (dynamic batch). Constants: subgraphs that depend neither on the input nor on a
quantizer (``_not_foldable`` lists the nodes that do; position biases, index tables) are
evaluated in the same run and stored as initializers. Run on calibration images, the
``_Recorder`` also keeps the conv outputs that requantization grids are fitted on.

Node helpers: ``_is_fq`` (a call of a ``FakeQuantizer`` submodule), ``_where`` (a node and its
module path, for error messages) and ``getattr_path`` (the tensor behind a ``get_attr``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from hyq_fx.quantizer import FakeQuantizer

from .onnx_qparams import ExportError


class _Recorder(fx.Interpreter):
    """Runs the module, keeping every node's output shape and the values of ``keep``."""

    def __init__(self, gm: fx.GraphModule, keep: set[fx.Node]) -> None:
        super().__init__(gm)
        self.keep = keep
        self.shapes: dict[fx.Node, Any] = {}
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes[n] = _shape_of(out)
        if n in self.keep:
            self.values[n] = out
        return out


def _shape_of(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return [_shape_of(o) for o in out]
    return None


def _merge(a: Any, b: Any) -> Any:
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return tuple(x if x == y else None for x, y in zip(a, b, strict=True))
    if isinstance(a, list) and isinstance(b, list):
        return [_merge(x, y) for x, y in zip(a, b, strict=True)]
    return a


def _not_foldable(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that depend on the input or on a quantizer (the rest are constants)."""
    dep: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or _is_fq(gm, n) or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def _is_fq(gm: fx.GraphModule, n: Any) -> bool:
    return (
        isinstance(n, fx.Node)
        and n.op == "call_module"
        and isinstance(gm.get_submodule(n.target), FakeQuantizer)
    )


def _where(n: fx.Node) -> str:
    path = n.meta.get("hyq_module_path") or ""
    return f"node {n.name!r}" + (f" (module {path})" if path else "")


def getattr_path(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, torch.Tensor):
        raise ExportError(f"get_attr {target!r} is a {type(obj).__name__}, not a tensor")
    return obj
