"""Int8 conv2d / matmul as Armv8.2 dot products (``sdot``: int8 × int8 → int32), no tuning.

After ``IntegerizeQDQ`` the int8 kernels are ``conv2d(x8, w8)`` and ``matmul(a8, b8)`` with
int8 × int8 → int32. Legalized as plain loop nests, LLVM vectorizes most of them with widening
multiplies (``smull`` / ``smlal``: 8 multiply-adds per instruction plus the ``sxtl``
widenings); it forms ``sdot`` only where the reduction happens to be contiguous in both
operands. One ``sdot v.4s, a.16b, b.4b[0]`` does 16 multiply-adds: each of its 4 int32 lanes
(4 output channels) gets a 4-element dot product of the same 4 activation bytes with that
channel's 4 weight bytes. Both operands are signed, so unlike x86's ``vpdpbusd``
(:mod:`~hyq_fx.backends.tvm_vnni`) no shift or correction is needed::

    conv2d:  y[n, h, w, o] = Σ_{i, j, c4, l}  Xp[n, h·s + i·d, w·s + j·d, c4, l]
                                             · Wp[o//4, i, j, c4, o%4, l]
    matmul:  y[..., m, o]  = Σ_{k4, l}  Ap[..., m, k4, l] · Bp[o//4, k4, o%4, l]

    Xp[n, h, w, c4, l] = x8[n, c4·4 + l, h − top, w − left]  (0 outside the image and for
                                                              c4·4 + l ≥ C: 0 adds nothing)
    Wp[o4, i, j, c4, p, l] = w8[o4·4 + p, c4·4 + l, i, j]     (0 where padded)

``UseArmDotKernels`` (a Relax pass, before the CPU pipeline) rewrites each such call with a
constant weight into these kernels, packing the weight at build time (the 4 output channels
× 4 reduction elements of one instruction are 16 contiguous bytes). ``ScheduleArmDotKernels``
(a module pass, after legalization and fusion, before lowering) gives each fused kernel that
holds one a fixed schedule: the reduction loops move outside the 4 × 4 block of
``(o%4, l)``, which is tensorized with :func:`sdot_intrinsic` (``llvm.aarch64.neon.sdot``);
everything else in the kernel (the activation packing, the layout stage, the requantizing
epilogue) keeps TVM's default lowering. No search: the kernels cannot be timed on an x86 build
machine, and the schedule does not depend on timing. The int32 results are those of the
int8 × int8 kernel exactly (integer sums, no overflow for reductions up to 2^31 / 127^2 ≈
133 000 elements). Grouped (depthwise) convolutions and matmuls of two activations are left
to LLVM.

Source: Arm A64 ``SDOT`` (by element); the packed layout follows TVM's ``arm_cpu``
``dot_4x4_i8i8s32_sdot`` intrinsic, registered here under its own name so that TVM's whole
tensor-intrinsic package (about a minute to import on 2 cores) is not needed. Invariants
checked by ``tests/test_tvm_arm_dot.py``: the rewrite gives the int32 results of the int8 ×
int8 kernels (host build, no schedule); an aarch64 library's conv and matmul kernels hold
``sdot``; it matches the fake-quant model under qemu.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from hyq_fx.backends.tvm_vnni import _CONV_LAYOUTS, _ceil_to, _is_int8, _static_except_batch

__all__ = [
    "SDOT_INTRIN",
    "ScheduleArmDotKernels",
    "UseArmDotKernels",
    "arm_dot_available",
    "kernel_instructions",
    "register_sdot_intrinsic",
]

_LANES = _DEPTH = 4  # one sdot: 4 int32 outputs, each a 4-element s8 · s8 dot product
SDOT_INTRIN = "hyq_fx_dot_4x4_i8i8s32_sdot"
# the blocks that ScheduleArmDotKernels tensorizes (TE compute names, kept by FuseTIR)
_DOT_BLOCKS = ("arm_dot_conv2d", "arm_dot_matmul")
OBJDUMP = "aarch64-linux-gnu-objdump"


def arm_dot_available(target: Any) -> bool:
    """True for an llvm target with an aarch64 triple and the dot-product extension."""
    if target.kind.name != "llvm":
        return False
    if not str(target.attrs.get("mtriple", "") or "").startswith("aarch64"):
        return False
    return bool(target.attrs.get("feature.has_dotprod", False))


def _sdot_desc_impl() -> tuple[Any, Any]:
    """TVM's ``dot_4x4_i8i8s32_sdot``: ``C[i] += Σ_k A[k] · B[i, k]`` (4 × 4), as ``sdot``."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "int8", offset_factor=1),  # noqa: N803
        B: T.Buffer((4, 4), "int8", offset_factor=1),  # noqa: N803
        C: T.Buffer((4,), "int32", offset_factor=1),  # noqa: N803
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            for i in T.serial(0, 4):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "int8", offset_factor=1),  # noqa: N803
        B: T.Buffer((4, 4), "int8", offset_factor=1),  # noqa: N803
        C: T.Buffer((4,), "int32", offset_factor=1),  # noqa: N803
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a_i32 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                C.vload([0], dtype="int32x4"),
                T.reinterpret(T.broadcast(a_i32, 4), dtype="int8x16"),
                B.vload([0, 0], dtype="int8x16"),
                dtype="int32x4",
            )

    return desc, impl


