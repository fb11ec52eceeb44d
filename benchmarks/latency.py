"""FP32 versus quantized latency, measured interleaved (A, B, A, B, ...) so machine load hits both alike.

Run: .venv/bin/python benchmarks/latency.py [pair ...]   (default: lenet5-digits-int8-x86)
"""
from __future__ import annotations

import statistics
import sys
import time

import torch


def interleaved_latency(fp32, quantized, x: torch.Tensor, rounds: int = 30, warmup: int = 3) -> dict:
    """Median seconds per call of each model and the speedup fp32 / quantized."""
    times = {"fp32": [], "quantized": []}
    with torch.inference_mode():
        for _ in range(warmup):
            fp32(x)
            quantized(x)
        for _ in range(rounds):
            for name, model in (("fp32", fp32), ("quantized", quantized)):
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"fp32_ms": med["fp32"] * 1e3, "quantized_ms": med["quantized"] * 1e3, "speedup": med["fp32"] / med["quantized"]}


def main(names: list[str]) -> list[dict]:
    from qrobust.pairs import load_pair

    rows = []
    for name in names:
        pair = load_pair(name)
        h, w = pair.preprocess.resolution
        for batch in (1, 32):
            x = torch.rand(batch, pair.preprocess.channels, h, w)
            rows.append({"pair": name, "batch": batch, "threads": torch.get_num_threads(),
                         **interleaved_latency(pair.fp32, pair.quantized, pair.preprocess.normalize(x))})
    return rows


if __name__ == "__main__":
    for r in main(sys.argv[1:] or ["lenet5-digits-int8-x86"]):
        print(f"{r['pair']:28s} batch {r['batch']:>3} threads {r['threads']}: fp32 {r['fp32_ms']:.3f} ms, "
              f"quantized {r['quantized_ms']:.3f} ms, speedup {r['speedup']:.2f}x")
