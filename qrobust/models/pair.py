"""ModelPair: an FP32 model, its quantized twin and everything needed to feed both the same pixels.

This module owns the pair registry; it never imports a model. The built-in pairs register themselves
in ``qrobust.models.zoo``, which ``qrobust.models`` imports (torchvision's ``models/_api.py`` pattern).
"""
from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from collections.abc import Callable

import torch
from torch import nn

from qrobust.errors import InvalidArgument, invalid
from qrobust.metrics.catalog import METRICS
from qrobust.quant.presets import QuantConfig
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
    config: QuantConfig  # the recipe of the twin (its kind and engine too)
    preprocess: Preprocess
    _: KW_ONLY
    num_classes: int
    dataset: str
    target_layer: str | None = None  # CAM layer of the FP32 model
    quantized_target_layer: str | None = None  # its name in the twin when it differs (FX fuses conv+ReLU)
    metadata: dict = field(default_factory=dict)
    # rebuild the twin with the recipe and calibration data, these FP32 module names kept in float (the
    # sensitivity pass uses it to try fixes); None when only the twin itself is known
    requantize: Callable[[tuple[str, ...]], nn.Module] | None = None
    twin_layer_given: bool = field(init=False, default=False)  # False: derived, refined by the first probe

    def _runtime_layer(self, name: str) -> str:
        """The runtime twin's tensor for the FP32 layer ``name``. An ONNX quantizer drops fused nodes (a ReLU
        folded into the conv's output range) and their module scopes; the FP32 graph still has them, so a
        torch FP32 is exported once to look the name up there (the export is kept as the twin's latency
        reference)."""
        from qrobust.runtimes import RuntimeModel, same_runtime_fp32
        from qrobust.runtimes.onnxrt import OnnxModel

        if isinstance(self.fp32, RuntimeModel):
            return self.quantized.layer_for(name, self.fp32)
        try:
            return self.quantized.layer_for(name)
        except InvalidArgument:
            if not isinstance(self.quantized, OnnxModel) or getattr(self.quantized, "fp32_reference", None) is not None:
                raise
        example = torch.zeros(2, self.preprocess.channels, *self.preprocess.resolution)
        return self.quantized.layer_for(name, same_runtime_fp32(self.fp32, self.quantized, example))

    @property
    def kind(self) -> str:
        """"fake" (simulated quantization, differentiable) or "int8" (real int8 kernels)."""
        return self.config.kind

    def __post_init__(self):
        from qrobust.runtimes import RuntimeModel

        if not isinstance(self.config, QuantConfig):
            raise invalid("config", self.config, "must be a QuantConfig (see qrobust.get_preset)")
        for role in ("fp32", "quantized"):
            model = getattr(self, role)
            if not isinstance(model, nn.Module):
                raise invalid(role, type(model).__name__, "must be an nn.Module (a torch.export program: pass "
                                                          "program.module(); an ONNX file: qrobust.load_onnx(path))")
            if not _inference_mode(model):  # a torch.export module: run as exported, its nodes as layers
                from qrobust.runtimes.exported import ExportedModel

                setattr(self, role, ExportedModel(model, source=f"{role} of {self.name}"))
        self.twin_layer_given = self.quantized_target_layer is not None
        if self.target_layer is not None and isinstance(self.fp32, RuntimeModel):
            self.fp32.layer_for(self.target_layer)  # a name the FP32 ONNX graph does not have fails here
        if self.quantized_target_layer is None and self.target_layer is not None:
            if isinstance(self.quantized, RuntimeModel):
                self.quantized_target_layer = self._runtime_layer(self.target_layer)
                self.twin_layer_given = True  # a runtime graph is matched by name, not by probing its modules
            else:
                from qrobust.quant.convert import twin_layer_name

                self.quantized_target_layer = twin_layer_name(self.fp32, self.quantized, self.target_layer)


def _inference_mode(model: nn.Module) -> bool:
    """``model.eval()``; False for a ``torch.export`` module, which refuses train/eval switches (it was
    traced in one mode and stays in it)."""
    try:
        model.eval()
    except NotImplementedError:
        return False
    return True


@dataclass(frozen=True)
class PairFacts:
    """What a pair can compute, known before it is built (None: unknown until then; the check then
    fails with the reason if the metric turns out not computable)."""

    cam: bool | None = None  # a CAM layer (or a layer-free CAM method)
    saliency: bool | None = None  # its dataset has ground-truth saliency maps
    boxes: bool | None = None  # its dataset has object bounding boxes (WSOL)
    classes: int | None = None
    dataset: str | None = None
    live: bool = True  # False: the twin is a device's recorded logits (qrobust.runtimes.recorded)
    layers: bool | None = None  # the twin's quantized layers take torch hooks (layer metrics)

    def cannot(self, metric: str) -> str | None:
        """Why the pair cannot compute ``metric``, or None (computable, or not known yet)."""
        info = METRICS[metric]
        if not self.live and (metric in ("quantizer_violations", "quantized_fraction") or info.needs_layers):
            return "its twin is a device's recorded logits: this needs the live twin"
        if info.needs_layers and self.layers is False:
            return ("its twin has no quantized torch layers to hook (a deployment runtime runs it, or nothing in it "
                    "is quantized): per-layer evidence needs a torch twin")
        if info.needs_cam and self.cam is False and not self.live:
            return ("its twin is a device's recorded logits and it names no target_layer whose activations the "
                    "runner recorded")
        if info.needs_cam and self.cam is False:
            return "it has no CAM target layer (set target_layer, or cam: {method: occlusion}, which needs none)"
        if info.needs_saliency and self.saliency is False:
            return f"its dataset {self.dataset!r} has no ground-truth saliency maps"
        if metric == "wsol_iou_delta" and self.boxes is False:
            return f"its dataset {self.dataset!r} has no bounding boxes"
        if metric == "top5_delta" and self.classes is not None and self.classes <= 5:
            return f"it has {self.classes} classes, so every label is in its top 5"
        return None


@dataclass(frozen=True)
class PairEntry:
    """A registered pair: how to build it, and what is known before building it (for collection)."""

    builder: Callable[[], ModelPair]
    preset: str | None = None
    group: str | None = None  # pairs of one group share an FP32 model: a gate builds them together
    facts: PairFacts = PairFacts()


PAIRS: Registry[PairEntry] = Registry("pair")


def register_pair(name: str, builder: Callable[[], ModelPair], *, tags=(), preset: str | None = None,
                  group: str | None = None, facts: PairFacts = PairFacts()) -> None:
    """Make ``builder`` (returning a ModelPair) available by ``name``, for the plugin and users.

    ``preset`` names the recipe before anything is built (bit-width sweeps need it); ``group`` names the
    FP32 model that several registered twins share, so a gate builds them together and runs that FP32
    model once per perturbed batch for all of them; ``facts`` say what it can compute (a CAM layer, its
    class count), so a file-wide tolerance it cannot judge is left out at collection, with the reason."""
    PAIRS.register(name, PairEntry(builder, preset, group, facts), tags)


def pair_entry(name: str) -> PairEntry:
    return PAIRS.get(name)


def pair_names(tag: str | None = None) -> list[str]:
    return PAIRS.names(tag)


def load_pair(name: str) -> ModelPair:
    """Build the pair registered as ``name`` (models are cached by their builders, not here)."""
    pair = pair_entry(name).builder()
    if pair.name != name:
        raise invalid("pair", name, f"builder returned a pair named {pair.name!r}")
    return pair
