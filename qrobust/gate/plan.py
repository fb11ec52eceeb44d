"""The gate plan: which checks run, with which tolerances. Pure data from a validated thresholds file.

Tolerance precedence, later wins: the defaults, the perturbation's tolerances, its level (``at``), the
pair's tolerances, the pair's perturbation tolerances, the pair's level. A ``metrics:`` list keeps only
those metrics for the pair. Bit-width pairs below ``min_bits`` become strict expected failures.

Every tolerance ends in a check (one suite test per case and metric, ``GatePlan.checks``) or in a usage
error: a metric the pair cannot compute (no CAM layer for a CAM metric, no ground-truth maps for a
``*_gt_delta``, five classes or fewer for top-5) is an error where the file sets it for that pair; a
file-wide tolerance (``defaults``, a perturbation's) applies to the pairs that can compute it, and the
ones it skips are listed in the plan (``not_applicable``), the terminal summary and report.json.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from collections.abc import Callable, Mapping

from qrobust.errors import ConfigError, show
from qrobust.gate.config import Thresholds
from qrobust.metrics.catalog import CASE_METRICS, METRICS
from qrobust.models.pair import PairFacts
from qrobust.registry import did_you_mean


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
class Check:
    """One gated check: a case's metric against its tolerance (one suite test)."""

    case: CaseSpec
    metric: str

    @property
    def id(self) -> str:
        return f"{self.metric}-{self.case.id}"


def gate_cases(thresholds: Thresholds, facts: Callable[[str], PairFacts] = lambda _: PairFacts(),
               skipped: list[tuple[str, str, str]] | None = None) -> list[CaseSpec]:
    """Every pair x perturbation x level of the ``gate:`` section, tolerances resolved. A metric the pair
    cannot compute (``facts``) is a ConfigError where the pair's own entry sets it; a file-wide one is
    left out and appended to ``skipped`` as (pair, metric, reason)."""
    cases = []
    for pair, entry in thresholds.gate.items():
        known = facts(pair)
        for name, sweep in thresholds.sweep.items():
            if entry.perturbations is not None and name not in entry.perturbations:
                continue
            own = entry.perturbations.get(name) if entry.perturbations is not None else None
            for level in own.levels if own else sweep.levels:
                own_tolerances = {**entry.tolerances, **(own.tolerances if own else {}),
                                  **(own.at.get(level, {}) if own else {})}
                tolerances = {**thresholds.defaults, **sweep.tolerances, **sweep.at.get(level, {}), **own_tolerances}
                tolerances = {m: t for m, t in tolerances.items() if m in CASE_METRICS}
                if entry.metrics is not None:
                    tolerances = {m: t for m, t in tolerances.items() if m in entry.metrics}
                for metric in list(tolerances):
                    reason = known.cannot(metric)
                    if reason is None:
                        continue
                    if metric in own_tolerances or (entry.metrics is not None and metric in entry.metrics):
                        raise ConfigError(f"{thresholds.path}: gate.{pair}: {metric} cannot be judged: {reason}")
                    del tolerances[metric]
                    if skipped is not None and (pair, metric, reason) not in skipped:
                        skipped.append((pair, metric, reason))
                cases.append(CaseSpec(pair, name, level, MappingProxyType(tolerances), entry.xfail))
    return cases


def bitwidth_cases(thresholds: Thresholds, bits_of: Callable[[str], int | None]) -> list[CaseSpec]:
    """Seed 003's sweep: widths below ``min_bits`` are strict expected failures (the gate must catch them)."""
    config, cases = thresholds.bitwidth, []
    for name in config.pairs:
        bits = bits_of(name)
        if bits is None:
            raise ConfigError(f"{thresholds.path}: bitwidth.pairs: pair {show(name)} has no preset, so no bit width")
        reason = f"{bits} bits is below min_bits={config.min_bits}: must fail the tolerances" if bits < config.min_bits else None
        cases.append(CaseSpec(name, config.perturbation, config.level, config.tolerances, reason))
    return cases


