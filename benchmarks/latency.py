"""FP32 versus quantized latency, measured interleaved (qrobust.timing): registered pairs, and the seed 002
torchvision architectures converted to int8 (random weights: latency does not depend on them).

Run: .venv/bin/python benchmarks/latency.py [pair ...]   (default: lenet5-digits-int8-x86)
     .venv/bin/python benchmarks/latency.py --archs        (ResNet18 and MobileNetV2, batch 1 and 32)
"""
from __future__ import annotations

import sys

import torch

from qrobust.models import load_pair
from qrobust.metrics.timing import interleaved_speedup


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


def archs(names=("resnet18", "mobilenet_v2"), batches=(1, 32), rounds: int = 10) -> list[dict]:
    from qrobust.quant import get_preset, quantize_model
    from qrobust.models.archs import build_arch

    rows = []
    for name in names:
        fp32 = build_arch(name, weights="random")
        calibration = [torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))]
        int8 = quantize_model(fp32, get_preset("int8-x86"), calibration)
        for batch in batches:
            s = interleaved_speedup(fp32, int8, torch.randn(batch, 3, 224, 224), rounds=rounds)
            rows.append({"pair": f"{name} (int8-x86)", "batch": batch, "threads": torch.get_num_threads(),
                         "fp32_ms": s.fp32_ms, "quantized_ms": s.quantized_ms, "speedup": s.speedup,
                         "interval": s.interval})
    return rows


if __name__ == "__main__":
    for r in (archs() if sys.argv[1:] == ["--archs"] else main(sys.argv[1:] or ["lenet5-digits-int8-x86"])):
        print(f"{r['pair']:28s} batch {r['batch']:>3} threads {r['threads']}: fp32 {r['fp32_ms']:.3f} ms, "
              f"quantized {r['quantized_ms']:.3f} ms, speedup {r['speedup']:.2f}x "
              f"[{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]")
