"""A vectorizable ``exp`` for TVM's CPU kernels: the LLVM lowering of ``tirx.exp`` in hyq-fx builds.

TVM lowers ``tirx.exp`` on ``llvm`` targets to LLVM's ``llvm.exp`` intrinsic, which becomes one
libm ``expf`` call per element even inside a vectorized loop. SiLU (``x·σ(x)``, legalized to
``x / (1 + exp(−x))``) and softmax then dominate the kernels that hold them: on mobilevit_xxs
(128x128, batch 1, int8, tuned) the conv kernels with a SiLU epilogue at 64x64 took 0.5–0.65 ms
each, and a plain SiLU over 1x64x64x64 took 0.66 ms. With this lowering, written in TIR
arithmetic that LLVM vectorizes, the SiLU took 0.11 ms and the tuned model 8.7 ms instead of
11.7 ms, with the same logits (``benchmarks/results/latency_tvm_fastexp_pair``).

The rewrite (float32, scalar or vector lanes)::

    x' = clamp(x, −87.3, 88.3)              (exp(x') stays a normal float32)
    n  = floor(x'·log₂e + ½),   y = (x' − n·c₁) − n·c₂ ∈ [−0.35, 0.35]
         (c₁ + c₂ = ln 2, c₁ = 0.693359375 has 9 significant bits, so n·c₁ is exact in float32:
         Cody–Waite reduction; y = x' − n·ln 2 rounded once would lose ~20 bits at |x| = 80)
    exp(x) ≈ P₆(y) · 2ⁿ,   P₆(y) = Σ_{k≤6} yᵏ/k!   (Taylor; remainder ≤ 0.35⁷/7! ≈ 1.3e−7)
    2ⁿ = reinterpret_f32((n + 127) << 23)   (the exponent field of an IEEE-754 single)

so the relative error stays within a few float32 ulps (≤ 1e−6 by the test) on the clamped
range; below −87.3 it returns exp(−87.3) ≈ 1.2e−38 instead of a denormal or 0, above 88.3
exp(88.3) instead of a float32 overflow. Other dtypes keep TVM's lowering.

The lowering is registered on import (TVM's intrinsic-lowering registry is global) but
applies only inside :func:`fast_exp`, the context ``build_tvm`` and MetaSchedule's candidate
builds run in; any other TVM build in the process keeps ``llvm.exp``. Invariant checked by
``tests/test_tvm_backend.py``: a kernel built inside the context matches ``numpy.exp`` to 1e−6
relative on [−80, 80] and holds no ``llvm.exp`` call; outside it keeps the call.

Importing this module also marks ``tirx.nearbyint`` vectorizable, as TVM marks ``round`` and
``floor``. Relax's ``round`` (the rounding of every quantize) lowers to it, and without the mark
``VectorizeLoop`` scalarizes any loop holding it: the requantizing epilogue of the costliest
NHWC conv of mobilevitv2_050 took 538 µs instead of 228 µs with it (same schedule, same
results). Invariant checked by ``test_nearbyint_vectorizes_and_rounds_half_to_even``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import Any

import tvm
from tvm import tirx

__all__ = ["fast_exp", "fast_exp_enabled"]

_LO, _HI = -87.3, 88.3  # exp() of both is a normal float32, and n + 127 stays in 1..254
_LN2_HI = 0.693359375  # 355/512: n·_LN2_HI is exact for |n| < 2^15
_LN2_LO = math.log(2.0) - _LN2_HI
_state = threading.local()
_tvm_exp = tvm.ir.Op.get("tirx.exp").get_attr("llvm.FLowerIntrinsic")


def fast_exp_enabled() -> bool:
    return bool(getattr(_state, "enabled", False))


@contextlib.contextmanager
def fast_exp(enabled: bool = True) -> Iterator[None]:
    """Lower float32 ``exp`` with the polynomial above in the TVM builds inside the block."""
    previous = fast_exp_enabled()
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = previous


def _lower_exp(call: Any) -> Any:
    dtype = str(call.ty)
    if not fast_exp_enabled() or dtype.split("x")[0] != "float32":
        return _tvm_exp(call)

    def c(v: float) -> Any:
        return tirx.const(v, "float32")

    x = tirx.max(tirx.min(call.args[0], c(_HI)), c(_LO))
    n = tirx.floor(x * c(1.0 / math.log(2.0)) + c(0.5))
    y = (x - n * c(_LN2_HI)) - n * c(_LN2_LO)
    poly = c(1.0 / math.factorial(6))
    for k in range(5, -1, -1):  # Horner: ((y/6! + 1/5!)·y + …)·y + 1
        poly = poly * y + c(1.0 / math.factorial(k))
    exponent = n.astype(dtype.replace("float32", "int32")) + tirx.const(127, "int32")
    return poly * tirx.reinterpret(dtype, exponent << tirx.const(23, "int32"))


tvm.tirx.op.register_intrin_lowering("tirx.exp", "llvm", f=_lower_exp, level=99)
# TVM 0.27 marks round / floor / exp vectorizable but not nearbyint (what Relax's round, so
# every quantize, lowers to): VectorizeLoop then turns a whole vectorized loop holding it back
# into a scalar one. LLVM's nearbyint has vector forms (vrndscaleps), same results.
if tvm.ir.Op.get("tirx.nearbyint").get_attr("TVectorizable") is None:
    tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)
