"""Properties of the quantizer math (DESIGN.md "Quantizer math"), with PyTorch's fake-quant ops as oracle."""
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from qrobust.errors import InvalidArgument
from qrobust.quant.quantizer import (
    EPS, HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, compute_qparams, dequantize,
    fake_quantize, make_observer, qparams_for, quant_range, quantize,
)

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)
values = st.lists(finite, min_size=1, max_size=64).map(lambda v: torch.tensor(v, dtype=torch.float32))
bits = st.integers(1, 16)
scheme = st.sampled_from([(False, False), (False, True), (True, True), (True, False)])  # (symmetric, signed)

EDGE_ROWS = [[0.0], [-0.0], [1e-30, -1e-30], [3e38 / 1e32], [5.0, 5.0, 5.0], [-7.0], [1e6, -1e6]]


def edge_examples(fn):
    for row in EDGE_ROWS:
        fn = example(torch.tensor(row, dtype=torch.float32), 8, (False, False))(fn)
        fn = example(torch.tensor(row, dtype=torch.float32), 1, (True, True))(fn)
    return fn


@given(values, bits, scheme)
@edge_examples
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(x, b, sch):
    qp = qparams_for(x, b, *sch)
    lo, hi = qp.representable
    inside = (x >= lo) & (x <= hi)
    err = (dequantize(quantize(x, qp), qp) - x).abs()
    assert (err[inside] <= qp.scale / 2 * (1 + 1e-5) + 1e-6 * x.abs()[inside]).all()


@given(values, bits, scheme)
@edge_examples
def test_values_outside_the_range_saturate(x, b, sch):
    qp = qparams_for(x * 0.5, b, *sch)  # a range narrower than the data, so some values fall outside
    lo, hi = qp.representable
    q = quantize(x, qp)
    assert (q[x > hi + qp.scale] == qp.q_max).all()
    assert (q[x < lo - qp.scale] == qp.q_min).all()
    assert ((q >= qp.q_min) & (q <= qp.q_max)).all()


@given(values, bits, scheme)
@edge_examples
def test_zero_is_exactly_representable(x, b, sch):
    qp = qparams_for(x, b, *sch)
    zero = torch.zeros(1)
    lo, hi = qp.representable
    if lo <= 0 <= hi:
        assert fake_quantize(zero, qp).item() == 0.0


@given(values, bits, scheme)
@edge_examples
def test_fake_quantize_is_idempotent(x, b, sch):
    qp = qparams_for(x, b, *sch)
    once = fake_quantize(x, qp)
    assert torch.equal(fake_quantize(once, qp), once)


@given(values, bits, scheme)
def test_quantize_is_monotone(x, b, sch):
    qp = qparams_for(x, b, *sch)
    xs = x.sort().values
    assert (quantize(xs, qp).diff() >= 0).all()


@given(values, bits, scheme)
def test_at_most_two_to_the_bits_distinct_values(x, b, sch):
    qp = qparams_for(x, b, *sch)
    assert fake_quantize(x, qp).unique().numel() <= 2**b
    assert qp.q_max - qp.q_min + 1 == 2**b


@given(values, bits, st.booleans())
@example(torch.tensor([3.0, 5.0]), 8, False)
@example(torch.tensor([-3.0, -1.0]), 1, True)
def test_affine_range_covers_min_and_max_including_zero(x, b, signed):
    qp = qparams_for(x, b, symmetric=False, signed=signed)
    lo, hi = qp.representable
    # the integer zero point shifts the grid by at most half a step from [min(x, 0), max(x, 0)]
    half = qp.scale / 2 * (1 + 1e-5) + 1e-6 * x.abs().max()
    assert lo <= min(x.min().item(), 0.0) + half and hi >= max(x.max().item(), 0.0) - half


@given(st.integers(1, 6), st.integers(1, 8), bits, scheme, st.integers(0, 2**31 - 1))
def test_per_channel_equals_per_tensor_applied_channel_by_channel(channels, width, b, sch, seed):
    x = torch.randn(channels, width, 3, generator=torch.Generator().manual_seed(seed)) * 10
    qp = qparams_for(x, b, *sch, axis=0)
    out = fake_quantize(x, qp)
    for c in range(channels):
        assert torch.equal(out[c], fake_quantize(x[c], qparams_for(x[c], b, *sch)))


def _near_half(x, qp):
    scale, _ = qp._broadcast(x)
    codes = x / scale
    frac = codes - torch.floor(codes)
    # x / s and torch's x * (1 / s) differ by float32 rounding, which grows with the code's magnitude
    return (frac - 0.5).abs() < 1e-3 + 1e-6 * codes.abs()


@given(values, st.integers(2, 16), scheme)
@edge_examples
def test_matches_torch_fake_quantize_per_tensor_affine(x, b, sch):
    qp = qparams_for(x, b, *sch)
    theirs = torch.fake_quantize_per_tensor_affine(x, qp.scale.item(), int(qp.zero_point), qp.q_min, qp.q_max)
    ours = fake_quantize(x, qp)
    diff = (ours - theirs).abs()
    # torch multiplies by 1/s where we divide by s: at an exact .5 tie they may round apart by one step
    assert (diff[~_near_half(x, qp)] <= 1e-6 * (1 + x.abs()[~_near_half(x, qp)])).all()
    assert (diff <= qp.scale * 1.0001 + 1e-6 * (1 + x.abs())).all()  # one step, plus float32 spacing at |x|


