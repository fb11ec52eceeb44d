"""The gate's quantizer-property suite passes real twins and catches a broken scale or zero point."""
import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import small_net
from qrobust.quant import get_preset, quantize_model
from qrobust.quant.properties import (
    TIE_STEPS, Quantizer, check_drawn_values, check_twin, kernel_code, quantizers, tie_distance, torch_code_mismatch,
)
from qrobust.quant.quantizer import QParams


@pytest.fixture(scope="module")
def twins():
    model, x = small_net(), torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return {preset: quantize_model(model, get_preset(preset), [x]) for preset in ("int8-x86", "fake-w8a8")}


def test_real_twins_keep_every_property(twins):
    for twin in twins.values():
        assert check_twin(twin, examples=30) == []
    names = {q.where for q in quantizers(twins["int8-x86"])}
    assert {"0.weight", "0.output", "6.weight", "6.output"} <= names and "graph.0_input_scale_0" in names


def test_a_broken_zero_point_or_scale_is_named_with_its_counterexample(twins):
    broken = copy.deepcopy(twins["int8-x86"])
    broken.graph.get_submodule("2").zero_point = 300
    assert check_twin(broken) == ["2.output: zero point must be a whole number in [0, 255] (counterexample: "
                                  "zero_point[0] = 300)"]
    fake = copy.deepcopy(twins["fake-w8a8"])
    layer = fake.get_submodule("0")
    layer.act_qparams = QParams(torch.tensor(float("nan")), layer.act_qparams.zero_point, 0, 255)
    assert check_twin(fake) == ["0.input: scale must be finite and > 0 (counterexample: scale[0] = nan)"]


def test_a_broken_twin_fails_the_bundled_suite_naming_pair_and_layer(pytester):
    pytester.makeconftest("""
        import copy
        import torch
        from helpers import make_pair, small_net
        from qrobust.models import PAIRS, register_pair
        from qrobust.data import DATASETS
        from helpers import synthetic_set

        def build():
            model = small_net(4)
            pair = make_pair("broken-twin", model, preset="int8-x86")
            pair.quantized.graph.get_submodule("2").zero_point = 300
            return pair

        if "broken-twin" not in PAIRS:
            register_pair("broken-twin", build)
        if "synthetic" not in DATASETS:
            DATASETS.register("synthetic", synthetic_set)
    """)
    pytester.makefile(".yaml", thresholds="gate: {broken-twin: {}}\nperturbations: {awgn: {levels: [0]}}\n")
    pytester.makepyfile(test_q="""
        def test_quantizer_properties(qrobust_quantizer_pair, qrobust_check):
            qrobust_check.quantizer(qrobust_quantizer_pair)
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "test_q.py")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*broken-twin / 2.output: zero point must be a whole number in [[]0, 255] "
                                 "(counterexample: zero_point[[]0] = 300)*"])


# ---- PyTorch's quantize op against the kernel reference, at float32 ties --------------------------------
GRIDS = {torch.quint8: (0, 255), torch.qint8: (-128, 127)}


def test_the_reported_float32_tie_is_no_violation():
    """An AVX-512 host drew this value: x / scale is 254.50001 in float64 but exactly 254.5 in float32,
    which torch rounds half to even to 254 (the old float64 reference said 255)."""
    x, scale = 69.61763000488281, 0.27354666590690613
    assert kernel_code(x, scale, 0, 0, 255) == 254
    distance, step = tie_distance(x, scale, 0)
    assert distance < step  # within one float32 step of the tie: rounding order decides
    assert torch_code_mismatch(x, scale, 0, torch.quint8) is None
    activation = Quantizer("classifier.1.output", QParams(torch.tensor(scale), torch.tensor(0), 0, 255), torch.quint8)
    check_drawn_values(activation, examples=200)


@st.composite
def near_ties(draw):
    """A float32 scale, a zero point and a code on the grid, and x a few float32 steps (nextafter) from
    the exact tie between that code and the next: where host arithmetic differs."""
    dtype = draw(st.sampled_from(sorted(GRIDS, key=str)))
    q_min, q_max = GRIDS[dtype]
    scale = float(np.float32(draw(st.floats(1e-4, 10.0))))
    zero_point = draw(st.integers(q_min, q_max))
    code = draw(st.sampled_from([q_min, q_min + 1, 0, q_max - 1, q_max - 2] + [draw(st.integers(q_min, q_max - 1))]))
    tie = np.float32(scale * (code + 0.5 - zero_point))
    steps = draw(st.integers(-3, 3))
    x = tie
    for _ in range(abs(steps)):
        x = np.nextafter(x, np.float32(math.copysign(np.inf, steps)), dtype=np.float32)
    return float(x), scale, zero_point, dtype


@settings(max_examples=300, deadline=None, derandomize=True)
@given(near_ties())
def test_torch_agrees_with_the_kernel_reference_next_to_every_tie(case):
    """Values on both sides of exact ties, at codes near the grid's ends (-128, 127, 255) and zero: the
    property never fails for host arithmetic, and away from the band it holds torch to the exact code."""
    x, scale, zero_point, dtype = case
    assert torch_code_mismatch(x, scale, zero_point, dtype) is None
    q_min, q_max = GRIDS[dtype]
    theirs = int(torch.quantize_per_tensor(torch.tensor([x]), scale, zero_point, dtype).int_repr())
    distance, step = tie_distance(x, scale, zero_point)
    if distance > TIE_STEPS * step:
        assert theirs == kernel_code(x, scale, zero_point, q_min, q_max)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.sampled_from(sorted(GRIDS, key=str)), st.floats(1e-4, 10.0), st.data())
def test_a_real_defect_is_still_caught(dtype, scale, data):
    """The tie band is float32 precision, not a blanket tolerance: an op whose zero point is one off is
    caught on any value that is not next to a tie (the drawn values of the property are mostly such)."""
    q_min, q_max = GRIDS[dtype]
    scale = float(np.float32(scale))
    zero_point = data.draw(st.integers(q_min, q_max - 1))
    code = data.draw(st.integers(q_min, q_max - 2))  # the shifted code stays on the grid (saturation hides a shift)
    x = float(np.float32(scale * (code - zero_point + data.draw(st.sampled_from([0.0, 0.2, 0.4, 0.6, 0.8])))))

    def off_by_one(values, s, z, d):
        return torch.quantize_per_tensor(values, s, z + 1, d)

    assert torch_code_mismatch(x, scale, zero_point, dtype) is None
    found = torch_code_mismatch(x, scale, zero_point, dtype, quantize_op=off_by_one)
    assert found is not None and "reference" in found
