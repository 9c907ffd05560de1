"""ONNX handlers of data movement: reshapes, expand, transposes, pixel (un)shuffle, split,
concat, stack, indexing, slicing and padding.

A reshape's target shape is static but for the one batch-dependent dim, written ``-1`` (the
shapes recorded at two batch sizes, :mod:`~hyq_fx.backends.onnx_record`); where there are more,
it is computed from the symbolic sizes. ``pixel_shuffle`` is ``DepthToSpace`` (mode CRD) and
``pixel_unshuffle`` a ``SpaceToDepth`` followed by a transpose of whole ``h·w`` planes (torch
orders the new channels channel-major). An ``expand_as`` whose every use is a broadcasting
binary op with an operand of its shape is left to the broadcast. A concat whose only use is a
per-tensor uint8 quantizer ``Q_t`` quantizes its inputs to ``Q_t``'s grid first when the export
requantizes: exact, ``Q_t(cat(a, b)) = cat(Q_t(a), Q_t(b))``, and ONNX Runtime then concatenates
codes (``QLinearConcat``).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import fx

from .onnx_ops import _handles
from .onnx_qparams import ExportError
from .onnx_record import _where

if TYPE_CHECKING:
    from .onnx_translate import _Translator

aten = torch.ops.aten


@_handles(aten.reshape.default, aten.view.default, aten._unsafe_view.default)
def _reshape(t: _Translator, n, x, shape):
    return t.b.op("Reshape", [t.v(x), t.target_shape(n, shape)], n.name)


@_handles(
    aten.flatten.using_ints,
    aten.unflatten.int,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.unsqueeze.default,
)
def _reshape_like(t: _Translator, n, x, *_):
    return t.b.op("Reshape", [t.v(x), t.target_shape(n)], n.name)


_BROADCASTING = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor}


def _broadcast_does_it(t: _Translator, n: fx.Node) -> bool:
    """Whether every use of the expanded ``n`` is a broadcasting binary op whose other operand
    already has ``n``'s shape, so that the op itself broadcasts the unexpanded input to the
    same result (MobileViTv2's ``value · context.expand_as(value)``)."""
    for u in n.users:
        if u.op != "call_function" or u.target not in _BROADCASTING or len(u.args) != 2:
            return False
        a, c = u.args
        other = c if a is n else a
        if other is n or not isinstance(other, fx.Node) or t.shapes.get(other) != t.shapes.get(n):
            return False
    return bool(n.users)


@_handles(aten.expand_as.default)
def _expand_as(t: _Translator, n, x, other):
    if _broadcast_does_it(t, n):  # no Expand: on mobilevitv2_050 the 9 took 5 ms at batch 32
        return t.v(x)
    return t.b.op("Expand", [t.v(x), t.b.op("Shape", [t.v(other)], f"{n.name}_s")], n.name)


@_handles(aten.expand.default)
def _expand(t: _Translator, n, x, *_):
    out = t.shape(n)
    if sum(d is None for d in out) == 0:
        return t.b.op("Expand", [t.v(x), t.b.ints(out)], n.name)
    # dynamic dims come from the input itself (expand keeps them): use 1 there
    return t.b.op("Expand", [t.v(x), t.b.ints([1 if d is None else d for d in out])], n.name)


@_handles(aten.transpose.int)
def _transpose(t: _Translator, n, x, d0, d1):
    perm = list(range(t.rank(x)))
    d0, d1 = d0 % len(perm), d1 % len(perm)
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return t.b.op("Transpose", [t.v(x)], n.name, perm=perm)


@_handles(aten.permute.default)
def _permute(t: _Translator, n, x, dims):
    r = t.rank(x)
    return t.b.op("Transpose", [t.v(x)], n.name, perm=[d % r for d in dims])


@_handles(aten.pixel_shuffle.default)
def _pixel_shuffle(t: _Translator, n, x, factor):
    return t.b.op("DepthToSpace", [t.v(x)], n.name, blocksize=int(factor), mode="CRD")


@_handles(aten.pixel_unshuffle.default)
def _pixel_unshuffle(t: _Translator, n, x, factor):
    """``SpaceToDepth`` orders the new channels patch-major (``(u·s + v)·C + c``), torch
    channel-major (``c·s² + u·s + v``): a transpose of whole ``h·w`` planes puts them in torch's
    order."""
    shape = t.shape(x)
    if len(shape) != 4 or any(d is None for d in shape[1:]):
        raise ExportError(
            f"{_where(n)}: pixel_unshuffle of a {shape} tensor; the ONNX export handles "
            "[N, C, H, W] inputs with fixed C, H and W (export at the deployed image size)"
        )
    _, c, height, width = shape
    s = int(factor)
    h, w = height // s, width // s
    y = t.b.op("SpaceToDepth", [t.v(x)], f"{n.name}_s2d", blocksize=s)
    y = t.b.op("Reshape", [y, t.b.ints([0, s * s, c, h, w])], f"{n.name}_split")
    y = t.b.op("Transpose", [y], f"{n.name}_swap", perm=[0, 2, 1, 3, 4])
    return t.b.op("Reshape", [y, t.b.ints([0, c * s * s, h, w])], n.name)


@_handles(aten.t.default)
def _t(t: _Translator, n, x):
    return t.b.op("Transpose", [t.v(x)], n.name, perm=[1, 0])


@_handles(
    aten.contiguous.default,
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
)
def _identity(t: _Translator, n, x, *_, **__):
    return t.v(x)


@_handles(aten._to_copy.default, aten.to.dtype)
def _to(t: _Translator, n, x, *args, **kw):
    dtype = kw.get("dtype", args[0] if args else None)
    if dtype not in (None, torch.float32):
        raise ExportError(f"{_where(n)}: cast to {dtype} (only float32 graphs are exported)")
    return t.v(x)


def _split_out(t: _Translator, n, x, sizes: list[int], dim: int, squeeze: bool):
    dim = dim % t.rank(x)
    outs = t.b.op("Split", [t.v(x), t.b.ints(sizes)], n.name, n_out=len(sizes), axis=dim)
    outs = outs if isinstance(outs, list) else [outs]
    if squeeze:
        outs = [t.b.op("Squeeze", [o, t.b.ints([dim])], f"{n.name}_sq") for o in outs]
    return outs


@_handles(aten.unbind.int)
def _unbind(t: _Translator, n, x, dim=0):
    return _split_out(t, n, x, [1] * t.shape(x)[dim], dim, squeeze=True)


@_handles(aten.split_with_sizes.default)
def _split_sizes(t: _Translator, n, x, sizes, dim=0):
    return _split_out(t, n, x, list(sizes), dim, squeeze=False)


@_handles(aten.split.Tensor, aten.chunk.default)
def _split(t: _Translator, n, x, size, dim=0):
    total = t.shape(x)[dim]
    if total is None:
        raise ExportError(f"{_where(n)}: split along the batch dimension")
    if n.target is aten.chunk.default:
        size = -(-total // size)
    sizes = [size] * (total // size) + ([total % size] if total % size else [])
    return _split_out(t, n, x, sizes, dim, squeeze=False)


@_handles(operator.getitem)
def _getitem(t: _Translator, n, seq, idx):
    vals = t.env[seq]
    if not isinstance(vals, list):
        raise ExportError(f"{_where(n)}: getitem on a non-sequence")
    return vals[idx]


@_handles(aten.cat.default)
def _cat(t: _Translator, n, tensors, dim=0):
    """``Concat``; where its only use is a per-tensor uint8 quantizer ``Q_t`` (and the export
    requantizes), each input is quantized to ``Q_t``'s grid first, which is exact
    (``Q_t(cat(a, b)) = cat(Q_t(a), Q_t(b))``) and gives ONNX Runtime codes on both sides: a
    SiLU before it then runs on codes (``_silu_in_uint8``), and the concat on uint8
    (``QLinearConcat``, which also requantizes an input that is already codes on another
    grid)."""
    parts = [t.v(a) for a in tensors]
    users = list(n.users)
    qp = t.uint8_grid(users[0]) if t.requantize != "none" and len(users) == 1 else None
    if qp is not None:
        parts = [  # an input that is already codes is requantized by the concat
            v if v in t.act_q else t.qdq(v, qp, f"{n.name}_in{i}") for i, v in enumerate(parts)
        ]
    return t.b.op("Concat", parts, n.name, axis=dim % t.rank(n))


@_handles(aten.stack.default)
def _stack(t: _Translator, n, tensors, dim=0):
    dim = dim % t.rank(n)
    parts = [t.b.op("Unsqueeze", [t.v(a), t.b.ints([dim])], f"{n.name}_u") for a in tensors]
    return t.b.op("Concat", parts, n.name, axis=dim)


@_handles(aten.select.int)
def _select(t: _Translator, n, x, dim, index):
    return t.b.op("Gather", [t.v(x), t.b.const(index, np.int64)], n.name, axis=dim % t.rank(x))


@_handles(aten.slice.Tensor)
def _slice(t: _Translator, n, x, dim=0, start=None, end=None, step=1):
    start = 0 if start is None else start
    end = 2**62 if end is None else min(end, 2**62)
    ins = [
        t.v(x),
        t.b.ints([start]),
        t.b.ints([end]),
        t.b.ints([dim % t.rank(x)]),
        t.b.ints([step]),
    ]
    return t.b.op("Slice", ins, n.name)


@_handles(aten.constant_pad_nd.default, aten.pad.default)
def _pad(t: _Translator, n, x, pad, *rest):
    value = rest[-1] if rest and isinstance(rest[-1], (int, float)) else 0.0
    if n.target is aten.pad.default and rest and rest[0] not in (None, "constant"):
        raise ExportError(f"{_where(n)}: pad mode {rest[0]!r}")
    r = t.rank(x)
    begins, ends = [0] * r, [0] * r
    for i in range(len(pad) // 2):  # torch pads the last dim first
        begins[r - 1 - i], ends[r - 1 - i] = pad[2 * i], pad[2 * i + 1]
    return t.b.op("Pad", [t.v(x), t.b.ints(begins + ends), t.b.const(value or 0.0)], n.name)
