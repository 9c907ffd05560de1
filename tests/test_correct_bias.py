"""correct_bias: the mean output error of every quantized conv/linear is removed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hyq_fx
from hyq_fx.pass_base import PassError, QuantContext, get_pass
from hyq_fx.passes.correct_bias import BIASED_OPS, _channel_means
from hyq_fx.quantize import quantizers_mode
from hyq_fx.report import sqnr_db

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU(),
        nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    with torch.no_grad():
        model.train()
        for _ in range(5):
            model(torch.randn(32, 3, 16, 16))
    return model.eval()


def test_every_layer_gets_the_float_mean_and_the_logits_improve():
    gen = torch.Generator().manual_seed(1)
    calib, test = (
        torch.randn(64, 3, 16, 16, generator=gen),
        torch.randn(64, 3, 16, 16, generator=gen),
    )
    model = _model()
    base = hyq_fx.quantize(model, calib, "minmax", 4, 4, progress=False)
    fixed = copy.deepcopy(base)
    ctx = QuantContext(list(calib.split(16)), w_bits=4, a_bits=4, progress=False)
    assert get_pass("correct_bias")(ctx, images=64, rounds=100, holdout=0)(fixed).modified
    ops = [n for n in fixed.graph.nodes if n.target in BIASED_OPS and "hyq_quant" in n.meta]
    assert len(ops) == 4
    same = [next(b for b in base.graph.nodes if b.name == op.name) for op in ops]
    batches = list(calib.split(16))
    got = _channel_means(fixed, batches, ops)
    old = _channel_means(base, batches, same)
    with quantizers_mode(base, "off"):  # the float model (base's biases are the original ones)
        want = _channel_means(base, batches, same)
    for op, ref in zip(ops, same, strict=True):
        scale = max(1.0, float(want[ref].abs().max()))
        assert (got[op] - want[ref]).abs().max() < 1e-5 * scale, op.name
        assert (old[ref] - want[ref]).abs().max() > 1e-3, op.name  # there was a shift to remove
    with torch.no_grad():
        assert sqnr_db(model(test), fixed(test)) > sqnr_db(model(test), base(test))


def test_bad_options_and_missing_data_are_clear_errors():
    with pytest.raises(PassError, match="rounds >= 1"):
        get_pass("correct_bias")(QuantContext([torch.zeros(1, 3, 8, 8)]), rounds=0)
    gm = hyq_fx.quantize(_model(), torch.randn(8, 3, 16, 16), "minmax", 8, 8, progress=False)
    with pytest.raises(PassError, match="no calibration data"):
        get_pass("correct_bias")(QuantContext([]))(gm)
