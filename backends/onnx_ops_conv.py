"""ONNX handlers of convolutions and matrix products (conv1d / conv2d, linear, matmul, addmm).

A conv whose output is requantized (:mod:`~hyq_fx.backends.onnx_requantize`) and whose input is
per-tensor uint8 codes is written so that ONNX Runtime fuses ``DQ → Conv → Q`` into
``QLinearConv``: its bias becomes int32 at scale ``s_x·s_w`` (``round(b / (s_x·s_w))``, behind a
DequantizeLinear). Other convs run in float on the int8-stored weights. Linear layers and
activation matmuls are ``MatMul`` on DequantizeLinear inputs, which ONNX Runtime runs as
``MatMulIntegerToFloat`` (or ``QLinearMatMul``); a weight is stored once per layout
(``_Translator.weight``; a linear's weight transposed).

Where a requantized conv reads a per-channel input quantizer (the depthwise conv input of
``insert_quantizers(depthwise_per_channel=True)``), the per-channel scale is folded into the conv
instead, so that ONNX Runtime still runs ``QLinearConv`` (which takes one input scale): the
per-axis QuantizeLinear codes are read through one ``(s̄, z̄)``, a depthwise conv's weight scales
take ``s_c/s̄``, a 1x1 conv after ``scale_bottleneck_outliers`` drops its ``Q_w(W·α)·α⁻¹`` product
(``s_c = s̄·α_c``: the α cancel), and unequal zero points become a bias term (the input is
zero-padded in float before QuantizeLinear); see ``_fold_channel_scales``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from onnx import TensorProto
from torch import fx

from .onnx_ops import _handles
from .onnx_qparams import ExportError, _QParams, _shared_scale_and_zero
from .onnx_record import _where, getattr_path

if TYPE_CHECKING:
    from .onnx_translate import _Translator

aten = torch.ops.aten


def _weight_or_value(t: _Translator, a: fx.Node, transpose: bool = False) -> str:
    if a in t.weight_q:
        return t.weight(a, transpose=transpose)
    if transpose:
        return t.b.op("Transpose", [t.v(a)], f"{a.name}_t", perm=[1, 0])
    return t.v(a)


@dataclass
class _FoldedInput:
    """A conv whose input quantizer is per-channel, rewritten for one input scale (see
    :func:`_fold_channel_scales`)."""

    x: str  # QuantizeLinear(axis=1) → DequantizeLinear with the scalar (s̄, z̄)
    qx: _QParams  # the scalar (s̄, z̄)
    w: str  # DequantizeLinear of the int8 weight, per-output-channel scale
    w_scale: np.ndarray  # [O] or [] float32
    bias_shift: np.ndarray | None  # [O]: subtract from the bias (zero points z_c ≠ z̄)
    kind: str


def _constant(t: _Translator, a: Any) -> np.ndarray | None:
    """``a`` as a float64 array if it is a parameter or an input-independent value, else None."""
    if isinstance(a, fx.Node) and (a.op == "get_attr" or a in t.consts):
        v = t.consts.get(a)
        v = getattr_path(t.gm, a.target) if v is None else v
        return v.detach().double().numpy() if isinstance(v, torch.Tensor) else None
    return None


def _fold_channel_scales(
    t: _Translator, n: fx.Node, x_in: str, w: fx.Node, groups: int, padding: list[int]
) -> _FoldedInput | None:
    """Fold a per-channel input quantizer ``(s_c, z_c)`` of a conv into its weights.

    The fake-quant conv computes ``Σ_{c,t} Ŵ[o,c,t]·r_c·s_c·(q_{c,t} − z_c)`` with
    ``Ŵ = s_w[o]·W_q`` and ``r_c`` the per-input-channel factor of a weight written as
    ``Ŵ·r`` (``scale_bottleneck_outliers``' placement "quantizer", ``r = 1/α``). With the codes
    ``q`` of the per-axis QuantizeLinear read through one scale ``s̄`` and zero point ``z̄``:

    * depthwise (output ``o`` reads channel ``c(o)`` only): the weight scale becomes
      ``s_w[o]·r_c·s_c/s̄``, the int8 weights stay;
    * groups = 1: exact only when ``r_c·s_c`` is one value ``s̄`` (the α of the weight and of the
      quantizer cancel); the weights stay.

    Unequal zero points leave ``Σ_{c,t} s_w[o]·W_q[o,c,t]·r_c·s_c·(z_c − z̄)`` per output
    channel, a constant once the input is zero-padded in float before QuantizeLinear (the pad
    codes are then ``z_c``, the conv pads nothing): it is subtracted from the bias. Returns None
    where the form does not apply (the conv then runs in float on the per-axis QDQ pair).
    """
    if x_in not in t.act_pc:
        return None
    x_float, qa = t.act_pc[x_in]
    r = None
    if w.op == "call_function" and w.target is aten.mul.Tensor and len(w.args) == 2:
        r = _constant(t, w.args[1])
        w = w.args[0]
        if r is None or r.ndim != 4 or r.shape[0] != 1 or r.shape[2:] != (1, 1):
            return None
        r = r.reshape(-1)
    if w not in t.weight_q or qa.dtype != TensorProto.UINT8:
        return None
    w_q, qw = t.weight_q[w]
    if np.any(qw.zero_point != 0) or qw.axis not in (None, 0) or w_q.ndim != 4:
        return None
    n_out, per_group = w_q.shape[:2]
    sigma = qa.scale.astype(np.float64) * (1.0 if r is None else r)
    n_in = sigma.size
    w_s = np.broadcast_to(qw.scale.astype(np.float64), (n_out,))
    z = qa.zero_point.astype(np.int64)
    s_bar, z_bar = _shared_scale_and_zero(sigma, z)
    if groups == 1 and per_group == n_in:
        if np.abs(sigma / s_bar - 1).max() > 1e-5:
            return None
        new_ws, channel, kind = w_s, None, "pointwise"
    elif groups == n_in and per_group == 1 and n_out % n_in == 0:
        channel = np.arange(n_out) // (n_out // n_in)
        new_ws, kind = w_s * sigma[channel] / s_bar, "depthwise"
    else:
        return None
    shift, x_src = None, x_float
    if np.any(z != z_bar):
        taps = w_q.astype(np.int64).reshape(n_out, per_group, -1).sum(-1)  # [O, C/g]
        sig = sigma[None, :] if channel is None else sigma[channel][:, None]
        dz = (z[None, :] if channel is None else z[channel][:, None]) - z_bar
        shift = w_s * (taps * sig * dz).sum(1)
        if any(padding):
            pads = [0, 0, *padding, 0, 0, *padding]
            x_src = t.b.op("Pad", [x_float, t.b.ints(pads)], f"{n.name}_pad")
        kind += ", zero points via the bias"
    base = f"{n.name}_in"
    q = t.codes(x_src, qa, base, axis=1)
    qx = _QParams(
        qa.dtype, np.asarray(s_bar, np.float32), np.asarray(z_bar, np.uint8), 0, 255, None
    )
    x_dq = t.b.op(
        "DequantizeLinear", [q, t.b.const(qx.scale), t.b.const(qx.zero_point, np.uint8)], base
    )
    ws32 = new_ws.astype(np.float32)
    w_dq = t.weight_dq(w, w_q, ws32, np.zeros(n_out, w_q.dtype), axis=0)
    return _FoldedInput(x_dq, qx, w_dq, ws32, shift, kind)


@_handles(aten.conv2d.default, aten.conv1d.default)
def _conv(t: _Translator, n, x, w, bias=None, stride=(1,), padding=(0,), dilation=(1,), groups=1):
    rank = t.rank(n.args[0]) - 2
    if isinstance(padding, str):
        raise ExportError(f"{_where(n)}: string padding {padding!r} (use explicit padding)")
    stride, dilation = (
        list(stride) * (rank if len(stride) == 1 else 1),
        list(dilation) * (rank if len(dilation) == 1 else 1),
    )
    padding = list(padding) * (rank if len(padding) == 1 else 1)
    x_in = t.v(x)
    requant = t.requant_params(n)
    b = _constant(t, bias)  # None: no bias, or a computed one
    folded = None
    if requant is not None and rank == 2 and (bias is None or b is not None):
        folded = _fold_channel_scales(t, n, x_in, w, groups, padding)
    if folded is not None:
        x_in, w_in, qx, w_scale = folded.x, folded.w, folded.qx, folded.w_scale
        if folded.bias_shift is not None and any(padding):
            padding = [0] * len(padding)  # padded in float before QuantizeLinear
        fused = True
    else:
        fused = (
            requant is not None
            and x_in in t.act_q
            and w in t.weight_q
            and t.act_q[x_in].dtype == TensorProto.UINT8
            and (bias is None or b is not None)  # a computed bias keeps the conv in float
        )
        w_in = _weight_or_value(t, w)
        if fused:
            qx, w_scale = t.act_q[x_in], t.weight_q[w][1].scale
    inputs = [x_in, w_in]
    if folded is not None and folded.bias_shift is not None:
        b = (0.0 if b is None else b) - folded.bias_shift
    if fused and b is not None:
        bscale = (np.float64(qx.scale) * w_scale.astype(np.float64)).astype(np.float32)
        bq = np.rint(b / bscale).astype(np.int32)
        axis = {} if bscale.ndim == 0 else {"axis": 0}
        bname = t.b.init(bq, f"{n.name}_bias_q")
        bs = t.b.init(bscale, f"{n.name}_bias_scale")
        inputs.append(t.b.op("DequantizeLinear", [bname, bs], f"{n.name}_bias_dq", **axis))
    elif bias is not None:
        inputs.append(t.v(bias))
    y = t.b.op(
        "Conv",
        inputs,
        n.name,
        strides=stride,
        pads=padding + padding,
        dilations=dilation,
        group=groups,
    )
    if folded is not None:
        t.report["channel_folded"].append({"conv": n.name, "kind": folded.kind})
    if fused:
        qp, why = requant
        t.report["requantized"].append({"conv": n.name, "why": why})
        return t.qdq(y, qp, f"{n.name}_requant")
    t.report["float_convs"].append(n.name)
    return y


@_handles(aten.linear.default)
def _linear(t: _Translator, n, x, w, bias=None):
    y = t.b.op("MatMul", [t.v(x), _weight_or_value(t, w, transpose=True)], n.name)
    return y if bias is None else t.b.op("Add", [y, t.v(bias)], f"{n.name}_bias")


@_handles(aten.matmul.default, aten.bmm.default, aten.mm.default)
def _matmul(t: _Translator, n, a, c):
    return t.b.op("MatMul", [t.v(a), _weight_or_value(t, c)], n.name)


@_handles(aten.addmm.default)
def _addmm(t: _Translator, n, bias, a, c, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        raise ExportError(f"{_where(n)}: addmm with beta/alpha != 1")
    y = t.b.op("MatMul", [t.v(a), _weight_or_value(t, c)], n.name)
    return t.b.op("Add", [y, t.v(bias)], f"{n.name}_bias")
