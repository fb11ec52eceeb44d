"""The built-in pairs: LeNet-5/digits and EfficientNet-Lite0/photos with their quantized twins.

Each builder is registered by name here (torchvision's decorated-builder pattern); ``qrobust.models``
imports this module, so the registry in ``qrobust.models.pair`` never imports a model. Models are built
once per process and shared: every twin of one FP32 model shares its forwards.
"""
from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path

import torch
from torch import nn

from qrobust._files import sha256_file
from qrobust.data import builtin, load_dataset
from qrobust.models.checkpoints import tensor_fingerprint
from qrobust.models.lenet import DIGITS_PREPROCESS, LENET5_WEIGHTS, lenet5_digits
from qrobust.models.pair import ModelPair, PairFacts, Preprocess, pair_entry, register_pair
from qrobust.quant import PRESETS, QuantConfig, get_preset, quantize_model
from qrobust.quant.calibration import apply_shipped

DIGITS_CALIBRATION = 256  # the first 256 training digits: PTQ calibration never sees the test split
CALIBRATION = Path(__file__).parent / "calibration"  # shipped activation ranges (qrobust.quant.calibration)


def digits_calibration(batch_size: int = 64, count: int = DIGITS_CALIBRATION) -> list[torch.Tensor]:
    train = load_dataset("digits-train")
    return list(DIGITS_PREPROCESS.normalize(train.images[:count]).split(batch_size))


def calibration_source(config: QuantConfig, fp32: nn.Module, data: dict) -> dict:
    """What a built-in twin's calibration is a function of, by identity (its values move with the CPU):
    the recipe, the FP32 tensors and the calibration data."""
    recipe = {k: v for k, v in config.summary().items() if k != "source"}  # "source" is prose
    return {"recipe": recipe, "weights_fingerprint": tensor_fingerprint(fp32.state_dict()), "data": data}


def shipped_twin(name: str, twin: nn.Module, source: dict) -> tuple[nn.Module, dict]:
    """The twin with its shipped activation ranges (the same integer arithmetic on every CPU), and what
    the report records of them."""
    return twin, apply_shipped(twin, CALIBRATION / f"{name}.json", source)


def provenance(config: QuantConfig, fp32: nn.Module, weights: Path, calibration: dict) -> dict:
    """What the report records of a pair: the recipe, the weights (file sha256 and a fingerprint of the
    tensors, which does not change when the same weights are saved again) and the calibration data."""
    return {"recipe": config.summary(), "weights": {str(weights): sha256_file(weights)},
            "weights_fingerprint": tensor_fingerprint(fp32.state_dict()), "calibration": calibration}


# ---- LeNet-5 on scikit-learn's digits -----------------------------------------------------------------------
LENET_CALIBRATION_DATA = {"dataset": "digits-train", "samples": DIGITS_CALIBRATION}


def _lenet_twin(preset: str) -> nn.Module:
    """LeNet's twin for ``preset``, calibrated on this CPU (the shipped ranges replace it in the pair)."""
    return quantize_model(lenet5_digits(), PRESETS.get(preset), digits_calibration())


@cache
def _lenet_pair(preset: str) -> ModelPair:
    config = PRESETS.get(preset)
    fp32 = lenet5_digits()
    name = f"lenet5-digits-{preset.removeprefix('fake-')}"
    quantized, shipped = shipped_twin(name, _lenet_twin(preset), calibration_source(config, fp32, LENET_CALIBRATION_DATA))

    def requantize(keep: tuple[str, ...]) -> nn.Module:
        return quantize_model(fp32, replace(config, keep_fp32=config.keep_fp32 + tuple(keep)), digits_calibration())

    return ModelPair(
        name, fp32, quantized, config, DIGITS_PREPROCESS, num_classes=10, dataset="digits-test",
        # the second conv block's ReLU output (FX fuses conv+ReLU: the int8 graph calls it features.3)
        target_layer="features.4", requantize=requantize,
        metadata=provenance(config, fp32, LENET5_WEIGHTS, {**LENET_CALIBRATION_DATA, **shipped}),
    )


def _register_lenet(preset: str, *tags: str) -> None:
    name = f"lenet5-digits-{preset.removeprefix('fake-')}"
    register_pair(name, lambda: _lenet_pair(preset), tags=("builtin", "lenet5", *tags), preset=preset,
                  group="lenet5-digits", facts=PairFacts(cam=True, saliency=False, boxes=False, classes=10,
                                                                   dataset="digits-test"))


