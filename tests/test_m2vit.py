"""M2-ViT-style passes: power_of_two_scales (exact 2^k scales, exponent chosen by output error)
and mixed_precision (per-layer bits by sensitivity under an average budget).

Both are approximate rewrites, so the tests check measured gains: the output-chosen exponent
has less op error than ⌈log2 s⌉, pow2 scales by output error beat naive pow2 at the logits, and
mixed 4/8 bits at a 6-bit average beats uniform 4 (and the best mix beats uniform 6) bits.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import hyq_fx
from hyq_fx.pass_base import (
    PassError,
    QuantContext,
    get_pass,
    get_tensor,
    quantizers,
    run_passes,
)
from hyq_fx.passes.mixed_precision import greedy_bits
from hyq_fx.passes.power_of_two_scales import Pow2Grid, is_power_of_two
from hyq_fx.quantize import quantizers_mode
from hyq_fx.recipes import Recipe, get_recipe
from hyq_fx.report import sqnr_db
from hyq_fx.spec import QuantSpec

aten = torch.ops.aten


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyHybrid(nn.Module):
    """Conv stem + depthwise/pointwise convs, then tokens through attention and an MLP."""

    def __init__(self, c: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c, 2 * c, 1)
        d = 2 * c
        self.norm1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.pw(self.dw(self.stem(x))))
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.norm1(t)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        t = t + self.proj(attn @ v)
        t = t + self.fc2(F.gelu(self.fc1(self.norm2(t))))
        return self.head(t.mean(dim=1))


@pytest.fixture(scope="module")
def tiny() -> tuple[fx.GraphModule, list[torch.Tensor], torch.Tensor]:
    """The captured TinyHybrid, two calibration batches and a held-out batch."""
    torch.manual_seed(0)
    model = TinyHybrid().eval()
    with torch.no_grad():  # give BN real statistics so folding changes the weights
        model.stem[1].running_mean.uniform_(-0.2, 0.2)
        model.stem[1].running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(24, 3, 16, 16, generator=gen)
    return hyq_fx.capture(model, data[:2]), [data[:8], data[8:16]], data[16:]


def _quantized(tiny, w_bits: int, a_bits: int, *extra: dict, pow2_spec: bool = False):
    gm, calib, _ = tiny
    recipe = copy.deepcopy(get_recipe("minmax").to_dict())  # to_dict shares the args dicts
    if pow2_spec:  # the naive power-of-two: QuantSpec(scale_type="pow2") takes ⌈log2 s⌉
        for role in ("weight", "activation"):
            recipe["passes"][2]["args"][role]["scale_type"] = "pow2"
    recipe["passes"] += list(extra)
    ctx = QuantContext(calib, w_bits=w_bits, a_bits=a_bits, progress=False)
    out = run_passes(copy.deepcopy(gm), Recipe.from_dict(recipe).build(ctx))
    return out, ctx


def _logit_sqnr(gm: fx.GraphModule, x: torch.Tensor) -> float:
    with torch.no_grad():
        q = gm(x)
        with quantizers_mode(gm, "off"):
            fp = gm(x)
    return sqnr_db(fp, q)


POW2 = {"pass": "power_of_two_scales"}


# ------------------------------------------------------------------ power_of_two_scales


def test_pow2_scales_are_exact_powers_of_two(tiny):
    gm, ctx = _quantized(tiny, 6, 6, POW2)
    fqs = quantizers(gm)
    names_before = set(quantizers(_quantized(tiny, 6, 6)[0]))
    assert set(fqs) == names_before  # replaced under the same names
    for name, fq in fqs.items():
        assert fq.spec.scale_type == "pow2", name
        assert is_power_of_two(fq.scale), (name, fq.scale)
        assert fq.mode == "quantize" and fq.calibrated
        assert torch.equal(fq.zero_point, fq.zero_point.round())
        assert (fq.zero_point >= fq.spec.qmin).all() and (fq.zero_point <= fq.spec.qmax).all()
    log = next(e for e in ctx.log if e["pass"] == "power_of_two_scales")
    assert log["quantizers"] == len(fqs)
    assert log["not_ceil"] > 0  # the objective does not just round up


def test_pow2_roles_select_quantizers(tiny):
    gm, _ = _quantized(tiny, 8, 8, {**POW2, "args": {"roles": ["weight"]}})
    for fq in quantizers(gm).values():
        assert (fq.spec.scale_type == "pow2") == (fq.role == "weight")


def _single_linear(w_bits: int, a_bits: int, seed: int = 0):
    """One linear layer whose scales sit just above a power of two, so ⌈log2 s⌉ nearly doubles
    the step while ⌊log2 s⌋ only clips the largest values."""
    torch.manual_seed(seed)
    model = nn.Linear(32, 16).eval()
    with torch.no_grad():
        w = torch.randn(16, 32)
        qmax = 2 ** (w_bits - 1) - 1
        target = 1.1 * 2.0**-4 * qmax  # max |w| per row → s = 1.1·2^-4
        model.weight.copy_(w / w.abs().amax(1, keepdim=True) * target)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(64, 10, 32, generator=gen)
    gm = hyq_fx.capture(model, x[:2])
    ctx = QuantContext([x], w_bits=w_bits, a_bits=a_bits, progress=False)
    gm = run_passes(gm, [get_pass(name)(ctx) for name in ("insert_quantizers", "calibrate")])
    return gm, ctx, x


def _op_mse(gm: fx.GraphModule, x: torch.Tensor) -> float:
    with torch.no_grad():
        with quantizers_mode(gm, "off"):
            fp = gm(x)
        return (gm(x) - fp).pow(2).mean().item()


def _naive_ceil(gm: fx.GraphModule) -> fx.GraphModule:
    naive = copy.deepcopy(gm)
    for fq in quantizers(naive).values():
        grid = Pow2Grid(fq.spec, fq.scale, fq.zero_point)
        fq.set_qparams(*grid.at(grid.k_ceil)[0])
    return naive


@pytest.mark.parametrize("role", ["weight", "activation"])
def test_output_chosen_exponent_beats_ceil(role):
    gm, ctx, x = _single_linear(4, 4)
    if role == "activation":  # make the input's scale sit just above a power of two as well
        fq = next(f for f in quantizers(gm).values() if f.role == "activation")
        fq.set_qparams(torch.tensor([1.1 * 2.0**-2]), fq.zero_point)
    naive = _naive_ceil(gm)
    get_pass("power_of_two_scales")(ctx, roles=[role], objective="output")(gm)
    chosen = next(f for f in quantizers(gm).values() if f.role == role)
    base = next(f for f in quantizers(naive).values() if f.role == role)
    assert not torch.equal(chosen.scale, base.scale)  # a case where they differ
    assert is_power_of_two(chosen.scale)
    held_out = torch.randn(64, 10, 32, generator=torch.Generator().manual_seed(7))
    for data in (x, held_out):
        assert _op_mse(gm, data) < 0.9 * _op_mse(naive, data)


def test_tensor_objective_never_worse_than_ceil():
    gm, ctx, x = _single_linear(4, 8)
    naive = _naive_ceil(gm)
    get_pass("power_of_two_scales")(ctx, objective="tensor")(gm)
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        fq, old = gm.get_submodule(node.target), naive.get_submodule(node.target)
        src = get_tensor(gm, node.args[0]) if fq.role == "weight" else x
        dims = 1 if fq.spec.per_channel else None  # per output row, or the whole tensor
        err_new = (fq(src) - src).pow(2).mean(dim=dims)
        err_old = (old(src) - src).pow(2).mean(dim=dims)
        assert (err_new <= err_old + 1e-12).all(), node.target
        assert (err_new < err_old).any(), node.target


def test_pow2_by_output_error_beats_naive_pow2_at_the_logits(tiny):
    held_out = tiny[2]
    ours = _logit_sqnr(_quantized(tiny, 6, 6, POW2)[0], held_out)
    naive = _logit_sqnr(_quantized(tiny, 6, 6, pow2_spec=True)[0], held_out)
    assert ours > naive + 1.0, (ours, naive)


def test_pow2_grid_keeps_the_asymmetric_range():
    spec = QuantSpec(bits=8, symmetric=False)
    scale, zp = torch.tensor([0.0123]), torch.tensor([128.0])
    grid = Pow2Grid(spec, scale, zp)
    lo, hi = (spec.qmin - zp) * scale, (spec.qmax - zp) * scale
    for k in (grid.k_ceil, grid.k_ceil + 1):  # s' >= s: the whole range stays covered
        (s2, z2), *_ = grid.at(k)
        assert (spec.qmin - z2) * s2 <= lo + s2 / 2 and (spec.qmax - z2) * s2 >= hi - s2 / 2
    low, high, mid = grid.at(grid.k_floor)  # s' < s: clip the top, the bottom, or both ends
    assert torch.allclose((spec.qmin - low[1]) * low[0], lo, atol=low[0].item() / 2)
    assert torch.allclose((spec.qmax - high[1]) * high[0], hi, atol=high[0].item() / 2)
    centre = ((spec.qmin - mid[1]) * mid[0] + (spec.qmax - mid[1]) * mid[0]) / 2
    assert torch.allclose(centre, (lo + hi) / 2, atol=mid[0].item())
    sym = Pow2Grid(QuantSpec(bits=4, symmetric=True, per_channel=True), torch.tensor([0.3, 0.5]),
                   torch.zeros(2))  # fmt: skip
    (s2, z2), *_ = sym.at(sym.k_ceil)
    assert torch.equal(s2, torch.tensor([0.5, 0.5])) and torch.equal(z2, torch.zeros(2))


def test_pow2_options_and_preconditions(tiny):
    with pytest.raises(PassError, match="objective"):
        get_pass("power_of_two_scales")(QuantContext(), objective="hessian")
    with pytest.raises(PassError, match="roles"):
        get_pass("power_of_two_scales")(QuantContext(), roles=["bias"])
    gm, calib, _ = tiny
    gm = copy.deepcopy(gm)
    ctx = QuantContext(calib, progress=False)
    get_pass("insert_quantizers")(ctx)(gm)
    with pytest.raises(PassError, match="run 'calibrate' before"):
        get_pass("power_of_two_scales")(ctx)(gm)


# ------------------------------------------------------------------ mixed_precision


def _weight_average(gm: fx.GraphModule) -> tuple[float, set[int]]:
    total = bits = 0
    used = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in quantizers(gm):
            fq = gm.get_submodule(node.target)
            if fq.role == "weight":
                n = get_tensor(gm, node.args[0]).numel()
                total, bits = total + n, bits + n * fq.spec.bits
                used.add(fq.spec.bits)
    return bits / total, used


def test_mixed_precision_meets_the_budget_and_records_choices(tiny):
    mixed = {"pass": "mixed_precision", "args": {"budget_bits": 6, "candidates": [4, 8]}}
    gm, ctx = _quantized(tiny, 8, 8, mixed)
    average, used = _weight_average(gm)
    assert average <= 6.0 + 1e-9 and average > 5.0  # within budget, and the budget is used
    assert used == {4, 8}
    for node in gm.graph.nodes:
        if node.target in (aten.conv2d.default, aten.linear.default):
            choice = node.meta["hyq_choice"]
            w = gm.get_submodule(node.meta["hyq_quant"]["weight"])
            assert choice["w_bits"] == w.spec.bits
            assert set(choice["w_bits_sensitivity"]) == {"4", "8"}
    assert all(f.spec.bits == 8 for f in quantizers(gm).values() if f.role == "activation")
    log = next(e for e in ctx.log if e["pass"] == "mixed_precision")
    assert log["average_bits"] <= 6.0


def test_mixed_4_8_beats_uniform_at_the_budget(tiny):
    held_out = tiny[2]

    def mixed(cands):
        args = {"budget_bits": 6, "candidates": cands}
        return _logit_sqnr(_quantized(tiny, 8, 8, {"pass": "mixed_precision", "args": args})[0],
                           held_out)  # fmt: skip

    uniform4 = _logit_sqnr(_quantized(tiny, 4, 8)[0], held_out)
    uniform6 = _logit_sqnr(_quantized(tiny, 6, 8)[0], held_out)
    mixed48, mixed468 = mixed([4, 8]), mixed([4, 6, 8])
    assert mixed48 > uniform4 + 3.0, (mixed48, uniform4)
    assert max(mixed48, mixed468) > uniform6, (mixed48, mixed468, uniform6)


def test_mixed_precision_both_roles_budget_activations_too(tiny):
    args = {"budget_bits": 6, "candidates": [4, 8], "role": "both", "metric": "kl"}
    gm, ctx = _quantized(tiny, 8, 8, {"pass": "mixed_precision", "args": args})
    logs = {e["role"]: e for e in ctx.log if e["pass"] == "mixed_precision"}
    assert set(logs) == {"weight", "activation"}
    assert all(e["average_bits"] <= 6.0 for e in logs.values())
    assert {f.spec.bits for f in quantizers(gm).values() if f.role == "activation"} <= {4, 8}


def test_greedy_bits_keeps_sensitive_layers_high():
    sizes = [10, 1000, 1000, 10]
    sens = [{4: 100.0, 8: 0.0}, {4: 1.0, 8: 0.0}, {4: 2.0, 8: 0.0}, {4: 50.0, 8: 0.0}]
    # saving 4040 bit·elements: the two large layers (ΔS = 3) beat a large + a small one (51)
    assert greedy_bits(sizes, sens, [4, 8], 6.0) == [8, 4, 4, 8]
    assert greedy_bits(sizes, sens, [4, 8], 6.05) == [8, 4, 8, 8]  # one large layer is enough
    assert greedy_bits(sizes, sens, [4, 8], 8.0) == [8, 8, 8, 8]
    assert greedy_bits(sizes, sens, [4, 8], 4.0) == [4, 4, 4, 4]


def test_mixed_precision_options():
    with pytest.raises(PassError, match="below the smallest candidate"):
        get_pass("mixed_precision")(QuantContext(), budget_bits=3, candidates=[4, 8])
    with pytest.raises(PassError, match="role"):
        get_pass("mixed_precision")(QuantContext(), role="bias")
    with pytest.raises(PassError, match="metric"):
        get_pass("mixed_precision")(QuantContext(), metric="hessian")
    with pytest.raises(PassError, match="candidates"):
        get_pass("mixed_precision")(QuantContext(), candidates=[4, 32])


def test_recipes_run_end_to_end(tiny):
    gm, calib, held_out = tiny
    for name in ("pow2", "mixed"):
        ctx = QuantContext(calib, w_bits=6, a_bits=6, progress=False)
        out = run_passes(copy.deepcopy(gm), get_recipe(name).build(ctx))
        assert [e["pass"] for e in ctx.log] == [get_recipe(name).passes[-1].name]
        assert math.isfinite(_logit_sqnr(out, held_out))
