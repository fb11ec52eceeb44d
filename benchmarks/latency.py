"""FP32 versus quantized latency of registered pairs, measured interleaved (qrobust.timing).

Run: .venv/bin/python benchmarks/latency.py [pair ...]   (default: lenet5-digits-int8-x86)
"""
from __future__ import annotations

import sys

import torch

from qrobust.pairs import load_pair
from qrobust.timing import interleaved_speedup


def main(names: list[str], batches=(1, 32), rounds: int = 30) -> list[dict]:
    rows = []
    for name in names:
        pair = load_pair(name)
        h, w = pair.preprocess.resolution
        for batch in batches:
            x = pair.preprocess.normalize(torch.rand(batch, pair.preprocess.channels, h, w))
            s = interleaved_speedup(pair.fp32, pair.quantized, x, rounds=rounds)
            rows.append({"pair": name, "batch": batch, "threads": torch.get_num_threads(), "fp32_ms": s.fp32_ms,
                         "quantized_ms": s.quantized_ms, "speedup": s.speedup, "interval": s.interval})
    return rows


if __name__ == "__main__":
    for r in main(sys.argv[1:] or ["lenet5-digits-int8-x86"]):
        print(f"{r['pair']:28s} batch {r['batch']:>3} threads {r['threads']}: fp32 {r['fp32_ms']:.3f} ms, "
              f"quantized {r['quantized_ms']:.3f} ms, speedup {r['speedup']:.2f}x "
              f"[{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]")
