"""The op table of the ONNX QDQ translator: ATen op → handler.

A handler is called as ``handler(translator, node, *node.args, **node.kwargs)`` and returns the
ONNX value name of the node's output (a list for ops with several outputs); it emits nodes
through ``translator.b`` (the ``_Builder``) and reads its inputs with ``translator.v``. Handlers
register with ``@_handles(target, ...)`` in the module of their op family:
:mod:`~hyq_fx.backends.onnx_ops_conv` (conv, linear, matmul),
:mod:`~hyq_fx.backends.onnx_ops_math` (elementwise ops, activations, norms, softmax, reductions,
pooling, attention) and :mod:`~hyq_fx.backends.onnx_ops_shape` (data movement, concat, slicing,
padding). :mod:`~hyq_fx.backends.onnx_translate` imports all three, so the table is complete
wherever the translator is. ``_SYM_OPS`` (symbolic-int arithmetic) have no handler: they are
translated lazily, where a shape needs them (``_Translator.sym``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

aten = torch.ops.aten


_HANDLERS: dict[Any, Callable[..., Any]] = {}
_SYM_OPS = {aten.sym_size.int, operator.mul, operator.add, operator.sub, operator.floordiv}


def _handles(*targets: Any) -> Callable:
    def deco(fn: Callable) -> Callable:
        for t in targets:
            _HANDLERS[t] = fn
        return fn

    return deco
