"""Gate power with tolerances fitted to the benign spread (``qrobust propose``), from kept gate-power reports.

Per kind of twin (real int8, explained by EigenCAM; fake-quant, explained by Grad-CAM++: their CAM metrics
are not comparable), some benign variants are the runs ``qrobust propose`` fits tolerances to
(``--benign``); the built-in gate's tolerances stay the ceiling. Every other twin is then judged against
its kind's fitted tolerances on the values the report already holds (no second gate run): the faults, and
the held-out benign twins that measure the false alarms of fitting. Two decisions are counted: ``point``
(the estimate beyond the fitted tolerance) and, when the report was written by ``--qrobust-decision
familywise``, ``familywise`` (its whole familywise interval beyond it).

``--fit-from REPORT`` fits on one report (say n = 450) and judges another (say n = 200): what fitted
tolerances do at a smaller sample than they were fitted on. Every benign twin is judged then, those
fitted on included (on other samples, they are held out too).

``--entry KIND`` prints, instead of the table, the fitted tolerances of KIND (int8, fake) as the
``perturbations`` of its built-in pair's gate entry in ``thresholds.yaml`` (how the LeNet entries
were written).

Run: .venv/bin/python benchmarks/gate_power.py --pairs lenet --keep-report DIR --qrobust-decision familywise
     .venv/bin/python benchmarks/gate_power_fitted.py DIR/lenet.json [--family lite0] [--fit-from OTHER.json]
     .venv/bin/python benchmarks/gate_power_fitted.py DIR/lenet.json --entry int8
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from gate_power import FAMILIES
from qrobust.gate.config import load_thresholds
from qrobust.gate.propose import propose
from qrobust.gate.verdict import counted_estimate, decide, has_counts
from qrobust.metrics.catalog import METRICS
from qrobust.suites import BUILTIN_THRESHOLDS

# family -> kind -> (the built-in pair whose entry the fit is for, the benign twins fitted on); the
# family's other benign twins are held out
FIT_ON = {"lenet": {"int8": ("lenet5-digits-int8-x86", ["recalibrated_other_subset", "fbgemm_engine"]),
                    "fake": ("lenet5-digits-w8a8", ["fake_w8a8", "w8a8_other_subset", "histogram_fake_quant",
                                                    "histogram_other_subset"])},
          "lite0": {"int8": ("efficientnet-lite0-int8-tuned", ["lite0_recalibrated_other_subset",
                                                               "lite0_recalibrated_reversed"])}}


def point_fails_against(record: dict, tolerance: float) -> bool:
    """Whether the point decision fails ``record`` against ``tolerance`` (counted metrics exactly)."""
    details = record.get("details") or {}
    exact = counted_estimate(record["metric"], details, record["n"])[0] if has_counts(record["metric"], details) else None
    return not decide(record["value"], None, tolerance, METRICS[record["metric"]].higher_is_better, "point",
                      exact_estimate=exact).passed


def familywise_fails(record: dict, tolerance: float) -> bool | None:
    """Whether the record's familywise interval lies wholly beyond ``tolerance``; None when the report holds
    no familywise interval (it was not written by ``--qrobust-decision familywise``)."""
    interval = (record.get("family") or {}).get("interval")
    if not interval or interval[0] is None:
        return None if not record.get("family") else False
    return interval[1] < tolerance if METRICS[record["metric"]].higher_is_better else interval[0] > tolerance


def judge(report: dict, fitted: dict, twin: str) -> dict[str, list]:
    """Per decision, the (violation in noise units, record, fit) of every check of ``twin`` that fails."""
    failed: dict[str, list] = {"point": [], "familywise": []}
    for c in report["cases"]:
        key = (c["perturbation"], float(c["level"]), c["metric"])
        if c["pair"] != twin or c.get("value") is None:
            continue
        if key in fitted:
            fit = fitted[key]
            size = abs(c["value"] - fit["tolerance"]) / max(fit["noise"], 1e-12)
            verdicts = {"point": point_fails_against(c, fit["tolerance"]), "familywise": familywise_fails(c, fit["tolerance"])}
        elif c["verdict"] == "fail":  # checks fitting leaves alone (coverage, quantizer properties)
            size, fit = float("inf"), {"tolerance": c["tolerance"]}
            verdicts = {"point": True, "familywise": True}
        else:
            continue
        for decision, fails in verdicts.items():
            if fails:
                failed[decision].append((size, c, fit))
    return failed


def yaml_number(value: float) -> str:
    """``value`` as YAML reads a float: PyYAML takes ``8e-05`` (no dot in the mantissa) for a string."""
    text = f"{value:g}"
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


def entry(fitted: dict) -> str:
    """The fitted tolerances as a gate entry's ``perturbations:`` block, one flow-style line per level."""
    levels: dict[str, dict[float, dict[str, float]]] = {}
    for (perturbation, level, metric), f in sorted(fitted.items()):
        levels.setdefault(perturbation, {}).setdefault(level, {})[metric] = f["tolerance"]
    lines = ["    perturbations:"]
    for perturbation, at in levels.items():
        lines.append(f"      {perturbation}:")
        lines.append("        at:")
        for level, tolerances in at.items():
            values = ", ".join(f"{metric}: {yaml_number(value)}" for metric, value in tolerances.items())
            lines.append(f"          {level:g}: {{{values}}}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="the gate-power report to judge")
    parser.add_argument("--family", choices=list(FIT_ON), default="lenet")
    parser.add_argument("--fit-from", type=Path, metavar="REPORT", help="fit on this report (default: the judged one)")
    parser.add_argument("--entry", metavar="KIND", help="print KIND's fitted tolerances as its pair's gate entry")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    source = json.loads(args.fit_from.read_text()) if args.fit_from else report
    _, _, faults, benign = FAMILIES[args.family]
    thresholds = load_thresholds(BUILTIN_THRESHOLDS)
    kinds = {name: p["kind"] for name, p in report["environment"]["pairs"].items()}
    fit_on = FIT_ON[args.family]
    fits = {kind: propose([source], thresholds, pair, names) for kind, (pair, names) in fit_on.items()
            if any(kinds.get(name) == kind for name in names)}
    fitted_on = {name for _, names in fit_on.values() for name in names}
    if args.entry:
        print(f"  {fit_on[args.entry][0]}:\n{entry(fits[args.entry])}")
        return
    has_family = any(c.get("family") for c in report["cases"])
    decisions = ["point", "familywise"] if has_family else ["point"]
    print(f"| twin | kind | {' | '.join(f'{d}: checks failed' for d in decisions)} | strongest point failure (value vs fitted tolerance) |")
    print("|---|---|" + "---|" * len(decisions) + "---|")
    caught = {d: [0, 0] for d in decisions}  # decision -> [faults caught, held-out benign twins failed]
    for group, functions in (("fault", faults), ("benign", benign)):
        for fn in functions:
            twin = fn.__name__
            if (twin in fitted_on and not args.fit_from) or twin not in kinds:  # judged elsewhere: on its own samples
                continue
            if kinds[twin] not in fits:
                print(f"| `{twin}` | {group} | no benign {kinds[twin]} twin in the report to fit to |")
                continue
            failed = judge(report, fits[kinds[twin]], twin)
            for d in decisions:
                caught[d][group == "benign"] += bool(failed[d])
            strongest = "-"
            if failed["point"]:
                _, c, f = max(failed["point"], key=lambda t: t[0])
                strongest = f"{c['metric']} {c['value']:.4g} vs {f['tolerance']:.4g} at {c['perturbation']} {c['level']:g}"
            print(f"| `{twin}` | {group} | {' | '.join(str(len(failed[d])) for d in decisions)} | {strongest} |")
    n_faults = sum(f.__name__ in kinds and kinds[f.__name__] in fits for f in faults)
    n_held = sum(f.__name__ in kinds and (f.__name__ not in fitted_on or bool(args.fit_from)) and kinds[f.__name__] in fits
                 for f in benign)
    print(f"\nfitted on {'; '.join(f'{kind}: ' + ', '.join(fit_on[kind][1]) for kind in fits)} "
          f"(n = {source['cases'][0]['n']}); judged at n = {report['cases'][0]['n']}")
    for d in decisions:
        print(f"{d}: caught {caught[d][0]} of {n_faults} faults; {caught[d][1]} of {n_held} "
              f"{'benign' if args.fit_from else 'held-out benign'} twins failed")


if __name__ == "__main__":
    main()
