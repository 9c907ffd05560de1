"""Channels-last (NHWC) convs for the CPU build: ``ConvertChannelsLast``, a Relax module pass.

``from_exported_program`` imports torch's NCHW graph. The VNNI conv (``tvm_vnni``) computes
16 neighbouring output channels per instruction, so in NCHW its kernel ends by transposing its
int32 result, and the requantizing epilogue fused after it (per-channel ``·s_x·s_w[o]``, bias,
SiLU, quantize) runs over spatial positions with the channel outer: MetaSchedule left that loop
scalar. In NHWC the channel is the innermost axis of every conv output, the per-channel
constants are contiguous vectors and the epilogue vectorizes. Measured on the costliest kernel
of mobilevitv2_050 (1×1 conv 32→64 at 64×64 + SiLU + quantize, 2-core Xeon with VNNI):
363 µs NCHW (tuned, 2660 trials), 228 µs NHWC after 64 trials (with ``nearbyint`` vectorizable,
see ``tvm_fast_exp``; 538 µs without).

The rewrite, with ``P = (0, 2, 3, 1)`` (NCHW → NHWC) and ``P⁻¹ = (0, 3, 1, 2)``::

    conv2d_NCHW(x, W)         =  P⁻¹( conv2d_NHWC(P(x), W_OHWI) )        (TVM's ConvertLayout,
                                                                       W_OHWI folded offline)
    f(P⁻¹(y))                 =  P⁻¹( f_NHWC(y) )                       (elementwise, broadcast,
                                                                       reductions: ConvertLayout)
    clip(x, lo, hi)           =  min(max(x, lo), hi)                    (TVM 0.27's clip has no
                                                                       layout rule; min/max do)
    P(pad(P⁻¹(y), w, v))      =  pad(y, w ∘ P, v)                      (nor has pad)

so the permutes that remain are at the borders of what has no layout rule (MobileViT's
unfold/fold reshapes, matmul, group norm over a reshaped patch tensor). Every step is a layout
change, exact to the bit. Source: TVM Relax ``ConvertLayout``
(``python/tvm/relax/transform/transform.py``). Invariant checked by ``tests/test_tvm_layout.py``:
the converted module computes the same integers and floats as the NCHW one, its convs are
NHWC, and no ``clip`` or permute-pad-permute is left.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConvertChannelsLast"]

_TO_NHWC, _TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


def _axes(call: Any) -> tuple[int, ...]:
    return tuple(int(a) for a in call.attrs.axes)


def _clip_as_min_max(func: Any) -> Any:
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    pattern = is_op("relax.clip")(wildcard(), wildcard(), wildcard())

    def rewrite(call: Any, _m: Any) -> Any:
        x, lo, hi = call.args
        dtype = call.ty.dtype
        lower = relax.op.maximum(x, relax.const(float(lo.value), dtype))
        return relax.op.minimum(lower, relax.const(float(hi.value), dtype))

    return rewrite_call(pattern, rewrite, func)


def _pad_through_permutes(func: Any) -> Any:
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    to_nchw = is_op("relax.permute_dims")(wildcard())
    pad = is_op("relax.nn.pad")(to_nchw)
    pattern = is_op("relax.permute_dims")(pad)

    def rewrite(call: Any, m: Any) -> Any:
        inner, padded = m[to_nchw], m[pad]
        if _axes(inner) != _TO_NCHW or _axes(call) != _TO_NHWC:
            return call
        width = [int(v) for v in padded.attrs.pad_width]
        pairs = [width[2 * i : 2 * i + 2] for i in range(len(width) // 2)]
        nhwc_width = [v for axis in _TO_NHWC for v in pairs[axis]]
        value = float(padded.attrs.pad_value)
        return relax.op.nn.pad(inner.args[0], nhwc_width, pad_value=value)

    return rewrite_call(pattern, rewrite, func)


def ConvertChannelsLast() -> Any:  # noqa: N802 (TVM's pass naming)
    """The Relax module pass: every ``conv2d`` NHWC / OHWI, layouts propagated (see above)."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="hyq.ConvertChannelsLast")
    def _pass(mod: Any, _ctx: Any) -> Any:
        mod = _map_functions(mod, _clip_as_min_max)
        mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(mod)
        mod = _map_functions(mod, _pad_through_permutes)
        return relax.transform.FoldConstant()(mod)  # the OHWI weights become constants

    return _pass


def _map_functions(mod: Any, rewrite: Any) -> Any:
    from tvm import relax

    mod = mod.clone()
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewrite(func)
    return mod
