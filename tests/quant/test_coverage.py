"""Quantization coverage: the share of multiply-accumulates a twin computes quantized."""
import torch
from torch import nn

from helpers import small_net
from qrobust.quant import get_preset, quantize_model
from qrobust.quant.coverage import mac_coverage, quantized_layer_names


def test_macs_are_counted_per_layer_and_a_full_twin_covers_everything():
    model, x = small_net(), torch.rand(4, 3, 16, 16)
    twin = quantize_model(model, get_preset("int8-x86"), [x])
    coverage = mac_coverage(model, twin, x)
    macs = {r["layer"]: r["macs"] for r in coverage["layers"]}
    assert macs == {"0": 3 * 9 * 8 * 16 * 16, "2": 8 * 9 * 8 * 16 * 16, "6": 32 * 5}
    assert coverage["fraction"] == 1.0 and coverage["quantized"] == coverage["total"] == 3


def test_layers_left_in_float_lower_the_fraction():
    model, x = small_net(), torch.rand(4, 3, 16, 16)
    keep = quantize_model(model, get_preset("int8-x86", keep_fp32=("2",)), [x])
    coverage = mac_coverage(model, keep, x)
    assert coverage["fraction"] == (3 * 9 * 8 + 32 * 5 / 256) / (3 * 9 * 8 + 8 * 9 * 8 + 32 * 5 / 256)
    # dynamic quantization of the Linear layers only: the convs (almost all the work) stay in float
    dynamic = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert quantized_layer_names(dynamic) == {"6"} and mac_coverage(model, dynamic, x)["fraction"] < 0.01
