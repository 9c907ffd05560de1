"""``hyq_fx.integer_graph``: fake-quantizers become quantize / dequantize ops with integer weights.

Before/Expected: a graph ``x → Q → y`` (and ``W → Q_w → conv``) is rewritten to the
``quantized_decomposed`` ops with the codes' container, the float clamp only where the code range
is narrower than the container, and integer weight buffers; the rewritten graph gives the same
values as the fake-quant one except where ``x/s`` sits within float rounding of a ``.5`` tie.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from hyq_fx.integer_graph import IntegerGraphError, code_dtype, integer_graph
from hyq_fx.quantizer import FakeQuantizer
from hyq_fx.spec import QuantSpec

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten


def _quantizer(spec: QuantSpec, scale, zero, role: str = "activation") -> FakeQuantizer:
    fq = FakeQuantizer(spec, role=role)
    fq.set_qparams(torch.as_tensor(scale, dtype=torch.float32), torch.as_tensor(zero))
    fq.set_mode("quantize")
    return fq


def _activation_graph(fq: FakeQuantizer) -> fx.GraphModule:
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_module("q", (x,)))
    root = nn.Module()
    root.q = fq
    return fx.GraphModule(root, graph)


def _conv_graph(weight_fq: FakeQuantizer, weight: torch.Tensor) -> fx.GraphModule:
    graph = fx.Graph()
    x = graph.placeholder("x")
    w = graph.call_module("wq", (graph.get_attr("weight"),))
    graph.output(graph.call_function(aten.conv2d.default, (x, w)))
    root = nn.Module()
    root.wq = weight_fq
    root.register_buffer("weight", weight)
    return fx.GraphModule(root, graph)


def _targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _far_from_ties(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    frac = (x / scale).abs() % 1.0
    return (frac - 0.5).abs() > 1e-3


CASES = {
    # spec, scale, zero point, expected container, float clamp expected
    "asymmetric8": (QuantSpec(8), 0.05, 128, torch.uint8, False),
    "symmetric8": (QuantSpec(8, symmetric=True), 0.05, 0, torch.int8, True),
    "asymmetric4": (QuantSpec(4), 0.4, 7, torch.uint8, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_per_tensor_activation_becomes_qdq_with_clamp_only_where_needed(case):
    spec, scale, zero, dtype, clamped = CASES[case]
    before = _activation_graph(_quantizer(spec, [scale], [zero]))
    after = integer_graph(before)
    expected = [aten.clamp.default] if clamped else []
    expected += [qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default]
    assert _targets(after) == expected
    q = next(n for n in after.graph.nodes if n.target is qd.quantize_per_tensor.default)
    assert q.args[-1] is dtype and q.args[1:3] == (pytest.approx(scale), zero)
    x = torch.linspace(-20, 20, 4001)  # far past both ends of every range
    ref, got = before(x), after(x)
    keep = _far_from_ties(x, torch.tensor(scale))
    torch.testing.assert_close(got[keep], ref[keep], rtol=0, atol=0)
    assert (got - ref).abs().max() <= scale * 1.0001  # at a tie: at most one step


def test_per_channel_activation_keeps_its_axis_and_range():
    spec = QuantSpec(8, per_channel=True, axis=1)
    scale, zero = torch.tensor([0.02, 0.1, 0.5]), torch.tensor([0.0, 100.0, 255.0])
    before = _activation_graph(_quantizer(spec, scale, zero))
    after = integer_graph(before)
    assert _targets(after) == [qd.quantize_per_channel.default, qd.dequantize_per_channel.default]
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 30
    keep = _far_from_ties(x, scale.reshape(1, 3, 1, 1))
    torch.testing.assert_close(after(x)[keep], before(x)[keep], rtol=0, atol=0)


def test_weight_is_stored_as_integer_codes_and_dequantizes_exactly():
    weight = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    scale = weight.abs().amax(dim=(1, 2, 3)) / 127
    wq = _quantizer(QuantSpec(8, symmetric=True, per_channel=True), scale, [0] * 4, "weight")
    before = _conv_graph(wq, weight)
    after = integer_graph(before)
    assert _targets(after) == [qd.dequantize_per_channel.default, aten.conv2d.default]
    codes = [b for name, b in after.named_buffers() if name.endswith("codes")]
    assert len(codes) == 1 and codes[0].dtype is torch.int8
    assert codes[0].abs().max() <= 127
    assert "weight" not in dict(after.named_buffers())  # the float weight is not kept
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(after(x), before(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(before.weight, weight)  # the input module is unchanged


def test_off_is_removed_wide_stays_float_and_observe_is_an_error():
    off = _quantizer(QuantSpec(8), [0.1], [0])
    off.set_mode("off")
    assert _targets(integer_graph(_activation_graph(off))) == []
    wide = integer_graph(_activation_graph(_quantizer(QuantSpec(12), [0.01], [2048])))
    assert isinstance(wide.get_submodule("q"), FakeQuantizer)  # no 8-bit container for 12 bits
    observing = FakeQuantizer(QuantSpec(8))
    with pytest.raises(IntegerGraphError, match="still observing"):
        integer_graph(_activation_graph(observing))


def test_code_dtype_is_the_smallest_8_bit_container():
    assert code_dtype(0, 255) is torch.uint8 and code_dtype(0, 15) is torch.uint8
    assert code_dtype(-127, 127) is torch.int8 and code_dtype(-8, 7) is torch.int8
    assert code_dtype(0, 4095) is None


def test_quantized_model_lowers_with_its_outputs():
    import hyq_fx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    qgm = hyq_fx.quantize(model.eval(), x, "minmax", progress=False)
    lowered = integer_graph(qgm)
    assert not any(isinstance(m, FakeQuantizer) for m in lowered.modules())
    with torch.no_grad():
        ref, got = qgm(x), lowered(x)
    # a flip at a .5 tie moves one code of one activation: the logits stay within a few steps
    assert F.mse_loss(got, ref) <= 1e-4 * ref.pow(2).mean()
    assert any(isinstance(m, FakeQuantizer) for m in qgm.modules())  # qgm is not modified
