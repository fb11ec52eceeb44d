"""The gate plan: which cases run, with which tolerances. Pure data from a validated thresholds file.

Tolerance precedence, later wins: the defaults, the perturbation's tolerances, its level (``at``), the
pair's tolerances, the pair's perturbation tolerances, the pair's level. A ``metrics:`` list keeps only
those metrics for the pair. Bit-width pairs below ``min_bits`` become strict expected failures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from collections.abc import Callable, Mapping

from qrobust.errors import ConfigError, show
from qrobust.gate.config import Thresholds
from qrobust.metrics.catalog import CASE_METRICS
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


def gate_cases(thresholds: Thresholds) -> list[CaseSpec]:
    """Every pair x perturbation x level of the ``gate:`` section, tolerances resolved."""
    cases = []
    for pair, entry in thresholds.gate.items():
        for name, sweep in thresholds.sweep.items():
            if entry.perturbations is not None and name not in entry.perturbations:
                continue
            own = entry.perturbations.get(name) if entry.perturbations is not None else None
            for level in own.levels if own else sweep.levels:
                tolerances = {**thresholds.defaults, **sweep.tolerances, **sweep.at.get(level, {}),
                              **entry.tolerances, **(own.tolerances if own else {}),
                              **(own.at.get(level, {}) if own else {})}
                tolerances = {m: t for m, t in tolerances.items() if m in CASE_METRICS}
                if entry.metrics is not None:
                    tolerances = {m: t for m, t in tolerances.items() if m in entry.metrics}
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
    problems: tuple[str, ...] = field(default=())

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


def make_plan(thresholds: Thresholds, bits_of: Callable[[str], int | None], selected: list[str] | None = None) -> GatePlan:
    """The plan of ``thresholds``, optionally only for the ``selected`` pairs (``--qrobust-pairs``)."""
    known = thresholds.mentioned_pairs
    for name in selected or ():
        if name not in known:
            raise ConfigError(f"--qrobust-pairs: pair {show(name)} is not gated by {thresholds.path}"
                              f"{did_you_mean(name, known)} (gated: {', '.join(known)})")

    def keep(name: str) -> bool:
        return selected is None or name in selected

    plan = GatePlan(
        cases=tuple(c for c in gate_cases(thresholds) if keep(c.pair)),
        bitwidth_cases=tuple(c for c in bitwidth_cases(thresholds, bits_of) if keep(c.pair)),
        latency_pairs=tuple(p for p in thresholds.latency.pairs if keep(p)),
        explanation_pairs=tuple(p for p in thresholds.explanations.pairs if keep(p)),
        quantizer_pairs=tuple(p for p in thresholds.gate if keep(p)),
    )
    empty = [c.pair for c in plan.cases if not c.tolerances]
    if empty:
        raise ConfigError(f"{thresholds.path}: gate.{empty[0]}: no tolerance applies to its cases "
                          "(its metrics list or the defaults leave nothing to check)")
    return plan
