"""Data that is probably a mistake: one error line for a folder where a file belongs."""
import numpy as np
import pytest
from PIL import Image

from qrobust.errors import ConfigError
from qrobust.gate.config import load_thresholds

GATE = """
pairs:
  p:
    builder: "helpers:tiny_net"
    num_classes: {classes}
    preset: fake-w8a8
    preprocess: {{resolution: [16, 16], mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}
    dataset: val
    calibration: {{dataset: calib, samples: 4}}
datasets:
  val: {{folder: {val}, resolution: [16, 16]}}
  calib: {calib}
gate:
  p: {{}}
"""


def photos(folder, classes=("cat", "dog"), per_class=2, suffix=".png"):
    """``per_class`` small photos in one subfolder per class."""
    rng = np.random.default_rng(0)
    for name in classes:
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(folder / name / f"{i}{suffix}")


def gate_file(root, classes=2, val="data/val", calib="{folder: data/calib, resolution: [16, 16]}"):
    path = root / "thresholds.yaml"
    path.write_text(GATE.format(classes=classes, val=val, calib=calib))
    return path


@pytest.fixture
def data(tmp_path):
    photos(tmp_path / "data" / "val")
    photos(tmp_path / "data" / "calib")
    return tmp_path


ONNX_PAIR = """
pairs:
  p:
    fp32: {fp32}
    quantized: {quantized}
    num_classes: 2
    preprocess: {{resolution: [16, 16], mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}
    dataset: val
datasets:
  val: {{folder: data/val, resolution: [16, 16]}}
gate:
  p: {{}}
"""


@pytest.mark.parametrize("role", ["weights", "fp32", "quantized"])
def test_a_folder_where_a_model_file_belongs_is_one_error_line(data, role):
    (data / "models.onnx").mkdir()
    (data / "fp32.onnx").write_bytes(b"")
    (data / "int8.onnx").write_bytes(b"")
    path = gate_file(data)
    if role == "weights":
        path.write_text(path.read_text().replace('"helpers:tiny_net"', '"helpers:tiny_net"\n    weights: models.onnx/'))
    else:
        path.write_text(ONNX_PAIR.format(**{"fp32": "fp32.onnx", "quantized": "int8.onnx", role: "models.onnx/"}))
    with pytest.raises(ConfigError, match=rf"^{path}: pairs\.p\.{role}: '.*models\.onnx' is a directory, not a file") as info:
        load_thresholds(path)
    assert "\n" not in str(info.value)
    assert "does not exist" not in str(info.value)
