"""Where a twin loses the signal: per-layer SQNR, relative error and clipping, FP32 against the twin.

Run when a check fails (a passing gate pays nothing): both models see the same inputs, every quantized
layer's output in the twin is matched to the FP32 tensor it computes (the FP32 module of the same name or
a module right after it, since int8 graphs fuse Conv+BN+ReLU into the conv: the closest same-shaped one
wins), and for each layer:

* SQNR = 20 log10(||x|| / ||x - y||) dB, x the FP32 tensor, y the twin's (dequantized);
* relative error = ||x - y|| / ||x||;
* clipping = the share of the layer's quantized values its range clips (``qrobust.quant.taps``: a
  fake-quant layer's input codes beyond the grid, an int8 layer's output codes at the grid's ends).

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
from qrobust.quant.convert import is_runtime
from qrobust.quant.taps import Taps, leaf_modules, match_fp32, quantized_layers


@dataclass(frozen=True)
class LayerError:
    layer: str  # the twin's module
    fp32_tensor: str  # the FP32 module whose output it is compared with
    sqnr_db: float
    relative_error: float
    clip_fraction: float | None  # None where the layer carries no quantized activation to read
    drop_db: float  # how far the SQNR fell from the layer before (in execution order)

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in asdict(self).items()}


def layer_errors(fp32: nn.Module, twin: nn.Module, x: torch.Tensor) -> list[LayerError]:
    """Per quantized layer of ``twin``, in execution order, its error against FP32 on the batch ``x``."""
    if is_runtime(twin) or is_runtime(fp32):
        runtime = (twin if is_runtime(twin) else fp32).describe()
        raise UnsupportedError(f"per-layer diagnosis hooks torch modules; {runtime} has none to hook (it needs live "
                               "torch models)")
    layers = quantized_layers(twin)
    with Taps(fp32, keep=leaf_modules(fp32)) as fp, torch.inference_mode():
        feed(fp32, x, role="fp32")
    with Taps(twin, rules=dict.fromkeys(layers), keep=layers) as q, torch.inference_mode():
        feed(twin, x, role="twin")
    matches = match_fp32(fp.outputs, q.outputs)
    rows, previous = [], None
    for name in layers:
        if name not in matches:
            continue
        y, reference = q.outputs[name], fp.outputs[matches[name]]
        rel = float((y - reference).norm() / reference.norm().clamp_min(1e-12))
        sqnr = 20 * math.log10(1 / rel) if rel > 0 else math.inf
        drop = max(0.0, previous - sqnr) if previous is not None and math.isfinite(previous) else 0.0
        previous = sqnr
        clip = float(q.clips[name].mean()) if name in q.clips else None
        rows.append(LayerError(name.removesuffix(".layer"), matches[name], sqnr, rel, clip, drop))
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
