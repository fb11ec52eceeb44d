"""Latency of an FP32 model against its quantized twin, measured interleaved in one run.

Absolute times depend on the machine and its load; the ratio of two models timed alternately
(A, B, A, B, ...) in the same process does far less, so the gate is the speedup, never a time.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from qrobust.metrics.stats import quantile_rank_interval


@dataclass(frozen=True)
class Speedup:
    fp32_ms: float  # median per call
    quantized_ms: float
    speedup: float  # median of per-round fp32 / quantized ratios
    interval: tuple[float, float]  # order-statistic 95% interval of that median
    rounds: int


def interleaved_speedup(fp32, quantized, x: torch.Tensor, x_quantized: torch.Tensor | None = None,
                        rounds: int = 20, warmup: int = 3) -> Speedup:
    """Time ``fp32(x)`` against ``quantized(x_quantized)`` (the same batch, on the twin's device when it
    differs; models, or any callables such as a CAM computation)."""
    xq = x if x_quantized is None else x_quantized
    fp_times, q_times = [], []
    with torch.no_grad():
        for _ in range(warmup):
            fp32(x)
            quantized(xq)
        _synchronize(x, xq)
        for _ in range(rounds):
            start = time.perf_counter()
            fp32(x)
            _synchronize(x)
            middle = time.perf_counter()
            quantized(xq)
            _synchronize(xq)
            fp_times.append(middle - start)
            q_times.append(time.perf_counter() - middle)
    ratios = sorted(f / q for f, q in zip(fp_times, q_times))
    lo, hi = quantile_rank_interval(rounds, 0.5)
    return Speedup(statistics.median(fp_times) * 1e3, statistics.median(q_times) * 1e3, statistics.median(ratios),
                   (ratios[lo - 1], ratios[hi - 1]), rounds)


def _synchronize(*tensors: torch.Tensor) -> None:
    """Wait for queued GPU work, so a time is the model's and not the launch's."""
    for t in tensors:
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
