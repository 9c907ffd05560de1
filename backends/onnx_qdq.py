"""ONNX QDQ backend: write a hyq-fx fake-quant GraphModule as a QDQ ONNX model, and run it.

Every calibrated :class:`~hyq_fx.quantizer.FakeQuantizer` ``Q`` (scale ``s``, zero-point ``z``,
integer range ``[qmin, qmax]``) becomes standard ONNX operators (the "QDQ format" of ONNX
Runtime, `onnxruntime.ai/docs/performance/model-optimizations/quantization.html`)::

    activation:  x̂ = DequantizeLinear(Clip(QuantizeLinear(x, s, z), qmin, qmax), s, z)
    weight:      Ŵ = DequantizeLinear(W_q, s, z, axis),  W_q = clamp(round(W/s) + z, qmin, qmax)

``W_q`` is computed here and stored once as an int8 (symmetric) / uint8 (asymmetric) initializer, so
the file holds one byte per weight. A per-channel activation quantizer (the depthwise conv input of
``insert_quantizers(depthwise_per_channel=True)``) is a per-axis pair, ``QuantizeLinear`` /
``DequantizeLinear`` with ``axis`` and ``[C]`` scale / zero point (ONNX opset ≥ 13). Where the conv
it feeds is requantized (below), the per-channel scale is folded into the conv instead, so that ONNX
Runtime still runs ``QLinearConv`` (which takes one input scale): the per-axis QuantizeLinear codes
are read through one ``(s̄, z̄)``, a depthwise conv's weight scales take ``s_c/s̄``, a 1x1 conv
after ``scale_bottleneck_outliers`` drops its ``Q_w(W·α)·α⁻¹`` product (``s_c = s̄·α_c``: the α
cancel), and unequal zero points become a bias term (the input is zero-padded in float before
QuantizeLinear); see ``_fold_channel_scales``. ``Clip`` is emitted only where the range is narrower
than the 8-bit container (symmetric ``±127``, or fewer than 8 bits); weights of fewer than 8 bits
are pre-rounded into the int8 container, so ``DQ(W_q)`` is exact. Symmetric activations are stored
as uint8 with ``z + 128`` (the same grid), because ONNX Runtime's x86 integer kernels take uint8
activations.

With ``requantize="auto"`` (opt-in), where a conv's output reaches the next quantizer ``Q_n``
through at most one activation ``f`` and data-movement ops, the conv output is also requantized,
``y → DQ(Q(y, s_y, z_y))``, so that ONNX Runtime fuses ``DQ → Conv → Q`` into ``QLinearConv``
(uint8 × int8, int32 accumulation, uint8 output). For ``f`` = identity / ReLU ``(s_y, z_y)`` is
``Q_n``'s own and the result is exact (``Q_n(f(DQ(Q_n(y)))) = Q_n(f(y))``). For SiLU / GELU /
Hardswish it is an extra rounding the fake-quant graph does not have: the uint8 grid spans ``[a,
f⁻¹(hi_n)]`` (above, ``Q_n`` saturates anyway), ``a`` chosen to minimise ``E[(Q_n(f(ŷ)) −
Q_n(f(y)))²]`` on calibration images (without images: where ``|f(a)|`` falls under half a step of
``Q_n``). In front of a per-channel ``Q_n`` one uint8 grid serves all channels: it is fitted the
same way and kept only where it adds at most ``max_added_error`` (default 1.0, i.e. 100 %) to
``Q_n``'s own error on those images (mobilevit_xxs, default recipe: 50–100 % at 6 bits, where the
1000-image top-1 stayed within 0.3 pt of the fake-quant model; 150–460 % at 8 bits, where it lost
0.4 pt; there the conv stays float). ``requantize="exact"`` keeps only the exact cases, ``"none"``
(default) none, so the file computes the fake-quant graph that hyq-fx evaluated, up to one-step
flips where float sums differ in the last bit (convs not followed by a quantizer then run in float
on the int8-stored weights). Linear layers and activation matmuls need no requantization: ``DQ →
MatMul`` becomes ``MatMulIntegerToFloat`` (or ``QLinearMatMul``). Biases of requantized convs are
int32 at scale ``s_x·s_w``.

The graph is translated node by node from the ATen graph (not re-traced), so export takes
seconds; shapes are recorded by running the module at two batch sizes, and the one
batch-dependent dimension of a reshape becomes ``-1`` (dynamic batch). Subgraphs that do not
depend on the input (position biases, index tables) are evaluated and stored as constants.

Invariants checked by ``tests/test_onnx_backend.py``: with every quantizer ``off`` the export
matches the float graph to 1e-5 (any batch size); with ``requantize="none"`` it matches the
fake-quant graph up to one-step flips where torch and ONNX Runtime round float sums that differ
in the last bits (SQNR bound); weights are int8 initializers behind per-channel
DequantizeLinear nodes, the file is ≤ 0.35x the FP32 one, and ONNX Runtime runs QLinearConv /
MatMulIntegerToFloat kernels; a conv behind a per-channel input quantizer (depthwise, or a 1x1
conv after outlier scaling) runs as QLinearConv and matches the fake-quant model to float
rounding (SQNR > 80 dB), and a requantization grid before a per-channel quantizer is kept only
when its measured added error is under the bound.
"""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import fx

from hyq_fx.lowering import (
    fold_tokens_with_pixel_shuffle,
    lower_for_export,
    unfold_maps_with_pixel_unshuffle,
)
from hyq_fx.quantize import deployed_meta, input_shape, quantizers_mode
from hyq_fx.quantizer import FakeQuantizer
from hyq_fx.token_layout import tokens_channels_last

from .onnx_file import INPUT_NAME, OUTPUT_NAME, write_model

aten = torch.ops.aten

__all__ = ["ExportError", "OnnxRunner", "export_artifact", "export_onnx_qdq", "onnx_node_counts"]

MIN_OPSET, MAX_OPSET = 17, 21
REQUANTIZE = ("auto", "exact", "none")
TOKEN_LAYOUTS = ("auto", "channels_first", "channels_last")
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators
FIT_IMAGES = 16  # images of ``calib`` used to fit requantization grids
MAX_ADDED_ERROR = 1.0  # default bound on the error a grid before a per-channel quantizer adds


class ExportError(ValueError):
    """The module cannot be written as ONNX; the message names the node and the fix."""


# --------------------------------------------------------------------------------------------
# quantizer parameters in ONNX terms


@dataclass(frozen=True)
class _QParams:
    """One quantizer in ONNX terms: container type, scale/zero-point arrays, clip range."""

    dtype: int  # TensorProto.UINT8 / INT8
    scale: np.ndarray  # float32, shape [] or [C]
    zero_point: np.ndarray  # container dtype, same shape
    qmin: int  # in container units
    qmax: int
    axis: int | None  # per-channel axis, or None

    @property
    def needs_clip(self) -> bool:
        lo, hi = (0, 255) if self.dtype == TensorProto.UINT8 else (-128, 127)
        return (self.qmin, self.qmax) != (lo, hi)


