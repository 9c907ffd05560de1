"""Q-HyViT passes: granularity/scheme selection lowers the Fisher-weighted output error and the
model error vs min-max, never picks a zero-point-overflowing candidate, and bridge-block
reconstruction lowers each bridge block's output error."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from torch import nn

import hyq_fx
from hyq_fx.pass_base import PassError, QuantContext, get_pass, quantizers, record_node_outputs
from hyq_fx.passes.reconstruct_bridge_blocks import KINDS, find_bridge_blocks
from hyq_fx.passes.select_granularity_and_scheme import _base_qparams, _Stats
from hyq_fx.quantize import quantizers_mode
from hyq_fx.recipes import get_recipe
from hyq_fx.report import sqnr_db
from hyq_fx.spec import QuantSpec

FAST = {"n_scales": 24, "rounds": 2, "images": 16, "max_rows": 256}


class TinyHybrid(nn.Module):
    """conv stem → 1x1 conv → tokens → one attention block → back to a map → classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.SiLU())
        self.pw = nn.Conv2d(16, 32, 1)
        self.norm = nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.fuse = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.dw(self.stem(x)))
        n, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        y = self.norm(t)
        t = t + self.attn(y, y, y, need_weights=False)[0]
        t = t + self.mlp(t)
        x = self.fuse(t.transpose(1, 2).reshape(n, c, h, w))
        return self.head(x.mean((2, 3)))


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    model = TinyHybrid().eval()
    with torch.no_grad():  # uneven channel ranges, as in trained hybrid models
        model.stem[0].weight.mul_(torch.logspace(-1, 1, 16)[:, None, None, None])
        model.pw.weight.mul_(torch.logspace(-1, 0.7, 32)[:, None, None, None])
    return model


