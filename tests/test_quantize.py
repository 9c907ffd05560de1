"""The quantize API: end to end, never touches the user's model, deterministic, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import hyq_fx
from hyq_fx.pass_base import quantizers
from hyq_fx.quantize import CalibrationDataError
from hyq_fx.recipes import RECIPES, Recipe, RecipeError, get_recipe


class TinyHybrid(torch.nn.Module):
    """conv → BN → tokens → one attention head → linear: the smallest hybrid."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        t = torch.relu(self.bn(self.conv(x))).flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.fc(t.mean(1))


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return TinyHybrid().eval()


def _calib(n=8):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def test_quantize_end_to_end_on_mobilevit(xxs_model, xxs_input):
    before = {k: v.clone() for k, v in xxs_model.state_dict().items()}
    qgm = hyq_fx.quantize(xxs_model, [xxs_input[:2], xxs_input[2:]], "minmax", progress=False)
    assert isinstance(qgm, torch.fx.GraphModule)
    assert all(torch.equal(before[k], v) for k, v in xxs_model.state_dict().items())
    with torch.no_grad():
        fp, q = xxs_model(xxs_input), qgm(xxs_input)
    assert q.shape == fp.shape
    assert 0 < (q - fp).abs().max() < fp.abs().max()
    assert qgm.meta["hyq"]["recipe"]["name"] == "minmax"
    assert qgm.meta["hyq"]["n_calib"] == 4


def test_quantize_leaves_the_training_flag_and_weights_alone(tiny):
    tiny.train()
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    hyq_fx.quantize(tiny, _calib(), progress=False)
    assert tiny.training
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())


def test_quantized_graph_runs_on_other_batch_sizes(tiny):
    qgm = hyq_fx.quantize(tiny, _calib(), progress=False)
    for n in (1, 3, 17):
        assert qgm(torch.randn(n, 3, 8, 8)).shape == (n, 5)


def test_same_seed_gives_bitwise_identical_quantization(tiny):
    calib = _calib(16)
    a = hyq_fx.quantize(tiny, calib, "percentile", seed=3, progress=False)
    b = hyq_fx.quantize(tiny, calib, "percentile", seed=3, progress=False)
    qa, qb = quantizers(a), quantizers(b)
    assert qa.keys() == qb.keys()
    for name in qa:
        assert torch.equal(qa[name].scale, qb[name].scale)
        assert torch.equal(qa[name].zero_point, qb[name].zero_point)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_runs_and_round_trips_as_json(tiny, recipe):
    r = get_recipe(recipe)
    assert Recipe.from_dict(json.loads(r.to_json())) == r
    qgm = hyq_fx.quantize(tiny, _calib(), recipe, w_bits=6, a_bits=6, progress=False)
    assert qgm(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_recipe_from_a_json_file(tiny, tmp_path):
    path = tmp_path / "r.json"
    path.write_text(
        json.dumps(
            {
                "name": "weights-only",
                "passes": [
                    {"pass": "insert_quantizers", "args": {"ops": ["linear"]}},
                    {"pass": "calibrate"},
                ],
            }
        )
    )
    qgm = hyq_fx.quantize(tiny, _calib(), str(path), progress=False)
    ops = [n.meta["hyq_quant"]["op"] for n in qgm.graph.nodes if "hyq_quant" in n.meta]
    assert ops and all("linear" in op for op in ops)


def test_a_step_runs_only_at_the_bit_widths_its_when_allows(tiny):
    from hyq_fx.pass_base import QuantContext

    data = {
        "name": "when",
        "passes": [
            {"pass": "insert_quantizers"},
            {"pass": "calibrate"},
            {"pass": "round_weights_gptq", "when": {"max_a_bits": 6, "min_w_bits": 4}},
        ],
    }
    recipe = Recipe.from_dict(data)
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
    for w_bits, a_bits, runs in ((8, 8, False), (8, 6, True), (4, 4, True), (3, 4, False)):
        ctx = QuantContext(_calib(), w_bits=w_bits, a_bits=a_bits, progress=False)
        names = [p.name for p in recipe.build(ctx)]
        assert ("round_weights_gptq" in names) == runs, (w_bits, a_bits)
        assert any(e.get("skipped") for e in ctx.log) == (not runs)
    for when, match in (
        ({"max_abits": 6}, r"unknown 'when' key\(s\) \['max_abits'\]"),
        ({"max_a_bits": 1}, "when.max_a_bits must be a bit width"),
        ([6], "'when' must be an object"),
    ):
        bad = {"name": "x", "passes": [{"pass": "calibrate", "when": when}]}
        with pytest.raises(RecipeError, match=match):
            Recipe.from_dict(bad)
    # a skipped step's options are still checked
    bad = {"name": "x", "passes": [{"pass": "round_weights_gptq", "args": {"damp": 5.0},
                                    "when": {"max_a_bits": 2}}]}  # fmt: skip
    with pytest.raises(RecipeError, match="damp"):
        Recipe.from_dict(bad).build(QuantContext(_calib(), progress=False))


def test_bad_inputs_get_clear_errors(tiny, tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe 'minmaxx'"):
        hyq_fx.quantize(tiny, _calib(), "minmaxx")
    with pytest.raises(ValueError, match=r"w_bits: bits=1 is outside the supported range 2..16"):
        hyq_fx.quantize(tiny, _calib(), w_bits=1)
    with pytest.raises(ValueError, match="a_bits: bits=17"):
        hyq_fx.quantize(tiny, _calib(), a_bits=17)
    with pytest.raises(CalibrationDataError, match="no calibration images"):
        hyq_fx.quantize(tiny, [])
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "passes": [{"pass": "calibrate",}]}')
    with pytest.raises(RecipeError, match="not valid JSON.*line 1"):
        get_recipe(str(bad))
    with pytest.raises(RecipeError, match=r"passes\[0\]: unknown pass 'fold_bn'"):
        Recipe.from_dict({"name": "x", "passes": [{"pass": "fold_bn"}]})
    with pytest.raises(RecipeError, match=r"passes\[0\]: pass 'calibrate' has no option"):
        Recipe.from_dict({"name": "x", "passes": [{"pass": "calibrate", "args": {"n": 1}}]})
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['pases'\]"):
        Recipe.from_dict({"name": "x", "pases": []})


def test_capture_error_names_the_module():
    class ValueBranch(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x * 2
            return x

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Identity(), ValueBranch())

        def forward(self, x):
            return self.body(x)

    with pytest.raises(hyq_fx.CaptureError, match=r"inside module 'body.1' \(ValueBranch\)"):
        hyq_fx.capture(Outer(), torch.randn(2, 3))


def test_the_default_recipe_rounds_weights_once_at_every_bit_width():
    from hyq_fx.pass_base import QuantContext

    recipe = get_recipe("hyq-fx")
    for w_bits in range(2, 9):
        for a_bits in range(2, 9):
            ctx = QuantContext(_calib(), w_bits=w_bits, a_bits=a_bits, progress=False)
            built = recipe.build(ctx)
            gptq = [p for p in built if p.name == "round_weights_gptq"]
            assert len(gptq) == 1, (w_bits, a_bits)
            # compensated below W8A8, the plain path (with bias correction) at W8A8 and up
            assert gptq[0].compensate == (min(w_bits, a_bits) <= 6), (w_bits, a_bits)
            assert any(p.name == "correct_bias" for p in built) == (not gptq[0].compensate)