@dataclass(frozen=True)
class GatePlan:
    """What one run gates: cases per suite, after the ``--qrobust-pairs`` filter."""

    cases: tuple[CaseSpec, ...] = ()
    bitwidth_cases: tuple[CaseSpec, ...] = ()
    latency_pairs: tuple[str, ...] = ()
    explanation_pairs: tuple[str, ...] = ()
    quantizer_pairs: tuple[str, ...] = ()  # every gated pair: its quantizers' properties
    not_applicable: tuple[tuple[str, str, str], ...] = ()  # (pair, metric, why): file-wide tolerances it cannot compute
    latency: CaseSpec | None = None  # the latency section's batch and tolerances (its pairs above)
    explanations: CaseSpec | None = None  # the explanations section's tolerances
    quantizer: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # pair -> its quantized_fraction, if set

    def judged_by(self, fixture: str, value, metrics: tuple[str, ...] | None = None) -> list[tuple]:
        """The checks (pair, perturbation, level, metric) a test parametrized with ``value`` for the
        qrobust ``fixture`` judges: a gate check one; a case (``qrobust_metrics`` keeps those metrics) or a
        pair's explanations, latency or quantizer test every tolerance it has."""
        if fixture == "qrobust_gate_check":
            return [(value.case.pair, value.case.perturbation, value.case.level, value.metric)]
        if fixture in ("qrobust_case", "qrobust_bitwidth_case"):
            return [(value.pair, value.perturbation, value.level, m) for m in value.tolerances
                    if metrics is None or m in metrics]
        section = {"qrobust_latency_pair": self.latency, "qrobust_explanation_pair": self.explanations}.get(fixture)
        if section is not None:
            return [(value, section.perturbation, section.level, m) for m in section.tolerances]
        if fixture == "qrobust_quantizer_pair":
            return [(value, "clean", 0.0, m) for m in self.quantizer.get(value, {})]
        return []

    def required(self) -> set[tuple]:
        """Every check the plan's tolerances call for: each must be judged by a collected test."""
        found = set()
        for fixture, values in (("qrobust_gate_check", self.checks), ("qrobust_bitwidth_case", self.bitwidth_cases),
                                ("qrobust_latency_pair", self.latency_pairs),
                                ("qrobust_explanation_pair", self.explanation_pairs),
                                ("qrobust_quantizer_pair", self.quantizer_pairs)):
            for value in values:
                found.update(self.judged_by(fixture, value))
        return found

    @property
    def checks(self) -> tuple[Check, ...]:
        """One check per case and metric, metrics in catalogue order (the gate suite's tests)."""
        order = {name: i for i, name in enumerate(METRICS)}
        return tuple(Check(c, m) for c in self.cases for m in sorted(c.tolerances, key=order.__getitem__))

    def family_sizes(self, thresholds: Thresholds) -> dict[str, int]:
        """Per pair, the number of its gated checks: the family over which the familywise decision
        controls false alarms. Level 0 counts once (it is one evaluation, whatever perturbation reports
        it); a check that turns out not computable still counts, which only makes the level stricter."""
        checks: dict[str, set] = {}
        for c in self.cases + self.bitwidth_cases:
            where = ("clean", 0.0) if c.level == 0 else (c.perturbation, c.level)
            checks.setdefault(c.pair, set()).update((*where, m) for m in c.tolerances)
        for pairs, tolerances, kind in ((self.explanation_pairs, thresholds.explanations.tolerances, "explanation"),
                                        (self.latency_pairs, thresholds.latency.tolerances, "latency")):
            for pair in pairs:
                checks.setdefault(pair, set()).update((kind, 0.0, m) for m in tolerances)
        return {pair: len(found) for pair, found in checks.items()}

    @property
    def pairs(self) -> list[str]:
        """Pairs the plan needs, in first-use order."""
        names = [c.pair for c in self.cases + self.bitwidth_cases] + list(self.latency_pairs + self.explanation_pairs)
        return list(dict.fromkeys(names))


