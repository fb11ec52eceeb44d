"""EfficientNet-Lite0: our architecture against the reference package, the ImageNet predictions on the
bundled photos, the int8 recipes, and ReLU6 folding on a small network."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.data import load_dataset
from qrobust.data.builtin import CALIBRATION_PHOTOS, EVAL_PHOTOS
from qrobust.models.efficientnet_lite import lite0_weights_path, same_padding
from qrobust.errors import InvalidArgument
from qrobust.models import load_pair
from qrobust.quant import convert_int8, get_preset, quantized_module_names
from qrobust.models.zoo import IMAGENET_PREPROCESS, lite0_fp32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos():
    return load_dataset("imagenet-photos")


@pytest.fixture(scope="module")
def inputs(photos):
    return IMAGENET_PREPROCESS.normalize(photos.images)


def _kl(p_logits, q_logits):
    return (F.softmax(p_logits.double(), 1) * (F.log_softmax(p_logits.double(), 1)
                                               - F.log_softmax(q_logits.double(), 1))).sum(1)


def test_matches_the_reference_package_bit_for_bit(inputs):
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(lite0_weights_path(), weights_only=True))
    with torch.inference_mode():
        assert torch.equal(lite0_fp32()(inputs[:8]), reference.eval()(inputs[:8]))


@pytest.mark.parametrize("size, kernel, stride, expected", [
    (224, 3, 2, (0, 1)), (224, 5, 2, (1, 2)), (225, 3, 2, (1, 1)), (112, 3, 1, (1, 1)), (14, 5, 1, (2, 2)),
    (7, 1, 1, (0, 0)),
])
def test_same_padding_is_tensorflows(size, kernel, stride, expected):
    assert same_padding(size, kernel, stride) == expected
    before, after = expected
    assert (size + before + after - kernel) // stride + 1 == -(-size // stride)  # output = ceil(size / stride)


def test_photos_are_grouped_views_labelled_by_fp32(photos, inputs):
    assert len(photos) == 7 * len(EVAL_PHOTOS) and photos.images.shape[1:] == (3, 224, 224)
    assert photos.groups.unique().tolist() == list(range(len(EVAL_PHOTOS)))
    assert not set(EVAL_PHOTOS) & set(CALIBRATION_PHOTOS)
    with torch.inference_mode():
        assert torch.equal(lite0_fp32()(inputs).argmax(1), photos.labels)
    # the first view of each photo is its centre crop; ImageNet classes known for three of them
    centre = {name: photos.labels[7 * i].item() for i, name in enumerate(EVAL_PHOTOS)}
    assert (centre["chelsea"], centre["coffee"], centre["rocket"]) == (285, 967, 657)  # Egyptian cat, espresso, missile


def test_tuned_int8_recipe_holds_and_default_x86_recipe_collapses(inputs):
    with torch.inference_mode():
        reference = lite0_fp32()(inputs)
        tuned, default = load_pair("efficientnet-lite0-int8-tuned"), load_pair("efficientnet-lite0-int8-x86")
        assert quantized_module_names(tuned.quantized) and quantized_module_names(default.quantized)
        # the head ReLU6's counterpart: fused into the head conv when folded, its own module otherwise
        assert (tuned.quantized_target_layer, default.quantized_target_layer) == ("_conv_head", "_act1")
        good, bad = tuned.quantized(inputs), default.quantized(inputs)
    assert (good.argmax(1) == reference.argmax(1)).float().mean() >= 0.85
    assert _kl(reference, good).mean() < 0.02  # seed 004's clean int8 KL range is 0.008-0.018
    assert _kl(reference, bad).mean() > 0.3   # measured 0.93: the gate's strict expected failure


def _sqnr_db(reference, approx):
    return (10 * torch.log10(reference.pow(2).mean() / (approx - reference).pow(2).mean())).item()


class ConvBnRelu6(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6()
        with torch.no_grad():  # a wide pre-activation range, as BN folding gives real networks
            for bn in (self.bn1, self.bn2):
                bn.weight.uniform_(5, 30)
                bn.bias.uniform_(-20, 5)

    def forward(self, x):
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))


def test_relu6_folding_keeps_zero_to_six_on_the_int8_grid():
    torch.manual_seed(0)
    model = ConvBnRelu6().eval()
    x = torch.randn(32, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
        folded = convert_int8(model, get_preset("int8-qnnpack-relu6"), [x])
        plain = convert_int8(model, get_preset("int8-x86"), [x])
        out_folded, out_plain = folded(x), plain(x)
    assert out_folded.min() >= 0 and out_folded.max() <= 6 + 1e-6
    assert (out_folded - reference).abs().mean() < 2 * 6 / 255  # within two steps of the [0, 6] grid
    # measured: 28.9 dB folded, 15.8 dB unfolded on x86 (a wide pre-activation grid clipped to [0, 6]);
    # qnnpack's own unfolded ReLU6 is wrong in torch 2.14 (-2.5 dB), which folding also sidesteps
    assert _sqnr_db(reference, out_folded) > _sqnr_db(reference, out_plain) + 6
    assert "act2" not in dict(folded.graph.named_modules())  # fused into the conv kernel


def test_relu6_folding_leaves_fp32_layers_alone():
    torch.manual_seed(0)
    model = ConvBnRelu6().eval()
    x = torch.randn(8, 3, 16, 16)
    keep = ("conv1", "bn1", "act1")
    folded = convert_int8(model, get_preset("int8-qnnpack-relu6", keep_fp32=keep), [x])
    modules = dict(folded.graph.named_modules())
    assert isinstance(modules["act1"], nn.ReLU6) and "act2" not in modules
    with torch.no_grad():
        assert _sqnr_db(model(x), folded(x)) > 25


def test_relu6_folding_is_for_int8_with_8_bit_activations_only():
    with pytest.raises(InvalidArgument, match="fold_relu6"):
        get_preset("fake-w8a8", fold_relu6=True)
    # 7-bit activations (x86/fbgemm's reduce_range) would clip at 12, not 6: measured -2.9 dB
    with pytest.raises(InvalidArgument, match="fold_relu6=True: needs 8-bit activations"):
        get_preset("int8-x86", fold_relu6=True)


def test_engine_counts_do_not_depend_on_batch_size_or_threads():
    """FP32's labels here are near-ties (margins down to 0.0015): float reordering across batch sizes
    and thread counts moves logits by ~1e-6, far too little to flip them, so the counts are equal."""
    from qrobust.gate.engine import Evaluator

    pair = load_pair("efficientnet-lite0-int8-tuned")
    previous = torch.get_num_threads()
    results = []
    try:
        for batch_size, threads in ((8, 1), (64, 2)):
            torch.set_num_threads(threads)
            ev = Evaluator([pair], batch_size=batch_size, replicates=100)
            ev.batch_size_for = lambda _pair, size=batch_size: size  # bypass the large-image cap
            results.append(ev.evaluate(pair.name, "awgn", 0.1))
    finally:
        torch.set_num_threads(previous)
    a, b = results
    assert a.state.counts == b.state.counts
    for name in ("top1_delta", "agreement", "kl_mean"):
        assert a.estimates[name].value == pytest.approx(b.estimates[name].value, rel=1e-5, abs=1e-9)
