"""AVX-512 VNNI int8 kernels (``hyq_fx.backends.tvm_vnni``).

* ``UseVnniKernels`` is exact: the rewritten conv2d / matmul give the same int32 results as the
  int8 × int8 kernels (padding, stride, dilation, 3 input channels, a reduction that is not a
  multiple of 4, output channels that are not a multiple of 16, a symbolic batch, NCHW and
  NHWC), and it leaves
  alone what it cannot pack (grouped conv, a matmul of two activations);
* the registered ``dot_16x4_vnni`` intrinsic builds (TVM 0.27's own does not, with its LLVM) and
  emits ``vpdpbusd``; on a CPU with VNNI the tensorized kernel matches numpy;
* registering it loads TVM's x86 intrinsics only, not its whole intrinsic package, and the
  registered ``dot_16x4_vnni`` is ours whether that package is imported after it or before;
* ``build_tvm`` applies it for a VNNI CPU only, and the library still matches the fake-quant
  model;
* a tuning database whose records tensorize with the intrinsic (committed without a search,
  conftest's ``untimed_search``) rebuilds into a library that calls ``vpdpbusd`` (the records
  replay the tensorize step by the intrinsic's name); on a VNNI CPU it matches the fake-quant
  model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

import hyq_fx

tvm = pytest.importorskip("tvm")
tvm_vnni = pytest.importorskip("hyq_fx.backends.tvm_vnni")
tvm_relax = pytest.importorskip("hyq_fx.backends.tvm_relax")

GENERIC = {"kind": "llvm", "opt-level": 0}
VNNI_CPU = {"kind": "llvm", "mcpu": "cascadelake", "opt-level": 0}  # AVX-512 VNNI


def _host_has_vnni() -> bool:
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    return tvm_vnni.vnni_available(tvm.target.Target({"kind": "llvm", "mcpu": cpu}))


def _int8(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(-128, 128, shape).astype("int8")


def test_rewrite_is_exact_and_leaves_what_it_cannot_pack():
    from tvm import relax, tirx

    rng = np.random.default_rng(0)
    conv = relax.op.nn.conv2d
    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, 3, 11, 11), "int8"))
    h = relax.Var("h", relax.TensorType((n, 16, 6, 6), "int8"))
    t = relax.Var("t", relax.TensorType((n, 5, 30), "int8"))
    nhwc = {"data_layout": "NHWC", "kernel_layout": "OHWI", "out_dtype": "int32"}
    bb = relax.BlockBuilder()
    with bb.function("main", [x, h, t]):
        with bb.dataflow():
            c = relax.const
            outs = [
                conv(x, c(_int8(rng, 16, 3, 3, 3)), strides=2, padding=1, out_dtype="int32"),
                conv(h, c(_int8(rng, 32, 16, 1, 1)), out_dtype="int32"),
                conv(h, c(_int8(rng, 16, 16, 3, 3)), padding=2, dilation=2, out_dtype="int32"),
                relax.op.matmul(t, c(_int8(rng, 30, 32)), out_dtype="int32"),  # K = 30
                # output channels padded to 16 / 32 in the packed weight, then dropped
                conv(h, c(_int8(rng, 8, 16, 1, 1)), out_dtype="int32"),
                conv(x, c(_int8(rng, 19, 3, 3, 3)), padding=1, out_dtype="int32"),
                relax.op.matmul(t, c(_int8(rng, 30, 10)), out_dtype="int32"),
                # channels last (ConvertChannelsLast's layout), 19 channels padded to 32
                conv(relax.op.permute_dims(x, [0, 2, 3, 1]), c(_int8(rng, 19, 3, 3, 3)), **nhwc,
                     strides=2, padding=1),
                conv(relax.op.permute_dims(h, [0, 2, 3, 1]), c(_int8(rng, 32, 1, 1, 16)), **nhwc),
                # left alone: depthwise, two activations
                conv(h, c(_int8(rng, 16, 1, 3, 3)), padding=1, groups=16, out_dtype="int32"),
                relax.op.matmul(t, relax.op.permute_dims(t, [0, 2, 1]), out_dtype="int32"),
            ]  # fmt: skip
            out = bb.emit_output(relax.Tuple([bb.emit(o) for o in outs]))
        bb.emit_func_output(out)
    mod = bb.get()
    counts: dict[str, int] = {}
    packed = tvm_vnni.UseVnniKernels(counts)(mod)
    assert counts == {"conv2d": 7, "matmul": 2}
    assert packed.script().count("R.nn.conv2d(") == 1 and packed.script().count("R.matmul(") == 1
    args = [_int8(rng, 2, 3, 11, 11), _int8(rng, 2, 16, 6, 6), _int8(rng, 2, 5, 30)]
    results = []
    for m in (mod, packed):
        vm = relax.VirtualMachine(tvm.compile(m, tvm.target.Target(GENERIC)), tvm.cpu())
        results.append([o.numpy() for o in vm["main"](*[tvm.runtime.tensor(a) for a in args])])
    for ref, got in zip(*results, strict=True):
        assert ref.dtype == got.dtype == np.int32 and np.array_equal(ref, got)


def test_vnni_intrinsic_builds_vpdpbusd_and_matches():
    from tvm import s_tir, te

    tvm_vnni.register_vnni_intrinsic()
    rng = np.random.default_rng(1)
    a_np, b_np = _int8(rng, 8, 64), _int8(rng, 64, 32)
    a = te.placeholder((8, 64), "int8", name="a")
    bp = te.placeholder((2, 16, 16, 4), "int8", name="bp")
    out = tvm_vnni._matmul_te(a, bp, 32)
    sch = s_tir.Schedule(te.create_prim_func([a, bp, out]))
    block = sch.get_sblock("vnni_matmul")
    m, j, k = sch.get_loops(block)
    jo, ji = sch.split(j, [None, 16])
    ko, ki = sch.split(k, [None, 4])
    sch.reorder(m, jo, ko, ji, ki)
    sch.decompose_reduction(block, ko)
    sch.tensorize(ji, "dot_16x4_vnni")
    lib = tvm.compile(sch.mod, tvm.target.Target(VNNI_CPU))
    assert "vpdpbusd" in lib.mod.inspect_source("asm")
    if not _host_has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI: the kernel is built, not run")
    args = [a_np, tvm_vnni._pack_matmul_weight(b_np), np.zeros((8, 32), "int32")]
    tensors = [tvm.runtime.tensor(v) for v in args]
    lib["main"](*tensors)
    # the kernel computes Σ (a + 128)·b; the pass subtracts 128·Σb after it
    ref = a_np.astype(np.int64) @ b_np.astype(np.int64) + 128 * b_np.astype(np.int64).sum(0)
    assert np.array_equal(tensors[2].numpy(), ref)


# run in a fresh process: the intrinsic registry and the module cache are per process. The
# intrinsics of the other targets are stubbed (their import is the slow part, and none of them
# touches dot_16x4_vnni); the package's __init__ and its x86 module run for real
_REGISTRATION_ORDER = """
import importlib.util, sys, types
import tvm, tvm_ffi
from tvm.s_tir import TensorIntrin

