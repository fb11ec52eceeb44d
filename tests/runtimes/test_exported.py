"""torch.export twins: PT2E quantization with torchao, users' exported modules, CAMs from graph nodes."""
import pytest
import torch
import torchvision

from helpers import PRE, small_net, synthetic_set
from qrobust.errors import InvalidArgument, UnsupportedError
from qrobust.explain.cam import compute_cams
from qrobust.models import ModelPair
from qrobust.quant import get_preset, quantize_model
from qrobust.runtimes.exported import ExportedModel

pytest.importorskip("torchao", reason="PT2E twins need the pt2e extra (pip install 'qrobust[pt2e]')")


@pytest.fixture(scope="module")
def pt2e_twin():
    return quantize_model(small_net(), get_preset("pt2e-x86"), [PRE.normalize(synthetic_set(32).images)])


def test_a_pt2e_twin_is_a_quantized_reference_graph_close_to_fp32(pt2e_twin):
    x = PRE.normalize(synthetic_set(40).images)
    assert isinstance(pt2e_twin, ExportedModel) and pt2e_twin.describe() == "torch.export graph (cpu)"
    ops = {str(n.target) for n in pt2e_twin.graph_module.graph.nodes}
    assert any("quantize_per_tensor" in op for op in ops) and any("dequantize_per_channel" in op for op in ops)
    with torch.inference_mode():
        fp32 = small_net()(x)
    out = pt2e_twin(x)
    assert out.shape == (40, 5) and not torch.equal(out, fp32)
    assert (out.argmax(1) == fp32.argmax(1)).float().mean() >= 0.9


def test_cams_read_the_node_a_module_path_names_after_its_quantize_dequantize(pt2e_twin):
    x = PRE.normalize(synthetic_set(8).images)
    node = pt2e_twin.layer_for("3")  # the second ReLU, as the next layer reads it
    assert node.startswith("dequantize_per_tensor")
    cams = compute_cams(pt2e_twin, x, "3", ["eigencam"])
    assert cams.activations.shape == (8, 8, 16, 16)
    torch.testing.assert_close(cams.logits, pt2e_twin(x))  # the interpreted pass gives the plain logits
    fp = compute_cams(small_net(), x, "3", ["eigencam"])
    cc = torch.nn.functional.cosine_similarity(fp.maps["eigencam"][0].flatten(1), cams.maps["eigencam"][0].flatten(1))
    assert cc.mean() > 0.9
    with pytest.raises(UnsupportedError, match="gradcampp needs gradients"):
        compute_cams(pt2e_twin, x, "3", ["gradcampp"])


def test_a_pt2e_twin_is_timed_against_the_torch_fp32_it_shares_a_runtime_with(pt2e_twin):
    from qrobust.runtimes import runtime_name, same_runtime_fp32

    fp32 = small_net()
    assert same_runtime_fp32(fp32, pt2e_twin, torch.zeros(2, 3, 16, 16)) is fp32
    assert runtime_name(pt2e_twin) == "torch.export graph (cpu)"


def test_pt2e_coverage_and_quantizer_properties(pt2e_twin):
    from qrobust.quant.coverage import mac_coverage
    from qrobust.quant.properties import check_twin, quantizers

    coverage = mac_coverage(small_net(), pt2e_twin, torch.zeros(1, 3, 16, 16))
    assert coverage["total"] == 3 and coverage["fraction"] > 0.9  # X86InductorQuantizer leaves no conv in float
    assert len(quantizers(pt2e_twin)) >= 4 and check_twin(pt2e_twin) == []
    kept = quantize_model(small_net(), get_preset("pt2e-x86", keep_fp32=("0",)), [PRE.normalize(synthetic_set(8).images)])
    layers = {row["layer"]: row["quantized"] for row in mac_coverage(small_net(), kept, torch.zeros(1, 3, 16, 16))["layers"]}
    assert layers["0"] is False and layers["2"] is True


def test_resnet_blocks_fail_in_one_line_naming_the_alternatives():
    torch.manual_seed(0)
    with pytest.raises(UnsupportedError, match=r"torchao PT2E cannot quantize ResNet: ValueError: 'Input partition has "
                                                r"more than one output node'.*ort-int8 or int8-x86"):
        quantize_model(torchvision.models.resnet18(num_classes=4), get_preset("pt2e-x86"), [torch.randn(2, 3, 64, 64)])


def test_a_users_exported_module_is_taken_as_exported_with_its_layers():
    fp32 = small_net()
    program = torch.export.export(fp32, (torch.zeros(2, 3, 16, 16),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    pair = ModelPair("exported", fp32, program, get_preset("fake-w8a8"), PRE, num_classes=5, dataset="synthetic",
                     target_layer="3")
    assert isinstance(pair.quantized, ExportedModel) and pair.quantized.graph_module is program
    assert pair.quantized_target_layer == "relu_1"
    x = PRE.normalize(synthetic_set(6).images)
    torch.testing.assert_close(compute_cams(pair.quantized, x, "3", ["eigencam"]).activations,
                               compute_cams(fp32, x, "3", ["eigencam"]).activations)


def test_an_exported_program_itself_is_a_one_line_error_naming_its_module():
    fp32 = small_net()
    program = torch.export.export(fp32, (torch.zeros(2, 3, 16, 16),))
    with pytest.raises(InvalidArgument, match=r"quantized='ExportedProgram': must be an nn.Module.*program.module\(\)"):
        ModelPair("x", fp32, program, get_preset("fake-w8a8"), PRE, num_classes=5, dataset="synthetic")


def test_a_pt2e_pair_declared_in_yaml_is_built_and_evaluated(tmp_path):
    from qrobust.gate.engine import Evaluator
    from qrobust.models.declared import build_pair

    spec = {"builder": "helpers:small_net", "preset": "pt2e-x86", "num_classes": 5, "dataset": "synthetic",
            "calibration": {"dataset": "synthetic", "samples": 16}, "target_layer": "3",
            "preprocess": {"resolution": [16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    data = synthetic_set(40, 5)
    pair = build_pair("yaml-pt2e", spec, tmp_path, {"synthetic": data})
    assert isinstance(pair.quantized, ExportedModel) and pair.metadata["recipe"]["runtime"] == "torchao"
    result = Evaluator([pair], datasets={"synthetic": data}, replicates=50).evaluate("yaml-pt2e", "awgn", 0.0, cam=True)
    assert result.metric("agreement").value >= 0.9 and result.metric("cam_cc").value > 0.8
