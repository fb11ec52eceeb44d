"""Run-wide state behind the pytest plugin: the plan, pairs built once (and failures remembered), the
evaluator, baselines and the report. No pytest here: the plugin and the fixture translate."""
from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

from qrobust.errors import ConfigError, QrobustError, one_line, show
from qrobust.gate.baseline import (
    baseline_document, case_key, environment_mismatch, fingerprint, load_baseline,
)
from qrobust.gate.config import Thresholds, load_thresholds
from qrobust.gate.plan import GatePlan, make_plan
from qrobust._files import append_text
from qrobust.gate.report import build_report, environment, render_markdown, worst_cases, write_report
from qrobust.metrics.catalog import CAM_METRICS


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
    x86_kernels: str | None = None  # run x86-engine int8 convs on this library (another CPU's path); None: this CPU's


GATE_TEST = "qrobust::gate"  # the record of a failure of the run itself (qrobust.plugin reports it as a test)


@dataclass
class Outcome:
    """A finished run: the terminal's summary lines, the failures of the run itself (each an error record
    and a failed test), and the report written (None when it could not be)."""

    lines: list[str]
    failures: list[str]
    report: dict | None = None
    paths: tuple[Path, Path] | None = None


class PairUnavailable(QrobustError):
    """A pair could not be built or failed its probe; every check of it fails with this one line."""