def make_plan(thresholds: Thresholds, bits_of: Callable[[str], int | None], selected: list[str] | None = None,
              facts: Callable[[str], PairFacts] = lambda _: PairFacts()) -> GatePlan:
    """The plan of ``thresholds``, optionally only for the ``selected`` pairs (``--qrobust-pairs``);
    ``facts`` says what each pair can compute before it is built."""
    known = thresholds.mentioned_pairs
    for name in selected or ():
        if name not in known:
            raise ConfigError(f"--qrobust-pairs: pair {show(name)} is not gated by {thresholds.path}"
                              f"{did_you_mean(name, known)} (gated: {', '.join(known)})")

    def keep(name: str) -> bool:
        return selected is None or name in selected

    skipped: list[tuple[str, str, str]] = []
    recorded = [p for p in thresholds.gate if not facts(p).live]  # twins that are a device's logits: no live model
    for pair in recorded:
        why = facts(pair).cannot("quantizer_violations") or ""
        skipped += [(pair, metric, why) for metric in ("quantizer_violations", "quantized_fraction")
                    if metric == "quantizer_violations" or metric in {**thresholds.defaults, **thresholds.gate[pair].tolerances}]
        for section in ("latency", "explanations"):
            if pair in getattr(thresholds, section).pairs:
                raise ConfigError(f"{thresholds.path}: {section}.pairs: {pair} cannot be timed or explained: its twin "
                                  "is a device's recorded logits (outputs:); these suites need the live twin")
    quantizer = {p: {m: t for m, t in {**thresholds.defaults, **entry.tolerances}.items() if m == "quantized_fraction"}
                 for p, entry in thresholds.gate.items() if p not in recorded}  # the file's (every property is implied)
    plan = GatePlan(
        cases=tuple(c for c in gate_cases(thresholds, facts, skipped) if keep(c.pair)),
        bitwidth_cases=tuple(c for c in bitwidth_cases(thresholds, bits_of) if keep(c.pair)),
        latency_pairs=tuple(p for p in thresholds.latency.pairs if keep(p)),
        explanation_pairs=tuple(p for p in thresholds.explanations.pairs if keep(p)),
        quantizer_pairs=tuple(p for p in thresholds.gate if keep(p) and p not in recorded),
        not_applicable=tuple(s for s in skipped if keep(s[0])),
        latency=CaseSpec("", "latency", float(thresholds.latency.batch), thresholds.latency.tolerances),
        explanations=CaseSpec("", "clean", 0.0, thresholds.explanations.tolerances),
        quantizer=MappingProxyType({p: MappingProxyType(t) for p, t in quantizer.items() if keep(p)}),
    )
    for pair in plan.explanation_pairs:  # a section naming its pairs: what one cannot compute is an error
        for metric in thresholds.explanations.tolerances:
            reason = facts(pair).cannot(metric)
            if reason:
                raise ConfigError(f"{thresholds.path}: explanations.tolerances.{metric}: cannot be judged for "
                                  f"{pair}: {reason}")
    taus = thresholds.operating_points
    untold = next((c.pair for c in plan.cases if "operating_point_flips" in c.tolerances and c.pair not in taus), None)
    if untold is not None:
        raise ConfigError(f"{thresholds.path}: gate.{untold}: operating_point_flips needs a deployment threshold: set "
                          "operating_point (top level, or in the pair's gate entry), e.g. operating_point: 0.5")
    empty = [c.pair for c in plan.cases if not c.tolerances]
    if empty:
        raise ConfigError(f"{thresholds.path}: gate.{empty[0]}: no tolerance applies to its cases "
                          "(its metrics list or the defaults leave nothing to check)")
    return plan
