"""Tolerances fitted to a pair's benign spread: ``qrobust propose``.

"Which tolerance for int8?" has no general answer: LeNet's clean int8 KL is 0.00015 where seed 004's
ImageNet networks sit near 0.02. What a pair's twin does when nothing is wrong can be measured, though:
gate it several times with what should not matter changed (the perturbation seed; recalibration on
another subset, another engine or machine, declared as benign variants) and fit each check's tolerance
just outside that spread:

    tolerance = worst benign value + headroom x noise      (headroom 3 by default)

per (pair, perturbation, level, metric), where ``noise`` is the largest of the runs' standard deviation,
the standard error within a run (the 95% interval's width / 3.92), so one run still gets a margin for
its own sampling noise, for accuracy metrics one sample (1 / n): a twin that flipped nothing in the
benign runs may flip one, and the median noise of the metric's other checks (a check whose benign runs
were identical has none of its own). The tolerance in force stays a ceiling: a proposal only ever tightens.
Each proposal is rounded outwards at the noise's second significant digit. ``n_required`` is the
sample count at which a regression of one margin (tolerance minus the benign mean) is seen with 80%
power, scaling the within-run standard error by sqrt(n).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from datetime import date
from pathlib import Path

import yaml

from qrobust._files import MiB, read_bounded
from qrobust.errors import ConfigError, show
from qrobust.gate.plan import gate_cases
from qrobust.metrics.catalog import CASE_METRICS, METRICS

Z_INTERVAL = 3.92  # a 95% interval is 2 x 1.96 standard errors wide
Z_POWER = 1.96 + 0.8416  # two-sided 5% test with 80% power


def load_reports(paths: list[str]) -> list[dict]:
    """report.json files of benign runs; one line naming the file for anything that is not one."""
    reports = []
    for path in paths:
        try:
            report = json.loads(read_bounded(path, "report", 256 * MiB).decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a readable qrobust report.json ({type(exc).__name__}: {exc})") from None
        if not isinstance(report, dict) or not isinstance(report.get("cases"), list):
            raise ConfigError(f"{path}: not a qrobust report.json (no cases list)")
        reports.append(report)
    return reports


def _benign_values(reports: list[dict], pair: str, benign: list[str]) -> dict[tuple, list[dict]]:
    """(perturbation, level, metric) -> every benign record of ``pair`` and its declared variants."""
    found: dict[tuple, list[dict]] = defaultdict(list)
    for report in reports:
        for case in report["cases"]:
            if case.get("pair") in (pair, *benign) and case.get("metric") in CASE_METRICS \
                    and isinstance(case.get("value"), (int, float)) and math.isfinite(case["value"]):
                found[(case["perturbation"], float(case["level"]), case["metric"])].append(case)
    return found


def _outward(value: float, noise: float, higher_is_better: bool) -> float:
    """``value`` rounded away from the benign side at the noise's second significant digit (a minimum
    down, a maximum up); the 1e-9 keeps 0.99 * 100 = 98.99999999999999 from dropping a whole step."""
    decimals = max(0, 1 - math.floor(math.log10(noise))) if noise > 0 else 6
    scale = 10**decimals
    if higher_is_better:
        return math.floor(value * scale + 1e-9) / scale
    return math.ceil(value * scale - 1e-9) / scale


def fit(records: list[dict], ceiling: float | None, headroom: float, floor: float = 0.0) -> dict:
    """One check's proposal from its benign records; ``floor`` is the least noise assumed."""
    metric = records[0]["metric"]
    higher = METRICS[metric].higher_is_better
    values = [r["value"] for r in records]
    widths = [r["interval"][1] - r["interval"][0] for r in records if r.get("interval")]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    within = statistics.fmean(widths) / Z_INTERVAL if widths else 0.0
    n = max(int(r["n"]) for r in records)
    resolution = 1 / n if METRICS[metric].family == "accuracy" else 0.0  # one sample: twins that never flip
    noise = max(spread, within, resolution, floor)
    worst = min(values) if higher else max(values)
    sign = -1 if higher else 1
    tolerance = _outward(worst + sign * headroom * noise, noise, higher)
    if ceiling is not None:
        tolerance = max(tolerance, ceiling) if higher else min(tolerance, ceiling)
    margin = abs(tolerance - statistics.fmean(values))
    n_required = math.ceil(n * (Z_POWER * within / margin) ** 2) if within > 0 and margin > 0 else None
    return {"tolerance": tolerance, "worst": worst, "noise": noise, "runs": len(values), "n": n,
            "n_required": n_required, "ceiling": ceiling}


def propose(reports: list[dict], thresholds, pair: str, benign: list[str], headroom: float = 3.0) -> dict:
    """``{(perturbation, level, metric): fit}`` for every gated case metric of ``pair`` measured in the
    reports; ConfigError when the reports hold none."""
    if headroom <= 0 or not math.isfinite(headroom):
        raise ConfigError(f"--headroom: must be a positive number, got {show(headroom)}")
    if pair not in thresholds.gate:
        raise ConfigError(f"--pair: {show(pair)} is not gated by {thresholds.path} (gated: {', '.join(thresholds.gate)})")
    benign_records = _benign_values(reports, pair, benign)
    checks = {}
    for case in gate_cases(thresholds):
        if case.pair != pair or case.xfail:
            continue
        for metric, ceiling in case.tolerances.items():
            records = benign_records.get((case.perturbation, float(case.level), metric))
            if records:
                checks[(case.perturbation, float(case.level), metric)] = (records, ceiling)
    first = {key: fit(records, ceiling, headroom) for key, (records, ceiling) in checks.items()}
    floors = noise_floors(first)
    proposals = {key: fit(records, ceiling, headroom, floors[key[2]]) for key, (records, ceiling) in checks.items()}
    if not proposals:
        raise ConfigError(f"the reports hold no gated value of pair {show(pair)}"
                          + (f" or of {', '.join(map(show, benign))}" if benign else "")
                          + " (were they written by a gate of this thresholds file?)")
    return proposals


