"""Run-wide state behind the pytest plugin: the options, the plan, the datasets and the evaluator, with
the pairs (``qrobust.gate.pairs``), their diagnoses (``qrobust.gate.diagnosis``) and the baseline
(``qrobust.gate.baseline``) each in their own object; ``finish`` writes the report and returns what to
print. No pytest here: the plugin and the fixture translate."""
from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qrobust._files import append_text
from qrobust.errors import QrobustError
from qrobust.gate.baseline import Comparison, baseline_document, fingerprint, refuse_overwrite
from qrobust.gate.config import Thresholds, load_thresholds
from qrobust.gate.diagnosis import TRY_FIX_LAYERS, Diagnoses
from qrobust.gate.overlays import overlays
from qrobust.gate.pairs import PairCache, PairUnavailable
from qrobust.gate.plan import GatePlan, make_plan
from qrobust.gate.report import build_report, environment, render_markdown, write_report
from qrobust.gate.verdict import worst_cases
from qrobust.metrics.catalog import CAM_METRICS, LAYER_METRICS

__all__ = ["GATE_TEST", "Options", "Outcome", "PairUnavailable", "QrobustSession", "summary_lines"]


@dataclass(frozen=True)
class Options:
    """The ``--qrobust-*`` options, parsed (see qrobust.plugin)."""

    thresholds: str
    pairs: tuple[str, ...] | None = None
    device: str = "cpu"
    seed: int | None = None
    report: str = "qrobust-report"
    decision: str | None = None
    max_samples: int | None = None
    save_baseline: str | None = None
    overwrite_baseline: bool = False
    baseline: str | None = None
    baseline_any_env: bool = False
    sensitivity: int = 0  # try this many worst layers in FP32 on a failing case (0: off)
    try_fix: bool = False  # re-judge a failing case's checks with the sensitivity search's keep_fp32 applied
    x86_kernels: str | None = None  # run x86-engine int8 convs on this library (another CPU's path); None: this CPU's
    shard: tuple[int, int] | None = None  # (K, N): this job's share of every case's samples (qrobust.gate.shards)


GATE_TEST = "qrobust::gate"  # the record of a failure of the run itself (qrobust.plugin reports it as a test)


@dataclass
class Outcome:
    """A finished run: the terminal's summary lines, the failures of the run itself (each an error record
    and a failed test), and the report written (None when it could not be)."""

    lines: list[str]
    failures: list[str]
    report: dict | None = None
    paths: tuple[Path, Path] | None = None


