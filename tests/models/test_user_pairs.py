"""A user's own pairs: never a silent pass, one broken pair fails alone, CAM-less pairs skip CAM checks,
data read as a user's eval reads it, FP32 shared, refusals that name the fix."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from qrobust.data.folders import ImageReader, decode, folder_dataset
from qrobust.errors import ConfigError, InvalidArgument, QrobustWarning
from qrobust.gate.config import load_thresholds
from test_declared import BUILDER, DECLARED, EXPLANATIONS, make_folder

SUITE = """
def test_top1_delta(qrobust_case, qrobust_check):
    qrobust_check(qrobust_case, "top1_delta")

def test_cam_sim(qrobust_case, qrobust_check):
    qrobust_check(qrobust_case, "cam_sim")
"""


@pytest.fixture
def user(pytester):
    make_folder(pytester.path)
    pytester.makepyfile(usermodels=BUILDER)
    pytester.syspathinsert()
    import importlib
    import sys
    sys.modules.pop("usermodels", None)
    torch.save(importlib.import_module("usermodels").build().state_dict(), pytester.path / "weights.pt")
    return pytester


README_SHAPED = """
pairs:
  user-int8:
    builder: "usermodels:build"
    weights: weights.pt
    num_classes: 2
    preset: int8-x86
    preprocess: {resolution: [32, 32], mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}
    dataset: photos
    calibration: {dataset: photos, samples: 8}
datasets:
  photos: {folder: images, resolution: [32, 32]}
gate:
  user-int8: {}
