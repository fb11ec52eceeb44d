"""Shipped calibration: a twin's activation scales and zero points as an artifact, like its weights.

Calibrating runs the FP32 model in float32, whose convolutions sum in an order that depends on the CPU
(vector width, oneDNN's kernels): the observed ranges, so the scales, move from one CPU to another (in
their last bits for min/max observers; by 3% for one EfficientNet-Lite0 histogram observer without
SIMD), and a value near a rounding tie of the grid then lands on another code. A built-in twin therefore
calibrates as usual (so its recipe is really run) and then takes the scales and zero points shipped in
``qrobust/models/calibration/<pair>.json`` (written by ``tools/calibrate_builtins.py``): its integer
arithmetic, and with it every int8 output, is then the same on every CPU.

A file belongs to a twin by what its calibration is a function of, never by the values this CPU
computes: the document's ``source`` (the recipe, a fingerprint of the FP32 tensors, the calibration
data's identity) must equal the twin's, and its quantizers must be the twin's. Only a scale more than
``STALE_RELATIVE`` from this CPU's (no host arithmetic moves one that far) is refused as a backstop for a
change the source does not name.

Weight quantizers are not shipped: their ranges are exact minima and maxima of the weights.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from qrobust.errors import InvalidArgument
from qrobust.quant.convert import FakeQuantLayer, Int8Model
from qrobust.quant.quantizer import QParams

STALE_RELATIVE = 0.25  # a shipped scale further than this from this CPU's is not this twin's calibration
FORMAT = 2


def _fx_scale_buffers(root: nn.Module) -> dict[str, str]:
    """FX's quantize_per_tensor arguments on the graph root: scale attribute -> its zero point attribute."""
    names = {n for n, v in vars(root).items() if isinstance(v, torch.Tensor)} | dict(root.named_buffers()).keys()
    return {n: n.replace("_scale_", "_zero_point_") for n in sorted(names)
            if "_scale_" in n and n.replace("_scale_", "_zero_point_") in names}


def activation_qparams(twin: nn.Module) -> dict[str, tuple[float, int]]:
    """The twin's calibrated activation quantizers: name -> (scale, zero point)."""
    found: dict[str, tuple[float, int]] = {}
    if isinstance(twin, Int8Model):
        root = twin.graph
        for name, module in root.named_modules():
            if hasattr(module, "scale") and hasattr(module, "zero_point") and hasattr(module, "set_weight_bias"):
                found[f"{name}.output"] = (float(module.scale), int(module.zero_point))
        for scale, zero in _fx_scale_buffers(root).items():
            found[f"graph.{scale}"] = (float(getattr(root, scale)), int(getattr(root, zero)))
        return found
    for name, module in twin.named_modules():
        if isinstance(module, FakeQuantLayer) and module.act_qparams is not None:
            found[f"{name}.input"] = (float(module.act_qparams.scale), int(module.act_qparams.zero_point))
    return found


def calibration_document(twin: nn.Module, source: dict) -> str:
    """The artifact's JSON text: its source, then one quantizer a line (scales as the exact decimal repr
    of their float32)."""
    rows = [f"  {json.dumps(name)}: [{scale!r}, {zero}]" for name, (scale, zero) in sorted(activation_qparams(twin).items())]
    return (f'{{"format": {FORMAT}, "source": {json.dumps(source, sort_keys=True)}, "qparams": {{\n'
            + ",\n".join(rows) + "\n}}\n")


def apply_shipped(twin: nn.Module, path: Path, source: dict) -> dict:
    """Set the twin's activation quantizers to the shipped ones (see the module docstring); returns what
    the report records of it. Raises InvalidArgument naming the file and the first mismatch."""
    document = json.loads(path.read_text(encoding="utf-8"))
    source = json.loads(json.dumps(source))  # tuples as the file holds them: lists
    stale = "the file is stale, rerun tools/calibrate_builtins.py"
    shipped_source = document.get("source") if document.get("format") == FORMAT else None
    if not isinstance(shipped_source, dict):
        raise InvalidArgument(f"{path}: not a format-{FORMAT} calibration with a source: {stale}")
    for key in sorted(source.keys() | shipped_source.keys()):
        if shipped_source.get(key) != source.get(key):
            raise InvalidArgument(f"{path}: source {key}: shipped {_short(shipped_source.get(key))}, this twin's "
                                  f"{_short(source.get(key))}: {stale}")
    shipped = {k: (float(s), int(z)) for k, (s, z) in document["qparams"].items()}
    fresh = activation_qparams(twin)
    if set(shipped) != set(fresh):
        missing = sorted(set(fresh) - set(shipped)) or sorted(set(shipped) - set(fresh))
        raise InvalidArgument(f"{path}: {len(shipped)} quantizers shipped, the twin has {len(fresh)} "
                              f"({missing[0]} is in only one): {stale}")
    moved, largest = 0, 0.0
    for name, (scale, zero) in shipped.items():
        here_scale, here_zero = fresh[name]
        if not math.isclose(scale, here_scale, rel_tol=STALE_RELATIVE):
            raise InvalidArgument(f"{path}: {name}: shipped scale {scale!r}, calibrated here {here_scale!r}, "
                                  f"more than {STALE_RELATIVE:.0%} apart: {stale}")
        moved += (scale, zero) != (here_scale, here_zero)
        largest = max(largest, abs(scale - here_scale) / scale)
        _set(twin, name, scale, zero)
    return {"shipped": path.name, "quantizers": len(shipped), "differed_here": moved,
            "largest_scale_difference_here": float(f"{largest:.3g}")}


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _set(twin: nn.Module, name: str, scale: float, zero: int) -> None:
    where, _, role = name.rpartition(".")
    if isinstance(twin, Int8Model):
        root = twin.graph
        if where == "graph":
            zero_name = role.replace("_scale_", "_zero_point_")
            setattr(root, role, torch.tensor(scale, dtype=getattr(root, role).dtype))
            setattr(root, zero_name, torch.tensor(zero, dtype=getattr(root, zero_name).dtype))
        else:
            module = root.get_submodule(where)
            module.scale, module.zero_point = float(torch.tensor(scale, dtype=torch.float32)), zero
        return
    layer = twin.get_submodule(where)
    old = layer.act_qparams
    layer.act_qparams = QParams(torch.tensor(scale, dtype=torch.float32), torch.tensor(zero), old.q_min, old.q_max)