_register_lenet("int8-x86", "int8", "default")
for _preset in ("fake-w8a8", "fake-w16a16", "fake-table3.2", "fake-w4a8"):
    _register_lenet(_preset, "fake")
for _preset in PRESETS.names("sweep"):
    _register_lenet(_preset, "fake", "sweep")


# ---- EfficientNet-Lite0 with its ImageNet weights, on the bundled photos ----------------------------------
IMAGENET_PREPROCESS = Preprocess(resolution=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
LITE0_DATASET = "imagenet-photos"
STEM = ("_conv_stem", "_bn0", "_act0")

# name suffix -> (preset, layers kept in FP32). int8-tuned: 8-bit activations with ReLU6 folded into the
# fused kernels and the RGB stem block in FP32, on qnnpack, whose kernels compute exactly in integers on
# every x86-64 CPU (onednn and fbgemm only take 8-bit activations without overflow on CPUs with VNNI, so
# their results, and a gate's verdicts, would depend on the machine).
LITE0_TWINS = {"int8-x86": ("int8-x86", ()), "int8-onednn": ("int8-onednn", ()),
               "int8-tuned": ("int8-qnnpack-relu6", STEM), "w8a8": ("fake-w8a8", ())}


@cache
def lite0_fp32() -> nn.Module:
    from qrobust.models.efficientnet_lite import efficientnet_lite0

    return efficientnet_lite0()


def _lite0_calibration() -> tuple[torch.Tensor, ...]:
    photos = builtin.calibration_photos(IMAGENET_PREPROCESS.resolution[0])
    return IMAGENET_PREPROCESS.normalize(photos).split(16)


def _lite0_calibration_data(batches: tuple[torch.Tensor, ...]) -> dict:
    return {"dataset": "calibration-photos", "samples": sum(len(b) for b in batches)}


def _lite0_twin(suffix: str) -> nn.Module:
    """EfficientNet-Lite0's twin ``suffix`` calibrated on this CPU (the shipped ranges replace it in the pair)."""
    preset, keep = LITE0_TWINS[suffix]
    return quantize_model(lite0_fp32(), get_preset(preset, keep_fp32=keep), _lite0_calibration())


@cache
def _lite0_pair(suffix: str) -> ModelPair:
    from qrobust.models.efficientnet_lite import lite0_weights_path

    preset, keep = LITE0_TWINS[suffix]
    config = get_preset(preset, keep_fp32=keep)
    fp32 = lite0_fp32()
    batches = _lite0_calibration()
    quantized, shipped = shipped_twin(f"efficientnet-lite0-{suffix}", _lite0_twin(suffix),
                                      calibration_source(config, fp32, _lite0_calibration_data(batches)))

    def requantize(keep: tuple[str, ...]) -> nn.Module:
        return quantize_model(fp32, replace(config, keep_fp32=config.keep_fp32 + tuple(keep)), batches)

    return ModelPair(
        f"efficientnet-lite0-{suffix}", fp32, quantized, config, IMAGENET_PREPROCESS,
        num_classes=1000, dataset=LITE0_DATASET,
        # the head's ReLU6 (in an int8 twin that folds ReLU6, the fused head conv: see quant.twin_layer_name)
        target_layer="_act1", requantize=requantize,
        metadata=provenance(config, fp32, lite0_weights_path(),
                            {**_lite0_calibration_data(batches), **shipped}),
    )


def calibrated_here(name: str) -> tuple[nn.Module, dict]:
    """A built-in pair's twin as calibrated on this CPU, with its calibration source
    (tools/calibrate_builtins.py ships its ranges)."""
    if name.startswith("lenet5-digits-"):
        preset = pair_entry(name).preset
        return _lenet_twin(preset), calibration_source(PRESETS.get(preset), lenet5_digits(), LENET_CALIBRATION_DATA)
    suffix = name.removeprefix("efficientnet-lite0-")
    preset, keep = LITE0_TWINS[suffix]
    config = get_preset(preset, keep_fp32=keep)
    return _lite0_twin(suffix), calibration_source(config, lite0_fp32(), _lite0_calibration_data(_lite0_calibration()))


for _suffix, (_preset, _keep) in LITE0_TWINS.items():
    register_pair(f"efficientnet-lite0-{_suffix}", lambda s=_suffix: _lite0_pair(s),
                  tags=("builtin", "efficientnet-lite0", PRESETS.get(_preset).kind), preset=_preset,
                  group="efficientnet-lite0",
                  facts=PairFacts(cam=True, saliency=False, boxes=False, classes=1000, dataset=LITE0_DATASET))