class QrobustSession:
    """``progress(label, done, total)`` and ``announce(line)`` report long phases (the plugin draws them)."""

    def __init__(self, options: Options, *, worker: bool = False,
                 progress: Callable[[str, int, int], None] | None = None,
                 announce: Callable[[str], None] | None = None, slots=None):
        """``slots``: under xdist, the qrobust.gate.slots.SlotStore the workers share a case's shards through."""
        self.options, self.progress, self.announce, self.slots = options, progress, announce, slots
        self.started = time.monotonic()  # the report's duration
        self.thresholds: Thresholds = load_thresholds(options.thresholds)
        t = self.thresholds
        self.seed = t.seed if options.seed is None else options.seed
        self.decision = options.decision or t.decision
        self.max_samples = options.max_samples or t.max_samples
        self.device = options.device
        self.pairs = PairCache(t, probe=lambda pair: self.evaluator.add(pair), datasets=lambda: self.datasets,
                               x86_kernels=options.x86_kernels, announce=announce)
        self.plan: GatePlan = make_plan(t, self.pairs.bits_of, list(options.pairs) if options.pairs else None,
                                        facts=self.pairs.facts_of)
        self.family_sizes = self.plan.family_sizes(t)  # checks per pair, for the familywise decision
        if options.save_baseline and not worker:
            refuse_overwrite(options.save_baseline, options.overwrite_baseline)
        self.baseline = Comparison(options.baseline, options.baseline_any_env) if options.baseline else None
        self.diagnoses = Diagnoses(lambda: self.evaluator, self.pairs.pair, announce=announce,
                                   top=options.sensitivity or (TRY_FIX_LAYERS if options.try_fix else 0))
        self._evaluator = None
        self._datasets = None
        self._fingerprint_cache: tuple[tuple, dict] = ((None,), {})

    @property
    def datasets(self) -> dict:
        """The datasets declared in the thresholds file, built once (folders stream lazily)."""
        if self._datasets is None:
            from qrobust.data import load_dataset
            from qrobust.data.folders import build_dataset

            base = Path(self.thresholds.path).parent
            datasets = {n: build_dataset(n, spec, base, self.seed) for n, spec in self.thresholds.datasets.items()}
            for pair_spec in self.thresholds.pairs.values():  # built-in datasets a declared pair names
                for ref in (pair_spec["dataset"], (pair_spec.get("calibration") or {}).get("dataset")):
                    if ref and ref not in datasets:
                        datasets[ref] = load_dataset(ref)
            self._datasets = datasets
        return self._datasets

    @property
    def evaluator(self):
        """The session's Evaluator; pairs join it (probed) as they are first used."""
        if self._evaluator is None:
            from qrobust.gate.engine import Evaluator

            plan, t = self.plan, self.thresholds
            cases = plan.cases + plan.bitwidth_cases
            cam_cases = {(c.pair, c.perturbation, c.level) for c in cases if set(c.tolerances) & set(CAM_METRICS)}
            layer_cases = {m: {(c.pair, c.perturbation, c.level) for c in cases if m in c.tolerances}
                           for m in LAYER_METRICS}
            methods = {} if t.cam_method == "auto" else {name: t.cam_method for name in plan.pairs}
            self._evaluator = Evaluator(seed=self.seed, batch_size=t.batch_size, max_samples=self.max_samples,
                                        replicates=t.replicates, f1_average=t.f1_average, device=self.device,
                                        wanted={(c.pair, c.perturbation, c.level) for c in cases},
                                        datasets=self.datasets, cam_cases=cam_cases, cam_methods=methods,
                                        layer_cases=layer_cases, operating_points=t.operating_points,
                                        loader=lambda name: self.pairs.load_with_group(name, plan.pairs),
                                        progress=self.progress, shard=self.options.shard, slots=self.slots)
        return self._evaluator

    def pair(self, name: str):
        """A loaded pair (built and probed; PairUnavailable with its one line when it cannot be)."""
        return self.pairs.pair(name)

    def evaluate(self, case):
        """The cached result of ``case`` (raises PairUnavailable for a pair that cannot be gated)."""
        self.pairs.load_with_group(case.pair, self.plan.pairs)
        try:
            return self.evaluator.evaluate(case.pair, case.perturbation, case.level)
        except PairUnavailable:
            raise
        except QrobustError as exc:
            raise self.pairs.mark_broken(case.pair, exc) from None

    def evaluate_share(self, case, slot: int) -> None:
        """Under xdist: evaluate one slot of ``case``'s shards for the worker judging it (a helper test). A
        pair that cannot be built or evaluated is left to the judging tests, which evaluate again and say why."""
        try:
            self.pairs.load_with_group(case.pair, self.plan.pairs)
            self.evaluator.evaluate_share(case.pair, case.perturbation, case.level, slot)
        except QrobustError:
            return

    def owns(self, pair: str) -> bool:
        """Whether this job runs ``pair``'s whole-pair tests (latency, explanations, quantizer properties):
        with --qrobust-shard K/N, the pairs are dealt to the N jobs in the plan's order; without, all."""
        if self.options.shard is None:
            return True
        k, n = self.options.shard
        return self.plan.pairs.index(pair) % n == k - 1 if pair in self.plan.pairs else k == 1

    # ---- verdicts ------------------------------------------------------------------------------------------
    def decide(self, test: str, case, metric: str, estimate, tolerance: float | None, context: dict | None = None):
        """The record of one measured metric and its failure message (None on a pass): the tolerance, the
        familywise family and the baseline applied (qrobust.gate.verdict.judge)."""
        from qrobust.gate.verdict import judge

        mismatch = self.baseline_mismatch()
        old = None if mismatch else self.baseline_value(case.pair, case.perturbation, case.level, metric)
        return judge(test=test, pair=case.pair, perturbation=case.perturbation, level=case.level, metric=metric,
                     estimate=estimate, tolerance=tolerance, mode=self.decision, context=context, baseline_old=old,
                     baseline_margin=self.thresholds.baseline_margin(metric),
                     family_size=self.family_sizes.get(case.pair), baseline_mismatch=mismatch)

    def case_records(self, test: str, case, tolerances: dict, result, why_missing: Callable[[str], str]):
        """A case's checks judged from its result: (records, failure messages, failed (metric, tolerance,
        value)). An unhealthy result (non-finite outputs, no samples) and a metric not computed are errors."""
        from qrobust.gate.verdict import error_record
        from qrobust.metrics.stats import Estimate

        if not result.healthy:
            message = result.health_message()
            return [self.decide(test, case, m, Estimate(float("nan"), None, result.n, {"error": message}), t)[0]
                    for m, t in tolerances.items()], [message], []
        context = {k: result.estimates[k].value for k in ("top1_fp32", "top1_quant", "logit_sqnr_db")}
        worst = result.estimates.get("class_top1_delta")  # the report names the worst class of a failing case
        if worst is not None:
            context.update(worst_class=worst.details["class"], worst_class_delta=worst.value,
                           worst_class_n=worst.details["n_class"])
        records, messages, failed = [], [], []
        for metric, tolerance in tolerances.items():
            if metric not in result.estimates:
                reason = why_missing(metric)
                records.append(error_record(test=test, pair=case.pair, perturbation=case.perturbation,
                                            level=case.level, metric=metric, mode=self.decision, error=reason))
                messages.append(reason)
                continue
            record, message = self.decide(test, case, metric, result.metric(metric), tolerance, context)
            records.append(record)
            if message:
                messages.append(message)
                failed.append((metric, tolerance, result.metric(metric).value))
        return records, messages, failed

    # ---- baselines and provenance -----------------------------------------------------------------------
    def baseline_value(self, pair: str, perturbation: str, level: float, metric: str) -> float | None:
        return None if self.baseline is None else self.baseline.value(pair, perturbation, level, metric)

    def baseline_mismatch(self) -> str | None:
        """Why the baseline cannot be compared (another environment), or None."""
        return None if self.baseline is None else self.baseline.mismatch(self._fingerprint())

    def _fingerprint(self) -> dict:
        loaded = tuple(self.pairs.loaded)
        if self._fingerprint_cache[0] != loaded:
            self._fingerprint_cache = (loaded, fingerprint(self.environment(self.pairs.weights(), {})))
        return self._fingerprint_cache[1]

    def environment(self, weights: dict[str, str], pairs: dict[str, dict]) -> dict:
        return environment(seed=self.seed, decision=self.decision, thresholds_sha256=self.thresholds.sha256,
                           weights=weights, pairs=pairs)

    def worker_output(self) -> dict:
        ev = self._evaluator
        return {"weights": self.pairs.weights(), "pairs": self.pairs.provenance(ev), "pair_loads": dict(self.pairs.loads),
                "broken": self.pairs.broken, "overlays": overlays(ev.cached_results() if ev else []),
                "forward_passes": dict(ev.forward_passes) if ev else {},
                "perturbed_batches": dict(ev.perturbed_batches) if ev else {},
                "groups": ev.groups() if ev else {}}

    def write_states(self, process: str) -> None:
        """With --qrobust-shard: this process's shard states, beside the job's (qrobust.gate.shards)."""
        from qrobust.gate import shards

        if self._evaluator is not None:
            shards.write_states(shards.folder(self.options.report, self.options.shard), process, self._evaluator)

    def finish_shard(self, records: list[dict], pending: list[dict], outputs: list[dict], *, gate_tests: int) -> Outcome:
        """With --qrobust-shard: the job's settings, pending checks and finished records for qrobust merge."""
        from qrobust import __version__
        from qrobust.gate import shards

        o = self.options
        settings = {"shard": list(o.shard), "thresholds": str(Path(self.thresholds.path).resolve()),
                    "thresholds_sha256": self.thresholds.sha256, "seed": self.seed, "decision": self.decision,
                    "max_samples": self.max_samples, "pairs": list(o.pairs) if o.pairs else None, "device": o.device,
                    "x86_kernels": o.x86_kernels, "baseline": o.baseline, "baseline_any_env": o.baseline_any_env,
                    "qrobust_version": __version__}
        path = shards.write_job(shards.folder(o.report, o.shard), settings, pending, records, outputs, gate_tests)
        k, n = o.shard
        return Outcome([f"qrobust shard {k}/{n}: {len(pending)} pending check(s) and {len(records)} finished record(s) "
                        f"written to {path.parent}; judge the gate with: qrobust merge "
                        f"{shards.folder(o.report, (1, n)).parent}/qrobust-shard-*-of-{n}"], [])

    def case_overlays(self, pair: str, perturbation: str, level: float) -> list[dict]:
        """The overlay of one evaluated case (none when it computed no CAMs), for pytest-html's extras."""
        ev = self._evaluator
        return overlays(ev.cached_results() if ev else [], (pair, perturbation, level))

    def error_record(self, test: str, pair: str, perturbation: str, level: float, metric: str, error: str) -> dict:
        """The report record of a check that could not be judged (qrobust.gate.verdict.error_record)."""
        from qrobust.gate.verdict import error_record

        return error_record(test=test, pair=pair, perturbation=perturbation, level=level, metric=metric,
                            mode=self.decision, error=error).as_dict()

    def finish(self, records: list[dict], outputs: list[dict], report_dir: str, *, gate_tests: int,
               verbose: bool = False, markdown: list[str] = (), command: list[str] | None = None) -> Outcome:
        """Merge every process's output, write the report set (and baseline); the Outcome says what to print.
        A run whose gate tests produced no verdict fails as a whole: its error record says so."""
        from qrobust.gate.engine import forwards_per_batch

        weights, pairs, forwards, batches, groups, loads, all_overlays, broken = {}, {}, Counter(), Counter(), {}, [], [], {}
        for out in outputs:
            all_overlays += out["overlays"]
            weights.update(out["weights"])
            pairs.update(out["pairs"])
            forwards.update(out["forward_passes"])
            batches.update(out["perturbed_batches"])
            groups.update(out["groups"])
            broken.update(out["broken"])
            if out["pair_loads"]:
                loads.append(out["pair_loads"])
        failures = []
        if not any(r["verdict"] not in ("xfail", "measured") for r in records):
            why = f"{len(broken)} pair(s) could not be gated, above" if broken else "all skipped?"
            failures.append(f"{gate_tests} gate tests ran but none produced a verdict ({why}): a gate that checks "
                            "nothing does not pass")
            records = [*records, self.error_record(GATE_TEST, "", "", 0.0, "", failures[-1])]
        env = self.environment(weights, pairs)
        per_batch = forwards_per_batch(forwards, batches, groups)
        forward_info = {"forward_passes": dict(forwards), "perturbed_batches": dict(batches),
                        "forwards_per_perturbed_batch": per_batch, "pair_loads_per_process": loads}
        run_id = uuid.uuid4().hex[:12]
        report = build_report(records, env, forward_info, run_id, command, thresholds_path=self.thresholds.path,
                              duration_s=time.monotonic() - self.started,
                              not_applicable=[{"pair": p, "metric": m, "reason": why}
                                              for p, m, why in self.plan.not_applicable])
        baseline = None
        if self.options.save_baseline:
            path = Path(self.options.save_baseline)
            refuse_overwrite(path, self.options.overwrite_baseline)
            baseline = (path, json.dumps(baseline_document(report), indent=1, sort_keys=True))
        json_path, html_path = write_report(report_dir, report, all_overlays, baseline)
        for path in markdown:
            append_text(Path(path), render_markdown(report, html_path))
        lines = summary_lines(report, per_batch, verbose=verbose)
        lines += [f"could not be gated: {reason}" for reason in broken.values()]
        lines.append(f"report: {json_path}  {html_path}  (run {run_id})")
        if baseline:
            lines.append(f"baseline saved: {baseline[0]}")
        return Outcome(lines, failures, report, (json_path, html_path))


