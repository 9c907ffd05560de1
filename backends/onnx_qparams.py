"""Quantizer parameters in ONNX terms, and the integer weight codes of the ONNX QDQ export.

Every calibrated :class:`~hyq_fx.quantizer.FakeQuantizer` ``Q`` (scale ``s``, zero-point ``z``,
integer range ``[qmin, qmax]``) becomes standard ONNX operators (the "QDQ format" of ONNX
Runtime, `onnxruntime.ai/docs/performance/model-optimizations/quantization.html`)::

    activation:  x̂ = DequantizeLinear(Clip(QuantizeLinear(x, s, z), qmin, qmax), s, z)
    weight:      Ŵ = DequantizeLinear(W_q, s, z, axis),  W_q = clamp(round(W/s) + z, qmin, qmax)

``W_q`` is computed here (``_quantize_weight``, as ``fake_quantize`` rounds) and stored once as
an int8 (symmetric) / uint8 (asymmetric) initializer, so the file holds one byte per weight. A
per-channel activation quantizer (the depthwise conv input of
``insert_quantizers(depthwise_per_channel=True)``) is a per-axis pair, ``QuantizeLinear`` /
``DequantizeLinear`` with ``axis`` and ``[C]`` scale / zero point (ONNX opset ≥ 13); its codes
can be read through one ``(s̄, z̄)`` (``_shared_scale_and_zero``), which is how the translator
writes its QuantizeLinear and how a requantized conv folds it
(:mod:`~hyq_fx.backends.onnx_ops_conv`). ``Clip`` is emitted only where the range is narrower
than the 8-bit container (symmetric ``±127``, or fewer than 8 bits: ``_QParams.needs_clip``);
weights of fewer than 8 bits are pre-rounded into the int8 container, so ``DQ(W_q)`` is exact.
Symmetric activations are stored as uint8 with ``z + 128`` (the same grid), because ONNX
Runtime's x86 integer kernels take uint8 activations. A quantizer of more than 8 bits is an
``ExportError`` (the ONNX QDQ backend writes 8-bit containers only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto

from hyq_fx.quantizer import FakeQuantizer


class ExportError(ValueError):
    """The module cannot be written as ONNX; the message names the node and the fix."""


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


def _shared_scale_and_zero(scale: np.ndarray, zero: np.ndarray) -> tuple[float, int]:
    """One ``(s̄, z̄)`` to read per-channel codes through: the geometric mean of the scales and
    the median zero point (any choice is exact once ``s_c/s̄`` and ``z_c − z̄`` are compensated;
    these keep the ratios near 1 and the compensated offsets small)."""
    s_bar = float(np.exp(np.log(scale.astype(np.float64)).mean()))
    return s_bar, int(np.median(zero.astype(np.int64)))
