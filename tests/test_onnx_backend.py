"""ONNX QDQ backend: the float translation is exact, the QDQ file has the promised structure
(int8 weights stored once, per-channel DequantizeLinear, ~¼ of FP32), and ONNX Runtime computes
what the fake-quant GraphModule computes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import numpy_helper

import hyq_fx
import hyq_fx.recipes
from hyq_fx.backends.onnx_qdq import ExportError, OnnxRunner, export_onnx_qdq, onnx_node_counts
from hyq_fx.data import evaluate_top1
from hyq_fx.quantize import quantizers_mode

SIZE = 64


def _sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (test - ref).pow(2).mean().clamp_min(1e-30)))


def _float_export_matching(model: torch.nn.Module, x: torch.Tensor, path: Path) -> Path:
    """``model`` captured (minmax), exported with quantizers off to ``path``, and checked to
    compute what ``model`` computes (1e-5)."""
    torch.manual_seed(0)
    qgm = hyq_fx.quantize(model.eval(), x, "minmax", progress=False)
    with quantizers_mode(qgm, "off"):
        export_onnx_qdq(qgm, path, x[:2])
    with torch.no_grad():
        torch.testing.assert_close(OnnxRunner(path)(x), model(x), atol=1e-5, rtol=1e-5)
    return path


@pytest.fixture(scope="module")
def qxxs():
    """Random-init mobilevit_xxs (10 classes) quantized W8A8 minmax at 64x64, and its float."""
    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs", num_classes=10).eval()
    calib = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    qgm = hyq_fx.quantize(model, calib, "minmax", progress=False)
    return model, qgm, calib


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def reference(qxxs, inputs):
    """Logits of the float model and of the fake-quant GraphModule on ``inputs``."""
    model, qgm, _ = qxxs
    with torch.no_grad():
        return model(inputs), qgm(inputs)


@pytest.fixture(scope="module")
def exported(qxxs, tmp_path_factory):
    _, qgm, calib = qxxs
    out = tmp_path_factory.mktemp("onnx")
    with quantizers_mode(qgm, "off"):
        fp32 = export_onnx_qdq(qgm, out / "fp32.onnx", calib)
    return {
        "fp32": fp32,
        "auto": export_onnx_qdq(qgm, out / "auto.onnx", calib, requantize="auto", calib=calib),
        "none": export_onnx_qdq(qgm, out / "none.onnx", calib, requantize="none"),
    }


def test_float_translation_is_exact(exported, inputs, reference):
    ref = reference[0]
    for batch in (inputs[:1], inputs[:3], inputs):  # dynamic batch
        out = OnnxRunner(exported["fp32"])(batch)
        torch.testing.assert_close(out, ref[: len(batch)], atol=1e-5, rtol=1e-5)


def test_qdq_file_structure(exported):
    model = onnx.load(str(exported["auto"]))
    onnx.checker.check_model(model, full_check=True)
    counts = onnx_node_counts(exported["auto"])
    assert counts["QuantizeLinear"] > 30 and counts["DequantizeLinear"] > 60
    assert counts["DepthToSpace"] == 3  # the token folds (hyq_fx.lowering)
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    weight_dqs = [
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dims
    ]
    int8 = [d for d in weight_dqs if inits[d.input[0]].data_type == onnx.TensorProto.INT8]
    assert len(int8) == 72  # every conv and linear weight of mobilevit_xxs (35 + 37)
    for dq in int8:  # per-channel: one scale per output channel, along the named axis
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        w, scale = (numpy_helper.to_array(inits[dq.input[i]]) for i in (0, 1))
        assert scale.shape == (w.shape[axis],)
        assert np.abs(w).max() <= 127
    for node in model.graph.node:  # no float weight reaches a Conv / MatMul / Gemm
        if node.op_type in ("Conv", "MatMul", "Gemm") and len(node.input) > 1:
            src = node.input[1]
            assert src not in inits, f"{node.name} reads a float weight"
            assert producers[src].op_type in ("DequantizeLinear", "Transpose", "Mul")
    ratio = exported["auto"].stat().st_size / exported["fp32"].stat().st_size
    assert ratio <= 0.35, ratio


def test_onnxruntime_uses_integer_kernels(exported, tmp_path):
    opt = tmp_path / "opt.onnx"
    runner = OnnxRunner(exported["auto"], optimized_model_path=opt)
    counts = onnx_node_counts(opt)
    assert counts.get("QLinearConv", 0) >= 25, counts  # DQ → Conv → Q fused
    assert counts.get("MatMulIntegerToFloat", 0) + counts.get("QLinearMatMul", 0) >= 40, counts
    assert len(runner.export_report["requantized"]) >= 25
    # the three inverted bottlenecks with a skip: conv + residual as QLinearConv + QLinearAdd
    assert counts.get("QLinearAdd", 0) == 3 and counts.get("QLinearConcat", 0) == 3, counts
    assert runner.export_report["scalar_mul_folded"] == 9  # q · d^-½ of the 9 attentions


def test_exact_export_matches_fake_quant(exported, inputs, reference):
    """requantize="none" computes the fake-quant graph; the only differences are quantizer
    outputs flipped by one step where torch and ONNX Runtime round a tie differently after
    float sums in another order (these then propagate), so the bound is statistical."""
    fp, fq = reference
    out = OnnxRunner(exported["none"])(inputs)
    sqnr, quant_sqnr = _sqnr_db(fq, out), _sqnr_db(fp, fq)
    agree = float((out.argmax(1) == fq.argmax(1)).float().mean())
    print(f"none: max|Δ| {float((out - fq).abs().max()):.3g}, SQNR {sqnr:.1f} dB "
          f"(quantization itself: {quant_sqnr:.1f} dB), top-1 agreement {agree:.3f}")  # fmt: skip
    assert sqnr > 20 and sqnr > quant_sqnr - 3
    assert agree >= 0.75


def test_requantized_export_stays_close(exported, inputs, reference):
    fq = reference[1]
    out = OnnxRunner(exported["auto"])(inputs)
    sqnr = _sqnr_db(fq, out)
    agree = float((out.argmax(1) == fq.argmax(1)).float().mean())
    print(f"auto: max|Δ| {float((out - fq).abs().max()):.3g}, SQNR {sqnr:.1f} dB, "
          f"top-1 agreement {agree:.3f}")  # fmt: skip
    assert sqnr > 12


def test_silu_as_ort_quickgelu_computes_the_same_without_sigmoid_mul(
    qxxs, exported, inputs, tmp_path
):
    """``ort_contrib_ops`` with ``requantize="exact"``: SiLU as QuickGelu and ``linear`` as
    MatMulIntegerToFloat with its bias give the same logits as the plain ONNX export."""
    _, qgm, calib = qxxs
    path = export_onnx_qdq(
        qgm, tmp_path / "ms.onnx", calib, requantize="exact", ort_contrib_ops=True
    )  # onnx.checker ran on it (check=True)
    model = onnx.load(path)
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ops.count(("com.microsoft", "QuickGelu")) == 34  # every SiLU of mobilevit_xxs
    assert not any(t == "Sigmoid" for _, t in ops)
    # and every linear's bias is added inside the integer matmul (36 in the transformers, head)
    assert ops.count(("com.microsoft", "MatMulIntegerToFloat")) == 37
    assert any(o.domain == "com.microsoft" for o in model.opset_import)
    out = OnnxRunner(path)(inputs)
    plain = OnnxRunner(export_onnx_qdq(qgm, tmp_path / "plain.onnx", calib, requantize="exact"))
    ref = plain(inputs)
    assert float((out - ref).abs().max()) < 1e-5 * float(ref.abs().max())


def test_silu_behind_a_requantized_conv_runs_on_uint8_codes(
    qxxs, exported, inputs, reference, tmp_path
):
    """With ``requantize="auto"``, ``DQ → QuickGelu → Q`` becomes ``QLinearSigmoid`` +
    ``QLinearMul`` on the codes: one more rounding (σ on k/255), so the logits are about as
    close to fake-quant as the float-SiLU export's (random init: ~20 dB both); ONNX Runtime
    keeps the integer convs around them."""
    _, qgm, calib = qxxs
    path = export_onnx_qdq(
        qgm, tmp_path / "ms.onnx", calib, requantize="auto", calib=calib, ort_contrib_ops=True
    )
    model = onnx.load(path)
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    report = json.loads({p.key: p.value for p in model.metadata_props}["hyq_export"])
    n = report["silu_in_uint8"]
    assert n >= 10 and ops.count(("com.microsoft", "QLinearSigmoid")) == n
    assert ops.count(("com.microsoft", "QLinearMul")) == n
    assert ops.count(("com.microsoft", "QuickGelu")) == 34 - n
    opt = tmp_path / "opt.onnx"
    out = OnnxRunner(path, optimized_model_path=opt)(inputs)
    plain = OnnxRunner(exported["auto"])(inputs)
    fake_quant = reference[1]
    assert _sqnr_db(fake_quant, out) > _sqnr_db(fake_quant, plain) - 3
    counts = onnx_node_counts(opt)
    assert counts.get("Sigmoid", 0) == 0 and counts.get("QLinearConv", 0) >= 25, counts


class _Small(torch.nn.Module):
    """conv → ReLU → conv → SiLU → pool → linear: few quantizers, so few one-step flips."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x):
        y = torch.nn.functional.silu(self.c2(torch.relu(self.c1(x))))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("requantize", ["none", "exact"])
