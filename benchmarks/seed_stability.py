"""Same gate, same verdicts, whatever the seed or the thread count: the built-in gate run with seeds 0-4
(and seed 0 on one thread), every check's verdict compared with seed 0's.

A check whose verdict differs between runs is a coin toss at its sample size; each is listed with
whether the runs flagged it fragile (the gate's own warning that a verdict may reverse).

Run: .venv/bin/python benchmarks/seed_stability.py [qrobust run options: --qrobust-pairs A,B, ...]   (a
built-in gate run per seed: about 5 minutes each on an idle 2-core machine)
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from gate_run import gate_report

RUNS = [("seed 0", 0, None), ("seed 1", 1, None), ("seed 2", 2, None), ("seed 3", 3, None), ("seed 4", 4, None),
        ("seed 0, 1 thread", 0, "1")]


def verdicts(report: dict) -> dict[tuple, dict]:
    return {(c["test"], c["pair"], c["perturbation"], c["level"], c["metric"]): c for c in report["cases"]}


def main(extra: list[str]) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, seed, threads in RUNS:
            env = {**os.environ, **({"OMP_NUM_THREADS": threads} if threads else {})}
            report_dir = Path(folder) / name.replace(" ", "_").replace(",", "")
            report, _ = gate_report([f"--qrobust-seed={seed}", f"--qrobust-report={report_dir}", *extra], folder, env,
                                    report_dir, label=f"{name}: qrobust run")
            results[name] = verdicts(report)
    reference = results[RUNS[0][0]]
    print("| run | checks | failed | verdicts differing from seed 0 | of which flagged fragile |")
    print("|---|---|---|---|---|")
    for name, cases in results.items():
        differing = [key for key, c in cases.items() if key in reference and reference[key]["verdict"] != c["verdict"]]
        fragile = sum(bool(cases[k].get("fragile") or reference[k].get("fragile")) for k in differing)
        failed = sum(c["verdict"] in ("fail", "inconclusive") for c in cases.values())
        print(f"| {name} | {len(cases)} | {failed} | {len(differing)} | {fragile} |")
        for key in differing[:10]:
            c = cases[key]
            print(f"|  | {key[1]} {key[4]} at {key[2]} {key[3]:g}: {reference[key]['verdict']} -> {c['verdict']} "
                  f"({c['value']:.4g} vs {c['tolerance']:g}) | | | |")


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):  # qrobust run's own help would write no report
        print(__doc__)
        sys.exit(0)
    main(sys.argv[1:])
