"""Fake quantization with a straight-through estimator, and scale / zero-point from a range.

``round`` has zero gradient almost everywhere, so it is replaced by the identity in the
backward pass (STE); ``clamp`` keeps its true gradient, which gives the clipped STE for ``x``
and the LSQ gradient for the scale. The forward pass is the exact quantize-dequantize.
"""

from __future__ import annotations

import torch

from .spec import QuantSpec

SCALE_EPS = 1e-12


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def _channel_view(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    if t.numel() == 1:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x``: ``(clamp(round(x/s) + z, qmin, qmax) - z) · s``.

    ``scale`` and ``zero_point`` hold one element (per-tensor) or one per slice of ``axis``.
    """
    if scale.numel() > 1:
        if axis is None:
            raise ValueError("per-channel fake_quantize needs the channel axis")
        axis = axis % x.dim()
        if x.shape[axis] != scale.numel():
            raise ValueError(
                f"per-channel quantizer has {scale.numel()} scales but the tensor has "
                f"{x.shape[axis]} channels along axis {axis} (shape {tuple(x.shape)})"
            )
    s = _channel_view(scale, x, axis or 0).to(x.dtype)
    z = _channel_view(zero_point, x, axis or 0).to(x.dtype)
    q = torch.clamp(round_ste(x / s) + z, qmin, qmax)
    return (q - z) * s


def pow2_scale(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two that is >= ``scale`` (so the range is never clipped further)."""
    return torch.exp2(torch.ceil(torch.log2(scale.clamp_min(SCALE_EPS))))


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point that cover ``[lo, hi]`` (tensors of one element or one per channel).

    The range is widened to contain 0 so that zero is exactly representable (padding, ReLU).
    """
    lo = torch.minimum(lo.detach().float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.detach().float(), torch.zeros_like(hi, dtype=torch.float32))
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / spec.qmax
        scale = scale.clamp_min(SCALE_EPS)
        if spec.scale_type == "pow2":
            scale = pow2_scale(scale)
        zero_point = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(SCALE_EPS)
        if spec.scale_type == "pow2":
            scale = pow2_scale(scale)
        zero_point = torch.clamp(spec.qmin - torch.round(lo / scale), spec.qmin, spec.qmax)
    return scale, zero_point


def quantize_with_spec(x: torch.Tensor, spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor):
    """Fake-quantize ``x`` with the scale that covers ``[lo, hi]`` under ``spec``."""
    scale, zp = qparams_from_range(lo, hi, spec)
    return fake_quantize(
        x, scale, zp, spec.qmin, spec.qmax, spec.axis if spec.per_channel else None
    )
