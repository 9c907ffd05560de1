"""Each pass's invariant: exact rewrites match to 1e-5, quantizer insertion is the identity
until calibration, calibration leaves every quantizer calibrated."""

from __future__ import annotations

import pytest
import timm
import torch

import hyq_fx
from hyq_fx.pass_base import PassError, QuantContext, get_pass, quantizers
from hyq_fx.patterns import is_const, is_op, match_all, wildcard
from hyq_fx.quantize import quantizers_mode

aten = torch.ops.aten


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is target)


def _run(name: str, gm, ctx=None, **options):
    result = get_pass(name)(ctx or QuantContext(), **options)(gm)
    gm.recompile()
    return result


def test_decompose_attention_is_exact(xxs_gm, xxs_input):
    with torch.no_grad():
        before = xxs_gm(xxs_input)
    assert _count(xxs_gm, aten.scaled_dot_product_attention.default) == 9
    result = _run("decompose_attention", xxs_gm)
    assert result.modified
    assert _count(xxs_gm, aten.scaled_dot_product_attention.default) == 0
    assert _count(xxs_gm, aten.matmul.default) == 18
    assert _count(xxs_gm, aten.softmax.int) == 9
    with torch.no_grad():
        after = xxs_gm(xxs_input)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_decompose_attention_without_attention_is_a_no_op():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    gm = hyq_fx.capture(model, torch.randn(2, 3, 8, 8))
    assert not _run("decompose_attention", gm).modified


def test_fold_batchnorm_is_exact(xxs_model, xxs_input):
    # random-init BN has mean 0 / var 1: give it real statistics so folding does something
    model = timm.create_model("mobilevit_xxs", num_classes=10)
    model.load_state_dict(xxs_model.state_dict())
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    model.eval()
    gm = hyq_fx.capture(model, xxs_input[:2])
    with torch.no_grad():
        before = gm(xxs_input)
    n_bn = _count(gm, aten.batch_norm.default)
    assert n_bn == 32
    assert _run("fold_batchnorm", gm).modified
    assert _count(gm, aten.batch_norm.default) == 0
    with torch.no_grad():
        after = gm(xxs_input)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    # the unfolded weights and BN statistics are gone, not kept as dead copies
    names = {k for k, _ in gm.named_buffers()} | {k for k, _ in gm.named_parameters()}
    assert not any("running_mean" in k for k in names)


def test_fold_batchnorm_skips_conv_with_two_users():
    class TwoUsers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = TwoUsers().eval()
    model.bn.running_var.fill_(2.0)
    gm = hyq_fx.capture(model, torch.randn(2, 3, 8, 8))
    assert not _run("fold_batchnorm", gm).modified
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm(x), model(x))


def test_insert_quantizers_is_identity_until_calibrated(xxs_gm, xxs_input):
    _run("decompose_attention", xxs_gm)
    with torch.no_grad():
        before = xxs_gm(xxs_input)
    assert _run("insert_quantizers", xxs_gm).modified
    fqs = quantizers(xxs_gm)
    weights = [f for f in fqs.values() if f.role == "weight"]
    acts = [f for f in fqs.values() if f.role == "activation"]
    assert len(weights) == 35 + 37  # every conv and linear weight
    assert all(f.spec.per_channel and f.spec.symmetric for f in weights)
    assert all(not f.spec.per_channel and not f.spec.symmetric for f in acts)
    quantized = [n for n in xxs_gm.graph.nodes if "hyq_quant" in n.meta]
    assert len(quantized) == 35 + 37 + 18
    with torch.no_grad():
        after = xxs_gm(xxs_input)
    assert torch.equal(before, after)


def test_insert_quantizers_shares_one_quantizer_per_tensor(xxs_gm):
    _run("decompose_attention", xxs_gm)
    _run("insert_quantizers", xxs_gm)
    # q, k and v come from one qkv linear via unbind; the LayerNorm output feeds only qkv
    for node in xxs_gm.graph.nodes:
        if node.op == "call_module":
            producer = node.args[0]
            siblings = [u for u in producer.users if u.op == "call_module"]
            assert len(siblings) == 1, f"{producer.name} has {len(siblings)} quantizers"


def test_insert_quantizers_rejects_unknown_options():
    with pytest.raises(PassError, match="unknown op"):
        get_pass("insert_quantizers")(QuantContext(), ops=["conv3d"])
    with pytest.raises(PassError, match="unknown activation option"):
        get_pass("insert_quantizers")(QuantContext(), activation={"bitz": 4})


def test_calibrate_sets_every_quantizer(xxs_gm, xxs_input):
    ctx = QuantContext([xxs_input[:2], xxs_input[2:]], w_bits=4, a_bits=6, progress=False)
    _run("decompose_attention", xxs_gm, ctx)
    _run("insert_quantizers", xxs_gm, ctx)
    _run("calibrate", xxs_gm, ctx)
    fqs = quantizers(xxs_gm)
    assert fqs and all(f.calibrated and f.mode == "quantize" for f in fqs.values())
    assert {f.spec.bits for f in fqs.values() if f.role == "weight"} == {4}
    assert {f.spec.bits for f in fqs.values() if f.role == "activation"} == {6}
    with torch.no_grad():
        q = xxs_gm(xxs_input)
        with quantizers_mode(xxs_gm, "off"):
            fp = xxs_gm(xxs_input)
    assert not torch.equal(q, fp)  # quantization really happens
    # a second calibrate has nothing left to do
    assert not _run("calibrate", xxs_gm, ctx).modified


def test_calibrate_without_data_is_a_clear_error(xxs_gm):
    _run("insert_quantizers", xxs_gm)
    with pytest.raises(PassError, match="no calibration data"):
        _run("calibrate", xxs_gm, QuantContext())


def test_calibrate_names_the_first_nonfinite_node():
    class Blowup(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            y = torch.log(self.conv(x))  # NaN for negative inputs
            return self.fc(y.mean((2, 3)))

    gm = hyq_fx.capture(Blowup().eval(), torch.randn(2, 3, 4, 4))
    ctx = QuantContext([torch.randn(2, 3, 4, 4)], progress=False)
    _run("insert_quantizers", gm, ctx)
    with pytest.raises(PassError, match=r"NaN/Inf first appears at node 'log'"):
        _run("calibrate", gm, ctx)


def test_pattern_matches_conv_followed_by_batchnorm(xxs_gm):
    conv = is_op(aten.conv2d.default)(wildcard(), is_const(), ...).named("conv")
    bn = is_op(aten.batch_norm.default)(conv, ...).named("bn")
    found = list(match_all(xxs_gm, bn))
    assert len(found) == 32
    assert all(m["bn"].args[0] is m["conv"] for m in found)
