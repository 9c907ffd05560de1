"""hyq_fx.graph: networkx/DOT export, norm classification, conv↔transformer transitions.

Expected norm counts and block paths are derived from the timm modules themselves (their types
and names), so the tests check that the graph-only analysis agrees with the model definition.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import hyq_fx
from hyq_fx.graph import (
    NORM_KIND,
    detect_norms,
    find_regions,
    find_transitions,
    op_counts,
    propagate_shapes,
    subgraph_for_module,
    summarize,
    tag_norms,
    to_dot,
    to_networkx,
    transition_highlight,
)

C2T, T2C = "conv->transformer", "transformer->conv"

_SPECS = {
    "mobilevitv2_050": ({}, 128),
    "efficientformer_l1": ({}, 224),
    "efficientformerv2_s0": ({"img_size": 128}, 128),
    "edgenext_xx_small": ({}, 128),
    "resnet18": ({}, 64),
}


@pytest.fixture(scope="module")
def timm_graph():
    """``timm_graph(name) -> (model, gm)``; each model is created and captured once (with a
    static batch, which captures faster; mobilevit_xxs from conftest covers a dynamic one)."""
    cache: dict[str, tuple[nn.Module, torch.fx.GraphModule]] = {}

    def get(name: str):
        if name not in cache:
            kwargs, size = _SPECS[name]
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, **kwargs).eval()
            x = torch.randn(1, 3, size, size)
            cache[name] = (model, hyq_fx.capture(model, x, dynamic_batch=False))
        return cache[name]

    return get


def _modules_of(model: nn.Module, type_name: str) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == type_name]


def _count_modules(model: nn.Module, *types: type) -> int:
    return sum(1 for m in model.modules() if type(m) in types)


# ------------------------------------------------------------------ a tiny hand-made hybrid


class _TinyHybrid(nn.Module):
    """conv3x3+BN → flatten/transpose → LN, qkv, SDPA, proj → transpose/reshape → conv3x3."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.norm = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.conv_out = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv_in(x))
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.norm(t)).chunk(3, dim=-1)
        t = t + self.proj(F.scaled_dot_product_attention(q, k, v))
        x = t.transpose(1, 2).reshape(b, c, h, w)
        return self.conv_out(x)


