"""The sensitivity pass finds the layer that breaks a twin and measures the fix."""
import dataclasses

import torch
from torch import nn

from helpers import PRE, synthetic_set
from qrobust.gate.engine import Evaluator
from qrobust.gate.sensitivity import block_of, describe, suggest_keep_fp32, with_twin
from qrobust.models import ModelPair
from qrobust.quant import get_preset, quantize_model
from qrobust.quant.diagnosis import layer_errors
from qrobust.quant.quantizer import make_observer


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def broken_twin(fp32, keep=()):
    """fake-w8a8, except the middle conv's weights on a 1-bit grid (unless it is kept in FP32)."""
    config = get_preset("fake-w8a8", keep_fp32=tuple(keep))
    twin = quantize_model(fp32, config, [synthetic_set().images[:32] * 4 - 2])
    if "2" not in keep:
        layer = twin[2].layer
        observer = make_observer("minmax", 1, False, True, None)
        observer.observe(layer.parametrizations.weight.original)
        layer.parametrizations.weight[0].qparams = observer.qparams()
    return twin


def test_blocks_take_the_batchnorm_and_activation_with_the_layer():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 4, 3))
    assert block_of(net, "0", "1") == ("0", "1", "2")  # int8 fused conv+BN, then its ReLU6
    assert block_of(net, "3", "3") == ("3",) and block_of(net, "missing", "x") == ("missing",)


def test_the_broken_layer_is_found_and_keeping_it_in_fp32_recovers_the_metric():
    fp32 = model()
    pair = ModelPair("p", fp32, broken_twin(fp32), get_preset("fake-w8a8"), PRE, num_classes=4, dataset="synthetic",
                     requantize=lambda keep: broken_twin(fp32, keep))
    data = {"synthetic": synthetic_set()}
    before = Evaluator([pair], datasets=data, replicates=50).evaluate("p", "awgn", 0).metric("kl_mean").value
    x = PRE.normalize(synthetic_set().images[:16])
    rows = [r.as_dict() for r in layer_errors(fp32, pair.quantized, x)]

    def evaluate(twin):
        trial = Evaluator([with_twin(pair, twin)], datasets=data, replicates=50)
        return trial.evaluate("p", "awgn", 0).metric("kl_mean").value

    tolerance = before / 4  # the broken layer costs most of the KL; the others add little
    result = suggest_keep_fp32(pair, evaluate, "kl_mean", tolerance, before, rows, top=3)
    assert result["suggestion"] == ["2", "3"] and result["passes"] and result["value"] < tolerance < before
    assert describe(result, "kl_mean").startswith("fix to try: keep_fp32 ['2', '3'] -> kl_mean ")
    assert suggest_keep_fp32(dataclasses.replace(pair, requantize=None), evaluate, "kl_mean", tolerance, before, rows) == \
        {"error": "the pair cannot be requantized (register it with requantize=...)"}
