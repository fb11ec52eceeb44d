"""The twin's CAM tensor is FP32's: matched by activations on a probe batch (residual adds included), and
hooks keep the value they saw even when a later in-place op changes the tensor."""
import pytest
import torch
import torchvision
from torch import nn

from qrobust.data import load_dataset
from qrobust.data.builtin import calibration_photos
from qrobust.explain.cam import compute_cams
from qrobust.explain.layers import _candidates, activation, match_twin_layer, relative_error
from qrobust.metrics.saliency import cam_rmse
from qrobust.models.zoo import IMAGENET_PREPROCESS
from qrobust.quant import get_preset, quantize_model, twin_layer_name


def realistic(arch: str, size: int = 224) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A seeded torchvision network whose BatchNorm statistics are re-estimated on natural photos
    (no trained weights ship offline for torchvision), with calibration and evaluation photos."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    resize = lambda x: IMAGENET_PREPROCESS.normalize(F.interpolate(x, size=size, mode="bilinear", antialias=True))
    cal = resize(calibration_photos(224)[::3])
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the batch
    model.train()
    with torch.no_grad():
        model(cal)
    return model.eval(), cal, resize(load_dataset("imagenet-photos").images[::7])


@pytest.mark.slow
def test_a_resnet_block_output_is_matched_after_its_residual_add():
    model, cal, x = realistic("resnet18")
    twin = quantize_model(model, get_preset("int8-x86"), [cal])
    guess = twin_layer_name(model, twin, "layer4")
    assert guess == "layer4.1.conv2"  # the last module call inside layer4: before the add and ReLU
    layer, error = match_twin_layer(model, twin, "layer4", x)
    assert layer == "avgpool:input" and error < 0.25  # measured 0.20 (7-bit activations of a random-weight net)
    fp = compute_cams(model, x, "layer4", ["eigencam"])
    maps = {spec: compute_cams(twin, x, spec, ["eigencam"], targets=fp.targets).maps["eigencam"][0]
            for spec in (guess, layer)}
    rmse = {spec: float(cam_rmse(fp.maps["eigencam"][0], m).mean()) for spec, m in maps.items()}
    # measured: 0.020 at the matched tensor, 0.21 at the structural guess (the 0.27 on 8 photos)
    assert rmse[layer] < 0.05 < 0.15 < rmse[guess]


@pytest.mark.slow
@pytest.mark.parametrize("arch, layer", [("mobilenet_v2", "features.18"), ("efficientnet_b0", "features.8")])
def test_depthwise_and_squeeze_excitation_nets_keep_their_block_output(arch, layer):
    model, cal, x = realistic(arch, size=160)
    twin = quantize_model(model, get_preset("int8-qnnpack-relu6"), [cal])
    matched, error = match_twin_layer(model, twin, layer, x)
    reference = activation(model, layer, x)
    guess = twin_layer_name(model, twin, layer)
    # the match is the closest candidate, and as close as the structural guess's own tensor
    assert error <= relative_error(reference, activation(twin, guess, x)) + 1e-6
    assert matched in _candidates([guess], layer, guess) or matched.endswith(":input")


def test_candidates_are_the_guess_the_modules_inside_and_the_next_modules_input():
    called = ["conv1", "layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2", "avgpool", "fc"]
    assert _candidates(called, "layer4", "layer4.1.conv2") == [
        "layer4.1.conv2", "layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "avgpool:input"]
    assert _candidates(called, "fc", "fc") == ["fc"]


def test_hooks_keep_the_value_before_an_in_place_residual_add():
    """torchvision's BasicBlock adds the identity in place on bn2's output; the CAM of bn2 must be the CAM
    of bn2's output, not of the sum (a hook that kept a reference would see the sum)."""
    torch.manual_seed(0)
    block = torchvision.models.resnet.BasicBlock(8, 8).eval()
    x = torch.randn(2, 8, 6, 6)
    seen = {}
    handle = block.bn2.register_forward_hook(lambda m, i, o: seen.__setitem__("bn2", o.detach().clone()))
    with torch.no_grad():
        block(x)
    handle.remove()
    for method in ("eigencam", "gradcam"):
        maps = compute_cams(nn.Sequential(block, nn.AdaptiveAvgPool2d(1), nn.Flatten()), x, "0.bn2", [method])
        assert torch.allclose(maps.activations, seen["bn2"]), method
    assert activation(block, "bn2", x).equal(seen["bn2"])
