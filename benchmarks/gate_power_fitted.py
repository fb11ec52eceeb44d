"""Gate power with tolerances fitted to the benign spread (``qrobust propose``), from a kept gate-power report.

The LeNet twins of ``gate_power.py`` are all gated with ``lenet5-digits-int8-x86``'s sweep. Per kind of
twin (real int8, explained by EigenCAM; fake-quant, explained by Grad-CAM++: their CAM metrics are not
comparable), benign variants are the runs ``qrobust propose`` fits tolerances to (``--benign``): two
int8 recalibrations (another calibration subset, the fbgemm engine) and the histogram fake-quant recipe.
The built-in gate's tolerances stay the ceiling. Every other twin is then judged by the point decision
against its kind's fitted tolerances, on the values the report already holds (no second gate run): the
faults, and the held-out benign twins (calibrated on 1,024 digits; 16 bits) that measure the false alarms
of fitting.

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
FIT_ON = {"int8": ["recalibrated_other_subset", "fbgemm_engine"], "fake": ["histogram_fake_quant"]}


def point_verdict(record: dict, tolerance: float) -> bool:
    """Whether the point decision fails ``record`` against ``tolerance`` (counted metrics exactly)."""
    details = record.get("details") or {}
    exact = counted_estimate(record["metric"], details, record["n"])[0] if has_counts(record["metric"], details) else None
    return not decide(record["value"], None, tolerance, METRICS[record["metric"]].higher_is_better, "point",
                      exact_estimate=exact).passed


def main(report_path: str) -> None:
    report = json.loads(Path(report_path).read_text())
    thresholds = load_thresholds(Path(qrobust.__file__).parent / "thresholds.yaml")
    kinds = {name: p["kind"] for name, p in report["environment"]["pairs"].items()}
    fits = {kind: propose([report], thresholds, PAIR, names) for kind, names in FIT_ON.items()
            if any(kinds.get(name) == kind for name in names)}
    twins = sorted({c["pair"] for c in report["cases"]} - {n for names in FIT_ON.values() for n in names})
    print("| twin | fitted tolerances: checks failed | strongest (value vs fitted tolerance, built-in) |")
    print("|---|---|---|")
    for twin in twins:
        if kinds[twin] not in fits:
            print(f"| `{twin}` | no benign {kinds[twin]} twin in the report to fit to | |")
            continue
        fitted, failed = fits[kinds[twin]], []
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
    print(f"\nfitted on {'; '.join(f'{kind}: ' + ', '.join(FIT_ON[kind]) for kind in fits)}; "
          f"n = {report['cases'][0]['n']}")


if __name__ == "__main__":
    main(sys.argv[1])