@pytest.fixture(scope="module")
def tiny_gm() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return hyq_fx.capture(_TinyHybrid().eval(), torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("batch", [1, 2])
def test_tiny_hybrid_transitions(tiny_gm, batch):
    # batch 2 makes export keep the batch size symbolic: sym_size/mul nodes feed the reshapes
    gm = tiny_gm if batch == 1 else hyq_fx.capture(_TinyHybrid().eval(), torch.randn(2, 3, 8, 8))
    nodes = {n.name: n for n in gm.graph.nodes}
    short = lambda names: [str(nodes[n].target).split(".")[1] for n in names]
    (region,) = find_regions(gm)
    assert len(region.attention) == 1
    (c2t,) = region.entries
    (t2c,) = region.exits
    assert short([c2t.entry]) == ["batch_norm"]
    assert short(c2t.nodes) == ["flatten", "transpose"]
    assert c2t.in_shape[1:] == (8, 8, 8) and c2t.out_shape[1:] == (64, 8)
    assert short(t2c.nodes) == ["transpose", "reshape"]
    assert t2c.exit == t2c.nodes[-1] and t2c.out_shape == c2t.in_shape
    assert short(t2c.consumers) == ["conv2d"]
    assert find_transitions(gm) == [c2t, t2c]
    norms = {i.kind: i for i in detect_norms(gm)}
    assert set(norms) == {"batchnorm", "layernorm_tokens"}
    assert norms["batchnorm"].running_var == "bn.running_var"
    assert norms["layernorm_tokens"].weight == "norm.weight"
    assert norms["layernorm_tokens"].channels == 8


def test_graph_without_export_meta():
    """A graph loaded from an artifact has no meta["val"]: propagate_shapes restores the
    analysis (with a dynamic batch, so the size-arithmetic nodes must stay out of it)."""
    gm = hyq_fx.capture(_TinyHybrid().eval(), torch.randn(2, 3, 8, 8))
    expected = [(t.kind, t.entry, t.nodes, t.exit) for t in find_transitions(gm)]
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
    propagate_shapes(gm, torch.randn(3, 3, 8, 8))
    found = find_transitions(gm)
    assert [(t.kind, t.entry, t.nodes, t.exit) for t in found] == expected
    assert found[0].in_shape == (3, 8, 8, 8)
    assert to_networkx(gm).nodes[found[0].exit]["shape"] == (3, 64, 8)


# ------------------------------------------------------------------ networkx / DOT


def test_networkx_mirrors_fx(xxs_gm):
    g = to_networkx(xxs_gm)
    fx_nodes = list(xxs_gm.graph.nodes)
    assert g.number_of_nodes() == len(fx_nodes)
    assert g.number_of_edges() == sum(len(n.users) for n in fx_nodes)
    for n in fx_nodes:
        assert set(g.successors(n.name)) == {u.name for u in n.users}
    conv = next(n for n in fx_nodes if n.target is torch.ops.aten.conv2d.default)
    attrs = g.nodes[conv.name]
    assert attrs["op"] == "call_function" and attrs["target"] == "aten.conv2d.default"
    assert attrs["name"] == "conv2d" and attrs["dtype"] == "torch.float32"
    shape = tuple(conv.meta["val"].shape)
    assert len(attrs["shape"]) == 4 and attrs["shape"][1:] == shape[1:]
    assert attrs["module_path"] == conv.meta["hyq_module_path"] != ""
    unbind = next(n for n in fx_nodes if n.target is torch.ops.aten.unbind.int)
    assert isinstance(g.nodes[unbind.name]["shape"], list)
    assert len(g.nodes[unbind.name]["shape"]) == 3
    assert g.nodes["output"]["shape"] is None


def test_dot_file(xxs_gm, tmp_path):
    conv = next(n.name for n in xxs_gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    path = to_dot(xxs_gm, tmp_path / "model.dot", highlight={conv: "orange"})
    text = path.read_text()
    assert text.startswith("digraph")
    assert text.rstrip().endswith("}") and text.count("{") == text.count("}")
    assert 'fillcolor="orange"' in text
    assert f'"{conv}" [' in text
    params = [n.name for n in xxs_gm.graph.nodes if n.op == "get_attr"]
    assert params and not any(f'"{p}"' in text for p in params)  # collapsed into consumers
    sizes = [n.name for n in xxs_gm.graph.nodes if n.target is torch.ops.aten.sym_size.int]
    assert not any(f'"{s}"' in text for s in sizes)  # dynamic-batch size arithmetic left out
    # one block, highlighted by its transitions
    sub = subgraph_for_module(xxs_gm, "stages.2.1")
    assert sub.number_of_nodes() > 0
    assert all(
        d["module_path"] == "stages.2.1" or d["module_path"].startswith("stages.2.1.")
        for _, d in sub.nodes(data=True)
        if d["op"] != "get_attr"
    )
    hl = transition_highlight(t for t in find_transitions(xxs_gm) if t.block == "stages.2.1")
    assert hl and set(hl) <= set(sub.nodes)
    text = to_dot(sub, tmp_path / "block.dot", highlight=hl, title="stages.2.1").read_text()
    assert text.startswith('digraph "stages.2.1"') and 'fillcolor="lightblue"' in text


# ------------------------------------------------------------------ norms


def test_norms_mobilevit_v1(xxs_model, xxs_gm):
    norms = tag_norms(xxs_gm)
    kinds = Counter(i.kind for i in norms)
    assert kinds == {
        "batchnorm": _count_modules(xxs_model, timm.layers.BatchNormAct2d),
        "layernorm_tokens": _count_modules(xxs_model, nn.LayerNorm),
    }
    tagged = {n.name: n.meta[NORM_KIND] for n in xxs_gm.graph.nodes if NORM_KIND in n.meta}
    assert tagged == {i.node: i.kind for i in norms}
    ln = next(i for i in norms if i.module_path == "stages.2.1.transformer.0.norm1")
    assert ln.weight == "stages.2.1.transformer.0.norm1.weight"
    assert ln.bias == "stages.2.1.transformer.0.norm1.bias"
    assert ln.channels == 64 and ln.normalized_shape == [64] and len(ln.input_shape) == 3
    bn = next(i for i in norms if i.kind == "batchnorm")
    assert bn.running_mean and bn.running_var and bn.channels == bn.input_shape[1]


def test_norms_mobilevit_v2(timm_graph):
    model, gm = timm_graph("mobilevitv2_050")
    norms = detect_norms(gm)
    assert Counter(i.kind for i in norms) == {
        "batchnorm": _count_modules(model, timm.layers.BatchNormAct2d),
        "groupnorm1": _count_modules(model, timm.layers.GroupNorm1),
    }
    gn = next(i for i in norms if i.kind == "groupnorm1")
    assert gn.num_groups == 1 and gn.channels == gn.input_shape[1] and gn.weight


def test_norms_edgenext(timm_graph):
    model, gm = timm_graph("edgenext_xx_small")
    kinds = Counter(i.kind for i in detect_norms(gm))
    plain_ln = _count_modules(model, nn.LayerNorm)  # exact type: LayerNorm2d excluded
    sdta = _modules_of(model, "SplitTransposeBlock")
    assert kinds["layernorm2d"] == _count_modules(model, timm.layers.LayerNorm2d) > 0
    assert kinds["layernorm_nhwc"] + kinds["layernorm_tokens"] == plain_ln
    assert kinds["layernorm_tokens"] == len(sdta)  # the (B, HW, C) norm before each XCA
    assert set(kinds) == {"layernorm2d", "layernorm_nhwc", "layernorm_tokens"}


def test_norms_efficientformer_l1(timm_graph):
    model, gm = timm_graph("efficientformer_l1")
    norms = detect_norms(gm)
    assert Counter(i.kind for i in norms) == {
        "batchnorm": _count_modules(model, nn.BatchNorm2d),
        "layernorm_tokens": _count_modules(model, nn.LayerNorm),
    }
    assert all(len(i.input_shape) == 3 for i in norms if i.kind == "layernorm_tokens")


# ------------------------------------------------------------------ transitions


def _check_round_trips(regions) -> None:
    for r in regions:
        assert len(r.entries) >= 1 and len(r.exits) == 1, r
        for t in r.entries:
            assert len(t.in_shape) == 4 and t.nodes and t.exit == t.nodes[-1]
        (back,) = r.exits
        assert len(back.out_shape) == 4 and back.nodes and back.exit == back.nodes[-1]


def test_transitions_mobilevit_v1(xxs_model, xxs_gm):
    regions = find_regions(xxs_gm)
    assert [r.block for r in regions] == _modules_of(xxs_model, "MobileVitBlock")
    assert [r.block for r in regions] == ["stages.2.1", "stages.3.1", "stages.4.1"]
    _check_round_trips(regions)
    for r in regions:
        (fwd,), (back,) = r.entries, r.exits
        assert len(fwd.out_shape) == 3 and back.out_shape == fwd.in_shape
        assert all(n in r.nodes for n in fwd.nodes + back.nodes)
    assert len(find_transitions(xxs_gm)) == 6


def test_transitions_mobilevit_v2(timm_graph):
    model, gm = timm_graph("mobilevitv2_050")
    regions = find_regions(gm)
    assert [r.block for r in regions] == _modules_of(model, "MobileVitV2Block")
    assert len(regions) == 3
    _check_round_trips(regions)
    for r in regions:
        (fwd,), (back,) = r.entries, r.exits
        assert back.out_shape == fwd.in_shape


def test_transitions_efficientformer_l1(timm_graph):
    _, gm = timm_graph("efficientformer_l1")
    (t,) = find_transitions(gm)
    assert t.kind == C2T and t.block.startswith("stages.3")
    assert len(t.in_shape) == 4 and len(t.out_shape) == 3
    assert "flatten" in " ".join(t.nodes)


def test_transitions_efficientformer_v2(timm_graph):
    model, gm = timm_graph("efficientformerv2_s0")
    regions = find_regions(gm)
    attn = _modules_of(model, "Attention2d") + _modules_of(model, "Attention2dDownsample")
    assert sorted(r.block for r in regions) == sorted(attn)
    assert all(r.block.startswith(("stages.2.", "stages.3.")) for r in regions)
    _check_round_trips(regions)
    assert all(len(r.entries) == 3 for r in regions)  # q, k, v each leave the conv side


def test_transitions_edgenext(timm_graph):
    model, gm = timm_graph("edgenext_xx_small")
    regions = find_regions(gm)
    assert [r.block for r in regions] == _modules_of(model, "SplitTransposeBlock")
    _check_round_trips(regions)


def test_no_transitions_in_a_cnn(timm_graph):
    _, gm = timm_graph("resnet18")
    assert find_regions(gm) == [] and find_transitions(gm) == []
    assert Counter(i.kind for i in detect_norms(gm)) == {"batchnorm": 20}


# ------------------------------------------------------------------ counts and summary


def test_op_counts_and_summary(xxs_gm):
    counts = op_counts(xxs_gm)
    n_conv = sum(1 for n in xxs_gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    assert counts["conv2d"] == n_conv > 0
    assert counts["scaled_dot_product_attention"] == 9
    assert sum(counts.values()) == sum(1 for n in xxs_gm.graph.nodes if n.op == "call_function")
    summary = summarize(xxs_gm)
    json.dumps(summary)
    assert summary["op_counts"] == counts
    assert set(summary["norms"]) == {"batchnorm", "layernorm_tokens"}
    assert summary["norms"]["layernorm_tokens"]["count"] == 21
    assert [r["block"] for r in summary["regions"]] == ["stages.2.1", "stages.3.1", "stages.4.1"]
    assert [t["kind"] for t in summary["transitions"]] == [C2T, T2C] * 3
