"""Mobile-Former in the model zoo: timm registry, the paper's sizes, capture, quantization.

The paper's (Chen et al., CVPR 2022) parameter counts and MAdds at 224x224 / 1000 classes are
checked to 5% for all seven configurations. MAdds are counted from the modules (no forward):
multiply-adds of conv, linear and attention matmul, plus the Dynamic-ReLU's two per-element
multiplies, which the paper's family (DY-ReLU, MicroNet, Mobile-Former) counts in its MAdds.
The counter is checked against ``torch.utils.flop_counter.FlopCounterMode`` on one config.
"""

from __future__ import annotations

import copy
import math
import sys

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import hyq_fx
import hyq_fx.models.mobile_former as mf
from hyq_fx.backends.onnx_qdq import OnnxRunner, export_onnx_qdq
from hyq_fx.graph import find_transitions
from hyq_fx.lowering import lower_for_export
from hyq_fx.pass_base import quantizers
from hyq_fx.report import sqnr_db

# name: (MAdds in millions, parameters in millions), paper Table (ImageNet, 224x224)
PAPER = {
    "mobile_former_26m": (26, 3.2),
    "mobile_former_52m": (52, 3.5),
    "mobile_former_96m": (96, 4.6),
    "mobile_former_151m": (151, 7.6),
    "mobile_former_214m": (214, 9.4),
    "mobile_former_294m": (294, 11.4),
    "mobile_former_508m": (508, 14.0),
}
_TOKEN_SIDE = (mf.MobileToFormer, mf.FormerToMobile, mf.Former)


aten = torch.ops.aten


