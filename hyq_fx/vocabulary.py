"""The words passes and analyses use to read a quantized fx graph, written once.

This module sits at the bottom of the dependency graph: it imports only torch and
:mod:`hyq_fx.quantizer`, so any core module or pass may import it without a cycle.

* :data:`META_KEY`: the key of ``gm.meta`` under which :func:`hyq_fx.quantize` records how a
  model was quantized;
* quantizer lookup: :func:`quantizer_of`, :func:`is_quantizer`, :func:`quantizers`,
  :func:`quantizers_mode`;
* graph reading: :func:`arg`, :func:`get_attr_tensor`, :func:`owner_of`;
* sets of ops that only move values. Callers grew their own sets with different members, and a
  set decides which graphs a pass rewrites, so each set keeps the members its callers used:
  :data:`RESHAPES_AND_COPIES` ⊂ :data:`MOVES_VALUES` ⊂ :data:`MOVES_OR_EXPANDS_VALUES` (by
  ``OpOverload``) and :data:`LAYOUT_OP_NAMES` (by op name, every overload).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

from .quantizer import FakeQuantizer

__all__ = [
    "LAYOUT_OP_NAMES",
    "META_KEY",
    "MOVES_OR_EXPANDS_VALUES",
    "MOVES_VALUES",
    "RESHAPES_AND_COPIES",
    "SIZE_QUERIES",
    "arg",
    "get_attr_tensor",
    "is_quantizer",
    "owner_of",
    "quantizer_of",
    "quantizers",
    "quantizers_mode",
]

aten = torch.ops.aten

META_KEY = "hyq"

# --------------------------------------------------------------------------------------------
# quantizers
# --------------------------------------------------------------------------------------------


def quantizer_of(gm: fx.GraphModule, node: Any) -> FakeQuantizer | None:
    """The FakeQuantizer that ``node`` calls, or None when ``node`` is anything else (another
    module call, a function call, a constant, a non-node argument)."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        return module if isinstance(module, FakeQuantizer) else None
    return None


def is_quantizer(gm: fx.GraphModule, node: Any) -> bool:
    """Whether ``node`` calls a FakeQuantizer of ``gm``."""
    return quantizer_of(gm, node) is not None


def quantizers(gm: fx.GraphModule) -> dict[str, FakeQuantizer]:
    """Every FakeQuantizer of ``gm`` by its module path, in ``named_modules`` order."""
    return {n: m for n, m in gm.named_modules() if isinstance(m, FakeQuantizer)}


@contextlib.contextmanager
def quantizers_mode(gm: fx.GraphModule, mode: str) -> Iterator[None]:
    """Temporarily set every FakeQuantizer to ``mode`` ('off' gives the float graph).

    Invariant: on exit, normal or by an exception, each quantizer has its own earlier mode."""
    fqs = quantizers(gm)
    saved = {name: fq.mode for name, fq in fqs.items()}
    for fq in fqs.values():
        fq.mode = mode
    try:
        yield
    finally:
        for name, fq in fqs.items():
            fq.mode = saved[name]


# --------------------------------------------------------------------------------------------
# reading nodes and attributes
# --------------------------------------------------------------------------------------------


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of ``node``, passed positionally or as the keyword ``name``; else
    ``default``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def get_attr_tensor(gm: fx.GraphModule, target: str) -> Any:
    """The attribute a ``get_attr`` node with this dotted ``target`` reads (a parameter, a
    buffer or a constant tensor of ``gm`` or of one of its submodules).

    Raises AttributeError when a part of the path is missing."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def owner_of(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    """The module that holds ``target``'s last part (a parameter, buffer or submodule) and
    that part's name: ``"blocks.0.fq"`` → ``(gm.blocks[0], "fq")``, ``"w"`` → ``(gm, "w")``."""
    path, _, name = target.rpartition(".")
    return (gm.get_submodule(path) if path else gm), name


# --------------------------------------------------------------------------------------------
# ops that only move values
# --------------------------------------------------------------------------------------------

# views, permutations and copies: every output element is one input element, unchanged
RESHAPES_AND_COPIES = frozenset(
    {
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.permute.default,
        aten.transpose.int,
        aten.contiguous.default,
        aten.clone.default,
        aten.flatten.using_ints,
        aten.unflatten.int,
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.im2col.default,
        aten.col2im.default,
    }
)
# the above, plus aliases, multi-dim squeezes and pixel (un)shuffles: no arithmetic, no
# channel mixing, so a per-channel factor passes through as long as the channel stays one axis
MOVES_VALUES = RESHAPES_AND_COPIES | {
    aten.alias.default,
    aten.squeeze.dims,
    aten.pixel_shuffle.default,
    aten.pixel_unshuffle.default,
}
# the above, plus 2-D transposes, full squeezes and expand (which repeats values, so a
# per-channel affine still commutes with it)
MOVES_OR_EXPANDS_VALUES = MOVES_VALUES | {
    aten.t.default,
    aten.squeeze.default,
    aten.expand.default,
}
# size queries (dynamic shapes) read a tensor's shape without using its values
SIZE_QUERIES = frozenset(
    {
        aten.sym_size.int,
        aten.sym_numel.default,
        aten.sym_stride.int,
        aten.sym_storage_offset.default,
    }
)
# op names (``op_name`` of any overload) that move values between positions or axes without
# computing: a conv ↔ transformer bridge is a chain of these. Wider than the sets above: it
# also counts selects, unbinds and channel shuffles, which bridge analysis may walk through.
LAYOUT_OP_NAMES = frozenset(
    {
        "view",
        "reshape",
        "_unsafe_view",
        "reshape_as",
        "view_as",
        "permute",
        "transpose",
        "t",
        "flatten",
        "unflatten",
        "unfold",
        "im2col",
        "col2im",
        "squeeze",
        "unsqueeze",
        "movedim",
        "swapaxes",
        "swapdims",
        "pixel_shuffle",
        "pixel_unshuffle",
        "unbind",
        "select",
        "channel_shuffle",
        "native_channel_shuffle",
    }
)
