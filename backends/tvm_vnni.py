"""Int8 conv2d / matmul as AVX-512 VNNI dot products (``vpdpbusd``: uint8 × int8 → int32).

After ``IntegerizeQDQ`` the int8 kernels are ``conv2d(x8, w8)`` and ``matmul(a8, b8)`` with
int8 × int8 → int32. LLVM vectorizes those loops with 32-bit multiplies (``vpmulld``, 16
multiply-adds per instruction), which is no faster than float32 FMA. One ``vpdpbusd`` does 64
multiply-adds, but it takes an *unsigned* 8-bit operand and a 16 × 4 block of signed weights.
This pass rewrites each such call with a constant weight so that MetaSchedule's VNNI rule can
tensorize it::

    Σ_k x8[k] · w8[k]  =  Σ_k (x8[k] + 128) · w8[k]  −  128 · Σ_k w8[k]

    xu = x8 + 128 ∈ [0, 255]  (uint8; padding gets 128, the image of int8 0, so the identity
                               holds at the borders too)
    conv2d:  y[n, o, h, w] = Σ_{i,j,c} xu[n, h·s + i·d, w·s + j·d, c]
                                         · Wp[o//16, i, j, c//4, o%16, c%4]
                              − 128 · Σ_{c,i,j} w8[o, c, i, j]
    matmul:  y[..., m, n]  = Σ_k au[..., m, k] · Bp[n//16, k//4, n%16, k%4] − 128 · Σ_k b8[k, n]

The weights are packed at build time (``Wp`` / ``Bp``: the 16 output channels × 4 reduction
elements of one instruction are 64 contiguous bytes; the reduction is zero-padded to a multiple
of 4) and the activation is shifted and, for conv2d, moved channels-last inside the same
kernel. The int32 result is exactly the one of the int8 × int8 kernel, so the requantizing
epilogue is unchanged. Output channels are zero-padded to a multiple of 16 in the packed
weight and dropped by the kernel's last stage. Grouped (depthwise) convolutions and matmuls of
two activations are left as they are.

TVM 0.27's own VNNI tensor intrinsic (``dot_16x4_vnni``) declares ``vpdpbusd`` with int32
vector operands, which the LLVM it ships rejects ("Call parameter type does not match
function signature"), so no tensorized candidate could build. ``register_vnni_intrinsic``
registers the same description with byte-vector operands under that name, loading TVM's x86
intrinsics alone rather than its whole intrinsic package (under a second instead of 43-69 s on
2 cores). About half of the tensorized candidates still fail to build: where MetaSchedule
vectorizes the loop around the intrinsic, TVM's vectorizer stops ("Cannot broadcast lanes=32
... to 128"). Those trials are lost, not wrong; budget about twice the trials per kernel.

Source: Intel AVX-512 VNNI (``VPDPBUSD``); the packed layout follows TVM's x86 ``dense_vnni`` /
``conv2d_NCHWc_int8`` schedules. Invariants checked by ``tests/test_tvm_vnni.py``: the rewrite
gives the same int32 results as the int8 × int8 kernels; the registered intrinsic builds to
``vpdpbusd`` and matches numpy; it stays the registered ``dot_16x4_vnni`` whether TVM's intrinsic
package is imported after it or before; a ``build_tvm`` library with it matches the fake-quant
model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["UseVnniKernels", "register_vnni_intrinsic", "tensor_dims", "vnni_available"]

_LANES, _DEPTH = 16, 4  # one vpdpbusd: 16 int32 outputs, each a 4-element u8 · s8 dot product
_SHIFT = 128  # int8 → uint8
_X86_INTRINSICS = "tvm.s_tir.tensor_intrin.x86"


def vnni_available(target: Any) -> bool:
    """True for an llvm target whose CPU has AVX-512 VNNI (``vpdpbusd``)."""
    from tvm.target import codegen

    if target.kind.name != "llvm":
        return False
    try:
        return bool(codegen.target_has_features("avx512vnni", target))
    except Exception:  # a target LLVM cannot describe (e.g. another triple): no VNNI
        return False


def _tvm_x86_intrinsics() -> Any:
    """TVM's module of x86 tensor intrinsics, run once, without the rest of its package.

    ``tvm.s_tir.tensor_intrin``'s ``__init__`` imports the intrinsics of every target TVM
    ships; importing ``tvm.s_tir.tensor_intrin.x86`` the usual way runs that ``__init__``
    first. This loads ``x86.py`` alone under its own name in ``sys.modules``, so that a later
    import of the package (MetaSchedule's ``TuneContext`` does one) finds it there and does not
    run it again: a second run would register TVM's ``dot_16x4_vnni`` again, without
    ``override``, which raises ``ValueError`` ("has already been registered").
    """
    import importlib.util
    import sys
    from pathlib import Path

    module = sys.modules.get(_X86_INTRINSICS)
    if module is not None:  # the package (or this function) already ran it
        return module
    import tvm.s_tir

    path = Path(tvm.s_tir.__file__).parent / "tensor_intrin" / "x86.py"
    spec = importlib.util.spec_from_file_location(_X86_INTRINSICS, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load TVM's x86 tensor intrinsics from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_X86_INTRINSICS] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_X86_INTRINSICS]
        raise
    return module


def _vpdpbusd_16x4() -> Any:
    """The implementation of ``dot_16x4_vnni``: ``vpdpbusd`` with byte-vector operands."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def vpdpbusd_16x4(
        A: T.Buffer((4,), "uint8", offset_factor=1),  # noqa: N803
        B: T.Buffer((16, 4), "int8", offset_factor=1),  # noqa: N803
        C: T.Buffer((16,), "int32", offset_factor=1),  # noqa: N803
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_u32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a_u32, 16), dtype="uint8x64"),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    return vpdpbusd_16x4


