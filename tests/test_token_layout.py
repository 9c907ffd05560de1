"""MobileViTv2's transformer in channels-last tokens: the same outputs (1e-5), no 1×1 conv
left in the token regions, the input graph untouched; in ONNX, the int8 file's transformer
matmuls read uint8 codes and the norm affine is stored per channel."""

from __future__ import annotations

import copy

import onnx
import pytest
import timm
import torch
from onnx import numpy_helper
from torch import nn

import hyq_fx
from hyq_fx.backends.onnx_qdq import (
    ExportError,
    OnnxRunner,
    _broadcast_source,
    export_onnx_qdq,
)
from hyq_fx.lowering import fold_tokens_with_pixel_shuffle, unfold_maps_with_pixel_unshuffle
from hyq_fx.quantize import quantizers_mode
from hyq_fx.token_layout import tokens_channels_last

aten = torch.ops.aten
SIZE = 64


def _count(gm, target) -> int:
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


def _lowered(gm, x):
    return unfold_maps_with_pixel_unshuffle(fold_tokens_with_pixel_shuffle(gm, x), x)


@pytest.fixture(scope="module")
def v2():
    torch.manual_seed(0)
    model = timm.create_model("mobilevitv2_050", num_classes=10).eval()
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    return model, x


def test_mobilevitv2_tokens_run_channels_last_exactly(v2):
    model, x = v2
    gm = _lowered(hyq_fx.capture(model, x[:2]), x[:2])
    before = copy.deepcopy(gm.graph)
    moved = tokens_channels_last(gm, x[:2])
    # 9 transformer blocks x (qkv, out, fc1, fc2) 1x1 convs become linears
    assert _count(moved, aten.conv2d.default) == _count(gm, aten.conv2d.default) - 36
    assert _count(moved, aten.linear.default) == _count(gm, aten.linear.default) + 36
    assert _count(moved, aten.group_norm.default) == 0
    assert str(gm.graph) == str(before)  # the input graph is unchanged
    with torch.no_grad():
        torch.testing.assert_close(moved(x), model(x), atol=1e-5, rtol=1e-5)


def test_graphs_without_token_convs_are_returned_as_they_are(xxs_gm, xxs_input):
    """MobileViT v1's tokens go through a permute into linears already: nothing to move."""
    gm = _lowered(xxs_gm, xxs_input[:2])
    assert tokens_channels_last(gm, xxs_input[:2]) is gm


class _Tokens(nn.Module):
    """Unfold into [B, C, P, N], then a 1x1 conv or a 3x3 one (which must stay channels-first)."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, kernel, padding=kernel // 2)
        self.norm = nn.GroupNorm(1, 8)

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c, 4, -1)
        t = t + self.conv(self.norm(t)).softmax(dim=-1).sum(-1, keepdim=True)
        return t.mean((2, 3))


@pytest.mark.parametrize("kernel, moved", [(1, True), (3, False)])
def test_only_pointwise_convs_move(kernel, moved):
    torch.manual_seed(0)
    module = _Tokens(kernel).eval()
    x = torch.randn(2, 8, 6, 8)
    gm = _lowered(hyq_fx.capture(module, x), x)
    out = tokens_channels_last(gm, x)
    assert (out is not gm) == moved
    assert _count(out, aten.linear.default) == int(moved)
    with torch.no_grad():
        torch.testing.assert_close(out(x), module(x), atol=1e-5, rtol=1e-5)


def test_onnx_int8_transformer_matmuls_read_codes(v2, tmp_path):
    """The int8 export (``token_layout="auto"``) writes the token convs as MatMuls on
    DequantizeLinear outputs (ONNX Runtime's integer MatMul), computes what the channels-first
    file computes, and stores each norm's affine per channel, not per token."""
    model, x = v2
    torch.manual_seed(0)
    qgm = hyq_fx.quantize(model, x, "minmax", progress=False)
    paths = {
        layout: export_onnx_qdq(qgm, tmp_path / f"{layout}.onnx", x[:2], token_layout=layout)
        for layout in ("auto", "channels_first")
    }
    with pytest.raises(ExportError, match="token_layout='nchw'; use one of"):
        export_onnx_qdq(qgm, tmp_path / "bad.onnx", x[:2], token_layout="nchw")
    files = {k: onnx.load(str(p)) for k, p in paths.items()}
    convs = {k: sum(n.op_type == "Conv" for n in m.graph.node) for k, m in files.items()}
    assert convs["auto"] == convs["channels_first"] - 36
    producer = {o: n for n in files["auto"].graph.node for o in n.output}
    matmuls = [n for n in files["auto"].graph.node if n.op_type == "MatMul"]
    assert sum(producer[n.input[0]].op_type == "DequantizeLinear" for n in matmuls) >= 36
    # no [P·N·C] copy of a norm's affine: no stored constant repeats itself along an axis
    stored = [numpy_helper.to_array(t) for t in files["auto"].graph.initializer]
    assert not [
        a.shape for a in stored if a.dtype == "float32" and _broadcast_source(a) is not None
    ]
    assert paths["auto"].stat().st_size < 1.01 * paths["channels_first"].stat().st_size
    a, b = OnnxRunner(paths["auto"])(x), OnnxRunner(paths["channels_first"])(x)
    sqnr = 10 * torch.log10(b.pow(2).mean() / (a - b).pow(2).mean().clamp_min(1e-30))
    assert sqnr > 30, float(sqnr)  # only quantizer ties rounded apart after reordered sums
    with quantizers_mode(qgm, "off"):  # float: auto keeps channels-first (faster in ORT)
        fp32 = export_onnx_qdq(qgm, tmp_path / "fp32.onnx", x[:2])
        last = export_onnx_qdq(
            qgm, tmp_path / "fp32_last.onnx", x[:2], token_layout="channels_last"
        )
    assert (
        sum(n.op_type == "Conv" for n in onnx.load(str(fp32)).graph.node) == convs["channels_first"]
    )
    with torch.no_grad():
        torch.testing.assert_close(OnnxRunner(last)(x), model(x), atol=1e-5, rtol=1e-5)