def test_small_model_is_exact_per_quantizer(tmp_path, requantize):
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    qgm = hyq_fx.quantize(_Small().eval(), x, "minmax", progress=False)
    path = export_onnx_qdq(qgm, tmp_path / "s.onnx", x[:2], requantize=requantize, opset=21)
    with torch.no_grad():
        ref = qgm(x)
    out = OnnxRunner(path)(x)
    assert _sqnr_db(ref, out) > 30
    assert bool((out.argmax(1) == ref.argmax(1)).all())


class _Depthwise(torch.nn.Module):
    """conv → SiLU → depthwise conv ×2 channels (stride 2) → SiLU → pool → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8)
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x):
        y = torch.nn.functional.silu(self.dw(torch.nn.functional.silu(self.c1(x))))
        return self.fc(y.mean((2, 3)))


def _dw_per_channel_recipe() -> hyq_fx.recipes.Recipe:
    data = hyq_fx.recipes.get_recipe("minmax").to_dict()
    for step in data["passes"]:
        if step["pass"] == "insert_quantizers":
            step["args"]["depthwise_per_channel"] = True
    data["name"] = "minmax_dw_per_channel"
    return hyq_fx.recipes.Recipe.from_dict(data)


def _quantize_dw_per_channel(model_cls, x: torch.Tensor, a_bits: int):
    """``model_cls()`` quantized with minmax + per-channel depthwise inputs, W8 / ``a_bits``."""
    torch.manual_seed(0)
    return hyq_fx.quantize(
        model_cls().eval(), x, _dw_per_channel_recipe(), w_bits=8, a_bits=a_bits, progress=False
    )


def test_per_channel_activation_is_per_tensor_q_and_per_axis_dq(tmp_path):
    """``depthwise_per_channel``: the depthwise conv's input quantizer (per-channel scale and
    zero point along axis 1, 6-bit) is a per-tensor QuantizeLinear of ``x·(s̄/s_c) + (z_c −
    z̄)·s̄`` (the same codes; no per-axis Q, which ONNX Runtime may move to a slow axis) and a
    DequantizeLinear with ``axis=1`` and [C] scale / zero point; ONNX Runtime agrees."""
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    qgm = _quantize_dw_per_channel(_Depthwise, x, a_bits=6)
    acts = [m for m in qgm.modules() if isinstance(m, hyq_fx.FakeQuantizer) and m.role != "weight"]
    (fq,) = [m for m in acts if m.spec.per_channel]
    assert fq.spec.axis == 1 and len(set(fq.zero_point.flatten().tolist())) > 1
    path = export_onnx_qdq(qgm, tmp_path / "dw.onnx", x[:2], requantize="none", calib=x)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quants = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quants) == len(acts)  # every activation quantizer exported, none left float
    qdq = ("QuantizeLinear", "DequantizeLinear")
    per_axis = [n for n in model.graph.node if n.op_type in qdq and n.input[0] not in inits and
                any(a.name == "axis" for a in n.attribute)]  # fmt: skip
    assert [n.op_type for n in per_axis] == ["DequantizeLinear"]
    producers = {o: n for n in model.graph.node for o in n.output}
    (q,) = [n for n in quants if n.input[0] in producers and producers[n.input[0]].op_type == "Add"]
    assert producers[producers[q.input[0]].input[0]].op_type == "Mul"
    for node in per_axis:
        assert next(a.i for a in node.attribute if a.name == "axis") == 1
        scale, zero = inits[node.input[1]], inits[node.input[2]]
        np.testing.assert_array_equal(scale, fq.scale.flatten().numpy())
        assert zero.dtype == np.uint8
        np.testing.assert_array_equal(zero, fq.zero_point.flatten().numpy().astype(np.uint8))
    with torch.no_grad():
        ref = qgm(x)
    out = OnnxRunner(path)(x)
    assert _sqnr_db(ref, out) > 30
    assert bool((out.argmax(1) == ref.argmax(1)).all())


def _check_folded_export(gm, x, tmp_path: Path, kind: str) -> list[str]:
    """Export with ``requantize="exact"``: one conv folded (``kind``), run by ONNX Runtime as
    its one QLinearConv, the logits the fake-quant model's to float rounding; the op types."""
    path = export_onnx_qdq(gm, tmp_path / "folded.onnx", x[:2], requantize="exact")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    report = json.loads({p.key: p.value for p in model.metadata_props}["hyq_export"])
    assert [f["kind"] for f in report["channel_folded"]] == [kind]
    opt = tmp_path / "folded_ort.onnx"
    runner = OnnxRunner(path, optimized_model_path=opt)
    assert onnx_node_counts(opt).get("QLinearConv", 0) == 1
    with torch.no_grad():
        ref = gm(x)
    assert _sqnr_db(ref, runner(x)) > 80
    return [n.op_type for n in model.graph.node]


