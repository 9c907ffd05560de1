"""The ONNX graph under construction: nodes, initializers and unique names.

``_Builder(opset)`` holds the nodes in the order they are emitted (each value after the node
that makes it, so the list is topologically sorted) and the initializers by name. Every value
and node gets a fresh name (``fresh``: characters other than alphanumerics, ``.`` and ``_``
become ``_``; a taken name gets a ``_k`` suffix); ``op`` appends one node and returns its
output name(s); ``init`` stores an array, ``const`` / ``ints`` store a constant once per
(dtype, shape, bytes). ``prune`` drops the nodes and initializers no output depends on, and
``links`` gives each value's producer and users, for the post-passes of
:mod:`~hyq_fx.backends.onnx_ort_passes`. ``MS_DOMAIN`` is the domain of ONNX Runtime's contrib
operators (a model that uses one must import it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators


class _Builder:
    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}

    def fresh(self, base: str) -> str:
        base = "".join(c if c.isalnum() or c in "._" else "_" for c in base) or "v"
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def init(self, array: np.ndarray, base: str) -> str:
        # copy(order="C"), not ascontiguousarray: that turns a 0-d index into shape [1]
        name = self.fresh(base)
        self.inits[name] = numpy_helper.from_array(np.asarray(array).copy(order="C"), name)
        return name

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(arr, "const")
        return self._consts[key]

    def ints(self, values: Sequence[int]) -> str:
        return self.const(list(values), np.int64)

    def prune(self, outputs: Sequence[str]) -> None:
        """Drop the nodes and initializers no output depends on (a per-channel QDQ pair, or a
        weight product, that a folded conv replaced)."""
        needed = set(outputs)
        kept = []
        for node in reversed(self.nodes):
            if any(o in needed for o in node.output):
                kept.append(node)
                needed.update(i for i in node.input if i)
        self.nodes = kept[::-1]
        self.inits = {k: v for k, v in self.inits.items() if k in needed}

    def links(self) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
        """``(producer of each value, users of each value)`` of the nodes so far."""
        producer = {o: n for n in self.nodes for o in n.output}
        users: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for i in node.input:
                users.setdefault(i, []).append(node)
        return producer, users

    def op(self, op_type: str, inputs: Sequence[str], base: str, n_out: int = 1, **attrs):
        outs = [self.fresh(f"{base}" if n_out == 1 else f"{base}_{i}") for i in range(n_out)]
        self.nodes.append(
            helper.make_node(
                op_type, list(inputs), outs, name=self.fresh(f"{base}_{op_type}"), **attrs
            )
        )
        return outs[0] if n_out == 1 else outs
