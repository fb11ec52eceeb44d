"""Quantized twins: fake-quant wrapping at any bit width and real int8 conversion (the only torch.ao user).

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
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

from qrobust._options import X86_KERNELS
from qrobust.errors import UnsupportedError, invalid
from qrobust.placement import feed, stage
from qrobust.quant.presets import QuantConfig, TensorSpec
from qrobust.quant.quantizer import QParams, fake_quantize, make_observer, quant_range
from qrobust.registry import Registry

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


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
    with torch.no_grad(), one_thread(), stage("calibrate"):
        for batch in _calibration_batches(calibration):
            feed(fq, batch, role="twin being calibrated")
    for m in wrapped:
        m.calibrating = False
        m.act_qparams = m.act_observer.qparams()
    return fq


class Int8Model(nn.Module):
    """A converted int8 graph and the engine its packed weights were built for.

    The quantized engine is a process-wide PyTorch setting: every call selects this model's engine and
    restores the previous one afterwards, so pairs for different engines live in one session and no
    forward leaves a global changed behind it.
    """

    input_device = "cpu"  # qrobust.placement: where the kernels take their inputs

    def __init__(self, graph: nn.Module, engine: str):
        super().__init__()
        self.graph = graph
        self.engine = engine
        self.x86_convs: str | None = None  # the library route_x86_convs repacked the convs for, if any

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _engine(self.engine):
            return self.graph(x)


def check_engine(engine: str) -> str:
    supported = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if engine not in supported:
        raise invalid("engine", engine, f"not available in this PyTorch build (available: {', '.join(supported)})")
    return engine


@contextlib.contextmanager
def one_thread():
    """Calibrate on one thread: float reductions then run in one order, so the observed ranges (and the
    twin's scales) do not depend on the thread count (measured: 5 of EfficientNet-Lite0's scales moved
    between 1 and 2 threads, and with them 47 of the gate's counts)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _engine(engine: str):
    previous = torch.backends.quantized.engine
    if previous != engine:
        torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        if torch.backends.quantized.engine != previous:
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
    fp32 = copy.deepcopy(model).cpu().eval()  # a copy (prepare_fx changes it) on the CPU, the kernels' home
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
        prepared = prepare_fx(fp32, mapping, example_inputs=(first[:1].cpu(),))
        fused = _fused_relu_modules(prepared, folded)
        for module in fused:  # calibrate with ReLU6 semantics, so the observed output range is [0, <= 6]
            module[1] = nn.ReLU6()
        with one_thread(), stage("calibrate"):
            for batch in (first, *batches):
                feed(prepared, batch, role="twin being calibrated")
        for module in fused:
            module[1] = nn.ReLU()
        converted = convert_fx(prepared)
    return Int8Model(converted, engine)


QUANTIZERS: Registry[Callable[..., nn.Module]] = Registry("quantizer")  # recipe runtime -> what builds its twin


def register_quantizer(runtime: str):
    """Decorator: ``fn(model, config, calibration)`` builds the twins of recipes whose ``runtime`` is this one.
    The quantization wing owns the registry and knows no runtime; ``qrobust.runtimes`` registers its own
    (onnxruntime, torchao) when imported, as torchvision's architectures register their builders."""

    def deco(fn):
        QUANTIZERS.register(runtime, fn)
        return fn

    return deco


@register_quantizer("torch")
def quantize_torch(model: nn.Module, config: QuantConfig, calibration: Iterable[torch.Tensor]) -> nn.Module:
    """A torch twin: fake-quant, or real int8 kernels."""
    if config.kind == "fake":
        return fake_quantize_model(model, config, calibration)
    return convert_int8(model, config, calibration)


CALIBRATION_INPUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # twin -> the batches it was calibrated on


def quantize_model(model: nn.Module, config: QuantConfig, calibration: Iterable[torch.Tensor]) -> nn.Module:
    """The quantized twin ``config`` describes (fake-quant, real int8, an ONNX Runtime or a PT2E int8 model),
    built by the quantizer registered for its runtime."""
    if config.runtime not in QUANTIZERS:
        raise invalid("runtime", config.runtime, "has no quantizer registered: import qrobust.runtimes first "
                                                 "(qrobust.models and the public qrobust.quantize_model do)")
    batches = list(calibration)
    twin = QUANTIZERS.get(config.runtime)(model, config, batches)
    try:  # its calibration split: the reference of its clipping on gated data (qrobust.quant.taps)
        CALIBRATION_INPUTS[twin] = batches
    except TypeError:  # an object that cannot be weakly referenced keeps no reference
        pass
    return twin


def is_runtime(model) -> bool:
    """Whether a deployment runtime, not torch, runs ``model`` (a ``qrobust.runtimes.RuntimeModel`` names
    its runtime): asked by name, so the quantization wing needs no import of the runtimes above it."""
    return isinstance(getattr(type(model), "runtime", None), str)


# ---- which kernels an int8 twin runs on: the part of a verdict that depends on the CPU --------------------
X86_ONEDNN_MAX_GROUPS = 100  # PyTorch's should_use_onednn_quant: more groups (depthwise convs) stay on FBGEMM


def cpu_features() -> dict:
    """The CPU features that switch PyTorch's int8 kernels, for the report: ATen's vector width, and the
    AVX512-VNNI and AMX units (torch.backends.cpu.get_cpu_capability says "AVX512" with or without them)."""
    import platform

    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return {"capability": torch.backends.cpu.get_cpu_capability(), "os": platform.system(),
            **{name: bool(caps.get(name, False)) for name in ("avx2", "avx512_f", "avx512_vnni", "avx_vnni", "amx_int8")}}


def _x86_routes_to_onednn(module: nn.Module, features: dict) -> bool:
    """PyTorch's x86 engine packs a quantized conv for oneDNN when the CPU has AVX512-VNNI, the conv has at
    most 100 groups and symmetric weights (every zero point 0), on Linux (aten's should_use_onednn_quant);
    linears always go to FBGEMM under x86."""
    if not hasattr(module, "groups") or module.groups > X86_ONEDNN_MAX_GROUPS:
        return False
    weight = module.weight()
    zeros = weight.q_per_channel_zero_points() if weight.qscheme() in (torch.per_channel_affine,
                                                                       torch.per_channel_symmetric) else torch.tensor(
        [weight.q_zero_point()])
    return bool((zeros == 0).all()) and features["avx512_vnni"] and features["os"] == "Linux"


def _quantized_modules(model: Int8Model) -> dict[str, nn.Module]:
    """The twin's quantized convolutions and linears (modules with packed weights and an output scale)."""
    prefixes = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
    return {n: m for n, m in model.graph.named_modules()
            if type(m).__module__.startswith(prefixes) and hasattr(m, "set_weight_bias") and hasattr(m, "scale")}


def int8_kernels(model: Int8Model) -> dict:
    """Where the twin's quantized convolutions and linears run: ``{"conv": {"fbgemm": 2}, "linear": ...}``.
    Under the x86 engine this depends on the CPU (or on ``route_x86_convs``, which emulates another one)."""
    features, found = cpu_features(), {}
    for module in _quantized_modules(model).values():
        kind = "conv" if hasattr(module, "groups") else "linear"
        if model.engine != "x86":
            library = model.engine
        elif model.x86_convs is not None and kind == "conv":
            library = model.x86_convs if _x86_routes_to_onednn(module, {**features, "avx512_vnni": True, "os": "Linux"}) \
                else "fbgemm"
        else:
            library = "onednn" if kind == "conv" and _x86_routes_to_onednn(module, features) else "fbgemm"
        found.setdefault(kind, {}).setdefault(library, 0)
        found[kind][library] += 1
    return found


def route_x86_convs(model: Int8Model, library: str) -> None:
    """Repack an x86-engine twin's convolutions for ``library`` as PyTorch's x86 engine would on another CPU:
    ``onednn`` where a CPU with AVX512-VNNI sends them (at most 100 groups, symmetric weights), ``fbgemm``
    everywhere (a CPU without it). The kernels the run then calls are the other CPU's; their integer
    results (7-bit activations cannot saturate either library) and requantization are what a verdict
    depends on. Other engines pick no kernel by CPU and are left alone."""
    if library not in X86_KERNELS:
        raise invalid("library", library, f"must be one of {', '.join(X86_KERNELS)}")
    if model.engine != "x86":
        return
    vnni = {**cpu_features(), "avx512_vnni": True, "os": "Linux"}
    for module in _quantized_modules(model).values():
        if hasattr(module, "groups"):
            target = library if _x86_routes_to_onednn(module, vnni) else "fbgemm"
            with _engine(target):
                module.set_weight_bias(*module._weight_bias())
    model.x86_convs = library


def quantized_module_names(model: nn.Module) -> list[str]:
    """Names of submodules that run real quantized kernels (torch.ao.nn.quantized and fused intrinsics)."""
    prefixes = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
    return [n for n, m in model.named_modules() if type(m).__module__.startswith(prefixes)]




# ---- where an FP32 layer lives in a twin (CAM hooks, per-layer diagnosis) --------------------------------
def is_int8(model: nn.Module) -> bool:
    return isinstance(model, Int8Model)


def layer_root(model: nn.Module) -> nn.Module:
    """The module whose submodules carry the layer names (the graph inside an int8 wrapper)."""
    return model.graph if isinstance(model, Int8Model) else model


def twin_layer_name(fp32: nn.Module, twin: nn.Module, name: str) -> str:
    """Where the FP32 layer ``name`` lives in ``twin``; FX int8 graphs flatten and fuse.

    The graph calls only leaf modules, and a fused Conv+BN+ReLU is named after its conv. So: ``name``
    itself if the graph calls it, else the last module it calls inside ``name`` (a block's output
    stage), else the nearest module before ``name`` in the FP32 model that it calls (the conv that
    absorbed this BN/ReLU). Eager twins keep the FP32 names.
    """
    root = layer_root(twin)
    if not isinstance(getattr(root, "graph", None), torch.fx.Graph):
        return name
    called = [node.target for node in root.graph.nodes if node.op == "call_module"]
    if name in called:
        return name
    inside = [target for target in called if target.startswith(name + ".")]
    if inside:
        return inside[-1]
    order = [n for n, _ in fp32.named_modules()]
    if name in order:
        for earlier in reversed(order[:order.index(name)]):
            if earlier in called:
                return earlier
    raise invalid("target_layer", name, "has no counterpart in the int8 graph; set quantized_target_layer")
