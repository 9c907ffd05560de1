"""TVM Relax backend: int8 kernels in the IR, and the built library reproduces the fake-quant model.

A tiny conv + attention module keeps the TVM builds short; every invariant of
``hyq_fx.backends.tvm_relax`` is checked on it:

* ``lower_quantizers`` is exact (explicit int8 Q/DQ ATen ops == FakeQuantizer, to the bit);
* after ``IntegerizeQDQ`` every conv2d / matmul of the Relax IR is int8 × int8 → int32;
* per-channel activation quantizers are lowered to int8 codes too (exactly); the ops whose
  reduction axis carries the channel (conv, linear, matmul) stay in float and are reported once
  each, while a depthwise conv (``depthwise_per_channel``) runs in int8;
* a depthwise conv with a per-channel asymmetric input (padding, stride, dilation, channel
  multiplier, 6-bit codes) built for llvm matches the fake-quant model;
* a 1x1 conv after outlier scaling (per-channel input ``s·α_c``, weight ``Q_w(W·α)·α⁻¹``) runs in
  int8 and its library matches the fake-quant model;
* the llvm library's logits match the fake-quant GraphModule (dynamic batch), also when loaded
  by a runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``, what a deployment machine needs), where a
  CUDA library without the NVIDIA driver is one clear error;
* the aarch64 library is an aarch64 ELF (skipped without ``aarch64-linux-gnu-gcc``);
* float32 ``exp`` built inside ``tvm_fast_exp.fast_exp`` is a polynomial (no ``llvm.exp`` call
  in the LLVM IR) within 1e-6 relative of ``numpy.exp``; outside it TVM's lowering is unchanged;
* ``nearbyint`` (every quantize's rounding) stays vectorized (``llvm.nearbyint.v16f32``) and
  rounds ties to even, as ``torch.round``;
* MetaSchedule tuning (``tune_trials``; its search replaced by untimed records, conftest's
  ``untimed_search``) writes its database beside the library, a rebuild applies it without
  searching, tuning again goes to the kernels without a record first, and the tuned library
  still matches the fake-quant model; a real search is ``benchmarks/tuning_check.py``;
* MetaSchedule's logging setup survives handlers it did not define on its logger (pytest's,
  attached between two tunings of one process).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hyq_fx
import hyq_fx.artifact
from hyq_fx.recipes import Recipe, get_recipe

tvm = pytest.importorskip("tvm")
tvm_relax = pytest.importorskip("hyq_fx.backends.tvm_relax")

EM_AARCH64 = 183  # ELF e_machine
FAST_LLVM = {"kind": "llvm", "opt-level": 0}  # LLVM -O0 builds ~3x faster; same numerics


class TinyHybrid(nn.Module):
    """conv(+BN, SiLU) → depthwise conv (asymmetric, padded input) → one attention block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.bn(self.conv(x)))
        x = F.silu(self.dw(x)) + x
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).reshape(b, h * w, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * (c // 2) ** -0.5).softmax(-1)
        t = t + self.proj((attn @ v).transpose(1, 2).reshape(b, h * w, c))
        return self.head(t.mean(1))


def _quantize(recipe="minmax") -> torch.fx.GraphModule:
    torch.manual_seed(0)
    calib = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return hyq_fx.quantize(TinyHybrid().eval(), calib, recipe, 8, 8, progress=False)


@pytest.fixture(scope="module")
def qgm() -> torch.fx.GraphModule:
    return _quantize()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_lower_quantizers_is_exact(qgm, images):
    lowered, report = tvm_relax.lower_quantizers(qgm)
    assert len(report["int8_weight"]) == 5 and len(report["int8_activation"]) == 9
    assert not report["float"]
    with torch.no_grad():
        assert torch.equal(lowered(images), qgm(images))


def test_relax_ir_runs_conv_and_matmul_in_int8(qgm, images):
    lowered, _ = tvm_relax.lower_quantizers(qgm)
    mod = tvm_relax.import_relax(lowered, images)
    assert tvm_relax.count_ops(mod) == {
        "relax.matmul float32,float32->float32": 5,
        "relax.nn.conv2d float32,float32->float32": 2,
    }
    stats = {}
    mod = tvm_relax.IntegerizeQDQ(stats)(mod)
    # 2 convs, 3 linears (qkv, proj, head) and the 2 attention matmuls, all integer
    assert tvm_relax.count_ops(mod) == {
        "relax.matmul int8,int8->int32": 5,
        "relax.nn.conv2d int8,int8->int32": 2,
    }
    assert stats["main"].conv2d == 2 and stats["main"].matmul == 5 and not stats["main"].skipped
    text = mod.script()
    assert "R.nn.pad(" in text  # the asymmetric depthwise input is padded with its zero point
    assert '"float32") = R.nn.conv2d' not in text


def _recipe(name: str = "minmax", a_bits: int | None = None, **insert_args) -> Recipe:
    """``name`` with extra ``insert_quantizers`` args (and activation options)."""
    data = get_recipe(name).to_dict()
    for step in data["passes"]:
        if step["pass"] == "insert_quantizers":
            step["args"].update(insert_args)
            if a_bits is not None:
                step["args"]["activation"]["bits"] = a_bits
    data["name"] = f"{name}_test"
    return Recipe.from_dict(data)


def _per_channel_inputs(gm: torch.fx.GraphModule) -> list[hyq_fx.FakeQuantizer]:
    return [
        m
        for m in gm.modules()
        if isinstance(m, hyq_fx.FakeQuantizer) and m.role == "activation" and m.spec.per_channel
    ]


def test_per_channel_activation_is_int8_only_where_exact(images):
    data = get_recipe("minmax").to_dict()
    for step in data["passes"]:
        if step["pass"] == "insert_quantizers":
            step["args"]["activation"]["per_channel"] = True
    data["name"] = "minmax_per_channel_act"
    gm = _quantize(Recipe.from_dict(data))
    lowered, report = tvm_relax.lower_quantizers(gm)
    assert len(report["int8_activation"]) == 9 and not report["float"]
    with torch.no_grad():
        torch.testing.assert_close(lowered(images), gm(images), atol=0, rtol=0)
    stats = {}
    mod = tvm_relax.IntegerizeQDQ(stats)(tvm_relax.import_relax(lowered, images))
    # the channel is the reduction axis of the stem conv, the linears and the matmuls: float;
    # the depthwise conv reads one channel per output channel: int8
    assert tvm_relax.count_ops(mod) == {
        "relax.matmul float32,float32->float32": 5,
        "relax.nn.conv2d float32,float32->float32": 1,
        "relax.nn.conv2d int8,int8->int32": 1,
    }
    main = stats["main"]
    assert main.conv2d == 1 and main.depthwise_per_channel == 1 and main.matmul == 0
    assert len(main.skipped) == 6  # one reason per float op, not one per rewrite round
    assert sum("conv2d" in why for why in main.skipped) == 1


class DepthwiseMultiplier(nn.Module):
    """conv → SiLU → depthwise conv ×2 channels (stride 2, dilation 2, padding 2) → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=4)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.silu(self.dw(F.silu(self.conv(x)))).mean((2, 3)))


@pytest.mark.parametrize(
    ("model", "a_bits", "convs", "matmuls"),
    [(TinyHybrid, 8, 2, 5), (DepthwiseMultiplier, 6, 2, 1)],
    ids=["tiny_hybrid_a8", "multiplier_a6"],
)
def test_depthwise_per_channel_input_runs_in_int8_and_matches(
    model, a_bits, convs, matmuls, images, tmp_path
):
    torch.manual_seed(0)
    calib = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    recipe = _recipe(a_bits=a_bits, depthwise_per_channel=True)
    gm = hyq_fx.quantize(model().eval(), calib, recipe, 8, 8, progress=False)
    hyq_fx.artifact.save(gm, tmp_path / "q")  # the CLI path: graph.json holds no meta["val"]
    gm = hyq_fx.artifact.load(tmp_path / "q")
    (fq,) = _per_channel_inputs(gm)  # the depthwise conv's input, and only it
    zero = fq.zero_point.flatten()
    assert fq.spec.axis == 1 and fq.spec.bits == a_bits and zero.numel() > 1
    assert len(set(zero.tolist())) > 1 and bool((zero != 0).any())  # z varies per channel
    stats = {}
    lowered, _ = tvm_relax.lower_quantizers(gm)
    mod = tvm_relax.IntegerizeQDQ(stats)(tvm_relax.import_relax(lowered, images))
    assert tvm_relax.count_ops(mod) == {
        "relax.matmul int8,int8->int32": matmuls,
        "relax.nn.conv2d int8,int8->int32": convs,
    }
    assert stats["main"].depthwise_per_channel == 1 and not stats["main"].skipped
    path = tvm_relax.build_tvm(gm, images[:1], FAST_LLVM, tmp_path / "dw.llvm.so")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["integer_depthwise_per_channel"] == 1 and not meta["float_fallbacks"]
    runner = tvm_relax.TvmRunner(path)
    with torch.no_grad():
        ref, out = gm(images), runner(images)
    assert (out - ref).abs().max().item() < 1e-4
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


class OutlierBottleneck(nn.Module):
    """conv → SiLU → 1x1 conv (two outlier input channels) → ReLU → pool → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pw = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 5)
        with torch.no_grad():
            self.conv.weight[[2, 9]] *= 25.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.pw(F.silu(self.conv(x)))).mean((2, 3)))


