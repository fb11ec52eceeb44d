"""The per-test check object behind the ``qrobust_check`` fixture (pytest-benchmark's BenchmarkFixture
pattern): it owns the test's node, so suites never pass ``request.node``, and offers one verb per gate.

Each verb evaluates through the session (cached), gets verdicts from ``qrobust.gate.verdict``, records
every check on the node (the controller collects them, also from xdist workers) and fails the test once
with every violation.
"""
from __future__ import annotations

import json

import pytest
import torch

from qrobust.gate.plan import CaseSpec
from qrobust.gate.verdict import judge
from qrobust.metrics.catalog import METRICS
from qrobust.metrics.stats import Estimate
from qrobust.placement import feed, place, stage
from qrobust.plugin import CASE_PROPERTY, DIAGNOSIS_PROPERTY
from qrobust.session import PairUnavailable, QrobustSession



class QrobustCheck:
    def __init__(self, node, session: QrobustSession):
        self._node, self._session = node, session

    def __call__(self, case: CaseSpec, metrics: str | list[str]) -> None:
        """``qrobust_check(case, "top1_delta")`` or with a list of metrics: the same as ``metric``."""
        names = [metrics] if isinstance(metrics, str) else list(metrics)
        self.metric(case, *names)

    # ---- the three gates ------------------------------------------------------------------------------
    def metric(self, case: CaseSpec, *names: str) -> None:
        """Decide the named metrics of ``case`` against their tolerances (and the baseline)."""
        __tracebackhide__ = True
        for name in names:
            if name not in METRICS or not METRICS[name].case_metric:
                raise pytest.UsageError(f"qrobust_check: {name!r} is not a per-case metric")
        tolerances = {m: t for m in names if (t := self._tolerance(case.tolerances, m)) is not None}
        if not tolerances:
            pytest.skip(f"no tolerance configured for {', '.join(names)} on {case.id}")
        result = self._result(case)
        if not result.healthy:
            message = result.health_message()
            for metric, tolerance in tolerances.items():
                self._decide(case, metric, Estimate(float("nan"), None, result.n, {"error": message}), tolerance)
            pytest.fail(message, pytrace=False)
        context = {k: result.estimates[k].value for k in ("top1_fp32", "top1_quant", "logit_sqnr_db")}
        failures, missing, failed = [], [], []
        for metric, tolerance in tolerances.items():
            if metric in result.estimates:
                messages = self._decide(case, metric, result.metric(metric), tolerance, context)
                failures += messages
                failed += [(metric, tolerance, result.metric(metric).value)] if messages else []
            else:
                missing.append(self._why_missing(case, metric))
        if failures:
            pytest.fail("\n".join(failures + self._diagnosis(case, failed)), pytrace=False)
        if missing:
            pytest.skip("; ".join(missing))

    def explanations(self, pair_name: str) -> None:
        """Seed 002's deletion / insertion / WSOL / activation comparison on clean images of the pair."""
        from types import MappingProxyType

        from qrobust.explain.quality import explanation_quality

        session = self._session
        config = session.thresholds.explanations
        pair = self._pair(pair_name)
        data = session.evaluator.dataset(pair.dataset).subset(config.samples, session.seed)
        with stage("explain", pair_name):
            estimates = explanation_quality(pair, data, session.evaluator.cam_methods[pair_name], session.seed,
                                            session.thresholds.replicates, config.steps)
        case = CaseSpec(pair_name, "clean", 0.0, MappingProxyType(dict(config.tolerances)))
        failures = []
        for metric in case.tolerances:
            if metric not in estimates:
                pytest.skip(f"{metric} needs ground-truth boxes; dataset {pair.dataset!r} has none")
            failures += self._decide(case, metric, estimates[metric], self._tolerance(case.tolerances, metric))
        if failures:
            pytest.fail("\n".join(failures), pytrace=False)

    def speedup(self, pair_name: str, benchmark=None) -> None:
        """FP32 / quantized latency, interleaved (and inference + EigenCAM when the pair has a CAM layer).
        Gated when the thresholds set a tolerance; otherwise measured and reported ("measured")."""
        import torch

        from qrobust.explain.cam import compute_cams
        from qrobust.metrics.timing import interleaved_speedup
        from qrobust.runtimes import runtime_name, same_runtime_fp32

        session = self._session
        config = session.thresholds.latency
        pair = self._pair(pair_name)
        h, w = pair.preprocess.resolution
        pixels = torch.rand(config.batch, pair.preprocess.channels, h, w,
                            generator=torch.Generator().manual_seed(session.seed))
        x = pair.preprocess.normalize(pixels)
        with stage("latency", pair_name):
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
        case = CaseSpec(pair.name, "latency", float(config.batch), config.tolerances)
        failures = []
        for metric, s in timings.items():
            estimate = Estimate(s.speedup, s.interval, s.rounds, {"fp32_ms": s.fp32_ms, "quantized_ms": s.quantized_ms,
                                                                    "batch": config.batch, **runtimes})
            failures += self._decide(case, metric, estimate, self._tolerance(case.tolerances, metric))
        if failures:
            pytest.fail("\n".join(failures), pytrace=False)

    def quantizer(self, pair_name: str, examples: int = 25) -> None:
        """Quantizer properties of the twin's own quantizers (qrobust.quant.properties): fails with one
        line per violating quantizer, naming the layer, the property and the drawn counterexample."""
        from qrobust.quant.properties import check_twin, quantizers

        try:
            pair = self._session.built(pair_name)
        except Exception as exc:  # noqa: BLE001 - a pair that cannot be built fails with one line
            pair, reason = None, f"pair {pair_name} cannot be built: {type(exc).__name__}: {exc}"[:300]
        if pair is None:
            pytest.fail(reason, pytrace=False)  # outside the except, as in _pair
        failures = check_twin(pair.quantized, examples)
        count = len(quantizers(pair.quantized))
        case = CaseSpec(pair_name, "clean", 0.0, {"quantizer_violations": 0.0})
        estimate = Estimate(float(len(failures)), None, count, {"violations": failures[:10]})
        messages = []
        if self._decide(case, "quantizer_violations", estimate, 0.0):
            messages = [f"{pair_name}: {len(failures)} of {count} quantizers break a property"] + [
                f"{pair_name} / {line}" for line in failures[:10]]
        messages += self._coverage(case, pair)
        if messages:
            pytest.fail("\n".join(messages), pytrace=False)

    def _coverage(self, case: CaseSpec, pair) -> list[str]:
        """The share of MACs the twin quantizes, gated by ``quantized_fraction`` where the thresholds set it."""
        from qrobust.quant.coverage import mac_coverage

        session = self._session
        h, w = pair.preprocess.resolution
        with stage("coverage", case.pair):
            coverage = mac_coverage(pair.fp32, pair.quantized, torch.zeros(1, pair.preprocess.channels, h, w))
        entry = session.thresholds.gate.get(case.pair)
        configured = {**session.thresholds.defaults, **(entry.tolerances if entry else {})}
        estimate = Estimate(coverage["fraction"], None, coverage["total"],
                            {"quantized_layers": coverage["quantized"],
                             "float_layers": [r["layer"] for r in coverage["layers"] if not r["quantized"]][:20]})
        return self._decide(case, "quantized_fraction", estimate, self._tolerance(configured, "quantized_fraction"))

    # ---- shared steps -----------------------------------------------------------------------------------
    def _diagnosis(self, case: CaseSpec, failed: list[tuple[str, float, float]]) -> list[str]:
        """The failing case's worst layers (one line) and, with --qrobust-sensitivity, a fix to try; both
        attached to its records for the report."""
        from qrobust.gate.sensitivity import describe

        session = self._session
        try:
            found = dict(session.diagnose(case))
            lines = [found["line"]] if found["line"] else []
            if session.options.sensitivity and failed:
                metric, tolerance, value = failed[0]
                found["sensitivity"] = {"metric": metric, **session.sensitivity(case, metric, tolerance, value)}
                lines.append(describe(found["sensitivity"], metric))
        except Exception as exc:  # noqa: BLE001 - a diagnosis that cannot run must not hide the failure
            return [f"(no per-layer diagnosis: {type(exc).__name__}: {exc})"[:300]]
        self._node.user_properties.append((DIAGNOSIS_PROPERTY, json.dumps({"pair": case.pair, "perturbation":
                                           case.perturbation, "level": case.level, **found})))
        return lines

    def _why_missing(self, case: CaseSpec, metric: str) -> str:
        """The one-line reason a metric of a case has no value (the check skips with it)."""
        pair = self._session.pair(case.pair)
        if METRICS[metric].family in ("cam", "saliency_gt") and not pair.target_layer:
            return (f"{metric}: pair {case.pair!r} has no CAM target layer (set target_layer to gate CAM metrics, "
                    "or cam: {method: occlusion}, which needs none)")
        if METRICS[metric].family == "saliency_gt":
            return f"{metric} needs ground-truth saliency maps; dataset {pair.dataset!r} has none"
        if metric == "top5_delta" and pair.num_classes <= 5:
            return f"top5_delta: pair {case.pair!r} has {pair.num_classes} classes, so every label is in its top 5"
        return f"{metric} was not computed for {case.id}"

    def _pair(self, name: str):
        try:
            return self._session.pair(name)
        except PairUnavailable as exc:
            reason = str(exc)
        pytest.fail(reason, pytrace=False)  # outside the except: pytest would print the reason again as its context

    def _result(self, case: CaseSpec):
        try:
            return self._session.evaluate(case)
        except PairUnavailable as exc:
            reason = str(exc)
        pytest.fail(reason, pytrace=False)

    def _tolerance(self, configured, metric: str) -> float | None:
        """A ``qrobust_tolerance`` marker's value (validated at collection) over the configured one."""
        marker = self._node.get_closest_marker("qrobust_tolerance")
        if marker is not None and metric in marker.kwargs:
            return float(marker.kwargs[metric])
        return configured.get(metric)

    def _decide(self, case: CaseSpec, metric: str, estimate: Estimate, tolerance: float | None,
                context: dict | None = None) -> list[str]:
        """Judge, record on the node, return the failure message (if any) as a list."""
        session = self._session
        mismatch = session.baseline_mismatch()
        old = None if mismatch else session.baseline_value(case.pair, case.perturbation, case.level, metric)
        record, message = judge(test=self._node.nodeid, pair=case.pair, perturbation=case.perturbation,
                                level=case.level, metric=metric, estimate=estimate, tolerance=tolerance,
                                mode=session.decision, context=context, baseline_old=old,
                                baseline_margin=session.thresholds.baseline_margin(metric),
                                family_size=session.family_sizes.get(case.pair))
        if mismatch and tolerance is not None:
            record["verdict"], record["failed_by"] = "fail", "baseline"
            message = "\n".join(filter(None, [message, mismatch]))
        self._node.user_properties.append((CASE_PROPERTY, json.dumps(record)))
        return [message] if message else []
