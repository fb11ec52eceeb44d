"""Gate power with tolerances fitted to the benign spread (``qrobust propose``), from a kept gate-power report.

The LeNet twins of ``gate_power.py`` are all gated with ``lenet5-digits-int8-x86``'s sweep. Two benign
int8 recalibrations (another calibration subset, the fbgemm engine) are the benign runs ``qrobust
propose`` fits tolerances to (``--benign``); the built-in gate's tolerances stay the ceiling. Every other
twin is then judged by the point decision against the fitted tolerances, on the values the report already
holds (no second gate run): the faults, and the held-out benign twins (calibrated on 1,024 digits,
histogram observers, 16 bits) that measure the false alarms of fitting.

Run: .venv/bin/python benchmarks/gate_power.py --pairs lenet --keep-report DIR
     .venv/bin/python benchmarks/gate_power_fitted.py DIR/report.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import qrobust
from qrobust.gate.config import load_thresholds
from qrobust.gate.propose import propose
from qrobust.gate.verdict import counted_estimate, decide, has_counts
from qrobust.metrics.catalog import METRICS

PAIR = "lenet5-digits-int8-x86"
FIT_ON = ["recalibrated_other_subset", "fbgemm_engine"]


def point_verdict(record: dict, tolerance: float) -> bool:
    """Whether the point decision fails ``record`` against ``tolerance`` (counted metrics exactly)."""
    details = record.get("details") or {}
    exact = counted_estimate(record["metric"], details, record["n"])[0] if has_counts(record["metric"], details) else None
    return not decide(record["value"], None, tolerance, METRICS[record["metric"]].higher_is_better, "point",
                      exact_estimate=exact).passed


def main(report_path: str) -> None:
    report = json.loads(Path(report_path).read_text())
    thresholds = load_thresholds(Path(qrobust.__file__).parent / "thresholds.yaml")
    fitted = propose([report], thresholds, PAIR, FIT_ON)
    twins = sorted({c["pair"] for c in report["cases"]} - set(FIT_ON))
    print("| twin | fitted tolerances: checks failed | strongest (value vs fitted tolerance, built-in) |")
    print("|---|---|---|")
    for twin in twins:
        failed = []
        for c in report["cases"]:
            key = (c["perturbation"], float(c["level"]), c["metric"])
            if c["pair"] != twin or c.get("value") is None:
                continue
            if key in fitted and point_verdict(c, fitted[key]["tolerance"]):
                failed.append((abs(c["value"] - fitted[key]["tolerance"]) / max(fitted[key]["noise"], 1e-12), c,
                               fitted[key]))
            elif key not in fitted and c["verdict"] == "fail":  # checks fitting leaves alone (coverage, quantizer)
                failed.append((float("inf"), c, {"tolerance": c["tolerance"], "ceiling": c["tolerance"]}))
        if failed:
            _, c, f = max(failed, key=lambda t: t[0])
            strongest = (f"{c['metric']} {c['value']:.4g} vs {f['tolerance']:.4g} ({f['ceiling']:g}) at "
                         f"{c['perturbation']} {c['level']:g}")
        else:
            strongest = "-"
        print(f"| `{twin}` | {len(failed)} | {strongest} |")
    print(f"\nfitted on {', '.join(FIT_ON)} ({len(fitted)} checks); n = {report['cases'][0]['n']}")


if __name__ == "__main__":
    main(sys.argv[1])
