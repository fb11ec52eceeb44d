"""``qrobust merge``: judge a gate run as N CI jobs (``--qrobust-shard K/N``) from their states, into the
verdicts and report.json one job would have written (``qrobust.gate.shards`` reads and folds the states).

Left to a single job: the per-layer diagnosis and ``--qrobust-sensitivity`` of a failing case need its
models, which merge does not build; a failing record says so in its ``note``.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

from qrobust import __version__
from qrobust.errors import ConfigError, show
from qrobust.gate.engine import case_key
from qrobust.gate.overlays import overlays
from qrobust.gate.plan import CaseSpec
from qrobust.gate.shards import check_jobs, job_folders, load_job, merged_results
from qrobust.gate.verdict import error_record, settle_expected_failure
from qrobust.session import Options, Outcome, QrobustSession

MERGE_NOTE = "judged by qrobust merge: no per-layer diagnosis (it needs the models; run the case in one job)"


def _why_missing(reasons: dict[str, str], case_id: str, metric: str) -> str:
    """The reason a job gave for a metric its case has no value of."""
    return reasons.get(metric, f"{metric} was not computed for {case_id}")


def merge(given: list[str], report_dir: str, thresholds: str | None = None) -> Outcome:
    """Judge every pending check of the jobs on their merged states and write the report set; returns the
    session's Outcome (its report says whether the gate passed)."""
    jobs = sorted((load_job(path) for name in given for path in job_folders(name)), key=lambda job: job.shard)
    check_jobs(jobs)
    first = jobs[0].document
    if first["qrobust_version"] != __version__:
        raise ConfigError(f"qrobust merge: the jobs ran qrobust {first['qrobust_version']}, this is {__version__}: "
                          "merge with the version that ran them")
    path = thresholds or first["thresholds"]
    if not Path(path).is_file():
        raise ConfigError(f"qrobust merge: the jobs' thresholds file {show(path)} is not here: pass --thresholds PATH")
    options = Options(thresholds=path, pairs=tuple(first["pairs"]) if first["pairs"] else None, seed=first["seed"],
                      decision=first["decision"], max_samples=first["max_samples"], report=report_dir,
                      baseline=first.get("baseline"), baseline_any_env=first.get("baseline_any_env", False))
    session = QrobustSession(options)
    if session.thresholds.sha256 != first["thresholds_sha256"]:
        raise ConfigError(f"qrobust merge: {show(path)} is not the thresholds file the jobs ran with (sha256 "
                          f"{session.thresholds.sha256[:12]}, the jobs' {first['thresholds_sha256'][:12]})")
    results = merged_results(jobs)
    records = [record for job in jobs for record in job.document["records"]]
    pending_by_test: dict[str, list[dict]] = {}
    for job in jobs:
        for check in job.document["pending"]:
            pending_by_test.setdefault(check["test"], []).append(check)
    for test, checks in pending_by_test.items():
        check = checks[0]
        case = CaseSpec(check["pair"], check["perturbation"], float(check["level"]), check["tolerances"], check["xfail"])
        error = next((c["error"] for c in checks if c["error"]), None)
        key = (case.pair, *case_key(case.perturbation, case.level))
        if error is None and key not in results:
            error = f"{case.id} was evaluated by no job"
        if error is not None:
            case_records = [error_record(test=test, pair=case.pair, perturbation=case.perturbation, level=case.level,
                                         metric=m, mode=session.decision, error=error) for m in case.tolerances]
        else:
            result = results[key]
            if case.perturbation != result.perturbation:  # level 0 of every perturbation is the clean case
                result = dataclasses.replace(result, perturbation=case.perturbation)
            missing = {m: r for c in checks for m, r in c["missing"].items()}
            case_records, _, failed = session.case_records(test, case, dict(case.tolerances), result,
                                                           partial(_why_missing, missing, case.id))
            if failed:
                for record in case_records:
                    record.extra["note"] = MERGE_NOTE
        if case.xfail:
            settle_expected_failure(case_records, case.xfail)
        records += [r.as_dict() for r in case_records]
    outputs = [out for job in jobs for out in job.document["outputs"]]
    drawn = {"weights": {}, "pairs": {}, "pair_loads": {}, "broken": {}, "forward_passes": {}, "perturbed_batches": {},
             "groups": {}, "overlays": overlays(results.values())}
    gate_tests = sum(job.document["gate_tests"] for job in jobs)
    return session.finish(records, [*outputs, drawn], report_dir, gate_tests=gate_tests,
                          command=["qrobust", "merge", *given])

