"""TVM backend, Relax side: ``IntegerizeQDQ`` runs dequantize-fed conv2d / matmul as int8 × int8 →
int32 kernels plus a float requantization.

``IntegerizeQDQ`` (a Relax module pass, DFPattern ``rewrite_call``; ``integerize`` for one
function) rewrites ``conv2d(DQ(x8), DQ(w8))`` and ``matmul(DQ(a8), DQ(b8))`` (``linear`` is
``matmul(x, permute_dims(W))`` in Relax) into int8 × int8 → int32 kernels plus a float
requantization, exact in integer arithmetic::

    conv2d:  y = s_x·s_w[o] · ( conv_i32(pad(x8, z'_x), w8) − z'_x · Σ_{i,kh,kw} w8[o] )
    matmul:  y = s_a·s_b · ( a8·b8 − z'_b·Σ_k a8[m,k] − z'_a·Σ_k b8[k,n] + K·z'_a·z'_b )

Here ``DQ(q) = (cast_f32(q) − z')·s`` is the Relax pattern that ``lower_quantizers`` and
``import_relax`` (:mod:`~hyq_fx.backends.tvm_lower`) produce. Asymmetric activations keep their
(shifted) zero point ``z'``; it is subtracted exactly in int32 by the correction terms above (a
constant per output channel for weights, a row/column sum for activation × activation). The conv
input is padded with ``z'`` (the int8 code of 0.0), so the border is exact. The int32 → float
rescale by ``s_x·s_w`` is the requantization; bias adds and everything outside
conv/linear/matmul stay in float, as in the fake-quant graph.

A depthwise conv (``groups = C_in``, weight ``[m·C_in, 1, kh, kw]``) may have a per-channel
input quantizer (``insert_quantizers(depthwise_per_channel=True)``): output channel ``o``
reads only input channel ``c = o // m``, so it is still one int8 grouped conv::

    dw conv: y[o] = s_x[c]·s_w[o] · ( conv_i32(pad0(x8), w8)[o] − z'_x[c] · conv(mask, w8)[o] )

The input is padded with int 0 (no single pad code is 0.0 for every channel) and ``mask``
(1 on the input, 0 on the padding) keeps the padded taps out of the zero-point correction,
a build-time ``[1, O, H_out, W_out]`` int32 constant (needs static H, W).

An op stays in float (listed in the ``float_fallbacks`` of the library's ``.json`` and in
``IntegerizeStats.skipped``, once per op) where integers cannot express it exactly: a
per-channel activation scale or zero point along the reduction axis (any conv but a depthwise
one with a constant weight and static spatial shape, linear, matmul), > 8-bit codes, weights
whose ``q − z_w`` leaves int8, or a weight scale varying along the reduction axis.

Invariant checked by ``tests/test_tvm_backend.py`` (with ``count_ops``): the Relax IR after
``IntegerizeQDQ`` holds int8 conv2d / matmul with int32 output and no float conv/matmul.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hyq_fx.backends.tvm_vnni import tensor_dims


@dataclass
class _Operand:
    """A dequantized operand ``(cast_f32(q) − z)·s``, seen through an optional permute_dims."""

    q: Any  # relax.Expr holding int8 codes
    scale: np.ndarray  # aligned to the operand's rank (or a scalar)
    zero: np.ndarray
    codes: np.ndarray | None  # the int8 codes when q is a constant

    @property
    def ndim(self) -> int:
        return len(self.q.ty.shape)


def _aligned(arr: np.ndarray, ndim: int) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    if arr.size == 1:
        return arr.reshape(())
    return arr.reshape((1,) * (ndim - arr.ndim) + arr.shape)


def _const_numpy(expr: Any) -> np.ndarray | None:
    """The value of a Relax tensor constant (``tvm.ir.GenericConst``), or None."""
    value = getattr(expr, "value", None)
    return value.numpy() if hasattr(value, "numpy") else None


class _DQPattern:
    """``multiply(subtract(astype(q), z), s)``, optionally under ``permute_dims``."""

    def __init__(self, allow_permute: bool) -> None:
        from tvm.relax.dpl import is_const, is_op, wildcard

        self.q = wildcard()
        self.zero = is_const()
        self.scale = is_const()
        self.cast = is_op("relax.astype")(self.q)
        self.dq = is_op("relax.multiply")(is_op("relax.subtract")(self.cast, self.zero), self.scale)
        self.permute = is_op("relax.permute_dims")(self.dq) if allow_permute else None
        self.pattern = self.dq | self.permute if allow_permute else self.dq

    def operand(self, m: Mapping[Any, Any]) -> _Operand | None:
        from tvm import relax

        q = m[self.q]
        if q.ty.dtype != "int8" or m[self.cast].ty.dtype != "float32":
            return None
        ndim = len(q.ty.shape)
        scale = _aligned(_const_numpy(m[self.scale]), ndim)
        zero = _aligned(_const_numpy(m[self.zero]), ndim)
        codes = _const_numpy(q)
        if self.permute is not None and self.permute in m:
            axes = m[self.permute].attrs.axes
            axes = list(reversed(range(ndim))) if axes is None else [int(a) for a in axes]
            scale = scale if scale.ndim == 0 else np.transpose(scale, axes)
            zero = zero if zero.ndim == 0 else np.transpose(zero, axes)
            if codes is not None:
                codes = np.ascontiguousarray(np.transpose(codes, axes))
                q = relax.const(codes, "int8")
            else:
                q = relax.op.permute_dims(q, axes)
        return _Operand(q, scale, zero, codes)


def _zero_correction(op: _Operand, axis: int, zero: int) -> Any:
    """``zero · Σ_axis q`` in int32, keeping dims (folded into one constant when q is one)."""
    from tvm import relax

    if op.codes is not None:
        total = op.codes.astype(np.int64).sum(axis=axis, keepdims=True) * zero
        return relax.const(total.astype(np.int32), "int32")
    total = relax.op.sum(relax.op.astype(op.q, "int32"), axis=[axis], keepdims=True)
    return relax.op.multiply(total, relax.const(zero, "int32"))


def _scalar_int(arr: np.ndarray) -> int | None:
    """The integer held by a one-element array, or None."""
    if arr.size != 1:
        return None
    value = float(arr.reshape(()))
    return int(value) if value == int(value) else None


@dataclass
class IntegerizeStats:
    """What :func:`integerize` did: integer conv2d / matmul counts, and why others stayed float."""

    conv2d: int = 0  # of which ``depthwise_per_channel`` have a per-channel input quantizer
    matmul: int = 0
    depthwise_per_channel: int = 0
    skipped: list[str] = field(default_factory=list)


def _rewrite_conv2d(orig: Any, x: _Operand, w: _Operand, stats: IntegerizeStats) -> Any:
    from tvm import relax

    attrs = orig.attrs
    layouts = (attrs.data_layout, attrs.kernel_layout, attrs.out_layout)
    zx = _scalar_int(x.zero)
    why = None
    if tuple(str(s) for s in layouts) != ("NCHW", "OIHW", "NCHW"):
        why = f"layouts {layouts} (need NCHW/OIHW)"
    elif np.any(w.zero != 0):
        why = "weight zero point is not 0"
    elif w.scale.ndim and any(d != 1 for d in w.scale.shape[1:]):
        why = "weight scale varies along the reduction axes"
    elif x.scale.size != 1 or zx is None:
        return _rewrite_depthwise_per_channel(orig, x, w, stats)
    if why:
        stats.skipped.append(f"conv2d: {why}")
        return orig
    padding = [int(p) for p in attrs.padding]  # top, left, bottom, right
    x8 = x.q
    if zx != 0 and any(padding):  # pad with the code of 0.0, not with int 0
        top, left, bottom, right = padding
        x8 = relax.op.nn.pad(x8, [0, 0, 0, 0, top, bottom, left, right], "constant", float(zx))
        padding = [0, 0, 0, 0]
    acc = relax.op.nn.conv2d(
        x8, w.q, strides=attrs.strides, padding=padding, dilation=attrs.dilation,
        groups=int(attrs.groups), data_layout="NCHW", kernel_layout="OIHW", out_layout="NCHW",
        out_dtype="int32",
    )  # fmt: skip
    if zx != 0:  # − z'_x · Σ w8[o], one int32 per output channel
        if w.codes is not None:
            wsum = w.codes.astype(np.int64).sum(axis=(1, 2, 3)).reshape(1, -1, 1, 1)
            correction = relax.const((zx * wsum).astype(np.int32), "int32")
        else:
            wsum = relax.op.sum(relax.op.astype(w.q, "int32"), axis=[1, 2, 3])
            correction = relax.op.multiply(
                relax.op.reshape(wsum, [1, -1, 1, 1]), relax.const(zx, "int32")
            )
        acc = relax.op.subtract(acc, correction)
    scale = np.float32(x.scale.reshape(())) * w.scale.astype(np.float32)
    scale = scale.reshape(()) if scale.size == 1 else scale.reshape(1, -1, 1, 1)
    stats.conv2d += 1
    return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale, "float32"))


def _input_channel_qparams(x: _Operand, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(s_x[C], z'_x[C])`` of an NCHW input whose scale / zero point vary only along axis 1."""
    if x.ndim != 4:
        return None
    params = []
    for arr in (x.scale, x.zero):
        if arr.size == 1:
            params.append(np.full(channels, arr.reshape(()), dtype=np.float32))
        elif arr.shape == (1, channels, 1, 1):
            params.append(arr.reshape(channels).astype(np.float32))
        else:
            return None
    scale, zero = params
    if np.any(zero != np.round(zero)):
        return None
    return scale, zero.astype(np.int64)


