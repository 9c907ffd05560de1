"""Requantization of conv outputs in the ONNX QDQ export: which activations a requantized conv
output may pass on its way to the next quantizer, and the uint8 grids fitted for it.

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

A conv added to a residual before a per-tensor quantizer ``Q_t`` (``"auto"``) gets the uint8 grid
that changes the sum's codes least, ``E[(Q_t(ŷ + r) − (y + r))²]`` (``_residual_grid``), kept
under the same ``max_added_error`` bound; ONNX Runtime then runs the add as ``QLinearAdd``.

The translator (``_Translator.requant_params``) finds the path conv → [activation] →
[data movement]* → quantizer with the tables here (``_SMOOTH_ACTS``, ``_EXACT_ACTS``,
``_MOVES``) and calls the fits: ``_requant_range`` (smooth ``f``, per-tensor ``Q_n``),
``_requant_range_per_channel`` (per-channel ``Q_n``) and ``_residual_grid``, on at most
``FIT_IMAGES`` calibration images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from onnx import TensorProto

from .onnx_qparams import _QParams

aten = torch.ops.aten

FIT_IMAGES = 16  # images of ``calib`` used to fit requantization grids
MAX_ADDED_ERROR = 1.0  # default bound on the error a grid before a per-channel quantizer adds


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


def _uint8_grid(lo: float, hi: float) -> _QParams:
    """The asymmetric uint8 grid spanning ``[lo, hi]``."""
    scale = max((hi - lo) / 255.0, 1e-12)
    zp = int(np.clip(np.rint(-lo / scale), 0, 255))
    return _QParams(
        TensorProto.UINT8, np.asarray(scale, np.float32), np.asarray(zp, np.uint8), 0, 255, None
    )
