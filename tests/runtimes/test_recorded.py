"""Gate what runs on the device: the inputs exported, a device runner without qrobust, its outputs gated.

The worked example: the built-in LeNet-5 quantized by ONNX Runtime (QDQ) is gated live, and the same QDQ
model is run on the export by ``examples/run_onnxruntime.py`` in a process where qrobust cannot be
imported (the stand-in for a device). The imported outputs must give the live twin's records exactly.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qrobust.cli import main
from qrobust.errors import ModelOutputError, UnsupportedError
from qrobust.runtimes.recorded import RecordedOutputs, sample_key

pytest.importorskip("onnxruntime")
RUNNER = Path(__file__).parents[2] / "examples" / "run_onnxruntime.py"
PAIR = """\
  {name}:
    builder: qrobust.models.lenet:lenet5_digits
    num_classes: 10
    preprocess: {{resolution: [32, 32], mean: [0.5], std: [0.5]}}
    dataset: digits-test
"""


def readme_example() -> tuple[dict, list[list[str]]]:
    """The README's "Gate what runs on the device": its gate.yaml and its three commands."""
    import yaml

    from helpers import readme_blocks

    gate = next(yaml.safe_load(b) for b in readme_blocks("yaml") if b.startswith("# gate.yaml: the pair's twin is"))
    commands = next(b for b in readme_blocks("sh") if b.startswith("qrobust export-inputs"))
    return gate, [line.split() for line in commands.strip().splitlines()]


