"""HyQ passes: outlier scaling (exact where folded, lower quantization error), integer softmax
(bounded error, exact grid, serializable), quantized norms (identity until calibrated)."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_path
from torch import nn

import hyq_fx
from hyq_fx.pass_base import PassError, QuantContext, get_pass, quantizers, run_passes
from hyq_fx.quantize import quantizers_mode
from hyq_fx.serialize import load_graph_module, save_graph_module

aten = torch.ops.aten


def _quantized(model, x, ctx, *extra: str, **options):
    gm = hyq_fx.capture(model.eval(), x[:2])
    names = ["decompose_attention", "fold_batchnorm", "insert_quantizers", "calibrate", *extra]
    return run_passes(gm, [get_pass(n)(ctx, **options.get(n, {})) for n in names])


def _errors(gm, x):
    with torch.no_grad():
        q = gm(x)
        with quantizers_mode(gm, "off"):
            fp = gm(x)
    return fp, (q - fp).pow(2).mean().item()


class _Bottleneck(nn.Module):
    """conv(+BN) → SiLU → 1x1 conv, or conv(+BN) → 1x1 conv, with outlier channels."""

    def __init__(self, act: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.SiLU() if act else nn.Identity()
        self.pw = nn.Conv2d(16, 8, 1)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            gain = torch.ones(16)
            gain[[2, 9]] = 25.0  # two outlier channels
            self.bn.weight.copy_(gain)
            self.bn.bias.copy_(torch.randn(16, generator=gen) * 0.1)
            self.bn.running_var.copy_(torch.rand(16, generator=gen) + 0.5)

    def forward(self, x):
        return self.pw(self.act(self.bn(self.conv(x))))


def _layer_error(gm, x, op_name: str) -> float:
    """Output error with only the quantizers of ``op_name`` (input and weight) switched on."""
    op = next(n for n in gm.graph.nodes if n.name == op_name)
    mine = [*op.meta["hyq_quant"]["inputs"], op.meta["hyq_quant"]["weight"]]
    with torch.no_grad(), quantizers_mode(gm, "off"):
        fp = gm(x)
        for name in mine:
            gm.get_submodule(name).mode = "quantize"
        return (gm(x) - fp).pow(2).mean().item()


def _outlier_case(act: bool):
    """8-bit weights, 4-bit activations: the outlier channels set the activation range."""
    torch.manual_seed(0)
    model = _Bottleneck(act).eval()
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    ctx = QuantContext([x[:4], x[4:]], w_bits=8, a_bits=4, progress=False)
    gm = _quantized(model, x, ctx)
    pw = [n.name for n in gm.graph.nodes if n.target is aten.conv2d.default][-1]
    fp0, err0 = _errors(gm, x)
    layer0 = _layer_error(gm, x, pw)
    opts = {"steps": 150, "samples": 1024}
    gm = run_passes(gm, [get_pass("scale_bottleneck_outliers")(ctx, **opts)])
    fp1, err1 = _errors(gm, x)
    layer1 = _layer_error(gm, x, pw)
    assert err1 < err0, (err0, err1)  # the whole model's error drops too
    return gm, ctx.log[-1], fp0, fp1, layer0, layer1


def test_outlier_scaling_behind_silu_uses_a_per_channel_quantizer(tmp_path):
    gm, log, fp0, fp1, err0, err1 = _outlier_case(act=True)
    assert [e["node"] for e in log["per_channel_quantizer"]] and not log["folded"]
    torch.testing.assert_close(fp1, fp0, atol=1e-5, rtol=1e-5)  # float graph unchanged
    assert err1 < 0.5 * err0, (err0, err1)
    per_channel = [
        f for f in quantizers(gm).values() if f.role == "activation" and f.spec.per_channel
    ]
    assert len(per_channel) == 1 and per_channel[0].scale.numel() == 16
    save_graph_module(gm, tmp_path / "m")  # the rewrite saves and loads (aten ops only)
    loaded, _ = load_graph_module(tmp_path / "m")
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))


def test_outlier_scaling_folds_exactly_into_an_affine_producer():
    gm, log, fp0, fp1, err0, err1 = _outlier_case(act=False)
    assert [e["producer"] for e in log["folded"]] == ["conv2d"]
    torch.testing.assert_close(fp1, fp0, atol=1e-5, rtol=1e-5)  # exact in FP32
    # less room than behind SiLU: signed channels share the outliers' zero-point
    assert err1 < 0.75 * err0, (err0, err1)
    # folded: no extra op at run time, activation quantizers stay per-tensor
    assert not any(n.target is aten.mul.Tensor for n in gm.graph.nodes)
    assert not any(f.spec.per_channel for f in quantizers(gm).values() if f.role == "activation")


def test_outlier_scaling_of_a_rescaled_producer_is_not_folded_into_it():
    """pw1 sits behind SiLU (per-channel quantizer: its weight becomes ``fq(w·α)·α⁻¹``, a
    computed tensor) and is the affine producer of pw2's input: pw2's α cannot be folded into
    pw1 any more and takes the per-channel quantizer too (before the fix: a crash)."""

    class Net(_Bottleneck):
        def __init__(self) -> None:
            super().__init__(act=True)
            self.pw = nn.Conv2d(16, 16, 1)
            self.pw2 = nn.Conv2d(16, 8, 1)
            with torch.no_grad():
                self.pw.weight[[3, 7]] *= 25.0  # outlier output channels of pw = pw2's input

        def forward(self, x):
            return self.pw2(super().forward(x))

    torch.manual_seed(0)
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    ctx = QuantContext([x[:4], x[4:]], w_bits=8, a_bits=4, progress=False)
    gm = _quantized(Net().eval(), x, ctx)
    fp0, err0 = _errors(gm, x)
    gm = run_passes(gm, [get_pass("scale_bottleneck_outliers")(ctx, steps=150, samples=1024)])
    fp1, err1 = _errors(gm, x)
    log = ctx.log[-1]
    assert len(log["per_channel_quantizer"]) == 2 and not log["folded"], log
    torch.testing.assert_close(fp1, fp0, atol=1e-5, rtol=1e-5)
    assert err1 < err0, (err0, err1)


def test_outlier_scaling_follows_channels_through_permutes():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 12, 3, padding=1)
            self.norm = nn.LayerNorm(12)
            self.pw = nn.Conv2d(12, 6, 1)
            with torch.no_grad():
                self.norm.weight.copy_(torch.linspace(0.2, 1.0, 12))
                self.norm.weight[[1, 7]] = 30.0
                self.norm.bias.normal_(0, 0.1)

        def forward(self, x):
            y = self.norm(self.conv(x).permute(0, 2, 3, 1))  # NHWC
            return self.pw(y.permute(0, 3, 1, 2))

    torch.manual_seed(0)
    x = torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    ctx = QuantContext([x[:4], x[4:]], w_bits=4, a_bits=4, progress=False)
    gm = _quantized(Net(), x, ctx)
    fp0, err0 = _errors(gm, x)
    gm = run_passes(gm, [get_pass("scale_bottleneck_outliers")(ctx, steps=150, samples=1024)])
    fp1, err1 = _errors(gm, x)
    log = ctx.log[-1]
    assert [e["producer"] for e in log["folded"]] == ["layer_norm"]
    torch.testing.assert_close(fp1, fp0, atol=1e-5, rtol=1e-5)
    assert err1 < err0, (err0, err1)


def test_outlier_scaling_needs_calibrated_quantizers():
    model = _Bottleneck(act=True).eval()
    x = torch.randn(4, 3, 8, 8)
    gm = hyq_fx.capture(model, x[:2])
    ctx = QuantContext([x], progress=False)
    run_passes(gm, [get_pass("insert_quantizers")(ctx)])
    with pytest.raises(PassError, match="run insert_quantizers and calibrate"):
        get_pass("scale_bottleneck_outliers")(ctx)(gm)
    with pytest.raises(PassError, match="placement='everywhere' is unknown"):
        get_pass("scale_bottleneck_outliers")(ctx, placement="everywhere")
    with pytest.raises(PassError, match="max_bits must be an int >= 2"):
        get_pass("scale_bottleneck_outliers")(ctx, max_bits=1)


def test_outlier_scaling_outside_its_bit_range_changes_nothing():
    """``min_bits`` / ``max_bits``: at activation bit widths outside the range the pass leaves
    the graph as it was and says why in the log; inside it, it rescales."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    for bits, runs in ((4, False), (6, True), (8, False)):
        ctx = QuantContext([x[:4], x[4:]], w_bits=8, a_bits=bits, progress=False)
        gm = _quantized(_Bottleneck(act=True), x, ctx)
        result = get_pass("scale_bottleneck_outliers")(
            ctx, steps=20, samples=256, min_gain=0.0, min_bits=5, max_bits=7
        )(gm)
        assert result.modified == runs
        assert isinstance(ctx.log[-1]["skipped"], str) != runs, ctx.log[-1]


@pytest.mark.slow
def test_outlier_scaling_on_a_real_mv2_stage():
    """The MV2 blocks of the trained mobilevit_xxs checkpoint: the quantized error drops."""
    from hyq_fx.data import image_folder, make_loader
    from hyq_fx.models import load_model

    ckpt = shared_path("checkpoints", "mobilevit_xxs.cifar10")
    model, info = load_model(f"local-dir:{ckpt}")
    images = next(iter(make_loader(image_folder(shared_path("data", "cifar10", "calib"), info,
                                                limit=16), batch_size=16)))[0]  # fmt: skip
    with torch.no_grad():
        feats = model.stages[0](model.stem(images[:, :, ::2, ::2]))  # 64x64 input
    stage = model.stages[1]  # three inverted-bottleneck (MV2) blocks
    ctx = QuantContext([feats[:8], feats[8:]], w_bits=4, a_bits=4, progress=False)
    gm = _quantized(stage, feats, ctx)
    fp0, err0 = _errors(gm, feats)
    gm = run_passes(gm, [get_pass("scale_bottleneck_outliers")(ctx, steps=150, samples=1024)])
    fp1, err1 = _errors(gm, feats)
    log = ctx.log[-1]
    assert len(log["per_channel_quantizer"]) + len(log["folded"]) >= 3
    torch.testing.assert_close(fp1, fp0, atol=1e-4, rtol=1e-4)
    assert err1 < 0.9 * err0, (err0, err1)
    for entry in log["per_channel_quantizer"] + log["folded"]:
        assert entry["mse_after"] < entry["mse_before"]


# ------------------------------------------------------------------------- integer softmax


class _Scores(nn.Module):
    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return torch.softmax(x * 3.0, dim=self.dim)


def _int_softmax(x, bits=8, input_bits=8, dim=-1, **kw):
    gm = hyq_fx.capture(_Scores(dim).eval(), x[:2])
    ctx = QuantContext([x], a_bits=8, progress=False)
    gm = run_passes(gm, [get_pass("integer_softmax")(ctx, bits=bits, input_bits=input_bits, **kw)])
    return gm


def test_integer_softmax_error_is_bounded_and_on_the_output_grid():
    x = torch.randn(4, 2, 16, 64, generator=torch.Generator().manual_seed(0))
    gm = _int_softmax(x, bits=8, input_bits=16)
    assert not any(n.target is aten.softmax.int for n in gm.graph.nodes)
    with torch.no_grad():
        y = gm(x)
    ref = torch.softmax(x * 3.0, dim=-1)
    err = (y - ref).abs()
    # linear exp: relative error of exp within ±4% (max/min ratio 1.078), output grid 1/255
    assert err.max().item() < 0.03, err.max().item()
    assert err.mean().item() < 2e-3, err.mean().item()
    grid = y * 255
    torch.testing.assert_close(grid, grid.round(), atol=1e-4, rtol=0)
    sums = y.sum(-1)
    assert (sums - 1).abs().max().item() <= 64 / 255 / 2 + 1e-6  # rounding of 64 entries
    # the linear exp beats the error of quantizing a float softmax output coarsely
    y4 = _int_softmax(x, bits=4, input_bits=16)(x)
    assert (y4 - ref).abs().max() > err.max()


def test_integer_softmax_other_dim_and_slope_option():
    x = torch.randn(3, 10, 5, generator=torch.Generator().manual_seed(1))
    gm = _int_softmax(x, dim=1, slope=0.7213)
    with torch.no_grad():
        y = gm(x)
    assert (y - torch.softmax(x * 3.0, dim=1)).abs().max().item() < 0.05
    with pytest.raises(PassError, match="bits=12 is outside 2..8"):
        get_pass("integer_softmax")(QuantContext(), bits=12)


def test_integer_softmax_graph_saves_and_loads(tmp_path):
    x = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(2))
    gm = _int_softmax(x)
    save_graph_module(gm, tmp_path / "m")
    loaded, _ = load_graph_module(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))


class _Norms(nn.Module):
    """GroupNorm(1, C) on a feature map, then a pre-norm residual LayerNorm on its tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(1, 8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        t = self.gn(self.conv(x)).flatten(2).transpose(1, 2)
        t = t + self.fc(self.ln(t)).repeat(1, 1, 2)
        return self.head(t.mean(1))


def test_quantize_norms_is_identity_until_calibrated():
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    gm = hyq_fx.capture(_Norms().eval(), x[:2])
    ctx = QuantContext([x], a_bits=8, progress=False)
    run_passes(gm, [get_pass(n)(ctx) for n in ("insert_quantizers", "calibrate")])
    with torch.no_grad():
        before = gm(x)
    n_before = len(quantizers(gm))
    assert get_pass("quantize_norms")(ctx)(gm).modified
    gm.recompile()
    # GN: input and output (its output feeds a residual add); LN: input only, its output
    # already reaches only the fc input quantizer
    assert len(quantizers(gm)) - n_before == 3
    with torch.no_grad():
        assert torch.equal(gm(x), before)
    run_passes(gm, [get_pass("calibrate")(ctx)])
    assert all(f.calibrated for f in quantizers(gm).values())
    with torch.no_grad():
        assert not torch.equal(gm(x), before)


@pytest.mark.slow
def test_full_recipe_accuracy_stays_close_to_partial():
    """W8A8 on the trained mobilevit_xxs: integer softmax + quantized norms cost little."""
    from hyq_fx.data import evaluate_top1, image_folder, make_loader
    from hyq_fx.models import load_model

    ckpt = shared_path("checkpoints", "mobilevit_xxs.cifar10")
    model, info = load_model(f"local-dir:{ckpt}")
    calib = make_loader(image_folder(shared_path("data", "cifar10", "calib"), info, limit=32), 32)
    dev = make_loader(image_folder(shared_path("data", "cifar10", "dev"), info, limit=100), 100)
    base = ["decompose_attention", "fold_batchnorm", "insert_quantizers", "calibrate"]
    partial = hyq_fx.Recipe.from_dict({"name": "p", "passes": [{"pass": p} for p in base]})
    full = hyq_fx.Recipe.from_dict(
        {
            "name": "f",
            "passes": [{"pass": p} for p in base]
            + [{"pass": "quantize_norms"}, {"pass": "calibrate"}, {"pass": "integer_softmax"}],
        }
    )
    accs = {}
    for recipe in (partial, full):
        qgm = hyq_fx.quantize(model, calib, recipe, 8, 8, progress=False)
        accs[recipe.name] = evaluate_top1(qgm, dev, progress=False)["top1"]
    assert accs["f"] >= accs["p"] - 0.03, accs
