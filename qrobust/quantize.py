"""Model-level quantization: fake-quant wrapping at any bit width, real int8 conversion, named presets.

Two kinds of quantized twin come out of here, both new modules (the FP32 model is never touched):

* ``fake``: every Conv/Linear gets fake-quantized weights (fixed qparams from the trained weights) and
  a fake-quantized input activation (qparams calibrated on data). It stays differentiable (straight-
  through estimator), so gradient CAMs and 1..16-bit sweeps work. Biases stay FP32 (PyTorch keeps them
  at int32 with scale s_w * s_x, a negligible error at these bit widths).
* ``int8``: real int8 kernels from PyTorch's FX graph-mode post-training quantization on one of the CPU
  engines. ``torch.ao.quantization`` is deprecated, so every use of it lives in this module.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, replace
from typing import Iterable

import torch
from torch import nn

from qrobust.errors import UnsupportedError, invalid
from qrobust.quantizer import QParams, fake_quantize, make_observer, quant_range
from qrobust.registry import Registry

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor kind (weights or activations) is quantized."""

    bits: int = 8
    symmetric: bool = False
    signed: bool = False
    per_channel: bool = False
    observer: str = "minmax"

    def __post_init__(self):
        quant_range(self.bits, self.signed)
        if self.per_channel and self.observer == "histogram":
            raise invalid("observer", self.observer, "the histogram observer is per-tensor only")

    def describe(self) -> str:
        return (f"{self.bits}-bit {'per-channel' if self.per_channel else 'per-tensor'} "
                f"{'symmetric' if self.symmetric else 'affine'} {self.observer}")


@dataclass(frozen=True)
class QuantConfig:
    """A named recipe for the quantized twin of a model."""

    name: str
    kind: str  # "fake" or "int8"
    weight: TensorSpec
    activation: TensorSpec
    engine: str | None = None
    keep_fp32: tuple[str, ...] = ()
    fold_relu6: bool = False  # int8: clip Conv(+BN)+ReLU6 through the fused kernel's output range
    source: str = ""

    def __post_init__(self):
        if self.kind not in ("fake", "int8"):
            raise invalid("kind", self.kind, "must be 'fake' or 'int8'")
        if self.kind == "int8":
            if self.engine is None:
                raise invalid("engine", None, "an int8 config needs a quantized engine")
            if self.weight.bits != 8 or not self.weight.signed or not self.weight.symmetric:
                raise invalid("weight", self.weight, "int8 kernels take 8-bit signed symmetric weights")
            if self.activation.bits > 8 or self.activation.signed:
                raise invalid("activation", self.activation, "int8 kernels take unsigned activations of <= 8 bits")
        elif self.fold_relu6:
            raise invalid("fold_relu6", True, "only applies to int8 conversion")

    @property
    def bits(self) -> tuple[int, int]:
        """(weight bits, activation bits)."""
        return self.weight.bits, self.activation.bits

    def summary(self) -> dict:
        return {"name": self.name, "kind": self.kind, "engine": self.engine,
                "weight": self.weight.describe(), "activation": self.activation.describe(),
                "keep_fp32": list(self.keep_fp32), "fold_relu6": self.fold_relu6, "source": self.source}


def _calibration_batches(calibration: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    count = 0
    for batch in calibration:
        if not isinstance(batch, torch.Tensor) or batch.numel() == 0:
            raise invalid("calibration", type(batch).__name__, "must yield non-empty tensors")
        count += 1
        yield batch
    if count == 0:
        raise invalid("calibration", "<empty>", "no calibration batches; quantization ranges need data")


def _quantizable_layers(model: nn.Module, keep_fp32: tuple[str, ...]) -> list[str]:
    names = dict(model.named_modules())
    for name in keep_fp32:
        if name not in names:
            raise invalid("keep_fp32", name, "no module of that name in the model")
    layers = [n for n, m in names.items() if isinstance(m, QUANTIZABLE) and n not in keep_fp32]
    if not layers:
        raise invalid("model", type(model).__name__, "has no Conv/Linear layer to quantize")
    return layers


class _FakeQuantWeight(nn.Module):
    """Parametrization: the layer sees D(Q(w)) wherever it reads its weight (STE gradient to w)."""

    def __init__(self, qparams: QParams):
        super().__init__()
        self.qparams = qparams

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, self.qparams)


