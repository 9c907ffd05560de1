"""RepQ-ViT: scale reparameterization is exact and makes post-norm channel ranges uniform (so
per-tensor quantization loses less); the log√2 softmax quantizer matches its integer-kernel
form, beats the uniform grid at 4 bits, leaves the float graph alone and saves/loads."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import hyq_fx
from hyq_fx.fake_quant import quantize_with_spec
from hyq_fx.pass_base import PassError, QuantContext, get_pass, get_tensor, record_node_outputs
from hyq_fx.passes.log2_softmax_quantizer import log_dequantize, log_quantize
from hyq_fx.quantize import quantizers_mode
from hyq_fx.report import sqnr_db
from hyq_fx.serialize import load_graph_module, save_graph_module
from hyq_fx.spec import QuantSpec

aten = torch.ops.aten
NORMS = (aten.layer_norm.default, aten.group_norm.default)


def _run(name: str, gm, ctx: QuantContext, **options):
    p = get_pass(name)(ctx, **options)
    result = p(gm)
    gm.recompile()
    return p, result


def _perturb_norms(gm, seed: int = 7) -> None:
    """Random-init norms have γ = 1, β = 0 (equal channel ranges): make them differ."""
    gen = torch.Generator().manual_seed(seed)
    for node in gm.graph.nodes:
        if node.target in NORMS and len(node.args) > 3 and node.args[2] is not None:
            w, b = get_tensor(gm, node.args[2]), get_tensor(gm, node.args[3])
            w.data.copy_(torch.exp(torch.randn(w.shape, generator=gen)))
            b.data.copy_(torch.randn(b.shape, generator=gen))


def _assert_same(after: torch.Tensor, before: torch.Tensor, rel: float = 1e-5) -> None:
    err = (after - before).abs().max().item()
    assert err <= rel * before.abs().max().item(), f"max abs error {err}"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The test machine's cores are shared: one intra-op thread avoids oversubscription, which
    otherwise makes these small forward passes 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def v2_gm():
    torch.manual_seed(0)
    model = timm.create_model("mobilevitv2_050", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    return hyq_fx.capture(model, x, dynamic_batch=False), x


# ------------------------------------------------------------------ scale reparameterization


def test_reparameterize_is_exact_on_mobilevit_xxs(xxs_gm, xxs_input):
    _perturb_norms(xxs_gm)
    with torch.no_grad():
        before = xxs_gm(xxs_input)
    ctx = QuantContext([xxs_input[:2], xxs_input[2:]], progress=False)
    p, result = _run("reparameterize_norm_scales", xxs_gm, ctx)
    assert result.modified
    assert len(p.done) == 21 and not p.skipped  # 9 blocks × 2 + 3 final norms (via the fold)
    with torch.no_grad():
        after = xxs_gm(xxs_input)
    _assert_same(after, before)
    assert ctx.log[-1]["reparameterized"] == p.done


def _consumer_sqnr(gm, x: torch.Tensor, bits: int) -> dict[str, float]:
    """SQNR of each linear/conv output when only its input is per-tensor quantized."""
    ops = [n for n in gm.graph.nodes if n.target in (aten.linear.default, aten.conv2d.default)]
    inputs = record_node_outputs(gm, x, {n.args[0].name for n in ops})
    spec = QuantSpec(bits=bits)
    out = {}
    for op in ops:
        a, w = inputs[op.args[0].name], get_tensor(gm, op.args[1])
        qa = quantize_with_spec(a, spec, a.min(), a.max())
        out[op.name] = sqnr_db(
            op.target(a, w, None, *op.args[3:]), op.target(qa, w, None, *op.args[3:])
        )
    return out


def _channel_range_ratio(y: torch.Tensor, axis: int) -> float:
    flat = y.movedim(axis, 0).reshape(y.shape[axis], -1)
    span = flat.amax(1) - flat.amin(1)
    return (span.max() / span.min()).item()


def test_reparameterize_is_exact_on_mobilevitv2_and_equalises_ranges(v2_gm):
    import copy

    gm, x = copy.deepcopy(v2_gm[0]), v2_gm[1]
    _perturb_norms(gm)
    norms = [n.name for n in gm.graph.nodes if n.target in NORMS]
    with torch.no_grad():
        before = gm(x)
    y_before = record_node_outputs(gm, x, norms)
    sqnr_before = _consumer_sqnr(gm, x, bits=4)
    p, _ = _run("reparameterize_norm_scales", gm, QuantContext([x], a_bits=4, progress=False))
    assert sorted(p.done) == sorted(norms) and len(norms) == 21  # GroupNorm(1, C) → 1x1 conv
    with torch.no_grad():
        after = gm(x)
    _assert_same(after, before)
    # on the calibration batch every channel now spans the same range
    y_after = record_node_outputs(gm, x, norms)
    for name in norms:
        assert _channel_range_ratio(y_before[name], 1) > 5
        assert _channel_range_ratio(y_after[name], 1) < 1.001
    # and a per-tensor 4-bit quantizer of the norm output hurts each consumer less
    sqnr_after = _consumer_sqnr(gm, x, bits=4)
    consumers = [n.name for n in gm.graph.nodes if "hyq_reparam_from" in n.meta]
    gains = [sqnr_after[c] - sqnr_before[c] for c in consumers]
    assert len(consumers) == 21 and min(gains) > 3.0, gains
    assert sum(gains) / len(gains) > 8.0


class _Norms(torch.nn.Module):
    """The supported layouts and the ones that must be skipped, in one small module."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.ln_plain = torch.nn.LayerNorm(c, elementwise_affine=False)  # tokens → linear
        self.fc = torch.nn.Linear(c, c)
        self.gn = torch.nn.GroupNorm(2, c)  # NCHW → flatten/transpose → linear (no bias)
        self.fc_nobias = torch.nn.Linear(c, c, bias=False)
        self.ln2d = timm.layers.LayerNorm2d(c)  # permute → LN → permute → 2x2 s2 conv
        self.down = torch.nn.Conv2d(c, c, 2, stride=2)
        self.gn_dw = torch.nn.GroupNorm(1, c)  # → depthwise 1x1 conv, groups = C
        self.dw = torch.nn.Conv2d(c, c, 1, groups=c)
        self.gn_pad = torch.nn.GroupNorm(1, c)  # → padded 3x3 conv: skipped
        self.pad = torch.nn.Conv2d(c, c, 3, padding=1)
        self.ln_res = torch.nn.LayerNorm(c)  # → linear and a residual add: skipped
        self.fc_res = torch.nn.Linear(c, c)
        self.ln_mix = torch.nn.LayerNorm(c)  # → reshape that splits channels: skipped
        self.fc_mix = torch.nn.Linear(c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        t = t + self.fc(self.ln_plain(t))
        t = t + self.fc_nobias(self.gn(x).flatten(2).transpose(1, 2))
        m = t.transpose(1, 2).reshape(b, c, h, w)
        d = self.down(self.ln2d(m))
        m = m + self.dw(self.gn_dw(m)) + self.pad(self.gn_pad(m))
        r = self.ln_res(t)
        t = r + self.fc_res(r)
        mixed = self.ln_mix(t).reshape(b, h * w, 2, c // 2).transpose(2, 3).reshape(b, h * w, c)
        return t.mean(1) + self.fc_mix(mixed).mean(1) + m.mean((2, 3)) + d.mean((2, 3))


def test_reparameterize_finds_absorbing_consumers_and_skips_the_rest():
    torch.manual_seed(0)
    model = _Norms().eval()
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(4))
    gm = hyq_fx.capture(model, x)
    _perturb_norms(gm)
    with torch.no_grad():
        before = gm(x)
    p, _ = _run("reparameterize_norm_scales", gm, QuantContext([x], progress=False))
    with torch.no_grad():
        after = gm(x)
    _assert_same(after, before)
    paths = {n.name: n.meta.get("hyq_module_path", "") for n in gm.graph.nodes}
    done = {paths[n] for n in p.done}
    skipped = {paths[n]: why for n, why in p.skipped.items()}
    assert done == {"ln_plain", "gn", "ln2d", "gn_dw"}
    assert set(skipped) == {"gn_pad", "ln_res", "ln_mix"}
    assert "pads its input" in skipped["gn_pad"]
    assert "cannot absorb" in skipped["ln_res"]
    assert "do not arrive intact" in skipped["ln_mix"]


def test_reparameterize_strength_zero_only_aligns_offsets():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(6), torch.nn.Linear(6, 4)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0, 1.0, 3.0]))
        model[0].bias.copy_(torch.tensor([0.0, 5.0, -3.0, 1.0, 2.0, 0.5]))
    x = torch.randn(2, 10, 6, generator=torch.Generator().manual_seed(8))
    gm = hyq_fx.capture(model, x)
    linear = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    weight = get_tensor(gm, linear.args[1]).clone()
    p, _ = _run("reparameterize_norm_scales", gm, QuantContext([x], progress=False), strength=0.0)
    assert p.done
    torch.testing.assert_close(get_tensor(gm, linear.args[1]), weight)  # weights untouched
    _assert_same(gm(x), model(x))
    y = record_node_outputs(gm, x, [linear.args[0].name])[linear.args[0].name].reshape(-1, 6)
    mins = y.amin(0)
    torch.testing.assert_close(mins, mins.mean().expand(6))  # every channel starts at t
    with pytest.raises(PassError, match="strength"):
        get_pass("reparameterize_norm_scales")(QuantContext(), strength=1.5)