class _DepthwiseThenPointwise(torch.nn.Module):
    """conv → SiLU → depthwise conv (padded, stride 2) → ReLU → 1x1 conv → ReLU → pool → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8)
        self.pw = torch.nn.Conv2d(16, 12, 1)
        self.fc = torch.nn.Linear(12, 5)

    def forward(self, x):
        y = torch.relu(self.dw(torch.nn.functional.silu(self.c1(x))))
        return self.fc(torch.relu(self.pw(y)).mean((2, 3)))


def test_per_channel_input_of_depthwise_conv_folds_into_qlinearconv(tmp_path):
    """A depthwise conv behind a per-channel input quantizer (scales s_c, unequal zero points
    z_c) is written as per-axis QuantizeLinear → DequantizeLinear(s̄, z̄) → Conv, the ratio
    s_c/s̄ in the weight scales and the zero-point offset in the bias (the input padded before
    QuantizeLinear), so ONNX Runtime runs it as QLinearConv; with ``requantize="exact"`` the
    result is the fake-quant model's up to float rounding."""
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    qgm = _quantize_dw_per_channel(_DepthwiseThenPointwise, x, a_bits=6)
    (fq,) = [m for m in qgm.modules() if isinstance(m, hyq_fx.FakeQuantizer) and
             m.role != "weight" and m.spec.per_channel]  # fmt: skip
    assert len(set(fq.zero_point.flatten().tolist())) > 1  # the bias correction is exercised
    ops = _check_folded_export(qgm, x, tmp_path, "depthwise, zero points via the bias")
    assert ops.count("Pad") == 1