spec = importlib.util.spec_from_file_location("tvm_vnni", sys.argv[2])  # without torch and timm
tvm_vnni = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tvm_vnni)
for name in ("cuda", "arm_cpu", "rocm", "hexagon", "riscv_cpu"):
    sys.modules["tvm.s_tir.tensor_intrin." + name] = types.ModuleType(name)
if sys.argv[1] == "ours_first":
    tvm_vnni.register_vnni_intrinsic()
    assert "tvm.s_tir.tensor_intrin" not in sys.modules, "the registration imported the package"
    import tvm.s_tir.tensor_intrin as package  # as MetaSchedule's TuneContext does
else:
    import tvm.s_tir.tensor_intrin as package
    tvm_vnni.register_vnni_intrinsic()
assert package.__file__.endswith("__init__.py") and "x86" in vars(package)
registered = TensorIntrin.get("dot_16x4_vnni").impl
assert tvm_ffi.structural_equal(registered, tvm_vnni._vpdpbusd_16x4()), "not ours"
assert not tvm_ffi.structural_equal(registered, package.x86.dot_product_16x4_u8i8i32_vnni)
assert TensorIntrin.get("dot_16x4_avx512", allow_missing=True) is not None  # x86.py ran
"""


@pytest.mark.parametrize("order", ["ours_first", "package_first"])
def test_registered_intrinsic_stays_ours_whatever_the_import_order(order):
    proc = subprocess.run(
        [sys.executable, "-c", _REGISTRATION_ORDER, order, tvm_vnni.__file__],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_build_tvm_uses_vnni_only_on_a_vnni_cpu(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(16, 32, 1), nn.SiLU(),
        nn.Flatten(), nn.Linear(32 * 16, 16),
    )  # fmt: skip
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    gm = hyq_fx.quantize(model.eval(), x, "minmax", progress=False)
    for target, expected in ((GENERIC, None), (VNNI_CPU, {"conv2d": 2, "matmul": 1})):
        path = tvm_relax.build_tvm(gm, x, target, tmp_path / "m.so")
        meta = json.loads(path.with_suffix(".json").read_text())
        assert meta["vnni"] == expected
        assert meta["integer_conv2d"] == 2 and meta["integer_matmul"] == 1
        if expected and not _host_has_vnni():
            continue  # built for a VNNI CPU; this one cannot run it
        with torch.no_grad():
            torch.testing.assert_close(tvm_relax.TvmRunner(path)(x), gm(x), atol=1e-4, rtol=0)


def _tensorize_vnni_conv(sch) -> None:
    """The VNNI conv kernel's dot product as ``dot_16x4_vnni`` calls: output channels split by
    16, input channels by 4, that 16 × 4 block innermost and tensorized (MetaSchedule's VNNI
    rule does the same, with tiling around it)."""
    block = sch.get_sblock("vnni_conv2d")
    *_, out_channel, kernel_h, kernel_w, in_channel = sch.get_loops(block)
    out_outer, out_inner = sch.split(out_channel, [None, 16])
    in_outer, in_inner = sch.split(in_channel, [None, 4])
    sch.reorder(out_outer, kernel_h, kernel_w, in_outer, out_inner, in_inner)
    sch.decompose_reduction(block, kernel_h)
    sch.tensorize(out_inner, "dot_16x4_vnni")


def _disassembly(library) -> str:
    if shutil.which("objdump") is None:
        pytest.skip("objdump is not installed (binutils)")
    return subprocess.run(
        ["objdump", "-d", str(library)], capture_output=True, text=True, check=True
    ).stdout


def test_tuned_vnni_library_reuses_its_database_and_matches(tmp_path, monkeypatch, untimed_search):
    # records that tensorize with the intrinsic (conftest's untimed_search commits them without
    # a search), so the library is built and replayed on any x86 CPU and run on a VNNI one
    # TuneContext imports every tensor intrinsic TVM ships (27-66 s here), which the untimed
    # search does not use; that import after the registration is checked above
    monkeypatch.setitem(sys.modules, "tvm.s_tir.tensor_intrin", types.ModuleType("stub"))
    model = nn.Sequential(nn.Conv2d(16, 32, 1), nn.SiLU(), nn.Conv2d(32, 16, 3, padding=1))
    torch.manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    gm = hyq_fx.quantize(model.eval(), x, "minmax", progress=False)
    lib = tmp_path / "m.llvm.so"
    target = {**VNNI_CPU, "num-cores": 2}
    tvm_relax.build_tvm(gm, x, target, lib, dynamic_batch=False)
    assert "vpdpbusd" not in _disassembly(lib)  # TVM's default schedules do not emit it
    untimed_search.schedule = _tensorize_vnni_conv
    tvm_relax.build_tvm(gm, x, target, lib, dynamic_batch=False, tune_trials=2, tune_ops=["vnni"])
    tuned = json.loads(lib.with_suffix(".json").read_text())
    assert tuned["vnni"] == {"conv2d": 2, "matmul": 0}
    assert [len(names) for names in untimed_search.visited] == [2]
    assert tuned["tuning"]["tasks"] == 2 and tuned["tuning"]["records"] == 2
    # the records replay the tensorize step by the intrinsic's name: a rebuild applies them
    tvm_relax.build_tvm(gm, x, target, lib, dynamic_batch=False)
    again = json.loads(lib.with_suffix(".json").read_text())["tuning"]
    assert again["trials"] == 0 and again["kernels_from_database"] == 2
    assert "vpdpbusd" in _disassembly(lib)
    if not _host_has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI: the tuned library is built, not run")
    with torch.no_grad():
        torch.testing.assert_close(tvm_relax.TvmRunner(lib)(x), gm(x), atol=1e-4, rtol=0)