def _valid_tap_sums(codes: np.ndarray, hw: tuple[int, int], attrs: Any, groups: int) -> np.ndarray:
    """``Σ_{kh,kw} w8[o,0,kh,kw] · mask[h·s + kh·d − p, w·s + kw·d − p]`` as int64 ``[1,O,Ho,Wo]``.

    ``mask`` is 1 on the input and 0 on the padding: the conv of the zero point over the taps
    that read real input. Integers below 2^53, so the float64 conv is exact.
    """
    top, left, bottom, right = (int(p) for p in attrs.padding)
    mask = torch.ones(1, groups, *hw, dtype=torch.float64)
    mask = F.pad(mask, (left, right, top, bottom))
    out = F.conv2d(
        mask,
        torch.from_numpy(codes.astype(np.float64)),
        stride=[int(v) for v in attrs.strides],
        dilation=[int(v) for v in attrs.dilation],
        groups=groups,
    )
    return np.rint(out.numpy()).astype(np.int64)


def _rewrite_depthwise_per_channel(
    orig: Any, x: _Operand, w: _Operand, stats: IntegerizeStats
) -> Any:
    """A depthwise conv with a per-channel (axis 1) input scale and zero point, in int8.

    Output channel ``o`` reads only input channel ``c = o // m`` (``m`` = channel multiplier),
    so one int8 grouped conv with a per-output-channel rescale is exact::

        y[o] = s_x[c]·s_w[o] · ( conv_i32(pad0(x8), w8)[o] − z'_x[c] · conv(mask, w8)[o] )

    One pad constant cannot be the code of 0.0 of every channel, so the input is padded with
    int 0 and the padded taps are left out of the zero-point correction instead: ``mask`` is 1
    on real input positions, and ``conv(mask, w8)`` is a build-time ``[1, O, Ho, Wo]`` int32
    constant (``[1, O, 1, 1]`` without padding, where it is ``Σ w8[o]``).
    """
    from tvm import relax

    attrs = orig.attrs
    groups = int(attrs.groups)
    _n, c_in, h, wd = tensor_dims(x.q)
    codes = w.codes
    why = None
    if codes is None:
        why = "per-channel input scale or zero point with a non-constant weight"
    elif codes.ndim != 4 or codes.shape[1] != 1 or c_in is None or groups != c_in:
        why = "per-channel input scale or zero point (the channel is the reduction axis)"
    elif codes.shape[0] % groups:
        why = "depthwise conv whose output channels are not a multiple of its input channels"
    elif h is None or wd is None:
        why = "per-channel input zero point with a dynamic spatial shape"
    qparams = None if why else _input_channel_qparams(x, c_in)
    if why is None and qparams is None:
        why = "input scale / zero point vary along an axis other than the channel, or z is not int"
    if why:
        stats.skipped.append(f"conv2d: {why}")
        return orig
    sx, zx = qparams
    multiplier = codes.shape[0] // groups
    acc = relax.op.nn.conv2d(
        x.q, w.q, strides=attrs.strides, padding=attrs.padding, dilation=attrs.dilation,
        groups=groups, data_layout="NCHW", kernel_layout="OIHW", out_layout="NCHW",
        out_dtype="int32",
    )  # fmt: skip
    z_out = np.repeat(zx, multiplier).reshape(1, -1, 1, 1)
    if np.any(z_out != 0):
        correction = z_out * _valid_tap_sums(codes, (h, wd), attrs, groups)
        if np.all(correction == correction[:, :, :1, :1]):  # no padding reached: one per channel
            correction = correction[:, :, :1, :1]
        if np.abs(correction).max() > np.iinfo(np.int32).max:
            stats.skipped.append("conv2d: zero-point correction leaves int32")
            return orig
        acc = relax.op.subtract(acc, relax.const(correction.astype(np.int32), "int32"))
    scale = np.repeat(sx, multiplier) * w.scale.astype(np.float32).reshape(-1)
    stats.conv2d += 1
    stats.depthwise_per_channel += 1
    return relax.op.multiply(
        relax.op.astype(acc, "float32"), relax.const(scale.reshape(1, -1, 1, 1), "float32")
    )