def test_requantizing_for_a_per_channel_quantizer_is_measured(tmp_path):
    """A conv whose output reaches a per-channel quantizer (through SiLU) can only get one
    uint8 grid; ``requantize="auto"`` fits it on the calibration outputs and keeps it only if
    it adds at most ``max_added_error`` to that quantizer's own error (8-bit channels of unequal
    range: it would add more, so the conv stays float), and says what it added."""

    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    qgm = _quantize_dw_per_channel(_DepthwiseThenPointwise, x, a_bits=8)
    with torch.no_grad():
        ref = qgm(x)

    def export(name: str, **kw) -> dict:
        path = export_onnx_qdq(qgm, tmp_path / name, x[:2], requantize="auto", calib=x, **kw)
        assert _sqnr_db(ref, OnnxRunner(path)(x)) > 30
        meta = onnx.load(str(path)).metadata_props
        return json.loads({p.key: p.value for p in meta}["hyq_export"])

    assert "conv2d" in export("default.onnx")["float_convs"]
    why = {r["conv"]: r["why"] for r in export("loose.onnx", max_added_error=100)["requantized"]}
    added = float(why["conv2d"].split("+")[1].split("%")[0]) / 100
    assert 100 > added > 1.0  # above the default bound


class _Residual(torch.nn.Module):
    """conv → SiLU → 1x1 conv (no activation) + residual → 3x3 conv → pool → linear: an
    inverted bottleneck's projection and skip, as in MobileNetV2 / MobileViT blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.pw = torch.nn.Conv2d(16, 16, 1)
        self.c3 = torch.nn.Conv2d(16, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = torch.nn.functional.silu(self.c1(x))
        return self.fc(self.c3(self.pw(y) + y).mean((2, 3)))


def test_conv_plus_residual_becomes_qlinearconv_and_qlinearadd(tmp_path):
    """``requantize="auto"``: a conv whose output is added to a residual on its way to a
    quantizer gets a uint8 grid fitted so that the sum's codes change least, the residual is
    read as codes (here those of the quantizer of its other use, the 1x1 conv's input), and
    ONNX Runtime runs ``conv + r`` as QLinearConv + QLinearAdd instead of a float Conv on
    dequantized input. The logits stay as close to fake-quant as the float-conv export's (a
    few dB); without calibration images, or with ``max_added_error=0``, the conv stays float."""
    x = torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    qgm = hyq_fx.quantize(_Residual().eval(), x, "minmax", progress=False)
    with torch.no_grad():
        ref = qgm(x)

    def export(name: str, **kw) -> tuple[dict, dict, torch.Tensor]:
        path = export_onnx_qdq(qgm, tmp_path / name, x[:2], requantize="auto", **kw)
        opt = tmp_path / f"{name}.opt.onnx"
        out = OnnxRunner(path, optimized_model_path=opt)(x)
        meta = onnx.load(str(path)).metadata_props
        return json.loads({p.key: p.value for p in meta}["hyq_export"]), onnx_node_counts(opt), out

    report, counts, out = export("residual.onnx", calib=x)
    why = {r["conv"]: r["why"] for r in report["requantized"]}
    assert "conv2d_1" in why and "residual" in why["conv2d_1"], report
    assert report["float_convs"] == ["conv2d_2"]  # the last one feeds the float mean
    assert counts.get("QLinearAdd", 0) == 1 and counts.get("QLinearConv", 0) == 2, counts
    assert counts.get("Conv", 0) + counts.get("FusedConv", 0) == 1, counts
    for kw in ({}, {"calib": x, "max_added_error": 0.0}):
        report_f, counts_f, out_f = export("float.onnx", **kw)
        assert "conv2d_1" in report_f["float_convs"] and counts_f.get("QLinearAdd", 0) == 0
    sqnr, sqnr_float = _sqnr_db(ref, out), _sqnr_db(ref, out_f)
    print(f"SQNR vs fake-quant: residual {sqnr:.1f} dB, float conv {sqnr_float:.1f} dB")
    assert sqnr > 25 and sqnr > sqnr_float - 6


class _Fusion(torch.nn.Module):
    """conv → SiLU, concatenated with a conv's output, → 3x3 conv: a MobileViT block's
    ``conv_proj`` + shortcut + ``conv_fusion``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.proj = torch.nn.Conv2d(8, 8, 1)
        self.fuse = torch.nn.Conv2d(16, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = self.c1(x)
        z = torch.cat([y, torch.nn.functional.silu(self.proj(y))], dim=1)
        return self.fc(self.fuse(z).mean((2, 3)))


def test_concat_before_a_quantizer_runs_on_codes(tmp_path):
    """A concat whose only use is a per-tensor quantizer quantizes each input to that grid
    first (exact: ``Q(cat(a, b)) = cat(Q(a), Q(b))``): run as written (no ONNX Runtime
    fusions, whose integer kernels round differently) the exported model computes what the
    float-concat one does, and ONNX Runtime runs it as QLinearConcat with the SiLU before it
    on codes."""
    import onnxruntime as ort

    def unfused(path: Path) -> np.ndarray:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]

    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    qgm = hyq_fx.quantize(_Fusion().eval(), x, "minmax", progress=False)
    plain = export_onnx_qdq(qgm, tmp_path / "n.onnx", x[:2], requantize="none")
    path = export_onnx_qdq(qgm, tmp_path / "e.onnx", x[:2], requantize="exact")
    assert onnx_node_counts(path)["Concat"] == 1
    assert onnx_node_counts(path)["QuantizeLinear"] == onnx_node_counts(plain)["QuantizeLinear"] + 2
    np.testing.assert_allclose(unfused(path), unfused(plain), atol=1e-5, rtol=1e-5)
    OnnxRunner(path, optimized_model_path=tmp_path / "opt.onnx")(x)
    counts = onnx_node_counts(tmp_path / "opt.onnx")
    assert counts.get("QLinearConcat", 0) == 1 and counts.get("Concat", 0) == 0, counts
    path = export_onnx_qdq(
        qgm, tmp_path / "a.onnx", x[:2], requantize="auto", calib=x, ort_contrib_ops=True
    )
    OnnxRunner(path, optimized_model_path=tmp_path / "opt_a.onnx")(x)
    counts = onnx_node_counts(tmp_path / "opt_a.onnx")
    assert counts.get("QLinearSigmoid", 0) == 1 and counts.get("QuickGelu", 0) == 0, counts


