"""ONNX Runtime twins: export + static quantization, loading users' files safely, CAM layers exposed from the
graph, and the gate end to end on ONNX pairs. onnxruntime's own outputs are the oracle throughout."""
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from helpers import PRE, small_net, synthetic_set
from qrobust.errors import InvalidArgument, UnsupportedError

ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime twins need the onnx extra (pip install 'qrobust[onnx]')")
onnx = pytest.importorskip("onnx")

from qrobust.explain.cam import compute_cams, eigen_projection  # noqa: E402
from qrobust.models import ModelPair  # noqa: E402
from qrobust.quant import get_preset, quantize_model  # noqa: E402
from qrobust.runtimes import load_onnx, runtime_name, same_runtime_fp32  # noqa: E402
from qrobust.runtimes.onnxrt import OnnxModel  # noqa: E402


def calibration():
    return [PRE.normalize(synthetic_set(32).images)]


@pytest.fixture(scope="module")
def ort_twin():
    return quantize_model(small_net(), get_preset("ort-int8"), calibration())


@pytest.fixture(scope="module")
def files(ort_twin, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    (folder / "fp32.onnx").write_bytes(ort_twin.fp32_reference.proto.SerializeToString())
    (folder / "int8.onnx").write_bytes(ort_twin.proto.SerializeToString())
    return folder


def test_logits_are_onnxruntimes_own_outputs(files):
    x = PRE.normalize(synthetic_set(20).images)
    raw = ort.InferenceSession(str(files / "int8.onnx"), providers=["CPUExecutionProvider"])
    expected = raw.run(None, {raw.get_inputs()[0].name: x.numpy()})[0]
    assert np.array_equal(load_onnx(files / "int8.onnx")(x).numpy(), expected)


def test_exported_fp32_matches_torch_and_the_twin_is_real_int8_qdq(ort_twin):
    x = PRE.normalize(synthetic_set(20).images)
    with torch.inference_mode():
        torch.testing.assert_close(ort_twin.fp32_reference(x), small_net()(x), atol=1e-4, rtol=1e-4)
    ops = {node.op_type for node in ort_twin.proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert ort_twin.metadata["reduce_range"] and ort_twin.metadata["calibrate_method"] == "minmax"
    assert (ort_twin(x).argmax(1) == small_net()(x).argmax(1)).float().mean() >= 0.9


def test_a_torch_module_name_maps_to_the_dequantized_tensor_the_next_layer_reads(ort_twin):
    # small_net's "3" is the second ReLU: ORT's quantizer drops its node into the conv's output range
    tensor = ort_twin.layer_for("3")
    assert tensor.endswith("_DequantizeLinear_Output")
    assert ort_twin.fp32_reference.layer_for("3") in tensor
    with pytest.raises(InvalidArgument, match=r"target_layer='nope': is neither a tensor"):
        ort_twin.layer_for("nope")


def test_eigencam_of_an_onnx_twin_uses_the_graphs_own_tensor(ort_twin):
    x = PRE.normalize(synthetic_set(8).images)
    tensor = ort_twin.layer_for("3")
    proto = onnx.ModelProto()
    proto.CopyFrom(ort_twin.proto)
    proto.graph.output.append(onnx.ValueInfoProto(name=tensor))
    raw = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, act = raw.run(None, {"input": x.numpy()})
    cams = compute_cams(ort_twin, x, "3", ["eigencam"])
    assert np.array_equal(cams.logits.numpy(), logits)
    assert np.array_equal(cams.activations.numpy(), act)
    assert eigen_projection(torch.from_numpy(act)).shape == (8, 16, 16)
    with pytest.raises(UnsupportedError, match="gradcampp needs gradients, and an onnxruntime model has none"):
        compute_cams(ort_twin, x, "3", ["gradcampp"])


def test_coverage_and_quantizer_properties_read_the_qdq_graph(ort_twin):
    from qrobust.quant.coverage import mac_coverage
    from qrobust.quant.properties import check_twin, quantizers

    coverage = mac_coverage(small_net(), ort_twin, torch.zeros(1, 3, 16, 16))
    assert coverage["fraction"] == 1.0 and coverage["total"] == 3  # two convs and the Linear
    found = quantizers(ort_twin)
    assert len(found) >= 6 and check_twin(ort_twin) == []
    weight = next(q for q in found if q.channels is not None)
    assert weight.qparams.scale.numel() == weight.channels
    # a corrupted graph (a negative activation scale) is caught, naming the node
    broken = onnx.ModelProto()
    broken.CopyFrom(ort_twin.proto)
    scale = next(t for t in broken.graph.initializer if t.name.endswith("_scale") and not t.dims)
    scale.CopyFrom(onnx.numpy_helper.from_array(np.array(-0.5, np.float32), scale.name))
    assert any("scale must be finite and > 0" in line for line in check_twin(OnnxModel(broken)))


def test_a_keep_fp32_module_stays_in_float(ort_twin):
    from qrobust.quant.coverage import mac_coverage

    kept = quantize_model(small_net(), get_preset("ort-int8", keep_fp32=("0",)), calibration())
    layers = {row["layer"]: row["quantized"] for row in mac_coverage(small_net(), kept, torch.zeros(1, 3, 16, 16))["layers"]}
    assert sorted(layers.values()) == [False, True, True]
    with pytest.raises(InvalidArgument, match="keep_fp32"):
        quantize_model(small_net(), get_preset("ort-int8", keep_fp32=("nope",)), calibration())


def test_a_fixed_batch_graph_runs_in_chunks(tmp_path):
    model = small_net()
    path = tmp_path / "b1.onnx"
    with warnings.catch_warnings():  # the legacy TorchScript exporter (deprecated, still what many files come from)
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, input_names=["input"])
    x = PRE.normalize(synthetic_set(5).images)
    loaded = load_onnx(path)
    assert loaded.fixed_batch == 1
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-4, rtol=1e-4)
    # the legacy exporter names nodes by module path: "/2/Relu" is module "2"
    assert loaded.layer_for("3").startswith("/3/")


