"""Rewrite the few ATen ops that exporters lack into plain ones, on a copy of the graph.

The captured graph keeps some ops whole because graph analyses read them better that way
(``aten.channel_shuffle`` is one same-shape layout op; a reshape/transpose/reshape chain would
look like a map → token crossing). Backends (ONNX, TVM Relax) translate a smaller op set, so
before exporting, these are rewritten exactly::

    channel_shuffle(x, g)  =  reshape(transpose(reshape(x, [N, g, C/g, H, W]), 1, 2), [N, C, H, W])
    relu6(x)               =  hardtanh(x, 0, 6)

Invariant checked by the test: the rewritten graph computes the same outputs, bit for bit.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import fx

aten = torch.ops.aten


def _shape(node: fx.Node) -> list[int] | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return list(val.shape)
    meta = node.meta.get("tensor_meta")
    return list(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _set_val(node: fx.Node) -> None:
    """``meta["val"]`` of a new node, computed from its inputs' (fake) values."""
    args = fx.node.map_arg(node.args, lambda a: a.meta.get("val"))
    vals = [a for a in fx.node.map_aggregate(args, lambda v: v) if isinstance(a, torch.Tensor)]
    if any(a is None for a in fx.node.map_aggregate(node.all_input_nodes, lambda v: v)):
        return
    mode = getattr(vals[0], "fake_mode", None) if vals else None
    with mode if mode is not None else contextlib.nullcontext():
        node.meta["val"] = node.target(*args)


def lower_for_export(
    gm: fx.GraphModule, example_input: torch.Tensor | None = None
) -> fx.GraphModule:
    """A copy of ``gm`` with channel_shuffle and relu6 written as ops every backend has.

    A graph without shapes (loaded from an artifact) needs ``example_input`` to find them.
    """
    targets = (aten.channel_shuffle.default, aten.relu6.default)
    if not any(n.op == "call_function" and n.target in targets for n in gm.graph.nodes):
        return gm
    gm = copy.deepcopy(gm)
    graph = gm.graph
    shuffles = [n for n in graph.nodes if n.target is aten.channel_shuffle.default]
    if example_input is not None and any(_shape(n.args[0]) is None for n in shuffles):
        from .graph import propagate_shapes

        with torch.no_grad():
            propagate_shapes(gm, example_input)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        x = node.args[0]
        with graph.inserting_before(node):
            if node.target is aten.relu6.default:
                new = graph.call_function(aten.hardtanh.default, (x, 0.0, 6.0))
            else:
                shape = _shape(x)
                if shape is None or len(shape) != 4:
                    raise ValueError(
                        f"channel_shuffle node {node.name}: needs a 4-D input with a known "
                        "shape (node.meta['val']) to be rewritten for export"
                    )
                g = int(node.args[1])
                _, c, h, w = (int(d) if i else d for i, d in enumerate(shape))
                split = graph.call_function(aten.reshape.default, (x, [-1, g, c // g, h, w]))
                swap = graph.call_function(aten.transpose.int, (split, 1, 2))
                new = graph.call_function(aten.reshape.default, (swap, [-1, c, h, w]))
                for part in (split, swap):
                    part.meta.update({k: v for k, v in node.meta.items() if k != "val"})
                    _set_val(part)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm
