"""round_weights_gptq (GPTQ weight rounding), depthwise per-channel inputs, reconstruct_blocks.

All three are approximate rewrites, so the tests check measured gains against the baseline
they replace (round-to-nearest, per-tensor depthwise inputs, untuned scales) and that what they
install is well-formed (weights on their quantizer's grid, per-channel specs where promised).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hyq_fx
from hyq_fx.pass_base import (
    PassError,
    QuantContext,
    get_pass,
    get_tensor,
    quantizers,
    record_node_outputs,
    run_passes,
)
from hyq_fx.passes.reconstruct_blocks import partition_blocks
from hyq_fx.passes.round_weights_gptq import gptq_round, search_round
from hyq_fx.quantize import quantizers_mode
from hyq_fx.recipes import Recipe, get_recipe
from hyq_fx.report import sqnr_db

pytestmark = pytest.mark.usefixtures("one_thread")


class Bottleneck(nn.Module):
    """Conv stem, an inverted bottleneck (1x1 expand, depthwise 3x3, 1x1 project), a head.

    The expansion's output channels get very different ranges, as in MobileViT's MV2 blocks.
    """

    def __init__(self, c: int = 8, e: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), nn.BatchNorm2d(c), nn.SiLU())
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1), nn.BatchNorm2d(e), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, 1, 1, groups=e), nn.BatchNorm2d(e), nn.SiLU())
        self.project = nn.Conv2d(e, c, 1)
        self.head = nn.Linear(c, 10)
        with torch.no_grad():  # channel ranges spread over two orders of magnitude
            spread = torch.logspace(-1, 1, e)[torch.randperm(e)]
            self.expand[1].weight.mul_(spread)
            self.expand[1].bias.mul_(spread)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.head(x.mean((2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = Bottleneck()
    with torch.no_grad():  # settle the BN statistics on the data distribution
        model.train()
        for _ in range(5):
            model(torch.randn(32, 3, 16, 16))
    return model.eval()


def _recipe(base: str, extra: list[dict], **insert_args) -> Recipe:
    data = get_recipe(base).to_dict()
    for step in data["passes"]:
        if step["pass"] == "insert_quantizers":
            step["args"].update(insert_args)
    data["passes"] += extra
    data["name"] = "test"
    return Recipe.from_dict(data)


def _logit_sqnr(gm: torch.fx.GraphModule, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(sqnr_db(model(x), gm(x)))


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(64, 3, 16, 16, generator=gen), torch.randn(64, 3, 16, 16, generator=gen)


def test_gptq_round_beats_round_to_nearest_on_correlated_inputs():
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(24, 24, generator=gen)
    x = mix @ torch.randn(24, 2000, generator=gen)  # strongly correlated input columns
    w = torch.randn(16, 24, generator=gen)
    scale = w.abs().amax(1) / 7
    h = x @ x.t()
    q = gptq_round(w, h, scale, -7, 7, damp=0.01).float()
    rtn = torch.clamp(torch.round(w / scale[:, None]), -7, 7) * scale[:, None]
    on_grid = q / scale[:, None]
    assert torch.allclose(on_grid, on_grid.round(), atol=1e-4) and on_grid.abs().max() <= 7
    err_gptq = ((q - w) @ x).square().sum()
    err_rtn = ((rtn - w) @ x).square().sum()
    assert err_gptq < 0.7 * err_rtn, (float(err_gptq), float(err_rtn))


def test_gptq_pass_lowers_the_logit_error_and_keeps_weights_on_grid(data):
    calib, test = data
    model = _model()
    rtn = hyq_fx.quantize(model, calib, "minmax", 4, 8, progress=False)
    gptq = hyq_fx.quantize(
        model, calib, _recipe("minmax", [{"pass": "round_weights_gptq"}]), 4, 8, progress=False
    )
    assert _logit_sqnr(gptq, model, test) > _logit_sqnr(rtn, model, test) + 1.0
    for node in gptq.graph.nodes:
        fq = gptq.get_submodule(node.target) if node.op == "call_module" else None
        if fq is not None and fq.role == "weight":
            w = get_tensor(gptq, node.args[0])
            with quantizers_mode(gptq, "quantize"):
                assert torch.equal(fq(w), w), node.target  # already on the grid: Q(Ŵ) = Ŵ


def test_search_round_beats_gptq_on_depthwise_kernels():
    # 3x3 patches of a smooth image: the taps are strongly correlated, as in a real depthwise conv
    gen = torch.Generator().manual_seed(0)
    image = torch.nn.functional.avg_pool2d(torch.randn(64, 1, 40, 40, generator=gen), 3, 1, 1)
    cols = torch.nn.functional.unfold(image, 3).transpose(0, 1).reshape(9, -1)
    h = (cols @ cols.t()).double() / cols.shape[1]
    w = torch.randn(200, 9, generator=gen) * (1 + torch.rand(200, 1, generator=gen))
    scale = w.abs().amax(1) / 7
    q, s = search_round(w, h, scale, -7, 7, grid=20)
    on_grid = q / s[:, None]
    assert torch.allclose(on_grid, on_grid.round(), atol=1e-6) and on_grid.abs().max() <= 7
    assert (s <= scale.double() + 1e-12).all()  # only shrunk, as GPTQ's scale search

    def err(r: torch.Tensor) -> torch.Tensor:
        d = r.double() - w.double()
        return torch.einsum("od,de,oe->o", d, h, d)

    s0 = scale.double()[:, None]
    rtn = torch.clamp(torch.round(w.double() / s0), -7, 7) * s0
    assert (err(q) <= err(rtn) * (1 + 1e-9)).all()  # round-to-nearest is one of the candidates
    gptq = gptq_round(w, h, scale, -7, 7)
    assert err(q).sum() < 0.85 * err(gptq).sum(), (float(err(q).sum()), float(err(gptq).sum()))


def test_exhaustive_rounding_of_depthwise_weights_lowers_the_logit_error(data):
    calib, test = data
    model = _model()
    sqnr = {}
    for columns in (0, 9):
        step = {"pass": "round_weights_gptq", "args": {"exhaustive_max_columns": columns}}
        gm = hyq_fx.quantize(model, calib, _recipe("minmax", [step]), 3, 8, progress=False)
        sqnr[columns] = _logit_sqnr(gm, model, test)
    assert sqnr[9] > sqnr[0] + 1.0, sqnr


@pytest.mark.parametrize(("w_bits", "a_bits", "searched"), [(4, 8, True), (6, 6, False)])
def test_exhaustive_search_runs_only_at_its_bit_widths(data, w_bits, a_bits, searched):
    calib, _ = data
    ctx = QuantContext([calib], w_bits=w_bits, a_bits=a_bits, progress=False)
    gates = {"exhaustive_max_columns": 9, "exhaustive_max_bits": 4}
    step = {"pass": "round_weights_gptq", "args": {**gates, "exhaustive_min_activation_bits": 8}}
    run_passes(hyq_fx.capture(_model(), calib[:2]), _recipe("minmax", [step]).build(ctx))
    rounding = {r["layer"]: r.get("rounding") for r in ctx.log[-1]["layers"]}
    # rows of <= 9 taps: the depthwise 3x3 conv (conv2d_2), the 1x1 conv and the head over 8
    expected = {"conv2d_1", "conv2d_2", "linear"} if searched else set()
    assert {op for op, how in rounding.items() if how == "search"} == expected, rounding


def test_gptq_needs_calibrated_weight_quantizers():
    gm = hyq_fx.capture(nn.Sequential(nn.Conv2d(3, 4, 1)).eval(), torch.randn(2, 3, 4, 4))
    ctx = QuantContext([torch.randn(2, 3, 4, 4)])
    get_pass("insert_quantizers")(ctx)(gm)
    with pytest.raises(PassError, match="calibrate"):
        get_pass("round_weights_gptq")(ctx)(gm)
    with pytest.raises(PassError, match="damp"):
        get_pass("round_weights_gptq")(ctx, damp=2.0)
    for bad in (16, "9"):
        with pytest.raises(PassError, match="exhaustive_max_columns"):
            get_pass("round_weights_gptq")(ctx, exhaustive_max_columns=bad)


def test_depthwise_per_channel_max_bits_limits_the_activation_bit_widths(data):
    calib, _ = data
    recipe = _recipe("minmax", [], depthwise_per_channel=True, depthwise_per_channel_max_bits=7)
    for a_bits, per_channel in ((8, 0), (7, 1), (4, 1)):
        gm = hyq_fx.quantize(_model(), calib, recipe, 8, a_bits, progress=False)
        acts = [fq for fq in quantizers(gm).values() if fq.role != "weight"]
        found = [fq for fq in acts if fq.spec.per_channel]
        assert len(found) == per_channel, a_bits
    ctx = QuantContext([calib])
    for bad in (1, 7.5):
        with pytest.raises(PassError, match="depthwise_per_channel_max_bits"):
            get_pass("insert_quantizers")(ctx, depthwise_per_channel_max_bits=bad)


def test_depthwise_inputs_per_channel_beat_per_tensor_at_4_bits(data):
    calib, test = data
    model = _model()
    per_tensor = hyq_fx.quantize(model, calib, "minmax", 8, 4, progress=False)
    recipe = _recipe("minmax", [], depthwise_per_channel=True)
    per_channel = hyq_fx.quantize(model, calib, recipe, 8, 4, progress=False)
    dw_inputs = [
        fq for name, fq in quantizers(per_channel).items() if fq.role == "activation"
        and fq.spec.per_channel
    ]  # fmt: skip
    assert len(dw_inputs) == 1 and dw_inputs[0].spec.axis == 1
    assert dw_inputs[0].scale.numel() == 32
    assert _logit_sqnr(per_channel, model, test) > _logit_sqnr(per_tensor, model, test) + 1.0


def test_reconstruct_blocks_lowers_every_block_and_the_logit_error(data):
    calib, test = data
    model = _model()
    base = hyq_fx.quantize(model, calib, "minmax", 4, 4, progress=False)
    tuned = copy.deepcopy(base)
    ctx = QuantContext(list(calib.split(16)), w_bits=4, a_bits=4, progress=False)
    blocks = partition_blocks(tuned, depth=1)
    assert [b.module for b in blocks] == ["stem", "expand", "dw", "project", "head"]
    get_pass("reconstruct_blocks")(ctx, steps=60, lr=1e-2, depth=1, weights=True)(tuned)
    records = [e for e in ctx.log if e.get("pass") == "reconstruct_blocks"]
    assert len(records) == 5
    assert all(r["loss_after"] <= r["loss_before"] for r in records), records
    assert any(r["loss_after"] < r["loss_before"] for r in records), records
    assert _logit_sqnr(tuned, model, test) > _logit_sqnr(base, model, test)


def test_reconstruct_blocks_undoes_scales_that_raise_the_held_out_error(data, monkeypatch):
    calib, _ = data
    base = hyq_fx.quantize(_model(), calib, "minmax", 4, 4, progress=False)
    tuned = copy.deepcopy(base)
    ctx = QuantContext(list(calib.split(16)), w_bits=4, a_bits=4, progress=False)
    recon = get_pass("reconstruct_blocks")(ctx, steps=1, images=32, holdout=32, depth=1)

    def overfit(gm, block, batches):  # a fit that claims a gain but clips every input hard
        for op in block.ops:
            for fq_node in op.all_input_nodes:
                fq = gm.get_submodule(fq_node.target) if fq_node.op == "call_module" else None
                if fq is not None and fq.role == "activation":
                    fq.set_qparams(fq.scale * 0.05, fq.zero_point)
        return {"loss_before": 1.0, "loss_after": 0.5}

    monkeypatch.setattr(recon, "reconstruct", overfit)
    assert not recon(tuned).modified
    (check,) = [e for e in ctx.log if e.get("check")]
    assert check["images"] == 32 and check["after"] > check["before"] and not check["kept"]
    restored, original = quantizers(tuned), quantizers(base)
    assert all(torch.equal(fq.scale, original[n].scale) for n, fq in restored.items())


def test_reconstruct_blocks_skips_activation_bit_widths_above_max_bits(data):
    calib, _ = data
    gm = hyq_fx.quantize(_model(), calib, "minmax", 8, 8, progress=False)
    scales = {n: fq.scale.clone() for n, fq in quantizers(gm).items()}
    ctx = QuantContext(list(calib.split(16)), w_bits=8, a_bits=8, progress=False)
    assert not get_pass("reconstruct_blocks")(ctx, steps=5, max_bits=4)(gm).modified
    assert ctx.log == [{"pass": "reconstruct_blocks", "skipped": "a_bits > 4"}]
    assert all(torch.equal(fq.scale, scales[n]) for n, fq in quantizers(gm).items())
    with pytest.raises(PassError, match="max_bits"):
        get_pass("reconstruct_blocks")(ctx, max_bits=1)


def test_compensated_weight_fits_the_float_output_from_noisy_inputs():
    # X_q = X_fp + noise (as a 4-bit input quantizer adds): W* = argmin ‖V X_q − W X_fp‖
    from torch import fx

    from hyq_fx.passes.round_weights_gptq import _Layer

    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    gm = hyq_fx.capture(lin, torch.randn(2, 16))
    ctx = QuantContext([torch.randn(4, 16, generator=gen)], w_bits=8, a_bits=8, progress=False)
    run_passes(gm, _recipe("minmax", []).build(ctx))
    op = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    layer = _Layer(gm, op)
    assert isinstance(layer.op, fx.Node)
    mix = torch.randn(16, 16, generator=gen)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x_fp = torch.randn(n, 16, generator=gen) @ mix
        return x_fp + 2.0 * torch.randn(n, 16, generator=gen), x_fp

    x_q, x_fp = sample(4000)
    layer.add(x_q, x_fp)
    w = layer.weight
    w_star = layer.compensated_weight(damp=0.0)[0]
    exact = torch.linalg.lstsq(x_q.double(), (x_fp @ w.t()).double()).solution.t()
    assert torch.allclose(w_star.double(), exact, atol=1e-4)
    # and it generalizes: lower error than W on inputs it was not fitted on
    t_q, t_fp = sample(4000)
    err_star = (t_q @ w_star.t() - t_fp @ w.t()).square().mean()
    err_w = (t_q @ w.t() - t_fp @ w.t()).square().mean()
    assert err_star < 0.8 * err_w, (float(err_star), float(err_w))


def test_compensated_gptq_lowers_the_logit_error_at_4_bit_activations(data):
    calib, test = data
    model = _model()
    sqnr = {}
    for compensate in (False, True):
        step = {"pass": "round_weights_gptq", "args": {"compensate_inputs": compensate}}
        gm = hyq_fx.quantize(model, calib, _recipe("minmax", [step]), 4, 4, progress=False)
        sqnr[compensate] = _logit_sqnr(gm, model, test)
    assert sqnr[True] > sqnr[False] + 1.0, sqnr


def test_stepper_gives_each_layer_the_inputs_a_full_run_gives(data):
    from hyq_fx.passes.round_weights_gptq import RoundWeightsGPTQ, _Stepper

    calib, _ = data
    gm = hyq_fx.capture(_model(), calib[:2])
    ctx = QuantContext([calib], w_bits=4, a_bits=4, progress=False)
    run_passes(gm, _recipe("minmax", []).build(ctx))
    ops = RoundWeightsGPTQ._ops(gm)
    batches = list(calib.split(16))
    stepper = _Stepper(gm, batches)
    for op in ops:
        got = torch.cat(stepper.inputs_of(op))
        source = op.args[0].name
        full_run = [record_node_outputs(gm, b, [source])[source] for b in batches]
        assert torch.equal(got, torch.cat(full_run)), op.name
        # only values a later node needs are kept
        assert len(stepper.interpreters[0].env) <= 12, len(stepper.interpreters[0].env)
    with pytest.raises(PassError, match="compensate_min_samples"):
        get_pass("round_weights_gptq")(ctx, compensate_min_samples=0)
    with pytest.raises(PassError, match="compensate_inputs='yes' must be true or false"):
        get_pass("round_weights_gptq")(ctx, compensate_inputs="yes")
