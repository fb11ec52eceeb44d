"""All benchmarks, as the README's performance section reports them: `make bench`."""
from __future__ import annotations

import os
import platform
import sys

sys.path.insert(0, os.path.dirname(__file__))

import cam_speed  # noqa: E402
import gate_power  # noqa: E402
import latency  # noqa: E402
import memory  # noqa: E402
import onnx_twins  # noqa: E402
import overhead  # noqa: E402
import profile_gate  # noqa: E402
import host_matrix  # noqa: E402
import seed_stability  # noqa: E402


def main() -> None:
    import torch

    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print("\n## memory: peak RSS of one evaluation (awgn 0.2, LeNet int8) over streamed digit views")
    rows = memory.main([1000, 10000])
    for r in rows:
        print(f"{r['samples']:>6} samples: {r['peak_rss_mib']:.1f} MiB, {r['seconds']} s")
    print(f"growth 1k -> 10k: {100 * (rows[-1]['peak_rss_mib'] / rows[0]['peak_rss_mib'] - 1):+.1f}%")
    print("\n## latency: FP32 vs quantized, interleaved, median of the rounds (seed 002's comparison)")
    rows = (latency.main(["lenet5-digits-int8-x86"], batches=(1, 32, 64))
            + latency.main(["efficientnet-lite0-int8-tuned", "efficientnet-lite0-int8-x86"], batches=(1, 32), rounds=10)
            + latency.archs())
    for r in rows:
        print(f"{r['pair']} batch {r['batch']}: fp32 {r['fp32_ms']:.3f} ms, quantized {r['quantized_ms']:.3f} ms, "
              f"speedup {r['speedup']:.2f}x [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]")

    print("\n## CAM throughput vs pytorch-grad-cam (ResNet18, batch 16, 224 px)")
    for r in cam_speed.main():
        print(f"{r['method']}: qrobust {r['qrobust_s']:.3f} s, pytorch-grad-cam {r['grad_cam_s']:.3f} s "
              f"({r['speedup']:.2f}x); one inference forward {r['forward_s']:.3f} s")
    print("\n## where the time goes: the default gate and the ResNet18 scale pair under py-spy, by stage")
    profile_gate.main([])
    profile_gate.main(["scale", "256"])
    print("\n## overhead: the default gate's case evaluation vs the forwards and CAM passes it needs")
    for r in overhead.main():
        print(f"{r['pairs']}: {r['cases']} cases in {r['passes']} passes; gate {r['gate_s']} s, model work "
              f"{r['model_s']} s, overhead {r['overhead']:.2f}x; forwards per perturbed batch {r['forwards_per_batch']}")
    print("\n## ONNX Runtime twins vs torch FP32 on the built-in photos")
    onnx_twins.main()
    print("\n## gate power: seeded LeNet-5 and EfficientNet-Lite0 faults and benign variants through the default gate")
    gate_power.main([])
    print("\n## seed stability: the built-in gate at seeds 0-4 and on one thread, verdicts against seed 0's")
    seed_stability.main([])
    print("\n## host matrix: the built-in gate under every CPU variant this machine emulates, against this host's")
    host_matrix.main([])


if __name__ == "__main__":
    main()
