"""Where a twin loses the signal: per-layer SQNR, relative error and clipping, FP32 against the twin.

Run when a check fails (a passing gate pays nothing): both models see the same inputs, every quantized
layer's output in the twin is matched to the FP32 tensor it computes (the FP32 module of the same name or
a module right after it, since int8 graphs fuse Conv+BN+ReLU into the conv: the closest same-shaped one
wins), and for each layer:

* SQNR = 20 log10(||x|| / ||x - y||) dB, x the FP32 tensor, y the twin's (dequantized);
* relative error = ||x - y|| / ||x||;
* clipping = the share of the twin's integer outputs at the ends of their grid (real int8 layers only),
  the range use the calibration left.

Error accumulates through a network, so the layers reported first are those where the SQNR *drops* the
most from the layer before them: where the error enters, as per-layer debugging tools (PyTorch's Numeric
Suite, ONNX Runtime's qdq_loss_debug) are read by hand.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from qrobust.errors import UnsupportedError
from qrobust.placement import feed
from qrobust.quant.convert import FakeQuantLayer, is_int8, is_runtime, layer_root


@dataclass(frozen=True)
class LayerError:
    layer: str  # the twin's module
    fp32_tensor: str  # the FP32 module whose output it is compared with
    sqnr_db: float
    relative_error: float
    clip_fraction: float | None  # None where the output is not an integer tensor
    drop_db: float  # how far the SQNR fell from the layer before (in execution order)

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in asdict(self).items()}


def _quantized_layers(twin: nn.Module) -> list[str]:
    """The twin's layers that quantize: converted int8 modules, or fake-quant wrappers."""
    root = layer_root(twin)
    if is_int8(twin):
        graph = getattr(root, "graph", None)
        called = [n.target for n in graph.nodes if n.op == "call_module"] if isinstance(graph, torch.fx.Graph) else []
        modules = dict(root.named_modules())
        prefixes = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
        return [n for n in dict.fromkeys(called) if type(modules[n]).__module__.startswith(prefixes)]
    return [n for n, m in root.named_modules() if isinstance(m, FakeQuantLayer)]


def _capture(model: nn.Module, names: list[str], x: torch.Tensor, role: str) -> tuple[dict, dict]:
    """Float outputs (and integer codes with their grid, for quantized outputs) of the named modules."""
    root, floats, codes, handles = layer_root(model), {}, {}, []

    def hook(name):
        def keep(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                return
            if output.is_quantized:
                q = output.int_repr()
                lo, hi = torch.iinfo(q.dtype).min, torch.iinfo(q.dtype).max
                codes[name] = (q, lo, hi, int(output.q_zero_point()) if output.qscheme() == torch.per_tensor_affine else None)
                floats[name] = output.dequantize().float()
            else:  # a copy (an in-place op may follow), compared on the CPU with the other model's
                floats[name] = output.detach().to("cpu", torch.float32, copy=True)
        return keep

    modules = dict(root.named_modules())
    try:
        for name in names:
            if name in modules:
                handles.append(modules[name].register_forward_hook(hook(name)))
        with torch.inference_mode():
            feed(model, x, role=role)
    finally:
        for handle in handles:
            handle.remove()
    return floats, codes


def _clip_fraction(code) -> float:
    q, lo, hi, zero = code
    at_top = (q == hi)
    at_bottom = (q == lo) if zero is not None and zero != lo else torch.zeros_like(at_top)  # a ReLU's zeros are not clips
    return float((at_top | at_bottom).float().mean())


def layer_errors(fp32: nn.Module, twin: nn.Module, x: torch.Tensor) -> list[LayerError]:
    """Per quantized layer of ``twin``, in execution order, its error against FP32 on the batch ``x``."""
    if is_runtime(twin) or is_runtime(fp32):
        runtime = (twin if is_runtime(twin) else fp32).describe()
        raise UnsupportedError(f"per-layer diagnosis hooks torch modules; {runtime} has none to hook (it needs live "
                               "torch models)")
    layers = _quantized_layers(twin)
    fp32_leaves = [n for n, m in fp32.named_modules() if n and not list(m.children())]
    fp_out, _ = _capture(fp32, fp32_leaves, x, "fp32")
    twin_names = [name.removesuffix(".layer") for name in layers]
    q_out, codes = _capture(twin, layers, x, "twin")
    order = list(fp_out)  # hooks fire in execution order
    rows, previous = [], None
    for name, short in zip(layers, twin_names):
        y = q_out.get(name)
        if y is None:
            continue
        start = order.index(short) if short in order else next((i for i, n in enumerate(order) if n.startswith(short + ".")), None)
        if start is None:
            continue
        candidates = [n for n in order[start:start + 4] if fp_out[n].shape == y.shape]  # the layer, then its BN / activation
        if not candidates:
            continue
        errors = {n: float((y - fp_out[n]).norm() / fp_out[n].norm().clamp_min(1e-12)) for n in candidates}
        match = min(errors, key=errors.get)
        rel = errors[match]
        sqnr = 20 * math.log10(1 / rel) if rel > 0 else math.inf
        drop = max(0.0, previous - sqnr) if previous is not None and math.isfinite(previous) else 0.0
        previous = sqnr
        rows.append(LayerError(short, match, sqnr, rel, _clip_fraction(codes[name]) if name in codes else None, drop))
    return rows


def worst_layers(rows: list[LayerError], count: int = 3) -> list[LayerError]:
    """The layers where the error enters: the largest SQNR drops, then the lowest SQNR."""
    return sorted(rows, key=lambda r: (-r.drop_db, r.sqnr_db))[:count]


def describe(rows: list[LayerError], count: int = 3) -> str:
    """``worst layers: features.1.conv (3.1 dB, -24.0 dB from the layer before, 12% clipped), ...``"""
    parts = []
    for r in worst_layers(rows, count):
        extra = [f"-{r.drop_db:.1f} dB from the layer before"] if r.drop_db >= 0.05 else []
        if r.clip_fraction is not None and r.clip_fraction >= 0.005:
            extra.append(f"{r.clip_fraction:.0%} clipped")
        parts.append(f"{r.layer} ({r.sqnr_db:.1f} dB{', ' + ', '.join(extra) if extra else ''})")
    return "worst layers: " + ", ".join(parts) if parts else ""