def test_reparameterize_must_run_before_insert_quantizers(xxs_gm, xxs_input):
    ctx = QuantContext([xxs_input[:2]], progress=False)
    _run("insert_quantizers", xxs_gm, ctx)
    with pytest.raises(PassError, match="before insert_quantizers"):
        _run("reparameterize_norm_scales", xxs_gm, ctx)
    with pytest.raises(PassError, match="unknown observer"):
        get_pass("reparameterize_norm_scales")(ctx, observer="maxmin")


# ------------------------------------------------------------------ log√2 softmax quantizer


def test_log_dequantize_is_the_shift_and_sqrt2_form():
    q = torch.arange(0, 64, dtype=torch.float32)
    delta = 0.37
    torch.testing.assert_close(log_dequantize(q, delta), delta * torch.exp2(-q / 2))
    torch.testing.assert_close(log_dequantize(q, delta, "2"), delta * torch.exp2(-q))
    x = torch.tensor([0.0, 1e-9, 0.37, 0.5, 0.37 / math.sqrt(2), 0.37 / 2])
    got = log_quantize(x, delta, bits=4)
    torch.testing.assert_close(got, torch.tensor([0, 0, 0.37, 0.37, 0.37 / math.sqrt(2), 0.185]))


def test_log2_softmax_quantizer_on_attention(xxs_gm, xxs_input):
    ctx = QuantContext([xxs_input[:2], xxs_input[2:]], a_bits=4, progress=False)
    for name in ("decompose_attention", "insert_quantizers", "calibrate"):
        _run(name, xxs_gm, ctx)
    x = xxs_input[:2]
    av = [n for n in xxs_gm.graph.nodes if n.meta.get("hyq_role") == "attn_av"]
    softmax = [n.args[0].args[0].name for n in av]
    uniform = [xxs_gm.get_submodule(n.args[0].target) for n in av]  # the quantizers replaced
    with torch.no_grad(), quantizers_mode(xxs_gm, "off"):
        float_out = xxs_gm(x)
        float_a = record_node_outputs(xxs_gm, x, softmax)
    quant_a = record_node_outputs(xxs_gm, x, softmax)  # softmax with upstream quantization
    p, result = _run("quantize_softmax_log2", xxs_gm, ctx)
    assert result.modified and len(p.deltas) == 9
    assert not any(n.target in p.deltas for n in xxs_gm.graph.nodes)  # the uniform ones are gone
    got = record_node_outputs(xxs_gm, x, [n.args[0].name for n in av])
    gains = []
    for op, name, fq in zip(av, softmax, uniform, strict=True):
        delta = op.meta["hyq_quant"]["log_input"]["delta"]
        # the graph computes the reference (shift-and-√2) quantizer
        expected = log_quantize(quant_a[name], delta, bits=4)
        torch.testing.assert_close(got[op.args[0].name], expected, atol=1e-6, rtol=1e-5)
        # on the same float attention map, the log grid loses less than the uniform one
        a = float_a[name]
        gains.append(sqnr_db(a, log_quantize(a, delta, bits=4)) - sqnr_db(a, fq(a)))
    print("A SQNR gain of log√2 over uniform, 4 bits:", [round(g, 2) for g in gains])
    assert sum(gains) / len(gains) > 0.5, gains
    # with the quantizers off the log-domain round trip is the identity: the float graph
    with torch.no_grad(), quantizers_mode(xxs_gm, "off"):
        _assert_same(xxs_gm(x), float_out)


