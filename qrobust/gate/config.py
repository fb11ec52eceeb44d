"""thresholds.yaml: read with bounds, parsed with a safe loader, validated, frozen into typed objects.

Every error is one line naming the file, the key path and the reason (keys and values shown through
``qrobust.errors.show``, so a hostile key cannot forge log lines or flood the terminal). Defaults live
here, in the dataclasses below, and in the metric catalogue (default tolerances): nowhere else.

Schema (every section optional; a file must gate something)::

    decision: point             # point (default) | strict | lenient | familywise
    seed: 0
    batch_size: 64
    max_samples: null           # a quick profile caps every dataset (seeded subsample)
    replicates: 1000            # bootstrap replicates
    f1_average: macro           # macro | micro | weighted
    operating_point: null       # a deployment threshold tau on top-1 confidence (operating_point_flips)
    defaults: {top1_delta: 0.01, ...}                 # tolerance per metric (default: the catalogue's)
    baseline: {top1_delta: 0.005, kl_mean: {relative: 0.5}}   # allowed regression against a saved baseline
    perturbations:                                    # the sweep (default: DEFAULT_SWEEP)
      awgn:
        levels: [0, 0.1, 0.2]
        tolerances: {top1_delta: 0.02}                # this perturbation, every level
        at: {0.2: {top1_delta: 0.03}}                 # one level
    gate:                                             # the pairs gated, with overrides
      my-pair: {}
      other-pair:
        tolerances: {...}
        perturbations: {awgn: {levels: [0, 0.1], tolerances: {...}, at: {...}}}   # only these (levels: a subset)
        metrics: [agreement, kl_mean]                           # only: check just these metrics
        xfail: "why this configuration is known to fail"        # strict expected failure
        operating_point: 0.5                                    # this pair's tau (over the file's)
    cam: {method: auto}          # auto: eigencam for real int8 twins, gradcampp for fake-quant ones
    bitwidth: {pairs: [...], min_bits: 4, perturbation: awgn, level: 0, tolerances: {...}}
    latency: {pairs: [...], batch: 32, rounds: 20, speedup: 1.0, cam_speedup: 1.0}
    explanations: {pairs: [...], samples: 64, steps: 100, tolerances: {deletion_auc_delta: 0.01}}
    pairs: {...}        # user-declared pairs (qrobust.models.declared)
    datasets: {...}     # user-declared datasets (qrobust.data.folders)
"""
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import yaml

from qrobust._files import MiB, read_bounded
from qrobust._options import SEED_MAX
from qrobust._validation import is_number
from qrobust.errors import ConfigError, InvalidArgument, show
from qrobust.gate.modes import DECISIONS
from qrobust.metrics.catalog import CASE_METRICS, EXPLANATION_METRICS, LATENCY_METRICS, METRICS, default_tolerances
from qrobust.registry import did_you_mean

MAX_BYTES = 4 * MiB  # a thresholds file is a page of YAML; anything near this size is a mistake or an attack
MAX_DEPTH = 64  # nesting deeper than any valid file; deeper input is refused before it can exhaust the stack
# bounds no run can honour beyond: checked at load, so a typo is one line, not a 16 GB allocation or an overflow
MAX_REPLICATES = 100_000  # a batch's bootstrap weights take batch x replicates x 4 bytes; past this the
                          # interval's Monte-Carlo error (~1/sqrt(replicates)) is far below its sampling error
