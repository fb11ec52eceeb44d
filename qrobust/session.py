"""The gate session behind the pytest plugin: thresholds, pairs loaded once, checks, report, baselines."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from qrobust.errors import ConfigError, invalid
from qrobust.report import (
    build_report, case_key, environment, fingerprint, load_baseline, save_baseline, write_report,
)
from qrobust.stats import decide, required_sample_size
from qrobust.thresholds import CAM_METRIC_NAMES, METRICS, CaseSpec, load_thresholds

CASE_PROPERTY = "qrobust_case"

# How far a value may move against a saved baseline before the case counts as a regression.
BASELINE_MARGINS = {"top1_delta": 0.005, "top5_delta": 0.005, "f1_delta": 0.005, "agreement": 0.005,
                    "kl_mean": 0.005, "kl_p95": 0.01, "cam_rmse": 0.01, "cam_sim": 0.01, "cam_cc": 0.02,
                    "cam_kld": 0.02, "cam_sim_gt_delta": 0.01, "cam_cc_gt_delta": 0.02, "cam_kld_gt_delta": 0.02,
                    "deletion_auc_delta": 0.01, "insertion_auc_delta": 0.01,
                    "wsol_iou_delta": 0.05, "activation_dice": 0.02, "speedup": 0.25, "cam_speedup": 0.25}


class QrobustSession:
    def __init__(self, thresholds_path: str, pairs: str | None = None, device: str = "cpu", seed: int | None = None,
                 decision: str | None = None, max_samples: int | None = None, save_baseline: str | None = None,
                 overwrite_baseline: bool = False, baseline: str | None = None, baseline_any_env: bool = False,
                 worker: bool = False):
        self.thresholds = load_thresholds(thresholds_path)
        t = self.thresholds
        self.seed = t.seed if seed is None else seed
        self.decision = decision or t.decision
        self.max_samples = max_samples or t.max_samples
        self.device = device
        known = (set(t.gated_pairs) | set(t.bitwidth.get("pairs") or []) | set(t.latency.get("pairs") or [])
                 | set(t.explanations.get("pairs") or []))
        selected = None
        if pairs:
            selected = [p.strip() for p in pairs.split(",") if p.strip()]
            for name in selected:
                if name not in known:
                    raise ConfigError(f"--qrobust-pairs: unknown pair {name!r} (in {t.path}: {', '.join(sorted(known))})")
        keep = (lambda name: selected is None or name in selected)  # noqa: E731
        self.cases = [c for c in t.cases if keep(c.pair)]
        self.bitwidth_cases = [c for c in self._bitwidth_cases() if keep(c.pair)]
        self.latency_pairs = [p for p in t.latency.get("pairs") or [] if keep(p)]
        self.explanation_pairs = [p for p in t.explanations.get("pairs") or [] if keep(p)]
        self.save_baseline_path, self.overwrite_baseline = save_baseline, overwrite_baseline
        if save_baseline and Path(save_baseline).exists() and not overwrite_baseline and not worker:
            raise ConfigError(f"{save_baseline}: baseline exists; pass --qrobust-overwrite-baseline to replace it")
        self.baseline = load_baseline(baseline) if baseline else None
        self.baseline_path, self.baseline_any_env = baseline, baseline_any_env
        self._pairs: dict = {}
        self.pair_loads: Counter[str] = Counter()
        self._evaluator = None
        self.progress = None  # callable(label, done, total) the evaluator reports batches to (the plugin sets it)
        self._datasets = None
        self._fingerprint_cache: tuple[tuple, dict] = ((None,), {})
        self.problems: list[str] = []
        self.summary_lines: list[str] | None = None

    # ---- cases -------------------------------------------------------------------------------------
    def _bitwidth_cases(self) -> list[CaseSpec]:
        """Seed 003's sweep: pairs below ``min_bits`` are strict expected failures (the gate must catch them)."""
        from types import MappingProxyType

        from qrobust.pairs import pair_entry
        from qrobust.quantize import PRESETS

        bw = self.thresholds.bitwidth
        cases = []
        for name in bw.get("pairs") or []:
            preset = pair_entry(name).preset
            if preset is None:
                raise ConfigError(f"{self.thresholds.path}: bitwidth.pairs: pair {name!r} has no preset, so no bit width")
            bits = PRESETS.get(preset).weight.bits
            below = bits < bw.get("min_bits", 1)
            reason = f"{bits} bits is below min_bits={bw.get('min_bits')}: must fail the tolerances" if below else None
            cases.append(CaseSpec(name, bw.get("perturbation", "awgn"), float(bw.get("level", 0)),
                                  MappingProxyType(dict(bw.get("tolerances") or {})), reason))
        return cases

    # ---- models --------------------------------------------------------------------------------------
    def pair(self, name: str):
        """A pair, loaded at most once per process (per xdist worker)."""
        if name not in self._pairs:
            from qrobust.declared import build_pair
            from qrobust.pairs import load_pair

            declared = self.thresholds.pairs.get(name)
            pair = (build_pair(name, declared, Path(self.thresholds.path).parent, self.datasets) if declared
                    else load_pair(name))
            if pair.kind != "int8":
                pair.fp32.to(self.device)
                pair.quantized.to(self.device)
            self._pairs[name] = pair
            self.pair_loads[name] += 1
        return self._pairs[name]

    @property
    def datasets(self) -> dict:
        """The datasets declared in the thresholds file, built once (folders stream lazily)."""
        if self._datasets is None:
            from qrobust.data import load_dataset
            from qrobust.declared import build_dataset

            base = Path(self.thresholds.path).parent
            self._datasets = {n: build_dataset(n, spec, base, self.seed) for n, spec in self.thresholds.datasets.items()}
            for pair_spec in self.thresholds.pairs.values():  # built-in datasets a declared pair names
                for ref in (pair_spec["dataset"], (pair_spec.get("calibration") or {}).get("dataset")):
                    if ref and ref not in self._datasets:
                        self._datasets[ref] = load_dataset(ref)
        return self._datasets

    @property
    def evaluator(self):
        if self._evaluator is None:
            from qrobust.engine import Evaluator

            cases = self.cases + self.bitwidth_cases
            names = list(dict.fromkeys([c.pair for c in cases] + self.explanation_pairs))
            if not names:
                raise invalid("pairs", [], "no pair is gated (empty gate section or --qrobust-pairs filter)")
            t = self.thresholds
            pairs = [self.pair(n) for n in names]
            cam_cases = {(c.pair, c.perturbation, c.level) for c in cases if set(c.tolerances) & set(CAM_METRIC_NAMES)}
            methods = {} if t.cam_method == "auto" else {p.name: t.cam_method for p in pairs}
            self._evaluator = Evaluator(pairs, seed=self.seed, batch_size=t.batch_size,
                                        max_samples=self.max_samples, replicates=t.replicates,
                                        f1_average=t.f1_average, device=self.device,
                                        wanted={(c.pair, c.perturbation, c.level) for c in cases},
                                        datasets=self.datasets,
                                        cam_cases=cam_cases, cam_methods=methods)
            self._evaluator.progress = self.progress
        return self._evaluator

    def environment(self, weights: dict[str, str]) -> dict:
        return environment(self.seed, self.decision, self.thresholds.sha256, weights)

    def _weights(self) -> dict[str, str]:
        out = {}
        for pair in self._pairs.values():
            out.update({Path(p).name: sha for p, sha in pair.metadata.get("weights", {}).items()})
            if pair.metadata.get("random_weights"):
                out[pair.name] = "RANDOM WEIGHTS: for latency and pipeline checks only, not a robustness verdict"
        return out

    # ---- checks --------------------------------------------------------------------------------------
    def check(self, case: CaseSpec, metrics: str | list[str], item) -> None:
        """Evaluate ``case`` (cached), decide each metric against its tolerance, record all, then fail
        with every violation's numbers (so a multi-metric check reports all of them, not the first)."""
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        for metric in metrics:
            if metric not in METRICS:
                raise invalid("metric", metric, f"unknown metric (known: {', '.join(METRICS)})")
        tolerances = {m: self._tolerance(case, m, item) for m in metrics}
        tolerances = {m: t for m, t in tolerances.items() if t is not None}
        if not tolerances:
            pytest.skip(f"no tolerance configured for {', '.join(metrics)} on {case.id} in {self.thresholds.path}")
        result = self.evaluator.evaluate(case.pair, case.perturbation, case.level)
        if not result.healthy:
            for metric, tolerance in tolerances.items():
                self._record(item, case, metric, None, None, result.n, tolerance, "fail",
                             {"error": result.health_message()})
            pytest.fail(result.health_message(), pytrace=False)
        context = {k: result.estimates[k].value for k in ("top1_fp32", "top1_quant")}
        failures = []
        for metric, tolerance in tolerances.items():
            if metric.endswith("_gt_delta") and metric not in result.estimates:
                pytest.skip(f"{metric} needs ground-truth saliency maps; dataset of {case.pair!r} has none")
            est = result.metric(metric)
            details = dict(est.details)
            if metric in ("top1_delta", "top5_delta") and tolerance > 0:
                details["n_required"] = required_sample_size(details["b"] + details["c"], est.n, tolerance)
            failures += self.judge(item, case, metric, est.value, est.interval, est.n, tolerance,
                                   {**details, "context": context})
        if failures:
            pytest.fail("\n".join(failures), pytrace=False)

    def judge(self, item, case: CaseSpec, metric: str, value: float, interval, n: int, tolerance: float,
              details: dict) -> list[str]:
        """Decide one measured value, compare it with the baseline and record it; returns the failures."""
        higher = METRICS[metric].higher_is_better
        decision = decide(value, interval, tolerance, higher, self.decision)
        verdict = decision.verdict
        messages = []
        if not decision.passed:
            ci = "no interval" if interval is None else f"95% CI [{interval[0]:.4g}, {interval[1]:.4g}]"
            extra = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in details.items() if k != "context" and len(str(v)) < 80)
            messages.append(f"{case.pair} / {case.perturbation} @ {case.level:g}: {metric} = {value:.4g} ({ci}, "
                            f"n={n}{', ' + extra if extra else ''}); tolerance {'>=' if higher else '<='} "
                            f"{tolerance:g}; margin {decision.margin:+.4g}; decision {self.decision}: {verdict}")
        regression = self._baseline_regression(case, metric, value)
        if regression:
            messages.append(regression)
            verdict = "fail"
        self._record(item, case, metric, value, interval, n, tolerance, verdict, details, decision.margin)
        return messages

    # ---- explanations ----------------------------------------------------------------------------------
    def check_explanations(self, name: str, item) -> None:
        """Seed 002's deletion / insertion / WSOL / activation comparison on clean images of the pair."""
        from types import MappingProxyType

        from qrobust.explain import explanation_quality

        cfg, pair = self.thresholds.explanations, self.pair(name)
        case = CaseSpec(name, "clean", 0.0, MappingProxyType(dict(cfg.get("tolerances") or {})))
        data = self.evaluator.dataset(pair.dataset).subset(int(cfg.get("samples", 64)), self.seed)
        method = self.evaluator.cam_methods[name]
        estimates = explanation_quality(pair, data, method, self.seed, self.thresholds.replicates,
                                        int(cfg.get("steps", 100)))
        failures = []
        for metric in case.tolerances:
            tolerance = self._tolerance(case, metric, item)
            if metric not in estimates:
                pytest.skip(f"{metric} needs ground-truth boxes; dataset {pair.dataset!r} has none")
            est = estimates[metric]
            failures += self.judge(item, case, metric, est.value, est.interval, est.n, tolerance, dict(est.details))
        if failures:
            pytest.fail("\n".join(failures), pytrace=False)

    # ---- latency -------------------------------------------------------------------------------------
    @property
    def latency_rounds(self) -> int:
        return int(self.thresholds.latency.get("rounds", 20))

    def latency_input(self, pair):
        """A seeded random batch at the pair's resolution, normalized (latency does not depend on content)."""
        import torch

        h, w = pair.preprocess.resolution
        batch = int(self.thresholds.latency.get("batch", 32))
        pixels = torch.rand(batch, pair.preprocess.channels, h, w, generator=torch.Generator().manual_seed(self.seed))
        return pair.preprocess.normalize(pixels).to(self.device if pair.kind != "int8" else "cpu")

    def check_speedup(self, pair, x, item) -> None:
        """Gate the FP32/quantized latency ratio (median of interleaved rounds, order-statistic interval)."""
        from types import MappingProxyType

        from qrobust.timing import interleaved_speedup

        from qrobust.cam import compute_cams

        latency = self.thresholds.latency
        timings = {"speedup": interleaved_speedup(pair.fp32, pair.quantized, x, rounds=self.latency_rounds)}
        if "cam_speedup" in latency and pair.target_layer:
            # seed 002 times inference plus EigenCAM on both models: one hooked forward each
            timings["cam_speedup"] = interleaved_speedup(
                lambda v: compute_cams(pair.fp32, v, pair.target_layer, ["eigencam"]),
                lambda v: compute_cams(pair.quantized, v, pair.quantized_target_layer, ["eigencam"]),
                x, rounds=self.latency_rounds)
        case = CaseSpec(pair.name, "latency", float(len(x)), MappingProxyType(
            {m: float(latency.get(m, 1.0)) for m in timings}))
        failures = []
        for metric, s in timings.items():
            failures += self.judge(item, case, metric, s.speedup, s.interval, s.rounds,
                                   self._tolerance(case, metric, item),
                                   {"fp32_ms": s.fp32_ms, "quantized_ms": s.quantized_ms, "batch": len(x)})
        if failures:
            pytest.fail("\n".join(failures), pytrace=False)

    def _tolerance(self, case: CaseSpec, metric: str, item) -> float | None:
        marker = item.get_closest_marker("qrobust_tolerance")
        if marker is not None and metric in marker.kwargs:
            value = marker.kwargs[metric]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise invalid(f"qrobust_tolerance({metric}=...)", value, "must be a finite number >= 0")
            return float(value)
        return case.tolerances.get(metric)

    def _fingerprint(self) -> dict:
        """This process's environment fingerprint, recomputed only when another pair has been loaded."""
        loaded = tuple(self._pairs)
        if self._fingerprint_cache[0] != loaded:
            self._fingerprint_cache = (loaded, fingerprint(self.environment(self._weights())))
        return self._fingerprint_cache[1]

    def _baseline_regression(self, case: CaseSpec, metric: str, value: float) -> str | None:
        if self.baseline is None or not math.isfinite(value):
            return None
        current = self._fingerprint()
        if current != self.baseline["fingerprint"] and not self.baseline_any_env:
            diff = {k: (self.baseline["fingerprint"].get(k), v) for k, v in current.items()
                    if self.baseline["fingerprint"].get(k) != v}
            return (f"baseline {self.baseline_path} was recorded in another environment {diff}; "
                    "pass --qrobust-baseline-any-env to compare anyway")
        key = case_key({"pair": case.pair, "perturbation": case.perturbation, "level": case.level, "metric": metric})
        old = self.baseline["values"].get(key)
        if old is None:
            return None
        margin = self.thresholds.baseline_margins.get(metric, BASELINE_MARGINS[metric])
        worse = (old - value) if METRICS[metric].higher_is_better else (value - old)
        if worse > margin:
            return (f"{case.pair} / {case.perturbation} @ {case.level:g}: {metric} regressed from baseline "
                    f"{old:.4g} to {value:.4g} (by {worse:.4g}, allowed {margin:g})")
        return None

    def _record(self, item, case, metric, value, interval, n, tolerance, verdict, details, margin=None) -> None:
        if value is not None and not math.isfinite(value):
            details = {**details, "value": repr(value)}
            value = None
        record = {"pair": case.pair, "perturbation": case.perturbation, "level": case.level, "metric": metric,
                  "value": value, "interval": list(interval) if interval else None, "n": n, "tolerance": tolerance,
                  "verdict": verdict, "mode": self.decision, "context": details.pop("context", {}),
                  "margin": margin if margin is not None and math.isfinite(margin) else None,
                  "details": details}
        item.user_properties.append((CASE_PROPERTY, json.dumps(record)))

    # ---- end of session --------------------------------------------------------------------------------
    def worker_output(self) -> dict:
        ev = self._evaluator
        return {"weights": self._weights(), "pair_loads": dict(self.pair_loads), "overlays": self._overlays(),
                "forward_passes": dict(ev.forward_passes) if ev else {},
                "perturbed_batches": dict(ev.perturbed_batches) if ev else {},
                "groups": {name: ev.fp32_label(ev.group_of(p)) for name, p in ev.pairs.items()} if ev else {}}

    def _overlays(self, per_pair: int = 6) -> list[dict]:
        """CAM overlays of the most different images (by RMSE) of this process's CAM cases, as PNG data."""
        from qrobust.report import overlay_png

        ev, found = self._evaluator, []
        for result in (ev.cached_results() if ev else []):
            for o in result.cam.overlays if result.cam else []:
                found.append((result, o))
        out = []
        for pair in {r.pair for r, _ in found}:
            best = sorted((f for f in found if f[0].pair == pair), key=lambda f: -f[1]["rmse"])[:per_pair]
            out += [{"pair": r.pair, "perturbation": r.perturbation, "level": r.level, "id": o["id"],
                     "rmse": o["rmse"], "method": r.cam.method, "image": overlay_png(o["pixels"], None),
                     "fp32": overlay_png(o["pixels"], o["fp32"]), "quantized": overlay_png(o["pixels"], o["quantized"])}
                    for r, o in best]
        return out

    def finish(self, records: list[dict], outputs: list[dict], report_dir: str) -> None:
        weights, forwards, batches, groups, loads, overlays = {}, Counter(), Counter(), {}, [], []
        for out in outputs:
            overlays += out["overlays"]
            weights.update(out["weights"])
            forwards.update(out["forward_passes"])
            batches.update(out["perturbed_batches"])
            groups.update(out["groups"])
            if out["pair_loads"]:
                loads.append(out["pair_loads"])
        env = self.environment(weights)
        per_batch = {}
        for pair, fp_label in groups.items():
            if batches[fp_label]:
                per_batch[fp_label] = forwards[fp_label] / batches[fp_label]
                per_batch[pair] = forwards[pair] / batches[fp_label]
        forward_info = {"forward_passes": dict(forwards), "perturbed_batches": dict(batches),
                        "forwards_per_perturbed_batch": per_batch, "pair_loads_per_process": loads}
        report = build_report(records, env, forward_info)
        json_path, html_path = write_report(report_dir, report, overlays)
        if self.save_baseline_path:
            save_baseline(self.save_baseline_path, report, self.overwrite_baseline)
        s = report["summary"]
        self.summary_lines = [
            f"{s['total']} checks: {s['pass']} pass, {s['fail']} fail, {s['inconclusive']} inconclusive, "
            f"{s['xfail']} expected failures caught (decision: {self.decision}, seed {self.seed})",
            *self._worst_lines(report["cases"]),
            f"forward passes per perturbed batch (1.0 = no duplicated work): "
            f"{', '.join(f'{k} {v:g}' for k, v in per_batch.items())}",
            f"report: {json_path}  {html_path}",
        ]
        if self.save_baseline_path:
            self.summary_lines.append(f"baseline saved: {self.save_baseline_path}")

    @staticmethod
    def _worst_lines(cases: list[dict]) -> list[str]:
        """Per pair and metric, the case closest to (or furthest past) its tolerance."""
        worst: dict[tuple[str, str], dict] = {}
        for c in cases:
            if c["value"] is None or c["verdict"] == "xfail":
                continue
            sign = 1 if METRICS[c["metric"]].higher_is_better else -1
            margin = sign * (c["value"] - c["tolerance"])
            key = (c["pair"], c["metric"])
            if key not in worst or margin < worst[key]["margin"]:
                worst[key] = {**c, "margin": margin}
        lines = []
        for (pair, metric), c in sorted(worst.items()):
            lines.append(f"  {pair:32s} {metric:11s} worst {c['value']:.4g} at {c['perturbation']} {c['level']:g} "
                         f"(tolerance {c['tolerance']:g}, margin {c['margin']:+.4g}, {c['verdict']})")
        return lines
