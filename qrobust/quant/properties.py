"""Quantizer properties of a twin's own quantized layers, checked with Hypothesis (DESIGN "Quantizer math").

For every quantizer in the twin (each layer's weights, per tensor or per channel, and each activation
grid: a converted layer's output, an FX graph's input quantization, a fake-quant layer's input):

* every scale is finite and > 0, every zero point a whole number on the integer grid;
* 0.0 is exactly representable;
* quantizing drawn values and dequantizing them again errs by at most scale / 2 inside the grid's range,
  and saturates to the range's ends outside it;
* per-channel parameters have one entry per output channel of the weight;
* for real int8 layers, PyTorch's own quantize op (the one the kernels consume) gives the codes of
  ``kernel_code``, the reference computed as the kernels compute it; a value within float32 precision
  of a half step may round either way (``torch_code_mismatch``).

Each failure is one line naming the layer, the property and the drawn counterexample. Runs are
derandomized and bounded (``examples`` draws per quantizer), so a gate's verdict does not change by chance.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qrobust.quant.convert import FakeQuantLayer, is_int8, is_runtime, layer_root
from qrobust.quant.quantizer import QParams, dequantize, quantize


@dataclass(frozen=True)
class Quantizer:
    """One quantizer of a twin: where it is, its parameters, and (for real int8) the torch dtype."""

    where: str
    qparams: QParams
    dtype: torch.dtype | None = None  # torch.qint8 / torch.quint8 for a real int8 quantizer
    channels: int | None = None  # the weight's output channels, for per-channel weights


def _grid(dtype: torch.dtype) -> tuple[int, int]:
    info = torch.iinfo({torch.qint8: torch.int8, torch.quint8: torch.uint8, torch.qint32: torch.int32}[dtype])
    return info.min, info.max


def _from_qtensor(where: str, q: torch.Tensor, channels: int | None = None) -> Quantizer:
    lo, hi = _grid(q.dtype)
    if q.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        qp = QParams(q.q_per_channel_scales().float(), q.q_per_channel_zero_points().long(), lo, hi,
                     q.q_per_channel_axis())
    else:
        qp = QParams(torch.tensor(q.q_scale(), dtype=torch.float32), torch.tensor(q.q_zero_point()), lo, hi)
    return Quantizer(where, qp, q.dtype, channels)


def _from_graph(params: list[dict]) -> list[Quantizer]:
    """Quantizers of a runtime twin's graph (ONNX QuantizeLinear/DequantizeLinear constants)."""
    found = []
    for p in params:
        info = torch.iinfo({"uint8": torch.uint8, "int8": torch.int8}.get(str(p["zero_point"].dtype), torch.int32))
        qp = QParams(torch.tensor(p["scale"]).float(), torch.tensor(p["zero_point"]).long(), info.min, info.max,
                     p["axis"])
        found.append(Quantizer(p["where"], qp, channels=p["channels"] if p["axis"] is not None else None))
    return found


def quantizers(twin: torch.nn.Module) -> list[Quantizer]:
    """Every quantizer of a fake-quant, FX int8 or ONNX Runtime (QDQ) twin."""
    if is_runtime(twin):
        return _from_graph(twin.quant_params())
    root, found = layer_root(twin), []
    if is_int8(twin):
        for name, module in root.named_modules():
            weight = getattr(module, "weight", None)
            if callable(weight) and hasattr(module, "scale") and hasattr(module, "zero_point"):
                w = weight()
                if isinstance(w, torch.Tensor) and w.is_quantized:
                    found.append(_from_qtensor(f"{name}.weight", w, w.shape[0]))
                    lo, hi = _grid(torch.quint8)
                    found.append(Quantizer(f"{name}.output", QParams(torch.tensor(float(module.scale)),
                                                                      torch.tensor(int(module.zero_point)), lo, hi),
                                           torch.quint8))
        buffers = dict(root.named_buffers()) | {k: v for k, v in vars(root).items() if isinstance(v, torch.Tensor)}
        for name in sorted(buffers):  # FX's quantize_per_tensor arguments: <x>_scale_<n> / <x>_zero_point_<n>
            match = re.fullmatch(r"(.*)scale_(\d+)", name)
            zero = buffers.get(f"{match.group(1)}zero_point_{match.group(2)}") if match else None
            if zero is not None:
                lo, hi = _grid(torch.quint8)
                found.append(Quantizer(f"graph.{name}", QParams(buffers[name].float().reshape(()),
                                                                zero.long().reshape(()), lo, hi), torch.quint8))
        return found
    for name, module in root.named_modules():
        if isinstance(module, FakeQuantLayer):
            channels = module.layer.weight.shape[0]
            found.append(Quantizer(f"{name}.weight", module.weight_qparams,
                                   channels=channels if module.weight_qparams.axis is not None else None))
            if module.act_qparams is not None:
                found.append(Quantizer(f"{name}.input", module.act_qparams))
    return found


