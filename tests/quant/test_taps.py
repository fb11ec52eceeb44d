"""Taps on a twin's quantized layers: what is clipped (against PyTorch's own quantize ops), the calibration
split as the reference (its own excess is 0), per-layer SQNR against numpy, and the engine's layer
metrics on a twin calibrated on one class (the gate-power fault they were built for)."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qrobust import get_preset, load_pair, quantize_model
from qrobust.metrics.internal import LayerEvidence, sqnr_db
from qrobust.quant.convert import FakeQuantLayer
from qrobust.quant.quantizer import QParams
from qrobust.quant.taps import ClipRule, Taps, calibration_batches, calibration_reference, clipped, tappable


@given(st.integers(0, 10_000), st.floats(0.001, 0.5), st.integers(0, 255), st.floats(0.1, 40))
def test_fake_quant_clipping_is_where_torch_fake_quantize_saturates(seed, scale, zero, spread):
    """Oracle: torch.fake_quantize_per_tensor_affine on the grid against a grid wide enough to hold every
    value: a value is clipped exactly where the two differ."""
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(seed)) * spread
    layer = FakeQuantLayer.__new__(FakeQuantLayer)
    torch.nn.Module.__init__(layer)
    scale = float(torch.tensor(scale, dtype=torch.float32))
    layer.act_qparams = QParams(torch.tensor(scale), torch.tensor(zero), 0, 255)
    ours = clipped(layer, (x,), None, None)
    on_grid = torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)
    unclipped = torch.fake_quantize_per_tensor_affine(x, scale, zero, -2**20, 2**20)
    expected = (on_grid != unclipped).float().mean(1)
    assert torch.equal(ours, expected)


def test_int8_clipping_counts_codes_at_or_beyond_the_calibrated_ends():
    x = torch.tensor([[0.0, 0.5, 1.0, 2.0, 9.0], [-3.0, -1.0, 0.0, 1.0, 1.0]])
    q = torch.quantize_per_tensor(x, 0.05, 60, torch.quint8)  # codes: clamp(round(x / 0.05) + 60, 0, 255)
    codes = torch.clamp(torch.round(x / 0.05) + 60, 0, 255)
    assert torch.equal(q.int_repr().float(), codes)
    assert torch.equal(clipped(torch.nn.Identity(), (x,), q, ClipRule(100, 40)),
                       ((codes >= 100) | (codes <= 40)).float().mean(1))
    # no rule known: the grid's ends, both here (the zero point is not the grid's bottom)
    assert torch.equal(clipped(torch.nn.Identity(), (x,), q, None), ((codes == 255) | (codes == 0)).float().mean(1))


@pytest.mark.parametrize("preset", ["int8-x86", "fake-w8a8"])
def test_a_twin_on_its_own_calibration_split_has_no_clip_excess(preset):
    """The reference is the rule's share on the calibration split: the same inputs give excess 0 exactly."""
    pair = load_pair("lenet5-digits-int8-x86")
    from qrobust.models.zoo import digits_calibration

    batches = digits_calibration()
    twin = quantize_model(pair.fp32, get_preset(preset), batches)
    assert calibration_batches(twin) == batches and tappable(twin)
    reference = calibration_reference(twin, batches)
    assert set(reference) and all(0 <= share < 0.01 for _, share in reference.values())
    evidence = LayerEvidence(replicates=20)
    rules = {layer: rule for layer, (rule, _) in reference.items()}
    for batch in batches:
        with Taps(twin, rules) as taps, torch.inference_mode():
            twin(batch)
        evidence.update_clip(taps.clips, {k: s for k, (_, s) in reference.items()}, True,
                             torch.ones(20, len(batch), dtype=torch.float64))
    assert evidence.results()["clip_excess"].value == pytest.approx(0.0, abs=1e-9)  # float sums of exact shares


def test_sqnr_matches_numpy_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, 4, generator=g)
    y = x + 0.01 * torch.randn(6, 3, 4, 4, generator=g)
    a, b = x.double().numpy().reshape(6, -1), y.double().numpy().reshape(6, -1)
    expected = 20 * np.log10(np.linalg.norm(a, axis=1) / np.linalg.norm(a - b, axis=1))
    assert np.allclose(sqnr_db(x, y).numpy(), expected, rtol=1e-12)
    assert torch.all(sqnr_db(x, x) == 120.0)  # identical: capped, never inf


def test_the_engine_sees_a_one_class_calibration_that_the_outputs_hide():
    """gate_power's one_class_calibration: its worst kl_mean sits inside the benign spread, but the classes
    calibration never saw overflow its last layer's range (measured: 0.049 of values beyond the range on
    clean digits against 0.0023 for a benign recalibration on another 256 digits)."""
    from qrobust.gate.engine import Evaluator
    from qrobust.gate.sensitivity import with_twin
    from qrobust.models.zoo import digits_calibration

    pair = load_pair("lenet5-digits-int8-x86")
    train = digits_calibration(count=1797)  # the training digits, normalized, in batches of 64
    images = torch.cat(train)
    from qrobust.data import load_dataset

    labels = load_dataset("digits-train").labels[:len(images)]
    results = {}
    for name, calibration in (("one class", [images[labels == 0][:128]]), ("other 256", [images[256:512]])):
        twin = quantize_model(pair.fp32, get_preset("int8-x86"), calibration)
        trial = with_twin(pair, twin)
        ev = Evaluator([trial], max_samples=200, replicates=200,
                       layer_cases={"clip_excess": {(pair.name, "clean", 0.0)}, "layer_sqnr_db": {(pair.name, "clean", 0.0)}})
        results[name] = ev.evaluate(pair.name, "awgn", 0).estimates
    bad, good = results["one class"]["clip_excess"], results["other 256"]["clip_excess"]
    assert bad.interval[0] > 5 * good.interval[1] and bad.details["reference"] == "calibration split"
    assert bad.details["layer"] and bad.details["layers"][0][0] == bad.details["layer"]
    assert results["other 256"]["layer_sqnr_db"].details["fp32_tensor"]