def _qparams(fq: FakeQuantizer, where: str, *, as_weight: bool) -> _QParams:
    spec = fq.spec
    if spec.bits > 8:
        raise ExportError(
            f"{where}: {spec.describe()} quantizer: the ONNX QDQ backend writes 8-bit "
            "containers only; re-quantize with at most 8 bits for this tensor"
        )
    scale = fq.scale.detach().float().reshape(-1).numpy().astype(np.float32)
    zp = np.rint(fq.zero_point.detach().float().reshape(-1).numpy()).astype(np.int64)
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric and not as_weight:  # same grid, uint8 container: q_u8 = q + 128
        zp, qmin, qmax = zp + 128, qmin + 128, qmax + 128
    unsigned = qmin >= 0
    dtype = TensorProto.UINT8 if unsigned else TensorProto.INT8
    np_dtype = np.uint8 if unsigned else np.int8
    per_channel = spec.per_channel and scale.size > 1
    if not per_channel:
        scale, zp = scale[:1].reshape(()), zp[:1].reshape(())
    return _QParams(
        dtype, scale, zp.astype(np_dtype), qmin, qmax, spec.axis if per_channel else None
    )


def _quantize_weight(w: torch.Tensor, fq: FakeQuantizer, qp: _QParams) -> np.ndarray:
    """``clamp(round(W/s) + z, qmin, qmax)`` as the container dtype, like ``fake_quantize``."""
    spec = fq.spec
    scale, zp = fq.scale.detach().float(), fq.zero_point.detach().float()
    if spec.per_channel and scale.numel() > 1:
        shape = [1] * w.dim()
        shape[spec.axis % w.dim()] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    else:
        scale, zp = scale.reshape(()), zp.reshape(())
    q = torch.clamp(torch.round(w.detach().float() / scale) + zp, spec.qmin, spec.qmax)
    return q.numpy().astype(qp.zero_point.dtype)


# --------------------------------------------------------------------------------------------
# activations, for requantization of conv outputs


_SMOOTH_ACTS: dict[Any, Callable[[torch.Tensor], torch.Tensor]] = {
    aten.silu.default: F.silu,
    aten.gelu.default: F.gelu,
    aten.hardswish.default: F.hardswish,
}
_EXACT_ACTS = {aten.relu.default}
_CONVS = {aten.conv2d.default, aten.conv1d.default}
_RESIDUAL = "residual"  # a conv output added to a residual on its way to a quantizer
_MOVES = {
    aten.reshape.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.flatten.using_ints,
    aten.cat.default,
    aten.contiguous.default,
    aten.clone.default,
}


def _preimage(f: Callable[[torch.Tensor], torch.Tensor], target: float) -> float:
    """The ``y ≥ 0`` with ``f(y) = target`` (``f`` increasing there), by bisection."""
    lo, hi = 0.0, max(target, 1.0) * 2 + 8.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(f(torch.tensor(mid, dtype=torch.float64))) < target:
            lo = mid
        else:
            hi = mid
    return hi


def _grid(v: torch.Tensor, scale: float, zp: float, qmin: int, qmax: int) -> torch.Tensor:
    return (torch.clamp(torch.round(v / scale) + zp, qmin, qmax) - zp) * scale


