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
    twin, config = calibrated_here("lenet5-digits-int8-x86")
    return twin, config, tmp_path / "lenet5-digits-int8-x86.json"


def test_the_document_round_trips_the_exact_float32_scales(fresh):
    twin, config, path = fresh
    path.write_text(calibration_document(twin, config.name))
    before = activation_qparams(twin)
    assert apply_shipped(twin, path, config.name) == {"shipped": path.name, "quantizers": len(before), "differed_here": 0}
    assert activation_qparams(twin) == before
    assert all(torch.tensor(s, dtype=torch.float32).item() == s for s, _ in before.values())


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(recipe="int8-fbgemm"), "shipped for recipe 'int8-fbgemm' with 7 quantizers, the twin is "
                                               "'int8-x86' with 7: rerun tools/calibrate_builtins.py"),
    (lambda d: d["qparams"].pop("classifier.5.output"), "with 6 quantizers, the twin is 'int8-x86' with 7"),
    (lambda d: d["qparams"]["classifier.5.output"].__setitem__(0, d["qparams"]["classifier.5.output"][0]
                                                               * (1 + 2 * STALE_RELATIVE)),
     "classifier.5.output: shipped scale"),
    (lambda d: d["qparams"]["graph.features_0_input_scale_0"].__setitem__(1, 70), "the file is stale"),
])
def test_a_file_that_is_not_the_twins_is_refused_naming_file_and_quantizer(fresh, change, message):
    twin, config, path = fresh
    document = json.loads(calibration_document(twin, config.name))
    change(document)
    path.write_text(json.dumps(document))
    with pytest.raises(InvalidArgument, match="lenet5-digits-int8-x86.json: .*" + message.replace("(", r"\(")):
        apply_shipped(twin, path, config.name)
