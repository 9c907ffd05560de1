"""Property tests of the quantizer primitives (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hyq_fx.fake_quant import fake_quantize, qparams_from_range, round_ste
from hyq_fx.observers import make_observer
from hyq_fx.quantizer import FakeQuantizer
from hyq_fx.spec import QuantSpec, QuantSpecError

bits = st.integers(min_value=2, max_value=16)
floats = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)
specs = st.builds(QuantSpec, bits=bits, symmetric=st.booleans())


def _tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@settings(max_examples=200, deadline=None)
@given(spec=specs, values=st.lists(floats, min_size=1, max_size=64))
def test_in_range_error_is_at_most_half_a_step(spec, values):
    x = _tensor(values)
    scale, zp = qparams_from_range(x.min(), x.max(), spec)
    xq = fake_quantize(x, scale, zp, spec.qmin, spec.qmax)
    # the range covers every value, so no clipping: the error is rounding only
    assert torch.all((xq - x).abs() <= scale / 2 * (1 + 1e-4) + 1e-6)


@settings(max_examples=200, deadline=None)
@given(spec=specs, lo=floats, hi=floats)
def test_zero_is_exactly_representable(spec, lo, hi):
    lo, hi = min(lo, hi), max(lo, hi)
    scale, zp = qparams_from_range(_tensor([lo]), _tensor([hi]), spec)
    zero = fake_quantize(torch.zeros(1), scale, zp, spec.qmin, spec.qmax)
    assert zero.item() == 0.0
    assert spec.qmin <= zp.item() <= spec.qmax
    assert zp.item() == round(zp.item())  # zero is a code of the integer grid, not between two


@settings(max_examples=200, deadline=None)
@given(spec=specs, values=st.lists(floats, min_size=2, max_size=64))
def test_fake_quantize_is_monotonic(spec, values):
    x = _tensor(sorted(values))
    scale, zp = qparams_from_range(x.min() * 0.5, x.max() * 0.5, spec)
    xq = fake_quantize(x, scale, zp, spec.qmin, spec.qmax)
    assert torch.all(xq[1:] >= xq[:-1])


@settings(max_examples=100, deadline=None)
@given(spec=specs, hi=st.floats(min_value=0.01, max_value=100.0))
def test_values_beyond_the_range_clamp_to_the_ends(spec, hi):
    scale, zp = qparams_from_range(_tensor([-hi]), _tensor([hi]), spec)
    ends = fake_quantize(_tensor([-1e6, 1e6]), scale, zp, spec.qmin, spec.qmax)
    lowest = (spec.qmin - zp) * scale
    highest = (spec.qmax - zp) * scale
    torch.testing.assert_close(ends, torch.cat([lowest, highest]))


@settings(max_examples=100, deadline=None)
@given(bits=bits, values=st.lists(floats, min_size=1, max_size=32))
def test_power_of_two_scales_are_exact_powers(bits, values):
    spec = QuantSpec(bits=bits, symmetric=True, scale_type="pow2")
    x = _tensor(values)
    scale, _ = qparams_from_range(x.min(), x.max(), spec)
    k = torch.log2(scale)
    assert torch.equal(k, torch.round(k))
    # pow2 never shrinks the range: the values are still covered
    assert scale.item() * spec.qmax >= float(x.abs().max()) * (1 - 1e-6)


@settings(max_examples=50, deadline=None)
@given(channels=st.integers(1, 6), axis=st.integers(0, 3), bits=bits)
def test_per_channel_axis_quantizes_each_slice_with_its_own_scale(channels, axis, bits):
    shape = [2, 3, 4, 5]
    shape[axis] = channels
    gen = torch.Generator().manual_seed(channels * 10 + axis)
    x = torch.randn(shape, generator=gen) * torch.logspace(-2, 2, channels).reshape(
        [-1 if d == axis else 1 for d in range(4)]
    )
    spec = QuantSpec(bits=bits, symmetric=True, per_channel=True, axis=axis)
    obs = make_observer("minmax", spec)
    obs.observe(x)
    scale, zp = qparams_from_range(*obs.range_for(spec), spec)
    assert scale.numel() == channels
    xq = fake_quantize(x, scale, zp, spec.qmin, spec.qmax, axis)
    for c in range(channels):
        sl = x.select(axis, c)
        ref_scale, ref_zp = qparams_from_range(sl.min(), sl.max(), spec)
        ref = fake_quantize(sl, ref_scale, ref_zp, spec.qmin, spec.qmax)
        torch.testing.assert_close(xq.select(axis, c), ref)


def test_per_channel_scale_count_mismatch_is_explained():
    with pytest.raises(ValueError, match="3 scales but the tensor has 4 channels"):
        fake_quantize(torch.randn(4, 2), torch.ones(3), torch.zeros(3), -127, 127, axis=0)


@pytest.mark.parametrize("bad", [1, 17, 0, -3, 2.5, True])
def test_bits_outside_2_to_16_are_rejected(bad):
    with pytest.raises(QuantSpecError, match="bits"):
        QuantSpec(bits=bad)


def test_round_ste_passes_the_gradient_straight_through():
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    assert torch.equal(round_ste(x.detach()), torch.round(x.detach()))


def test_fake_quantize_gradient_is_zero_outside_the_range():
    x = torch.tensor([-100.0, 0.3, 100.0], requires_grad=True)  # ±1000 steps: clipped
    fake_quantize(x, torch.tensor([0.1]), torch.tensor([0.0]), -127, 127).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_observers_give_a_range_inside_the_data_range(observer):
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    x[0] = 50.0  # an outlier
    spec = QuantSpec(bits=4)
    obs = make_observer(observer, spec)
    obs.observe(x)
    lo, hi = obs.range_for(spec)
    assert x.min() <= lo <= hi <= x.max()
    if observer != "minmax":  # a 4-bit range should clip the lone outlier
        assert hi < 50.0

        def err(lo_, hi_):
            q = fake_quantize(x, *qparams_from_range(lo_, hi_, spec), spec.qmin, spec.qmax)
            return (q - x).pow(2).mean()

        assert err(lo, hi) < err(x.min(), x.max())


def test_unknown_observer_is_explained():
    with pytest.raises(ValueError, match="unknown observer 'kl'"):
        make_observer("kl", QuantSpec())


def test_quantizer_refuses_to_quantize_before_calibration():
    fq = FakeQuantizer(QuantSpec())
    with pytest.raises(RuntimeError, match="calibrate before"):
        fq.set_mode("quantize")
    fq(torch.randn(8))
    fq.calibrate()
    assert fq.mode == "quantize" and math.isfinite(fq.scale.item())