class FakeQuantLayer(nn.Module):
    """A Conv/Linear whose weight and input activation are fake-quantized (simulated integer math).

    The weight is replaced through ``torch.nn.utils.parametrize``, so the layer's own forward runs
    unchanged (subclasses with custom padding, e.g. TensorFlow-style "same" convolutions, keep it).
    """

    def __init__(self, layer: nn.Module, weight: TensorSpec, activation: TensorSpec):
        super().__init__()
        from torch.nn.utils import parametrize

        w_obs = make_observer(weight.observer, weight.bits, weight.symmetric, weight.signed,
                              0 if weight.per_channel else None)
        w_obs.observe(layer.weight)
        self.weight_qparams: QParams = w_obs.qparams()
        parametrize.register_parametrization(layer, "weight", _FakeQuantWeight(self.weight_qparams))
        self.layer = layer
        self.act_observer = make_observer(activation.observer, activation.bits, activation.symmetric,
                                          activation.signed, None)
        self.act_qparams: QParams | None = None
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.act_observer.observe(x)
        elif self.act_qparams is None:
            raise UnsupportedError("fake-quant layer used before calibration")
        else:
            x = fake_quantize(x, self.act_qparams)
        return self.layer(x)


def fake_quantize_model(model: nn.Module, config: QuantConfig, calibration: Iterable[torch.Tensor]) -> nn.Module:
    """A calibrated fake-quant copy of ``model`` (Conv/Linear weights and inputs quantized)."""
    if config.kind != "fake":
        raise invalid("config", config.name, "is not a fake-quant config")
    fq = copy.deepcopy(model).eval()
    for name in _quantizable_layers(fq, config.keep_fp32):
        parent_name, _, child = name.rpartition(".")
        parent = fq.get_submodule(parent_name)
        setattr(parent, child, FakeQuantLayer(getattr(parent, child), config.weight, config.activation))
    wrapped = [m for m in fq.modules() if isinstance(m, FakeQuantLayer)]
    for m in wrapped:
        m.calibrating = True
    with torch.no_grad():
        for batch in _calibration_batches(calibration):
            fq(batch)
    for m in wrapped:
        m.calibrating = False
        m.act_qparams = m.act_observer.qparams()
    return fq


class Int8Model(nn.Module):
    """A converted int8 graph and the engine its packed weights were built for.

    The quantized engine is a process-wide PyTorch setting; the wrapper re-selects it on every call so
    pairs converted for different engines can live in one session.
    """

    def __init__(self, graph: nn.Module, engine: str):
        super().__init__()
        self.graph = graph
        self.engine = engine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.backends.quantized.engine != self.engine:
            torch.backends.quantized.engine = self.engine
        return self.graph(x)


def check_engine(engine: str) -> str:
    supported = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if engine not in supported:
        raise invalid("engine", engine, f"not available in this PyTorch build (available: {', '.join(supported)})")
    return engine


@contextlib.contextmanager
def _engine(engine: str):
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _torch_qconfig(config: QuantConfig):
    from torch.ao.quantization import QConfig, observer as ob

    def spec_observer(spec: TensorSpec, dtype):
        q_min, q_max = quant_range(spec.bits, spec.signed)
        if spec.per_channel:
            cls = ob.PerChannelMinMaxObserver if spec.observer == "minmax" else ob.MovingAveragePerChannelMinMaxObserver
            scheme = torch.per_channel_symmetric if spec.symmetric else torch.per_channel_affine
        else:
            cls = {"minmax": ob.MinMaxObserver, "moving_average": ob.MovingAverageMinMaxObserver,
                   "histogram": ob.HistogramObserver}[spec.observer]
            scheme = torch.per_tensor_symmetric if spec.symmetric else torch.per_tensor_affine
        return cls.with_args(dtype=dtype, qscheme=scheme, quant_min=q_min, quant_max=q_max)

    return QConfig(activation=spec_observer(config.activation, torch.quint8),
                   weight=spec_observer(config.weight, torch.qint8))