@given(st.integers(1, 5), st.integers(2, 16), scheme, st.integers(0, 2**31 - 1))
def test_matches_torch_fake_quantize_per_channel_affine(channels, b, sch, seed):
    x = torch.randn(channels, 7, generator=torch.Generator().manual_seed(seed)) * 3
    qp = qparams_for(x, b, *sch, axis=0)
    theirs = torch.fake_quantize_per_channel_affine(x, qp.scale, qp.zero_point.to(torch.int32), 0, qp.q_min, qp.q_max)
    ours = fake_quantize(x, qp)
    ok = ~_near_half(x, qp)
    assert torch.allclose(ours[ok], theirs[ok], atol=1e-6, rtol=1e-6)


def test_round_half_to_even_like_torch():
    qp = compute_qparams(torch.tensor(-10.0), torch.tensor(10.0), 8, symmetric=True, signed=True)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5]) * qp.scale
    assert quantize(x, qp).tolist() == [0, 2, 2, 0, -2]


@given(values, bits, scheme)
def test_straight_through_gradient_is_one_on_the_grid_and_zero_outside(x, b, sch):
    qp = qparams_for(x * 0.5, b, *sch)
    x = x.clone().requires_grad_(True)
    fake_quantize(x, qp).sum().backward()
    codes = torch.round(x.detach() / qp.scale) + qp.zero_point
    expected = ((codes >= qp.q_min) & (codes <= qp.q_max)).float()
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("b,signed,expected", [(1, True, (-1, 0)), (8, True, (-128, 127)), (8, False, (0, 255)),
                                               (16, True, (-32768, 32767)), (4, False, (0, 15))])
def test_integer_grid(b, signed, expected):
    assert quant_range(b, signed) == expected


def test_constant_tensor_has_floored_scale_and_no_nan():
    qp = qparams_for(torch.zeros(10), 8)
    assert qp.scale.item() == pytest.approx(EPS)
    assert torch.equal(fake_quantize(torch.zeros(10), qp), torch.zeros(10))


@pytest.mark.parametrize("bad", [0, 17, -3, 8.0, True, "8"])
def test_bits_out_of_range_is_a_clear_error(bad):
    with pytest.raises(InvalidArgument, match=r"^bits="):
        quant_range(bad, True)
    with pytest.raises(InvalidArgument, match=r"^bits="):
        MinMaxObserver(bits=bad)


@pytest.mark.parametrize("obs", [MinMaxObserver(), MovingAverageMinMaxObserver(), HistogramObserver()])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_observers_refuse_nan_and_inf(obs, bad):
    with pytest.raises(InvalidArgument, match="finite"):
        obs.observe(torch.tensor([0.0, bad, 1.0]))


def test_observer_without_data_is_a_clear_error():
    with pytest.raises(InvalidArgument, match="observed no data"):
        MinMaxObserver().qparams()


def test_moving_average_tracks_like_torch():
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver as Theirs

    ours, theirs = MovingAverageMinMaxObserver(averaging_constant=0.1), Theirs(averaging_constant=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(100, generator=gen) * 3
        ours.observe(x)
        theirs(x)
    assert ours.min_val.item() == pytest.approx(theirs.min_val.item(), rel=1e-6)
    assert ours.max_val.item() == pytest.approx(theirs.max_val.item(), rel=1e-6)


def test_histogram_observer_clips_outliers_that_min_max_keeps():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(100_000, generator=gen), torch.tensor([1000.0])])
    hist, mm = HistogramObserver(percentile=99.9), MinMaxObserver()
    for chunk in x.split(10_000):
        hist.observe(chunk)
        mm.observe(chunk)
    assert mm.qparams().scale.item() == pytest.approx(1000 / 255, rel=1e-5)
    lo, hi = hist.observed_range()
    assert 0.95 < hi.item() < 1.5 and lo.item() >= 0.0
    assert hist.qparams().scale.item() < mm.qparams().scale.item() / 100


def test_histogram_observer_rebins_when_the_range_grows():
    obs = HistogramObserver(percentile=100.0)
    obs.observe(torch.linspace(0, 1, 1000))
    obs.observe(torch.linspace(-4, 4, 1000))
    assert obs.counts.sum().item() == 2000
    lo, hi = obs.observed_range()
    assert (lo.item(), hi.item()) == (-4.0, 4.0)


def test_per_channel_histogram_is_refused():
    with pytest.raises(InvalidArgument, match="per-tensor only"):
        make_observer("histogram", 8, False, False, axis=0)


def test_symmetric_unsigned_uses_the_grid_midpoint_like_torch():
    qp = compute_qparams(torch.tensor(-1.0), torch.tensor(2.0), 8, symmetric=True, signed=False)
    assert int(qp.zero_point) == 128
    assert qp.scale.item() == pytest.approx(2.0 / 127.5)
    assert math.isclose(qp.scale.item(), 2 / 127.5, rel_tol=1e-6)
