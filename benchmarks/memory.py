"""Peak RSS of one evaluation over N generated digit views: the engine's memory must not grow with N.

Run: .venv/bin/python benchmarks/memory.py [1000 10000 ...]
Each N runs in a fresh process (peak RSS is per process); the dataset is streamed (digit test images
shifted by up to 2 px, one group per source digit), so only the engine's own state could grow.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def child(samples: int) -> dict:
    import torch

    from qrobust.data import Batch, StreamingSet, load_dataset
    from qrobust.gate.engine import Evaluator
    from qrobust.models import load_pair

    test = load_dataset("digits-test")
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]

    def load(indices: torch.Tensor) -> Batch:
        src = indices % len(test)
        images = torch.stack([test.images[s].roll(shifts[int(i) // len(test) % 25], dims=(1, 2))
                              for s, i in zip(src.tolist(), indices.tolist())])
        return Batch(images, test.labels[src], indices.clone(), test.ids[src])

    pair = load_pair("lenet5-digits-int8-x86")
    data = StreamingSet("digits-views", samples, 10, load)
    ev = Evaluator([pair], datasets={"digits-test": data}, batch_size=64)
    start = time.perf_counter()
    result = ev.evaluate(pair.name, "awgn", 0.2)
    elapsed = time.perf_counter() - start
    return {"samples": result.n, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": round(elapsed, 2), "agreement": result.metric("agreement").value}


def main(sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(int(sys.argv[2]))))
    else:
        rows = main([int(a) for a in sys.argv[1:]] or [1000, 10000])
        for r in rows:
            print(f"{r['samples']:>6} samples: peak RSS {r['peak_rss_mib']:.1f} MiB, {r['seconds']} s, "
                  f"agreement {r['agreement']:.4f}")
        print(f"growth: {100 * (rows[-1]['peak_rss_mib'] / rows[0]['peak_rss_mib'] - 1):+.1f}%")
