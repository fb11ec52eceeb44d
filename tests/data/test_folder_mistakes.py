"""Data that is probably a mistake: one warning line when the thresholds file is loaded (one class, splits
as classes, calibrating on the gated folder under another name, fewer class folders than the pair's
classes), one error line for a folder where a file belongs, and every image probed before any model."""
import io
import os
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from qrobust.data.folders import ImageReader, folder_dataset, probe
from qrobust.errors import ConfigError, InvalidArgument, QrobustWarning
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


def warned(path, match):
    """The one QrobustWarning loading ``path`` gives (it must match), as text."""
    with pytest.warns(QrobustWarning, match=match) as record:
        load_thresholds(path)
    messages = [str(w.message) for w in record if issubclass(w.category, QrobustWarning)]
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert messages[0].startswith(f"{path}: "), messages[0]
    return messages[0]


def quiet(path):
    """Loading ``path`` gives no QrobustWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", QrobustWarning)
        return load_thresholds(path)


@pytest.fixture
def data(tmp_path):
    photos(tmp_path / "data" / "val")
    photos(tmp_path / "data" / "calib")
    return tmp_path


def test_the_normal_case_loads_without_a_warning(data):
    assert quiet(gate_file(data)).pairs["p"]["dataset"] == "val"
    (data / "data" / "many").mkdir()
    photos(data / "data" / "many", classes=("bus", "car", "train"))  # one split-like name among classes is a class
    quiet(gate_file(data, classes=3, val="data/many"))


def test_a_one_class_dataset_warns(data):
    photos(data / "data" / "cat-only", classes=("cat",))
    warned(gate_file(data, classes=1, val="data/cat-only"),
           r"datasets\.val\.folder: has one class subfolder \('cat'\): every image gets label 0")
    warned(gate_file(data, calib="{builder: 'helpers:five_class_set', num_classes: 1}"),
           r"datasets\.calib\.num_classes: is 1: a one-class dataset gives every sample the same label")


@pytest.mark.parametrize("splits", [("train", "val"), ("Train", "VAL", "test"), ("validation",)])
def test_splits_as_class_folders_warn(data, splits):
    for split in splits:
        photos(data / "data" / "all" / split)  # data/all/<split>/<class>/: the splits become the classes
    shown = ", ".join(repr(s) for s in sorted(splits))
    message = warned(gate_file(data, classes=len(splits), val="data/all"),
                     rf"datasets\.val\.folder: class subfolders {shown} are named like splits: each subfolder is a "
                     r"class, so the splits become the classes; point folder: at one split \(e\.g\. 'data/all/")
    assert "one class subfolder" not in message


def test_calibrating_on_the_gated_folder_under_another_name_warns(data):
    warned(gate_file(data, calib="{folder: ./data/../data/val, resolution: [16, 16]}"),
           r"pairs\.p\.calibration: calibrates on dataset 'calib', which reads the same folder as the gated dataset "
           r"'val' \('.*data/val'\): the twin's ranges then fit the very samples it is judged on")
    os.symlink(data / "data" / "val", data / "data" / "linked")
    warned(gate_file(data, calib="{folder: data/linked, resolution: [16, 16], max_samples: 2}"),
           r"pairs\.p\.calibration: calibrates on dataset 'calib', which reads the same folder as the gated dataset 'val'")


@pytest.mark.parametrize("classes, missing", [(3, "class 2 never appears"), (5, "classes 2 to 4 never appear")])
def test_fewer_class_folders_than_the_pairs_classes_warn(data, classes, missing):
    warned(gate_file(data, classes=classes),
           rf"pairs\.p\.dataset: dataset 'val' has 2 class folders but the pair has num_classes: {classes} \({missing}\)")


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


def test_every_image_is_probed_before_any_batch_and_the_bad_ones_are_one_line(tmp_path):
    photos(tmp_path / "val", per_class=20, suffix=".jpg")
    whole = (tmp_path / "val" / "cat" / "0.jpg").read_bytes()
    (tmp_path / "val" / "cat" / "0.jpg").write_bytes(whole[: len(whole) // 2])  # a download cut off
    (tmp_path / "val" / "dog" / "3.png").write_text("<html>404</html>")  # a web page saved as an image
    with pytest.raises(InvalidArgument) as info:
        folder_dataset("val", tmp_path / "val", ImageReader((16, 16)))
    message = str(info.value)
    assert message == (f"dataset='val': 2 of 41 images in {str(tmp_path / 'val')!r} cannot be read: "
                       "'cat/0.jpg' (truncated), 'dog/3.png' (not an image)")
    for i in range(4, 8):
        (tmp_path / "val" / "dog" / f"{i}.jpg").write_bytes(b"")
    with pytest.raises(InvalidArgument, match=r"6 of 41 images .*'cat/0\.jpg' \(truncated\), 'dog/3\.png' \(not an "
                                              r"image\), 'dog/4\.jpg' \(not an image\), and 3 more$"):
        folder_dataset("val", tmp_path / "val", ImageReader((16, 16)))


def test_the_probe_reads_headers_and_ends_and_decodes_nothing_of_a_whole_file(tmp_path, monkeypatch):
    photos(tmp_path, per_class=3, suffix=".jpg")
    photos(tmp_path / "png", classes=("x",), per_class=3)
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, "JPEG")
    (tmp_path / "cat" / "motion.jpg").write_bytes(buffer.getvalue() + b"\0\0\0\x18ftypmp42 a phone's video")
    png = (tmp_path / "png" / "x" / "0.png").read_bytes()
    (tmp_path / "png" / "x" / "cut.png").write_bytes(png[:-30])
    assert probe(tmp_path / "cat" / "motion.jpg") is None  # bytes after EOI decode fine: not truncated
    assert probe(tmp_path / "png" / "x" / "cut.png") == "truncated"
    os.symlink(tmp_path / "moved.png", tmp_path / "cat" / "gone.png")
    assert probe(tmp_path / "cat" / "gone.png") == "a broken link"
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail(f"decoded {self.filename}"))
    for path in sorted(tmp_path.rglob("[0-9].*")):
        assert probe(path) is None, path