def register_sdot_intrinsic() -> str:
    """Register :data:`SDOT_INTRIN` (again, overriding: idempotent) and return its name."""
    from tvm.s_tir import TensorIntrin

    TensorIntrin.register(SDOT_INTRIN, *_sdot_desc_impl(), True)
    return SDOT_INTRIN


def _pack_conv_weight(w: np.ndarray) -> np.ndarray:
    """OIHW int8 → ``[⌈O/4⌉, KH, KW, ⌈C/4⌉, 4, 4]`` (zero-padded)."""
    o, c, kh, kw = w.shape
    op, cp = _ceil_to(o, _LANES), _ceil_to(c, _DEPTH)
    w = np.pad(w, [(0, op - o), (0, cp - c), (0, 0), (0, 0)])
    w = w.reshape(op // _LANES, _LANES, cp // _DEPTH, _DEPTH, kh, kw)
    return np.ascontiguousarray(w.transpose(0, 4, 5, 2, 1, 3))


def _pack_matmul_weight(b: np.ndarray) -> np.ndarray:
    """``[K, N]`` int8 → ``[⌈N/4⌉, ⌈K/4⌉, 4, 4]`` (zero-padded)."""
    k, n = b.shape
    kp, np_ = _ceil_to(k, _DEPTH), _ceil_to(n, _LANES)
    b = np.pad(b, [(0, kp - k), (0, np_ - n)]).reshape(kp // _DEPTH, _DEPTH, np_ // _LANES, _LANES)
    return np.ascontiguousarray(b.transpose(2, 0, 3, 1))


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
    hp, wpad = h + top + bottom, w + left + right

    def pack(b: Any, i: Any, j: Any, c4: Any, lane: Any) -> Any:
        ch = c4 * _DEPTH + lane
        inside = tirx.all(i >= top, i < h + top, j >= left, j < w + left, ch < c)
        cc, ii, jj = tirx.min(ch, c - 1), i - top, j - left
        src = x[b, ii, jj, cc] if nhwc else x[b, cc, ii, jj]
        return tirx.if_then_else(inside, src, tirx.const(0, "int8"))

    xp = te.compute((n, hp, wpad, cq, _DEPTH), pack, name="arm_dot_activation")
    (sh, sw), (dh, dw) = strides, dilation
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wpad - dw * (kw - 1) - 1) // sw + 1
    ri, rj = te.reduce_axis((0, kh), "ri"), te.reduce_axis((0, kw), "rj")
    rc, rl = te.reduce_axis((0, cq), "rc"), te.reduce_axis((0, _DEPTH), "rl")
    acc = te.compute(
        (n, oh, ow, og, _LANES),
        lambda b, i, j, o, p: te.sum(
            xp[b, i * sh + ri * dh, j * sw + rj * dw, rc, rl].astype("int32")
            * wp[o, ri, rj, rc, p, rl].astype("int32"),
            axis=[ri, rj, rc, rl],
        ),
        name="arm_dot_conv2d",
    )  # 4 neighbouring output channels per sdot; the padded ones are dropped below
    if nhwc:
        return te.compute(
            (n, oh, ow, out_channels),
            lambda b, i, j, o: acc[b, i, j, o // _LANES, o % _LANES],
            name="arm_dot_nhwc",
        )
    return te.compute(
        (n, out_channels, oh, ow),
        lambda b, o, i, j: acc[b, i, j, o // _LANES, o % _LANES],
        name="arm_dot_nchw",
    )


def _matmul_te(a: Any, bp: Any, out_features: int) -> Any:
    """``[..., M, K]`` int8 activation, packed weight → ``[..., M, N]`` int32."""
    from tvm import te, tirx

    shape = list(a.shape)  # leading dims may be symbolic, the reduction is static
    k = int(shape[-1])
    nq, kq = int(bp.shape[0]), int(bp.shape[1])

    def pack(*idx: Any) -> Any:
        *lead, k4, lane = idx
        kk = k4 * _DEPTH + lane
        return tirx.if_then_else(kk < k, a[(*lead, tirx.min(kk, k - 1))], tirx.const(0, "int8"))

    ap = te.compute((*shape[:-1], kq, _DEPTH), pack, name="arm_dot_activation")
    rk, rl = te.reduce_axis((0, kq), "rk"), te.reduce_axis((0, _DEPTH), "rl")
    acc = te.compute(
        (*shape[:-1], nq, _LANES),
        lambda *idx: te.sum(
            ap[(*idx[:-2], rk, rl)].astype("int32") * bp[idx[-2], rk, idx[-1], rl].astype("int32"),
            axis=[rk, rl],
        ),
        name="arm_dot_matmul",
    )
    return te.compute(
        (*shape[:-1], out_features),
        lambda *idx: acc[(*idx[:-1], idx[-1] // _LANES, idx[-1] % _LANES)],
        name="arm_dot_features",
    )


def UseArmDotKernels(counts: dict[str, int] | None = None) -> Any:  # noqa: N802
    """The Relax module pass: int8 conv2d / matmul with constant weights → ``sdot`` kernels.

    Contract: each ``conv2d(x8, const w8)`` (groups 1, NCHW/OIHW or NHWC/OHWI, static except
    the batch) and ``matmul(a8, const b8)`` (2-D weight) with int32 output becomes a
    ``call_tir`` of :func:`_conv2d_te` / :func:`_matmul_te` with the same int32 result, bit for
    bit; anything else is left as it is. ``counts`` (if given) receives how many conv2d and
    matmul calls were rewritten. Schedule the result with :func:`ScheduleArmDotKernels` after
    fusion to get ``sdot`` (without it the kernels are correct loop nests).
    """
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard

    from hyq_fx.backends.tvm_vnni import tensor_dims

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
            self.done["conv2d"] += 1
            return self.builder_.call_te(
                _conv2d_te, x, relax.const(_pack_conv_weight(weight)),
                tuple(int(s) for s in attrs.strides), tuple(int(p) for p in attrs.padding),
                tuple(int(d) for d in attrs.dilation), weight.shape[0], layouts[0],
                primfunc_name_hint="arm_dot_conv2d",
            )  # fmt: skip

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
            self.done["matmul"] += 1
            return self.builder_.call_te(
                _matmul_te, a, relax.const(_pack_matmul_weight(weight)), weight.shape[1],
                primfunc_name_hint="arm_dot_matmul",
            )  # fmt: skip

    @tvm.transform.module_pass(opt_level=0, name="hyq.UseArmDotKernels")
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


def _schedule_dot_block(sch: Any, block: Any) -> None:
    """Loops ``(spatial..., o4, p | reduce..., l)`` → ``(spatial..., o4, reduce..., p, l)``,
    the init split off, and the ``(p, l)`` 4 × 4 block tensorized with ``sdot``."""
    from tvm import tirx

    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    spatial = [lp for lp, kind in zip(loops, kinds, strict=True) if kind == tirx.IterVar.DataPar]
    reduce = [lp for lp, kind in zip(loops, kinds, strict=True) if kind != tirx.IterVar.DataPar]
    lane, depth = spatial[-1], reduce[-1]
    sch.reorder(*spatial[:-1], *reduce[:-1], lane, depth)
    sch.decompose_reduction(block, reduce[0])
    sch.tensorize(lane, SDOT_INTRIN)


def ScheduleArmDotKernels(counts: dict[str, int] | None = None) -> Any:  # noqa: N802
    """The module pass: tensorize the ``arm_dot_*`` blocks of every fused kernel with ``sdot``.

    Runs on the TIR functions after ``LegalizeOps`` / ``FuseOps`` / ``FuseTIR``. Contract: a
    PrimFunc holding blocks named ``arm_dot_conv2d`` / ``arm_dot_matmul`` (from
    :func:`UseArmDotKernels`) gets, for each, the schedule of :func:`_schedule_dot_block`; the
    function computes the same values (a schedule reorders an integer sum, which is exact);
    other functions are unchanged. ``counts`` (if given) receives the number of blocks
    tensorized. Raises if one of those blocks cannot be tensorized (no silent fallback: the
    kernels would otherwise lose ``sdot`` unnoticed).
    """
    import tvm
    from tvm import s_tir, tirx

    @tvm.transform.module_pass(opt_level=0, name="hyq.ScheduleArmDotKernels")
    def _pass(mod: Any, _ctx: Any) -> Any:
        register_sdot_intrinsic()
        updates = {}
        for gv, func in mod.functions.items():
            # FuseOps names a fused kernel after its parts: fused_arm_dot_conv2d_..._silu
            if not isinstance(func, tirx.PrimFunc) or not any(
                name in gv.name_hint for name in _DOT_BLOCKS
            ):
                continue
            sch = s_tir.Schedule(func)
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
            names = [sch.get(b).name_hint for b in blocks]
            names = [name for name in names if name.startswith(_DOT_BLOCKS)]
            if not names:
                raise ValueError(f"{gv.name_hint}: no {' / '.join(_DOT_BLOCKS)} block to tensorize")
            for name in names:
                _schedule_dot_block(sch, sch.get_sblock(name))
            updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            if counts is not None:
                counts["tensorized"] = counts.get("tensorized", 0) + len(names)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


_FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")
_INSTRUCTION = re.compile(r"^\s+[0-9a-f]+:\s+[0-9a-f]{8}\s+(\S+)")


def kernel_instructions(library: str | Path, objdump: str = OBJDUMP) -> dict[str, list[str]]:
    """``{kernel: [mnemonic, ...]}`` of the compute functions (``*_compute_``) of an aarch64
    library, from ``objdump -d``: a static listing, not the instructions executed."""
    listing = subprocess.run(
        [objdump, "-d", str(library)], capture_output=True, text=True, check=True
    ).stdout
    kernels: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in listing.splitlines():
        if head := _FUNCTION.match(line):
            current = kernels.setdefault(head.group(1), [])
        elif current is not None and (op := _INSTRUCTION.match(line)):
            current.append(op.group(1))
    return {k: v for k, v in kernels.items() if k.endswith("_compute_")}
