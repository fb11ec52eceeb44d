"""Taps on a twin's quantized layers, hooked into forwards that run anyway (the gate's evaluation pass,
the diagnosis pass): per sample, the share of each quantized activation its calibrated range clips, and
on request each layer's float output with the FP32 tensor it computes.

What counts as clipped, per kind of twin:

* fake-quant layers (``FakeQuantLayer``) quantize their input: a value is clipped when its code,
  round(x / s) + z, falls outside the grid (exact: the pre-clip value is seen);
* real int8 layers emit integer codes, already clamped: a value is clipped when its code is at or beyond
  the highest code the calibration split produced (the lowest too, where the calibrated range reaches
  below zero). With PyTorch's reduce_range (x86, fbgemm) calibration tops out at code 127 and anything
  above it lies beyond the calibrated range; with the full grid, clipped values pile up at 255.

The share on the calibration split itself (by the same rule) is the reference: a twin whose ranges fit
the data it gates clips about as much there as on its calibration data (a histogram observer clips
outliers on purpose). ``quantize_model`` remembers each twin's calibration batches for this; a twin built
elsewhere has no reference (the grid's own ends are then the rule, and the reference share is 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from qrobust.placement import feed
from qrobust.quant.convert import CALIBRATION_INPUTS, FakeQuantLayer, is_int8, is_runtime, layer_root

def calibration_batches(twin: nn.Module) -> list[torch.Tensor] | None:
    """The model inputs ``quantize_model`` calibrated ``twin`` on, or None (a twin built elsewhere)."""
    return CALIBRATION_INPUTS.get(twin)


def tappable(twin: nn.Module) -> bool:
    """Whether the twin's quantized layers are torch modules that take forward hooks."""
    return not is_runtime(twin) and bool(quantized_layers(twin))


def quantized_layers(twin: nn.Module) -> list[str]:
    """The twin's layers that quantize, in call order where a graph gives it: converted int8 modules, or
    fake-quant wrappers."""
    root = layer_root(twin)
    if is_int8(twin):
        graph = getattr(root, "graph", None)
        called = [n.target for n in graph.nodes if n.op == "call_module"] if isinstance(graph, torch.fx.Graph) else []
        modules = dict(root.named_modules())
        prefixes = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
        return [n for n in dict.fromkeys(called) if type(modules[n]).__module__.startswith(prefixes)]
    return [n for n, m in root.named_modules() if isinstance(m, FakeQuantLayer)]


@dataclass(frozen=True)
class ClipRule:
    """Which codes of an int8 layer's output count as clipped: ``>= top``, and ``<= bottom`` when set.
    ``top`` None: the grid's own ends (a twin with no known calibration split). Fake-quant layers need no
    rule (their pre-clip codes are seen)."""

    top: int | None = None
    bottom: int | None = None


def clipped(module: nn.Module, inputs: tuple, output, rule: ClipRule | None) -> torch.Tensor | None:
    """Per sample, the share of the layer's quantized values that are clipped; None where the layer
    carries no quantized activation this can read."""
    if isinstance(module, FakeQuantLayer):
        qp = module.act_qparams
        if qp is None or qp.axis is not None:
            return None
        x = inputs[0].detach()
        codes = torch.round(x / qp.scale.to(x.device)) + qp.zero_point.to(x.device)
        return ((codes > qp.q_max) | (codes < qp.q_min)).flatten(1).float().mean(1).cpu()
    if not isinstance(output, torch.Tensor) or not output.is_quantized or output.qscheme() != torch.per_tensor_affine:
        return None
    codes = output.int_repr().flatten(1)
    info = torch.iinfo(codes.dtype)
    if rule is None or rule.top is None:  # the grid's ends; a ReLU's zeros at the bottom are not clips
        zero = int(output.q_zero_point())
        rule = ClipRule(info.max, info.min if zero != info.min else None)
    hit = codes >= rule.top
    if rule.bottom is not None:
        hit |= codes <= rule.bottom
    return hit.float().mean(1)