"""


def test_a_readme_shaped_file_gets_the_default_sweep_and_tolerances(user, recwarn):
    user.makefile(".yaml", thresholds=README_SHAPED)
    t = load_thresholds(user.path / "thresholds.yaml")
    assert list(t.sweep) == ["awgn", "brownian", "occlusion_vertical", "occlusion_horizontal"]
    assert t.defaults == {"top1_delta": 0.01, "top5_delta": 0.01, "f1_delta": 0.01, "agreement": 0.98,
                          "kl_mean": 0.02, "kl_p95": 0.05, "quantizer_violations": 0.0}
    user.makepyfile(test_gate=SUITE)
    result = user.runpytest("-p", "no:cacheprovider", "-rs", "--qrobust-max-samples", "6")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) == 27  # top1_delta on 7 + 6 + 7 + 7 cases
    assert outcomes["skipped"] == 27  # cam_sim: no default tolerance, and no CAM layer
    assert "checks:" in result.stdout.str()


@pytest.mark.parametrize("text, message", [
    ("", "the file is empty"),
    ("gate: {}\n", "gate: no pair is gated"),
    ("perturbations: {awgn: {levels: [0, 0.1]}}\n", "gate: no pair is gated"),
    ("perturbations: {awgn: {levels: [0, 0.1]}}\ngate: {lenet5-digits-int8-x86: {metrics: [cam_speedup]}}\n",
     "not a per-case metric: 'cam_speedup'"),
    ("defaults: {cam_sim: 0.8}\ngate: {lenet5-digits-int8-x86: {metrics: [kl_mean]}}\n",
     "gate.lenet5-digits-int8-x86: no tolerance applies to its cases"),
])
def test_a_file_that_gates_nothing_is_a_usage_error(pytester, text, message):
    pytester.makefile(".yaml", thresholds=text)
    pytester.makepyfile(test_gate=SUITE)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR and message in result.stderr.str(), result.stderr.str()


def test_one_broken_pair_fails_its_own_checks_once_per_test_with_one_line(user):
    text = DECLARED.replace(EXPLANATIONS, "")  # the suite below judges case checks only
    text = text.replace("num_classes: 2\n    preset: fake-w8a8", "num_classes: 5\n    preset: fake-w8a8")
    user.makefile(".yaml", thresholds=text)
    user.makepyfile(test_gate="""
        def test_agreement(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "agreement")
    """)
    result = user.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, failed=4)  # user-int8 passes; user-fake's head has 5 outputs, not 2
    out = result.stdout.str()
    assert out.count("pair user-fake cannot be gated: ") >= 4 and "Traceback" not in out
    assert "During handling" not in out  # the one line, not again as the context of pytest.fail
    result.stdout.fnmatch_lines(["*could not be gated: pair user-fake cannot be gated: *returned shape (*, 2)*"])
    errors = [c for c in json.loads((user.path / "qrobust-report" / "report.json").read_text())["cases"]
              if c["verdict"] == "error"]
    assert len(errors) == 4 and {c["pair"] for c in errors} == {"user-fake"}


def test_unreadable_images_fail_the_pair_before_it_is_built_with_one_line_per_test(user):
    whole = (user.path / "images" / "bright" / "img0.png").read_bytes()
    (user.path / "images" / "bright" / "img0.png").write_bytes(whole[:200])
    (user.path / "images" / "dark" / "notes.jpg").write_text("not a photo")
    user.makepyfile(marked="""
        import pathlib
        from usermodels import build as build_model

        def build():
            pathlib.Path("built").touch()
            return build_model()
    """)
    text = README_SHAPED.replace("usermodels:build", "marked:build")
    user.makefile(".yaml", thresholds=text.replace("gate:\n", "perturbations: {awgn: {levels: [0, 0.1]}}\ngate:\n"))
    user.makepyfile(test_gate="""
        def test_top1_delta(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "top1_delta")
    """)
    result = user.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    line = (f"pair user-int8 cannot be gated: dataset='photos': 2 of 13 images in {str(user.path / 'images')!r} cannot "
            "be read: 'bright/img0.png' (truncated), 'dark/notes.jpg' (not an image)")
    lines = out.splitlines()  # pytest's short summary repeats it too, untruncated where CI is set
    assert lines.count(line) == 2 and lines.count(f"could not be gated: {line}") == 1, out
    assert "During handling" not in out and not (user.path / "built").exists()


def test_a_pair_without_a_cam_layer_is_not_judged_on_file_wide_cam_tolerances_and_says_so(user):
    text = DECLARED.replace(EXPLANATIONS, "").replace('    target_layer: "3"\n    quantized_target_layer: "2"\n', "")
    user.makefile(".yaml", thresholds=text.replace("  user-fake: {}\n", ""))
    user.makepyfile(test_gate="""
        def test_agreement(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "agreement")

        def test_cam_sim(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "cam_sim")
    """)
    result = user.runpytest("-p", "no:cacheprovider", "-rs", "test_gate.py")
    result.assert_outcomes(passed=4, skipped=4)  # the defaults' cam_sim does not apply to it: no tolerance
    result.stdout.fnmatch_lines(["*not judged: cam_sim on user-int8: it has no CAM target layer (set target_layer*"])
    report = json.loads((user.path / "qrobust-report" / "report.json").read_text())
    assert [(n["pair"], n["metric"]) for n in report["not_applicable"]] == [("user-int8", "cam_sim")]
    # set for the pair itself, the same tolerance is a usage error naming the metric and why
    user.makefile(".yaml", thresholds=text.replace("  user-fake: {}\n", "").replace(
        "  user-int8: {}\n", "  user-int8: {tolerances: {cam_cc: 0.5}}\n"))
    result = user.runpytest("-p", "no:cacheprovider", "test_gate.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "gate.user-int8: cam_cc cannot be judged: it has no CAM target layer" in result.stderr.str()


def test_pairs_on_the_same_weights_share_one_fp32_model(user):
    user.makefile(".yaml", thresholds=DECLARED.replace(EXPLANATIONS, ""))
    user.makepyfile(test_gate="""
        def test_agreement(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "agreement")
    """)
    user.runpytest("-p", "no:cacheprovider", "test_gate.py").assert_outcomes(passed=8)
    forwards = json.loads((user.path / "qrobust-report" / "report.json").read_text())["forward_passes"]
    fp32 = [k for k in forwards["forwards_per_perturbed_batch"] if k.startswith("fp32[")]
    assert len(fp32) == 1 and forwards["forwards_per_perturbed_batch"][fp32[0]] == 1.0


def test_calibrating_on_the_gated_split_warns_with_one_line(user):
    user.makefile(".yaml", thresholds=README_SHAPED.replace("{dataset: photos, samples: 8}",
                                                            "{dataset: photos, samples: 8}"))
    with pytest.warns(QrobustWarning, match="calibration: calibrates on the gated dataset 'photos'"):
        load_thresholds(user.path / "thresholds.yaml")


def test_any_torchvision_classification_architecture_by_name(user):
    text = README_SHAPED.replace('builder: "usermodels:build"\n    weights: weights.pt', "arch: resnet34\n    weights: random")
    user.makefile(".yaml", thresholds=text)
    assert load_thresholds(user.path / "thresholds.yaml").pairs["user-int8"]["arch"] == "resnet34"
    user.makefile(".yaml", thresholds=text.replace("resnet34", "rsnet34"))
    with pytest.raises(ConfigError, match="unknown architecture 'rsnet34'; did you mean 'resnet34'"):
        load_thresholds(user.path / "thresholds.yaml")


def test_a_tuple_builder_with_weights_is_refused_with_the_reason(user):
    user.makepyfile(tuplemodels="""
        from usermodels import build as fp32_build
        from qrobust import get_preset, quantize_model
        import torch

        def build():
            fp32 = fp32_build()
            return fp32, quantize_model(fp32, get_preset("fake-w8a8"), [torch.rand(2, 3, 32, 32)])
    """)
    text = README_SHAPED.replace("usermodels:build", "tuplemodels:build")
    user.makefile(".yaml", thresholds=text)
    user.makepyfile(test_gate=SUITE)
    result = user.runpytest("-p", "no:cacheprovider", "--qrobust-max-samples", "4")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*pair user-int8 cannot be gated: pairs.user-int8.weights=*the builder returned an "
                                 "(fp32, twin) tuple*"])


def test_images_read_like_torchvisions_eval_transform(tmp_path):
    """Resize the short side to 256, centre-crop 224: the same pixels as torchvision's own transform."""
    from torchvision.transforms import v2

    rng = np.random.default_rng(0)
    path = tmp_path / "wide.png"
    Image.fromarray((rng.random((300, 400, 3)) * 255).astype(np.uint8)).save(path)
    ours, size = ImageReader((224, 224)).read(path)
    reference = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Resize(256, antialias=True),
                            v2.CenterCrop(224)])(Image.open(path))
    assert size == (400, 300) and ours.shape == reference.shape == (3, 224, 224)
    assert (ours - reference).abs().max() < 0.02  # both antialiased bilinear; rounding of edges differs
    squashed, _ = ImageReader((224, 224), resize="stretch").read(path)
    assert squashed.shape == (3, 224, 224) and not torch.allclose(squashed, ours, atol=0.05)


