"""Shipped calibration: built-in twins take the shipped activation ranges, and a file that is not the
twin's (another recipe, other quantizers, a scale or zero point off) is refused with one line."""
import json

import pytest
import torch

from qrobust.errors import InvalidArgument
from qrobust.models import load_pair
from qrobust.models.zoo import CALIBRATION, calibrated_here
from qrobust.quant.calibration import STALE_RELATIVE, activation_qparams, apply_shipped, calibration_document


@pytest.mark.parametrize("name", ["lenet5-digits-int8-x86", "lenet5-digits-w8a8", "lenet5-digits-asym3"])
def test_a_built_in_twin_runs_on_the_shipped_ranges(name):
    shipped = json.loads((CALIBRATION / f"{name}.json").read_text())
    pair = load_pair(name)
    assert {k: list(v) for k, v in activation_qparams(pair.quantized).items()} == shipped["qparams"]
    assert pair.metadata["calibration"]["shipped"] == f"{name}.json"
    assert pair.metadata["calibration"]["quantizers"] == len(shipped["qparams"])


def test_every_built_in_pair_ships_its_calibration():
    from qrobust.models import pair_names

    assert sorted(p.stem for p in CALIBRATION.glob("*.json")) == sorted(pair_names("builtin"))


@pytest.fixture
def fresh(tmp_path):
    twin, source = calibrated_here("lenet5-digits-int8-x86")
    return twin, source, tmp_path / "lenet5-digits-int8-x86.json"


def test_the_document_round_trips_the_exact_float32_scales(fresh):
    twin, source, path = fresh
    path.write_text(calibration_document(twin, source))
    before = activation_qparams(twin)
    assert apply_shipped(twin, path, source) == {"shipped": path.name, "quantizers": len(before), "differed_here": 0,
                                                 "largest_scale_difference_here": 0.0}
    assert activation_qparams(twin) == before
    assert all(torch.tensor(s, dtype=torch.float32).item() == s for s, _ in before.values())


def test_ranges_another_cpu_calibrates_differently_are_still_the_shipped_ones(fresh):
    """Host arithmetic moved a Lite0 histogram-observer scale by 3% and its zero point by 2 (ATen without
    SIMD): the shipped file still belongs to the twin, and the twin takes its ranges."""
    twin, source, path = fresh
    document = json.loads(calibration_document(twin, source))
    scale, zero = document["qparams"]["classifier.5.output"]
    document["qparams"]["classifier.5.output"] = [torch.tensor(scale * 1.03, dtype=torch.float32).item(), zero + 2]
    path.write_text(json.dumps(document))
    record = apply_shipped(twin, path, source)
    assert record["differed_here"] == 1 and record["largest_scale_difference_here"] == pytest.approx(0.03 / 1.03, rel=1e-2)
    assert list(activation_qparams(twin)["classifier.5.output"]) == document["qparams"]["classifier.5.output"]


def _other_weights(d):
    d["source"]["weights_fingerprint"] = "0" * 64


@pytest.mark.parametrize("change, message", [
    (lambda d: d["source"]["recipe"].update(name="int8-fbgemm"), 'source recipe: shipped {"activation": .*this twin\'s'),
    (_other_weights, 'source weights_fingerprint: shipped "0000'),
    (lambda d: d["source"]["data"].update(samples=128), 'source data: shipped {"dataset": "digits-train", "samples": 128}'),
    (lambda d: d.update(format=1), "not a format-2 calibration with a source"),
    (lambda d: d["qparams"].pop("classifier.5.output"), "6 quantizers shipped, the twin has 7 "
                                                        "\\(classifier.5.output is in only one\\)"),
    (lambda d: d["qparams"]["classifier.5.output"].__setitem__(0, d["qparams"]["classifier.5.output"][0]
                                                               * (1 + 2 * STALE_RELATIVE)),
     "classifier.5.output: shipped scale .* more than 25% apart"),
])
def test_a_file_that_is_not_the_twins_is_refused_naming_file_and_what_differs(fresh, change, message):
    twin, source, path = fresh
    document = json.loads(calibration_document(twin, source))
    change(document)
    path.write_text(json.dumps(document))
    with pytest.raises(InvalidArgument, match="lenet5-digits-int8-x86.json: " + message + ".*rerun tools/calibrate_builtins.py"):
        apply_shipped(twin, path, source)
