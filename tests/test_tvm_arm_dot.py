"""Armv8.2 ``sdot`` int8 kernels on aarch64 (``hyq_fx.backends.tvm_arm_dot``).

* ``UseArmDotKernels`` is exact: the rewritten conv2d / matmul give the int32 results of the
  int8 × int8 kernels (padding, stride, dilation, 3 input channels, a reduction that is not a
  multiple of 4, output channels that are not a multiple of 4, a symbolic batch, NCHW and
  NHWC; built for this host without the ``sdot`` schedule), and it leaves alone what it cannot
  pack (grouped conv, a matmul of two activations);
* it applies to llvm aarch64 targets with ``+dotprod`` only;
* in an aarch64 library built by ``build_tvm``, every rewritten conv / matmul kernel holds
  ``sdot`` instructions (counted in ``aarch64-linux-gnu-objdump -d``), and
  ``build_tvm(..., arm_dot=False)`` leaves LLVM's widening multiplies in at least one of them;
* that library still matches the fake-quant model under qemu (1e-4, same top-1).

The aarch64 tests skip only when the cross compiler or qemu is missing
(``scripts/install_arm_tools.sh``).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hyq_fx

tvm = pytest.importorskip("tvm")
tvm_arm_dot = pytest.importorskip("hyq_fx.backends.tvm_arm_dot")
tvm_relax = pytest.importorskip("hyq_fx.backends.tvm_relax")
tvm_deploy = pytest.importorskip("hyq_fx.backends.tvm_deploy")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_tvm_aarch64 import TinyHybrid, _images  # noqa: E402

GENERIC = {"kind": "llvm", "opt-level": 0}
MISSING_TOOLS = tvm_deploy.aarch64_tools_missing()
OBJDUMP = tvm_arm_dot.OBJDUMP
needs_arm_tools = pytest.mark.skipif(
    bool(MISSING_TOOLS) or shutil.which(OBJDUMP) is None,
    reason=f"missing {', '.join(MISSING_TOOLS) or OBJDUMP}: run scripts/install_arm_tools.sh",
)
# TinyHybrid: conv 3→16 and three linears (qkv, proj, head) have constant int8 weights; the
# depthwise conv and the two attention matmuls (activation × activation) are left to LLVM
EXPECTED_COUNTS = {"conv2d": 1, "matmul": 3, "tensorized": 4}


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
                # output channels padded to a multiple of 4 in the packed weight, then dropped
                conv(h, c(_int8(rng, 6, 16, 1, 1)), out_dtype="int32"),
                conv(x, c(_int8(rng, 19, 3, 3, 3)), padding=(1, 0, 2, 1), out_dtype="int32"),
                relax.op.matmul(t, c(_int8(rng, 30, 10)), out_dtype="int32"),
                # channels last (ConvertChannelsLast's layout)
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
    packed = tvm_arm_dot.UseArmDotKernels(counts)(mod)
    assert counts == {"conv2d": 7, "matmul": 2}
    assert packed.script().count("R.nn.conv2d(") == 1 and packed.script().count("R.matmul(") == 1
    args = [_int8(rng, 2, 3, 11, 11), _int8(rng, 2, 16, 6, 6), _int8(rng, 2, 5, 30)]
    # the extremes: -128 · -128 summed over a whole reduction
    args[1][0] = -128
    results = []
    for m in (mod, packed):
        vm = relax.VirtualMachine(tvm.compile(m, tvm.target.Target(GENERIC)), tvm.cpu())
        results.append([o.numpy() for o in vm["main"](*[tvm.runtime.tensor(a) for a in args])])
    for ref, got in zip(*results, strict=True):
        assert ref.dtype == got.dtype == np.int32 and np.array_equal(ref, got)


@pytest.mark.parametrize(
    ("mattr", "triple", "expected"),
    [
        (["+neon", "+dotprod"], "aarch64-linux-gnu", True),
        (["+neon", "+dotprod", "+i8mm"], "aarch64-linux-android", True),
        (["+neon"], "aarch64-linux-gnu", False),  # Armv8.0 (Cortex-A53): no sdot
        (None, None, False),  # the x86 host
    ],
)
def test_applies_to_aarch64_with_dotprod_only(mattr, triple, expected):
    config = {"kind": "llvm"}
    if triple:
        config.update(mtriple=triple, mattr=mattr)
    assert tvm_arm_dot.arm_dot_available(tvm.target.Target(config)) is expected


@pytest.fixture(scope="module")
def qgm() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return hyq_fx.quantize(TinyHybrid().eval(), _images(16, 0), "minmax", 8, 8, progress=False)


@pytest.fixture(scope="module")
def libraries(qgm, tmp_path_factory) -> dict[bool, Path]:
    if MISSING_TOOLS or shutil.which(OBJDUMP) is None:
        pytest.skip("missing the aarch64 tools: run scripts/install_arm_tools.sh")
    folder = tmp_path_factory.mktemp("arm_dot")
    return {
        arm_dot: tvm_relax.build_tvm(
            qgm, _images(1, 1), "aarch64", folder / f"m{int(arm_dot)}.so", arm_dot=arm_dot
        )
        for arm_dot in (True, False)
    }


@needs_arm_tools
def test_conv_and_matmul_kernels_use_sdot(libraries):
    meta = json.loads(libraries[True].with_suffix(".json").read_text())
    assert meta["arm_dot"] == EXPECTED_COUNTS
    kernels = tvm_arm_dot.kernel_instructions(libraries[True])
    dot_kernels = {k: ops for k, ops in kernels.items() if k.startswith("fused_arm_dot_")}
    sdots = {k: ops.count("sdot") for k, ops in dot_kernels.items()}
    assert sum("conv2d" in k for k in sdots) == EXPECTED_COUNTS["conv2d"], sdots
    assert sum("matmul" in k for k in sdots) == EXPECTED_COUNTS["matmul"], sdots
    assert all(count >= 4 for count in sdots.values()), sdots
    # their inner loops are sdot, not LLVM's widening multiply-adds
    widening = {k: sum(ops.count(m) for m in ("smull", "smull2", "smlal", "smlal2")) for k, ops
                in dot_kernels.items()}  # fmt: skip
    assert not any(widening.values()), widening

    without = json.loads(libraries[False].with_suffix(".json").read_text())
    assert without["arm_dot"] is None
    plain = tvm_arm_dot.kernel_instructions(libraries[False])
    assert not any(k.startswith("fused_arm_dot_") for k in plain)
    # without the rewrite, a constant-weight matmul (the weight's reduction is strided) is
    # vectorized with widening multiply-adds instead
    assert any("smlal" in ops and "matmul" in k for k, ops in plain.items())


@needs_arm_tools
@pytest.mark.parametrize("batch", [1, 3])
def test_sdot_library_matches_fake_quant_under_qemu(qgm, libraries, batch):
    images = _images(batch, 5)
    logits = tvm_deploy.run_aarch64(libraries[True], images)
    with torch.no_grad():
        expected = qgm(images)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-4
    assert torch.equal(logits.argmax(1), expected.argmax(1))