def _requant_range(
    f: Callable[[torch.Tensor], torch.Tensor], qn: _QParams, y: torch.Tensor | None
) -> tuple[float, float]:
    """The uint8 grid ``[a, t]`` for a conv output ``y`` that goes through ``f`` into ``Q_n``.

    ``t = f⁻¹(hi)`` (above it ``Q_n`` saturates anyway). ``a`` minimises
    ``E[(Q_n(f(ŷ)) − Q_n(f(y)))²]`` over the sample ``y`` (the conv output on calibration
    images; 48 candidates), ``ŷ`` the requantized value; without a sample, ``a = −L`` where
    ``|f(−L)|`` is half a step of ``Q_n``.
    """
    s_n, z_n = float(qn.scale), float(qn.zero_point)
    hi = (qn.qmax - z_n) * s_n
    top = _preimage(f, hi) if hi > 0 else 1e-6
    if y is None or y.numel() == 0:
        neg = 0.25
        while neg < 32 and abs(float(f(torch.tensor(-neg, dtype=torch.float64)))) > s_n / 2:
            neg += 0.25
        return -neg, top
    y = y.detach().flatten().double()
    if y.numel() > 1 << 14:
        y = y[:: y.numel() // (1 << 14) + 1].contiguous()
    ref = _grid(f(y), s_n, z_n, qn.qmin, qn.qmax)
    floor = min(float(y.min()), -top / 254)
    a = torch.linspace(floor, -top / 254, 48, dtype=torch.float64)[:, None]  # candidates
    scale = (top - a) / 255.0
    zp = torch.clamp(torch.round(-a / scale), 0, 255)
    y_hat = (torch.clamp(torch.round(y / scale) + zp, 0, 255) - zp) * scale
    err = (_grid(f(y_hat), s_n, z_n, qn.qmin, qn.qmax) - ref).pow(2).mean(dim=1)
    return float(a[int(err.argmin())]), top


def _requant_range_per_channel(
    f: Callable[[torch.Tensor], torch.Tensor], qn: _QParams, y: torch.Tensor
) -> tuple[_QParams, float]:
    """The uint8 grid for a conv output ``y`` [N, C, H, W] that goes through ``f`` into a
    per-channel quantizer ``Q_n`` (scales ``s_c``, zero points ``z_c`` on axis 1), and the error
    it adds: ``E[(Q_n(f(ŷ)) − Q_n(f(y)))²] / E[(Q_n(f(y)) − f(y))²]``.

    One uint8 grid serves every channel, so where the channels' ranges differ a lot it is
    coarser than the finest channel's own grid; the caller requantizes only where the added
    error is small (``max_added_error``). The grid ``[a, t]`` is searched over ``t`` (the
    widest channel's ``f⁻¹(hi_c)``, or clipped to a fraction of it) and ``a`` (16 candidates
    between the smallest sample and 0) on at most 2048 samples per channel.
    """
    n_ch = y.shape[1]
    y = y.detach().double().transpose(0, 1).reshape(n_ch, -1)
    y = y[:, :: max(1, y.shape[1] // 2048)][:, :2048]
    scale = torch.as_tensor(qn.scale, dtype=torch.float64).reshape(n_ch, 1)
    zp = torch.as_tensor(qn.zero_point.astype(np.float64)).reshape(n_ch, 1)
    ref = _grid(f(y), scale, zp, qn.qmin, qn.qmax)
    own = float((ref - f(y)).pow(2).mean()) + 1e-30
    hi = float(((qn.qmax - zp) * scale).max())
    top_max = _preimage(f, hi) if hi > 0 else 1e-6
    best = (math.inf, -top_max / 254, top_max)
    for top in top_max * np.array([1.0, 0.7, 0.5, 0.35]):
        a = torch.linspace(min(float(y.min()), -top / 254), -top / 254, 16, dtype=torch.float64)
        for lo in a.tolist():
            step = (top - lo) / 255.0
            z = min(max(round(-lo / step), 0), 255)
            y_hat = (torch.clamp(torch.round(y / step) + z, 0, 255) - z) * step
            err = float((_grid(f(y_hat), scale, zp, qn.qmin, qn.qmax) - ref).pow(2).mean())
            if err < best[0]:
                best = (err, lo, float(top))
    return _uint8_grid(best[1], best[2]), best[0] / own


def _residual_grid(qt: _QParams, y: torch.Tensor, r: torch.Tensor) -> tuple[_QParams, float]:
    """The uint8 grid for a conv output ``y`` that is added to a residual ``r`` before the
    per-tensor quantizer ``Q_t``, and the error it adds.

    The grid ``[a, b]`` minimises the error of the sum's codes against the float sum,
    ``E[(Q_t(ŷ + r) − (y + r))²]``, over clipped ranges of the sample (``a = f·min y``,
    ``b = g·max y`` for 5 × 5 fractions), ``ŷ`` the requantized output. The added error is how
    much that exceeds ``Q_t``'s own ``E[(Q_t(y + r) − (y + r))²]``, as a fraction of it (about
    ``(s_y / s_t)²`` for uniform rounding). Counting the codes that flip instead,
    ``E[(Q_t(ŷ + r) − Q_t(y + r))²]``, would charge ``≈ 3 s_y / s_t`` for an error that
    averages out.
    """
    y, r = y.detach().double().flatten(), r.detach().double().flatten()
    if y.numel() > 1 << 14:
        step = y.numel() // (1 << 14) + 1
        y, r = y[::step].contiguous(), r[::step].contiguous()
    s_t, z_t = float(qt.scale), float(qt.zero_point)
    own = float((_grid(y + r, s_t, z_t, qt.qmin, qt.qmax) - (y + r)).pow(2).mean()) + 1e-30
    lo, hi = min(float(y.min()), 0.0), max(float(y.max()), 1e-6)
    best = (math.inf, lo, hi)
    for f in (1.0, 0.8, 0.6, 0.45, 0.3):
        for g in (1.0, 0.8, 0.6, 0.45, 0.3):
            grid = _uint8_grid(f * lo, g * hi)
            y_hat = _grid(y, float(grid.scale), float(grid.zero_point), 0, 255)
            err = float((_grid(y_hat + r, s_t, z_t, qt.qmin, qt.qmax) - (y + r)).pow(2).mean())
            if err < best[0]:
                best = (err, f * lo, g * hi)
    return _uint8_grid(best[1], best[2]), max(best[0] / own - 1.0, 0.0)


def _shared_scale_and_zero(scale: np.ndarray, zero: np.ndarray) -> tuple[float, int]:
    """One ``(s̄, z̄)`` to read per-channel codes through: the geometric mean of the scales and
    the median zero point (any choice is exact once ``s_c/s̄`` and ``z_c − z̄`` are compensated;
    these keep the ratios near 1 and the compensated offsets small)."""
    s_bar = float(np.exp(np.log(scale.astype(np.float64)).mean()))
    return s_bar, int(np.median(zero.astype(np.int64)))


def _uint8_grid(lo: float, hi: float) -> _QParams:
    """The asymmetric uint8 grid spanning ``[lo, hi]``."""
    scale = max((hi - lo) / 255.0, 1e-12)
    zp = int(np.clip(np.rint(-lo / scale), 0, 255))
    return _QParams(
        TensorProto.UINT8, np.asarray(scale, np.float32), np.asarray(zp, np.uint8), 0, 255, None
    )


# --------------------------------------------------------------------------------------------
# the ONNX graph under construction


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


_ONNX_MOVES = {"Reshape", "Transpose", "DepthToSpace", "SpaceToDepth", "Squeeze", "Unsqueeze"}


def _per_tensor(b: _Builder, node: onnx.NodeProto) -> bool:
    """Whether a Q/DQ node is per-tensor: no ``axis``, its scale (and zero point, if given)
    scalar initializers."""
    return not any(a.name == "axis" for a in node.attribute) and all(
        b.inits.get(i) is not None and not b.inits[i].dims for i in node.input[1:3]
    )


def _fold_scalar_mul_into_quantize(b: _Builder) -> int:
    """``QuantizeLinear(x · c; s, z)`` with a constant scalar ``c > 0`` (the only use of the
    product) becomes ``QuantizeLinear(x; s / c, z)``: the same codes (up to the float rounding
    of a tie), one pass less, and the quantizer can then move before the data movement that
    made ``x`` (attention's ``q · d^-½`` after the head split). Returns the number folded."""
    producer, users = b.links()
    n_users = {name: len(nodes) for name, nodes in users.items()}

    def scalar(name: str) -> float | None:
        t = b.inits.get(name)
        if t is None or t.data_type != TensorProto.FLOAT or np.prod(t.dims, dtype=np.int64) != 1:
            return None
        return float(numpy_helper.to_array(t).reshape(()))

    dropped: set[int] = set()
    for q in b.nodes:
        if q.op_type != "QuantizeLinear" or len(q.input) < 2 or not _per_tensor(b, q):
            continue
        mul = producer.get(q.input[0])
        if mul is None or mul.op_type != "Mul" or n_users.get(q.input[0]) != 1:
            continue
        s_q = scalar(q.input[1])
        for k in (0, 1):
            c = scalar(mul.input[1 - k])
            if c is not None and c > 0 and s_q is not None:
                q.input[0] = mul.input[k]
                q.input[1] = b.init(np.float32(s_q / c), f"{q.name}_scale")
                dropped.add(id(mul))
                break
    b.nodes = [n for n in b.nodes if id(n) not in dropped]
    return len(dropped)


def _quantize_before_moves(b: _Builder) -> int:
    """``x → [Reshape | Transpose | DepthToSpace | …]* → QuantizeLinear(s, z)`` (per-tensor,
    each op the only user of its input) becomes ``x → QuantizeLinear(s, z) → [the same ops]``:
    exact, since a per-tensor quantizer commutes with data movement, and the moves then run on
    uint8 codes (a quarter of the bytes). ONNX Runtime 1.32 does not move the Q itself; on
    mobilevit_xxs at batch 32 the token folds (``permute``, ``DepthToSpace``) before each
    ``conv_fusion`` input and the attention's head split of ``q`` took 2.7 ms of a 45 ms run in
    float, about a quarter of that on codes. Not every move is cheaper on uint8: ORT's uint8
    Transpose of MobileViT's *unfold* (``[16384, 8, 2, 2]``, inner dimension 2) took 11.8 ms
    against 0.2 ms in float; the unfold feeds LayerNorm, which has no quantizer, so no Q moves
    before it here. Returns the number of quantizers moved."""
    producer, users = b.links()
    n_users = {name: len(nodes) for name, nodes in users.items()}
    moved: dict[int, onnx.NodeProto] = {}  # first move of a chain → the Q to put before it
    dropped: set[int] = set()
    for q in b.nodes:
        if q.op_type != "QuantizeLinear" or len(q.input) < 3 or not _per_tensor(b, q):
            continue
        chain, value = [], q.input[0]
        while (
            (p := producer.get(value)) is not None
            and p.op_type in _ONNX_MOVES
            and p.domain == ""
            and n_users.get(value) == 1
            and len(p.output) == 1
        ):
            chain.append(p)
            value = p.input[0]
        if not chain:
            continue
        codes = b.fresh(f"{q.name}_early")
        moved[id(chain[-1])] = helper.make_node(
            "QuantizeLinear", [value, *q.input[1:3]], [codes], name=b.fresh(q.name)
        )
        chain[-1].input[0] = codes
        chain[0].output[0] = q.output[0]
        dropped.add(id(q))
    b.nodes = [
        new
        for node in b.nodes
        if id(node) not in dropped
        for new in ([moved[id(node)], node] if id(node) in moved else [node])
    ]
    return len(moved)


def _matmul_bias_in_int8(b: _Builder) -> int:
    """``Add(MatMul(DQ(a), DQ(w)), bias)`` (``a`` per-tensor codes, ``w`` int8 weights per
    tensor or per output column, ``bias`` a constant vector, the Add the product's only user)
    becomes ``com.microsoft.MatMulIntegerToFloat(a, w, s_a, s_w, z_a, z_w, bias)``: the same
    integer product, with the bias added in the kernel's epilogue. ONNX Runtime 1.32 makes
    that kernel from ``DQ → MatMul`` itself but leaves the Add as a separate pass over the
    float output (37 of them on mobilevit_xxs: the transformer's linears); fused, the batch-32
    int8 run took 37.7 instead of 39.9 ms. Returns the number fused."""
    producer, users = b.links()
    replaced: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    for mm in b.nodes:
        if mm.op_type != "MatMul" or mm.domain:
            continue
        dq_a, dq_w = (producer.get(i) for i in mm.input)
        after = users.get(mm.output[0], [])
        if not (dq_a and dq_w and len(after) == 1 and after[0].op_type == "Add"):
            continue
        if dq_a.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        (add,) = after
        bias = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
        w = b.inits.get(dq_w.input[0])
        if w is None or w.data_type != TensorProto.INT8 or len(w.dims) != 2:
            continue
        if bias not in b.inits or list(b.inits[bias].dims) != [w.dims[1]]:
            continue
        axis = [a.i for a in dq_w.attribute if a.name == "axis"]
        if not _per_tensor(b, dq_a) or not (axis in ([1], [-1]) or _per_tensor(b, dq_w)):
            continue
        zeros = [dq.input[2] if len(dq.input) > 2 else "" for dq in (dq_a, dq_w)]
        replaced[id(add)] = helper.make_node(
            "MatMulIntegerToFloat",
            [dq_a.input[0], dq_w.input[0], dq_a.input[1], dq_w.input[1], *zeros, bias],
            [add.output[0]], name=b.fresh(f"{mm.name}_bias"), domain=MS_DOMAIN,
        )  # fmt: skip
        dropped.add(id(mm))
    b.nodes = [replaced.get(id(n), n) for n in b.nodes if id(n) not in dropped]
    return len(replaced)


def _silu_in_uint8(b: _Builder) -> int:
    """``DQ(s₁, z₁) → QuickGelu → Q(s₂, z₂)`` on uint8 codes becomes
    ``QLinearMul(q, QLinearSigmoid(q; 1/255, 0); s₂, z₂)`` (com.microsoft, uint8 in and out):
    ``y = Q₂(x · Q_σ(σ(x)))`` with ``x = s₁(q − z₁)`` and ``σ`` on the grid ``k/255``, an extra
    rounding of at most ``|x|/510``. ONNX Runtime 1.32 ran the float form 2–3x slower than
    the same QuickGelu in the FP32 model (mobilevitv2_050, batch 32: 36.9 vs 12.4 ms for 25);
    the uint8 pair took 8.8 + 8.1 ms and removes a DequantizeLinear and a QuantizeLinear each.
    Returns the number rewritten."""
    producer, users = b.links()

    def scalar_qparams(node: onnx.NodeProto) -> bool:
        return (
            len(node.input) >= 3 and _per_tensor(b, node)
            and b.inits[node.input[2]].data_type == TensorProto.UINT8
        )  # fmt: skip

    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    for gelu in b.nodes:
        if gelu.op_type != "QuickGelu":
            continue
        dq = producer.get(gelu.input[0])
        after = users.get(gelu.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(after) != 1:
            continue
        (q,) = after
        if q.op_type != "QuantizeLinear" or not (scalar_qparams(dq) and scalar_qparams(q)):
            continue
        s_sig, z_sig = b.const(1.0 / 255.0), b.const(0, np.uint8)
        sig = b.fresh(f"{gelu.name}_sigmoid")
        replaced[id(gelu)] = [
            helper.make_node(
                "QLinearSigmoid", [*dq.input[:3], s_sig, z_sig], [sig],
                name=b.fresh(f"{gelu.name}_QLinearSigmoid"), domain=MS_DOMAIN,
            ),
            helper.make_node(
                "QLinearMul", [*dq.input[:3], sig, s_sig, z_sig, *q.input[1:3]], [q.output[0]],
                name=b.fresh(f"{gelu.name}_QLinearMul"), domain=MS_DOMAIN,
            ),
        ]  # fmt: skip
        dropped.add(id(q))
    b.nodes = [
        new for node in b.nodes if id(node) not in dropped for new in replaced.get(id(node), [node])
    ]
    return len(replaced)


# --------------------------------------------------------------------------------------------
# shapes: run the module at two batch sizes; dims that differ are batch-dependent


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


# --------------------------------------------------------------------------------------------
# the translator


def _is_fq(gm: fx.GraphModule, n: Any) -> bool:
    return (
        isinstance(n, fx.Node)
        and n.op == "call_module"
        and isinstance(gm.get_submodule(n.target), FakeQuantizer)
    )


def _where(n: fx.Node) -> str:
    path = n.meta.get("hyq_module_path") or ""
    return f"node {n.name!r}" + (f" (module {path})" if path else "")


class _Translator:
    def __init__(
        self,
        gm: fx.GraphModule,
        shapes: dict,
        consts: dict,
        b: _Builder,
        *,
        requantize: str,
        ort_contrib_ops: bool = False,
        max_added_error: float = MAX_ADDED_ERROR,
    ) -> None:
        self.gm, self.shapes, self.consts, self.b = gm, shapes, consts, b
        self.requantize = requantize
        self.max_added_error = max_added_error
        self.ort_contrib_ops = ort_contrib_ops
        self.contrib_used = False  # a com.microsoft op was emitted: the model must import it
        self.samples: dict[fx.Node, torch.Tensor] = {}  # conv outputs, to fit requant grids
        # add → (requantized conv, residual, where the residual's codes are)
        self.residual_adds: dict[fx.Node, tuple[fx.Node, fx.Node, fx.Node]] = {}
        self.env: dict[fx.Node, Any] = {}
        self.weight_q: dict[fx.Node, tuple[np.ndarray, _QParams]] = {}
        self._weights: dict[tuple[fx.Node, bool], str] = {}  # each weight is stored once
        self.act_q: dict[str, _QParams] = {}  # DQ output name → its quantizer
        self.act_pc: dict[str, tuple[str, _QParams]] = {}  # per-axis-1 DQ → (float input, Q)
        self.report: dict[str, Any] = {"requantized": [], "float_convs": [], "channel_folded": []}

    # ---- helpers
    def fq(self, n: fx.Node) -> FakeQuantizer:
        return self.gm.get_submodule(n.target)

    def shape(self, n: fx.Node) -> tuple:
        s = self.shapes.get(n)
        if not isinstance(s, tuple):
            raise ExportError(f"{_where(n)}: expected a tensor, found {type(s).__name__}")
        return s

    def rank(self, n: Any) -> int:
        return len(self.shape(n))

    def v(self, a: Any) -> str:
        """The ONNX value of an argument (a node, or a Python number as a constant)."""
        if isinstance(a, fx.Node):
            if a in self.weight_q:
                return self.weight(a)
            if a not in self.env:
                self.env[a] = self.materialize(a)
            out = self.env[a]
            if out is None or isinstance(out, list):
                raise ExportError(f"{_where(a)} is not a single tensor in the ONNX graph")
            return out
        if isinstance(a, bool):
            return self.b.const(a, np.bool_)
        if isinstance(a, (int, float)):
            return self.b.const(a)
        raise ExportError(f"cannot use {a!r} ({type(a).__name__}) as a tensor input")

    def target_shape(self, n: fx.Node, args_shape: Any = None) -> str:
        """Shape input of a Reshape: static dims, and ``-1`` for the one dynamic dim."""
        shape = self.shape(n)
        if sum(d is None for d in shape) <= 1:
            return self.b.ints([-1 if d is None else d for d in shape])
        if args_shape is None:
            raise ExportError(f"{_where(n)}: more than one batch-dependent dim in {shape}")
        return self.sym_shape(args_shape)

    def sym_shape(self, items: Sequence[Any]) -> str:
        parts = [self.sym(x) if isinstance(x, fx.Node) else self.b.ints([x]) for x in items]
        return self.b.op("Concat", parts, "shape", axis=0)

    def sym(self, n: fx.Node) -> str:
        """A symbolic int (sym_size and Python arithmetic on it) as an int64 [1] tensor."""
        if n in self.env and isinstance(self.env[n], str):
            return self.env[n]
        if n.target is aten.sym_size.int:
            shape = self.b.op("Shape", [self.v(n.args[0])], "shape")
            out = self.b.op("Gather", [shape, self.b.ints([n.args[1]])], n.name, axis=0)
        elif n.target in (operator.mul, operator.add, operator.sub, operator.floordiv):
            ops = {
                operator.mul: "Mul",
                operator.add: "Add",
                operator.sub: "Sub",
                operator.floordiv: "Div",
            }
            a, c = (self.sym(x) if isinstance(x, fx.Node) else self.b.ints([x]) for x in n.args)
            out = self.b.op(ops[n.target], [a, c], n.name)
        else:
            raise ExportError(f"{_where(n)}: unsupported symbolic-int op {n.target}")
        self.env[n] = out
        return out

    # ---- quantizers
    def quantize_activation(self, n: fx.Node, x: str) -> str:
        fq = self.fq(n)
        if fq.mode == "off":
            return x
        if fq.mode != "quantize" or not fq.calibrated:
            raise ExportError(
                f"{_where(n)}: quantizer {n.target} is in mode {fq.mode!r} "
                f"(calibrated={fq.calibrated}); calibrate it (the 'calibrate' pass) before export"
            )
        qp = _qparams(fq, _where(n), as_weight=False)
        rank = self.rank(n.args[0])
        axis = None if qp.axis is None else qp.axis % rank
        return self.qdq(x, qp, n.name, axis, rank)

    def codes(self, x: str, qp: _QParams, base: str, axis: int | None = None, rank: int = 4):
        """``Clip(QuantizeLinear(x, s, z[, axis]))``: the integer codes of ``x``.

        A per-channel quantization is written as ``QuantizeLinear(x·(s̄/s_c) + (z_c − z̄)·s̄,
        s̄, z̄)``, the same codes (``round(x/s_c + z_c − z̄) + z̄``, ``z_c − z̄`` an integer)
        with a per-tensor Q, for two reasons found in ONNX Runtime 1.32. A per-axis Q right
        after an op that it fuses with its output Q (a quantized Conv / MatMul / Add...)
        became, say, a QLinearConv with a per-channel output zero point, accepted when the
        graph was optimised and rejected when it ran. And where its NHWC layout transformer
        moves a per-axis Q to ``axis=3``, that Q took 125 ms of a 325 ms batch-32
        mobilevit_xxs run (the same Q at ``axis=1``: 1 ms).
        """
        dtype = qp.zero_point.dtype
        if axis is not None:
            shape = [-1] + [1] * (rank - 1 - axis)
            sigma = qp.scale.astype(np.float64)
            z = qp.zero_point.astype(np.int64)
            s_bar, z_bar = _shared_scale_and_zero(sigma, z)
            ratio = (s_bar / sigma).astype(np.float32).reshape(shape)
            shift = ((z - z_bar) * s_bar).astype(np.float32).reshape(shape)
            if np.any(ratio != 1):
                x = self.b.op("Mul", [x, self.b.init(ratio, f"{base}_ratio")], f"{base}_rescale")
            if np.any(shift != 0):
                x = self.b.op("Add", [x, self.b.init(shift, f"{base}_shift")], f"{base}_shift")
            s, z_ = self.b.const(np.float32(s_bar)), self.b.const(z_bar, dtype)
            q = self.b.op("QuantizeLinear", [x, s, z_], f"{base}_q")
        else:
            s, z_ = self.b.const(qp.scale), self.b.const(qp.zero_point, dtype)
            q = self.b.op("QuantizeLinear", [x, s, z_], f"{base}_q")
        if qp.needs_clip:
            lo, hi = self.b.const(qp.qmin, dtype), self.b.const(qp.qmax, dtype)
            q = self.b.op("Clip", [q, lo, hi], f"{base}_clip")
        return q

    def qdq(self, x: str, qp: _QParams, base: str, axis: int | None = None, rank: int = 4) -> str:
        s = self.b.const(qp.scale)
        z = self.b.const(qp.zero_point, qp.zero_point.dtype)
        kw = {} if axis is None else {"axis": axis}
        q = self.codes(x, qp, base, axis, rank)
        out = self.b.op("DequantizeLinear", [q, s, z], f"{base}_dq", **kw)
        if axis is None:
            self.act_q[out] = qp
        elif axis == 1:
            self.act_pc[out] = (x, qp)
        return out

    def weight(self, n: fx.Node, *, transpose: bool = False) -> str:
        """A weight input: ``DQ(int8 initializer)`` if quantized, else a float initializer."""
        if (n, transpose) in self._weights:
            return self._weights[(n, transpose)]
        if n in self.weight_q:
            q, qp = self.weight_q[n]
            axis = qp.axis
            if transpose:
                if q.ndim != 2:
                    raise ExportError(f"{_where(n)}: linear weight of rank {q.ndim}")
                q = q.T
                axis = None if axis is None else 1 - axis % 2
            out = self.weight_dq(n, q, qp.scale, qp.zero_point, axis)
        else:
            out = self.v(n)
            if transpose:
                out = self.b.op("Transpose", [out], f"{n.name}_t", perm=[1, 0])
        self._weights[(n, transpose)] = out
        return out

    def weight_dq(
        self, n: fx.Node, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int | None
    ) -> str:
        """``DequantizeLinear`` of the int8 initializer ``q`` of weight quantizer node ``n``."""
        src = n.args[0].name
        inputs = [
            self.b.init(q, f"{src}_q"),
            self.b.init(scale, f"{src}_scale"),
            self.b.init(zero, f"{src}_zp"),
        ]
        kw = {} if axis is None else {"axis": axis}
        return self.b.op("DequantizeLinear", inputs, f"{n.name}_dq", **kw)

    def requant_params(self, conv: fx.Node) -> tuple[_QParams, str] | None:
        """``(s_y, z_y)`` for a conv output that reaches a per-tensor quantizer, or None.

        The path conv → [activation] → [data movement]* → quantizer must be the only use of
        each tensor on it ("exact"); ``"auto"`` also accepts side uses (a residual branch then
        sees the requantized value) and smooth activations (a derived grid).
        """
        path = self._requant_path(conv)
        if path is None:
            return None
        strict = self.requantize == "exact"
        act, target = path
        fq = self.fq(target)
        if fq.mode != "quantize" or fq.spec.bits > 8:
            return None
        qp = _qparams(fq, _where(target), as_weight=False)
        if qp.dtype != TensorProto.UINT8:
            return None
        if act is _RESIDUAL:
            add = next(iter(conv.users))
            residual = self._residual(add, conv)
            y, r = self.samples.get(conv), self.samples.get(residual)
            if qp.axis is not None or residual is None or y is None or r is None:
                return None
            source = self._residual_codes(residual)
            if source is None:
                return None
            grid, added = _residual_grid(qp, y, r)
            if added > self.max_added_error:
                return None
            self.residual_adds[add] = (conv, residual, source)
            why = f"uint8 grid + residual {residual.name} for {target.target}: +{added:.0%} error"
            return grid, why
        if qp.axis is not None:  # per-channel target: one uint8 grid can only approximate it
            y = self.samples.get(conv)
            if strict or y is None or y.dim() != 4 or qp.axis % 4 != 1:
                return None
            f = _SMOOTH_ACTS.get(act, torch.relu if act in _EXACT_ACTS else (lambda v: v))
            grid, added = _requant_range_per_channel(f, qp, y)
            if added > self.max_added_error:
                return None
            return grid, f"uint8 grid for per-channel {target.target}: +{added:.0%} error"
        if act is None or act in _EXACT_ACTS:
            why = f"grid of {target.target}" + (f" through {act.__name__}" if act else "")
            return _QParams(qp.dtype, qp.scale, qp.zero_point, 0, 255, None), why
        if strict:
            return None
        y_lo, y_hi = _requant_range(_SMOOTH_ACTS[act], qp, self.samples.get(conv))
        why = f"{act.__name__} range [{y_lo:.3g}, {y_hi:.3g}] for {target.target}"
        return _uint8_grid(y_lo, y_hi), why

    def _requant_path(self, conv: fx.Node) -> tuple[Any, fx.Node] | None:
        """``(activation or None, quantizer node)`` that the conv output reaches, or None."""
        if self.requantize == "none":
            return None
        users = list(conv.users)
        act = None
        if (
            len(users) == 1
            and users[0].op == "call_function"
            and (users[0].target in _SMOOTH_ACTS or users[0].target in _EXACT_ACTS)
        ):
            act, users = users[0].target, list(users[0].users)
        elif self.requantize == "auto" and len(users) == 1 and self._residual(users[0], conv):
            act, users = _RESIDUAL, list(users[0].users)
        target = self._find_quantizer(users, self.requantize == "exact")
        return None if target is None else (act, target)

    def _residual(self, add: fx.Node, conv: fx.Node) -> fx.Node | None:
        """The other input of ``add`` if it is ``conv + r`` (or ``r + conv``) of one shape."""
        if add.target is not aten.add.Tensor or add.kwargs.get("alpha", 1) != 1:
            return None
        a, c = add.args[:2]
        other = c if a is conv else a if c is conv else None
        if not isinstance(other, fx.Node) or other is conv:
            return None
        return other if self.shapes.get(other) == self.shapes.get(conv) else None

    def _residual_codes(self, r: fx.Node) -> fx.Node | None:
        """Where the residual ``r`` is (or can be read as) per-tensor uint8 codes: ``r`` itself
        when its ONNX value is a requantized conv output or a DequantizeLinear, or a per-tensor
        quantizer that ``r`` also feeds (the residual then sees that quantizer's value, as a
        side use of a requantized conv does)."""
        if r in self.env and self.env[r] in self.act_q:
            return r
        return next((u for u in r.users if self.uint8_grid(u) is not None), None)

    def uint8_grid(self, n: fx.Node) -> _QParams | None:
        """The qparams of ``n`` if it is a calibrated per-tensor uint8 activation quantizer."""
        if not _is_fq(self.gm, n):
            return None
        fq = self.fq(n)
        if fq.mode != "quantize" or not fq.calibrated or fq.spec.bits > 8:
            return None
        qp = _qparams(fq, _where(n), as_weight=False)
        return qp if qp.axis is None and qp.dtype == TensorProto.UINT8 else None

    def residual_value(self, add: fx.Node) -> str:
        """The residual input of a requantized ``conv + r``: per-tensor uint8 codes, read."""
        _, r, source = self.residual_adds[add]
        if source is r:
            return self.v(r)
        if source not in self.env:  # the quantizer is emitted here, before its turn
            self.env[source] = self.quantize_activation(source, self.v(source.args[0]))
        return self.env[source]

    def sample_nodes(self, conv: fx.Node) -> set[fx.Node]:
        """The values a conv's requantization grid is fitted on (calibration outputs): its
        output, and a residual added to it; none if its grid is not fitted."""
        path = self._requant_path(conv)
        if path is None:
            return set()
        act, target = path
        if act is _RESIDUAL:
            return {conv, self._residual(next(iter(conv.users)), conv)}
        return {conv} if act in _SMOOTH_ACTS or self.fq(target).spec.per_channel else set()

    def _find_quantizer(self, users: list[fx.Node], strict: bool) -> fx.Node | None:
        for _ in range(16):
            if strict and len(users) != 1:
                return None
            fqs = [u for u in users if _is_fq(self.gm, u)]
            if fqs:
                return fqs[0]
            moves = [u for u in users if u.op == "call_function" and u.target in _MOVES]
            if len(moves) != 1:
                return None
            users = list(moves[0].users)
        return None

    # ---- main loop
    def run(self) -> list[str]:
        outputs: list[str] = []
        for n in self.gm.graph.nodes:
            if n.op == "placeholder" or (n in self.env and n.op != "output"):
                continue  # the input (set by the caller), or emitted with an earlier node
            if n.op == "output":
                outs = n.args[0] if isinstance(n.args[0], (tuple, list)) else [n.args[0]]
                outputs = [self.v(o) for o in outs]
                continue
            if n.op == "get_attr" or n in self.consts:
                continue  # emitted where used (weights under a quantizer are stored as int8)
            if _is_fq(self.gm, n):
                src = n.args[0]
                if src.op == "get_attr" or src in self.consts:
                    self.weight_fq(n, src)
                else:
                    self.env[n] = self.quantize_activation(n, self.v(src))
                continue
            if n.op != "call_function":
                raise ExportError(f"{_where(n)}: cannot export {n.op} {n.target!r}")
            handler = _HANDLERS.get(n.target)
            if handler is None:
                if n.target in _SYM_OPS:
                    continue  # translated lazily, where a shape needs it
                raise ExportError(
                    f"{_where(n)}: no ONNX translation for {n.target}; supported ops are "
                    f"listed in hyq_fx.backends.onnx_qdq._HANDLERS (add one there)"
                )
            out = handler(self, n, *n.args, **n.kwargs)
            if n not in self.env:
                self.env[n] = out
        return outputs

    def materialize(self, n: fx.Node) -> Any:
        """A parameter, or a subgraph that does not depend on the input, as initializers."""
        if n.op == "get_attr":
            return self.b.init(getattr_path(self.gm, n.target).detach().numpy(), n.target)
        if n not in self.consts:
            raise ExportError(f"{_where(n)} has no ONNX value (it is used before defined)")
        value = self.consts[n]
        if isinstance(value, torch.Tensor):
            array = value.detach().cpu().numpy()
            small = _broadcast_source(array)
            if small is None:
                return self.b.init(array, f"{n.name}_const")
            source = self.b.init(small, f"{n.name}_const")
            return self.b.op("Expand", [source, self.b.ints(array.shape)], f"{n.name}_expand")
        if isinstance(value, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in value):
            return [
                self.b.init(t.detach().cpu().numpy(), f"{n.name}_{i}") for i, t in enumerate(value)
            ]
        return None

    def weight_fq(self, n: fx.Node, src: fx.Node) -> None:
        fq = self.fq(n)
        w = self.consts.get(src)
        if w is None:
            w = getattr_path(self.gm, src.target)
        if fq.mode == "off":
            self.env[n] = self.b.init(w.detach().numpy(), src.name)
            return
        if fq.mode != "quantize" or not fq.calibrated:
            raise ExportError(f"{_where(n)}: weight quantizer {n.target} is not calibrated")
        qp = _qparams(fq, _where(n), as_weight=True)
        self.weight_q[n] = (_quantize_weight(w, fq, qp), qp)
        self.env[n] = None  # emitted by the consumer, which picks the layout (see weight())


def _int8_weights(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` computes with quantized weights (a weight quantizer that is on)."""
    return any(
        isinstance(m, FakeQuantizer) and m.role == "weight" and m.mode == "quantize"
        for m in gm.modules()
    )


def _broadcast_source(array: np.ndarray, min_size: int = 1024) -> np.ndarray | None:
    """The smallest array that broadcasts to ``array`` (size 1 along every axis it is constant
    on), if ``array`` is large and that saves space: such constants (a per-channel norm affine
    expanded over a token grid) are stored small and expanded when the model loads."""
    if array.size < min_size or array.ndim == 0:
        return None
    small = array
    for axis in range(array.ndim):
        first = np.take(small, [0], axis=axis)
        if small.shape[axis] > 1 and np.array_equal(small, np.broadcast_to(first, small.shape)):
            small = first
    return small if small.size < array.size else None


def getattr_path(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, torch.Tensor):
        raise ExportError(f"get_attr {target!r} is a {type(obj).__name__}, not a tensor")
    return obj


# --------------------------------------------------------------------------------------------
# op handlers: (translator, node, *args, **kwargs) -> ONNX value name(s)

_HANDLERS: dict[Any, Callable[..., Any]] = {}
_SYM_OPS = {aten.sym_size.int, operator.mul, operator.add, operator.sub, operator.floordiv}


def _handles(*targets: Any) -> Callable:
    def deco(fn: Callable) -> Callable:
        for t in targets:
            _HANDLERS[t] = fn
        return fn

    return deco


def _pair(v: Any) -> list[int]:
    return list(v) * 2 if len(v) == 2 else [v[0]] * 4 if len(v) == 1 else list(v)


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


# --------------------------------------------------------------------------------------------
# public API


def _example_batches(example_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = example_input.detach().float()
    one = x[:1]
    return one, one.repeat(2, *([1] * (x.dim() - 1)))


def export_onnx_qdq(
    gm: fx.GraphModule,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    *,
    opset: int = MIN_OPSET,
    requantize: str = "none",
    calib: torch.Tensor | None = None,
    check: bool = True,
    ort_contrib_ops: bool = False,
    max_added_error: float = MAX_ADDED_ERROR,
    token_layout: str = "auto",
) -> Path:
    """Write ``gm`` (a calibrated hyq-fx GraphModule) to ``path`` as a QDQ ONNX model.

    ``example_input`` is one image batch ``[N, C, H, W]`` (N ≥ 1) of the deployed size; the
    batch dimension of the ONNX model is dynamic. ``requantize``: ``"none"`` (default) never
    requantizes, so the ONNX model computes the fake-quant graph; ``"auto"`` requantizes conv
    outputs where an int8 conv kernel (QLinearConv) can then be used (exact for identity/ReLU,
    an extra rounding with a fitted grid for SiLU/GELU/Hardswish, and for a conv added to a
    residual before a quantizer, which ONNX Runtime then runs as QLinearAdd: the grid is
    fitted so that the sum's codes change least, and kept if it adds at most
    ``max_added_error`` to that quantizer's own error); ``"exact"`` only where exact. Both
    also write, exactly, a concat before a per-tensor quantizer on codes (QLinearConcat), fold
    a positive scalar factor into the quantizer after it (attention's ``q·d^-½``) and move
    per-tensor quantizers before the data movement that leads to them (reshapes, transposes,
    DepthToSpace then run on uint8). On mobilevit_xxs at batch 32 on 2 cores these, with the
    linear bias inside MatMulIntegerToFloat (``ort_contrib_ops``), took our int8 file from
    1.05x to 1.34x ONNX Runtime FP32 (``benchmarks/results/latency_ort_pair_s12_xxs_b32``).
    ``calib``: images (calibration images; the first 16 are used) on which the SiLU/GELU grids
    are fitted; without them a grid is derived from the next quantizer's range alone.
    ``max_added_error``: with ``"auto"``, a conv whose output reaches a per-channel quantizer,
    or is added to a residual, is requantized only if its uint8 grid adds at most this
    fraction to that quantizer's own squared error on ``calib`` (without ``calib`` it is not
    requantized).
    ``check`` runs ``onnx.checker``. ``ort_contrib_ops`` writes SiLU as ONNX Runtime's
    ``com.microsoft.QuickGelu(alpha=1)`` (same values): behind a requantized conv, the
    DequantizeLinear feeding both halves of ``x·Sigmoid(x)`` is duplicated by ORT's QDQ
    handling, so its own SiLU fusion fails and Sigmoid and Mul run as two passes over the tensor
    (on mobilevit_xxs at batch 32 a quarter of the int8 model's kernel time); the file then
    needs ONNX Runtime. Where a requantized conv's SiLU output goes straight into a
    per-tensor quantizer (``requantize="auto"``), it is computed on the uint8 codes instead,
    ``QLinearSigmoid`` and ``QLinearMul`` (one more rounding, of ``σ`` to ``k/255``): on
    2000 dev images the default hyq-fx W8A8 agreed with fake-quant as often as the QuickGelu
    form (97.95 vs 97.8 % xxs, 96.85 vs 97.0 % v2) and ran about 6 % faster at batch 32.
    ``token_layout``: MobileViTv2's transformer tokens ``[B, C, P, N]`` are exported
    channels-last (``"channels_last"``, :mod:`hyq_fx.token_layout`: its 1×1 convs become
    linears, which ONNX Runtime runs as integer matrix products) or as captured
    (``"channels_first"``); ``"auto"`` picks channels-last when the weights are int8. On
    mobilevitv2_050 at batch 32 on 2 cores (``benchmarks/results/
    latency_ort_pair_s13_v2_b32_layout_3``, the steadiest of three runs) the int8 file went
    from 45.3 to 36.0 ms against 55.2 ms for FP32; FP32 itself gained nothing channels-last
    (its float 1×1 conv is as fast as MatMul; −9 % to +8 % over the three runs), so float
    exports keep the captured layout.
    Quantizers in mode ``off`` are exported as float.
    The export report (requantized convs, float convs) and ``gm.meta["hyq"]`` (recipe, bits,
    preprocessing) are stored in the model's metadata as JSON under ``hyq`` and
    ``hyq_export``.
    """
    if not isinstance(gm, fx.GraphModule):
        raise ExportError(f"export_onnx_qdq needs a torch.fx.GraphModule, got {type(gm).__name__}")
    if requantize not in REQUANTIZE:
        raise ExportError(f"requantize={requantize!r}; use one of {REQUANTIZE}")
    if token_layout not in TOKEN_LAYOUTS:
        raise ExportError(f"token_layout={token_layout!r}; use one of {TOKEN_LAYOUTS}")
    if not max_added_error >= 0:
        raise ExportError(f"max_added_error={max_added_error!r}; use a fraction >= 0 (e.g. 1.0)")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset={opset}; use {MIN_OPSET}..{MAX_OPSET} (LayerNormalization ≥ 17)")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise ExportError("example_input must be an image batch tensor [N, C, H, W]")
    gm = fold_tokens_with_pixel_shuffle(lower_for_export(gm, example_input), example_input)
    gm = unfold_maps_with_pixel_unshuffle(gm, example_input)
    layout = "channels_first"
    if token_layout == "channels_last" or (token_layout == "auto" and _int8_weights(gm)):
        lowered, gm = gm, tokens_channels_last(gm, example_input)
        layout = "channels_last" if gm is not lowered else layout
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ExportError(f"the module takes {len(placeholders)} inputs; only one is supported")

    for name, fq in gm.named_modules():
        if isinstance(fq, FakeQuantizer) and fq.mode == "observe":
            raise ExportError(
                f"quantizer {name} is still observing (not calibrated): run the 'calibrate' "
                "pass (hyq_fx.quantize does) before export"
            )
    dependent = _not_foldable(gm)
    foldable = {n for n in gm.graph.nodes if n.op == "call_function" and n not in dependent}
    was_training = gm.training
    gm.eval()
    try:  # shapes do not depend on the quantizers, and the float run is much faster
        with torch.no_grad(), quantizers_mode(gm, "off"):
            runs = []
            for x in _example_batches(example_input):
                rec = _Recorder(gm, foldable)
                rec.run(x)
                runs.append(rec)
    finally:
        gm.train(was_training)
    shapes = {n: _merge(runs[0].shapes.get(n), runs[1].shapes.get(n)) for n in runs[0].shapes}
    consts = runs[0].values

    b = _Builder(opset)
    tr = _Translator(
        gm, shapes, consts, b, requantize=requantize, ort_contrib_ops=ort_contrib_ops,
        max_added_error=max_added_error,
    )  # fmt: skip
    if requantize == "auto" and calib is not None:  # conv outputs whose grids are fitted
        fitted = set().union(*(tr.sample_nodes(n) for n in gm.graph.nodes if n.target in _CONVS))
        if fitted:
            rec = _Recorder(gm, fitted)
            with torch.no_grad():
                rec.run(calib[:FIT_IMAGES].detach().float())
            tr.samples = rec.values
    ph = placeholders[0]
    tr.env[ph] = INPUT_NAME
    b._names.add(INPUT_NAME)
    out_names = tr.run()
    tr.report["token_layout"] = layout
    if requantize != "none":
        tr.report["scalar_mul_folded"] = _fold_scalar_mul_into_quantize(b)
        tr.report["quantized_before_moves"] = _quantize_before_moves(b)
    if ort_contrib_ops:
        tr.report["silu_in_uint8"] = _silu_in_uint8(b)
        tr.report["matmul_bias_fused"] = _matmul_bias_in_int8(b)
        tr.contrib_used |= tr.report["matmul_bias_fused"] > 0
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_args = (
        out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else [out_node.args[0]]
    )
    outputs = []
    for i, (name, arg) in enumerate(zip(out_names, out_args, strict=True)):
        oname = OUTPUT_NAME if i == 0 else f"{OUTPUT_NAME}_{i}"
        b.nodes.append(helper.make_node("Identity", [name], [oname], name=f"{oname}_out"))
        outputs.append(_value_info(oname, shapes.get(arg)))
    b.prune([o.name for o in outputs])
    graph = helper.make_graph(
        b.nodes,
        "hyq_qdq",
        [_value_info(INPUT_NAME, shapes.get(ph))],
        outputs,
        initializer=list(b.inits.values()),
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)]
        + ([helper.make_opsetid(MS_DOMAIN, 1)] if tr.contrib_used else []),
        producer_name="hyq-fx",
    )
    model.ir_version = min(model.ir_version, 10)
    report = {
        **tr.report,
        "requantize": requantize,
        "opset": opset,
        "n_weight_quantizers": len(tr.weight_q),
        "n_activation_qdq": sum(1 for n in b.nodes if n.op_type == "QuantizeLinear"),
    }
    return write_model(model, path, gm, report, check=check)


def _value_info(name: str, shape: Any) -> onnx.ValueInfoProto:
    dims = (
        [d if d is not None else "batch" if i == 0 else f"d{i}" for i, d in enumerate(shape)]
        if isinstance(shape, tuple)
        else None
    )
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def export_artifact(
    out_dir: str | os.PathLike[str],
    onnx_path: str | os.PathLike[str] | None = None,
    *,
    calib_dir: str | os.PathLike[str] | None = None,
    n_images: int = 32,
    requantize: str = "none",
    opset: int = MIN_OPSET,
    ort_contrib_ops: bool = False,
    max_added_error: float = MAX_ADDED_ERROR,
    token_layout: str = "auto",
) -> Path:
    """Export the quantized model saved in ``out_dir`` (``hyq-fx quantize --out``) to
    ``onnx_path`` (default ``out_dir/model.qdq.onnx``) at the input size it was quantized at;
    ``calib_dir``: an ImageFolder whose first ``n_images`` images fit the requantization grids
    (recommended with ``"auto"``; default: the images ``hyq-fx quantize`` kept in ``out_dir``)."""
    from hyq_fx.artifact import load, load_fit_images
    from hyq_fx.data import image_folder

    gm = load(out_dir)
    info = deployed_meta(gm).get("model_info", {})
    size = input_shape(gm) or (3, 224, 224)
    calib = load_fit_images(out_dir)
    if calib_dir is not None:
        ds = image_folder(calib_dir, info, limit=n_images)
        calib = torch.stack([ds[i][0] for i in range(len(ds))])
    example = calib[:1] if calib is not None else torch.zeros(1, *size)
    path = Path(onnx_path) if onnx_path is not None else Path(out_dir) / "model.qdq.onnx"
    return export_onnx_qdq(
        gm, path, example, opset=opset, requantize=requantize, calib=calib,
        ort_contrib_ops=ort_contrib_ops, max_added_error=max_added_error,
        token_layout=token_layout,
    )  # fmt: skip


def onnx_node_counts(path: str | os.PathLike[str]) -> dict[str, int]:
    """How many nodes of each op type the ONNX file at ``path`` holds."""
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


class OnnxRunner:
    """An ONNX Runtime CPU session as a callable: ``runner(images) -> logits`` (torch tensors).

    ``threads`` defaults to the usable cores. ``optimized_model_path`` saves the graph as ONNX
    Runtime rewrote it (to see which QLinearConv / MatMulIntegerToFloat kernels it chose).
    ``model_info`` is the preprocessing stored by :func:`export_onnx_qdq` (empty for other
    files), so ``hyq_fx.data.image_folder(dir, runner.model_info)`` works.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        optimized_model_path: str | os.PathLike[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX model at {path}; export one with export_onnx_qdq")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only (not the note on saving optimized models)
        if optimized_model_path is not None:
            opts.optimized_model_filepath = str(optimized_model_path)
        self.path = path
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        props = self.session.get_modelmeta().custom_metadata_map
        self.meta: dict[str, Any] = json.loads(props.get("hyq", "{}"))
        self.export_report: dict[str, Any] = json.loads(props.get("hyq_export", "{}"))
        self.model_info: dict[str, Any] = self.meta.get("model_info", {})

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])
