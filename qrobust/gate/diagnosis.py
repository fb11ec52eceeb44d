"""Why a case fails: the twin's per-layer error on the case's most different samples (the layers where
the error enters), and, on request, the sensitivity pass that requantizes with the worst layers kept in
FP32 (``qrobust.gate.sensitivity``) and the re-gate of its suggestion (``--qrobust-try-fix``). Each is
computed once per case, with the inputs the gate fed it: a requantized twin is evaluated on the same
seeded perturbations of the same samples, so no new draw can make a fix look better than it is."""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from qrobust.gate.verdict import fails
from qrobust.metrics.catalog import LAYER_METRICS, METRICS
from qrobust.placement import stage

TRY_FIX_LAYERS = 3  # worst layers --qrobust-try-fix tries in FP32 unless --qrobust-sensitivity says otherwise
TRY_FIX_SECONDS = 600.0  # a run's time for fixes: beyond it, a failing case says so instead of trying


class Diagnoses:
    """Per-case diagnoses of a run. ``evaluator`` and ``pair`` return the run's evaluator and a loaded
    pair; ``top`` is --qrobust-sensitivity's N (0: no sensitivity pass); ``announce`` reports progress."""

    def __init__(self, evaluator: Callable[[], object], pair: Callable[[str], object], *, top: int = 0,
                 announce: Callable[[str], None] | None = None):
        self._evaluator, self._pair, self.top, self.announce = evaluator, pair, top, announce
        self._layers: dict = {}  # (pair, perturbation, level) -> per-layer diagnosis
        self._sensitivity: dict = {}  # (pair, perturbation, level, metric) -> the sensitivity pass's result
        self._fixed: dict = {}  # (pair, perturbation, level, keep_fp32) -> (its case result, quantized MAC share)
        self.fix_seconds = 0.0  # time spent on sensitivity passes and re-gates (bounded by TRY_FIX_SECONDS)

    def layers(self, case, *, keep: int = 16) -> dict:
        """Per-layer error of the twin on the case's most different samples (the largest KL among its first
        ``KL_KEPT``, as the gate measured them: no forward to rank them): ``{"line", "layers", "samples"}``."""
        key = (case.pair, case.perturbation, case.level)
        if key not in self._layers:
            from qrobust.metrics.classification import KL_KEPT
            from qrobust.quant.diagnosis import describe, layer_errors

            ev, pair = self._evaluator(), self._pair(case.pair)
            measured = ev.evaluate(case.pair, case.perturbation, case.level).state.first_kl
            x, ids = ev.case_inputs(case.pair, case.perturbation, case.level, KL_KEPT)
            # a sample whose outputs were not finite has no KL: it is the most different of all
            kl = torch.tensor([measured.get(i, math.inf) for i in ids.tolist()], dtype=torch.float64)
            worst = kl.argsort(descending=True, stable=True)[:keep]
            with stage("diagnose", case.pair):
                rows = layer_errors(pair.fp32, pair.quantized, x[worst])
            ev.forward_passes["diagnosis"] += 2
            self._layers[key] = {"line": describe(rows), "layers": [r.as_dict() for r in rows],
                                 "samples": ids[worst].tolist()}
        return self._layers[key]

    def trial(self, case, twin, metrics) -> object:
        """The case evaluated again with ``twin`` in the pair's place, on the same inputs (same seed, data
        and levels: perturbations are seeded by sample id), computing ``metrics``."""
        from qrobust.gate.engine import Evaluator
        from qrobust.gate.sensitivity import with_twin

        ev, pair = self._evaluator(), self._pair(case.pair)
        trial = Evaluator([with_twin(pair, twin)], seed=ev.seed, batch_size=ev.batch_size, max_samples=ev.max_samples,
                          replicates=ev.replicates, f1_average=ev.f1_average, datasets=ev.datasets,
                          device=str(ev.device), operating_points=ev.operating_points)
        return trial.evaluate(pair.name, case.perturbation, case.level, cam=any(METRICS[m].needs_cam for m in metrics),
                              layers=tuple(m for m in metrics if m in LAYER_METRICS))

    def sensitivity(self, case, metric: str, tolerance: float, value: float) -> dict:
        """The sensitivity pass for a failing metric of a case: which of the worst layers, kept in FP32,
        bring the metric within its tolerance on the same inputs."""
        key = (case.pair, case.perturbation, case.level, metric)
        if key not in self._sensitivity:
            from qrobust.gate.sensitivity import suggest_keep_fp32

            started = time.monotonic()
            self._sensitivity[key] = suggest_keep_fp32(
                self._pair(case.pair), lambda twin: self.trial(case, twin, [metric]).metric(metric).value, metric,
                tolerance, value, self.layers(case)["layers"], top=self.top, progress=self.announce)
            self.fix_seconds += time.monotonic() - started
        return self._sensitivity[key]

    def try_fix(self, case, failed: list[tuple[str, float, float]], rejudge: Callable[[dict, object], list]) -> dict:
        """The re-gate of a failing case: the sensitivity pass's keep_fp32 applied, every failing check of
        ``failed`` judged again by ``rejudge(tolerances, result)`` (the gate's own decision, returning
        records) on the same inputs, and what the fix costs in quantized multiply-accumulates."""
        if self.fix_seconds >= TRY_FIX_SECONDS:
            return {"error": f"this run's {TRY_FIX_SECONDS:.0f} s for fixes are spent (--qrobust-try-fix is bounded)"}
        metric, tolerance, value = failed[0]
        found = self.sensitivity(case, metric, tolerance, value)
        if "error" in found or not found["suggestion"]:
            return {"keep_fp32": [], "error": found.get("error") or f"none of the {len(found['tried'])} worst layers "
                                                                     f"recovers {metric} when kept in FP32"}
        keep = tuple(found["suggestion"])
        key = (case.pair, case.perturbation, case.level, keep)
        if key not in self._fixed:
            from qrobust.quant.coverage import mac_coverage

            started, pair = time.monotonic(), self._pair(case.pair)
            twin = pair.requantize(keep)
            result = self.trial(case, twin, [m for m, _, _ in failed])
            x, _ = self._evaluator().case_inputs(case.pair, case.perturbation, case.level, 1)
            self._fixed[key] = result, mac_coverage(pair.fp32, twin, x)["fraction"]
            self.fix_seconds += time.monotonic() - started
        result, fraction = self._fixed[key]
        checks = [{"metric": r.metric, "verdict": r.verdict, "value": r.value, "tolerance": r.tolerance,
                   "passes": not fails(r.as_dict())} for r in rejudge({m: t for m, t, _ in failed}, result)]
        return {"keep_fp32": list(keep), "checks": checks, "quantized_fraction": fraction,
                "passes": all(c["passes"] for c in checks), "tried": len(found["tried"])}


def describe_fix(found: dict) -> str:
    """``fix re-gated: keep_fp32 [...]: 2 of 2 failing checks now pass; 91.2% of MACs stay quantized``."""
    if "error" in found:
        return f"fix re-gated: none ({found['error']})"
    passed, total = sum(c["passes"] for c in found["checks"]), len(found["checks"])
    why = "" if found["passes"] else (f"; {total - passed} still fail with the best of the {found['tried']} worst layers' "
                                      "blocks in FP32: the loss is not in a few layers (look at the recipe)")
    return (f"fix re-gated: keep_fp32 {found['keep_fp32']}: {passed} of {total} failing checks now pass{why}; "
            f"{found['quantized_fraction']:.1%} of MACs stay quantized")