def test_latency_compares_like_with_like(ort_twin):
    assert same_runtime_fp32(small_net(), ort_twin, torch.zeros(2, 3, 16, 16)) is ort_twin.fp32_reference
    fp32 = small_net()
    assert same_runtime_fp32(fp32, fp32, None) is fp32  # a torch twin is timed against the torch FP32
    assert runtime_name(ort_twin) == "onnxruntime CPUExecutionProvider"
    assert runtime_name(fp32) == "torch (cpu)"


# ---- bad and hostile files: one line each, nothing executed --------------------------------------------------
def test_bad_files_and_options_fail_with_one_line(tmp_path, files):
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(InvalidArgument, match=r"is not an ONNX model"):
        load_onnx(tmp_path / "junk.onnx")
    with pytest.raises(InvalidArgument, match="cannot be read"):
        load_onnx(tmp_path / "missing.onnx")
    with pytest.raises(InvalidArgument, match=r"providers=.*TensorrtNope.*not in this onnxruntime build"):
        load_onnx(files / "int8.onnx", providers=["TensorrtNope"])
    with pytest.raises(InvalidArgument, match="custom_ops.*only with trust: true"):
        load_onnx(files / "int8.onnx", custom_ops=[str(tmp_path / "lib.so")])


def test_custom_op_domains_and_outside_external_data_are_refused(tmp_path, files):
    proto = onnx.load(str(files / "fp32.onnx"))
    proto.graph.node[0].domain = "evil.ops"
    (tmp_path / "custom.onnx").write_bytes(proto.SerializeToString())
    with pytest.raises(UnsupportedError, match=r"custom domain\(s\) 'evil.ops'.*custom-op library"):
        load_onnx(tmp_path / "custom.onnx")
    inner = tmp_path / "model"
    inner.mkdir()
    onnx.save(onnx.load(str(files / "fp32.onnx")), str(inner / "ext.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    assert load_onnx(inner / "ext.onnx")(torch.zeros(1, 3, 16, 16)).shape == (1, 5)  # beside the model: fine
    for location in ("../outside.bin", str(tmp_path / "outside.bin")):
        proto = onnx.load(str(inner / "ext.onnx"), load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        (inner / "moved.onnx").write_bytes(proto.SerializeToString())
        with pytest.raises(UnsupportedError, match=r"outside the model's folder: refused unless trust: true"):
            load_onnx(inner / "moved.onnx")


def test_a_missing_onnxruntime_names_the_extra(monkeypatch, files):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UnsupportedError, match=r"pip install 'qrobust\[onnx\]'"):
        load_onnx(files / "int8.onnx")


# ---- the gate on ONNX pairs, as a user declares them ---------------------------------------------------------
def gate_file(pytester, files, body):
    pytester.makefile(".yaml", thresholds=body.replace("FILES", str(files)))


DATASET = "datasets:\n  shapes: {builder: 'helpers:five_class_set', num_classes: 5}\n"

PAIR = """\
  onnx-files:
    fp32: FILES/fp32.onnx
    quantized: FILES/int8.onnx
    num_classes: 5
    preprocess: {resolution: [16, 16], mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}
    dataset: shapes
    target_layer: "3"
"""


@pytest.mark.slow
def test_an_onnx_pair_is_gated_end_to_end(pytester, files):
    gate_file(pytester, files, DATASET + "pairs:\n" + PAIR + textwrap.dedent("""\
        perturbations:
          awgn: {levels: [0, 0.05]}
        gate:
          onnx-files: {tolerances: {agreement: 0.5, cam_rmse: 0.5}}
        latency:
          pairs: [onnx-files]
        """))
    pytester.syspathinsert(str(__import__("pathlib").Path(__file__).parents[1]))
    result = pytester.runpytest("--pyargs", "qrobust.suites", "--qrobust-thresholds", "thresholds.yaml",
                                "-p", "no:cacheprovider", "-q")
    # skipped: the bitwidth and explanations sections, which this file gates no pair for
    result.assert_outcomes(passed=14, skipped=2)
    report = __import__("json").loads((pytester.path / "qrobust-report" / "report.json").read_text())
    metrics = {(c["pair"], c["metric"]) for c in report["cases"]}
    assert {("onnx-files", "agreement"), ("onnx-files", "cam_rmse"), ("onnx-files", "quantized_fraction"),
            ("onnx-files", "quantizer_violations"), ("onnx-files", "speedup")} <= metrics
    assert report["environment"]["pairs"]["onnx-files"]["runtimes"] == {
        "fp32": "onnxruntime CPUExecutionProvider", "quantized": "onnxruntime CPUExecutionProvider"}
    speed = next(c for c in report["cases"] if c["metric"] == "speedup")
    assert speed["details"]["fp32_runtime"] == speed["details"]["quantized_runtime"] == "onnxruntime CPUExecutionProvider"


@pytest.mark.parametrize("change, message", [
    ("    preset: fake-w8a8\n    calibration: {dataset: shapes}\n", "remove one of the two"),
    ("    providers: CPUExecutionProvider\n", "expected a list of execution provider names"),
    ("    weights: x.pt\n", "an ONNX fp32 model carries its weights"),
])
def test_bad_onnx_pair_declarations_are_usage_errors(pytester, files, change, message):
    gate_file(pytester, files, DATASET + "pairs:\n"
              + PAIR + change + "gate:\n  onnx-files: {}\n")
    pytester.syspathinsert(str(__import__("pathlib").Path(__file__).parents[1]))
    result = pytester.runpytest("--pyargs", "qrobust.suites", "--qrobust-thresholds", "thresholds.yaml", "-q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*pairs.onnx-files*{message}*"])


def test_fgsm_on_an_onnx_fp32_is_a_usage_error(pytester, files):
    gate_file(pytester, files, DATASET + "pairs:\n"
              + PAIR + "perturbations:\n  fgsm: {levels: [0, 0.01]}\ngate:\n  onnx-files: {}\n")
    pytester.syspathinsert(str(__import__("pathlib").Path(__file__).parents[1]))
    result = pytester.runpytest("--pyargs", "qrobust.suites", "--qrobust-thresholds", "thresholds.yaml", "-q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*gate.onnx-files: fgsm needs the FP32 model's input gradients*ONNX file*"])