def test_quantizer_moves_before_data_movement_and_absorbs_a_scalar_mul():
    """``Q(move(x) · c)`` → ``move(Q(x; s / c))``: the quantizer commutes with data movement
    and absorbs a positive scalar factor, so the same codes come out (here exactly) and the
    moves run on uint8; a Q after a move whose output has another use stays in place."""
    import onnxruntime as ort

    from hyq_fx.backends.onnx_qdq import (
        _Builder,
        _fold_scalar_mul_into_quantize,
        _quantize_before_moves,
    )

    b = _Builder(17)
    moved = b.op("Transpose", [b.op("Reshape", ["x", b.ints([2, 6, 4])], "r")], "t",
                 perm=[0, 2, 1])  # fmt: skip
    scaled = b.op("Mul", [b.const(0.25), moved], "scale")
    q = b.op("QuantizeLinear", [scaled, b.const(0.02), b.const(128, np.uint8)], "q")
    shared = b.op("Transpose", ["x"], "t2", perm=[0, 2, 1])  # used twice: this Q stays
    kept = b.op("QuantizeLinear", [shared, b.const(0.1), b.const(3, np.uint8)], "kept")
    twice = b.op("Relu", [shared], "relu")
    outs = [b.op("Identity", [v], f"out{i}") for i, v in enumerate((q, kept, twice))]
    types = [onnx.TensorProto.UINT8, onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT]

    def run() -> list[np.ndarray]:
        graph = onnx.helper.make_graph(
            b.nodes, "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 8])],
            [onnx.helper.make_tensor_value_info(o, t, None)
             for o, t in zip(outs, types, strict=True)],
            initializer=list(b.inits.values()),
        )  # fmt: skip
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(model.SerializeToString(), options)
        return session.run(None, {"x": x})

    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32) * 0.5
    before = run()
    assert _fold_scalar_mul_into_quantize(b) == 1 and _quantize_before_moves(b) == 1
    ops = [n.op_type for n in b.nodes]
    assert "Mul" not in ops and ops.index("QuantizeLinear") < ops.index("Reshape")
    for a, c in zip(before, run(), strict=True):
        np.testing.assert_array_equal(a, c)


