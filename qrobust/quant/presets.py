"""Quantization recipes: how weights and activations are quantized, and the named presets.

A ``QuantConfig`` is data only; ``qrobust.quant.convert`` turns it into a twin. Presets carry their
source (a seed paper, PyTorch's engine defaults) so a report can say where a recipe comes from.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from qrobust.errors import invalid
from qrobust.quant.quantizer import quant_range
from qrobust.registry import Registry

KINDS = ("fake", "int8")
RUNTIMES = ("torch", "onnxruntime", "torchao")


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
    runtime: str = "torch"  # what builds and runs the twin: torch.ao, ONNX Runtime or torchao PT2E (qrobust.runtimes)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise invalid("kind", self.kind, "must be 'fake' or 'int8'")
        if self.runtime not in RUNTIMES:
            raise invalid("runtime", self.runtime, f"must be one of {', '.join(RUNTIMES)}")
        if self.runtime != "torch":
            if self.kind != "int8" or self.engine is not None or self.fold_relu6:
                raise invalid("runtime", self.runtime, f"a {self.runtime} recipe is kind 'int8', with no torch.ao "
                                                       "engine and no fold_relu6")
            if self.weight.bits not in (7, 8) or not self.weight.signed or not self.weight.symmetric:
                raise invalid("weight", self.weight, "ONNX Runtime takes signed symmetric 8-bit weights (7: reduce_range)")
            if self.activation.bits != 8 or self.activation.signed:
                raise invalid("activation", self.activation, "ONNX Runtime recipes here use unsigned 8-bit activations")
        elif self.kind == "int8":
            if self.engine is None:
                raise invalid("engine", None, "an int8 config needs a quantized engine")
            if self.weight.bits != 8 or not self.weight.signed or not self.weight.symmetric:
                raise invalid("weight", self.weight, "int8 kernels take 8-bit signed symmetric weights")
            if self.activation.bits > 8 or self.activation.signed:
                raise invalid("activation", self.activation, "int8 kernels take unsigned activations of <= 8 bits")
        elif self.fold_relu6:
            raise invalid("fold_relu6", True, "only applies to int8 conversion")
        if self.fold_relu6 and self.activation.bits != 8:
            # the fused kernel clips at the top of the 8-bit output grid; that is ReLU6's 6 only when the
            # calibrated [0, 6] spans all 255 levels (with 7 bits the clip lands at 12: a ReLU, not a ReLU6)
            raise invalid("fold_relu6", True, f"needs 8-bit activations, got {self.activation.bits}-bit "
                                              f"(engine {self.engine}); use int8-qnnpack-relu6 or int8-onednn-relu6")

    @property
    def bits(self) -> tuple[int, int]:
        """(weight bits, activation bits)."""
        return self.weight.bits, self.activation.bits

    def summary(self) -> dict:
        return {"name": self.name, "kind": self.kind, "engine": self.engine,
                "weight": self.weight.describe(), "activation": self.activation.describe(),
                "keep_fp32": list(self.keep_fp32), "fold_relu6": self.fold_relu6, "source": self.source,
                "runtime": self.runtime}


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
# onednn's kernels take full 8-bit activations (no reduce_range) but, on CPUs without VNNI, multiply
# them in int16 pairs that saturate: the same twin computes differently on another CPU. qnnpack's
# kernels compute exactly in integers on every x86-64 CPU (SSE2), with 8-bit activations. Folding ReLU6
# into the fused kernels' output range keeps [0, 6] at 255 levels: the recipe that makes
# EfficientNet-Lite0 usable.
_add(QuantConfig("int8-qnnpack-relu6", "int8", _W_SYM_PC, replace(_A_AFFINE, observer="histogram"), engine="qnnpack",
                 fold_relu6=True,
                 source="int8-qnnpack with Conv+BN+ReLU6 fused (ReLU6 clipped through the output range); integer-"
                        "exact on every x86-64 CPU"))
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
# ONNX Runtime's static QDQ recipe (qrobust.runtimes.onnx_quantize): per-channel symmetric int8 weights at
# 7 bits (reduce_range: exact on every x86-64 CPU, VNNI or not), uint8 affine activations
for _observer in ("minmax", "percentile"):
    _add(QuantConfig("ort-int8" if _observer == "minmax" else f"ort-int8-{_observer}", "int8",
                     replace(_W_SYM_PC, bits=7), replace(_A_AFFINE, observer=_observer), runtime="onnxruntime",
                     source=f"ONNX Runtime quantize_static, QDQ: per-channel symmetric weights (reduce_range), "
                            f"uint8 activations calibrated by {_observer}"), "onnxruntime")
# torchao's PT2E flow with its X86InductorQuantizer defaults (qrobust.runtimes.exported): the successor of
# torch.ao's x86 recipe; it cannot partition ResNet blocks in torchao 0.18 (README, "Quantization")
_add(QuantConfig("pt2e-x86", "int8", _W_SYM_PC, replace(_A_AFFINE, observer="histogram"), runtime="torchao",
                 source="torchao PT2E, X86InductorQuantizer defaults: per-channel symmetric int8 weights, uint8 "
                        "histogram activations; PyTorch's reference q/dq graph"), "pt2e")


def get_preset(name: str, **overrides) -> QuantConfig:
    """A preset by name, optionally with fields replaced (e.g. ``keep_fp32=("features.0",)``)."""
    config = PRESETS.get(name)
    return replace(config, **overrides) if overrides else config