def run_device(cwd: Path, args: list[str]) -> None:
    """The runner in a process where ``import qrobust`` fails: it stands for a device, which has no qrobust."""
    code = ("import runpy, sys; sys.modules['qrobust'] = None; "
            f"sys.argv = ['run', *{args!r}]; runpy.run_path({str(RUNNER)!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The README's commands on its gate.yaml, with a live ONNX Runtime twin of the same model added
    beside the device's, to compare with."""
    import os

    import onnx
    import yaml

    from qrobust.session import Options, QrobustSession

    root = tmp_path_factory.mktemp("device")
    gate, (export, runner, run) = readme_example()
    gate["pairs"]["lenet-ort"] = {**{k: v for k, v in gate["pairs"]["lenet-device"].items() if k != "outputs"},
                                  "preset": "ort-int8", "calibration": {"dataset": "digits-train", "samples": 64}}
    gate["gate"]["lenet-ort"] = {}
    # a device matrix: the same export run as another host would (one thread, no graph optimizations),
    # compared with the first device's logits, with the same statistics
    gate["pairs"]["cpu-vs-plain"] = {**{k: v for k, v in gate["pairs"]["lenet-device"].items()
                                        if k not in ("builder", "outputs")},
                                     "reference_outputs": "device/cpu", "outputs": "device/cpu-plain"}
    gate["gate"]["cpu-vs-plain"] = {"perturbations": {"awgn": {"levels": [0, 0.1]}}}
    (root / "gate.yaml").write_text(yaml.safe_dump(gate))
    here = os.getcwd()
    os.chdir(root)
    try:
        assert export[:2] == ["qrobust", "export-inputs"] and main(export[1:]) == 0
        live = QrobustSession(Options(thresholds="gate.yaml")).pairs.built("lenet-ort")
    finally:
        os.chdir(here)
    assert runner[:2] == ["python", "examples/run_onnxruntime.py"]
    onnx.save(live.quantized.proto, str(root / runner[3]))  # the model that ships to the device
    run_device(root, runner[2:])
    run_device(root, [*runner[2:4], "device/cpu-plain", *runner[5:], "--threads", "1", "--no-optimize"])
    assert run[:2] == ["qrobust", "run"]
    gate_run = subprocess.run([sys.executable, "-m", "qrobust", *run[1:], "-q", "-p", "no:randomly"], cwd=root,
                              capture_output=True, text=True, timeout=600)
    assert gate_run.returncode == 0, gate_run.stdout[-3000:]
    return root, json.loads((root / "qrobust-report" / "report.json").read_text())


@pytest.mark.slow
def test_the_device_outputs_give_the_live_twins_records(example):
    _, report = example
    by_pair = {}
    for c in report["cases"]:
        key = (c["test"].replace(c["pair"], "<pair>"), c["metric"])
        by_pair.setdefault(c["pair"], {})[key] = {k: v for k, v in c.items() if k not in ("test", "pair")}
    live, device = by_pair["lenet-ort"], by_pair["lenet-device"]
    shared = live.keys() & device.keys()
    assert len(shared) == 3 * 5  # three cases (awgn 0 and 0.1, fgsm 0.05) x five metrics, EigenCAM's SIM one
    assert [key for key in shared if live[key] != device[key]] == []  # value, interval, verdict: all of it
    assert all(device[key]["n"] == 200 for key in shared)
    judged = {(n["pair"], n["metric"]) for n in report["not_applicable"]}
    assert ("lenet-device", "quantizer_violations") in judged  # said in one line, not silently dropped


@pytest.mark.slow
def test_two_devices_compare_with_the_same_statistics(example):
    """The device matrix: is the difference between two hosts' outputs larger than quantization's?"""
    _, report = example
    matrix = {(c["perturbation"], c["level"], c["metric"]): c for c in report["cases"] if c["pair"] == "cpu-vs-plain"}
    device = {(c["perturbation"], c["level"], c["metric"]): c for c in report["cases"] if c["pair"] == "lenet-device"}
    assert set(matrix) == {(p, lv, m) for p, lv in (("awgn", 0), ("awgn", 0.1))
                           for m in ("top1_delta", "agreement", "kl_mean", "logit_sqnr_db", "cam_sim")}
    for key, record in matrix.items():
        assert record["n"] == 200 and record["interval"] is not None and record["verdict"] == "pass"
        if key[2] == "kl_mean":  # two hosts differ far less than the twin differs from FP32
            assert record["value"] < device[key]["value"] / 100
    assert matrix[("awgn", 0.1, "agreement")]["value"] == 1.0


@pytest.mark.slow
def test_the_export_is_the_same_bytes_again_and_holds_what_the_manifest_says(example, tmp_path):
    root, _ = example
    assert main(["export-inputs", str(root / "gate.yaml"), "--pair", "lenet-device", "-o", str(tmp_path / "again")]) == 0
    manifest = json.loads((root / "export" / "manifest.json").read_text())
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert manifest["content_sha256"] == again["content_sha256"]
    first = manifest["cases"][0]["batches"][0]
    inputs = np.load(root / "export" / first["inputs"], allow_pickle=False)
    assert inputs.dtype == np.float32 and list(inputs.shape) == first["shape"] and inputs.shape[1:] == (1, 32, 32)
    assert first["keys"][0] == sample_key(torch.from_numpy(inputs[0]))
    assert {c["case"] for c in manifest["cases"]} == {"clean-0", "awgn-0.1", "fgsm-0.05"}
    assert (root / "export" / first["fp32"]).is_file()
    assert main(["export-inputs", str(root / "gate.yaml"), "--pair", "lenet-device", "-o", str(tmp_path / "again")]) == 4


# ---- files that cannot be trusted: one line naming the file ----------------------------------------------------
def recorded(tmp_path, rows=3, classes=4):
    """A two-batch export's manifest and logits, as a runner leaves them."""
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.rand(rows, 1, 2, 2, generator=gen) for _ in range(2)]
    batches = []
    for i, x in enumerate(inputs):
        file = f"clean-0/batch-{i:05d}.npy"
        (tmp_path / "clean-0").mkdir(exist_ok=True)
        np.save(tmp_path / file, np.ones((rows, classes), np.float32) * i)
        batches.append({"file": file, "ids": list(range(i * rows, (i + 1) * rows)), "keys": [sample_key(s) for s in x]})
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "cases": [{"case": "clean-0", "batches": batches}]}))
    return inputs


