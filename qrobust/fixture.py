"""The per-test check object behind the ``qrobust_check`` fixture (pytest-benchmark's BenchmarkFixture
pattern): it owns the test's node, so suites never pass ``request.node``, and offers one verb per gate.

Each verb evaluates through the session (cached), gets its records from ``qrobust.gate.verdict`` (a
verdict, or an error when the check cannot be judged: its pair cannot be built, the metric cannot be
computed, the check crashed), hands every record to ``carry`` (the plugin puts it on the test report,
which reaches the controller, also from xdist workers) and fails the test once with every violation.
"""
from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

import pytest
import torch

from qrobust.gate.plan import CaseSpec, Check
from qrobust.gate.verdict import CheckRecord, error_record, fails, settle_expected_failure
from qrobust.metrics.catalog import METRICS
from qrobust.metrics.stats import Estimate
from qrobust.placement import feed, place, stage
from qrobust.errors import one_line
from qrobust.gate.pairs import PairUnavailable
from qrobust.session import QrobustSession


class ExpectedFailureCaught(AssertionError):
    """A strict expected failure's violation, caught: the only exception its xfail marker accepts, so an
    error (a pair that cannot be built, a crash) in a known-bad case fails the test instead of passing
    as expected."""


class QrobustCheck:
    def __init__(self, node, session: QrobustSession, carry: Callable[[str, dict], None]):
        self._node, self._session, self._carry = node, session, carry

    def __call__(self, case: CaseSpec, metrics: str | list[str]) -> None:
        """``qrobust_check(case, "top1_delta")`` or with a list of metrics: the same as ``metric``."""
        names = [metrics] if isinstance(metrics, str) else list(metrics)
        self.metric(case, *names)

    # ---- the gates ----------------------------------------------------------------------------------------
    def judge(self, check: Check) -> None:
        """One check of the plan (the catalogue-driven gate suite's test)."""
        __tracebackhide__ = True
        self.metric(check.case, check.metric)

    def metric(self, case: CaseSpec, *names: str) -> None:
        """Decide the named metrics of ``case`` against their tolerances (and the baseline)."""
        __tracebackhide__ = True
        for name in names:
            if name not in METRICS or not METRICS[name].case_metric:
                raise pytest.UsageError(f"qrobust_check: {name!r} is not a per-case metric")
        tolerances = {m: t for m in names if (t := self._tolerance(case.tolerances, m)) is not None}
        if not tolerances:
            pytest.skip(f"no tolerance configured for {', '.join(names)} on {case.id}")
        if self._session.options.shard is not None:
            self._defer(case, tolerances)
        self._guarded(case, tolerances, lambda: self._case_records(case, tolerances))

    def explanations(self, pair_name: str) -> None:
        """Seed 002's deletion / insertion / WSOL / activation comparison on clean images of the pair."""
        __tracebackhide__ = True
        self._skip_unless_owned(pair_name)
        config = self._session.thresholds.explanations
        case = CaseSpec(pair_name, "clean", 0.0, MappingProxyType(dict(config.tolerances)))
        self._guarded(case, case.tolerances, lambda: self._explanation_records(case))

    def speedup(self, pair_name: str, benchmark=None) -> None:
        """FP32 / quantized latency, interleaved (and inference + EigenCAM when the pair has a CAM layer).
        Gated when the thresholds set a tolerance; otherwise measured and reported ("measured")."""
        __tracebackhide__ = True
        self._skip_unless_owned(pair_name)
        config = self._session.thresholds.latency
        case = CaseSpec(pair_name, "latency", float(config.batch), config.tolerances)
        self._guarded(case, {"speedup": None, **case.tolerances}, lambda: self._latency_records(case, benchmark))

    def quantizer(self, pair_name: str, examples: int = 25) -> None:
        """Quantizer properties of the twin's own quantizers (qrobust.quant.properties): fails with one
        line per violating quantizer, naming the layer, the property and the drawn counterexample; and
        the share of MACs it quantizes (``quantized_fraction``) where the thresholds set it."""
        __tracebackhide__ = True
        self._skip_unless_owned(pair_name)
        case = CaseSpec(pair_name, "clean", 0.0, {"quantizer_violations": 0.0})
        self._guarded(case, case.tolerances, lambda: self._quantizer_records(case, examples))

    # ---- what each gate measures ----------------------------------------------------------------------------
    def _case_records(self, case: CaseSpec, tolerances: dict) -> tuple[list[CheckRecord], list[str]]:
        result = self._session.evaluate(case)
        records, messages, failed = self._session.case_records(self._node.nodeid, case, tolerances, result,
                                                               lambda metric: self._why_missing(case, metric))
        if failed:
            messages += self._diagnosis(case, failed)
        return records, messages

    def _explanation_records(self, case: CaseSpec) -> tuple[list[CheckRecord], list[str]]:
        from qrobust.explain.quality import explanation_quality

        session = self._session
        config = session.thresholds.explanations
        pair = session.pair(case.pair)
        data = session.evaluator.dataset(pair.dataset).subset(config.samples, session.seed)
        with stage("explain", case.pair):
            estimates = explanation_quality(pair, data, session.evaluator.cam_methods[case.pair], seed=session.seed,
                                            replicates=session.thresholds.replicates, steps=config.steps)
        records, messages = [], []
        for metric in case.tolerances:
            if metric not in estimates:
                reason = f"{metric} needs ground-truth boxes; dataset {pair.dataset!r} has none"
                records.append(self._error(case, metric, reason))
                messages.append(reason)
                continue
            record, message = self._decide(case, metric, estimates[metric], self._tolerance(case.tolerances, metric))
            records.append(record)
            messages += [message] if message else []
        return records, messages

    def _latency_records(self, case: CaseSpec, benchmark) -> tuple[list[CheckRecord], list[str]]:
        from qrobust.explain.cam import compute_cams
        from qrobust.metrics.timing import interleaved_speedup
        from qrobust.runtimes import runtime_name, same_runtime_fp32

        session = self._session
        config = session.thresholds.latency
        pair = session.pair(case.pair)
        h, w = pair.preprocess.resolution
        pixels = torch.rand(config.batch, pair.preprocess.channels, h, w,
                            generator=torch.Generator().manual_seed(session.seed))
        x = pair.preprocess.normalize(pixels)
        with stage("latency", case.pair):
            reference = same_runtime_fp32(pair.fp32, pair.quantized, x)  # like with like: the twin's runtime
            x_ref, x_q = place(reference, x), place(pair.quantized, x)  # moved before the clock starts
            if benchmark is not None:  # pytest-benchmark's own table, of the quantized forward
                with torch.inference_mode():
                    benchmark.pedantic(feed, args=(pair.quantized, x_q), rounds=config.rounds, iterations=1,
                                       warmup_rounds=2)
            timings = {"speedup": interleaved_speedup(lambda v: feed(reference, v), lambda v: feed(pair.quantized, v),
                                                      x_ref, x_q, rounds=config.rounds)}
            if pair.target_layer:  # seed 002 times inference plus EigenCAM on both models: one hooked forward each
                timings["cam_speedup"] = interleaved_speedup(
                    lambda v: compute_cams(reference, v, pair.target_layer, ["eigencam"]),
                    lambda v: compute_cams(pair.quantized, v, pair.quantized_target_layer, ["eigencam"]),
                    x_ref, x_q, rounds=config.rounds)
        runtimes = {"fp32_runtime": runtime_name(reference), "quantized_runtime": runtime_name(pair.quantized)}
        records, messages = [], []
        for metric, s in timings.items():
            estimate = Estimate(s.speedup, s.interval, s.rounds, {"fp32_ms": s.fp32_ms, "quantized_ms": s.quantized_ms,
                                                                    "batch": config.batch, **runtimes})
            record, message = self._decide(case, metric, estimate, self._tolerance(case.tolerances, metric))
            records.append(record)
            messages += [message] if message else []
        for metric in set(case.tolerances) - set(timings):  # cam_speedup of a pair without a CAM layer
            reason = f"{metric}: pair {case.pair!r} has no CAM target layer to time EigenCAM on"
            records.append(self._error(case, metric, reason))
            messages.append(reason)
        return records, messages

    def _quantizer_records(self, case: CaseSpec, examples: int) -> tuple[list[CheckRecord], list[str]]:
        from qrobust.quant.coverage import mac_coverage
        from qrobust.quant.properties import check_twin, quantizers

        session = self._session
        try:
            pair = session.pairs.built(case.pair)  # the properties read even a twin too broken for the probe
        except Exception as exc:  # noqa: BLE001 - a pair that cannot be built is one line
            raise PairUnavailable(f"pair {case.pair} cannot be built: {one_line(exc)}") from None
        failures = check_twin(pair.quantized, examples)
        count = len(quantizers(pair.quantized))
        estimate = Estimate(float(len(failures)), None, count, {"violations": failures[:10]})
        record, message = self._decide(case, "quantizer_violations", estimate, 0.0)
        records, messages = [record], []
        if message:
            messages = [f"{case.pair}: {len(failures)} of {count} quantizers break a property"] + [
                f"{case.pair} / {line}" for line in failures[:10]]
        h, w = pair.preprocess.resolution
        with stage("coverage", case.pair):
            coverage = mac_coverage(pair.fp32, pair.quantized, torch.zeros(1, pair.preprocess.channels, h, w))
        entry = session.thresholds.gate.get(case.pair)
        configured = {**session.thresholds.defaults, **(entry.tolerances if entry else {})}
        estimate = Estimate(coverage["fraction"], None, coverage["total"],
                            {"quantized_layers": coverage["quantized"],
                             "float_layers": [r["layer"] for r in coverage["layers"] if not r["quantized"]][:20]})
        record, message = self._decide(case, "quantized_fraction", estimate,
                                       self._tolerance(configured, "quantized_fraction"))
        return records + [record], messages + ([message] if message else [])

    # ---- sharded jobs (--qrobust-shard K/N; qrobust.gate.shards) ------------------------------------------
    def _defer(self, case: CaseSpec, tolerances: dict) -> None:
        """Evaluate this job's sample shards of ``case`` and hand the check to ``qrobust merge``, which judges
        it on every job's states: carried as a pending check, and the test skips saying so."""
        pending = {"test": self._node.nodeid, "pair": case.pair, "perturbation": case.perturbation,
                   "level": case.level, "xfail": case.xfail, "tolerances": dict(tolerances), "error": None,
                   "missing": {}}
        try:
            self._session.evaluate(case)
            pending["missing"] = {m: self._why_missing(case, m) for m in tolerances}
        except PairUnavailable as exc:
            pending["error"] = str(exc)
        self._carry("pending", pending)
        k, n = self._session.options.shard
        pytest.skip(f"shard {k}/{n}: this job's samples evaluated; qrobust merge judges the check")

    def _skip_unless_owned(self, pair: str) -> None:
        """With --qrobust-shard, a whole-pair test runs in one job only (QrobustSession.owns)."""
        if not self._session.owns(pair):
            k, n = self._session.options.shard
            pytest.skip(f"shard {k}/{n}: pair {pair}'s whole-pair tests run in another job of the {n}")

    # ---- shared steps -----------------------------------------------------------------------------------
    def _guarded(self, case: CaseSpec, tolerances, measure: Callable[[], tuple[list[CheckRecord], list[str]]]) -> None:
        """Run ``measure``, carry its records (errors where it could not judge) and fail the test with every
        violation. A pair that cannot be gated is one line; any other exception is a crashed check: its
        records say so, and the exception propagates with its traceback."""
        __tracebackhide__ = True
        try:
            records, messages = measure()
        except PairUnavailable as exc:
            records, messages = [self._error(case, m, str(exc)) for m in tolerances], [str(exc)]
        except Exception as exc:
            self._settle_and_carry(case, [self._error(case, m, f"the check crashed: {one_line(exc)}")
                                          for m in tolerances])
            raise
        self._settle_and_carry(case, records)
        verdicts = {r.verdict for r in records}
        if case.xfail and "error" not in verdicts:
            if "xfail" in verdicts:
                raise ExpectedFailureCaught("\n".join(messages))
            return  # not caught: pytest's strict xfail fails the test (XPASS), as the records say
        if any(fails(r.as_dict()) for r in records):
            pytest.fail("\n".join(messages), pytrace=False)

    def _settle_and_carry(self, case: CaseSpec, records: list[CheckRecord]) -> None:
        if case.xfail:
            settle_expected_failure(records, case.xfail)
        for record in records:
            self._carry("case", record.as_dict())

    def _error(self, case: CaseSpec, metric: str, reason: str) -> CheckRecord:
        return error_record(test=self._node.nodeid, pair=case.pair, perturbation=case.perturbation, level=case.level,
                            metric=metric, mode=self._session.decision, error=reason)

    def _diagnosis(self, case: CaseSpec, failed: list[tuple[str, float, float]]) -> list[str]:
        """The failing case's worst layers (one line), with --qrobust-sensitivity a fix to try, with
        --qrobust-try-fix that fix re-gated; all attached to its records for the report."""
        from qrobust.gate.diagnosis import describe_fix
        from qrobust.gate.sensitivity import describe

        session = self._session
        try:
            found = dict(session.diagnoses.layers(case))
            lines = [found["line"]] if found["line"] else []
            if session.diagnoses.top and failed:
                metric, tolerance, value = failed[0]
                found["sensitivity"] = {"metric": metric, **session.diagnoses.sensitivity(case, metric, tolerance, value)}
                lines.append(describe(found["sensitivity"], metric))
            if session.options.try_fix and failed:
                found["fix"] = session.diagnoses.try_fix(case, failed, lambda tolerances, result: session.case_records(
                    self._node.nodeid, case, tolerances, result, lambda m: self._why_missing(case, m))[0])
                lines.append(describe_fix(found["fix"]))
        except Exception as exc:  # noqa: BLE001 - a diagnosis that cannot run must not hide the failure
            return [f"(no per-layer diagnosis: {type(exc).__name__}: {exc})"[:300]]
        self._carry("diagnosis", {"pair": case.pair, "perturbation": case.perturbation, "level": case.level, **found})
        return lines

    def _why_missing(self, case: CaseSpec, metric: str) -> str:
        """The one-line reason a metric of a case has no value (its check is an error): what the pair, as
        built, cannot compute (``PairFacts.cannot``, the plan's own rule), else that it was not computed."""
        from qrobust.explain.cam import method
        from qrobust.models import PairFacts
        from qrobust.quant.convert import is_runtime
        from qrobust.quant.taps import tappable
        from qrobust.runtimes import RecordedOutputs

        pair = self._session.pair(case.pair)
        layer_free = not method(self._session.evaluator.cam_methods[case.pair]).uses_layer
        facts = PairFacts(cam=bool(pair.target_layer) or layer_free, saliency=False, classes=pair.num_classes,
                          dataset=pair.dataset, live=not isinstance(pair.quantized, RecordedOutputs),
                          layers=tappable(pair.quantized) and not is_runtime(pair.fp32))
        reason = facts.cannot(metric)
        return f"{metric} cannot be judged for pair {case.pair!r}: {reason}" if reason else \
            f"{metric} was not computed for {case.id}"

    def _tolerance(self, configured, metric: str) -> float | None:
        """A ``qrobust_tolerance`` marker's value (validated at collection) over the configured one."""
        marker = self._node.get_closest_marker("qrobust_tolerance")
        if marker is not None and metric in marker.kwargs:
            return float(marker.kwargs[metric])
        return configured.get(metric)

    def _decide(self, case: CaseSpec, metric: str, estimate: Estimate, tolerance: float | None,
                context: dict | None = None) -> tuple[CheckRecord, str | None]:
        """The record of one measured metric and its failure message (None when it passes)."""
        return self._session.decide(self._node.nodeid, case, metric, estimate, tolerance, context)
