"""Quantizer math in pure torch: integer grids, quantization parameters, (fake) quantization, observers.

Everything follows ../shared/DESIGN.md "Quantizer math" and PyTorch's own conventions, so results can
be checked against ``torch.fake_quantize_per_tensor_affine`` and friends:

* grid for ``bits`` b: signed ``[-2^(b-1), 2^(b-1)-1]``, unsigned ``[0, 2^b-1]``;
* affine: the range is widened to include 0 so that 0.0 is exactly representable;
* symmetric: ``z = 0`` on a signed grid (PyTorch's ``qint8`` convention; on an unsigned grid PyTorch
  uses the grid midpoint and so do we);
* ``Q(x) = clamp(round(x / s) + z, q_min, q_max)``, round half to even; ``D(q) = s (q - z)``;
* the straight-through estimator passes the gradient where ``round(x / s) + z`` is on the grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qrobust.errors import invalid

EPS = torch.finfo(torch.float32).eps


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise invalid("bits", bits, "must be an integer from 1 to 16")
    return bits


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer grid ``(q_min, q_max)`` for ``bits`` bits."""
    check_bits(bits)
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of a (per-tensor or per-channel) quantizer, with its integer grid.

    ``scale`` is float32 and ``zero_point`` int64; both are 0-d for per-tensor quantization and 1-d
    (one entry per slice along ``axis``) for per-channel quantization.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    q_min: int
    q_max: int
    axis: int | None = None

    def _broadcast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.axis is None:  # a twin moved to another device takes its quantizers along: they follow x
            return self.scale.to(x.device), self.zero_point.to(x.device)
        axis = _check_axis(self.axis, x)
        if x.shape[axis] != self.scale.numel():
            raise invalid("x", tuple(x.shape), f"has {x.shape[axis]} slices on axis {axis}, qparams have {self.scale.numel()}")
        shape = [1] * x.dim()
        shape[axis] = -1
        return self.scale.reshape(shape).to(x.device), self.zero_point.reshape(shape).to(x.device)

    @property
    def representable(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float interval the grid covers: ``[s (q_min - z), s (q_max - z)]``."""
        return self.scale * (self.q_min - self.zero_point), self.scale * (self.q_max - self.zero_point)


def _check_axis(axis: int, x: torch.Tensor) -> int:
    if not -x.dim() <= axis < x.dim():
        raise invalid("axis", axis, f"out of range for a tensor of rank {x.dim()}")
    return axis % x.dim()


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise invalid(name, f"<tensor with {bad} NaN/Inf of {t.numel()}>", "values must be finite")


def compute_qparams(x_min, x_max, bits: int = 8, symmetric: bool = False, signed: bool = True,
                    axis: int | None = None) -> QParams:
    """Quantization parameters from an observed range (scalars, or one entry per channel)."""
    q_min, q_max = quant_range(bits, signed)
    x_min = torch.as_tensor(x_min, dtype=torch.float32)
    x_max = torch.as_tensor(x_max, dtype=torch.float32)
    _check_finite("x_min", x_min)
    _check_finite("x_max", x_max)
    if (x_min > x_max).any():
        raise invalid("x_min", x_min.tolist(), f"exceeds x_max={x_max.tolist()}")
    if axis is None and x_min.dim() != 0:
        raise invalid("x_min", tuple(x_min.shape), "per-tensor qparams need 0-d ranges (pass axis for per-channel)")
    lo = torch.clamp(x_min, max=0.0)
    hi = torch.clamp(x_max, min=0.0)
    if symmetric:
        scale = torch.maximum(-lo, hi) / ((q_max - q_min) / 2)
        scale = torch.clamp(scale, min=EPS)
        zp = 0 if signed else (q_min + q_max + 1) // 2
        zero_point = torch.full_like(scale, zp, dtype=torch.int64)
    else:
        scale = torch.clamp((hi - lo) / (q_max - q_min), min=EPS)
        zero_point = torch.clamp(q_min - torch.round(lo / scale), q_min, q_max).to(torch.int64)
    return QParams(scale, zero_point, q_min, q_max, axis)


def qparams_for(x: torch.Tensor, bits: int = 8, symmetric: bool = False, signed: bool = True,
                axis: int | None = None) -> QParams:
    """Min/max quantization parameters of ``x`` itself (per tensor, or per slice along ``axis``)."""
    _check_finite("x", x)
    if x.numel() == 0:
        raise invalid("x", tuple(x.shape), "cannot derive qparams from an empty tensor")
    if axis is None:
        return compute_qparams(x.min(), x.max(), bits, symmetric, signed)
    axis = _check_axis(axis, x)
    flat = x.detach().movedim(axis, 0).reshape(x.shape[axis], -1)
    return compute_qparams(flat.min(dim=1).values, flat.max(dim=1).values, bits, symmetric, signed, axis)


def _unclamped(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    scale, zero_point = qp._broadcast(x)
    return torch.round(x / scale) + zero_point


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``Q(x)``: the integer codes (int32), saturated to the grid."""
    return torch.clamp(_unclamped(x, qp), qp.q_min, qp.q_max).to(torch.int32)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``D(q) = s (q - z)`` as float32."""
    scale, zero_point = qp._broadcast(q)
    return scale * (q.to(torch.float32) - zero_point)


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qp: QParams):
        codes = _unclamped(x, qp)
        ctx.save_for_backward((codes >= qp.q_min) & (codes <= qp.q_max))
        scale, zero_point = qp._broadcast(x)
        return (scale * (torch.clamp(codes, qp.q_min, qp.q_max) - zero_point)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``D(Q(x))`` with the straight-through gradient (1 on the grid, 0 where it saturates)."""
    return _FakeQuantizeSTE.apply(x, qp)


class MinMaxObserver:
    """Tracks the running min and max (per tensor, or per slice along ``axis``)."""

    def __init__(self, bits: int = 8, symmetric: bool = False, signed: bool = False, axis: int | None = None):
        quant_range(bits, signed)
        self.bits, self.symmetric, self.signed, self.axis = bits, symmetric, signed, axis
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_finite("x", x)
        if x.numel() == 0:
            raise invalid("x", tuple(x.shape), "an observer cannot observe an empty tensor")
        x = x.detach().float().cpu()  # observed state lives on the CPU, wherever the model runs
        if self.axis is None:
            return x.min(), x.max()
        flat = x.movedim(_check_axis(self.axis, x), 0).reshape(x.shape[self.axis], -1)
        return flat.min(dim=1).values, flat.max(dim=1).values

    def _update(self, new_min: torch.Tensor, new_max: torch.Tensor) -> None:
        if self.min_val is None:
            self.min_val, self.max_val = new_min, new_max
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, new_min), torch.maximum(self.max_val, new_max)

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """Record ``x`` and return it unchanged (so observers can sit in a forward pass)."""
        self._update(*self._reduce(x))
        return x

    def observed_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min_val is None:
            raise invalid("observer", type(self).__name__, "has observed no data (empty calibration set?)")
        return self.min_val, self.max_val

    def qparams(self) -> QParams:
        lo, hi = self.observed_range()
        return compute_qparams(lo, hi, self.bits, self.symmetric, self.signed, self.axis)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min and max (as PyTorch's, ``averaging_constant`` c)."""

    def __init__(self, bits: int = 8, symmetric: bool = False, signed: bool = False, axis: int | None = None,
                 averaging_constant: float = 0.01):
        super().__init__(bits, symmetric, signed, axis)
        if not 0.0 < averaging_constant <= 1.0:
            raise invalid("averaging_constant", averaging_constant, "must be in (0, 1]")
        self.averaging_constant = averaging_constant

    def _update(self, new_min: torch.Tensor, new_max: torch.Tensor) -> None:
        if self.min_val is None:
            self.min_val, self.max_val = new_min, new_max
            return
        c = self.averaging_constant
        self.min_val = self.min_val + c * (new_min - self.min_val)
        self.max_val = self.max_val + c * (new_max - self.max_val)


class HistogramObserver(MinMaxObserver):
    """Per-tensor histogram of every observed value; the range is cut at percentiles to clip outliers.

    The histogram spans the running [min, max] with ``bins`` equal bins; when a batch widens the range,
    the old counts are re-binned by their bin centres. ``qparams`` keeps the central ``percentile`` % of
    the mass: the lower cut is the bin edge where (100 - percentile) % of the values lie below, the
    upper cut the edge with (100 - percentile) % above.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, signed: bool = False, bins: int = 2048,
                 percentile: float = 99.99):
        super().__init__(bits, symmetric, signed, axis=None)
        if not isinstance(bins, int) or bins < 2:
            raise invalid("bins", bins, "must be an integer >= 2")
        if not 50.0 < percentile <= 100.0:
            raise invalid("percentile", percentile, "must be in (50, 100]")
        self.bins, self.percentile = bins, percentile
        self.counts = torch.zeros(bins, dtype=torch.float64)

    def _edges(self) -> torch.Tensor:
        return torch.linspace(self.min_val.item(), self.max_val.item(), self.bins + 1, dtype=torch.float64)

    def _bin_index(self, values: torch.Tensor) -> torch.Tensor:
        lo, hi = self.min_val.item(), self.max_val.item()
        if hi <= lo:
            return torch.zeros_like(values, dtype=torch.int64)
        idx = ((values.double() - lo) / (hi - lo) * self.bins).floor().to(torch.int64)
        return idx.clamp_(0, self.bins - 1)

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        new_min, new_max = self._reduce(x)
        if self.min_val is not None and (new_min < self.min_val or new_max > self.max_val):
            edges = self._edges()
            centres = (edges[:-1] + edges[1:]) / 2
            old_counts = self.counts
            self._update(new_min, new_max)
            self.counts = torch.bincount(self._bin_index(centres), weights=old_counts, minlength=self.bins)
        elif self.min_val is None:
            self._update(new_min, new_max)
        self.counts += torch.bincount(self._bin_index(x.detach().reshape(-1).cpu()), minlength=self.bins).double()
        return x

    def observed_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = super().observed_range()
        if hi <= lo or self.percentile == 100.0:
            return lo, hi
        cdf = torch.cumsum(self.counts, 0) / self.counts.sum()
        tail = (100.0 - self.percentile) / 100.0
        edges = self._edges()
        lo_idx = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64), right=True))
        hi_idx = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=torch.float64)))
        cut_lo = edges[min(lo_idx, self.bins - 1)]
        cut_hi = edges[min(hi_idx, self.bins - 1) + 1]
        return cut_lo.float().clamp(min=lo), cut_hi.float().clamp(max=hi)


OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "histogram": HistogramObserver,
}


def make_observer(kind: str, bits: int, symmetric: bool, signed: bool, axis: int | None = None) -> MinMaxObserver:
    """Observer by name (``minmax``, ``moving_average``, ``histogram``); histograms are per tensor only."""
    if kind not in OBSERVERS:
        raise invalid("observer", kind, f"unknown observer (known: {', '.join(OBSERVERS)})")
    if kind == "histogram":
        if axis is not None:
            raise invalid("axis", axis, "the histogram observer is per-tensor only")
        return HistogramObserver(bits, symmetric, signed)
    return OBSERVERS[kind](bits, symmetric, signed, axis)


__all__ = [
    "EPS", "QParams", "quant_range", "compute_qparams", "qparams_for", "quantize", "dequantize",
    "fake_quantize", "MinMaxObserver", "MovingAverageMinMaxObserver", "HistogramObserver", "make_observer",
    "check_bits",
]