def test_greyscale_folders_and_16_bit_images_keep_their_values(tmp_path):
    (tmp_path / "a").mkdir()
    deep = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "a" / "deep.png")
    pixels = decode(tmp_path / "a" / "deep.png", channels=1)
    assert pixels.shape == (1, 64, 64) and abs(float(pixels.mean()) - 0.5) < 0.01  # not 99.7% white
    assert decode(tmp_path / "a" / "deep.png", channels=3).shape == (3, 64, 64)
    data = folder_dataset("grey", tmp_path, ImageReader((32, 32), channels=1))
    assert next(data.batches(1)).images.shape == (1, 1, 32, 32)


def test_boxes_are_checked_against_each_image_and_mapped_into_the_crop(tmp_path):
    reader = ImageReader((224, 224))
    # 400x300 -> short side 256: 341x256, crop offsets (58, 16)
    assert reader.box([100, 50, 300, 250], 400, 300, "b") == [
        round(100 * 256 / 300) - 58, round(50 * 256 / 300) - 16, round(300 * 256 / 300) - 58, round(250 * 256 / 300) - 16]
    for bad in ([-5, 0, 10, 10], [0, 0, 500, 10], [20, 20, 10, 30], [5, 5, 5, 9]):
        with pytest.raises(InvalidArgument, match=r"boxes='b': box .* is not inside the 400x300 image"):
            reader.box(bad, 400, 300, "b")
    with pytest.raises(InvalidArgument, match="falls outside the 224x224 centre crop"):
        reader.box([0, 0, 30, 300], 400, 300, "b")


def test_warnings_stay_one_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("qrobust: one line", QrobustWarning, stacklevel=1)
    assert "\n" not in str(caught[0].message)


def test_a_failing_case_lists_the_folder_images_whose_prediction_changed(user):
    text = README_SHAPED.replace("preset: int8-x86", "preset: fake-asym1").replace(
        "gate:\n", "defaults: {agreement: 1.0}\nperturbations: {awgn: {levels: [0]}}\ngate:\n")
    user.makefile(".yaml", thresholds=text)
    user.makepyfile(test_gate="""
        def test_agreement(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "agreement")
    """)
    user.runpytest("-p", "no:cacheprovider").assert_outcomes(failed=1)
    (case,) = json.loads((user.path / "qrobust-report" / "report.json").read_text())["cases"]
    flipped = case["details"]["flipped"]
    assert flipped and len(flipped) == case["details"]["flips"] <= 20
    assert all(f["sample"].split("/")[0] in ("bright", "dark") and f["sample"].endswith(".png") for f in flipped)
    assert all(len(f["fp32"]) == len(f["quantized"]) == 2 for f in flipped)  # top-3 of a 2-class model: 2
    assert "Samples whose prediction changed" in (user.path / "qrobust-report" / "report.html").read_text()