class _TinyAttention(torch.nn.Module):
    """conv → tokens → LayerNorm → single-head softmax attention → linear."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, c, 3, padding=1)
        self.norm = torch.nn.LayerNorm(c)
        self.qkv = torch.nn.Linear(c, 3 * c)
        self.fc = torch.nn.Linear(c, 5)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.norm(t)).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.fc((t + a @ v).mean(1))


def test_repq_log2_recipe_keeps_float_graph_when_off_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = _TinyAttention().eval()
    calib = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    qgm = hyq_fx.quantize(model, calib, "repq-log2", w_bits=6, a_bits=4, progress=False)
    assert any("log_input" in n.meta.get("hyq_quant", {}) for n in qgm.graph.nodes)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        with quantizers_mode(qgm, "off"):
            off = qgm(x)
        _assert_same(off, model(x))
        q = qgm(x)
    save_graph_module(qgm, tmp_path / "m")
    loaded, _ = load_graph_module(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), q, atol=0, rtol=0)


def test_log2_pass_options_and_preconditions(xxs_gm, xxs_input):
    with pytest.raises(PassError, match="base="):
        get_pass("quantize_softmax_log2")(QuantContext(), base="e")
    with pytest.raises(PassError, match="after insert_quantizers"):
        _run("quantize_softmax_log2", xxs_gm, QuantContext([xxs_input[:2]], progress=False))