class _GroupNorms(torch.nn.Module):
    """conv → GroupNorm(1, C) (MobileViTv2's LayerNorm2d) → conv → GroupNorm(2, C) → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.n1 = torch.nn.GroupNorm(1, 8)
        self.c2 = torch.nn.Conv2d(8, 8, 1)
        self.n2 = torch.nn.GroupNorm(2, 8)
        self.fc = torch.nn.Linear(8, 5)
        with torch.no_grad():  # non-trivial affine parameters
            for norm in (self.n1, self.n2):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.fc(self.n2(self.c2(self.n1(self.c1(x)))).mean((2, 3)))


def test_group_norm_translation_is_exact_and_stores_no_unit_scale(tmp_path):
    """GroupNorm is written as LayerNormalization over each group; its unit scale is expanded
    from a scalar when the model loads, so the file holds no ``[C·H·W]`` vector of ones."""
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    path = _float_export_matching(_GroupNorms(), x, tmp_path / "gn.onnx")
    sizes = [int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer]
    assert max(sizes) < 8 * 12 * 12 // 2, sizes  # no per-element vector of a group


class _LinearAttentionContext(torch.nn.Module):
    """MobileViTv2's ``relu(value) · context.expand_as(value)`` and an ``expand_as`` that is
    used alone (that one must stay an Expand)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        v = self.c1(x)
        context = v.mean(dim=3, keepdim=True)
        y = torch.relu(v) * context.expand_as(v)
        return self.fc((y + context.expand_as(v).relu()).mean((2, 3)))


