"""ONNX handlers of elementwise ops, activations, norms, softmax, reductions, pooling and attention.

Each ATen op becomes one ONNX operator or a short decomposition with the same values, in float
(the quantizers around it are the translator's Q / DQ pairs): binary ops broadcast as in torch
(``alpha`` a multiply; ``rsub`` a Sub with its operands swapped); ``rsqrt = 1/√x``; GELU is
``0.5·x·(1 + erf(x/√2))`` (which ONNX Runtime fuses into Gelu), or
``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` for ``approximate="tanh"``; SiLU is
``x·Sigmoid(x)``, or with ``ort_contrib_ops`` ONNX Runtime's ``com.microsoft.QuickGelu(alpha=1)``
(same values, one kernel); LayerNorm is ``LayerNormalization`` over the normalised dims;
GroupNorm is a ``LayerNormalization`` over ``[N, G, -1]`` and the per-channel affine (inside the
LayerNormalization for ``GroupNorm(1, C)``); attention is
``softmax((q·scale)·kᵀ)·v`` without mask, causality or dropout. The add of a requantized conv
and a residual (``_Translator.residual_adds``) reads the residual as per-tensor uint8 codes, so
that ONNX Runtime runs it as ``QLinearAdd``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .onnx_builder import MS_DOMAIN
from .onnx_ops import _handles
from .onnx_qparams import ExportError
from .onnx_record import _where, getattr_path

if TYPE_CHECKING:
    from .onnx_translate import _Translator

aten = torch.ops.aten


def _binary(op_type: str) -> Callable:
    def fn(t: _Translator, n, a, c, alpha=1, rounding_mode=None):
        if rounding_mode is not None:
            raise ExportError(f"{_where(n)}: division with rounding_mode={rounding_mode!r}")
        if n in t.residual_adds:  # requantized conv + residual codes: a QLinearAdd for ORT
            return t.b.op(op_type, [t.v(t.residual_adds[n][0]), t.residual_value(n)], n.name)
        c_in = t.v(c)
        if alpha != 1:
            c_in = t.b.op("Mul", [c_in, t.b.const(alpha)], f"{n.name}_alpha")
        return t.b.op(op_type, [t.v(a), c_in], n.name)

    return fn


for _t, _o in [
    ((aten.add.Tensor, aten.add.Scalar), "Add"),
    ((aten.sub.Tensor, aten.sub.Scalar), "Sub"),
    ((aten.mul.Tensor, aten.mul.Scalar), "Mul"),
    ((aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode), "Div"),
    ((aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor), "Pow"),
    ((aten.maximum.default,), "Max"),
    ((aten.minimum.default,), "Min"),
]:
    _handles(*_t)(_binary(_o))


@_handles(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(t: _Translator, n, a, c, alpha=1):
    return t.b.op("Sub", [t.v(c), t.v(a)], n.name)


def _unary(op_type: str, **attrs: Any) -> Callable:
    def fn(t: _Translator, n, x, *rest, **kw):
        return t.b.op(op_type, [t.v(x)], n.name, **attrs)

    return fn


for _t, _o in [
    (aten.relu.default, "Relu"),
    (aten.sigmoid.default, "Sigmoid"),
    (aten.tanh.default, "Tanh"),
    (aten.exp.default, "Exp"),
    (aten.sqrt.default, "Sqrt"),
    (aten.neg.default, "Neg"),
    (aten.abs.default, "Abs"),
    (aten.erf.default, "Erf"),
    (aten.hardswish.default, "HardSwish"),
    (aten.sin.default, "Sin"),
    (aten.cos.default, "Cos"),
]:
    _handles(_t)(_unary(_o))
_handles(aten.hardsigmoid.default)(_unary("HardSigmoid", alpha=1 / 6, beta=0.5))


@_handles(aten.rsqrt.default)
def _rsqrt(t: _Translator, n, x):
    return t.b.op("Reciprocal", [t.b.op("Sqrt", [t.v(x)], f"{n.name}_sqrt")], n.name)


@_handles(aten.silu.default)
def _silu_op(t: _Translator, n, x):
    xin = t.v(x)
    if t.ort_contrib_ops:  # x·σ(x) in one kernel; ORT's own fusion misses it behind a shared DQ
        t.contrib_used = True
        return t.b.op("QuickGelu", [xin], n.name, domain=MS_DOMAIN, alpha=1.0)
    return t.b.op("Mul", [xin, t.b.op("Sigmoid", [xin], f"{n.name}_sig")], n.name)


@_handles(aten.gelu.default)
def _gelu_op(t: _Translator, n, x, approximate="none"):
    xin = t.v(x)
    if approximate == "tanh":  # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
        x3 = t.b.op("Mul", [t.b.op("Mul", [xin, xin], f"{n.name}_x2"), xin], f"{n.name}_x3")
        inner = t.b.op(
            "Add", [xin, t.b.op("Mul", [x3, t.b.const(0.044715)], f"{n.name}_c")], f"{n.name}_in"
        )
        th = t.b.op(
            "Tanh",
            [t.b.op("Mul", [inner, t.b.const(math.sqrt(2 / math.pi))], f"{n.name}_s")],
            f"{n.name}_tanh",
        )
    else:  # 0.5·x·(1 + erf(x/√2)); ONNX Runtime fuses this into Gelu
        th = t.b.op(
            "Erf", [t.b.op("Div", [xin, t.b.const(math.sqrt(2.0))], f"{n.name}_d")], f"{n.name}_erf"
        )
    one = t.b.op("Add", [th, t.b.const(1.0)], f"{n.name}_1p")
    return t.b.op("Mul", [t.b.op("Mul", [xin, t.b.const(0.5)], f"{n.name}_h"), one], n.name)


@_handles(aten.hardtanh.default, aten.clamp.default)
def _clip(t: _Translator, n, x, lo=None, hi=None):
    ins = [t.v(x), t.b.const(lo) if lo is not None else "", t.b.const(hi) if hi is not None else ""]
    while ins and ins[-1] == "":
        ins.pop()
    return t.b.op("Clip", ins, n.name)


@_handles(aten.clamp_min.default)
def _clamp_min(t: _Translator, n, x, lo):
    return t.b.op("Max", [t.v(x), t.b.const(lo)], n.name)


@_handles(aten.layer_norm.default)
def _layer_norm(t: _Translator, n, x, shape, weight=None, bias=None, eps=1e-5, *_):
    w = t.v(weight) if weight is not None else t.b.const(np.ones(shape, np.float32))
    ins = [t.v(x), w] + ([t.v(bias)] if bias is not None else [])
    return t.b.op("LayerNormalization", ins, n.name, axis=-len(shape), epsilon=float(eps))


@_handles(aten.group_norm.default)
def _group_norm(t: _Translator, n, x, groups, weight=None, bias=None, eps=1e-5, *_):
    # reshape to [N, G, -1], normalise the last axis, reshape back, per-channel affine
    shape = t.shape(x)
    c = shape[1]
    g = t.b.op("Reshape", [t.v(x), t.b.ints([0, groups, -1])], f"{n.name}_g")
    if any(d is None for d in shape[1:]):
        raise ExportError(f"{_where(n)}: group_norm over a batch-dependent dimension")
    # scales are expanded from per-channel or scalar values when the model loads (a stored
    # [C·H·W] ones vector was 64 KB of mobilevitv2_050's 1.4 MB int8 file)
    size = int(np.prod(shape[1:])) // groups
    in_shape = t.b.op("Shape", [t.v(x)], f"{n.name}_shape")
    bshape = [c] + [1] * (len(shape) - 2)
    if (
        groups == 1
        and (weight is None or weight.op == "get_attr")
        and (bias is None or bias.op == "get_attr")
    ):  # GroupNorm(1, C): the affine goes into the LayerNormalization, one pass fewer each
        inputs = [g]
        for param, fill in ((weight, 1.0), (bias, 0.0)):
            value = (
                getattr_path(t.gm, param.target).detach().numpy().reshape(bshape)
                if param is not None
                else np.full(bshape, fill, np.float32)
            )
            per_channel = t.b.init(value.astype(np.float32), f"{n.name}_affine")
            full = t.b.op("Expand", [per_channel, t.b.ints(list(shape[1:]))], f"{n.name}_full")
            inputs.append(t.b.op("Reshape", [full, t.b.ints([size])], f"{n.name}_flat"))
        normed = t.b.op("LayerNormalization", inputs, f"{n.name}_ln", axis=-1, epsilon=float(eps))
        return t.b.op("Reshape", [normed, in_shape], n.name)
    ones = t.b.op("Expand", [t.b.const(np.float32(1.0)), t.b.ints([size])], f"{n.name}_ones")
    normed = t.b.op("LayerNormalization", [g, ones], f"{n.name}_ln", axis=-1, epsilon=float(eps))
    y = t.b.op("Reshape", [normed, in_shape], f"{n.name}_y")
    if weight is not None:
        w = t.b.init(
            getattr_path(t.gm, weight.target).detach().numpy().reshape(bshape), f"{weight.target}_c"
        )
        y = t.b.op("Mul", [y, w], f"{n.name}_w")
    if bias is not None:
        bb = t.b.init(
            getattr_path(t.gm, bias.target).detach().numpy().reshape(bshape), f"{bias.target}_c"
        )
        y = t.b.op("Add", [y, bb], n.name)
    return y


@_handles(aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
def _batch_norm(t: _Translator, n, x, weight, bias, mean, var, *rest):
    eps = rest[-1] if n.target is aten._native_batch_norm_legit_no_training.default else rest[2]
    if n.target is aten.batch_norm.default and rest[0]:
        raise ExportError(f"{_where(n)}: batch_norm in training mode")
    y = t.b.op(
        "BatchNormalization",
        [t.v(x), t.v(weight), t.v(bias), t.v(mean), t.v(var)],
        n.name,
        epsilon=float(eps),
    )
    return [y, None, None] if n.target is not aten.batch_norm.default else y


@_handles(aten.softmax.int, aten._softmax.default)
def _softmax(t: _Translator, n, x, dim, *_):
    return t.b.op("Softmax", [t.v(x)], n.name, axis=dim)


def _reduce(op_type: str) -> Callable:
    def fn(t: _Translator, n, x, dims=None, keepdim=False, *_, **kw):
        dims = list(range(t.rank(x))) if dims is None else list(dims)
        if t.b.opset >= 18 or op_type == "ReduceSum":
            return t.b.op(op_type, [t.v(x), t.b.ints(dims)], n.name, keepdims=int(keepdim))
        return t.b.op(op_type, [t.v(x)], n.name, axes=dims, keepdims=int(keepdim))

    return fn


_handles(aten.mean.dim)(_reduce("ReduceMean"))
_handles(aten.sum.dim_IntList)(_reduce("ReduceSum"))
_handles(aten.amax.default)(_reduce("ReduceMax"))


def _pair(v: Any) -> list[int]:
    return list(v) * 2 if len(v) == 2 else [v[0]] * 4 if len(v) == 1 else list(v)


@_handles(aten.adaptive_avg_pool2d.default)
def _adaptive_avg_pool(t: _Translator, n, x, size):
    if list(size) == [1, 1]:
        return t.b.op("GlobalAveragePool", [t.v(x)], n.name)
    h, w = t.shape(x)[2:]
    if h % size[0] or w % size[1]:
        raise ExportError(f"{_where(n)}: adaptive_avg_pool2d {h}x{w} → {list(size)}")
    k = [h // size[0], w // size[1]]
    return t.b.op("AveragePool", [t.v(x)], n.name, kernel_shape=k, strides=k)


def _pool_window(kernel, stride) -> tuple[list[int], list[int]]:
    """ATen's pooling kernel / stride (one value means both axes; no stride means the kernel)."""
    kernel = list(kernel) * (2 if len(kernel) == 1 else 1)
    return kernel, kernel if not stride else list(stride) * (2 if len(stride) == 1 else 1)