def _data(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _quantize(model, calib, steps, bits=(4, 4)) -> torch.fx.GraphModule:
    gm = hyq_fx.capture(model, calib[:2])
    ctx = QuantContext(list(calib.split(8)), w_bits=bits[0], a_bits=bits[1], progress=False)
    for name, args in steps:
        get_pass(name)(ctx, **args)(gm)
        gm.recompile()
    return gm


BASE = [("decompose_attention", {}), ("fold_batchnorm", {}), ("insert_quantizers", {})]


@pytest.fixture(scope="module")
def tiny_pair():
    model, calib = _tiny(), _data(16, 0)
    minmax = _quantize(model, calib, BASE + [("calibrate", {})])
    chosen = _quantize(
        model, calib, BASE + [("select_granularity_and_scheme", FAST), ("calibrate", {})]
    )
    return model, minmax, chosen


def test_select_installs_the_choice_and_records_why(tiny_pair):
    _, _, gm = tiny_pair
    fqs = quantizers(gm)
    assert fqs and all(fq.calibrated and fq.mode == "quantize" for fq in fqs.values())
    chosen = [n for n in gm.graph.nodes if n.op == "call_module" and "hyq_choice" in n.meta]
    assert len(chosen) == len(fqs)  # every conv/linear/matmul quantizer was searched
    for node in chosen:
        fq, why = gm.get_submodule(node.target), node.meta["hyq_choice"]
        json.dumps(why, allow_nan=False)  # layer reports and artifacts can carry it
        assert (why["granularity"], why["scheme"]) == (fq.spec.granularity, fq.spec.scheme)
        assert f"{fq.spec.granularity}/{fq.spec.scheme}" in why["errors"]
        if fq.role == "activation" and fq.spec.per_channel:
            assert fq.scale.numel() > 1
    acts = [gm.get_submodule(n.target) for n in chosen if n.meta["hyq_choice"]["consumers"]]
    assert len({(f.spec.per_channel, f.spec.symmetric) for f in acts if f.role == "activation"}) > 1
    # the chosen error is the least among the candidates that do not overflow
    for node in chosen:
        why = node.meta["hyq_choice"]
        allowed = {k: v for k, v in why["errors"].items() if k not in why["excluded"]}
        assert why["errors"][f"{why['granularity']}/{why['scheme']}"] == min(allowed.values())


def test_select_lowers_the_model_error_vs_minmax(tiny_pair):
    model, minmax, chosen = tiny_pair
    x = _data(32, 1)  # held-out inputs
    with torch.no_grad():
        ref = model(x)
        base_db, chosen_db = sqnr_db(ref, minmax(x)), sqnr_db(ref, chosen(x))
    assert chosen_db > base_db + 1.0, (base_db, chosen_db)


class _Offsets(nn.Module):
    """A conv whose input has all-positive channels (min > 0): zero-point overflow bait."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)
        self.register_buffer("offset", torch.tensor([0.0, 3.0, 0.0, 5.0]).reshape(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.abs() * 0.2 + self.offset - 0.1 * (self.offset == 0))


def test_zero_point_overflow_is_detected_and_avoided():
    spec = QuantSpec(bits=4, symmetric=False, per_channel=True, axis=1)
    stats = _Stats(lo_c=torch.tensor([-1.0, 2.9, -0.5, 5.0]), hi_c=torch.tensor([1.0, 3.5, 2, 6]))
    assert _base_qparams(stats, spec)[2] == [1, 3]
    model = _Offsets().eval()
    calib = torch.randn(16, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    gm = hyq_fx.capture(model, calib[:2])
    ctx = QuantContext(list(calib.split(8)), w_bits=4, a_bits=4, progress=False)
    for name in ("insert_quantizers", "select_granularity_and_scheme"):
        get_pass(name)(ctx, **(FAST if name.startswith("select") else {}))(gm)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith("in0")]
    why = node.meta["hyq_choice"]
    assert why["overflow_channels"] == {"per-channel/asymmetric": [1, 3]}
    assert why["excluded"] == ["per-channel/asymmetric"]
    assert (why["granularity"], why["scheme"]) != ("per-channel", "asymmetric")


def test_select_rejects_bad_options_and_needs_quantizers():
    with pytest.raises(PassError, match="granularities"):
        get_pass("select_granularity_and_scheme")(QuantContext(), granularities=["per-row"])
    gm = hyq_fx.capture(nn.Sequential(nn.Conv2d(3, 4, 1)).eval(), torch.randn(2, 3, 4, 4))
    with pytest.raises(PassError, match="insert_quantizers"):
        get_pass("select_granularity_and_scheme")(QuantContext([torch.randn(2, 3, 4, 4)]))(gm)


# ------------------------------------------------------------------ bridge-block reconstruction


@pytest.fixture(scope="module")
def xxs64():
    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs", num_classes=10).eval()
    calib = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    return _quantize(model, calib, BASE + [("calibrate", {})]), calib


def _block_errors(gm, blocks, x) -> list[float]:
    names = {n.name for b in blocks for n in b.outputs}
    with quantizers_mode(gm, "off"):
        fp = record_node_outputs(gm, x, names)
    q = record_node_outputs(gm, x, names)
    return [
        sum(((q[n.name] - fp[n.name]).pow(2).mean() / fp[n.name].pow(2).mean()).item()
            for n in b.outputs)
        for b in blocks
    ]  # fmt: skip


def test_bridge_blocks_are_found_from_the_graph(xxs64):
    gm, _ = xxs64
    blocks = find_bridge_blocks(gm, ("conv->transformer",))
    assert len(blocks) == 3  # one per MobileViT block, found from structure
    for b in blocks:
        kinds = [op.target for op in b.ops]
        assert kinds[0] is torch.ops.aten.conv2d.default  # the local (conv) representation
        assert kinds[-1] is torch.ops.aten.matmul.default  # ... up to the attention output
        assert b.inputs and b.outputs and b.ops[-1] in b.outputs


def test_reconstruct_lowers_bridge_block_error(xxs64):
    gm, calib = xxs64
    gm = copy.deepcopy(gm)
    blocks = find_bridge_blocks(gm, ("conv->transformer",))
    before = _block_errors(gm, blocks, calib)
    ctx = QuantContext([calib], w_bits=4, a_bits=4, progress=False)
    get_pass("reconstruct_bridge_blocks")(ctx, steps=15, lr=1e-2)(gm)
    after = _block_errors(gm, find_bridge_blocks(gm, ("conv->transformer",)), calib)
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)
    records = [op.meta["hyq_reconstruct"] for b in blocks for op in b.ops]
    assert all(r["loss_after"] < r["loss_before"] for r in records)
    json.dumps(records)


def test_reconstruct_both_kinds_on_a_model_without_block_modules(tiny_pair):
    _, minmax, _ = tiny_pair
    gm = copy.deepcopy(minmax)
    blocks = find_bridge_blocks(gm)
    assert {b.kind for b in blocks} == {"conv->transformer", "transformer->conv"}
    ctx = QuantContext(list(_data(16, 0).split(8)), w_bits=4, a_bits=4, progress=False)
    get_pass("reconstruct_bridge_blocks")(ctx, steps=10, lr=1e-2, kinds=list(KINDS))(gm)
    records = [e for e in ctx.log if e.get("pass") == "reconstruct_bridge_blocks"]
    assert len(records) == 2
    assert all(r["loss_after"] < r["loss_before"] for r in records), records


def test_reconstruct_needs_calibrated_quantizers():
    gm = hyq_fx.capture(nn.Sequential(nn.Conv2d(3, 4, 1)).eval(), torch.randn(2, 3, 4, 4))
    ctx = QuantContext([torch.randn(2, 3, 4, 4)])
    get_pass("insert_quantizers")(ctx)(gm)
    with pytest.raises(PassError, match="calibrate"):
        get_pass("reconstruct_bridge_blocks")(ctx)(gm)


def test_qhyvit_recipe_is_registered():
    names = [s.name for s in get_recipe("qhyvit").passes]
    assert names.index("select_granularity_and_scheme") < names.index("calibrate")
    assert names[-1] == "reconstruct_bridge_blocks"