def test_outlier_scaled_pointwise_conv_runs_in_int8_and_matches(images, tmp_path):
    """After ``scale_bottleneck_outliers`` behind SiLU the 1x1 conv reads a per-channel input
    ``Q_a(x; s·α_c)`` and the weight ``Q_w(W·α)·α⁻¹``; the α cancel, so ``lower_quantizers``
    drops the ``α⁻¹`` product and reads the codes through ``s``: every conv is int8 and the
    library matches the fake-quant model."""
    from hyq_fx.pass_base import QuantContext, get_pass, run_passes

    calib = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ctx = QuantContext([calib[:8], calib[8:]], w_bits=8, a_bits=6, progress=False)
    gm = hyq_fx.capture(OutlierBottleneck().eval(), calib[:2])
    names = ["insert_quantizers", "calibrate", "scale_bottleneck_outliers"]
    opts = {"scale_bottleneck_outliers": {"steps": 60, "samples": 512, "min_gain": 0.0}}
    gm = run_passes(gm, [get_pass(n)(ctx, **opts.get(n, {})) for n in names])
    assert [e["node"] for e in ctx.log[-1]["per_channel_quantizer"]] == ["conv2d_1"]
    hyq_fx.artifact.save(gm, tmp_path / "q")  # the CLI path
    gm = hyq_fx.artifact.load(tmp_path / "q")
    lowered, report = tvm_relax.lower_quantizers(gm)
    assert len(report["channel_folded"]) == 1 and not report["float"]
    with torch.no_grad():
        ref = gm(images)
        torch.testing.assert_close(lowered(images), ref, atol=1e-5, rtol=1e-5)
    stats = {}
    mod = tvm_relax.IntegerizeQDQ(stats)(tvm_relax.import_relax(lowered, images))
    assert tvm_relax.count_ops(mod) == {
        "relax.matmul int8,int8->int32": 1,
        "relax.nn.conv2d int8,int8->int32": 2,
    }
    path = tvm_relax.build_tvm(gm, images[:1], FAST_LLVM, tmp_path / "pw.llvm.so")
    assert not json.loads(path.with_suffix(".json").read_text())["float_fallbacks"]
    out = tvm_relax.TvmRunner(path)(images)
    assert (out - ref).abs().max().item() < 1e-4


