"""ModelPair: an FP32 model, its quantized twin and everything needed to feed both the same pixels."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qrobust.errors import invalid
from qrobust.quantize import QuantConfig
from qrobust.registry import Registry


@dataclass(frozen=True)
class Preprocess:
    """Pixels in [0, 1] at ``resolution`` -> model input; perturbations act before ``normalize``."""

    resolution: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise invalid("std", self.std, "needs one positive entry per mean entry")

    @property
    def channels(self) -> int:
        return len(self.mean)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std


@dataclass(eq=False)
class ModelPair:
    """An FP32 model and its quantized twin. Pairs sharing one ``fp32`` object share its forwards."""

    name: str
    fp32: nn.Module
    quantized: nn.Module
    kind: str  # "fake" or "int8"
    config: QuantConfig
    preprocess: Preprocess
    num_classes: int
    dataset: str
    target_layer: str | None = None  # CAM layer of the FP32 model
    quantized_target_layer: str | None = None  # its name in the twin when it differs (FX fuses conv+ReLU)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("fake", "int8"):
            raise invalid("kind", self.kind, "must be 'fake' or 'int8'")
        self.fp32.eval()
        self.quantized.eval()
        if self.quantized_target_layer is None and self.target_layer is not None:
            if self.kind == "int8":
                from qrobust.cam import int8_layer_name

                self.quantized_target_layer = int8_layer_name(self.fp32, self.quantized, self.target_layer)
            else:
                self.quantized_target_layer = self.target_layer


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class PairEntry:
    """A registered pair: how to build it, and its preset (known before building, for collection)."""

    builder: Callable[[], ModelPair]
    preset: str | None = None


PAIRS: Registry[PairEntry] = Registry("pair")


def register_pair(name: str, builder: Callable[[], ModelPair], tags=(), preset: str | None = None) -> None:
    """Make ``builder`` (returning a ModelPair) available by ``name``, for the plugin and users."""
    PAIRS.register(name, PairEntry(builder, preset), tags)


def pair_entry(name: str) -> PairEntry:
    _ensure_builtins()
    return PAIRS.get(name)


def _ensure_builtins() -> None:
    import qrobust.zoo  # noqa: F401  (registers the built-in pairs on import)


def pair_names(tag: str | None = None) -> list[str]:
    _ensure_builtins()
    return PAIRS.names(tag)


def load_pair(name: str) -> ModelPair:
    """Build the pair registered as ``name`` (models are cached by their builders, not here)."""
    pair = pair_entry(name).builder()
    if pair.name != name:
        raise invalid("pair", name, f"builder returned a pair named {pair.name!r}")
    return pair