MAX_BATCH = 4096
MAX_SAMPLES = 2**31 - 1
MAX_ROUNDS = 10_000
MAX_STEPS = 10_000
# YAML 1.2 floats (1e-3, 5E-2): PyYAML reads YAML 1.1, whose floats need a dot, and left these as strings
YAML12_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$")
F1_AVERAGES = ("macro", "micro", "weighted")
# the sweep a file without a ``perturbations:`` section gets: seed 004's four families at their
# registered default levels
DEFAULT_SWEEP = ("awgn", "brownian", "occlusion_vertical", "occlusion_horizontal")
# the keys each section takes (the validator below and the JSON Schema in qrobust.gate.schema read these)
SWEEP_KEYS = ("levels", "tolerances", "at")
GATE_KEYS = ("tolerances", "perturbations", "metrics", "xfail", "operating_point")
MARGIN_KEYS = ("absolute", "relative")
BITWIDTH_KEYS = ("pairs", "min_bits", "perturbation", "level", "tolerances")
LATENCY_KEYS = ("pairs", "batch", "rounds") + LATENCY_METRICS
EXPLANATIONS_KEYS = ("pairs", "samples", "steps", "tolerances")
CAM_KEYS = ("method",)
PAIR_TOLERANCES = CASE_METRICS + ("quantized_fraction",)  # defaults and a pair's own: its cases and its coverage
TOP_KEYS = ("decision", "seed", "batch_size", "max_samples", "replicates", "f1_average", "operating_point", "defaults",
            "baseline",
            "perturbations", "gate", "bitwidth", "latency", "cam", "explanations", "pairs", "datasets")