def test_llvm_library_matches_fake_quant(qgm, images, tmp_path):
    # the CLI path: a saved artifact → export_tvm → OUT/model.llvm.so → load_tvm
    hyq_fx.artifact.save(qgm, tmp_path / "q")
    path = tvm_relax.export_tvm(tmp_path / "q", FAST_LLVM)
    assert path == tmp_path / "q" / "model.llvm.so" and tvm_relax.is_tvm_library(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["integer_conv2d"] == 2 and meta["integer_matmul"] == 5
    runner, _info = tvm_relax.load_tvm(path)
    with torch.no_grad():
        for batch in (images, images[:1]):  # one library, any batch size
            ref, out = qgm(batch), runner(batch)
            assert out.shape == ref.shape
            assert (out - ref).abs().max().item() < 1e-4
            assert torch.equal(out.argmax(-1), ref.argmax(-1))
    # a deployment machine needs only TVM's runtime (no 260 MB compiler library): same logits;
    # without the NVIDIA driver, a CUDA library is one clear error, not a loader traceback
    torch.save((images, runner(images)), tmp_path / "ref.pt")
    fake_cuda = tmp_path / "model.cuda.so"
    fake_cuda.write_bytes(b"never loaded: the CUDA runtime check comes first")
    script = (
        "import sys, torch, tvm.base\n"
        "from hyq_fx.backends.tvm_relax import TvmBackendError, TvmRunner\n"
        "assert tvm.base._RUNTIME_ONLY\n"
        f"x, ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        f"out = TvmRunner({str(path)!r})(x)\n"
        "assert torch.equal(out, ref), 'runtime-only logits differ'\n"
        "try:\n"
        f"    TvmRunner({str(fake_cuda)!r}, device='cuda')\n"
        "except TvmBackendError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if shutil.which("nvidia-smi") is None:  # no GPU driver here
        assert "CUDA runtime" in proc.stdout and "NVIDIA driver" in proc.stdout, proc.stdout


def test_fast_exp_is_a_polynomial_within_1e6_and_only_where_asked():
    import numpy as np
    from tvm import relax

    from hyq_fx.backends.tvm_fast_exp import fast_exp, fast_exp_enabled

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 1024), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.exp(x)))
        bb.emit_func_output(out)
    xs = np.concatenate([np.linspace(-80, 80, 4000), [-200, -87.3, 0, 88.3, 200] * 19 + [1]])
    xs = xs.astype("float32").reshape(4, 1024)
    exact = np.exp(np.clip(xs, np.float32(-87.3), np.float32(88.3)).astype("float64"))
    for enabled in (True, False):
        with fast_exp(enabled):
            ex = tvm.compile(bb.get(), target=tvm.target.Target(FAST_LLVM))
        assert not fast_exp_enabled()
        llvm_ir = "".join(m.inspect_source("ll") for m in ex.mod.imports)
        assert ("llvm.exp" in llvm_ir) is not enabled
        got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(xs)).numpy()
        if enabled:  # clamped at both ends: finite, never 0 or inf
            assert np.abs(got / exact - 1).max() < 1e-6
        else:
            assert np.abs(got[np.abs(xs) < 87] / exact[np.abs(xs) < 87] - 1).max() < 1e-6