class QrobustSession:
    def __init__(self, options: Options, *, worker: bool = False):
        self.options = options
        self.started = time.monotonic()  # the report's duration
        self.thresholds: Thresholds = load_thresholds(options.thresholds)
        t = self.thresholds
        self.seed = t.seed if options.seed is None else options.seed
        self.decision = options.decision or t.decision
        self.max_samples = options.max_samples or t.max_samples
        self.device = options.device
        self.plan: GatePlan = make_plan(t, self._bits_of, list(options.pairs) if options.pairs else None,
                                        facts=self.facts_of)
        self.family_sizes = self.plan.family_sizes(t)  # checks per pair, for the familywise decision
        if options.save_baseline and Path(options.save_baseline).exists() and not options.overwrite_baseline \
                and not worker:
            raise ConfigError(f"{options.save_baseline}: baseline exists; pass --qrobust-overwrite-baseline to "
                              "replace it")
        self.baseline = load_baseline(options.baseline) if options.baseline else None
        self._pairs: dict = {}  # built and probed
        self._built: dict = {}  # built (probed or not)
        self.broken: dict[str, str] = {}  # pair -> the one-line reason it cannot be gated
        self.pair_loads: Counter[str] = Counter()
        self._evaluator = None
        self._datasets = None
        self._fp32_cache: dict = {}  # declared pairs on the same weights share one FP32 model
        self._diagnoses: dict = {}  # (pair, perturbation, level) -> per-layer diagnosis of a failing case
        self._sensitivity: dict = {}  # (pair, perturbation, level, metric) -> the sensitivity pass's result
        self._fingerprint_cache: tuple[tuple, dict] = ((None,), {})
        self.progress: Callable[[str, int, int], None] | None = None  # batch progress (the plugin sets it)
        self.announce: Callable[[str], None] | None = None  # a line per long phase (the plugin sets it)

    def facts_of(self, name: str):
        """What pair ``name`` can compute, before it is built: a registered pair's declared facts, a
        declared pair's from its YAML (its target layer or its architecture's, its dataset's maps)."""
        import dataclasses

        from qrobust.explain.cam import method
        from qrobust.models import PairFacts, pair_entry
        from qrobust.models.archs import TORCHVISION_ARCHS

        t = self.thresholds
        layer_free = t.cam_method != "auto" and not method(t.cam_method).uses_layer
        spec = t.pairs.get(name)
        if spec is None:
            facts = pair_entry(name).facts
            return dataclasses.replace(facts, cam=True) if layer_free else facts
        layer = spec.get("target_layer") or TORCHVISION_ARCHS.get(spec.get("arch", ""))
        dataset = spec["dataset"]
        return PairFacts(cam=layer_free or layer is not None, saliency=self._dataset_has(dataset, "saliency"),
                         boxes=self._dataset_has(dataset, "boxes"), classes=spec["num_classes"], dataset=dataset)

    def _dataset_has(self, dataset: str, what: str) -> bool | None:
        """Whether a dataset carries ``saliency`` maps or ``boxes``: a declared one's key of that name, a
        built-in's tag; None for other registered datasets (known once loaded)."""
        from qrobust.data import DATASETS

        if dataset in self.thresholds.datasets:
            return what in self.thresholds.datasets[dataset]
        if dataset in DATASETS.names("builtin"):
            return dataset in DATASETS.names(what)
        return None

    def _bits_of(self, name: str) -> int | None:
        from qrobust.models import pair_entry
        from qrobust.quant import PRESETS

        preset = self.thresholds.pairs[name].get("preset") if name in self.thresholds.pairs else pair_entry(name).preset
        return None if preset is None else PRESETS.get(preset).weight.bits

    # ---- models and data -----------------------------------------------------------------------------
    def pair(self, name: str):
        """A pair, built at most once per process; a pair that cannot be built raises PairUnavailable
        with the same one line every time (its checks fail; other pairs run)."""
        if name in self.broken:
            raise PairUnavailable(self.broken[name])
        if name not in self._pairs:
            if self.announce is not None:
                self.announce(f"building pair {name}")
            try:
                pair = self.built(name)
                self.evaluator.add(pair)  # probes it: a pair that fails raises and is not added
                self._pairs[name] = pair
            except Exception as exc:  # noqa: BLE001 - any failure of user code is one line, once per pair
                self.broken[name] = f"pair {name} cannot be gated: {one_line(exc)}"
                raise PairUnavailable(self.broken[name]) from None
        return self._pairs[name]

    def built(self, name: str):
        """The pair as built, before (or whatever) its probe says: the quantizer-property checks read a
        twin's parameters even when they are broken enough to fail the probe."""
        if name not in self._built:
            self._built[name] = self._build(name)
            self.pair_loads[name] += 1
        return self._built[name]

    def _build(self, name: str):
        from qrobust.models import load_pair
        from qrobust.models.declared import build_pair

        declared = self.thresholds.pairs.get(name)
        if declared:
            pair = build_pair(name, declared, Path(self.thresholds.path).parent, self.datasets, self._fp32_cache)
        else:
            pair = load_pair(name)
        return pair if self.options.x86_kernels is None else with_x86_kernels(pair, self.options.x86_kernels)

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
        """The session's Evaluator; pairs join it as they are first used."""
        if self._evaluator is None:
            from qrobust.gate.engine import Evaluator

            plan, t = self.plan, self.thresholds
            cases = plan.cases + plan.bitwidth_cases
            cam_cases = {(c.pair, c.perturbation, c.level) for c in cases if set(c.tolerances) & set(CAM_METRICS)}
            methods = {} if t.cam_method == "auto" else {name: t.cam_method for name in plan.pairs}
            self._evaluator = Evaluator(seed=self.seed, batch_size=t.batch_size, max_samples=self.max_samples,
                                        replicates=t.replicates, f1_average=t.f1_average, device=self.device,
                                        wanted={(c.pair, c.perturbation, c.level) for c in cases},
                                        datasets=self.datasets, cam_cases=cam_cases, cam_methods=methods,
                                        loader=self._load_with_group)
            self._evaluator.progress = self.progress
        return self._evaluator

    def group_of(self, name: str):
        """Which FP32 model a pair shares with others (None: its own): a registered pair's ``group``, a
        declared pair's architecture/builder and weights."""
        from qrobust.models import pair_entry
        from qrobust.models.declared import fp32_key

        spec = self.thresholds.pairs.get(name)
        if spec is not None:
            return ("declared", *fp32_key(spec, Path(self.thresholds.path).parent))
        group = pair_entry(name).group
        return None if group is None else ("registered", group)

    def _load_with_group(self, name: str) -> None:
        """Build ``name`` and the planned pairs of its group, so one FP32 forward serves all of them."""
        group = self.group_of(name)
        mates = [p for p in self.plan.pairs if group is not None and self.group_of(p) == group] or [name]
        for mate in mates:
            if mate != name:
                try:
                    self.pair(mate)
                except PairUnavailable:
                    pass  # a broken mate fails its own checks
        self.pair(name)

    def evaluate(self, case):
        """The cached result of ``case`` (raises PairUnavailable for a pair that cannot be gated)."""
        self._load_with_group(case.pair)
        ev = self.evaluator
        try:
            return ev.evaluate(case.pair, case.perturbation, case.level)
        except PairUnavailable:
            raise
        except QrobustError as exc:
            self.broken.setdefault(case.pair, f"pair {case.pair} cannot be gated: {one_line(exc)}")
            raise PairUnavailable(self.broken[case.pair]) from None

    # ---- diagnosis of failing cases -------------------------------------------------------------------
    def diagnose(self, case, *, candidates: int = 64, keep: int = 16) -> dict:
        """Per-layer error of the twin on a failing case's most different samples (the largest KL among
        its first ``candidates``); computed once per case. ``{"line": ..., "layers": [...], "samples": [...]}``."""
        key = (case.pair, case.perturbation, case.level)
        if key not in self._diagnoses:
            import torch

            from qrobust.metrics.classification import kl_per_sample
            from qrobust.placement import feed, stage
            from qrobust.quant.diagnosis import describe, layer_errors

            ev, pair = self.evaluator, self.pair(case.pair)
            x, ids = ev.case_inputs(case.pair, case.perturbation, case.level, candidates)
            with stage("diagnose", case.pair):
                with torch.inference_mode():
                    kl = kl_per_sample(feed(pair.fp32, x, role="fp32").cpu(), feed(pair.quantized, x, role="twin").cpu())
                ev.forward_passes["diagnosis"] += 2
                worst = kl.argsort(descending=True)[:keep]
                rows = layer_errors(pair.fp32, pair.quantized, x[worst])
            ev.forward_passes["diagnosis"] += 2
            self._diagnoses[key] = {"line": describe(rows), "layers": [r.as_dict() for r in rows],
                                    "samples": ids[worst].tolist()}
        return self._diagnoses[key]

    def sensitivity(self, case, metric: str, tolerance: float, value: float) -> dict:
        """The sensitivity pass (qrobust.gate.sensitivity) for a failing metric of a case; once per case."""
        key = (case.pair, case.perturbation, case.level, metric)
        if key not in self._sensitivity:
            from qrobust.gate.engine import Evaluator
            from qrobust.gate.sensitivity import suggest_keep_fp32, with_twin

            ev, pair = self.evaluator, self.pair(case.pair)

            def evaluate(twin) -> float:
                trial = Evaluator([with_twin(pair, twin)], seed=ev.seed, batch_size=ev.batch_size,
                                  max_samples=ev.max_samples, replicates=ev.replicates, f1_average=ev.f1_average,
                                  datasets=ev._datasets, device=str(ev.device))
                cam = metric in ("cam_rmse", "cam_sim", "cam_cc", "cam_kld")
                return trial.evaluate(pair.name, case.perturbation, case.level, cam=cam).metric(metric).value

            layers = self.diagnose(case)["layers"]
            self._sensitivity[key] = suggest_keep_fp32(pair, evaluate, metric, tolerance, value, layers,
                                                       top=self.options.sensitivity, progress=self.announce)
        return self._sensitivity[key]

    # ---- baselines -------------------------------------------------------------------------------------
    def baseline_value(self, pair: str, perturbation: str, level: float, metric: str) -> float | None:
        """The saved value to compare with, or None (no baseline, or no entry for this case)."""
        if self.baseline is None:
            return None
        return self.baseline["values"].get(case_key({"pair": pair, "perturbation": perturbation, "level": level,
                                                     "metric": metric}))

    def baseline_mismatch(self) -> str | None:
        """Why the baseline cannot be compared (another environment), or None."""
        if self.baseline is None or self.options.baseline_any_env:
            return None
        diff = environment_mismatch(self._fingerprint(), self.baseline)
        if not diff:
            return None
        return (f"baseline {self.options.baseline} was recorded in another environment "
                f"({show(diff, 300)}); pass --qrobust-baseline-any-env to compare anyway")

    def _fingerprint(self) -> dict:
        loaded = tuple(self._pairs)
        if self._fingerprint_cache[0] != loaded:
            self._fingerprint_cache = (loaded, fingerprint(self.environment(self._weights(), {})))
        return self._fingerprint_cache[1]

    # ---- provenance and report -----------------------------------------------------------------------
    def environment(self, weights: dict[str, str], pairs: dict[str, dict]) -> dict:
        return environment(seed=self.seed, decision=self.decision, thresholds_sha256=self.thresholds.sha256,
                           weights=weights, pairs=pairs)

    def _weights(self) -> dict[str, str]:
        """Tensor fingerprints of every loaded FP32 model's weights, by pair."""
        out = {}
        for pair in self._pairs.values():
            fp = pair.metadata.get("weights_fingerprint")
            if pair.metadata.get("random_weights"):
                fp = "RANDOM WEIGHTS: for latency and pipeline checks only, not a robustness verdict"
            if fp:
                out[pair.name] = fp
        return out

    def _provenance(self) -> dict[str, dict]:
        from qrobust.quant.convert import int8_kernels, is_int8
        from qrobust.runtimes import runtime_name

        ev = self._evaluator
        out = {}
        for name, pair in self._pairs.items():
            out[name] = {**{k: v for k, v in pair.metadata.items() if k != "weights_fingerprint"},
                         "kind": pair.kind, "dataset": pair.dataset, "num_classes": pair.num_classes,
                         "runtimes": {"fp32": runtime_name(pair.fp32), "quantized": runtime_name(pair.quantized)},
                         **({"kernels": int8_kernels(pair.quantized)} if is_int8(pair.quantized) else {}),
                         "cam": {"method": ev.cam_methods.get(name) if ev else None, "fp32_layer": pair.target_layer,
                                 "quantized_layer": pair.quantized_target_layer},
                         "samples": len(ev.dataset(pair.dataset)) if ev else None}
        return out

    def worker_output(self) -> dict:
        ev = self._evaluator
        return {"weights": self._weights(), "pairs": self._provenance(), "pair_loads": dict(self.pair_loads),
                "broken": self.broken, "overlays": self._overlays(),
                "forward_passes": dict(ev.forward_passes) if ev else {},
                "perturbed_batches": dict(ev.perturbed_batches) if ev else {},
                "groups": ev.groups() if ev else {}}

    def _overlays(self) -> list[dict]:
        """Per CAM case of this process, its most different image (by CAM RMSE): the report places them
        with the failing case they explain, so every case sends one (verdicts meet only in the controller)."""
        ev = self._evaluator
        return [o for r in (ev.cached_results() if ev else []) if (o := self.overlay(r)) is not None]

    def case_overlays(self, pair: str, perturbation: str, level: float) -> list[dict]:
        """The overlay of one evaluated case (none when it computed no CAMs), for pytest-html's extras."""
        ev = self._evaluator
        found = [self.overlay(r) for r in (ev.cached_results() if ev else [])
                 if (r.pair, r.perturbation, r.level) == (pair, perturbation, level)]
        return [o for o in found if o is not None]

    def overlay(self, r) -> dict | None:
        """A case's most different image as thumbnails (input, FP32 CAM, quantized CAM) with both models'
        top-1 class on it."""
        import torch

        from qrobust.gate.html_report import thumbnail
        from qrobust.placement import feed, stage

        if not (r.cam and r.cam.overlays) or r.pair not in self._pairs:
            return None
        o, pair = r.cam.overlays[0], self._pairs[r.pair]
        x = pair.preprocess.normalize(o["pixels"][None])
        with torch.inference_mode(), stage("CAM", r.pair):
            top1 = [int(feed(model, x, role=role).argmax()) for model, role in ((pair.fp32, "fp32"), (pair.quantized, "twin"))]
        return {"pair": r.pair, "perturbation": r.perturbation, "level": r.level, "id": o["id"], "rmse": o["rmse"],
                "method": r.cam.method, "top1_fp32": top1[0], "top1_quant": top1[1], "image": thumbnail(o["pixels"]),
                "fp32": thumbnail(o["pixels"], o["fp32"]), "quantized": thumbnail(o["pixels"], o["quantized"])}

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

        weights, pairs, forwards, batches, groups, loads, overlays, broken = {}, {}, Counter(), Counter(), {}, [], [], {}
        for out in outputs:
            overlays += out["overlays"]
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
            if path.exists() and not self.options.overwrite_baseline:
                raise ConfigError(f"{path}: baseline exists; pass --qrobust-overwrite-baseline to replace it")
            baseline = (path, json.dumps(baseline_document(report), indent=1, sort_keys=True))
        json_path, html_path = write_report(report_dir, report, overlays, baseline)
        for path in markdown:
            append_text(Path(path), render_markdown(report, html_path))
        lines = summary_lines(report, per_batch, verbose=verbose)
        lines += [f"could not be gated: {reason}" for reason in broken.values()]
        lines.append(f"report: {json_path}  {html_path}  (run {run_id})")
        if baseline:
            lines.append(f"baseline saved: {baseline[0]}")
        return Outcome(lines, failures, report, (json_path, html_path))


def with_x86_kernels(pair, library: str):
    """``pair`` with its x86-engine int8 twin (and every requantized one) running its convolutions on
    ``library``, as another CPU would; a copy, so the process-wide built-in pair stays as this CPU runs it."""
    import copy
    import dataclasses

    from qrobust.quant.convert import is_int8, route_x86_convs

    def routed(twin):
        if not is_int8(twin) or twin.engine != "x86":
            return twin
        twin = copy.deepcopy(twin)
        route_x86_convs(twin, library)
        return twin

    requantize = pair.requantize
    copied = dataclasses.replace(pair, quantized=routed(pair.quantized),
                                 requantize=None if requantize is None else lambda keep: routed(requantize(keep)))
    copied.twin_layer_given = pair.twin_layer_given  # an init=False field: replace() resets it
    return copied


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

