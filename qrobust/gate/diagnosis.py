"""Why a case fails: the twin's per-layer error on the case's most different samples (the layers where
the error enters), and, on request, the sensitivity pass that requantizes with the worst layers kept in
FP32 (``qrobust.gate.sensitivity``). Each is computed once per case, with the inputs the gate fed it."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from qrobust.metrics.catalog import METRICS
from qrobust.placement import stage


class Diagnoses:
    """Per-case diagnoses of a run. ``evaluator`` and ``pair`` return the run's evaluator and a loaded
    pair; ``top`` is --qrobust-sensitivity's N (0: no sensitivity pass); ``announce`` reports progress."""

    def __init__(self, evaluator: Callable[[], object], pair: Callable[[str], object], *, top: int = 0,
                 announce: Callable[[str], None] | None = None):
        self._evaluator, self._pair, self.top, self.announce = evaluator, pair, top, announce
        self._layers: dict = {}  # (pair, perturbation, level) -> per-layer diagnosis
        self._sensitivity: dict = {}  # (pair, perturbation, level, metric) -> the sensitivity pass's result

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

    def sensitivity(self, case, metric: str, tolerance: float, value: float) -> dict:
        """The sensitivity pass for a failing metric of a case: which of the worst layers, kept in FP32,
        bring the metric within its tolerance on the same inputs."""
        key = (case.pair, case.perturbation, case.level, metric)
        if key not in self._sensitivity:
            from qrobust.gate.engine import Evaluator
            from qrobust.gate.sensitivity import suggest_keep_fp32, with_twin

            ev, pair = self._evaluator(), self._pair(case.pair)

            def evaluate(twin) -> float:
                trial = Evaluator([with_twin(pair, twin)], seed=ev.seed, batch_size=ev.batch_size,
                                  max_samples=ev.max_samples, replicates=ev.replicates, f1_average=ev.f1_average,
                                  datasets=ev.datasets, device=str(ev.device))
                result = trial.evaluate(pair.name, case.perturbation, case.level, cam=METRICS[metric].needs_cam)
                return result.metric(metric).value

            self._sensitivity[key] = suggest_keep_fp32(pair, evaluate, metric, tolerance, value,
                                                       self.layers(case)["layers"], top=self.top,
                                                       progress=self.announce)
        return self._sensitivity[key]