def _fail(q: Quantizer, prop: str, example) -> AssertionError:
    return AssertionError(f"{q.where}: {prop} (counterexample: {example})")


def check_parameters(q: Quantizer) -> None:
    """The properties that need no drawn values."""
    qp = q.qparams
    scales = qp.scale.double().reshape(-1)
    bad = (~torch.isfinite(scales)) | (scales <= 0)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise _fail(q, "scale must be finite and > 0", f"scale[{i}] = {float(scales[i])!r}")
    zeros = qp.zero_point.reshape(-1)
    off = (zeros < qp.q_min) | (zeros > qp.q_max)
    if zeros.is_floating_point():
        off |= zeros != zeros.round()
    if off.any():
        i = int(off.nonzero()[0])
        raise _fail(q, f"zero point must be a whole number in [{qp.q_min}, {qp.q_max}]", f"zero_point[{i}] = {zeros[i].item()!r}")
    if q.channels is not None and qp.axis is not None and scales.numel() != q.channels:
        raise _fail(q, "per-channel parameters need one entry per output channel",
                    f"{scales.numel()} scales for {q.channels} channels")
    per_slice = QParams(qp.scale, qp.zero_point, qp.q_min, qp.q_max, None if qp.axis is None else 0)
    zero = torch.zeros(scales.numel() if qp.axis is not None else 1)
    back = dequantize(quantize(zero, per_slice), per_slice)
    if not torch.equal(back, zero):
        raise _fail(q, "0.0 must be exactly representable", f"0.0 -> {back.tolist()[:4]}")


def check_drawn_values(q: Quantizer, examples: int = 25) -> None:
    """Round trip inside the range, saturation outside it, and PyTorch's quantize op equal to the
    reference, on values Hypothesis draws around each channel's range (derandomized)."""
    qp = q.qparams
    scales, zeros = qp.scale.double().reshape(-1), qp.zero_point.reshape(-1)
    channels = scales.numel()

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.integers(0, channels - 1), st.floats(-1.5, 1.5, allow_nan=False), st.integers(0, 3))
    def drawn(channel, position, snap):
        s, z = float(scales[channel]), int(zeros[channel])
        low, high = s * (qp.q_min - z), s * (qp.q_max - z)
        value = low + (high - low) * (position + 1.5) / 3  # spans one range width beyond each end
        if snap:  # also exactly on the grid, and on a half step (ties round half to even)
            value = s * (round(value / s) + (0.5 if snap == 2 else 0.0))
        single = QParams(torch.tensor(s, dtype=torch.float32), torch.tensor(z), qp.q_min, qp.q_max)
        x = torch.tensor([value], dtype=torch.float32)
        code = quantize(x, single)
        back = float(dequantize(code, single))
        lo32, hi32 = float(dequantize(torch.tensor([qp.q_min]), single)), float(dequantize(torch.tensor([qp.q_max]), single))
        slack = 4 * torch.finfo(torch.float32).eps * max(abs(float(x)), abs(back))  # float32 rounding at a tie
        if lo32 <= float(x) <= hi32 and abs(back - float(x)) > s / 2 + slack + 1e-12:
            raise _fail(q, "round trip must err by at most scale / 2 inside the range",
                        f"channel {channel}: x = {float(x)!r} -> {back!r}, scale {s!r}")
        if float(x) > hi32 and back != hi32 or float(x) < lo32 and back != lo32:
            raise _fail(q, "values outside the range must saturate to its ends",
                        f"channel {channel}: x = {float(x)!r} -> {back!r}, range [{lo32!r}, {hi32!r}]")
        if q.dtype is not None and math.isfinite(s) and s > 0:
            mismatch = torch_code_mismatch(float(x), s, z, q.dtype)
            if mismatch:
                raise _fail(q, "PyTorch's quantize op must give the reference codes", f"channel {channel}: {mismatch}")

    drawn()


