"""Pairs and datasets declared in YAML, torchvision architectures, and safe loading of checkpoints."""
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qrobust.explain.cam import compute_cams
from qrobust.quant import twin_layer_name
from qrobust.errors import InvalidArgument
from qrobust.models.checkpoints import load_checkpoint
from qrobust.quant import get_preset, quantize_model, quantized_module_names
from qrobust.models.archs import TORCHVISION_ARCHS, build_arch


class Payload:
    """A pickle whose loading would run a command creating a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ExecPayload:
    """The same, through ``builtins.exec`` of Python source."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def malicious_files(tmp_path):
    """Ten files that run code (or would construct arbitrary objects) when unpickled or loaded."""
    marker = tmp_path / "pwned"
    files = {}

    def pickled(name, obj, protocol=pickle.DEFAULT_PROTOCOL):
        files[name] = tmp_path / name
        files[name].write_bytes(pickle.dumps(obj, protocol=protocol))

    def saved(name, obj, **kw):
        files[name] = tmp_path / name
        torch.save(obj, files[name], **kw)

    pickled("reduce.pt", Payload(marker))                                    # raw pickle, os.system
    pickled("reduce-protocol0.pkl", Payload(marker), protocol=0)             # text protocol
    pickled("exec.pth", ExecPayload(marker))                                 # builtins.exec of source
    saved("zip-payload.pt", Payload(marker))                                 # torch.save zip archive
    saved("nested.pt", {"state_dict": {"w": torch.zeros(1)}, "extra": Payload(marker)})  # beside real weights
    saved("value.pt", {"w": Payload(marker)})                                # posing as a tensor
    saved("legacy.pt", {"w": torch.zeros(1), "x": ExecPayload(marker)}, _use_new_zipfile_serialization=False)
    saved("module.pt", torch.nn.Linear(2, 2))                                # whole-module pickle
    files["script.pt"] = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), files["script.pt"])  # TorchScript
    files["fake.safetensors"] = tmp_path / "fake.safetensors"                # a pickle in disguise
    files["fake.safetensors"].write_bytes(pickle.dumps(Payload(marker)))
    return marker, list(files.values())


def test_malicious_checkpoints_are_refused_without_running_anything(tmp_path):
    from qrobust.models.efficientnet_lite import efficientnet_lite0

    marker, files = malicious_files(tmp_path)
    assert len(files) >= 8
    for path in files:
        with pytest.raises(InvalidArgument, match=rf"checkpoint.*{path.name}"):
            load_checkpoint(path)
        with pytest.raises(InvalidArgument):
            build_arch("resnet18", 10, str(path))
        with pytest.raises(InvalidArgument):
            efficientnet_lite0(path)
        try:
            load_checkpoint(path)
        except InvalidArgument as exc:
            assert "\n" not in str(exc)
            if path.suffix != ".safetensors":
                assert re.search(rf"{path} \(\d+ bytes, sha256 [0-9a-f]{{16}}\.\.\.\)", str(exc)), str(exc)
    assert not marker.exists()


def test_trusted_torchscript_and_module_load_with_a_warning(tmp_path):
    _, files = malicious_files(tmp_path)
    for path in (p for p in files if p.name in ("module.pt", "script.pt")):
        with pytest.warns(UserWarning, match="trusted"):
            assert isinstance(load_checkpoint(path, trust=True), torch.nn.Module)


@pytest.mark.parametrize("cut", [0, 10, 100, 0.5, 0.9])
def test_truncated_checkpoints_give_one_line_errors(tmp_path, cut):
    good = tmp_path / "good.pt"
    torch.save(torch.nn.Linear(20, 20).state_dict(), good)
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: int(cut * len(data)) if isinstance(cut, float) else cut])
    with pytest.raises(InvalidArgument) as info:
        load_checkpoint(bad)
    assert "\n" not in str(info.value) and f"checkpoint {bad} (" in str(info.value)


def test_random_bytes_give_one_line_errors(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(20):
        path = tmp_path / f"noise{i}.pt"
        path.write_bytes(rng.bytes(int(rng.integers(1, 5000))))
        with pytest.raises(InvalidArgument) as info:
            load_checkpoint(path)
        assert "\n" not in str(info.value)


def test_state_dict_wrappers_and_missing_files(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"weight": torch.ones(2)}}, path)
    assert list(load_checkpoint(path)) == ["weight"]
    with pytest.raises(InvalidArgument, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(TORCHVISION_ARCHS))