def test_nearbyint_vectorizes_and_rounds_half_to_even():
    # every quantize's round lowers to nearbyint; TVM 0.27 left it out of the vectorizable
    # ops, so a vectorized loop holding it became a scalar loop again
    import numpy as np
    from tvm import s_tir, te

    import hyq_fx.backends.tvm_fast_exp  # noqa: F401 (registers the attribute)

    a = te.placeholder((4096,), "float32", name="a")
    out = te.compute(a.shape, lambda i: tvm.tirx.nearbyint(a[i]), name="rounded")
    sch = s_tir.Schedule(te.create_prim_func([a, out]))
    (loop,) = sch.get_loops(sch.get_sblock("rounded"))
    sch.vectorize(sch.split(loop, [None, 16])[1])
    lib = tvm.compile(sch.mod, tvm.target.Target(FAST_LLVM))
    assert "llvm.nearbyint.v16f32" in lib.mod.inspect_source("ll")
    xs = np.concatenate([np.arange(-8, 8, 0.5), np.linspace(-300, 300, 4064)]).astype("float32")
    got = tvm.runtime.tensor(np.zeros(4096, "float32"))
    lib["main"](tvm.runtime.tensor(xs), got)
    assert np.array_equal(got.numpy(), np.rint(xs))  # ties to even, as torch.round


def _tiny_conv_linear() -> torch.fx.GraphModule:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(64, 5))
    torch.manual_seed(0)
    return hyq_fx.quantize(model.eval(), torch.randn(4, 3, 4, 4), "minmax", progress=False)


