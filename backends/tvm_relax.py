"""TVM Relax backend: a hyq-fx fake-quant GraphModule → a Relax VM shared library with int8 kernels.

Three steps, each checkable on its own:

1. ``lower_quantizers`` (torch): every ``FakeQuantizer`` becomes explicit ATen ops with an int8
   tensor in the middle. Activations (per-tensor or per-channel, ``b ≤ 8`` bits) are *shifted*
   to signed int8, which is exact for integers::

       q8 = cast_int8(clamp(round(x / s) + z', qmin − o, qmax − o)),   z' = z − o
       x̂  = (cast_f32(q8) − z') · s

   with ``o = 2^(b−1)`` for the unsigned (asymmetric) range and ``o = 0`` for the symmetric one,
   so ``x̂`` equals ``FakeQuantizer(x)`` bit for bit. Weights are quantized once, offline, to
   the int8 constant ``w8 = clamp(round(W/s_w) + z_w, qmin, qmax) − z_w``;
   ``Ŵ = (cast_f32(w8) − 0)·s_w``.
2. ``from_exported_program`` imports the exported graph; the dequantize ``(cast_f32(q) − z)·s``
   is then the Relax pattern ``multiply(subtract(astype(q), const), const)``.
3. ``IntegerizeQDQ`` (a Relax module pass, DFPattern ``rewrite_call``) rewrites
   ``conv2d(DQ(x8), DQ(w8))`` and ``matmul(DQ(a8), DQ(b8))`` (``linear`` is
   ``matmul(x, permute_dims(W))`` in Relax) into int8 × int8 → int32 kernels plus a float
   requantization, exact in integer arithmetic::

       conv2d:  y = s_x·s_w[o] · ( conv_i32(pad(x8, z'_x), w8) − z'_x · Σ_{i,kh,kw} w8[o] )
       matmul:  y = s_a·s_b · ( a8·b8 − z'_b·Σ_k a8[m,k] − z'_a·Σ_k b8[k,n] + K·z'_a·z'_b )

   Asymmetric activations keep their (shifted) zero point ``z'``; it is subtracted exactly in
   int32 by the correction terms above (a constant per output channel for weights, a row/column
   sum for activation × activation). The conv input is padded with ``z'`` (the int8 code of
   0.0), so the border is exact. The int32 → float rescale by ``s_x·s_w`` is the requantization;
   bias adds and everything outside conv/linear/matmul stay in float, as in the fake-quant graph.

   A depthwise conv (``groups = C_in``, weight ``[m·C_in, 1, kh, kw]``) may have a per-channel
   input quantizer (``insert_quantizers(depthwise_per_channel=True)``): output channel ``o``
   reads only input channel ``c = o // m``, so it is still one int8 grouped conv::

       dw conv: y[o] = s_x[c]·s_w[o] · ( conv_i32(pad0(x8), w8)[o] − z'_x[c] · conv(mask, w8)[o] )

   The input is padded with int 0 (no single pad code is 0.0 for every channel) and ``mask``
   (1 on the input, 0 on the padding) keeps the padded taps out of the zero-point correction,
   a build-time ``[1, O, H_out, W_out]`` int32 constant (needs static H, W).

A 1x1 conv after ``scale_bottleneck_outliers`` (placement "quantizer") reads
``Q_a(x; s·α_c, z)`` against the weight ``Q_w(W·α)·α⁻¹``: the α cancel in the integer sum, so
``lower_quantizers`` drops the ``·α⁻¹`` product and dequantizes the per-channel codes with the one
scale ``s`` (``_fold_channel_scaled_inputs``), and the conv is an ordinary int8 conv.

An op stays in float (listed in the ``float_fallbacks`` of the library's ``.json`` and in
``IntegerizeStats.skipped``, once per op) where integers cannot express it exactly: a
per-channel activation scale or zero point along the reduction axis (any conv but a depthwise
one with a constant weight and static spatial shape, linear, matmul), > 8-bit codes, weights
whose ``q − z_w`` leaves int8, or a weight scale varying along the reduction axis. Per-channel
activation quantizers (≤ 8 bits) are lowered to int8 codes either way; their Q/DQ is exact.

Targets: ``"llvm"`` (host CPU), ``"aarch64"`` (``llvm -mtriple=aarch64-linux-gnu +neon,+dotprod``,
linked with ``aarch64-linux-gnu-gcc``), ``"cuda"`` (``sm_90`` with dlight GPU schedules; needs
``nvcc`` at build time), or any ``tvm.target.Target`` / target dict. Invariant checked by
``tests/test_tvm_backend.py``: the Relax IR after ``IntegerizeQDQ`` holds int8 conv2d / matmul with
int32 output and no float conv/matmul, and the built library reproduces the fake-quant model.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from hyq_fx.backends.tvm_layout import ConvertChannelsLast
from hyq_fx.backends.tvm_tuning import TuningOptions, cpu_pipeline, tuning_target
from hyq_fx.backends.tvm_vnni import (
    UseVnniKernels,
    register_vnni_intrinsic,
    tensor_dims,
    vnni_available,
)
from hyq_fx.lowering import lower_for_export
from hyq_fx.quantizer import FakeQuantizer

__all__ = [
    "TARGETS",
    "TvmBackendError",
    "IntegerizeQDQ",
    "TvmRunner",
    "build_tvm",
    "count_ops",
    "export_tvm",
    "is_tvm_library",
    "import_relax",
    "integerize",
    "load_tvm",
    "lower_quantizers",
    "make_target",
]

INT8_MIN, INT8_MAX = -128, 127
TARGETS: dict[str, dict[str, Any]] = {
    "llvm": {"kind": "llvm"},
    "aarch64": {
        "kind": "llvm",
        "mtriple": "aarch64-linux-gnu",
        "mattr": ["+neon", "+dotprod"],
    },
    "cuda": {"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}},
}
CROSS_CC = {"aarch64": "aarch64-linux-gnu-gcc"}
# LLVM's objects carry DWARF debug info (a third of an int8 library's bytes): not shipped
LINK_OPTIONS = ["-Wl,--strip-debug"]


class TvmBackendError(RuntimeError):
    """The model cannot be built or run with TVM; the message says where and how to fix it."""


# ---------------------------------------------------------------------------------------------
# 1. torch: FakeQuantizer → explicit int8 quantize / dequantize


def _channel_shape(numel: int, ndim: int, axis: int) -> list[int]:
    shape = [1] * ndim
    shape[axis % ndim] = numel
    return shape


class _QuantDequantInt8(nn.Module):
    """``x → (cast_f32(cast_i8(clamp(round(x/s) + z', lo, hi))) − z')·s``.

    ``s`` and ``z'`` are per-tensor (``shape=()``) or per-channel, stored already in their
    broadcast shape (e.g. ``[C, 1, 1]`` for axis 1 of NCHW) so that Relax sees them as plain
    constants of the dequantize pattern, not behind a reshape.
    """

    def __init__(
        self,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        lo: int,
        hi: int,
        shape: tuple[int, ...] = (),
        dequant_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("scale", scale.reshape(shape).float().clone())
        zero_shape = shape if zero_point.numel() > 1 else ()
        self.register_buffer("zero_point", zero_point.reshape(zero_shape).float().clone())
        # the codes of a per-channel scale s_c folded into the consumer: read through one s̄
        dq = self.scale if dequant_scale is None else torch.tensor(float(dequant_scale))
        self.register_buffer("dequant_scale", dq.clone())
        self.lo, self.hi = float(lo), float(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, self.lo, self.hi)
        q8 = q.to(torch.int8)
        return (q8.to(torch.float32) - self.zero_point) * self.dequant_scale


class _DequantWeightInt8(nn.Module):
    """A weight stored as int8 codes: ``Ŵ = (cast_f32(w8) − 0)·s_w``."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale.float().clone())
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.float32))

    def forward(self) -> torch.Tensor:
        return (self.codes.to(torch.float32) - self.zero_point) * self.scale


def _get_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _weight_codes(fq: FakeQuantizer, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(q − z_w, scale view)`` as exact integers in int8, or None if they leave int8."""
    spec = fq.spec
    w = w.detach().float()
    if fq.scale.numel() > 1:
        shape = _channel_shape(fq.scale.numel(), w.dim(), spec.axis)
    else:
        shape = []
    s = fq.scale.reshape(shape)
    z = fq.zero_point.reshape(shape)
    codes = torch.clamp(torch.round(w / s) + z, spec.qmin, spec.qmax) - z
    if codes.numel() and (codes.min() < INT8_MIN or codes.max() > INT8_MAX):
        return None
    return codes, s


_INPUT_RANKS = {torch.ops.aten.conv2d.default: 4, torch.ops.aten.conv1d.default: 3}


def _input_rank(node: fx.Node) -> int | None:
    """The rank of a quantizer's input: from ``meta["val"]`` (a captured graph) or, where that
    is gone (a graph loaded from ``graph.json``), from a conv consuming it as its input."""
    for n in (node, node.args[0]):
        val = n.meta.get("val") if isinstance(n, fx.Node) else None
        if getattr(val, "ndim", None) is not None:
            return int(val.ndim)
    for user in node.users:
        if user.op == "call_function" and user.args and user.args[0] is node:
            rank = _INPUT_RANKS.get(user.target)
            if rank is not None:
                return rank
    return None


def _activation_qparam_shape(fq: FakeQuantizer, node: fx.Node) -> tuple[int, ...] | None:
    """The broadcast shape of an activation quantizer's scale / zero point, or None.

    ``()`` per-tensor; per-channel along ``axis``: ``[C] + [1]·(trailing dims)``, which needs
    the input's rank for a non-negative axis (:func:`_input_rank`).
    """
    numel = fq.scale.numel()
    if fq.zero_point.numel() not in (1, numel):
        return None
    if numel == 1 and fq.zero_point.numel() == 1:
        return ()
    axis = fq.spec.axis
    if axis < 0:
        return (numel, *([1] * (-axis - 1)))
    rank = _input_rank(node)
    if rank is None or axis >= rank:
        return None
    return (numel, *([1] * (rank - 1 - axis)))


def _fold_channel_scaled_inputs(gm: fx.GraphModule) -> dict[fx.Node, float]:
    """Per-channel activation quantizers whose scale cancels in their 1x1-conv consumers.

    After ``scale_bottleneck_outliers`` (placement "quantizer") a conv reads
    ``conv(Q_a(x; s·α_c, z), Q_w(W·α)·α⁻¹)``. The integer codes of ``Q_a`` times ``s·α_c``,
    against ``α⁻¹``, are the codes times ``s``: so where every consumer multiplies its
    quantized weight by a constant ``r`` with ``r_c·s_c = s̄`` for all ``c`` (and ``z`` is one
    value), the ``·r`` is dropped here and the quantizer's codes are dequantized with ``s̄``;
    ``IntegerizeQDQ`` then sees a per-tensor input and runs an int8 conv. Returns
    ``{quantizer node: s̄}``; the graph is rewritten in place (``gm`` is the caller's copy).
    """
    folded: dict[fx.Node, float] = {}
    for node in gm.graph.nodes:
        fq = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(fq, FakeQuantizer) or fq.mode != "quantize" or not fq.spec.per_channel:
            continue
        if fq.role == "weight" or fq.spec.axis % 4 != 1 or fq.zero_point.unique().numel() != 1:
            continue
        sigma = fq.scale.detach().double().flatten()
        muls, s_bar = [], None
        for user in node.users:
            w = user.args[1] if user.target is torch.ops.aten.conv2d.default else None
            if user.args[0] is not node or not isinstance(w, fx.Node):
                break
            if w.target is not torch.ops.aten.mul.Tensor or len(w.users) != 1:
                break
            wfq, r = w.args
            if not (isinstance(wfq, fx.Node) and wfq.op == "call_module"):
                break
            if not (isinstance(r, fx.Node) and r.op == "get_attr"):
                break
            ratio = _get_attr(gm, r.target).detach().double().flatten() * sigma
            if ratio.numel() != sigma.numel():
                break
            value = float(ratio.mean())
            if (ratio / value - 1).abs().max() > 1e-5 or (s_bar and abs(value / s_bar - 1) > 1e-5):
                break
            s_bar = value
            muls.append((user, w, wfq))
        else:
            if not muls:
                continue
            for user, mul, wfq in muls:
                user.replace_input_with(mul, wfq)
                gm.graph.erase_node(mul)
            folded[node] = s_bar
    return folded


def lower_quantizers(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, list[str]]]:
    """A copy of ``gm`` whose FakeQuantizers are explicit int8 quantize/dequantize ATen ops.

    Returns the new GraphModule (same outputs as ``gm``, to the bit) and what was done with each
    quantizer: names under ``int8_activation``, ``int8_weight``, ``float`` and ``identity``.
    Quantizers that cannot be held in int8 keep their float fake-quant (the consumer op then
    stays in float); quantizers in mode ``off``/``observe`` are the identity and are removed.
    """
    gm = fx.GraphModule(gm, gm.graph.__deepcopy__(), class_name=type(gm).__name__)
    report: dict[str, list[str]] = {"int8_activation": [], "int8_weight": [], "float": [],
                                    "identity": [], "channel_folded": []}  # fmt: skip
    graph = gm.graph
    folded = _fold_channel_scaled_inputs(gm)
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        fq = gm.get_submodule(node.target)
        if not isinstance(fq, FakeQuantizer) or type(fq).forward is not FakeQuantizer.forward:
            continue  # another module (a custom quantizer): torch.export traces it in float
        name = str(node.target)
        if fq.mode != "quantize":
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            report["identity"].append(name)
            continue
        spec = fq.spec
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "get_attr":
            lowered = _weight_codes(fq, _get_attr(gm, src.target))
            if lowered is not None:
                new_name = f"{name.replace('.', '_')}_int8"
                gm.add_submodule(new_name, _DequantWeightInt8(*lowered))
                with graph.inserting_before(node):
                    new = graph.call_module(new_name, ())
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                report["int8_weight"].append(name)
                continue
        shape = _activation_qparam_shape(fq, node)
        if spec.bits <= 8 and shape is not None:
            offset = 0 if spec.symmetric else 2 ** (spec.bits - 1)
            zero = fq.zero_point - offset
            if node in folded:
                zero = zero.flatten()[:1].reshape(())
                report["channel_folded"].append(name)
            module = _QuantDequantInt8(
                fq.scale, zero, spec.qmin - offset, spec.qmax - offset, shape, folded.get(node)
            )
            gm.add_submodule(name, module)
            report["int8_activation"].append(name)
        else:
            report["float"].append(name)  # > 8 bits / unknown rank: float fake-quant
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, report


# ---------------------------------------------------------------------------------------------
# 2. import into Relax


def import_relax(
    gm: fx.GraphModule, example_input: torch.Tensor, *, dynamic_batch: bool = True
) -> Any:
    """Export ``gm`` with torch.export and import it as a Relax IRModule (``main``).

    PyTorch's decompositions are not run (``run_ep_decomposition=False``): they would turn
    ``matmul``/``linear`` into ``broadcast_to``/``reshape``/``bmm`` chains that hide the
    dequantize → matmul pattern from ``IntegerizeQDQ``.
    """
    from tvm.relax.frontend.torch import from_exported_program

    dynamic = None
    if dynamic_batch:
        dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    example = example_input
    if dynamic_batch and example.shape[0] < 2:  # a batch of one would specialise the dimension
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    try:
        with torch.no_grad():
            ep = torch.export.export(gm, (example,), dynamic_shapes=dynamic, strict=False)
        return from_exported_program(ep, run_ep_decomposition=False)
    except Exception as exc:
        raise TvmBackendError(
            f"could not import the model into TVM Relax: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:400]} (check that the graph runs on "
            f"example_input of shape {tuple(example_input.shape)}; an unsupported op is named "
            "above)"
        ) from exc


# ---------------------------------------------------------------------------------------------
# 3. Relax: DQ(int8) conv2d / matmul → int8 × int8 → int32 kernels + float requantization


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


# ---------------------------------------------------------------------------------------------
# 4. build and run


def make_target(target: str | Mapping[str, Any] | Any = "llvm", *, mcpu: str | None = None) -> Any:
    """A ``tvm.target.Target`` from a name in ``TARGETS``, a target dict, or a Target.

    ``"llvm"`` is the build machine's CPU (``mcpu`` from LLVM's host detection unless given):
    the library then runs on that CPU family.
    """
    import tvm

    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str):
        if target not in TARGETS:
            raise TvmBackendError(
                f"unknown TVM target {target!r}; use one of {sorted(TARGETS)} or a target dict "
                "such as {'kind': 'llvm', 'mcpu': 'cascadelake'}"
            )
        config = dict(TARGETS[target])
        if target == "llvm":
            config["mcpu"] = mcpu or tvm.target.codegen.llvm_get_system_cpu()
    else:
        config = dict(target)
    try:
        return tvm.target.Target(config)
    except Exception as exc:
        raise TvmBackendError(f"invalid TVM target {config}: {exc}") from exc


def _target_name(target: Any) -> str:
    if target.kind.name == "cuda":
        return "cuda"
    triple = str(target.attrs.get("mtriple", "") or "")
    return "aarch64" if triple.startswith("aarch64") else target.kind.name


def _cuda_pipeline(target: Any, int8_tensor_cores: bool = False) -> Any:
    """TVM's CUDA pipeline, but a dlight rule that fails on a kernel hands it to the next rule.

    TVM 0.27's ``dlight.gpu.Matmul`` (int8 tensorization) raises a ScheduleError on some fused
    int8 1x1 convolutions (``compute-at``: "not a stage pipeline"); the kernel then gets the
    GEMV / reduction / fallback schedule instead of failing the whole build. On others (an
    int8 1x1 conv with a per-channel float epilogue, in MobileViT-v2) it crashes the process
    inside ``Tensorize``, which no ``except`` can catch: so int8 tensor-core tensorization is
    off unless ``int8_tensor_cores``; int8 × int8 → int32 kernels then run on CUDA cores
    (the same integer arithmetic, dlight's generic matmul schedule).
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda_backend
    from tvm.s_tir import dlight as dl

    class Tolerant(dl.ScheduleRule):
        def __init__(self, rule: Any) -> None:
            self.rule = rule

        def apply(self, func: Any, tgt: Any, tunable: bool) -> Any:
            if not int8_tensor_cores and isinstance(func, tvm.tirx.PrimFunc):
                func = func.with_attr("dlight.do_not_tensorize", True)
            try:
                return self.rule.apply(func, tgt, tunable)
            except Exception:  # a rule bug: let the next rule schedule this kernel
                return None

    rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction()]
    legalize = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        dl.ApplyDefaultSchedule(*[Tolerant(r) for r in rules], dl.gpu.Fallback()),
    ]

    @tvm.transform.module_pass(opt_level=0, name="hyq.CudaPipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            seq = tvm.transform.Sequential(
                cuda_backend.library_dispatch_passes(target)
                + legalize
                + cuda_backend.dataflow_lower_passes(target)
                + cuda_backend.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def _export(executable: Any, out_path: Path, name: str) -> None:
    from tvm.support import cc as tvm_cc

    out_path.parent.mkdir(parents=True, exist_ok=True)
    cross = CROSS_CC.get(name)
    if cross is None:
        executable.export_library(str(out_path), options=LINK_OPTIONS)
        return
    if shutil.which(cross) is None:
        raise TvmBackendError(
            f"cannot link the {name} library: the cross compiler {cross!r} is not on PATH; "
            "install it (Debian/Ubuntu: apt-get install -y gcc-aarch64-linux-gnu)"
        )
    executable.export_library(
        str(out_path), fcompile=tvm_cc.cross_compiler(cross), options=LINK_OPTIONS
    )


def _metadata_path(lib_path: Path) -> Path:
    return lib_path.with_suffix(".json")


def build_tvm(
    gm: fx.GraphModule,
    example_input: torch.Tensor,
    target: str | Mapping[str, Any] | Any = "llvm",
    out_path: str | Path = "model.llvm.so",
    *,
    integer: bool = True,
    dynamic_batch: bool = True,
    mcpu: str | None = None,
    int8_tensor_cores: bool = False,
    tune_trials: int = 0,
    tuning_dir: str | Path | None = None,
    tune_ops: Sequence[str] | None = ("conv2d", "matmul"),
    fast_exp: bool = True,
    vnni: bool = True,
    channels_last: bool = True,
) -> Path:
    """Build ``gm`` (a hyq-fx fake-quant GraphModule) into a Relax VM shared library.

    ``integer=True`` runs conv2d / linear / matmul as int8 × int8 → int32 (``IntegerizeQDQ``);
    ``integer=False`` builds the float graph (quantizers off) as the FP32 reference.
    ``dynamic_batch`` keeps the batch dimension symbolic (one library for any batch size); with
    False the library runs only ``example_input``'s batch size (``TvmRunner`` pads to it).
    ``int8_tensor_cores`` (cuda only) lets dlight tensorize int8 matmuls for tensor cores: faster
    where it works, but TVM 0.27 crashes on some kernels (see ``_cuda_pipeline``).
    Kernels use TVM's default (untuned) schedules unless ``tune_trials > 0`` (MetaSchedule on
    this CPU, ``llvm`` with a static batch only; see ``tvm_tuning``) or ``tuning_dir`` holds a
    database from an earlier tuning (default ``OUT/model.llvm.tuning`` beside ``out_path``,
    reused when it exists). ``tune_ops`` picks the fused kernels to tune by op name (None or
    ``["all"]``: all, the elementwise, softmax and layout kernels too). ``fast_exp`` lowers
    float32 ``exp`` (SiLU, sigmoid, softmax) on CPU targets to a vectorizable polynomial
    (``tvm_fast_exp``, ≤ 1e-6 relative) instead of one libm call per element. ``vnni`` runs
    the int8 conv2d / matmul with constant weights as AVX-512 VNNI dot products where the
    target CPU has them (``tvm_vnni``; same int32 results). ``channels_last`` runs the convs
    of CPU targets in NHWC (``tvm_layout``; exact), so that their per-channel epilogues
    vectorize. Writes
    ``out_path`` and a ``.json`` beside it (target, input shape, op counts, build seconds, the
    model's preprocessing), each through a temporary file renamed at the end.
    """
    import tvm

    from hyq_fx.artifact import atomic_output_file
    from hyq_fx.backends.tvm_fast_exp import fast_exp as exp_lowering
    from hyq_fx.quantize import META_KEY, quantizers_mode

    if not isinstance(gm, fx.GraphModule):
        raise TvmBackendError(f"build_tvm needs a hyq-fx GraphModule, got {type(gm).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        raise TvmBackendError("example_input must be an image batch tensor [N, C, H, W]")
    tvm_target = make_target(target, mcpu=mcpu)
    name = _target_name(tvm_target)
    out_path = Path(out_path)
    tuning = _tuning_options(name, out_path, dynamic_batch, tune_trials, tuning_dir)
    if tuning is not None:
        tuning.ops = None if tune_ops is None or list(tune_ops) == ["all"] else tuple(tune_ops)
        tvm_target = tuning_target(tvm_target)
    start = time.perf_counter()
    example_input = example_input.detach().float().cpu()
    gm = lower_for_export(gm, example_input)
    if integer:
        lowered, report = lower_quantizers(gm)
    else:
        with quantizers_mode(gm, "off"):
            lowered, report = lower_quantizers(gm)
    mod = import_relax(lowered.eval(), example_input, dynamic_batch=dynamic_batch)
    stats: dict[str, IntegerizeStats] = {}
    vnni_counts: dict[str, int] = {}
    if integer:
        mod = IntegerizeQDQ(stats)(mod)
    channels_last = channels_last and name != "cuda"
    if channels_last:
        mod = ConvertChannelsLast()(mod)
    if integer and vnni and vnni_available(tvm_target):
        mod = UseVnniKernels(vnni_counts)(mod)
        if tuning is not None:  # tuning and its records tensorize with the intrinsic
            register_vnni_intrinsic()
    ops = count_ops(mod)
    if name == "cuda":
        pipeline = _cuda_pipeline(tvm_target, int8_tensor_cores)
    else:
        pipeline = cpu_pipeline(tvm_target, tuning)
    with tvm_target, exp_lowering(fast_exp):
        executable = tvm.compile(mod, target=tvm_target, relax_pipeline=pipeline)
    # the library and its .json go to temporary files renamed at the end (the .json just
    # before the library): an interrupted export leaves no partial file under their names
    with atomic_output_file(out_path) as tmp_lib:
        _export(executable, tmp_lib, name)
        main = stats.get("main", IntegerizeStats())
        meta = {
            "format": "hyq-fx tvm-relax 1",
            "target": name,
            "target_config": str(tvm_target),
            "integer": integer,
            "int8_tensor_cores": bool(int8_tensor_cores and name == "cuda"),
            "fast_exp": bool(fast_exp and name != "cuda"),
            "vnni": vnni_counts or None,
            "channels_last": channels_last,
            "dynamic_batch": dynamic_batch,
            "batch": None if dynamic_batch else int(example_input.shape[0]),
            "input_shape": list(example_input.shape[1:]),
            "ops": ops,
            "integer_conv2d": main.conv2d,
            "integer_depthwise_per_channel": main.depthwise_per_channel,
            "integer_matmul": main.matmul,
            "float_fallbacks": main.skipped,
            "quantizers": {k: len(v) for k, v in report.items()},
            "build_seconds": round(time.perf_counter() - start, 2),
            "tuning": tuning.summary if tuning is not None else None,
            "model_info": dict(gm.meta.get(META_KEY, {}).get("model_info", {})),
        }
        with atomic_output_file(_metadata_path(out_path)) as tmp_meta:
            tmp_meta.write_text(json.dumps(meta, indent=2, default=str))
    return out_path


def _tuning_options(
    name: str,
    out_path: Path,
    dynamic_batch: bool,
    trials: int,
    work_dir: str | Path | None,
) -> TuningOptions | None:
    """What ``build_tvm`` should tune or apply, or None for TVM's default schedules."""
    if trials < 0:
        raise TvmBackendError(f"tune_trials must be >= 0, got {trials}")
    default_dir = out_path.with_suffix(".tuning")
    if trials == 0 and work_dir is None:
        # an earlier tuning's database beside the library is reused where it can apply
        if name != "llvm" or dynamic_batch or not default_dir.is_dir():
            return None
    if name != "llvm":
        raise TvmBackendError(
            f"MetaSchedule tuning measures kernels on this machine, so it needs the host "
            f"target 'llvm', not {name!r}; build {name} without tune_trials / --tune-trials"
        )
    if dynamic_batch:
        raise TvmBackendError(
            "MetaSchedule tuning needs static shapes: build with dynamic_batch=False "
            "(`hyq-fx export --tune-trials N` does this, with --batch N, default 1)"
        )
    return TuningOptions(Path(work_dir) if work_dir is not None else default_dir, trials)


def _load_cuda_runtime() -> None:
    """Register TVM's CUDA device API when TVM runs without its compiler.

    A deployment machine needs only TVM's runtime (``TVM_USE_RUNTIME_LIB=1``, or a TVM without
    ``libtvm_compiler.so``: 3 MB instead of 260 MB). In that mode ``import tvm`` skips the
    backend autoload that loads ``libtvm_runtime_cuda.so``, so CUDA libraries would not load.
    """
    import tvm.base
    from tvm_ffi.libinfo import load_lib_ctypes

    libs = tvm.base._LOADED_LIBS
    if not tvm.base._RUNTIME_ONLY or "tvm_runtime_cuda" in libs:
        return
    runtime_dir = Path(libs["tvm_runtime"]._name).resolve().parent
    try:
        libs["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm",
            target_name="tvm_runtime_cuda",
            extra_lib_paths=[runtime_dir],
            mode="RTLD_LOCAL",
        )
    except (OSError, RuntimeError) as err:
        raise TvmBackendError(
            f"TVM's CUDA runtime (libtvm_runtime_cuda.so beside {runtime_dir}) could not be "
            f"loaded: {err}. Run on a machine with the NVIDIA driver and the CUDA runtime."
        ) from err


def _register_cuda_compiler() -> None:
    """Compile a library's CUDA kernels with ``nvcc`` when it is loaded by a runtime-only TVM.

    TVM 0.27 CUDA libraries carry CUDA C++ that the loader compiles for the GPU at hand
    (``tvm_callback_cuda_compile``); TVM's own callback needs the compiler library (its target
    API), absent in a runtime-only install, so this one calls ``nvcc`` for the device's arch.
    """
    import subprocess
    import tempfile

    import tvm
    import tvm.base
    import tvm_ffi

    if not tvm.base._RUNTIME_ONLY:
        return
    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")

    def compile_cuda(code: str, *_: Any) -> bytearray:
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
            src.write_text(code)
            cmd = ["nvcc", "--fatbin", "-O3", f"-arch={arch}", "-o", str(out), str(src)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True)
            except OSError as err:
                raise TvmBackendError(f"loading a CUDA library needs nvcc on PATH: {err}") from err
            if proc.returncode:
                raise TvmBackendError(f"nvcc failed on the kernels: {proc.stderr[-2000:]}")
            return bytearray(out.read_bytes())

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


class TvmRunner:
    """A built library as a callable: torch images ``[N, C, H, W]`` → torch logits (Relax VM).

    ``device`` is ``"cpu"`` or ``"cuda"`` (default: the one the library was built for).
    Works with ``hyq_fx.data.evaluate_top1(runner, loader)``. A static-batch library runs
    larger batches in chunks and pads a short last chunk.
    """

    def __init__(self, path: str | Path, device: str | None = None) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine  # in runtime-only TVM too (no tvm.relax)

        self.path = Path(path)
        if not self.path.is_file():
            raise TvmBackendError(
                f"{self.path} does not exist; build it with build_tvm() or "
                "`hyq-fx export OUT --to tvm`"
            )
        meta_file = _metadata_path(self.path)
        self.meta: dict[str, Any] = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if self.meta.get("target") == "aarch64":
            raise TvmBackendError(
                f"{self.path} is an aarch64 library; run it on an aarch64 machine (with tvm "
                "installed) or over tvm.rpc, not on this host"
            )
        device = device or ("cuda" if self.meta.get("target") == "cuda" else "cpu")
        if device == "cuda":
            _load_cuda_runtime()
            _register_cuda_compiler()
        self.device = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
        self._tensor = tvm.runtime.tensor
        self.vm = VirtualMachine(tvm.runtime.load_module(str(self.path)), self.device)
        self.batch: int | None = self.meta.get("batch")

    @property
    def model_info(self) -> dict[str, Any]:
        return dict(self.meta.get("model_info") or {})

    def _run(self, x: np.ndarray) -> np.ndarray:
        out = self.vm["main"](self._tensor(x, self.device))
        while not hasattr(out, "numpy"):  # a tuple of outputs: the logits are the first
            out = out[0]
        return out.numpy()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().cpu().float().numpy())
        if self.batch is None or x.shape[0] == self.batch:
            return torch.from_numpy(self._run(x))
        outs = []
        for start in range(0, x.shape[0], self.batch):
            chunk = x[start : start + self.batch]
            n = chunk.shape[0]
            if n < self.batch:
                pad = np.zeros((self.batch - n, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            outs.append(self._run(chunk)[:n])
        return torch.from_numpy(np.concatenate(outs))


def load_tvm(path: str | Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """``(runner, model_info)`` for a built library: what ``hyq-fx eval LIB.so`` needs."""
    runner = TvmRunner(path)
    return runner, runner.model_info


def is_tvm_library(path: str | Path) -> bool:
    """Whether ``path`` is a library written by :func:`build_tvm` (a ``.so`` with its ``.json``)."""
    path = Path(path)
    meta = _metadata_path(path)
    if path.suffix != ".so" or not path.is_file() or not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format", "").startswith("hyq-fx tvm-relax")
    except (OSError, json.JSONDecodeError):
        return False


def export_tvm(
    out_dir: str | Path,
    target: str | Mapping[str, Any] = "llvm",
    out_path: str | Path | None = None,
    **options: Any,
) -> Path:
    """Build the quantized artifact in ``out_dir`` for ``target``: ``OUT/model.TARGET.so``.

    What ``hyq-fx export OUT --to tvm --target TARGET`` runs (TARGET: llvm, aarch64, cuda);
    ``options`` go to :func:`build_tvm` (``integer``, ``dynamic_batch``, ``mcpu``,
    ``tune_trials``, ``tuning_dir``, ``tune_ops``, ``vnni``). ``batch`` (an option here) sets
    the example batch size; with ``tune_trials`` (0 included: apply the database beside the
    library without searching) the library is then built for that batch only.
    """
    from hyq_fx.artifact import is_artifact, load
    from hyq_fx.quantize import META_KEY

    if not is_artifact(out_dir):
        raise TvmBackendError(
            f"{out_dir} is not a quantized model directory (no graph.json); create one with "
            "`hyq-fx quantize MODEL --calib DIR --out OUT`"
        )
    gm = load(out_dir)
    shape = gm.meta.get(META_KEY, {}).get("input_shape")
    if not shape:
        raise TvmBackendError(f"{out_dir}: the artifact does not record its input shape")
    batch = int(options.pop("batch", 1))
    if batch < 1:
        raise TvmBackendError(f"batch must be >= 1, got {batch}")
    if options.get("tune_trials") is None:
        options.pop("tune_trials", None)  # no tuning asked for: one library for any batch
    else:  # a tuning database applies to static shapes only
        options.setdefault("dynamic_batch", False)
    example = torch.zeros(batch, *shape)
    name = _target_name(make_target(target, mcpu=options.get("mcpu")))
    path = Path(out_path) if out_path else Path(out_dir) / f"model.{name}.so"
    return build_tvm(gm, example, target, path, **options)