def test_expand_as_before_a_broadcasting_op_is_left_to_the_op(tmp_path):
    """``a · b.expand_as(a)`` is written as ``a · b`` (Mul broadcasts to the same result);
    an ``expand_as`` with another use keeps its Expand. The float translation stays exact."""
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    path = _float_export_matching(_LinearAttentionContext(), x, tmp_path / "e.onnx")
    assert onnx_node_counts(path).get("Expand", 0) == 1


class _Unfold6d(torch.nn.Module):
    """conv → MobileViTv2's unfold into tokens [B, C, P, N] → a token-wise op → pool → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 4, 5)

    def forward(self, x):
        y = self.c1(x)
        b, c, h, w = y.shape
        t = y.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c, 4, -1)
        return self.fc(torch.relu(t).mean(3).flatten(1))


def test_unfold_is_exported_as_space_to_depth_exactly(tmp_path):
    """The unfold, lowered to ``pixel_unshuffle``, is written as SpaceToDepth plus a transpose
    of whole planes (torch's channel order); the float translation matches torch."""
    x = torch.randn(4, 3, 8, 12, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(0)
    path = _float_export_matching(_Unfold6d(), x, tmp_path / "u.onnx")
    assert onnx_node_counts(path).get("SpaceToDepth", 0) == 1


class _Unshuffle5d(torch.nn.Module):
    def forward(self, x):
        y = torch.nn.functional.pixel_unshuffle(x.unsqueeze(1), 2)
        return y.flatten(1).mean(1, keepdim=True)


def test_pixel_unshuffle_of_another_rank_is_a_clear_error(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    qgm = hyq_fx.quantize(_Unshuffle5d(), x, "minmax", progress=False)
    with pytest.raises(ExportError, match=r"pixel_unshuffle.*\[N, C, H, W\]"):
        export_onnx_qdq(qgm, tmp_path / "u.onnx", x)


class _ConvThenDepthwise(torch.nn.Module):
    """conv (no activation) → depthwise conv → ReLU → 1x1 conv → pool → linear, as in a
    MobileViTv2 block after an inverted bottleneck's projection."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = torch.nn.Conv2d(8, 6, 1)
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.pw(torch.relu(self.dw(self.c1(x)))).mean((2, 3)))


@pytest.mark.parametrize("requantize", ["none", "exact", "auto"])
def test_per_channel_quantizer_right_after_a_quantized_conv_runs(tmp_path, requantize):
    """``DQ → Conv → QuantizeLinear(axis=1)`` is fused by ONNX Runtime into a QLinearConv with
    a per-channel output zero point, which its kernel then rejects at run time; the export
    writes that quantizer as a per-tensor QuantizeLinear of ``x·(s̄/s_c) + (z_c − z̄)·s̄``
    (the same codes), so the model runs and matches the fake-quant one."""
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    qgm = _quantize_dw_per_channel(_ConvThenDepthwise, x, a_bits=6)
    assert len(set(_per_channel_zero_points(qgm))) > 1
    path = export_onnx_qdq(qgm, tmp_path / "m.onnx", x[:2], requantize=requantize, calib=x)
    with torch.no_grad():
        ref = qgm(x)
    assert _sqnr_db(ref, OnnxRunner(path)(x)) > (80 if requantize != "auto" else 30)


def _per_channel_zero_points(gm) -> list[float]:
    (fq,) = [m for m in gm.modules() if isinstance(m, hyq_fx.FakeQuantizer) and
             m.role != "weight" and m.spec.per_channel]  # fmt: skip
    return fq.zero_point.flatten().tolist()


class _OutlierBottleneck(torch.nn.Module):
    """conv → SiLU → 1x1 conv → ReLU → 3x3 conv → pool → linear; two outlier channels."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.pw = torch.nn.Conv2d(16, 12, 1)
        self.pw2 = torch.nn.Conv2d(12, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)
        with torch.no_grad():
            self.c1.weight[[2, 9]] *= 25.0

    def forward(self, x):
        y = torch.relu(self.pw(torch.nn.functional.silu(self.c1(x))))
        return self.fc(self.pw2(y).mean((2, 3)))


def test_outlier_scaled_pointwise_conv_folds_into_qlinearconv(tmp_path):
    """``scale_bottleneck_outliers`` behind SiLU leaves a per-channel input quantizer
    ``s·α_c`` and the weight ``Q_w(W·α)·α⁻¹``: the α cancel, so the export reads the per-axis
    codes through the one scale ``s`` and drops the ``α⁻¹`` product; ONNX Runtime runs the
    1x1 conv as QLinearConv and matches the fake-quant model up to float rounding."""
    from hyq_fx.pass_base import QuantContext, get_pass, run_passes

    x = torch.randn(16, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    ctx = QuantContext([x[:8], x[8:]], w_bits=8, a_bits=6, progress=False)
    gm = hyq_fx.capture(_OutlierBottleneck().eval(), x[:2])
    names = ["fold_batchnorm", "insert_quantizers", "calibrate", "scale_bottleneck_outliers"]
    opts = {"scale_bottleneck_outliers": {"steps": 60, "samples": 512, "min_gain": 0.0}}
    gm = run_passes(gm, [get_pass(n)(ctx, **opts.get(n, {})) for n in names])
    assert ctx.log[-1]["per_channel_quantizer"]  # the form this test is about
    ops = _check_folded_export(gm, x, tmp_path, "pointwise")
    # SiLU's and the ratio s̄/s_c before the per-tensor QuantizeLinear; the α⁻¹ product is gone
    assert ops.count("Mul") == 2


def test_interrupted_export_leaves_no_partial_file(tmp_path, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    qgm = hyq_fx.quantize(_Small().eval(), x, "minmax", progress=False)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous export")
    real_save = onnx.save

    def save_then_fail(model, f, *args, **kwargs):
        Path(f).write_bytes(b"half a model")
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx, "save", save_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx_qdq(qgm, path, x[:1])
    assert path.read_bytes() == b"previous export"  # untouched, and no temporary file left
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    monkeypatch.setattr(onnx, "save", real_save)
    export_onnx_qdq(qgm, path, x[:1])
    onnx.checker.check_model(onnx.load(str(path)))
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_runner_works_with_evaluate_top1(exported, inputs):
    labels = torch.arange(len(inputs)) % 10
    loader = [(inputs[:5], labels[:5]), (inputs[5:], labels[5:])]
    runner = OnnxRunner(exported["none"])
    result = evaluate_top1(runner, loader, progress=False)
    assert result["n"] == 8 and len(result["predictions"]) == 8
    assert runner.meta["recipe"]["name"] == "minmax"


def test_low_bit_weights_are_pre_rounded_in_int8(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    qgm = hyq_fx.quantize(_Small().eval(), x, "minmax", w_bits=4, a_bits=6, progress=False)
    path = export_onnx_qdq(qgm, tmp_path / "w4a6.onnx", x[:2], requantize="none")
    model = onnx.load(str(path))
    weights = [
        numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == 3 and t.dims
    ]
    assert weights and all(np.abs(w).max() <= 7 for w in weights)  # ±(2^3 − 1)
    assert onnx_node_counts(path).get("Clip", 0) >= 3  # 6-bit activations: [0, 63]
    with torch.no_grad():
        ref = qgm(x)
    assert _sqnr_db(ref, OnnxRunner(path)(x)) > 25


def test_clear_errors(qxxs, tmp_path):
    _, qgm, calib = qxxs
    with pytest.raises(ExportError, match="requantize"):
        export_onnx_qdq(qgm, tmp_path / "x.onnx", calib, requantize="fast")
    with pytest.raises(ExportError, match="opset"):
        export_onnx_qdq(qgm, tmp_path / "x.onnx", calib, opset=13)
    observing = copy.deepcopy(qgm)
    next(m for m in observing.modules() if isinstance(m, hyq_fx.FakeQuantizer)).mode = "observe"
    with pytest.raises(ExportError, match="calibrat"):
        export_onnx_qdq(observing, tmp_path / "x.onnx", calib)
    with pytest.raises(FileNotFoundError, match="export_onnx_qdq"):
        OnnxRunner(tmp_path / "missing.onnx")
