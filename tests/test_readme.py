"""Every code block of the README runs as written (a changed example fails here)."""
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import readme_blocks as blocks


def user_files(root: Path, classes=("cat", "dog", "fox"), per_class=4) -> None:
    """What a user has: a trained-looking checkpoint and photos of various sizes in class folders."""
    import torchvision

    rng = np.random.default_rng(0)
    for split, count in (("val", per_class), ("calib", 3)):
        for k, name in enumerate(classes):
            (root / "data" / split / name).mkdir(parents=True)
            for i in range(count):
                h, w = int(rng.integers(230, 330)), int(rng.integers(230, 330))
                image = (rng.random((h, w, 3)) * 80 + 60 * k).clip(0, 255).astype(np.uint8)
                Image.fromarray(image).save(root / "data" / split / name / f"{i}.png")
    torch.manual_seed(0)
    (root / "weights").mkdir()
    torch.save(torchvision.models.resnet18(num_classes=len(classes)).state_dict(), root / "weights" / "resnet18.pt")


def test_the_readme_has_the_examples_this_file_runs():
    assert len(blocks("yaml")) == 6 and len(blocks("python")) == 3 and len(blocks("sh")) >= 4


@pytest.mark.slow
def test_the_own_model_example_gates_a_checkpoint_and_a_folder(tmp_path):
    """The YAML example verbatim, with the files it names, run with the command the README gives."""
    import subprocess

    gate_file = blocks("yaml")[0]
    user_files(tmp_path)
    (tmp_path / "my-gate.yaml").write_text(gate_file)
    command = next(line.split("#")[0].split() for block in blocks("sh") for line in block.splitlines()
                   if line.startswith("qrobust run my-gate.yaml"))
    result = subprocess.run([sys.executable, "-m", "qrobust", *command[1:], "-q", "-p", "no:randomly"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode in (0, 1), out  # a verdict (pass or fail), not a usage error or a crash
    assert "checks:" in out and "building pair my-resnet-int8" in out and "Traceback" not in out
    report = __import__("json").loads((tmp_path / "qrobust-report" / "report.json").read_text())
    assert {c["perturbation"] for c in report["cases"]} == {"awgn", "brownian", "occlusion_vertical",
                                                            "occlusion_horizontal", "clean"}  # clean: quantizer
    assert {c["metric"] for c in report["cases"]} >= {"top1_delta", "agreement", "kl_mean"}
    pair = report["environment"]["pairs"]["my-resnet-int8"]
    assert pair["cam"]["quantized_layer"] == "avgpool:input" and pair["samples"] == 12
    assert pair["calibration"] == {"dataset": "my-calib", "samples": 9}
    propose = next(line.split("#")[0].split() for block in blocks("sh") for line in block.splitlines()
                   if line.startswith("qrobust propose my-gate.yaml --from"))
    result = subprocess.run([sys.executable, "-m", "qrobust", *propose[1:]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    from qrobust.gate.config import load_thresholds

    fitted = load_thresholds(tmp_path / "fitted.yaml")  # the printed file is a valid gate of the same pair
    assert "my-resnet-int8" in fitted.gate and "# fitted by `qrobust propose`" in (tmp_path / "fitted.yaml").read_text()


@pytest.mark.slow
def test_the_onnx_example_gates_the_shipped_files(tmp_path):
    """The ONNX Runtime example verbatim, with ONNX files made the way a user makes them (exported,
    quantized by onnxruntime), run with the README's command."""
    import subprocess

    import torchvision

    from qrobust import get_preset, quantize_model
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    user_files(tmp_path)
    torch.manual_seed(0)
    twin = quantize_model(torchvision.models.resnet18(num_classes=3), get_preset("ort-int8"), [torch.randn(4, 3, 224, 224)])
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model_fp32.onnx").write_bytes(twin.fp32_reference.proto.SerializeToString())
    (tmp_path / "models" / "model_int8.onnx").write_bytes(twin.proto.SerializeToString())
    (tmp_path / "onnx-gate.yaml").write_text(blocks("yaml")[1])
    command = next(line.split("#")[0].split() for block in blocks("sh") for line in block.splitlines()
                   if line.startswith("qrobust run onnx-gate.yaml"))
    result = subprocess.run([sys.executable, "-m", "qrobust", *command[1:], "-q", "-p", "no:randomly"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode in (0, 1) and "checks:" in out and "Traceback" not in out, out
    report = __import__("json").loads((tmp_path / "qrobust-report" / "report.json").read_text())
    pairs = report["environment"]["pairs"]
    assert pairs["shipped-int8"]["cam"]["quantized_layer"].endswith("_DequantizeLinear_Output")
    assert pairs["shipped-int8"]["runtimes"]["quantized"] == "onnxruntime CPUExecutionProvider"
    assert {c["pair"] for c in report["cases"] if c["metric"] == "agreement"} == {"shipped-int8", "my-resnet-ort-int8"}


def test_the_imagenet_c_example_gives_level_0_and_the_five_severities(tmp_path):
    from qrobust.gate.config import load_thresholds

    (tmp_path / "t.yaml").write_text(blocks("yaml")[-1] + "gate:\n  lenet5-digits-int8-x86: {}\n")
    sweep = load_thresholds(tmp_path / "t.yaml").sweep
    assert sweep["impulse_noise"].levels == (0, 0.03, 0.06, 0.09, 0.17, 0.27)
    assert sweep["glass_blur"].levels == (0, 1, 2, 3, 4, 5) and sweep["resize_nearest"].levels == (0, 0.5, 0.75)
    (tmp_path / "bad.yaml").write_text("perturbations:\n  brownian: {levels: imagenet-c}\ngate:\n  lenet5-digits-int8-x86: {}\n")
    with pytest.raises(Exception, match="brownian has no ImageNet-C severities"):
        load_thresholds(tmp_path / "bad.yaml")


def test_the_conftest_example_registers_a_pair_that_builds():
    import torchvision

    from qrobust.models import PAIRS, load_pair

    conftest_example = blocks("python")[0]
    assert "register_pair" in conftest_example
    if "my-model-int8" not in PAIRS:
        namespace = {"load_my_model": lambda: torchvision.models.resnet18().eval(),
                     "my_calibration_batches": lambda: [torch.rand(2, 3, 224, 224)]}
        exec(compile(conftest_example, "README.md", "exec"), namespace)
    pair = load_pair("my-model-int8")
    assert pair.kind == "int8" and pair.target_layer == "layer4" and pair.dataset == "my-dataset"


def test_the_own_gate_test_example_runs_under_pytest(pytester):
    own_test = blocks("python")[1]
    pytester.makepyfile(test_own=own_test)
    pytester.makefile(".yaml", thresholds=textwrap.dedent("""\
        decision: point
        max_samples: 60
        replicates: 50
        perturbations: {awgn: {levels: [0, 0.1]}}
        gate: {lenet5-digits-w8a8: {}}
        """))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert "2 checks" not in result.stdout.str() and "4 checks: 4 pass" in result.stdout.str()


def test_the_development_example_adds_a_perturbation_and_a_cam_method():
    from qrobust import PERTURBATIONS, compute_cams
    from qrobust.testing import check_perturbation

    example = blocks("python")[2]
    if "salt" not in PERTURBATIONS:
        namespace: dict = {}
        exec(compile(example, "README.md", "exec"), namespace)
        assert namespace["noisy"].shape == (2, 3, 8, 8)
    check_perturbation("salt")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten()).eval()
    maps, degenerate = compute_cams(model, torch.rand(2, 3, 8, 8), "1", ["channel_mean"]).maps["channel_mean"]
    assert maps.shape == (2, 8, 8)


def test_qrobust_init_writes_a_starter_that_validates(tmp_path):
    from qrobust.cli import main
    from qrobust.gate.config import load_thresholds

    assert main(["init", str(tmp_path / "starter.yaml")]) == 0
    assert main(["init", str(tmp_path / "starter.yaml")]) == 1  # never overwritten without --force
    text = (tmp_path / "starter.yaml").read_text()
    user_files(tmp_path)
    (tmp_path / "weights" / "resnet18.pt").rename(tmp_path / "weights" / "model.pt")
    text = text.replace("num_classes: 1000", "num_classes: 3")
    (tmp_path / "starter.yaml").write_text(text)
    thresholds = load_thresholds(tmp_path / "starter.yaml")
    assert list(thresholds.gate) == ["my-model-int8"] and thresholds.defaults["agreement"] == 0.98