def _relu6_as_relu(model: nn.Module, keep_fp32: tuple[str, ...]):
    """FX-traced copy where each ReLU6 right after a quantized Conv (or Conv -> BN) is a ReLU.

    PyTorch fuses Conv+BN+ReLU into one int8 kernel but not ReLU6: unfused, the conv's output is
    quantized over its whole pre-activation range (often +-100 after BN folding) and ReLU6 then keeps a
    handful of those levels in [0, 6]. Fused as Conv+ReLU, the kernel's output grid can cover just
    [0, 6], and clipping at its top is ReLU6. Returns the graph and the names of the folded convs.
    """
    import torch.fx as fx

    graph = fx.symbolic_trace(model)
    modules = dict(graph.named_modules())
    folded = []
    for node in list(graph.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.ReLU6):
            continue
        source = node.args[0]
        if (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1
                and isinstance(modules[source.target], nn.BatchNorm2d)):
            source = source.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1
                and isinstance(modules[source.target], nn.Conv2d)) or source.target in keep_fp32:
            continue
        name = f"relu6_folded_{len(folded)}"
        graph.add_submodule(name, nn.ReLU())
        node.target = name
        folded.append(source.target)
    graph.recompile()
    return graph.eval(), folded


def _fused_relu_modules(prepared: nn.Module, folded: list[str]) -> list[nn.Module]:
    """The prepared Conv+ReLU modules of the folded convs (fusion names them after the conv)."""
    from torch.ao.nn.intrinsic import ConvReLU2d

    modules = dict(prepared.named_modules())
    fused = [modules.get(name) for name in folded]
    unfused = [name for name, module in zip(folded, fused) if not isinstance(module, ConvReLU2d)]
    if unfused:
        raise UnsupportedError(f"fold_relu6: {unfused[0]} was not fused with its ReLU6 by this PyTorch")
    return fused


def convert_int8(model: nn.Module, config: QuantConfig, calibration: Iterable[torch.Tensor]) -> Int8Model:
    """Real int8 twin of ``model`` by FX graph-mode post-training quantization on ``config.engine``."""
    if config.kind != "int8":
        raise invalid("config", config.name, "is not an int8 config")
    engine = check_engine(config.engine)
    fp32 = copy.deepcopy(model).eval()
    _quantizable_layers(fp32, config.keep_fp32)
    batches = iter(_calibration_batches(calibration))
    first = next(batches)
    with warnings.catch_warnings(), _engine(engine), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        folded = []
        if config.fold_relu6:
            fp32, folded = _relu6_as_relu(fp32, config.keep_fp32)
        # the engine's defaults keep the fixed-range qconfigs of sigmoid/hardsigmoid/tanh/softmax;
        # the recipe replaces the global one
        mapping = get_default_qconfig_mapping(engine).set_global(_torch_qconfig(config))
        for name in config.keep_fp32:
            mapping.set_module_name(name, None)
        prepared = prepare_fx(fp32, mapping, example_inputs=(first[:1],))
        fused = _fused_relu_modules(prepared, folded)
        for module in fused:  # calibrate with ReLU6 semantics, so the observed output range is [0, <= 6]
            module[1] = nn.ReLU6()
        prepared(first)
        for batch in batches:
            prepared(batch)
        for module in fused:
            module[1] = nn.ReLU()
        converted = convert_fx(prepared)
    return Int8Model(converted, engine)


def quantize_model(model: nn.Module, config: QuantConfig, calibration: Iterable[torch.Tensor]) -> nn.Module:
    """The quantized twin ``config`` describes (fake-quant or real int8)."""
    if config.kind == "fake":
        return fake_quantize_model(model, config, calibration)
    return convert_int8(model, config, calibration)