TIE_STEPS = 4  # float32 steps at the code within which rounding order decides a tie (see torch_code_mismatch)
VECTOR = 64  # long enough for the quantize op's vectorized kernel (AVX2: 8 floats, AVX-512: 16)


def kernel_code(x: float, scale: float, zero_point: int, q_min: int, q_max: int) -> int:
    """The code PyTorch's CPU quantize op gives ``x`` (FBGEMM's ``Quantize``, whose comment explains the
    choice): ``x`` times the float32 reciprocal of the scale, in float32, rounded half to even, plus the
    zero point, saturated to the grid. Matches torch 2.14's scalar and vectorized kernels exactly on
    20,000 values next to ties (adding the zero point before rounding, or dividing in float64, misses
    8-22% of them). Dividing in float64 moves exact float32 ties: 69.61763 / 0.27354667 is 254.50001 in
    float64 but 254.5 exactly in float32, which rounds to 254."""
    f32 = np.float32
    code = zero_point + int(np.rint(f32(x) * (f32(1.0) / f32(scale))))
    return min(max(code, q_min), q_max)


def tie_distance(x: float, scale: float, zero_point: int) -> tuple[float, float]:
    """How far the exact ``x / scale`` lies from a half step, and one float32 step (ulp) at the larger of
    it and the code: where the kernels round (the product, and in older kernels the zero point added
    before rounding). The scale given is a float32, so the exact quotient is a rational computed exactly."""
    exact = Fraction(x) / Fraction(scale)
    distance = abs(exact - math.floor(exact) - Fraction(1, 2))
    magnitude = max(abs(exact), abs(exact + zero_point))
    return float(distance), float(np.spacing(np.float32(magnitude + 1)))


def torch_code_mismatch(x: float, scale: float, zero_point: int, dtype: torch.dtype,
                        quantize_op=torch.quantize_per_tensor) -> str | None:
    """None when ``quantize_op`` (PyTorch's) gives ``kernel_code``'s code for ``x`` (alone, and in a
    vector, which takes the vectorized kernel), else the counterexample as text.

    A code one step away is accepted only where the exact value lies within ``TIE_STEPS`` float32 steps
    of a half step: there a kernel's rounding order (a fused multiply-add, the zero point added before or
    after rounding, the reciprocal's own rounding) decides, and each CPU may decide differently. Anywhere
    else a difference is a real defect of the op or of the scale and zero point it was given."""
    q_min, q_max = _grid(dtype)
    expected = kernel_code(x, scale, zero_point, q_min, q_max)
    value = torch.tensor([x], dtype=torch.float32)
    for name, values in (("alone", value), ("in a vector", value.expand(VECTOR).contiguous())):
        with warnings.catch_warnings():  # quantized tensor creation is deprecated: this checks the kernels that use it
            warnings.simplefilter("ignore", UserWarning)
            theirs = quantize_op(values, scale, zero_point, dtype).int_repr().long()
        if bool((theirs == expected).all()):
            continue
        code = int(theirs[(theirs != expected).nonzero()[0]])
        distance, step = tie_distance(x, scale, zero_point)
        if abs(code - expected) == 1 and distance <= TIE_STEPS * step:
            continue
        return (f"x = {x!r}, scale {scale!r}, zero point {zero_point} ({name}): torch {code}, reference {expected} "
                f"(exact x / scale is {distance:.3g} from a half step, {distance / step:.3g} float32 steps)")
    return None


def check_twin(twin: torch.nn.Module, examples: int = 25) -> list[str]:
    """Every property of every quantizer of ``twin``; returns the failures (one line each)."""
    failures = []
    found = quantizers(twin)
    if not found:
        return ["no quantizer found in the twin (neither fake-quant layers, converted int8 modules nor "
                "QuantizeLinear/DequantizeLinear nodes)"]
    for q in found:
        try:
            check_parameters(q)
            check_drawn_values(q, examples)
        except AssertionError as exc:
            failures.append(str(exc).splitlines()[0])
    return failures
