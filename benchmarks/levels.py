"""Per-level numbers of pairs over every perturbation: accuracy delta with its interval, agreement, KL, CAM
agreement. Run: .venv/bin/python benchmarks/levels.py [int8_pair fake_pair]  (prints a Markdown table)."""
from __future__ import annotations

import sys

from qrobust.gate.engine import Evaluator
from qrobust.models import load_pair
from qrobust.data.perturbations import PERTURBATIONS


def main(int8_name: str = "lenet5-digits-int8-x86", fake_name: str = "lenet5-digits-w8a8") -> None:
    pairs = [load_pair(int8_name), load_pair(fake_name)]
    cases = {(p.name, pert, float(lv)) for p in pairs for pert in PERTURBATIONS for lv in PERTURBATIONS.get(pert).levels}
    ev = Evaluator(pairs, cam_cases=cases)
    print("| perturbation | level | FP32 top-1 | int8 top-1 | top1_delta [95% CI] | McNemar p | agreement | "
          "KL mean [95% CI] | KL p95 | int8 EigenCAM SIM / CC | fake Grad-CAM++ SIM / RMSE |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for pert in PERTURBATIONS:
        for lv in PERTURBATIONS.get(pert).levels:
            r = ev.evaluate(int8_name, pert, lv, cam=True).estimates
            f = ev.evaluate(fake_name, pert, lv, cam=True).estimates
            d, k = r["top1_delta"], r["kl_mean"]
            print(f"| {pert} | {lv:g} | {r['top1_fp32'].value:.3f} | {r['top1_quant'].value:.3f} | {d.value:+.4f} "
                  f"[{d.interval[0]:+.4f}, {d.interval[1]:+.4f}] | {d.details['mcnemar_p']:.3f} | "
                  f"{r['agreement'].value:.3f} | {k.value:.4f} [{k.interval[0]:.4f}, {k.interval[1]:.4f}] | "
                  f"{r['kl_p95'].value:.4f} | {r['cam_sim'].value:.3f} / {r['cam_cc'].value:.3f} | "
                  f"{f['cam_sim'].value:.3f} / {f['cam_rmse'].value:.4f} |")
    print("forwards per perturbed batch:", ev.forward_report()["forwards_per_perturbed_batch"])


if __name__ == "__main__":
    main(*sys.argv[1:3])