def quantized_module_names(model: nn.Module) -> list[str]:
    """Names of submodules that run real quantized kernels (torch.ao.nn.quantized and fused intrinsics)."""
    prefixes = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
    return [n for n, m in model.named_modules() if type(m).__module__.startswith(prefixes)]


# ---------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------
PRESETS: Registry[QuantConfig] = Registry("quantization preset")

_W_SYM_PC = TensorSpec(bits=8, symmetric=True, signed=True, per_channel=True, observer="minmax")
_A_AFFINE = TensorSpec(bits=8, symmetric=False, signed=False, per_channel=False, observer="minmax")


def _add(config: QuantConfig, *tags: str) -> None:
    PRESETS.register(config.name, config, tags=(config.kind, *tags))


_add(QuantConfig("fake-w8a8", "fake", _W_SYM_PC, _A_AFFINE,
                 source="seed 001 int8: per-channel symmetric weights, per-tensor affine activations"))
_add(QuantConfig("fake-w16a16", "fake", replace(_W_SYM_PC, bits=16), replace(_A_AFFINE, bits=16),
                 source="seed 001 int16"))
_add(QuantConfig("fake-w4a8", "fake", replace(_W_SYM_PC, bits=4), _A_AFFINE, source="4-bit weights, 8-bit activations"))
_add(QuantConfig("fake-table3.2", "fake", _W_SYM_PC, replace(_A_AFFINE, observer="histogram"),
                 source="seed 004 Table 3.2: weights per-channel symmetric min/max, activations per-tensor "
                        "affine histogram, 8 bits"))
for _bits in range(1, 9):
    _add(QuantConfig(f"fake-asym{_bits}", "fake",
                     TensorSpec(bits=_bits, symmetric=False, signed=True),
                     TensorSpec(bits=_bits, symmetric=False, signed=False),
                     source=f"seed 003 sweep: per-layer asymmetric {_bits}-bit weights and activations"),
         "sweep")
for _engine_name in ("x86", "fbgemm", "qnnpack"):
    # x86/fbgemm kernels need 7-bit activations (PyTorch's reduce_range) to avoid int16 overflow.
    _act_bits = 8 if _engine_name == "qnnpack" else 7
    _add(QuantConfig(f"int8-{_engine_name}", "int8", _W_SYM_PC,
                     replace(_A_AFFINE, bits=_act_bits, observer="histogram"), engine=_engine_name,
                     source=f"PyTorch's default {_engine_name} recipe: per-channel symmetric min/max weights, "
                            "histogram activations"))
# onednn's kernels take full 8-bit activations (no reduce_range), and folding ReLU6 into the fused
# kernels' output range keeps [0, 6] at 255 levels: the recipe that makes EfficientNet-Lite0 usable.
_add(QuantConfig("int8-onednn", "int8", _W_SYM_PC, replace(_A_AFFINE, observer="histogram"), engine="onednn",
                 source="PyTorch's default onednn recipe: per-channel symmetric min/max weights, 8-bit histogram "
                        "activations"))
_add(QuantConfig("int8-onednn-relu6", "int8", _W_SYM_PC, replace(_A_AFFINE, observer="histogram"), engine="onednn",
                 fold_relu6=True,
                 source="int8-onednn with Conv+BN+ReLU6 fused (ReLU6 clipped through the output range)"))
_add(QuantConfig("int8-x86-per-tensor-minmax", "int8", replace(_W_SYM_PC, per_channel=False),
                 replace(_A_AFFINE, bits=7), engine="x86",
                 source="naive int8: per-tensor min/max weights and activations (known to hurt depthwise nets)"),
     "naive")


def get_preset(name: str, **overrides) -> QuantConfig:
    """A preset by name, optionally with fields replaced (e.g. ``keep_fp32=("features.0",)``)."""
    config = PRESETS.get(name)
    return replace(config, **overrides) if overrides else config


__all__ = ["TensorSpec", "QuantConfig", "FakeQuantLayer", "Int8Model", "fake_quantize_model", "convert_int8",
           "quantize_model", "quantized_module_names", "check_engine", "PRESETS", "get_preset"]