@_handles(aten.avg_pool2d.default)
def _avg_pool(
    t: _Translator,
    n,
    x,
    kernel,
    stride=None,
    padding=(0,),
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
):
    if divisor_override is not None:
        raise ExportError(f"{_where(n)}: avg_pool2d with divisor_override")
    kernel, stride = _pool_window(kernel, stride)
    return t.b.op(
        "AveragePool",
        [t.v(x)],
        n.name,
        kernel_shape=kernel,
        strides=stride,
        pads=_pair(padding),
        ceil_mode=int(ceil_mode),
        count_include_pad=int(count_include_pad),
    )


@_handles(aten.max_pool2d.default)
def _max_pool(
    t: _Translator, n, x, kernel, stride=None, padding=(0,), dilation=(1,), ceil_mode=False
):
    kernel, stride = _pool_window(kernel, stride)
    return t.b.op(
        "MaxPool",
        [t.v(x)],
        n.name,
        kernel_shape=kernel,
        strides=stride,
        pads=_pair(padding),
        dilations=list(dilation) * (2 if len(dilation) == 1 else 1),
        ceil_mode=int(ceil_mode),
    )


@_handles(aten.scaled_dot_product_attention.default)
def _sdpa(t: _Translator, n, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
    if attn_mask is not None or is_causal or dropout_p:
        raise ExportError(f"{_where(n)}: attention with a mask, causal or dropout")
    scale = kw.get("scale") or 1.0 / math.sqrt(t.shape(q)[-1])
    r = t.rank(k)
    kt = t.b.op("Transpose", [t.v(k)], f"{n.name}_kt", perm=list(range(r - 2)) + [r - 1, r - 2])
    qs = t.b.op("Mul", [t.v(q), t.b.const(scale)], f"{n.name}_qs")
    att = t.b.op("Softmax", [t.b.op("MatMul", [qs, kt], f"{n.name}_qk")], f"{n.name}_sm", axis=-1)
    return t.b.op("MatMul", [att, t.v(v)], n.name)