def test_interrupted_build_leaves_no_partial_library(tmp_path, monkeypatch):
    gm = _tiny_conv_linear()
    real_export = tvm_relax._export

    def export_then_fail(executable, out_path, name):
        out_path.write_bytes(b"half a library")
        raise RuntimeError("linker killed")

    monkeypatch.setattr(tvm_relax, "_export", export_then_fail)
    with pytest.raises(RuntimeError, match="linker killed"):
        tvm_relax.build_tvm(gm, torch.randn(1, 3, 4, 4), FAST_LLVM, tmp_path / "m.llvm.so")
    assert not any(tmp_path.iterdir())  # neither the library, its .json nor a temporary file
    monkeypatch.setattr(tvm_relax, "_export", real_export)
    path = tvm_relax.build_tvm(gm, torch.randn(1, 3, 4, 4), FAST_LLVM, tmp_path / "m.llvm.so")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.llvm.json", "m.llvm.so"]
    assert tvm_relax.is_tvm_library(path)
    torch.testing.assert_close(
        tvm_relax.TvmRunner(path)(torch.ones(2, 3, 4, 4)), gm(torch.ones(2, 3, 4, 4)), atol=1e-4,
        rtol=0,
    )  # fmt: skip


def test_aarch64_library_is_an_aarch64_elf(tmp_path):
    if shutil.which(tvm_relax.CROSS_CC["aarch64"]) is None:
        pytest.skip(
            "aarch64-linux-gnu-gcc is not installed (apt-get install -y gcc-aarch64-linux-gnu)"
        )
    gm = _tiny_conv_linear()
    target = {**tvm_relax.TARGETS["aarch64"], "opt-level": 0}
    path = tvm_relax.build_tvm(gm, torch.randn(1, 3, 4, 4), target, tmp_path / "m.aarch64.so")
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 2  # 64-bit
    assert int.from_bytes(header[18:20], "little") == EM_AARCH64
    with pytest.raises(tvm_relax.TvmBackendError, match="aarch64"):
        tvm_relax.TvmRunner(path)


def test_targets():
    assert str(tvm_relax.make_target("aarch64").attrs["mtriple"]) == "aarch64-linux-gnu"
    assert tvm_relax.make_target("cuda").kind.name == "cuda"
    with pytest.raises(tvm_relax.TvmBackendError, match="unknown TVM target"):
        tvm_relax.make_target("x86-gpu")


def test_export_applies_a_database_only_when_tuning_is_asked_for(qgm, tmp_path, monkeypatch):
    # `hyq-fx export OUT --to tvm --tune-trials 0` applies OUT/model.llvm.tuning: a database
    # holds static-shape records, so that library is built for --batch; without the flag the
    # library stays dynamic (any batch) and no database is read
    hyq_fx.artifact.save(qgm, tmp_path / "q")
    seen: list[dict] = []
    monkeypatch.setattr(tvm_relax, "build_tvm", lambda gm, x, t, path, **kw: seen.append(kw))
    tvm_relax.export_tvm(tmp_path / "q", "llvm", tune_trials=0, batch=2)
    tvm_relax.export_tvm(tmp_path / "q", "llvm", tune_trials=None)
    assert seen == [{"tune_trials": 0, "dynamic_batch": False}, {}]


def _tuning_summary(library) -> dict:
    return json.loads(library.with_suffix(".json").read_text())["tuning"]


def _assert_matches(gm, library, x) -> None:
    with torch.no_grad():
        torch.testing.assert_close(tvm_relax.TvmRunner(library)(x), gm(x), atol=1e-4, rtol=0)


