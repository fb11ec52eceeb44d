"""Model-level quantization: fake-quant wrapping, real int8 conversion, presets and their errors."""
import pytest
import torch
from torch import nn

from qrobust.errors import InvalidArgument
from qrobust.quant import (
    PRESETS, FakeQuantLayer, QuantConfig, TensorSpec, convert_int8, fake_quantize_model, get_preset,
    quantize_model, quantized_module_names,
)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def calibration(n=4):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 12, 12, generator=gen) for _ in range(n)]


def test_fake_quant_returns_a_new_module_and_leaves_fp32_untouched():
    model = small_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fq = fake_quantize_model(model, get_preset("fake-w8a8"), calibration())
    assert fq is not model
    assert not any(isinstance(m, FakeQuantLayer) for m in model.modules())
    assert sum(isinstance(m, FakeQuantLayer) for m in fq.modules()) == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_fake_quant_weights_match_torch_per_channel_fake_quant():
    model = small_net()
    fq = fake_quantize_model(model, get_preset("fake-w8a8"), calibration())
    layer = fq[0]
    w = model[0].weight.detach()
    amax = w.abs().flatten(1).max(1).values
    scale = amax / 127.5
    theirs = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(8, dtype=torch.int32), 0, -128, 127)
    from qrobust.quant.quantizer import fake_quantize
    diff = (fake_quantize(w, layer.weight_qparams) - theirs).abs()
    # torch rounds x * (1/s), we round x / s: they may differ by one step at an exact .5 tie, nowhere else
    assert (diff > 1e-6).sum() <= 1 and diff.max() <= scale.max() * 1.001


@pytest.mark.parametrize("preset,wbits", [("fake-w8a8", 8), ("fake-w4a8", 4), ("fake-asym3", 3)])
def test_weights_take_at_most_two_to_the_bits_values_per_channel(preset, wbits):
    fq = fake_quantize_model(small_net(), get_preset(preset), calibration())
    from qrobust.quant.quantizer import fake_quantize
    for layer in (m for m in fq.modules() if isinstance(m, FakeQuantLayer)):
        wq = fake_quantize(layer.layer.weight, layer.weight_qparams).detach()
        for channel in wq:
            assert channel.unique().numel() <= 2**wbits


def test_error_shrinks_with_bits_and_w16a16_is_near_fp32():
    model = small_net()
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    ref = model(x)
    errors = {p: (quantize_model(model, get_preset(p), calibration())(x) - ref).abs().max().item()
              for p in ("fake-w16a16", "fake-w8a8", "fake-w4a8")}
    assert errors["fake-w16a16"] < 1e-3
    assert errors["fake-w16a16"] < errors["fake-w8a8"] < errors["fake-w4a8"]


def test_fake_quant_model_stays_differentiable():
    fq = fake_quantize_model(small_net(), get_preset("fake-w8a8"), calibration())
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    fq(x)[:, 1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_weight_and_activation_bits_are_independent():
    config = get_preset("fake-w4a8")
    assert config.bits == (4, 8)
    fq = fake_quantize_model(small_net(), config, calibration())
    layer = fq[0]
    assert (layer.weight_qparams.q_min, layer.weight_qparams.q_max) == (-8, 7)
    assert (layer.act_qparams.q_min, layer.act_qparams.q_max) == (0, 255)


@pytest.mark.parametrize("engine", ["x86", "fbgemm", "qnnpack"])
def test_int8_conversion_runs_real_quantized_kernels(engine):
    model = small_net()
    int8 = convert_int8(model, get_preset(f"int8-{engine}"), calibration())
    names = quantized_module_names(int8)
    assert len([n for n in names if not n.endswith("_packed_params")]) == 3
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) and type(m).__module__.startswith("torch.nn")
                   for m in int8.modules())
    x = calibration(1)[0]
    out = int8(x)
    assert out.dtype == torch.float32
    assert (out - model(x)).abs().max() < 0.1 * model(x).abs().max()


def test_keep_fp32_leaves_named_layers_in_float():
    config = get_preset("int8-x86", keep_fp32=("6",))
    int8 = convert_int8(small_net(), config, calibration())
    assert any(type(m) is nn.Linear for m in int8.modules())
    fq = fake_quantize_model(small_net(), get_preset("fake-w8a8", keep_fp32=("6",)), calibration())
    assert type(fq[6]) is nn.Linear


def test_unavailable_engine_lists_the_available_ones():
    config = QuantConfig("bad", "int8", get_preset("int8-x86").weight, get_preset("int8-x86").activation,
                         engine="tpu-magic")
    with pytest.raises(InvalidArgument, match=r"engine='tpu-magic'.*available: .*x86"):
        convert_int8(small_net(), config, calibration())


@pytest.mark.parametrize("preset", ["fake-w8a8", "int8-x86"])
def test_empty_calibration_is_a_clear_error(preset):
    with pytest.raises(InvalidArgument, match="no calibration batches"):
        quantize_model(small_net(), get_preset(preset), [])


@pytest.mark.parametrize("preset", ["fake-w8a8", "int8-x86"])
def test_model_without_conv_or_linear_is_a_clear_error(preset):
    with pytest.raises(InvalidArgument, match="no Conv/Linear layer"):
        quantize_model(nn.Sequential(nn.ReLU(), nn.Flatten()), get_preset(preset), calibration())


def test_unknown_keep_fp32_name_and_unknown_preset_are_clear_errors():
    with pytest.raises(InvalidArgument, match="keep_fp32='nope'"):
        fake_quantize_model(small_net(), get_preset("fake-w8a8", keep_fp32=("nope",)), calibration())
    with pytest.raises(InvalidArgument, match="did you mean 'fake-w8a8'"):
        get_preset("fake-w8a9")


def test_calibration_nan_is_refused():
    bad = calibration(1)[0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidArgument, match="finite"):
        fake_quantize_model(small_net(), get_preset("fake-w8a8"), [bad])


def test_int8_configs_are_validated():
    with pytest.raises(InvalidArgument, match="8-bit signed symmetric weights"):
        QuantConfig("x", "int8", TensorSpec(bits=4, symmetric=True, signed=True), TensorSpec(), engine="x86")
    with pytest.raises(InvalidArgument, match="kind='float'"):
        QuantConfig("x", "float", TensorSpec(), TensorSpec())


def test_presets_cover_the_seed_recipes():
    table = get_preset("fake-table3.2")
    assert table.weight.per_channel and table.weight.symmetric and table.weight.observer == "minmax"
    assert not table.activation.per_channel and not table.activation.symmetric
    assert table.activation.observer == "histogram" and table.bits == (8, 8)
    assert get_preset("fake-w16a16").bits == (16, 16)
    assert [PRESETS.get(n).bits for n in PRESETS.names("sweep")] == [(b, b) for b in range(1, 9)]


class SamePaddedConv(nn.Conv2d):
    """A conv subclass with its own forward (TensorFlow-style asymmetric 'same' padding)."""

    def forward(self, x):
        return super().forward(torch.nn.functional.pad(x, (0, 1, 0, 1)))


def test_fake_quant_keeps_a_conv_subclass_forward():
    torch.manual_seed(0)
    model = nn.Sequential(SamePaddedConv(3, 4, 2), nn.Flatten(), nn.Linear(4 * 12 * 12, 3)).eval()
    fq = fake_quantize_model(model, get_preset("fake-w16a16"), calibration())
    x = calibration(1)[0]
    assert fq(x).shape == model(x).shape
    assert (fq(x) - model(x)).abs().max() < 1e-3