def test_recorded_logits_answer_each_input_by_its_bytes(tmp_path):
    inputs = recorded(tmp_path)
    twin = RecordedOutputs(tmp_path)
    mixed = torch.cat([inputs[1][:1], inputs[0][2:]])  # any batching of exported samples
    assert twin(mixed).tolist() == [[1.0] * 4, [0.0] * 4]
    with pytest.raises(ModelOutputError, match="an input the gate feeds is not in the export"):
        twin(inputs[0] + 1e-6)  # a changed pixel: a stale export
    with pytest.raises(ModelOutputError, match="recorded no activations of layer 'features.0'"):
        twin.run(inputs[0], ["features.0"])
    np.save(tmp_path / "clean-0" / "batch-00001@%2Ffeatures%2F0.npy", np.arange(3 * 2, dtype=np.float32).reshape(3, 2))
    logits, acts = RecordedOutputs(tmp_path).run(inputs[1][[2, 0]], ["/features/0"])  # beside the logits, quoted
    assert acts["/features/0"].tolist() == [[4.0, 5.0], [0.0, 1.0]] and logits.tolist() == [[1.0] * 4] * 2
    with pytest.raises(UnsupportedError, match="the quantizer properties need the live twin"):
        twin.quant_params()


@pytest.mark.parametrize("fault, message", [
    ("missing", "batch-00001.npy' is missing"),
    ("extra", "stray.npy': not a batch of"),
    ("shape", "shape (2, 4), expected (3, 4)"),
    ("classes", "shape (3, 5), expected (3, 4)"),
    ("dtype", "dtype int64, expected floats"),
    ("nan", "1 of 3 rows hold NaN or Inf (first sample id 4)"),
    ("pickle", "not a .npy array"),
    ("manifest", "not a qrobust export manifest"),
    ("no manifest", "manifest.json' does not exist"),
])
def test_files_that_cannot_be_trusted_are_one_line_naming_them(tmp_path, fault, message):
    inputs = recorded(tmp_path)
    second = tmp_path / "clean-0" / "batch-00001.npy"
    if fault == "missing":
        second.unlink()
    elif fault == "extra":
        np.save(tmp_path / "clean-0" / "stray.npy", np.zeros((3, 4), np.float32))
    elif fault == "shape":
        np.save(second, np.zeros((2, 4), np.float32))
    elif fault == "classes":
        np.save(second, np.zeros((3, 5), np.float32))
    elif fault == "dtype":
        np.save(second, np.zeros((3, 4), np.int64))
    elif fault == "nan":
        logits = np.zeros((3, 4), np.float32)
        logits[1, 2] = np.nan
        np.save(second, logits)
    elif fault == "pickle":
        np.save(second, np.array([{"os": "system"}], dtype=object), allow_pickle=True)
    elif fault == "manifest":
        (tmp_path / "manifest.json").write_text(json.dumps({"format": 99, "cases": []}))
    elif fault == "no manifest":
        (tmp_path / "manifest.json").unlink()
    with pytest.raises(ModelOutputError) as caught:
        RecordedOutputs(tmp_path)(inputs[0])
    line = str(caught.value)
    assert "\n" not in line and message in line, line
    named = "manifest.json" if "manifest" in fault else ("stray.npy" if fault == "extra" else "batch-00001.npy")
    assert named in line


def test_a_recorded_twin_cannot_also_have_a_preset_or_a_model(tmp_path):
    from qrobust.errors import ConfigError
    from qrobust.gate.config import load_thresholds

    for extra, message in (("    preset: int8-x86\n    calibration: {dataset: digits-train}\n", "a preset would build"),
                           ("    quantized: model.onnx\n", "the twin is one or the other")):
        shutil.copy(RUNNER, tmp_path / "model.onnx")
        (tmp_path / "gate.yaml").write_text("pairs:\n" + PAIR.format(name="d") + "    outputs: out\n" + extra
                                            + "gate: {d: {}}\n")
        with pytest.raises(ConfigError, match=message):
            load_thresholds(tmp_path / "gate.yaml")
