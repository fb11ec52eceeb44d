"""thresholds.yaml: loaded with a safe loader, validated, frozen; every error names file, key path and reason.

Schema (every section optional except where noted)::

    decision: strict            # point | strict | lenient
    seed: 0
    batch_size: 64
    max_samples: null           # a quick profile caps every dataset (seeded subsample)
    replicates: 1000            # bootstrap replicates
    defaults: {top1_delta: 0.01, ...}                 # tolerance per metric, everywhere
    baseline: {top1_delta: 0.005, ...}                # allowed regression against a saved baseline
    perturbations:                                    # the sweep
      awgn:
        levels: [0, 0.1, 0.2]
        tolerances: {top1_delta: 0.02}                # this perturbation, every level
        at: {0.2: {top1_delta: 0.03}}                 # one level
    gate:                                             # the pairs gated, with overrides
      lenet5-digits-int8-x86: {}
      my-pair:
        tolerances: {...}
        perturbations: {awgn: {tolerances: {...}, at: {...}}}   # only: restrict to these perturbations
        metrics: [agreement, kl_mean]                           # only: check just these metrics
        xfail: "why this configuration is known to fail"        # strict expected failure
    cam: {method: auto}          # auto: eigencam for real int8 twins, gradcampp for fake-quant ones
    bitwidth: {pairs: [...], min_bits: 4}            # seed 003's sweep
    latency: {pairs: [...], batch: 32, rounds: 20}
    explanations: {pairs: [...], samples: 64, steps: 100, tolerances: {deletion_auc_delta: 0.01}}
    pairs: {...}        # user-declared pairs (see qrobust.pairs)
    datasets: {...}     # user-declared datasets

Precedence, later wins: defaults, the perturbation's tolerances, its level (``at``), the pair's
tolerances, the pair's perturbation tolerances, the pair's level.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import yaml

from qrobust.errors import ConfigError, InvalidArgument
from qrobust.stats import MODES


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    description: str


METRICS = {m.name: m for m in (
    Metric("top1_delta", False, "top-1 accuracy, FP32 minus quantized"),
    Metric("top5_delta", False, "top-5 accuracy, FP32 minus quantized"),
    Metric("f1_delta", False, "F1 (macro by default), FP32 minus quantized"),
    Metric("agreement", True, "fraction of samples with the same top-1 class"),
    Metric("kl_mean", False, "mean KL(P_fp32 || P_quant), nats"),
    Metric("kl_p95", False, "95th percentile of per-sample KL, nats"),
    Metric("cam_rmse", False, "RMSE between FP32 and quantized CAMs on [0, 1]"),
    Metric("cam_sim", True, "histogram intersection of the sum-normalized CAMs"),
    Metric("cam_cc", True, "Pearson correlation of the CAMs"),
    Metric("cam_kld", False, "saliency KLD of the quantized CAM from the FP32 CAM"),
    Metric("cam_sim_gt_delta", False, "SIM with the ground-truth saliency map, FP32 CAM minus quantized CAM"),
    Metric("cam_cc_gt_delta", False, "CC with the ground-truth saliency map, FP32 CAM minus quantized CAM"),
    Metric("cam_kld_gt_delta", False, "KLD from the ground-truth saliency map, quantized CAM minus FP32 CAM"),
    Metric("deletion_auc_delta", False, "quantized minus FP32 deletion AUC, each with its own CAM"),
    Metric("insertion_auc_delta", False, "FP32 minus quantized insertion AUC, each with its own CAM"),
    Metric("wsol_iou_delta", False, "FP32 minus quantized WSOL box IoU (datasets with boxes)"),
    Metric("activation_dice", True, "Dice of the target layer's channel-mean activation histograms"),
    Metric("speedup", True, "FP32 latency / quantized latency, measured interleaved"),
    Metric("cam_speedup", True, "FP32 / quantized time of inference plus EigenCAM, measured interleaved"),
)}
EXPLANATION_METRICS = ("deletion_auc_delta", "insertion_auc_delta", "wsol_iou_delta", "activation_dice")
CAM_METRIC_NAMES = ("cam_rmse", "cam_sim", "cam_cc", "cam_kld", "cam_sim_gt_delta", "cam_cc_gt_delta",
                    "cam_kld_gt_delta")
CASE_METRICS = tuple(m for m in METRICS if m != "speedup")

TOP_KEYS = {"decision", "seed", "batch_size", "max_samples", "replicates", "f1_average", "defaults", "baseline",
            "perturbations", "gate", "bitwidth", "latency", "cam", "explanations", "pairs", "datasets"}
CAM_METHODS = ("auto", "gradcam", "gradcampp", "eigencam")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader (no object construction), refusing duplicate keys instead of keeping the last."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` semantics plus a duplicate-key check."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


@dataclass(frozen=True)
class CaseSpec:
    """One gated case: a pair on a perturbation level with its resolved tolerances."""

    pair: str
    perturbation: str
    level: float
    tolerances: Mapping[str, float]
    xfail: str | None = None

    @property
    def id(self) -> str:
        return f"{self.pair}-{self.perturbation}-{self.level:g}"


@dataclass(frozen=True)
class Thresholds:
    path: str
    sha256: str
    decision: str = "strict"
    seed: int = 0
    batch_size: int = 64
    max_samples: int | None = None
    replicates: int = 1000
    f1_average: str = "macro"
    cam_method: str = "auto"
    cases: tuple[CaseSpec, ...] = ()
    baseline_margins: Mapping[str, float] = field(default_factory=dict)
    bitwidth: Mapping[str, Any] = field(default_factory=dict)
    explanations: Mapping[str, Any] = field(default_factory=dict)
    latency: Mapping[str, Any] = field(default_factory=dict)
    pairs: Mapping[str, Any] = field(default_factory=dict)
    datasets: Mapping[str, Any] = field(default_factory=dict)

    @property
    def gated_pairs(self) -> list[str]:
        return list(dict.fromkeys(c.pair for c in self.cases))


class _Validator:
    """Walks the parsed YAML; every complaint carries the key path."""

    def __init__(self, path: str, known_pairs: set[str]):
        self.path, self.known_pairs = path, known_pairs

    def fail(self, key: str, reason: str):
        raise ConfigError(f"{self.path}: {key}: {reason}")

    def mapping(self, value, key: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, f"expected a mapping, got {type(value).__name__} {value!r}")
        return value

    def keys(self, value: dict, key: str, allowed: set[str]) -> None:
        for k in value:
            if k not in allowed:
                import difflib
                hint = difflib.get_close_matches(str(k), sorted(allowed), n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else f" (allowed: {', '.join(sorted(allowed))})"
                self.fail(f"{key}.{k}" if key else str(k), f"unknown key{extra}")

    def number(self, value, key: str, minimum: float | None = 0.0, integer: bool = False) -> float:
        if isinstance(value, str):
            self.fail(key, f"expected a number, got the string {value!r} (remove the quotes)")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            self.fail(key, f"must be finite, got {value!r}")
        if integer and value != int(value):
            self.fail(key, f"expected a whole number, got {value!r}")
        if minimum is not None and value < minimum:
            self.fail(key, f"must be >= {minimum:g}, got {value!r}")
        return int(value) if integer else float(value)

    def tolerances(self, value, key: str) -> dict[str, float]:
        value = self.mapping(value, key)
        self.keys(value, key, set(METRICS))
        return {m: self.number(v, f"{key}.{m}") for m, v in value.items()}

    def levels(self, value, key: str, perturbation) -> list[float]:
        if not isinstance(value, list) or not value:
            self.fail(key, f"expected a non-empty list of levels, got {value!r}")
        out = []
        for i, lv in enumerate(value):
            number = self.number(lv, f"{key}[{i}]")
            try:
                out.append(perturbation.check_level(number))
            except InvalidArgument as exc:
                self.fail(f"{key}[{i}]", str(exc))
        if len(set(out)) != len(out):
            self.fail(key, f"duplicate levels in {value!r}")
        return out

    def at(self, value, key: str, levels: list[float]) -> dict[float, dict[str, float]]:
        value = self.mapping(value, key)
        out = {}
        for lv, tol in value.items():
            level = self.number(lv, f"{key}.{lv}")
            if level not in levels:
                self.fail(f"{key}.{lv}", f"level {lv!r} is not in the perturbation's levels {levels}")
            out[level] = self.tolerances(tol, f"{key}.{lv}")
        return out

    def perturbation_name(self, name, key: str):
        from qrobust.perturbations import PERTURBATIONS
        try:
            return PERTURBATIONS.get(name)
        except InvalidArgument as exc:
            self.fail(key, str(exc).split(": ", 1)[1])

    def section(self, raw: dict, name: str, allowed: set[str], whole=(), numbers=()) -> dict:
        """A side section (bitwidth, explanations, latency): known keys, known pairs, sane numbers."""
        value = self.mapping(raw.get(name), name)
        self.keys(value, name, allowed)
        for i, pair in enumerate(value.get("pairs") or []):
            self.pair_name(pair, f"{name}.pairs[{i}]")
        for k in whole:
            if k in value:
                self.number(value[k], f"{name}.{k}", minimum=1, integer=True)
        for k in numbers:
            if k in value:
                self.number(value[k], f"{name}.{k}")
        if "tolerances" in value:
            self.tolerances(value["tolerances"], f"{name}.tolerances")
        return value

    def pair_name(self, name, key: str) -> str:
        if name not in self.known_pairs:
            import difflib
            hint = difflib.get_close_matches(str(name), sorted(self.known_pairs), n=1)
            self.fail(key, f"unknown pair {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        return name


def load_thresholds(path: str | Path, known_pairs: set[str] | None = None) -> Thresholds:
    """Parse and validate ``path``; raises ConfigError with ``file: key.path: reason``."""
    path = Path(path)
    try:
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read thresholds file ({exc.strerror})") from None
    try:
        raw = safe_load_unique(raw_bytes.decode("utf-8"))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid YAML: {reason}") from None
    if known_pairs is None:
        from qrobust.pairs import pair_names
        known_pairs = set(pair_names())
    v = _Validator(str(path), set(known_pairs))
    raw = v.mapping(raw, "(top level)")
    declared = raw.get("pairs")
    v.known_pairs |= set(declared) if isinstance(declared, dict) else set()  # pairs declared in this file
    v.keys(raw, "", TOP_KEYS)
    decision = raw.get("decision", "strict")
    if decision not in MODES:
        v.fail("decision", f"must be one of {', '.join(MODES)}, got {decision!r}")
    f1_average = raw.get("f1_average", "macro")
    if f1_average not in ("macro", "micro", "weighted"):
        v.fail("f1_average", f"must be macro, micro or weighted, got {f1_average!r}")
    max_samples = raw.get("max_samples")
    defaults = v.tolerances(raw.get("defaults"), "defaults")
    sweep = {}
    for name, spec in v.mapping(raw.get("perturbations"), "perturbations").items():
        key = f"perturbations.{name}"
        pert = v.perturbation_name(name, key)
        spec = v.mapping(spec, key)
        v.keys(spec, key, {"levels", "tolerances", "at"})
        levels = v.levels(spec.get("levels", list(pert.levels)), f"{key}.levels", pert)
        sweep[name] = (levels, v.tolerances(spec.get("tolerances"), f"{key}.tolerances"),
                       v.at(spec.get("at"), f"{key}.at", levels))
    cases = []
    for pair, spec in v.mapping(raw.get("gate"), "gate").items():
        key = f"gate.{pair}"
        v.pair_name(pair, key)
        spec = v.mapping(spec, key)
        v.keys(spec, key, {"tolerances", "perturbations", "metrics", "xfail"})
        metrics = spec.get("metrics")
        if metrics is not None:
            if not isinstance(metrics, list) or not metrics:
                v.fail(f"{key}.metrics", f"expected a non-empty list of metric names, got {metrics!r}")
            for i, metric in enumerate(metrics):
                if metric not in CASE_METRICS:
                    v.fail(f"{key}.metrics[{i}]", f"unknown metric {metric!r} (known: {', '.join(CASE_METRICS)})")
        xfail = spec.get("xfail")
        if xfail is not None and (not isinstance(xfail, str) or not xfail.strip()):
            v.fail(f"{key}.xfail", f"expected the reason as a non-empty string, got {xfail!r}")
        pair_tol = v.tolerances(spec.get("tolerances"), f"{key}.tolerances")
        only = v.mapping(spec.get("perturbations"), f"{key}.perturbations")
        for name in only:
            if name not in sweep:
                v.fail(f"{key}.perturbations.{name}", f"not in the top-level perturbations sweep ({', '.join(sweep)})")
        for name, (levels, pert_tol, pert_at) in sweep.items():
            if only and name not in only:
                continue
            pkey = f"{key}.perturbations.{name}"
            pspec = v.mapping(only.get(name), pkey)
            v.keys(pspec, pkey, {"tolerances", "at"})
            pp_tol = v.tolerances(pspec.get("tolerances"), f"{pkey}.tolerances")
            pp_at = v.at(pspec.get("at"), f"{pkey}.at", levels)
            for level in levels:
                tol = {**defaults, **pert_tol, **pert_at.get(level, {}), **pair_tol, **pp_tol, **pp_at.get(level, {})}
                tol.pop("speedup", None)
                tol.pop("cam_speedup", None)
                if metrics is not None:
                    tol = {m: t for m, t in tol.items() if m in metrics}
                cases.append(CaseSpec(pair, name, level, MappingProxyType(tol), xfail))
    cam = v.mapping(raw.get("cam"), "cam")
    v.keys(cam, "cam", {"method"})
    if cam.get("method", "auto") not in CAM_METHODS:
        v.fail("cam.method", f"must be one of {', '.join(CAM_METHODS)}, got {cam.get('method')!r}")
    bitwidth = v.section(raw, "bitwidth", {"pairs", "min_bits", "perturbation", "level", "tolerances"},
                         whole=("min_bits",))
    explanations = v.section(raw, "explanations", {"pairs", "samples", "steps", "tolerances"},
                             whole=("samples", "steps"))
    latency = v.section(raw, "latency", {"pairs", "batch", "rounds", "speedup", "cam_speedup"},
                        whole=("batch", "rounds"), numbers=("speedup", "cam_speedup"))
    base = path.parent
    datasets = v.mapping(raw.get("datasets"), "datasets")
    for name, spec in datasets.items():
        _validate_dataset(v, name, v.mapping(spec, f"datasets.{name}"), base)
    declared_pairs = v.mapping(raw.get("pairs"), "pairs")
    for name, spec in declared_pairs.items():
        _validate_pair(v, name, v.mapping(spec, f"pairs.{name}"), base, set(datasets))
    return Thresholds(
        path=str(path), sha256=hashlib.sha256(raw_bytes).hexdigest(), decision=decision,
        seed=v.number(raw.get("seed", 0), "seed", integer=True),
        batch_size=v.number(raw.get("batch_size", 64), "batch_size", minimum=1, integer=True),
        max_samples=None if max_samples is None else v.number(max_samples, "max_samples", minimum=1, integer=True),
        replicates=v.number(raw.get("replicates", 1000), "replicates", minimum=10, integer=True),
        f1_average=f1_average, cam_method=cam.get("method", "auto"), cases=tuple(cases),
        baseline_margins=MappingProxyType(v.tolerances(raw.get("baseline"), "baseline")),
        bitwidth=MappingProxyType(bitwidth), latency=MappingProxyType(latency),
        explanations=MappingProxyType(explanations),
        pairs=MappingProxyType(declared_pairs), datasets=MappingProxyType(datasets),
    )


PAIR_KEYS = {"arch", "builder", "weights", "trust", "num_classes", "preset", "preprocess", "dataset", "calibration",
             "target_layer", "quantized_target_layer"}
DATASET_KEYS = {"folder", "builder", "resolution", "boxes", "saliency", "num_classes", "max_samples", "workers"}


def _one_of(v: _Validator, spec: dict, key: str, options: tuple[str, str]) -> str:
    present = [o for o in options if o in spec]
    if len(present) != 1:
        v.fail(key, f"needs exactly one of {' or '.join(options)}, got {present or 'neither'}")
    value = spec[present[0]]
    if not isinstance(value, str) or not value:
        v.fail(f"{key}.{present[0]}", f"expected a string, got {value!r}")
    if present[0] == "builder" and value.count(":") != 1:
        v.fail(f"{key}.builder", f"expected 'module:function', got {value!r}")
    return present[0]


def _resolution(v: _Validator, value, key: str) -> None:
    if not isinstance(value, list) or len(value) != 2:
        v.fail(key, f"expected [height, width], got {value!r}")
    for i, side in enumerate(value):
        v.number(side, f"{key}[{i}]", minimum=1, integer=True)


def _existing(v: _Validator, base: Path, value, key: str, directory: bool = False) -> None:
    if not isinstance(value, str):
        v.fail(key, f"expected a path, got {value!r}")
    target = base / value
    if not (target.is_dir() if directory else target.is_file()):
        v.fail(key, f"{target} does not exist" + (" or is not a folder" if directory else ""))


def _validate_dataset(v: _Validator, name: str, spec: dict, base: Path) -> None:
    key = f"datasets.{name}"
    v.keys(spec, key, DATASET_KEYS)
    if _one_of(v, spec, key, ("folder", "builder")) == "folder":
        _existing(v, base, spec["folder"], f"{key}.folder", directory=True)
        if "resolution" not in spec:
            v.fail(f"{key}.resolution", "an image folder needs the model resolution [height, width]")
        _resolution(v, spec["resolution"], f"{key}.resolution")
        if "boxes" in spec:
            _existing(v, base, spec["boxes"], f"{key}.boxes")
        if "saliency" in spec:
            _existing(v, base, spec["saliency"], f"{key}.saliency", directory=True)
        if "workers" in spec:
            v.number(spec["workers"], f"{key}.workers", minimum=0, integer=True)
    elif "num_classes" not in spec:
        v.fail(f"{key}.num_classes", "a builder dataset needs its class count")
    for whole in ("num_classes", "max_samples"):
        if whole in spec:
            v.number(spec[whole], f"{key}.{whole}", minimum=1, integer=True)


def _validate_pair(v: _Validator, name: str, spec: dict, base: Path, datasets: set[str]) -> None:
    from qrobust.data import DATASETS
    from qrobust.quantize import PRESETS

    key = f"pairs.{name}"
    v.keys(spec, key, PAIR_KEYS)
    source = _one_of(v, spec, key, ("arch", "builder"))
    if source == "arch":
        from qrobust.zoo import TORCHVISION_ARCHS
        if spec["arch"] not in TORCHVISION_ARCHS:
            v.fail(f"{key}.arch", f"unknown architecture {spec['arch']!r} (known: {', '.join(TORCHVISION_ARCHS)})")
        if "weights" not in spec:
            v.fail(f"{key}.weights", "needs a checkpoint path, 'hub' (torch hub cache, never downloaded) or 'random' "
                                     "(explicit opt-in, for latency and pipeline checks only)")
    weights = spec.get("weights")
    if weights is not None and weights not in ("hub", "random"):
        _existing(v, base, weights, f"{key}.weights")
    if "trust" in spec and not isinstance(spec["trust"], bool):
        v.fail(f"{key}.trust", f"expected true or false, got {spec['trust']!r}")
    for required in ("num_classes", "preprocess", "dataset"):
        if required not in spec:
            v.fail(f"{key}.{required}", "is required")
    v.number(spec["num_classes"], f"{key}.num_classes", minimum=1, integer=True)
    pre = v.mapping(spec["preprocess"], f"{key}.preprocess")
    v.keys(pre, f"{key}.preprocess", {"resolution", "mean", "std"})
    _resolution(v, pre.get("resolution"), f"{key}.preprocess.resolution")
    for part in ("mean", "std"):
        values = pre.get(part)
        if not isinstance(values, list) or not values:
            v.fail(f"{key}.preprocess.{part}", f"expected a list with one number per channel, got {values!r}")
        for i, x in enumerate(values):
            v.number(x, f"{key}.preprocess.{part}[{i}]", minimum=None if part == "mean" else 1e-12)
    if len(pre["mean"]) != len(pre["std"]):
        v.fail(f"{key}.preprocess", "mean and std need one entry per channel each")
    for ref_key in ("dataset",) + (("calibration",) if "calibration" in spec else ()):
        ref = spec[ref_key] if ref_key == "dataset" else v.mapping(spec["calibration"], f"{key}.calibration").get("dataset")
        if ref not in datasets and ref not in DATASETS:
            v.fail(f"{key}.{ref_key}", f"unknown dataset {ref!r} (declared: {', '.join(sorted(datasets)) or 'none'})")
    if "preset" in spec:
        if spec["preset"] not in PRESETS:
            v.fail(f"{key}.preset", f"unknown preset {spec['preset']!r} (known: {', '.join(PRESETS)})")
        if "calibration" not in spec:
            v.fail(f"{key}.calibration", "post-training quantization needs calibration data: "
                                         "{dataset: NAME, samples: N}, never the gated test split")
        cal = v.mapping(spec["calibration"], f"{key}.calibration")
        v.keys(cal, f"{key}.calibration", {"dataset", "samples"})
        if "samples" in cal:
            v.number(cal["samples"], f"{key}.calibration.samples", minimum=1, integer=True)
    elif source == "arch":
        v.fail(f"{key}.preset", "an arch pair needs a quantization preset")
