"""Built-in models and weights: LeNet-5 trained on scikit-learn's digits, with its quantized twins.

Training is deterministic (fixed split, seeds, one thread) and cached in the user cache directory
(``$QROBUST_CACHE``, else ``$XDG_CACHE_HOME/qrobust``, else ``~/.cache/qrobust``) under a hash of the
code and settings that produce the weights, so the first run trains (a few seconds) and later runs load.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.data import DATASETS, ImageSet, calibration_photos, load_dataset, photo_views_set
from qrobust.pairs import ModelPair, Preprocess, register_pair, sha256_file
from qrobust.quantize import PRESETS, QuantConfig, get_preset, quantize_model


class LeNet5(nn.Module):
    """LeNet-5 as in seed 003: two conv and three fully connected layers, ReLU and max pooling."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


DIGITS_PREPROCESS = Preprocess(resolution=(32, 32), mean=(0.5,), std=(0.5,))
LENET_TRAINING = {"epochs": 30, "batch_size": 32, "lr": 1e-3, "seed": 0}


def cache_dir() -> Path:
    root = os.environ.get("QROBUST_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qrobust"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _training_key() -> str:
    """Hash of everything that determines the trained weights."""
    parts = [inspect.getsource(LeNet5), inspect.getsource(_train_lenet5), json.dumps(LENET_TRAINING, sort_keys=True),
             json.dumps(DIGITS_PREPROCESS.__dict__, default=list), torch.__version__.split("+")[0]]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _train_lenet5() -> dict:
    settings = LENET_TRAINING
    train = load_dataset("digits-train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible reductions
    try:
        torch.manual_seed(settings["seed"])
        model = LeNet5()
        opt = torch.optim.Adam(model.parameters(), lr=settings["lr"])
        inputs = DIGITS_PREPROCESS.normalize(train.images)
        order_gen = torch.Generator().manual_seed(settings["seed"])
        model.train()
        for _ in range(settings["epochs"]):
            for idx in torch.randperm(len(train), generator=order_gen).split(settings["batch_size"]):
                opt.zero_grad()
                F.cross_entropy(model(inputs[idx]), train.labels[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval().state_dict()


def _save_atomic(state: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def lenet5_weights_path() -> Path:
    """Path of the cached LeNet-5/digits weights, training them first if absent."""
    path = cache_dir() / f"lenet5-digits-{_training_key()}.pt"
    if not path.exists():
        _save_atomic(_train_lenet5(), path)
    return path


@lru_cache(maxsize=None)
def lenet5_digits() -> LeNet5:
    """The trained FP32 LeNet-5 (one shared instance, so every twin shares its forwards)."""
    model = LeNet5()
    model.load_state_dict(torch.load(lenet5_weights_path(), map_location="cpu", weights_only=True))
    return model.eval()


def digits_calibration(batch_size: int = 64, count: int = 256) -> list[torch.Tensor]:
    """The first ``count`` training images, normalized: PTQ calibration never sees the test split."""
    train = load_dataset("digits-train")
    return list(DIGITS_PREPROCESS.normalize(train.images[:count]).split(batch_size))


def _pair_metadata(config: QuantConfig, weights: Path) -> dict:
    """What the report's environment records of a built-in pair: engine, bit widths, weights' sha256."""
    return {"engine": config.engine, "bits": {"weight": config.weight.bits, "activation": config.activation.bits},
            "weights": {str(weights): sha256_file(weights)}}


@lru_cache(maxsize=None)
def _lenet_pair(preset: str) -> ModelPair:
    config = PRESETS.get(preset)
    fp32 = lenet5_digits()
    quantized = quantize_model(fp32, config, digits_calibration())
    weights = lenet5_weights_path()
    name = f"lenet5-digits-{preset.removeprefix('fake-')}"
    return ModelPair(
        name=name, fp32=fp32, quantized=quantized, kind=config.kind, config=config,
        preprocess=DIGITS_PREPROCESS, num_classes=10, dataset="digits-test",
        # the second conv block's ReLU output (FX fuses conv+ReLU: the int8 graph calls it features.3)
        target_layer="features.4",
        metadata=_pair_metadata(config, weights),
    )


def _register_lenet(preset: str, *tags: str) -> None:
    name = f"lenet5-digits-{preset.removeprefix('fake-')}"
    register_pair(name, lambda: _lenet_pair(preset), tags=("builtin", "lenet5", *tags), preset=preset)


_register_lenet("int8-x86", "int8", "default")
for _preset in ("fake-w8a8", "fake-w16a16", "fake-table3.2", "fake-w4a8"):
    _register_lenet(_preset, "fake")
for _preset in PRESETS.names("sweep"):
    _register_lenet(_preset, "fake", "sweep")


# ---- EfficientNet-Lite0 with its ImageNet weights, on the bundled photos ------------------------------
IMAGENET_PREPROCESS = Preprocess(resolution=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
LITE0_DATASET = "imagenet-photos"


@lru_cache(maxsize=None)
def lite0_fp32() -> nn.Module:
    from qrobust.efficientnet_lite import efficientnet_lite0

    return efficientnet_lite0()


@lru_cache(maxsize=None)
def imagenet_photos() -> ImageSet:
    """49 views of 7 photos, labelled with the FP32 EfficientNet-Lite0's top-1 class.

    There is no ImageNet ground truth offline, so accuracy here means agreement with the FP32 model: the
    quantized twin's top-1 delta is the share of views whose class it changes.
    """
    pixels, ids, groups = photo_views_set(IMAGENET_PREPROCESS.resolution[0])
    with torch.inference_mode():
        labels = lite0_fp32()(IMAGENET_PREPROCESS.normalize(pixels)).argmax(1)
    return ImageSet(LITE0_DATASET, pixels, labels, ids, groups, num_classes=1000)


DATASETS.register(LITE0_DATASET, imagenet_photos, tags=("builtin", "imagenet"))

# name suffix -> (preset, layers kept in FP32): PyTorch's default x86 recipe, and the recipe that holds
# up (8-bit activations on onednn, ReLU6 folded into the fused kernels, the RGB stem block in FP32)
LITE0_TWINS = {"int8-x86": ("int8-x86", ()), "int8-onednn": ("int8-onednn", ()),
               "int8-tuned": ("int8-onednn-relu6", ("_conv_stem", "_bn0", "_act0")), "w8a8": ("fake-w8a8", ())}


@lru_cache(maxsize=None)
def _lite0_pair(suffix: str) -> ModelPair:
    from qrobust.efficientnet_lite import lite0_weights_path

    preset, keep = LITE0_TWINS[suffix]
    config = get_preset(preset, keep_fp32=keep)
    fp32 = lite0_fp32()
    calibration = IMAGENET_PREPROCESS.normalize(calibration_photos(IMAGENET_PREPROCESS.resolution[0])).split(16)
    quantized = quantize_model(fp32, config, calibration)
    weights = lite0_weights_path()
    return ModelPair(
        name=f"efficientnet-lite0-{suffix}", fp32=fp32, quantized=quantized, kind=config.kind, config=config,
        preprocess=IMAGENET_PREPROCESS, num_classes=1000, dataset=LITE0_DATASET,
        # the head's ReLU6 (in an int8 twin that folds ReLU6, the fused head conv: see cam.int8_layer_name)
        target_layer="_act1",
        metadata=_pair_metadata(config, weights),
    )


for _suffix, (_preset, _keep) in LITE0_TWINS.items():
    register_pair(f"efficientnet-lite0-{_suffix}", lambda s=_suffix: _lite0_pair(s),
                  tags=("builtin", "efficientnet-lite0", PRESETS.get(_preset).kind), preset=_preset)


# ---- torchvision architectures named by the seed papers ---------------------------------------------------
# name -> default CAM target layer (the last convolutional block's output)
TORCHVISION_ARCHS = {
    "vgg16": "features.29", "resnet18": "layer4", "resnet50": "layer4", "densenet121": "features.norm5",
    "mobilenet_v2": "features.18", "mobilenet_v3_large": "features.16", "squeezenet1_0": "features.12",
    "squeezenet1_1": "features.12", "efficientnet_b0": "features.8", "shufflenet_v2_x1_0": "conv5",
}


def hub_cache_file(arch: str) -> Path:
    """Where torchvision would have cached ``arch``'s default ImageNet weights (never downloaded here)."""
    import torchvision

    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def build_arch(arch: str, num_classes: int = 1000, weights: str | None = None, trust: bool = False) -> nn.Module:
    """A torchvision architecture by name, with weights from ``weights``: a local checkpoint path, "hub"
    (torchvision's file, only if already in the torch hub cache) or "random" (an explicit opt-in for
    latency and pipeline checks only). No weights at all is an error: a gate never runs a random model
    by accident."""
    import torchvision

    from qrobust.errors import invalid
    from qrobust.loading import load_checkpoint

    if arch not in TORCHVISION_ARCHS:
        raise invalid("arch", arch, f"unknown architecture (known: {', '.join(TORCHVISION_ARCHS)})")
    if weights is None:
        raise invalid("weights", None, f"{arch} needs weights: a checkpoint path, 'hub' (torch hub cache) or "
                                       "'random' (explicit opt-in, for latency and pipeline checks only)")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if weights == "random":
        return model.eval()
    if weights == "hub":
        path = hub_cache_file(arch)
        if not path.is_file():
            raise invalid("weights", "hub", f"{path} is not in the torch hub cache and qrobust never downloads; "
                                            "put the file there or give a checkpoint path")
        if num_classes != 1000:
            raise invalid("num_classes", num_classes, "torchvision's ImageNet weights have 1000 classes")
    else:
        path = Path(weights)
    state = load_checkpoint(path, trust=trust)
    if isinstance(state, nn.Module):
        return state.eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise invalid("weights", str(path), f"does not fit {arch} with {num_classes} classes "
                                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()