def test_metaschedule_tuning_writes_reuses_and_matches(tmp_path, monkeypatch, untimed_search):
    # the search is replaced by untimed records (conftest's untimed_search); everything else is
    # hyq-fx's tuning. TuneContext imports every tensor intrinsic TVM ships (CUDA's alone: 50 s
    # here); a generic llvm target tensorizes nothing, so the test skips that import
    monkeypatch.setitem(sys.modules, "tvm.s_tir.tensor_intrin", types.ModuleType("stub"))
    gm = _tiny_conv_linear()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    lib = tmp_path / "m.llvm.so"
    path = tvm_relax.build_tvm(gm, x, FAST_LLVM, lib, dynamic_batch=False, tune_trials=1)
    tuning = _tuning_summary(path)
    db = tmp_path / "m.llvm.tuning"
    assert tuning["database"] == str(db) and (db / "database_tuning_record.json").is_file()
    # two tasks (the conv and the linear); one trial reaches the first only
    ((conv,),) = untimed_search.visited
    assert tuning["tasks"] == 2 and "conv2d" in conv
    assert tuning["records"] == 1 and tuning["kernels_from_database"] == 1
    _assert_matches(gm, path, x)
    # a rebuild beside the database applies its record without searching again
    path = tvm_relax.build_tvm(gm, x, FAST_LLVM, lib, dynamic_batch=False)
    again = _tuning_summary(path)
    assert again["trials"] == 0 and again["records"] == 1 and again["kernels_from_database"] == 1
    assert len(untimed_search.visited) == 1
    # tuning again spends its trials on the kernel without a record
    path = tvm_relax.build_tvm(gm, x, FAST_LLVM, lib, dynamic_batch=False, tune_trials=2)
    more = _tuning_summary(path)
    (linear,) = untimed_search.visited[-1]
    assert "matmul" in linear and more["tasks_with_records_skipped"] == 1 and more["tasks"] == 1
    assert more["records"] == 2 and more["kernels_from_database"] == 2
    _assert_matches(gm, path, x)
    # on a fresh database a budget of one trial per task reaches every task
    other = tmp_path / "fresh.llvm.so"
    path = tvm_relax.build_tvm(gm, x, FAST_LLVM, other, dynamic_batch=False, tune_trials=2)
    assert untimed_search.visited[-1] == [conv, linear]
    assert _tuning_summary(path)["kernels_from_database"] == 2
    with pytest.raises(ValueError, match="name none of the"):  # a typo tunes nothing silently
        tvm_relax.build_tvm(gm, x, FAST_LLVM, other, dynamic_batch=False, tune_trials=2,
                            tune_ops=["conv2dd"])  # fmt: skip
    # a dynamic-batch build of the same library ignores it; asking to tune one is a clear error
    path = tvm_relax.build_tvm(gm, x, FAST_LLVM, lib)
    assert _tuning_summary(path) is None
    with pytest.raises(tvm_relax.TvmBackendError, match="static shapes"):
        tvm_relax.build_tvm(gm, x, FAST_LLVM, lib, tune_trials=4)
    with pytest.raises(tvm_relax.TvmBackendError, match="host target 'llvm'"):
        tvm_relax.build_tvm(gm, x, "aarch64", tmp_path / "m.aarch64.so", tune_trials=4,
                            dynamic_batch=False)  # fmt: skip
    assert len(untimed_search.visited) == 3  # none of the errors reached a search


def test_metaschedule_logging_setup_survives_handlers_it_did_not_define(tmp_path):
    # MetaSchedule's first logging setup makes its logger non-propagating; pytest then attaches
    # its unnamed capture handlers to it at each test phase, and the next tuning's setup, which
    # lists the logger's handlers by name, failed on them
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir

    from hyq_fx.backends import tvm_tuning

    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    tvm_tuning._detach_foreign_log_handlers()  # pytest's, if a test before this one tuned
    get_loggers_from_work_dir(str(tmp_path / "first"), ["task"])
    assert not logger.propagate
    unnamed, foreign = logging.NullHandler(), logging.NullHandler()
    foreign.set_name("someone.else")
    try:
        logger.addHandler(unnamed)
        with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'format'"):
            get_loggers_from_work_dir(str(tmp_path / "second"), ["task"])
        logger.addHandler(foreign)
        tvm_tuning._detach_foreign_log_handlers()
        get_loggers_from_work_dir(str(tmp_path / "second"), ["task"])
    finally:
        logger.removeHandler(unnamed)
        logger.removeHandler(foreign)
    assert sorted(h.get_name() for h in logger.handlers) == [
        "tvm.s_tir.meta_schedule.console",
        "tvm.s_tir.meta_schedule.file",
    ]
    assert (tmp_path / "second" / "logs").is_dir()


def test_inference_batch_norm_runs_as_in_torch(tmp_path):
    # TVM 0.27 imports aten.batch_norm as if it used the batch's statistics (3.1 off on a
    # BatchNorm2d, LeViT at -44 dB); build_tvm writes it as its affine map first
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.BatchNorm1d(128))
    for bn in (model[1], model[3]):
        bn.running_mean.normal_(generator=torch.Generator().manual_seed(0))
        bn.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    gm = hyq_fx.capture(model.eval(), x)
    path = tvm_relax.build_tvm(gm, x, FAST_LLVM, tmp_path / "bn.llvm.so", integer=False)
    with torch.no_grad():
        torch.testing.assert_close(tvm_relax.TvmRunner(path)(x), gm(x), atol=1e-5, rtol=0)
