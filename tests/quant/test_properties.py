"""The gate's quantizer-property suite passes real twins and catches a broken scale or zero point."""
import copy

import pytest
import torch

from helpers import small_net
from qrobust.quant import get_preset, quantize_model
from qrobust.quant.properties import check_twin, quantizers
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