def test_a_torch_preset_on_an_onnx_fp32_and_stray_providers_are_usage_errors(pytester, files):
    body = PAIR.replace("    quantized: FILES/int8.onnx\n", "    preset: int8-x86\n    calibration: {dataset: shapes}\n")
    gate_file(pytester, files, DATASET + "pairs:\n"
              + body + "gate:\n  onnx-files: {}\n")
    pytester.syspathinsert(str(__import__("pathlib").Path(__file__).parents[1]))
    result = pytester.runpytest("--pyargs", "qrobust.suites", "--qrobust-thresholds", "thresholds.yaml", "-q")
    result.stderr.fnmatch_lines(["*pairs.onnx-files.preset: 'int8-x86' quantizes torch models*ort-int8*"])


@pytest.mark.parametrize("provider", ["CUDAExecutionProvider", "TensorrtExecutionProvider"])
def test_gpu_execution_providers_agree_with_the_cpu(files, provider):
    """Where onnxruntime has a GPU provider (not in CI: no GPU), the same int8 file runs there with the
    CPU's top-1 on every sample."""
    if provider not in ort.get_available_providers() or not torch.cuda.is_available():
        pytest.skip(f"{provider} is not available here (needs an NVIDIA GPU and onnxruntime-gpu)")
    x = PRE.normalize(synthetic_set(40).images)
    cpu = load_onnx(files / "int8.onnx")(x)
    gpu = load_onnx(files / "int8.onnx", providers=[provider, "CPUExecutionProvider"])(x)
    assert (gpu.argmax(1) == cpu.argmax(1)).all()