# ---- typed, frozen configuration ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepEntry:
    """One perturbation of the sweep: its levels and the tolerances it sets (all levels / one level)."""

    levels: tuple[float, ...]
    tolerances: Mapping[str, float] = field(default_factory=dict)
    at: Mapping[float, Mapping[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class GateEntry:
    """A gated pair's overrides; ``perturbations`` None means the whole sweep."""

    tolerances: Mapping[str, float] = field(default_factory=dict)
    perturbations: Mapping[str, SweepEntry] | None = None  # only these, at these levels (a subset of the sweep's)
    metrics: tuple[str, ...] | None = None
    xfail: str | None = None
    operating_point: float | None = None


@dataclass(frozen=True)
class BitwidthConfig:
    """Seed 003's sweep: pairs at several bit widths, gated on one perturbation level."""

    pairs: tuple[str, ...] = ()
    min_bits: int = 1
    perturbation: str = "awgn"
    level: float = 0.0
    tolerances: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LatencyConfig:
    """Interleaved FP32 vs quantized timing; a metric without a tolerance is measured, not gated."""

    pairs: tuple[str, ...] = ()
    batch: int = 32
    rounds: int = 20
    tolerances: Mapping[str, float] = field(default_factory=dict)  # speedup, cam_speedup


@dataclass(frozen=True)
class ExplanationsConfig:
    """Seed 002's explanation quality on clean images."""

    pairs: tuple[str, ...] = ()
    samples: int = 64
    steps: int = 100
    tolerances: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BaselineMargin:
    """How far a value may move against a saved baseline: ``absolute``, ``relative`` to the baseline
    value, or both (then the larger allowance, so a relative margin keeps a floor near zero)."""

    absolute: float | None = None
    relative: float | None = None

    def allowed(self, old: float) -> float:
        parts = [self.absolute or 0.0, (self.relative or 0.0) * abs(old)]
        return max(parts)

    def describe(self) -> str:
        parts = ([f"{self.absolute:g}"] if self.absolute is not None else []) + (
            [f"{self.relative:.0%} of the baseline"] if self.relative is not None else [])
        return " or ".join(parts)


@dataclass(frozen=True)
class Thresholds:
    path: str
    sha256: str
    decision: str = "point"
    seed: int = 0
    batch_size: int = 64
    max_samples: int | None = None
    replicates: int = 1000
    f1_average: str = "macro"
    cam_method: str = "auto"
    operating_point: float | None = None  # every gated pair's tau, unless its gate entry sets its own
    defaults: Mapping[str, float] = field(default_factory=default_tolerances)
    sweep: Mapping[str, SweepEntry] = field(default_factory=dict)
    gate: Mapping[str, GateEntry] = field(default_factory=dict)
    baseline: Mapping[str, BaselineMargin] = field(default_factory=dict)
    bitwidth: BitwidthConfig = BitwidthConfig()
    latency: LatencyConfig = LatencyConfig()
    explanations: ExplanationsConfig = ExplanationsConfig()
    pairs: Mapping[str, Any] = field(default_factory=dict)  # declared pairs, validated specs
    datasets: Mapping[str, Any] = field(default_factory=dict)  # declared datasets, validated specs

    def baseline_margin(self, metric: str) -> BaselineMargin:
        return self.baseline.get(metric) or BaselineMargin(absolute=METRICS[metric].baseline_margin)

    @property
    def operating_points(self) -> dict[str, float]:
        """Each gated pair's deployment threshold tau, where one is set."""
        found = {p: e.operating_point if e.operating_point is not None else self.operating_point
                 for p, e in self.gate.items()}
        return {p: tau for p, tau in found.items() if tau is not None}

    @property
    def mentioned_pairs(self) -> list[str]:
        """Every pair the file gates in any section, in order."""
        names = list(self.gate) + list(self.bitwidth.pairs) + list(self.latency.pairs) + list(self.explanations.pairs)
        return list(dict.fromkeys(names))


# ---- YAML -----------------------------------------------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """yaml's SafeLoader (no object construction), refusing duplicate and non-string keys and deep nesting,
    reading YAML 1.2's exponent floats (``1e-3``) as numbers."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"nested more than {MAX_DEPTH} levels deep (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(f"a key must be a plain value, not a {key_node.id} (line {key_node.start_mark.line + 1})")
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"duplicate key {show(key)} (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", YAML12_FLOAT, list("-+0123456789."))


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` semantics plus the checks of ``_StrictLoader``."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# ---- validation -------------------------------------------------------------------------------------------------
class _Validator:
    """Walks the parsed YAML; every complaint carries the key path."""

    def __init__(self, path: str, known_pairs: set[str]):
        self.path, self.known_pairs = path, known_pairs

    def fail(self, key: str, reason: str) -> NoReturn:
        raise ConfigError(f"{self.path}: {key}: {reason}")

    @staticmethod
    def join(key: str, child) -> str:
        child = child if isinstance(child, str) and child.isprintable() and len(child) <= 60 else show(child, 60)
        return f"{key}.{child}" if key else str(child)

    def mapping(self, value, key: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, f"expected a mapping, got {type(value).__name__} {show(value)}")
        for k in value:
            if not isinstance(k, (str, int, float)) or isinstance(k, bool):
                self.fail(key, f"keys must be names or numbers, got {type(k).__name__} {show(k)}")
        return value

    def keys(self, value: dict, key: str, allowed) -> None:
        for k in value:
            if k not in allowed:
                hint = did_you_mean(k, [str(a) for a in allowed]) or f"; allowed: {', '.join(sorted(map(str, allowed)))}"
                self.fail(self.join(key, k), f"unknown key{hint}")

    def whole(self, value, key: str, minimum: int | None = 0, maximum: int | None = None) -> int:
        return int(self.number(value, key, minimum, integer=True, maximum=maximum))

    def number(self, value, key: str, minimum: float | None = 0.0, integer: bool = False,
               maximum: float | None = None) -> float:
        if isinstance(value, str):
            self.fail(key, f"expected a number, got the string {show(value)} (remove the quotes)")
        if not is_number(value):
            self.fail(key, f"expected a number, got {type(value).__name__} {show(value)}")
        if not math.isfinite(value):
            self.fail(key, f"must be finite, got {value!r}")
        if integer and value != int(value):
            self.fail(key, f"expected a whole number, got {value!r}")
        if minimum is not None and value < minimum:
            self.fail(key, f"must be >= {minimum:g}, got {value!r}")
        if maximum is not None and value > maximum:
            self.fail(key, f"must be <= {maximum:g}, got {value!r}")
        return float(value)

    def tolerance(self, metric: str, value, key: str) -> float:
        """A tolerance: a number >= 0 that some value of the metric can meet and some can miss."""
        tolerance = self.number(value, key)
        problem = METRICS[metric].tolerance_problem(tolerance)
        if problem:
            self.fail(key, f"{tolerance:g}: {problem}")
        return tolerance

    def choice(self, value, key: str, options) -> str:
        if value not in options:
            self.fail(key, f"must be one of {', '.join(options)}, got {show(value)}")
        return value

    def text(self, value, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"expected a non-empty string, got {show(value)}")
        return value

    def tolerances(self, value, key: str, allowed=CASE_METRICS) -> dict[str, float]:
        """Tolerances of the metrics a section judges (per-case metrics, unless told): a metric judged
        elsewhere is refused naming its section, never dropped."""
        value = self.mapping(value, key)
        for metric in value:
            if metric in METRICS and metric not in allowed:
                where = {"latency": "it goes in the latency: section", "explanation": "it goes in explanations.tolerances",
                         "quantizer": "it goes in defaults: or gate.<pair>.tolerances"}.get(METRICS[metric].family, "")
                if metric == "quantizer_violations":
                    where = "no file sets it: every gated pair's quantizers must keep their properties (0 violations)"
                self.fail(self.join(key, metric), f"{metric} is not judged here: {where or 'see the README'}")
        self.keys(value, key, allowed)
        return {m: self.tolerance(m, v, self.join(key, m)) for m, v in value.items()}

    def perturbation(self, name, key: str):
        from qrobust.data.perturbations import PERTURBATIONS
        try:
            return PERTURBATIONS.get(name)
        except InvalidArgument as exc:
            self.fail(key, str(exc).split(": ", 1)[1])

    def level(self, value, key: str, perturbation) -> float:
        number = self.number(value, key)
        try:
            return perturbation.check_level(number)
        except InvalidArgument as exc:
            self.fail(key, str(exc))

    def levels(self, value, key: str, perturbation) -> tuple[float, ...]:
        if value == "imagenet-c":  # level 0 and ImageNet-C's severities 1-5 in this family's units
            from qrobust.data.perturbations import IMAGENET_C

            if perturbation.name not in IMAGENET_C:
                self.fail(key, f"{perturbation.name} has no ImageNet-C severities (families that have: "
                               f"{', '.join(IMAGENET_C)})")
            return (0.0, *(float(lv) for lv in IMAGENET_C[perturbation.name]))
        if not isinstance(value, list) or not value:
            self.fail(key, f"expected a non-empty list of levels or imagenet-c, got {show(value)}")
        out = [self.level(lv, f"{key}[{i}]", perturbation) for i, lv in enumerate(value)]
        if len(set(out)) != len(out):
            self.fail(key, f"duplicate levels in {show(value)}")
        return tuple(out)

    def at(self, value, key: str, levels) -> dict[float, dict[str, float]]:
        value = self.mapping(value, key)
        out = {}
        for lv, tol in value.items():
            level = self.number(lv, self.join(key, lv))
            if level not in levels:
                self.fail(self.join(key, lv), f"level {show(lv)} is not in the perturbation's levels {list(levels)}")
            out[level] = self.tolerances(tol, self.join(key, lv))
        return out

    def pair_name(self, name, key: str) -> str:
        if not isinstance(name, str) or name not in self.known_pairs:
            self.fail(key, f"unknown pair {show(name)}{did_you_mean(name, self.known_pairs)}")
        return name

    def pair_list(self, value, key: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail(key, f"expected a list of pair names, got {type(value).__name__} {show(value)}")
        names = tuple(self.pair_name(p, f"{key}[{i}]") for i, p in enumerate(value))
        if len(set(names)) != len(names):
            self.fail(key, "lists a pair twice")
        return names


def _frozen(mapping: dict) -> Mapping:
    return MappingProxyType(dict(mapping))


def _sweep(v: _Validator, raw: dict) -> dict[str, SweepEntry]:
    if "perturbations" not in raw:
        from qrobust.data.perturbations import PERTURBATIONS
        return {name: SweepEntry(tuple(PERTURBATIONS.get(name).levels)) for name in DEFAULT_SWEEP}
    sweep = {}
    for name, spec in v.mapping(raw["perturbations"], "perturbations").items():
        key = v.join("perturbations", name)
        pert = v.perturbation(name, key)
        spec = v.mapping(spec, key)
        v.keys(spec, key, SWEEP_KEYS)
        levels = v.levels(spec.get("levels", list(pert.levels)), f"{key}.levels", pert)
        sweep[name] = SweepEntry(levels, _frozen(v.tolerances(spec.get("tolerances"), f"{key}.tolerances")),
                                 _frozen(v.at(spec.get("at"), f"{key}.at", levels)))
    if not sweep:
        v.fail("perturbations", "is empty: name at least one perturbation (or leave the section out for the default sweep)")
    return sweep


def _gate(v: _Validator, raw: dict, sweep: dict[str, SweepEntry]) -> dict[str, GateEntry]:
    gate = {}
    for pair, spec in v.mapping(raw.get("gate"), "gate").items():
        key = v.join("gate", pair)
        v.pair_name(pair, key)
        spec = v.mapping(spec, key)
        v.keys(spec, key, GATE_KEYS)
        metrics = spec.get("metrics")
        if metrics is not None:
            if not isinstance(metrics, list) or not metrics:
                v.fail(f"{key}.metrics", f"expected a non-empty list of metric names, got {show(metrics)}")
            for i, metric in enumerate(metrics):
                if metric not in CASE_METRICS:
                    hint = did_you_mean(metric, CASE_METRICS)
                    v.fail(f"{key}.metrics[{i}]", f"not a per-case metric: {show(metric)}{hint} (per-case metrics: "
                                                  f"{', '.join(CASE_METRICS)}; latency and explanation metrics have "
                                                  "their own sections)")
            metrics = tuple(metrics)
        xfail = None if spec.get("xfail") is None else v.text(spec["xfail"], f"{key}.xfail")
        tau = None if spec.get("operating_point") is None else _operating_point(v, spec["operating_point"],
                                                                                  f"{key}.operating_point")
        only = None
        if spec.get("perturbations") is not None:
            only = {}
            for name, pspec in v.mapping(spec["perturbations"], f"{key}.perturbations").items():
                pkey = v.join(f"{key}.perturbations", name)
                if name not in sweep:
                    v.fail(pkey, f"not in the perturbations sweep ({', '.join(sweep)})")
                pspec = v.mapping(pspec, pkey)
                v.keys(pspec, pkey, SWEEP_KEYS)
                levels = sweep[name].levels
                if "levels" in pspec:  # a subset of the sweep's levels for this pair
                    levels = v.levels(pspec["levels"], f"{pkey}.levels", v.perturbation(name, pkey))
                    extra = [lv for lv in levels if lv not in sweep[name].levels]
                    if extra:
                        v.fail(f"{pkey}.levels", f"{extra} not in the sweep's levels {list(sweep[name].levels)}")
                only[name] = SweepEntry(levels, _frozen(v.tolerances(pspec.get("tolerances"), f"{pkey}.tolerances")),
                                        _frozen(v.at(pspec.get("at"), f"{pkey}.at", levels)))
            if not only:
                v.fail(f"{key}.perturbations", "is empty: name the perturbations to keep, or leave the key out")
        gate[pair] = GateEntry(_frozen(v.tolerances(spec.get("tolerances"), f"{key}.tolerances", PAIR_TOLERANCES)),
                               None if only is None else _frozen(only), metrics, xfail, tau)
    return gate


def _baseline(v: _Validator, raw: dict) -> dict[str, BaselineMargin]:
    out = {}
    section = v.mapping(raw.get("baseline"), "baseline")
    v.keys(section, "baseline", METRICS)
    for metric, spec in section.items():
        key = v.join("baseline", metric)
        if isinstance(spec, dict):
            v.keys(spec, key, MARGIN_KEYS)
            if not spec:
                v.fail(key, "needs absolute and/or relative")
            out[metric] = BaselineMargin(*(None if spec.get(k) is None else v.number(spec[k], f"{key}.{k}")
                                           for k in ("absolute", "relative")))
        else:
            out[metric] = BaselineMargin(absolute=v.number(spec, key))
    return out


def _bitwidth(v: _Validator, raw: dict) -> BitwidthConfig:
    section = v.mapping(raw.get("bitwidth"), "bitwidth")
    v.keys(section, "bitwidth", BITWIDTH_KEYS)
    if not section:
        return BitwidthConfig()
    default = BitwidthConfig()
    pert_name = section.get("perturbation", default.perturbation)
    pert = v.perturbation(pert_name, "bitwidth.perturbation")
    tolerances = v.tolerances(section.get("tolerances"), "bitwidth.tolerances", CASE_METRICS)
    pairs = v.pair_list(section.get("pairs"), "bitwidth.pairs")
    if pairs and not tolerances:
        v.fail("bitwidth.tolerances", "the bit-width sweep needs tolerances to check")
    return BitwidthConfig(pairs, v.whole(section.get("min_bits", default.min_bits), "bitwidth.min_bits", 1, 16),
                          pert.name, v.level(section.get("level", default.level), "bitwidth.level", pert),
                          _frozen(tolerances))


def _latency(v: _Validator, raw: dict) -> LatencyConfig:
    section = v.mapping(raw.get("latency"), "latency")
    v.keys(section, "latency", LATENCY_KEYS)
    default = LatencyConfig()
    return LatencyConfig(v.pair_list(section.get("pairs"), "latency.pairs"),
                         v.whole(section.get("batch", default.batch), "latency.batch", 1, MAX_BATCH),
                         v.whole(section.get("rounds", default.rounds), "latency.rounds", 3, MAX_ROUNDS),
                         _frozen({m: v.tolerance(m, section[m], f"latency.{m}") for m in LATENCY_METRICS if m in section}))


def _explanations(v: _Validator, raw: dict) -> ExplanationsConfig:
    section = v.mapping(raw.get("explanations"), "explanations")
    v.keys(section, "explanations", EXPLANATIONS_KEYS)
    default = ExplanationsConfig()
    pairs = v.pair_list(section.get("pairs"), "explanations.pairs")
    tolerances = v.tolerances(section.get("tolerances"), "explanations.tolerances", EXPLANATION_METRICS)
    if pairs and not tolerances:
        v.fail("explanations.tolerances", f"explanation pairs need tolerances to check ({', '.join(EXPLANATION_METRICS)})")
    return ExplanationsConfig(pairs, v.whole(section.get("samples", default.samples), "explanations.samples", 1,
                                             MAX_SAMPLES),
                              v.whole(section.get("steps", default.steps), "explanations.steps", 1, MAX_STEPS),
                              _frozen(tolerances))


def _cam_methods() -> list[str]:
    from qrobust.explain.cam import CAM_METHODS

    return CAM_METHODS.names()


def read_thresholds_file(path: str | Path) -> tuple[bytes, Any]:
    """The raw bytes and the parsed YAML of a thresholds file (bounded, strict, one-line errors)."""
    try:
        raw_bytes = read_bounded(path, "thresholds file", MAX_BYTES)
    except InvalidArgument as exc:
        raise ConfigError(str(exc)) from None
    try:
        return raw_bytes, safe_load_unique(raw_bytes.decode("utf-8"))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a thresholds file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        reason = show(" ".join(str(exc).split()), 300)
        raise ConfigError(f"{path}: not valid YAML: {reason}") from None


def _operating_point(v: _Validator, value, key: str) -> float:
    """A confidence threshold: a softmax probability in (0, 1] (0 would accept every sample)."""
    tau = v.number(value, key, minimum=0.0, maximum=1.0)
    if tau == 0:
        v.fail(key, "must be > 0 (a threshold of 0 accepts every sample: no decision can change)")
    return tau


def _gradients_available(v: _Validator, thresholds: Thresholds) -> None:
    """Attacks (fgsm) need the FP32 model's input gradients: a pair whose FP32 is an ONNX file or another
    device's recorded logits has none."""
    from qrobust.data.perturbations import PERTURBATIONS

    for name, spec in thresholds.pairs.items():
        entry = thresholds.gate.get(name)
        source = next((k for k in ("fp32", "reference_outputs") if k in spec), None)
        if source is None or entry is None:
            continue
        used = entry.perturbations if entry.perturbations is not None else thresholds.sweep
        attacks = [p for p in used if PERTURBATIONS.get(p).needs_model]
        if attacks:
            what = "an ONNX file" if source == "fp32" else "a device's recorded logits (reference_outputs:)"
            v.fail(v.join("gate", name), f"{', '.join(attacks)} needs the FP32 model's input gradients and this pair's "
                                         f"FP32 is {what}: give the pair a torch FP32 (arch or builder) or list its "
                                         "perturbations without it")


def load_thresholds(path: str | Path, known_pairs: set[str] | None = None) -> Thresholds:
    """Parse and validate ``path``; raises ConfigError with ``file: key.path: reason``."""
    raw_bytes, raw = read_thresholds_file(path)
    if known_pairs is None:
        from qrobust.models import pair_names
        known_pairs = set(pair_names())
    v = _Validator(str(path), set(known_pairs))
    if raw is None:
        v.fail("(top level)", "the file is empty: a gate needs at least a gate: section")
    raw = v.mapping(raw, "(top level)")
    v.keys(raw, "", TOP_KEYS)
    datasets = v.mapping(raw.get("datasets"), "datasets")
    declared_pairs = v.mapping(raw.get("pairs"), "pairs")
    v.known_pairs |= {p for p in declared_pairs if isinstance(p, str)}
    base = Path(path).parent
    from qrobust.gate.declared_config import validate_dataset, validate_pair
    for name, spec in datasets.items():
        validate_dataset(v, name, v.mapping(spec, v.join("datasets", name)), base)
    for name, spec in declared_pairs.items():
        validate_pair(v, name, v.mapping(spec, v.join("pairs", name)), base, datasets)
    cam = v.mapping(raw.get("cam"), "cam")
    v.keys(cam, "cam", CAM_KEYS)
    sweep = _sweep(v, raw)
    defaults = raw.get("defaults")
    thresholds = Thresholds(
        path=str(path), sha256=hashlib.sha256(raw_bytes).hexdigest(),
        decision=v.choice(raw.get("decision", Thresholds.decision), "decision", DECISIONS),
        seed=v.whole(raw.get("seed", Thresholds.seed), "seed", maximum=SEED_MAX),
        batch_size=v.whole(raw.get("batch_size", Thresholds.batch_size), "batch_size", minimum=1, maximum=MAX_BATCH),
        max_samples=None if raw.get("max_samples") is None else v.whole(raw["max_samples"], "max_samples", 1,
                                                                         MAX_SAMPLES),
        replicates=v.whole(raw.get("replicates", Thresholds.replicates), "replicates", minimum=10,
                           maximum=MAX_REPLICATES),
        f1_average=v.choice(raw.get("f1_average", Thresholds.f1_average), "f1_average", F1_AVERAGES),
        cam_method=v.choice(cam.get("method", Thresholds.cam_method), "cam.method", ("auto", *_cam_methods())),
        operating_point=None if raw.get("operating_point") is None else _operating_point(v, raw["operating_point"],
                                                                                         "operating_point"),
        defaults=_frozen(default_tolerances() if defaults is None
                         else v.tolerances(defaults, "defaults", PAIR_TOLERANCES)),
        sweep=_frozen(sweep), gate=_frozen(_gate(v, raw, sweep)), baseline=_frozen(_baseline(v, raw)),
        bitwidth=_bitwidth(v, raw), latency=_latency(v, raw), explanations=_explanations(v, raw),
        pairs=_frozen(declared_pairs), datasets=_frozen(datasets),
    )
    _gradients_available(v, thresholds)
    if not thresholds.mentioned_pairs:
        v.fail("gate", "no pair is gated: list pairs under gate: (or bitwidth/latency/explanations pairs); "
                       "a gate that checks nothing does not pass")
    return thresholds