def test_every_seed_architecture_builds_quantizes_and_explains(arch):
    model = build_arch(arch, num_classes=70, weights="random")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fake = quantize_model(model, get_preset("fake-w8a8"), [x])
    int8 = quantize_model(model, get_preset("int8-x86"), [x])
    assert model(x).shape == fake(x).shape == int8(x).shape == (2, 70)
    assert quantized_module_names(int8)
    layer = TORCHVISION_ARCHS[arch]
    for m in (model, fake):
        maps, _ = compute_cams(m, x, layer, ["gradcampp"]).maps["gradcampp"]
        assert maps.shape == (2, 64, 64)
    # the int8 graph is flattened and fused: the default layer resolves to its counterpart there
    int8_layer = twin_layer_name(model, int8, layer)
    order = [n for n, _ in model.named_modules()]
    last_inside = max(i for i, n in enumerate(order) if n == layer or n.startswith(layer + "."))
    assert int8_layer in order and order.index(int8_layer) <= last_inside
    fp_maps, _ = compute_cams(model, x, layer, ["eigencam"]).maps["eigencam"]
    q_maps, _ = compute_cams(int8, x, int8_layer, ["eigencam"]).maps["eigencam"]
    assert q_maps.shape == fp_maps.shape == (2, 64, 64) and torch.isfinite(q_maps).all()


def test_architecture_without_weights_is_an_error_and_hub_never_downloads(monkeypatch, tmp_path):
    with pytest.raises(InvalidArgument, match="needs weights"):
        build_arch("resnet18")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(InvalidArgument, match="not in the torch hub cache and qrobust never downloads"):
        build_arch("resnet18", weights="hub")
    with pytest.raises(InvalidArgument, match="arch='resnet19'"):
        build_arch("resnet19", weights="random")


def make_folder(root, n_per_class=6, size=40):
    """Two classes of synthetic photos (bright square vs dark square), boxes around the squares."""
    rng = np.random.default_rng(0)
    boxes = {}
    for label in ("bright", "dark"):
        (root / "images" / label).mkdir(parents=True)
        for i in range(n_per_class):
            img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
            x0, y0 = int(rng.integers(2, 15)), int(rng.integers(2, 15))
            img[y0:y0 + 20, x0:x0 + 20] = 230 if label == "bright" else 10
            name = f"{label}/img{i}.png"
            Image.fromarray(img).save(root / "images" / name)
            boxes[name] = [x0, y0, x0 + 20, y0 + 20]
            (root / "saliency" / label).mkdir(parents=True, exist_ok=True)
            salient = np.zeros((size, size), dtype=np.uint8)
            salient[y0:y0 + 20, x0:x0 + 20] = 255
            Image.fromarray(salient).save(root / "saliency" / name)
    (root / "boxes.json").write_text(json.dumps(boxes))


