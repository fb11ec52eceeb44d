"""torchvision classification architectures by name, with weights only from local files.

Used by pairs declared in a thresholds file (``arch: resnet18``). No weights is an error: a gate never
runs a random model by accident; ``weights: random`` is an explicit opt-in for latency and pipeline checks.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qrobust.errors import invalid
from qrobust.models.checkpoints import load_checkpoint
from qrobust.registry import did_you_mean

# The seed papers' architectures -> default CAM target layer (the last convolutional block's output);
# any other torchvision classification architecture works too, with target_layer set for CAM checks.
TORCHVISION_ARCHS = {
    "vgg16": "features.29", "resnet18": "layer4", "resnet50": "layer4", "densenet121": "features.norm5",
    "mobilenet_v2": "features.18", "mobilenet_v3_large": "features.16", "squeezenet1_0": "features.12",
    "squeezenet1_1": "features.12", "efficientnet_b0": "features.8", "shufflenet_v2_x1_0": "conv5",
}


def classification_archs() -> list[str]:
    """Every torchvision classification architecture by name (``torchvision.models.list_models``)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def hub_cache_file(arch: str) -> Path:
    """Where torchvision would have cached ``arch``'s default ImageNet weights (never downloaded here)."""
    import torchvision

    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def build_arch(arch: str, num_classes: int = 1000, weights: str | None = None, trust: bool = False) -> nn.Module:
    """A torchvision architecture by name, with weights from ``weights``: a local checkpoint path, "hub"
    (torchvision's file, only if already in the torch hub cache) or "random"."""
    import torchvision

    if arch not in classification_archs():
        raise invalid("arch", arch, f"unknown architecture{did_you_mean(arch, classification_archs())} "
                                    "(torchvision.models.list_models(module=torchvision.models) lists them)")
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