def count_madds(model: mf.MobileFormer, size: int = 224) -> tuple[int, int]:
    """(conv + linear + matmul multiply-adds, Dynamic-ReLU multiplies) of one image.

    Walks the modules in registration order, which is execution order here, tracking the map
    size through the conv strides (all convs pad k // 2)."""
    tokens, dim = model.cfg.tokens, model.cfg.token_dim
    res, core, dyrelu = size, 0, 0
    modules = dict(model.named_modules())
    for name, m in model.named_modules():
        parent = modules[name.rpartition(".")[0]]
        if isinstance(m, nn.Conv2d):
            res = math.ceil(res / m.stride[0])
            kh, kw = m.kernel_size
            core += m.out_channels * res * res * (m.in_channels // m.groups) * kh * kw
        elif isinstance(m, nn.Linear):
            rows = tokens if isinstance(parent, _TOKEN_SIDE) else 1
            core += rows * m.in_features * m.out_features
        elif isinstance(m, mf.MobileToFormer):  # q·kᵀ and attn·v over the H·W pixels
            core += 2 * tokens * m.q.out_features * res * res
        elif isinstance(m, mf.FormerToMobile):
            core += 2 * tokens * m.k.out_features * res * res
        elif isinstance(m, mf.Former):
            core += 2 * tokens * tokens * dim
        elif isinstance(m, mf.DynamicReLU):
            dyrelu += 2 * m.channels * res * res
    return core, dyrelu


def _meta_model(name: str) -> mf.MobileFormer:
    with torch.device("meta"):
        return timm.create_model(name).eval()


def test_registered_in_timm_with_a_pretrained_cfg():
    assert sorted(timm.list_models("mobile_former_*")) == sorted(PAPER)
    model = _meta_model("mobile_former_26m")
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert tuple(cfg["mean"]) == timm.data.IMAGENET_DEFAULT_MEAN
    assert model.get_submodule(cfg["first_conv"]).in_channels == 3
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert model.get_classifier().out_features == 1000
    model.reset_classifier(10)
    assert model.get_classifier().out_features == 10


@pytest.mark.parametrize("name", sorted(PAPER, key=lambda n: PAPER[n]))
def test_params_and_madds_match_the_paper(name):
    paper_madds, paper_params = PAPER[name]
    model = _meta_model(name)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    core, dyrelu = count_madds(model)
    madds = (core + dyrelu) / 1e6
    assert params == pytest.approx(paper_params, rel=0.05), f"{name}: {params:.2f}M params"
    assert madds == pytest.approx(paper_madds, rel=0.05), f"{name}: {madds:.1f}M MAdds"


def test_madds_counter_agrees_with_flop_counter_mode():
    model = _meta_model("mobile_former_26m")  # grouped convs, channel shuffle
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    assert counter.get_total_flops() == 2 * count_madds(model)[0]


# ------------------------------------------------------------------------------------------
# capture and quantization, mobile_former_26m at random init, 64x64 (any size works)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> mf.MobileFormer:
    torch.manual_seed(0)
    return timm.create_model("mobile_former_26m", num_classes=10).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def captured(model, images) -> torch.fx.GraphModule:
    return hyq_fx.capture(model, images[:2])


def test_capture_equals_eager_on_another_batch_size(model, captured, images):
    with torch.no_grad():
        ref = model(images[:3])
        out = captured(images[:3])
    assert out.shape == (3, 10)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_bridges_are_found_from_graph_structure(model, captured):
    """Every Mobile→Former and Former→Mobile bridge shows up as a crossing in
    hyq_fx.graph.find_transitions (no model-specific code): map → tokens at each
    Mobile→Former, map → queries and attention output → map at each Former→Mobile."""
    by_name = {n.name: n for n in captured.graph.nodes}

    def paths(kind: str) -> set[str]:
        out = set()
        for t in find_transitions(captured):
            if t.kind == kind:
                for name in [*t.nodes, *t.consumers]:
                    path = by_name[name].meta["hyq_module_path"]
                    out.add(path)
        return out

    entries, exits = paths("conv->transformer"), paths("transformer->conv")
    bridges = {
        name: type(m)
        for name, m in model.named_modules()
        if isinstance(m, (mf.MobileToFormer, mf.FormerToMobile))
    }
    assert len(bridges) == 2 * len(model.blocks) + 1
    for name, kind in bridges.items():
        assert name in entries, f"{name}: no map → token crossing found"
        if kind is mf.FormerToMobile:
            assert name in exits, f"{name}: no token → map crossing found"


def test_quantize_w8a8_end_to_end(model, captured, images, monkeypatch):
    """hyq_fx.quantize as is, except that it reuses the capture tested above (torch.export
    of this model is the slowest step of the file)."""

    def capture(m: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
        assert m is model and example.shape[1:] == images.shape[1:]
        return copy.deepcopy(captured)

    monkeypatch.setattr(sys.modules["hyq_fx.quantize"], "capture", capture)
    calib = [images[:2], images[2:4]]
    qgm = hyq_fx.quantize(model, calib, "minmax", 8, 8, progress=False)
    fqs = quantizers(qgm)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert len([n for n in qgm.graph.nodes if "hyq_quant" in n.meta]) >= convs + linears
    assert fqs and all(fq.calibrated for fq in fqs.values())
    with torch.no_grad():
        ref, out = model(images[4:]), qgm(images[4:])
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert sqnr_db(ref, out) > 15.0


def test_lowering_for_export_is_exact(captured, images):
    lowered = lower_for_export(captured)
    targets = {n.target for n in lowered.graph.nodes if n.op == "call_function"}
    assert aten.channel_shuffle.default not in targets and aten.relu6.default not in targets
    with torch.no_grad():
        assert torch.equal(lowered(images[:3]), captured(images[:3]))


def test_default_recipe_exports_to_onnx(model, captured, images, monkeypatch, tmp_path):
    """The default recipe at W8A8, then the ONNX QDQ file in onnxruntime."""
    monkeypatch.setattr(
        sys.modules["hyq_fx.quantize"], "capture", lambda m, example: copy.deepcopy(captured)
    )
    qgm = hyq_fx.quantize(model, [images[:2], images[2:4]], "hyq-fx", 8, 8, progress=False)
    path = tmp_path / "mf.onnx"
    export_onnx_qdq(qgm, path, images[:2])
    with torch.no_grad():
        ref = qgm(images[4:])
    out = torch.as_tensor(np.asarray(OnnxRunner(path)(images[4:])))
    assert sqnr_db(ref, out) > 20.0