BUILDER = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
'''

EXPLANATIONS = """explanations:
  pairs: [user-int8]
  samples: 6
  steps: 10
  tolerances: {deletion_auc_delta: 0.9, wsol_iou_delta: 0.9}
"""
DECLARED = """
decision: point
replicates: 100
defaults: {agreement: 0.5, cam_sim: 0.5}
perturbations:
  awgn: {levels: [0, 0.1]}
  occlusion_vertical: {levels: [0, 2]}
gate:
  user-int8: {}
  user-fake: {}
""" + EXPLANATIONS + """pairs:
  user-int8:
    builder: "usermodels:build"
    weights: weights.pt
    num_classes: 2
    preset: int8-x86
    preprocess: {resolution: [32, 32], mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}
    dataset: photos
    calibration: {dataset: photos, samples: 8}
    target_layer: "3"
    quantized_target_layer: "2"
  user-fake:
    builder: "usermodels:build"
    weights: weights.pt
    num_classes: 2
    preset: fake-w8a8
    preprocess: {resolution: [32, 32], mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}
    dataset: photos
    calibration: {dataset: photos, samples: 8}
    target_layer: "3"
datasets:
  photos: {folder: images, resolution: [32, 32], boxes: boxes.json}
"""


def test_declared_pair_from_builder_and_checkpoint_with_an_image_folder_runs_end_to_end(pytester):
    make_folder(pytester.path)
    pytester.makepyfile(usermodels=BUILDER)
    pytester.syspathinsert()
    import importlib
    import sys
    sys.modules.pop("usermodels", None)
    torch.save(importlib.import_module("usermodels").build().state_dict(), pytester.path / "weights.pt")
    pytester.makefile(".yaml", thresholds=DECLARED)
    pytester.makepyfile(test_user="""
        def test_agreement(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "agreement")

        def test_cam_sim(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "cam_sim")

        def test_explanations(qrobust_explanation_pair, qrobust_check):
            qrobust_check.explanations(qrobust_explanation_pair)
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=17)  # 2 metrics x 2 pairs x 4 cases, and one explanation check
    report = json.loads((pytester.path / "qrobust-report" / "report.json").read_text())
    assert {c["pair"] for c in report["cases"]} == {"user-int8", "user-fake"}
    assert "wsol_iou_delta" in {c["metric"] for c in report["cases"]}
    assert all(report["environment"]["weights"][p] for p in ("user-int8", "user-fake"))
    weights = report["environment"]["pairs"]["user-int8"]["weights"]
    assert [Path(p).name for p in weights] == ["weights.pt"] and all(len(v) == 64 for v in weights.values())


def test_dataset_max_samples_is_a_seeded_subsample(tmp_path):
    from qrobust.data.folders import build_dataset

    make_folder(tmp_path)
    spec = {"folder": "images", "resolution": [32, 32], "max_samples": 5}
    a, b = build_dataset("photos", spec, tmp_path), build_dataset("photos", spec, tmp_path)
    assert len(a) == 5 and torch.equal(a.indices, b.indices)
    assert not torch.equal(a.indices, build_dataset("photos", spec, tmp_path, seed=1).indices)
    assert len(build_dataset("photos", {**spec, "max_samples": None}, tmp_path)) == 12


def test_folder_streams_identically_with_decoding_workers(tmp_path):
    from qrobust.data.folders import build_dataset

    make_folder(tmp_path)
    spec = {"folder": "images", "resolution": [32, 32], "boxes": "boxes.json"}
    serial, threaded = build_dataset("photos", {**spec, "workers": 0}, tmp_path), build_dataset("photos", {**spec, "workers": 3}, tmp_path)
    assert threaded.workers == 3 and threaded.subset(7, 0).workers == 3
    pairs = list(zip(serial.batches(5), threaded.batches(5), strict=True))
    assert len(pairs) == 3
    for a, b in pairs:
        assert torch.equal(a.images, b.images) and torch.equal(a.ids, b.ids) and torch.equal(a.boxes, b.boxes)
    with pytest.raises(InvalidArgument, match="workers=-1"):
        build_dataset("photos", {**spec, "workers": -1}, tmp_path)


MALICIOUS_NAMES = ["reduce.pt", "reduce-protocol0.pkl", "exec.pth", "zip-payload.pt", "nested.pt", "value.pt",
                   "legacy.pt", "module.pt", "script.pt", "fake.safetensors"]


@pytest.mark.parametrize("name", MALICIOUS_NAMES)
def test_declared_pair_with_a_malicious_checkpoint_is_refused(pytester, name):
    make_folder(pytester.path)
    pytester.makepyfile(usermodels=BUILDER)
    pytester.syspathinsert()
    marker, files = malicious_files(pytester.path)
    assert [f.name for f in files] == MALICIOUS_NAMES
    text = DECLARED.replace(EXPLANATIONS, "")  # the suite below judges case checks only
    pytester.makefile(".yaml", thresholds=text.replace("weights: weights.pt", f"weights: {name}"))
    pytester.makepyfile(test_user="""
        def test_agreement(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "agreement")
    """)
    result = pytester.runpytest()
    assert result.ret != 0 and f"checkpoint {pytester.path / name}" in result.stdout.str() + result.stderr.str()
    assert not marker.exists()


def test_ground_truth_saliency_maps_are_compared_with_both_cams(pytester):
    make_folder(pytester.path)
    pytester.makepyfile(usermodels=BUILDER)
    pytester.syspathinsert()
    torch.save(__import__("usermodels").build().state_dict(), pytester.path / "weights.pt")
    text = DECLARED.replace(EXPLANATIONS, "").replace("defaults: {agreement: 0.5, cam_sim: 0.5}",
                                                      "defaults: {cam_sim_gt_delta: 0.5, cam_kld_gt_delta: 5.0}")
    text = text.replace("boxes: boxes.json}", "boxes: boxes.json, saliency: saliency}")
    pytester.makefile(".yaml", thresholds=text)
    pytester.makepyfile(test_gt="""
        def test_gt(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, ["cam_sim_gt_delta", "cam_kld_gt_delta"])
    """)
    pytester.runpytest("test_gt.py").assert_outcomes(passed=8)
    cases = json.loads((pytester.path / "qrobust-report" / "report.json").read_text())["cases"]
    sim = [c for c in cases if c["metric"] == "cam_sim_gt_delta"]
    assert len(sim) == 8 and all(0 < c["details"]["fp32_vs_gt"] <= 1 for c in sim)
    assert all(abs(c["value"] - (c["details"]["fp32_vs_gt"] - c["details"]["quantized_vs_gt"])) < 1e-9 for c in sim)


@pytest.mark.parametrize("edit,message", [
    (("weights: weights.pt", "weights: missing.pt", 1), "pairs.user-int8.weights: "),
    (("weights: weights.pt", "weights: images/", 1), "images' is a directory, not a file (name the file itself)"),
    (("builder: \"usermodels:build\"", "builder: usermodels.build", 1), "pairs.user-int8.builder: expected 'module:function'"),
    (("preset: int8-x86", "preset: int9", 1), "pairs.user-int8.preset: unknown preset 'int9'"),
    (("dataset: photos\n    calibration", "dataset: fotos\n    calibration", 1), "pairs.user-int8.dataset: unknown dataset 'fotos'"),
    (("    calibration: {dataset: photos, samples: 8}\n    target_layer: \"3\"\n    quantized", "    target_layer: \"3\"\n    quantized", 1), "pairs.user-int8.calibration: post-training quantization needs calibration data"),
    (("folder: images", "folder: nowhere", 1), "datasets.photos.folder: "),
    (("boxes: boxes.json}", "boxes: boxes.json, saliency: nowhere}", 1), "datasets.photos.saliency: "),
    (("boxes: boxes.json}", "boxes: boxes.json, max_samples: 0}", 1), "datasets.photos.max_samples: must be >= 1"),
    (("boxes: boxes.json}", "boxes: boxes.json, workers: two}", 1), "datasets.photos.workers: expected a number"),
    (("std: [0.25, 0.25, 0.25]", "std: [0.25, 0, 0.25]", 1), "pairs.user-int8.preprocess.std[1]: must be >="),
    (("resolution: [32, 32], boxes", "resolution: [32], boxes", 1), "datasets.photos.resolution: expected [height, width]"),
    (("builder: \"usermodels:build\"", "builder: \"usermodels:biuld\"", 1), "pairs.user-int8.builder: cannot import (AttributeError"),
    (("builder: \"usermodels:build\"", "builder: \"nomodule:build\"", 1), "pairs.user-int8.builder: cannot import (ModuleNotFoundError"),
    (("resolution: [32, 32], boxes", "resolution: [40, 40], boxes", 1), "pairs.user-int8.dataset: dataset 'photos' has resolution [40, 40] but the pair's preprocess expects [32, 32]"),
    (("boxes: boxes.json}", "boxes: boxes.json, channels: 1}", 1), "pairs.user-int8.dataset: dataset 'photos' gives 1-channel images but the pair's preprocess has 3 channel(s)"),
    (("boxes: boxes.json}", "boxes: boxes.json, channels: 2}", 1), "datasets.photos.channels: expected 1 (greyscale) or 3 (RGB), got 2"),
    (("boxes: boxes.json}", "boxes: boxes.json, resize: 16}", 1), "datasets.photos.resize: must be >= 32"),
    (("    num_classes: 2\n    preset: int8-x86", "    num_classes: 1\n    preset: int8-x86", 1), "pairs.user-int8.dataset: dataset 'photos' has 2 classes but the pair has num_classes: 1"),
])
def test_declared_sections_are_validated(pytester, edit, message):
    make_folder(pytester.path)
    pytester.makepyfile(usermodels=BUILDER)
    pytester.syspathinsert()
    (pytester.path / "weights.pt").write_bytes(b"")
    old, new, count = edit
    pytester.makefile(".yaml", thresholds=DECLARED.replace(old, new, count))
    pytester.makepyfile(test_user="def test_nothing(): pass")
    result = pytester.runpytest("--qrobust-thresholds", "thresholds.yaml")  # asked for: validated at start
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str(), result.stderr.str()