def register_vnni_intrinsic() -> None:
    """Register ``dot_16x4_vnni`` with the ``vpdpbusd`` signature of TVM's bundled LLVM.

    Contract: afterwards the registered ``dot_16x4_vnni`` is ours, and it stays ours when TVM's
    whole ``tvm.s_tir.tensor_intrin`` package is imported later (MetaSchedule's ``TuneContext``
    does) or was imported before; calling this again registers ours again. TVM registers its own
    version when its ``x86.py`` runs, without ``override`` (so a second run of that module would
    raise), hence ``x86.py`` runs exactly once, before ours, which overrides it. Only that
    module is loaded (``_tvm_x86_intrinsics``), not the package: 0.3-0.75 s after ``import tvm``
    instead of 43-69 s, measured in fresh processes on a 2-core AMD EPYC (family 25 model 17,
    AVX-512 VNNI) that was running other jobs.
    """
    from tvm.s_tir import TensorIntrin

    x86 = _tvm_x86_intrinsics()
    TensorIntrin.register(
        x86.VNNI_DOT_16x4_INTRIN, x86.dot_product_16x4_u8i8i32_desc, _vpdpbusd_16x4(), True
    )


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _pack_conv_weight(w: np.ndarray) -> np.ndarray:
    """OIHW int8 → ``[⌈O/16⌉, KH, KW, ⌈C/4⌉, 16, 4]`` (zero-padded)."""
    o, c, kh, kw = w.shape
    op, cp = _ceil_to(o, _LANES), _ceil_to(c, _DEPTH)
    w = np.pad(w, [(0, op - o), (0, cp - c), (0, 0), (0, 0)])
    w = w.reshape(op // _LANES, _LANES, cp // _DEPTH, _DEPTH, kh, kw)
    return np.ascontiguousarray(w.transpose(0, 4, 5, 2, 1, 3))


def _pack_matmul_weight(b: np.ndarray) -> np.ndarray:
    """``[K, N]`` int8 → ``[⌈N/16⌉, ⌈K/4⌉, 16, 4]`` (zero-padded)."""
    k, n = b.shape
    kp, np_ = _ceil_to(k, _DEPTH), _ceil_to(n, _LANES)
    b = np.pad(b, [(0, kp - k), (0, np_ - n)]).reshape(kp // _DEPTH, _DEPTH, np_ // _LANES, _LANES)
    return np.ascontiguousarray(b.transpose(2, 0, 3, 1))


def _shifted(value: Any) -> Any:
    """An int8 code as uint8: ``value + 128``."""
    return (value.astype("int32") + _SHIFT).astype("uint8")


# the activation stage stays a loop nest of its own: inlined into the dot product it would
# hide the 4 contiguous bytes the intrinsic loads
_OWN_STAGE = {"meta_schedule.inline_rule": "disable"}
# (data, kernel, out) layouts of the conv2d calls rewritten: torch's and ConvertChannelsLast's
_CONV_LAYOUTS = {("NCHW", "OIHW", "NCHW"), ("NHWC", "OHWI", "NHWC")}


def _conv2d_te(
    x: Any,
    wp: Any,
    strides: tuple,
    padding: tuple,
    dilation: tuple,
    out_channels: int,
    layout: str = "NCHW",
) -> Any:
    """NCHW (NHWC) int8 input, packed weight → NCHW (NHWC) int32 (see the module docstring)."""
    from tvm import te, tirx

    nhwc = layout == "NHWC"
    n = x.shape[0]  # the batch may be symbolic
    h, w, c = (int(x.shape[d]) for d in ((1, 2, 3) if nhwc else (2, 3, 1)))
    og, kh, kw, cq = (int(d) for d in wp.shape[:4])
    top, left, bottom, right = padding
    hp, wpad, cp = h + top + bottom, w + left + right, cq * _DEPTH

    def pack(b: Any, i: Any, j: Any, ch: Any) -> Any:
        inside = tirx.all(i >= top, i < h + top, j >= left, j < w + left, ch < c)
        cc, ii, jj = tirx.min(ch, c - 1), i - top, j - left
        src = x[b, ii, jj, cc] if nhwc else x[b, cc, ii, jj]
        return tirx.if_then_else(inside, _shifted(src), tirx.const(_SHIFT, "uint8"))

    xu = te.compute((n, hp, wpad, cp), pack, name="vnni_activation", attrs=_OWN_STAGE)
    (sh, sw), (dh, dw) = strides, dilation
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wpad - dw * (kw - 1) - 1) // sw + 1
    ri, rj, rc = (
        te.reduce_axis((0, kh), "ri"),
        te.reduce_axis((0, kw), "rj"),
        te.reduce_axis((0, cp), "rc"),
    )
    acc = te.compute(
        (n, oh, ow, og * _LANES),
        lambda b, i, j, o: te.sum(
            xu[b, i * sh + ri * dh, j * sw + rj * dw, rc].astype("int32")
            * wp[o // _LANES, ri, rj, rc // _DEPTH, o % _LANES, rc % _DEPTH].astype("int32"),
            axis=[ri, rj, rc],
        ),
        name="vnni_conv2d",
    )  # channels last: one vpdpbusd writes 16 neighbouring output channels
    # the output layout as the last stage of the same kernel: TVM's pattern analysis still
    # finds the kernel out-elementwise-fusable, so the requantizing epilogue fuses into it
    # (the padded output channels are dropped there too)
    if nhwc:
        if out_channels == int(acc.shape[-1]):
            return acc
        return te.compute(
            (n, oh, ow, out_channels), lambda b, i, j, o: acc[b, i, j, o], name="vnni_channels"
        )
    return te.compute((n, out_channels, oh, ow), lambda b, o, i, j: acc[b, i, j, o], name="nchw")


def _matmul_te(a: Any, bp: Any, out_features: int) -> Any:
    """``[..., M, K]`` int8 activation, packed weight → ``[..., M, N]`` int32."""
    from tvm import te, tirx

    shape = list(a.shape)  # leading dims may be symbolic, the reduction is static
    k = int(shape[-1])
    kp = int(bp.shape[1]) * _DEPTH

    def pack(*idx: Any) -> Any:
        *lead, kk = idx
        src = a[(*lead, tirx.min(kk, k - 1))]
        return tirx.if_then_else(kk < k, _shifted(src), tirx.const(_SHIFT, "uint8"))

    au = te.compute((*shape[:-1], kp), pack, name="vnni_activation", attrs=_OWN_STAGE)
    rk = te.reduce_axis((0, kp), "rk")
    acc = te.compute(
        (*shape[:-1], int(bp.shape[0]) * _LANES),
        lambda *idx: te.sum(
            au[(*idx[:-1], rk)].astype("int32")
            * bp[idx[-1] // _LANES, rk // _DEPTH, idx[-1] % _LANES, rk % _DEPTH].astype("int32"),
            axis=rk,
        ),
        name="vnni_matmul",
    )
    if out_features == int(acc.shape[-1]):
        return acc
    return te.compute(  # drop the padded output features
        (*shape[:-1], out_features), lambda *idx: acc[idx], name="vnni_features"
    )


def tensor_dims(expr: Any) -> list[int | None] | None:
    """The dims of a tensor (None where symbolic), or None without a known rank."""
    shape = getattr(expr.ty, "shape", None)
    if shape is None:
        return None
    return [int(d.value) if hasattr(d, "value") else None for d in shape]


def _static_except_batch(expr: Any, ndim: int) -> bool:
    dims = tensor_dims(expr)
    return dims is not None and len(dims) == ndim and None not in dims[1:]


def _is_int8(expr: Any) -> bool:
    return str(getattr(expr.ty, "dtype", "")) == "int8"


def UseVnniKernels(counts: dict[str, int] | None = None) -> Any:  # noqa: N802
    """The Relax module pass: int8 conv2d / matmul with constant weights → VNNI kernels.

    ``counts`` (if given) receives how many conv2d and matmul calls were rewritten.
    """
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard

    conv_pattern = is_op("relax.nn.conv2d")(wildcard(), is_const())
    matmul_pattern = is_op("relax.matmul")(wildcard(), is_const())

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod: Any) -> None:
            super().__init__(mod)
            self.done = {"conv2d": 0, "matmul": 0}

        def visit_call_(self, call: Any) -> Any:  # noqa: N802 (the mutator's hook)
            call = super().visit_call_(call)
            new = None
            if conv_pattern.match(call):
                new = self._conv2d(call)
            elif matmul_pattern.match(call):
                new = self._matmul(call)
            return call if new is None else new

        def _conv2d(self, call: Any) -> Any:
            x, w = call.args
            attrs = call.attrs
            layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
            weight = w.value.numpy()
            if layouts == ("NHWC", "OHWI", "NHWC"):
                weight = weight.transpose(0, 3, 1, 2)  # OIHW for packing
            if (
                layouts not in _CONV_LAYOUTS
                or int(attrs.groups) != 1
                or str(attrs.out_dtype) != "int32"
                or not (_is_int8(x) and weight.dtype == np.int8)
                or not _static_except_batch(x, ndim=4)
            ):
                return None
            packed = relax.const(_pack_conv_weight(weight))
            acc = self.builder_.call_te(
                _conv2d_te, x, packed,
                tuple(int(s) for s in attrs.strides), tuple(int(p) for p in attrs.padding),
                tuple(int(d) for d in attrs.dilation), weight.shape[0], layouts[0],
                primfunc_name_hint="vnni_conv2d",
            )  # fmt: skip
            channel_shape = (1, 1, 1, -1) if layouts[0] == "NHWC" else (1, -1, 1, 1)
            wsum = weight.astype(np.int64).sum(axis=(1, 2, 3)).reshape(channel_shape)
            self.done["conv2d"] += 1
            return relax.op.subtract(acc, relax.const((_SHIFT * wsum).astype(np.int32)))

        def _matmul(self, call: Any) -> Any:
            a, b = call.args
            weight = b.value.numpy()
            shape = tensor_dims(a)
            if (
                weight.ndim != 2
                or weight.dtype != np.int8
                or not _is_int8(a)
                or str(call.attrs.out_dtype) != "int32"
                or shape is None
                or len(shape) < 2
                or shape[-1] != weight.shape[0]
            ):
                return None
            packed = relax.const(_pack_matmul_weight(weight))
            acc = self.builder_.call_te(
                _matmul_te, a, packed, weight.shape[1], primfunc_name_hint="vnni_matmul"
            )
            wsum = weight.astype(np.int64).sum(axis=0)
            self.done["matmul"] += 1
            return relax.op.subtract(acc, relax.const((_SHIFT * wsum).astype(np.int32)))

    @tvm.transform.module_pass(opt_level=0, name="hyq.UseVnniKernels")
    def _pass(mod: Any, _ctx: Any) -> Any:
        mod = relax.transform.FoldConstant()(mod)  # permuted weight constants become constants
        rewriter = _Rewriter(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        if counts is not None:
            for key, n in rewriter.done.items():
                counts[key] = counts.get(key, 0) + n
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())

    return _pass
