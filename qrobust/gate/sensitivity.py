"""A fix to try for a failing case: which layers, kept in FP32, recover the failing metric.

Like NNCF's accuracy-aware restorer, but as a report, never a silent change: for the diagnosis's worst
layers (at most ``top`` of them, so the cost is bounded), the pair is requantized with that layer's block
(the layer and the FP32 modules up to the tensor it computes: its BatchNorm and activation, which int8
graphs fuse into it) kept in float, and the failing case is evaluated again. Blocks are ranked by the
metric they recover; then the best ones are combined, in rank order, until the metric passes its
tolerance or the candidates run out. The result is the suggested ``keep_fp32`` list with the metric
measured after applying it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from qrobust.metrics.catalog import METRICS


ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh)


def block_of(fp32: nn.Module, layer: str, tensor: str) -> tuple[str, ...]:
    """The FP32 modules of ``layer``'s block: from the layer through ``tensor`` (what an int8 graph fuses
    into it) and the activation right after. Keeping a conv in float while its BatchNorm or activation
    stays quantized would hand the int8 grid a wide pre-activation range."""
    modules = dict(fp32.named_modules())
    order = [n for n in modules if n]
    if layer not in order:
        return (layer,)
    end = order.index(tensor) if tensor in order and order.index(tensor) >= order.index(layer) else order.index(layer)
    while end + 1 < len(order) and isinstance(modules[order[end + 1]], ACTIVATIONS):
        end += 1
    return tuple(order[order.index(layer):end + 1])


def suggest_keep_fp32(pair, evaluate: Callable, metric: str, tolerance: float, value: float, layers: list[dict], *,
                      top: int = 3, progress: Callable[[str], None] | None = None) -> dict:
    """Try the worst ``layers`` (diagnosis rows) one block at a time, then combined.

    ``evaluate(twin)`` returns the failing metric's value for the case with that twin. Returns
    ``{"tried": [{"keep_fp32": [...], "value": v}], "suggestion": [...], "value": v, "passes": bool}``."""
    if pair.requantize is None:
        return {"error": "the pair cannot be requantized (register it with requantize=...)"}
    higher = METRICS[metric].higher_is_better
    better = (lambda a, b: a > b) if higher else (lambda a, b: a < b)
    passes = (lambda v: v >= tolerance) if higher else (lambda v: v <= tolerance)
    rows = sorted(layers, key=lambda r: (-r["drop_db"], r["sqnr_db"]))[:top]
    tried = []
    for i, row in enumerate(rows, 1):
        block = block_of(pair.fp32, row["layer"], row["fp32_tensor"])
        if progress is not None:
            progress(f"sensitivity {pair.name}: {i}/{len(rows)}, {metric} with {', '.join(block)} in FP32")
        tried.append({"keep_fp32": list(block), "value": evaluate(pair.requantize(block))})
    ranked = sorted(tried, key=lambda t: t["value"], reverse=higher)
    keep: list[str] = []
    best = value
    for t in ranked:
        if not better(t["value"], value):
            break
        candidate = keep + t["keep_fp32"]
        measured = t["value"] if not keep else evaluate(pair.requantize(tuple(candidate)))
        if better(measured, best):
            keep, best = candidate, measured
        if passes(best):
            break
    return {"tried": tried, "suggestion": keep, "value": best if keep else None, "passes": bool(keep) and passes(best),
            "from": value}


def describe(result: dict, metric: str) -> str:
    """``fix to try: keep_fp32 [_conv_stem, _bn0, _act0] -> agreement 0.86 (from 0.41; passes)``."""
    if "error" in result:
        return f"(no sensitivity pass: {result['error']})"
    if not result["suggestion"]:
        return f"fix to try: none of the {len(result['tried'])} worst layers recovers {metric} when kept in FP32"
    return (f"fix to try: keep_fp32 {result['suggestion']} -> {metric} {result['value']:.4g} "
            f"(from {result['from']:.4g}; {'passes' if result['passes'] else 'still fails'})")


def with_twin(pair, twin):
    """The pair with another twin (same name: the evaluator's caches are per evaluator, so use a fresh one)."""
    return dataclasses.replace(pair, quantized=twin, quantized_target_layer=None)  # the probe matches its CAM layer