def noise_floors(fits: dict) -> dict[str, float]:
    """Per metric, the median noise of its checks that showed any: a check whose benign runs were
    identical (maps equal on every image, CC exactly 1) has no spread of its own, and a tolerance at its
    observed value would fail a twin 0.001 away."""
    noises: dict[str, list[float]] = defaultdict(list)
    for (_, _, metric), p in fits.items():
        if p["noise"] > 0:
            noises[metric].append(p["noise"])
    return defaultdict(float, {metric: statistics.median(values) for metric, values in noises.items()})


def fitted_entry(raw: dict, pair: str, proposals: dict) -> dict:
    """``gate.<pair>`` of the raw thresholds with each proposal under its perturbation's ``at:`` level
    (level 0 too, in every perturbation: it is one evaluation, so it gets the tightest of them), merged
    over what the entry already had."""
    entry = dict((raw.get("gate") or {}).get(pair) or {})
    clean: dict[str, float] = {}
    for (_, level, metric), p in proposals.items():
        if level == 0:
            tighter = max if METRICS[metric].higher_is_better else min
            clean[metric] = tighter(clean.get(metric, p["tolerance"]), p["tolerance"])
    old = entry.get("perturbations") or {}
    fitted: dict[str, dict] = {}
    for (perturbation, level, metric), p in sorted(proposals.items()):
        spec = fitted.setdefault(perturbation, {**(old.get(perturbation) or {})})
        at = spec.setdefault("at", {})
        at = spec["at"] = {float(k): dict(v) for k, v in at.items()}
        at.setdefault(level, {})[metric] = clean[metric] if level == 0 else p["tolerance"]
    entry["perturbations"] = {**old, **fitted}
    return entry


def notes(pair: str, proposals: dict) -> list[str]:
    """Comment lines: per metric, the range of fitted tolerances, how many hit the ceiling, and the n
    at which a regression of one margin is seen."""
    lines = [f"# gate.{pair}:"]
    by_metric: dict[str, list[dict]] = defaultdict(list)
    for (_, _, metric), p in proposals.items():
        by_metric[metric].append(p)
    for metric, fits in sorted(by_metric.items()):
        tols = [p["tolerance"] for p in fits]
        needs = sorted(p["n_required"] for p in fits if p["n_required"] is not None)
        capped = sum(p["ceiling"] is not None and p["tolerance"] == p["ceiling"] for p in fits)
        lines.append(f"#   {metric}: {len(fits)} checks, {METRICS[metric].direction} {min(tols):.4g} .. {max(tols):.4g}"
                     f"{f', {capped} at the ceiling' if capped else ''}; n = {fits[0]['n']}"
                     + (f"; a regression of one margin is seen (80% power) from n = {needs[len(needs) // 2]} "
                        f"(median check; {needs[-1]} for all)" if needs else ""))
    return lines


def run_seeds(thresholds: Path, seeds: list[int], folder: Path, pytest_args: list[str]) -> list[str]:
    """Gate ``thresholds`` once per seed (``qrobust run`` in a subprocess); the report.json paths."""
    import subprocess

    paths = []
    for seed in seeds:
        report = folder / f"seed-{seed}"
        done = subprocess.run([sys.executable, "-m", "qrobust", "run", str(thresholds), "-q",
                               f"--qrobust-seed={seed}", f"--qrobust-report={report}", *pytest_args], cwd=folder)
        if not (report / "report.json").is_file():
            raise ConfigError(f"qrobust run with seed {seed} wrote no report (exit {done.returncode}): see above")
        paths.append(str(report / "report.json"))
    return paths


def main(args) -> int:
    """``qrobust propose``: gate with a few seeds (or read benign reports) and print the fitted file."""
    import tempfile

    from qrobust.gate.config import load_thresholds, read_thresholds_file

    path = Path(args.thresholds).resolve()
    thresholds = load_thresholds(path)
    raw = read_thresholds_file(path)[1]
    pairs = [args.pair] if args.pair else [p for p, e in thresholds.gate.items() if not e.xfail]
    with tempfile.TemporaryDirectory() as folder:
        sources = args.reports or run_seeds(path, args.seeds, Path(folder), args.pytest_args)
        reports = load_reports(sources)
    shown = args.reports or [f"qrobust run {path.name} --qrobust-seed {s}" for s in args.seeds]
    header = [f"# fitted by `qrobust propose` on {date.today().isoformat()} from {len(shown)} benign run(s):",
              *[f"#   {s}" for s in shown],
              f"# tolerance = worst benign value + {args.headroom:g} x noise (the largest of the runs' standard "
              "deviation, the within-run standard error, 1/n for accuracy metrics and the metric's median noise),",
              "# never looser than the tolerance in force."]
    gate = dict(raw.get("gate") or {})
    for pair in pairs:
        proposals = propose(reports, thresholds, pair, args.benign if args.pair else [], args.headroom)
        gate[pair] = fitted_entry(raw, pair, proposals)
        header += notes(pair, proposals)
    text = "\n".join(header) + "\n" + yaml.safe_dump({**raw, "gate": gate}, sort_keys=False, width=120)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"qrobust propose: wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0