def _rewrite_matmul(orig: Any, a: _Operand, b: _Operand, stats: IntegerizeStats) -> Any:
    from tvm import relax

    za, zb = _scalar_int(a.zero), _scalar_int(b.zero)
    k = tensor_dims(a.q)[-1] if a.ndim >= 2 else None
    why = None
    if a.ndim < 2 or b.ndim < 2:
        why = "a 1-D operand"
    elif za is None or zb is None:
        why = "per-channel zero point"
    elif (a.scale.ndim and a.scale.shape[-1] != 1) or (b.scale.ndim and b.scale.shape[-2] != 1):
        why = "scale varies along the reduction axis (per-channel activation)"
    elif k is None:
        why = "the reduction dimension is not static"
    if why:
        stats.skipped.append(f"matmul: {why}")
        return orig
    acc = relax.op.matmul(a.q, b.q, out_dtype="int32")
    if zb:
        acc = relax.op.subtract(acc, _zero_correction(a, -1, zb))
    if za:
        acc = relax.op.subtract(acc, _zero_correction(b, -2, za))
    if za and zb:
        acc = relax.op.add(acc, relax.const(k * za * zb, "int32"))
    ndim = max(a.ndim, b.ndim)
    scale = _aligned(a.scale, ndim) * _aligned(b.scale, ndim)
    if scale.size == 1:
        scale = scale.reshape(())
    stats.matmul += 1
    return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale, "float32"))