def summary_lines(report: dict, per_batch: dict[str, float], *, verbose: bool = False) -> list[str]:
    """The terminal summary: counts, then the worst case per pair and metric (failures first)."""
    s = report["summary"]
    env = report["environment"]
    lines = [f"qrobust gate: {'PASSED' if report['passed'] else 'FAILED'}: {s['total']} checks: {s['pass']} pass, "
             f"{s['fail']} fail, {s['error']} error, {s['inconclusive']} inconclusive, {s['xfail']} expected failures "
             f"caught, {s['measured']} measured without tolerance, {s['fragile']} fragile "
             f"(decision: {env['decision']}, seed {env['seed']})"]
    lines += [f"  not judged: {n['metric']} on {n['pair']}: {n['reason']}" for n in report.get("not_applicable", [])]
    worst = sorted(worst_cases(report["cases"]).values(), key=lambda c: (c["verdict"] == "pass", c["pair"], c["metric"]))
    width_pair = max((len(c["pair"]) for c in worst), default=0)
    width_metric = max((len(c["metric"]) for c in worst), default=0)
    for c in worst:
        flags = [c["verdict"]] + (["fragile"] if c.get("fragile") else []) + (
            ["from baseline"] if c.get("failed_by") == "baseline" else [])
        lines.append(f"  {c['pair']:{width_pair}}  {c['metric']:{width_metric}}  worst {c['value']:.4g} "
                     f"{c['direction']} {c['tolerance']:g} at {c['perturbation']} {c['level']:g} "
                     f"(margin {c['margin']:+.4g}; {', '.join(flags)})")
    if verbose:
        lines.append("forward passes per perturbed batch (1.0 = no duplicated work): "
                     + ", ".join(f"{k} {v:g}" for k, v in per_batch.items()))
    return lines