def test_occlusion_gates_cams_of_a_twin_without_any_layer(ort_twin):
    """A black-box twin (no CAM layer named) still gets CAM metrics from the layer-free occlusion method."""
    from qrobust.gate.engine import Evaluator

    data = synthetic_set(24, 5, "shapes")
    pair = ModelPair("black-box", small_net(), ort_twin, get_preset("ort-int8"), PRE, num_classes=5, dataset="shapes")
    ev = Evaluator([pair], datasets={"shapes": data}, cam_methods={"black-box": "occlusion"}, replicates=50)
    result = ev.evaluate("black-box", "awgn", 0.0, cam=True)
    assert result.metric("cam_cc").value > 0.6 and result.metric("cam_rmse").value < 0.25
    assert result.metric("cam_cc").details["method"] == "occlusion"


@pytest.mark.slow
def test_a_torch_fp32_against_the_shipped_onnx_twin_is_timed_on_one_runtime(pytester, files):
    """``builder`` (torch FP32) + ``quantized: x.onnx``: gated as declared, the latency FP32 exported to ONNX."""
    body = PAIR.replace("    fp32: FILES/fp32.onnx\n", "    builder: helpers:small_net\n")
    gate_file(pytester, files, DATASET + "pairs:\n" + body + "perturbations:\n  awgn: {levels: [0, 0.05]}\n"
              "gate:\n  onnx-files: {}\nlatency:\n  pairs: [onnx-files]\n  batch: 4\n  rounds: 3\n")
    pytester.syspathinsert(str(__import__("pathlib").Path(__file__).parents[1]))
    result = pytester.runpytest("--pyargs", "qrobust.suites", "--qrobust-thresholds", "thresholds.yaml",
                                "-p", "no:cacheprovider", "-q")
    assert result.ret == 0, result.stdout.str()[-2000:]
    report = __import__("json").loads((pytester.path / "qrobust-report" / "report.json").read_text())
    assert report["environment"]["pairs"]["onnx-files"]["runtimes"] == {
        "fp32": "torch (cpu)", "quantized": "onnxruntime CPUExecutionProvider"}
    speed = next(c for c in report["cases"] if c["metric"] == "speedup")["details"]
    assert speed["fp32_runtime"] == speed["quantized_runtime"] == "onnxruntime CPUExecutionProvider"


def test_a_gate_whose_only_pair_cannot_load_says_so_in_its_verdict_line(pytester, files, tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf" * 4)
    gate_file(pytester, files, DATASET + "pairs:\n" + PAIR.replace("FILES/int8.onnx", str(tmp_path / "junk.onnx"))
              + "gate:\n  onnx-files: {}\n")
    pytester.syspathinsert(str(__import__("pathlib").Path(__file__).parents[1]))
    result = pytester.runpytest("--pyargs", "qrobust.suites", "--qrobust-thresholds", "thresholds.yaml", "-q")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*pair onnx-files cannot be gated: onnx=*junk.onnx*: is not an ONNX model*",
                                 "*qrobust gate: FAILED:*0 pass, 0 fail, * error*",
                                 "*could not be gated: pair onnx-files cannot be gated: onnx=*junk.onnx*"])