def integerize(func: Any) -> tuple[Any, IntegerizeStats]:
    """Rewrite the DQ-fed conv2d / matmul calls of one Relax function to int8 kernels."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call

    stats = IntegerizeStats()
    # rewrite_call repeats until nothing changes, so a call left in float is seen once per
    # round: its reason is kept once per call (keyed by the call object)
    skipped: dict[Any, list[str]] = {}

    def record(orig: Any, rewrite: Callable[[IntegerizeStats], Any]) -> Any:
        local = IntegerizeStats()
        out = rewrite(local)
        stats.conv2d += local.conv2d
        stats.matmul += local.matmul
        stats.depthwise_per_channel += local.depthwise_per_channel
        if local.skipped:
            skipped[orig] = local.skipped
        return out

    def integer_op(op: str, allow_permute: bool, rewrite: Callable) -> tuple[Any, Callable]:
        """``op(dequantize(a), dequantize(b))`` and its rewrite into an int8 × int8 kernel."""
        a, b = _DQPattern(allow_permute), _DQPattern(allow_permute)

        def rewriter(orig: Any, m: Mapping[Any, Any]) -> Any:
            ao, bo = a.operand(m), b.operand(m)
            if ao is None or bo is None:
                return orig
            return record(orig, lambda st: rewrite(orig, ao, bo, st))

        return is_op(op)(a.pattern, b.pattern), rewriter

    for pattern, rewriter in (
        integer_op("relax.nn.conv2d", False, _rewrite_conv2d),
        integer_op("relax.matmul", True, _rewrite_matmul),  # the b operand may be permuted
    ):
        func = rewrite_call(pattern, rewriter, func)
    func = relax.analysis.remove_all_unused(func)
    stats.skipped = [why for reasons in skipped.values() for why in reasons]
    return func, stats


def IntegerizeQDQ(stats: dict[str, IntegerizeStats] | None = None) -> Any:  # noqa: N802
    """The Relax module pass of :func:`integerize` (fills ``stats`` per function if given)."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="hyq.IntegerizeQDQ")
    def _pass(mod: Any, _ctx: Any) -> Any:
        updates = {}
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                new, st = integerize(func)
                updates[gv] = new
                if stats is not None:
                    stats[gv.name_hint] = st
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def count_ops(mod: Any, names: tuple[str, ...] = ("relax.nn.conv2d", "relax.matmul")) -> dict:
    """``{"relax.nn.conv2d int8,int8->int32": n, ...}`` over the Relax functions of ``mod``."""
    from tvm import relax

    counts: dict[str, int] = {}

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", None) in names:
            ins = ",".join(str(arg.ty.dtype) for arg in expr.args[:2])
            key = f"{expr.op.name} {ins}->{expr.ty.dtype}"
            counts[key] = counts.get(key, 0) + 1

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return dict(sorted(counts.items()))
