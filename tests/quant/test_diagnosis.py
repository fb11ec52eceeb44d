"""Per-layer diagnosis of a failing case: the layer where a twin loses the signal is the one named."""
import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from qrobust.quant import get_preset, quantize_model
from qrobust.quant.diagnosis import describe, layer_errors, worst_layers


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


def test_a_two_bit_layer_in_an_eight_bit_twin_is_named_first():
    model, x = net(), torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    twin = quantize_model(model, get_preset("fake-w8a8"), [x])
    two_bits = replace(get_preset("fake-asym2").weight)
    from qrobust.quant.quantizer import make_observer

    layer = twin[2]  # the middle conv: requantize its weight on a 2-bit grid
    observer = make_observer(two_bits.observer, 2, two_bits.symmetric, two_bits.signed, None)
    observer.observe(layer.layer.parametrizations.weight.original)
    layer.layer.parametrizations.weight[0].qparams = observer.qparams()
    rows = layer_errors(model, twin, x)
    assert [r.layer for r in rows] == ["0", "2", "4", "8"]
    assert worst_layers(rows, 1)[0].layer == "2" and rows[1].sqnr_db < rows[0].sqnr_db - 10
    assert describe(rows, 1).startswith("worst layers: 2 (")


def test_int8_layers_are_matched_to_the_fp32_tensor_they_compute_and_clipping_is_counted():
    model, x = net(), torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    twin = quantize_model(model, get_preset("int8-x86"), [x])
    rows = layer_errors(model, twin, x)
    # fused Conv+ReLU modules (named after the conv) compare with FP32's ReLU outputs
    assert [(r.layer, r.fp32_tensor) for r in rows[:3]] == [("0", "1"), ("2", "3"), ("4", "5")]
    assert all(r.sqnr_db > 15 and r.clip_fraction is not None and 0 <= r.clip_fraction < 0.2 for r in rows[:3])
    hot = x * 4  # far outside the calibrated range: the first layer's grid saturates
    assert layer_errors(model, twin, hot)[0].clip_fraction > rows[0].clip_fraction


@pytest.mark.usefixtures("warm")
def test_a_failing_case_names_its_worst_layers_in_the_message_and_the_report(pytester):
    from helpers import SUITE, thresholds

    pytester.makefile(".yaml", thresholds=thresholds(pair="lenet5-digits-asym2"))
    pytester.makepyfile(test_gate=SUITE)
    result = pytester.runpytest("-p", "no:cacheprovider", "--junitxml=junit.xml")
    result.stdout.fnmatch_lines(["*worst layers: classifier.1 (*dB*"])
    cases = json.loads((pytester.path / "qrobust-report" / "report.json").read_text())["cases"]
    failed = [c for c in cases if c["verdict"] == "fail"]
    assert failed and all(c["diagnosis"]["line"].startswith("worst layers:") for c in failed)
    assert {row["layer"] for row in failed[0]["diagnosis"]["layers"]} >= {"features.0", "features.3", "classifier.1"}
    assert len(failed[0]["diagnosis"]["samples"]) == 16
    assert 'name="qrobust_worst_layers"' in (pytester.path / "junit.xml").read_text()
    page = (pytester.path / "qrobust-report" / "report.html").read_text()
    # one card per failing case; level 0 (clean) is one case however many perturbations record it
    assert page.count('aria-label="per-layer SQNR"') == len({(c["perturbation"] if c["level"] else "clean", c["level"])
                                                            for c in failed})


@pytest.fixture(scope="module")
def warm():
    from qrobust.models import load_pair

    load_pair("lenet5-digits-asym2")


def test_the_diagnosis_ranks_samples_by_the_gates_own_kl_without_another_forward():
    """The case's evaluation kept its first samples' KL: the diagnosis picks the same most-different
    samples a fresh forward of both models would, and runs only the per-layer pass (2 forwards, not 4)."""
    from qrobust.gate.diagnosis import Diagnoses
    from qrobust.gate.engine import Evaluator
    from qrobust.gate.plan import CaseSpec
    from qrobust.metrics.classification import KL_KEPT, kl_per_sample
    from qrobust.models import load_pair

    pair = load_pair("lenet5-digits-asym2")
    ev = Evaluator([pair], max_samples=200, batch_size=32, replicates=50)
    case = CaseSpec("lenet5-digits-asym2", "awgn", 0.2, {})
    ev.evaluate(case.pair, case.perturbation, case.level)
    before = ev.forward_passes["diagnosis"]
    found = Diagnoses(lambda: ev, lambda name: pair).layers(case)
    assert ev.forward_passes["diagnosis"] - before == 2
    x, ids = ev.case_inputs(case.pair, case.perturbation, case.level, KL_KEPT)
    with torch.inference_mode():
        fresh = kl_per_sample(pair.fp32(x), pair.quantized(x))
    assert found["samples"] == ids[fresh.argsort(descending=True, stable=True)[:16]].tolist()