class Taps:
    """While active (``with``), forward hooks on ``model``'s modules: ``clips[name]`` holds per-sample
    clipped shares of the quantized layers in ``rules`` (None: no rule known, the grid's ends), and
    ``outputs[name]`` float CPU copies of the modules named in ``keep``. Names are module names under
    ``layer_root(model)``; hooks fire in execution order, so ``outputs`` keeps it."""

    def __init__(self, model: nn.Module, rules: dict[str, ClipRule | None] | None = None, keep: Iterable[str] = ()):
        self.model, self.rules, self.keep = model, dict(rules or {}), set(keep)
        self.clips: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def tap(module, inputs, output):
            if name in self.rules:
                share = clipped(module, inputs, output, self.rules[name])
                if share is not None:
                    self.clips[name] = share
            if name in self.keep and isinstance(output, torch.Tensor):
                value = output.dequantize() if output.is_quantized else output.detach()
                self.outputs[name] = value.to("cpu", torch.float32, copy=True)  # an in-place op may follow
        return tap

    def __enter__(self) -> Taps:
        self.clips, self.outputs = {}, {}
        if not self.rules and not self.keep:  # nothing to read: every batch of an untapped case comes here
            return self
        for name, module in layer_root(self.model).named_modules():
            if name in self.rules or name in self.keep:
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def calibration_reference(twin: nn.Module, batches: Sequence[torch.Tensor] | None) -> dict[str, tuple[ClipRule, float]]:
    """Per quantized layer, its clip rule and the share of values that rule counts on the calibration
    split ``batches`` (None: no split known, every layer gets the grid's ends and share 0)."""
    layers = quantized_layers(twin)
    if not batches:
        return {name: (ClipRule(), 0.0) for name in layers}
    codes: dict[str, torch.Tensor] = {}  # int8 layers: how often calibration produced each code
    grids: dict[str, tuple[int, int]] = {}  # int8 layers: the grid's lowest code and the zero point
    fake: dict[str, list[float]] = {}  # fake-quant layers: clipped values and all values

    def count(name):
        def hook(module, inputs, output):
            if isinstance(module, FakeQuantLayer):
                share = clipped(module, inputs, output, None)
                if share is not None:
                    total = fake.setdefault(name, [0.0, 0.0])
                    total[0] += float(share.sum())
                    total[1] += len(share)
            elif isinstance(output, torch.Tensor) and output.is_quantized and output.qscheme() == torch.per_tensor_affine:
                q = output.int_repr()
                if q.dtype not in (torch.uint8, torch.int8):
                    return
                lowest = torch.iinfo(q.dtype).min  # codes counted from the grid's bottom: bins 0..255
                codes[name] = codes.get(name, 0) + torch.bincount(q.flatten().long() - lowest, minlength=256)
                grids[name] = (lowest, int(output.q_zero_point()))
        return hook

    modules = dict(layer_root(twin).named_modules())
    handles = [modules[name].register_forward_hook(count(name)) for name in layers]
    try:
        with torch.inference_mode():
            for batch in batches:
                feed(twin, batch, role="twin")
    finally:
        for handle in handles:
            handle.remove()
    reference = {}
    for name in layers:
        if name in fake:
            clipped_values, samples = fake[name]
            reference[name] = (ClipRule(), clipped_values / samples if samples else 0.0)
        elif name in codes:
            histogram, (lowest, zero) = codes[name], grids[name]
            seen = histogram.nonzero().flatten()
            low, high = int(seen.min()), int(seen.max())
            bottom = low if low + lowest < zero else None  # the calibrated range reaches below zero
            hit = int(histogram[high:].sum()) + (int(histogram[:bottom + 1].sum()) if bottom is not None else 0)
            reference[name] = (ClipRule(high + lowest, None if bottom is None else bottom + lowest),
                               hit / int(histogram.sum()))
    return reference


def match_fp32(fp32_outputs: dict[str, torch.Tensor], twin_outputs: dict[str, torch.Tensor]) -> dict[str, str]:
    """For each twin layer, the FP32 module whose output it computes: the module of the same name or one
    right after it in execution order (int8 graphs fuse Conv+BN+ReLU into the conv), the same-shaped one
    closest to the twin's output. ``fp32_outputs`` must be in execution order (``Taps`` keeps it)."""
    order, matches = list(fp32_outputs), {}
    for name, y in twin_outputs.items():
        short = name.removesuffix(".layer")
        start = order.index(short) if short in order else next((i for i, n in enumerate(order) if n.startswith(short + ".")), None)
        if start is None:
            continue
        candidates = [n for n in order[start:start + 4] if fp32_outputs[n].shape == y.shape]  # the layer, then its BN / activation
        if candidates:
            matches[name] = min(candidates, key=lambda n: float((y - fp32_outputs[n]).norm() / fp32_outputs[n].norm().clamp_min(1e-12)))
    return matches


def leaf_modules(model: nn.Module) -> list[str]:
    return [n for n, m in layer_root(model).named_modules() if n and not list(m.children())]
