"""Verdicts: an estimate, its tolerance, the decision mode and the baseline -> a record and a message.

Pure functions with no pytest in sight, so a verdict can be computed, tested and reused anywhere. This
module owns the record of a check (``CheckRecord``) and every outcome it can have: ``judge`` (pass,
fail, inconclusive, measured, a baseline regression or a baseline from another environment),
``error_record`` (a check that could not be judged: its pair cannot be built, the metric cannot be
computed, the check crashed), ``settle_expected_failure`` (xfail, or XPASS for a strict expected
failure) and ``fails`` (whether a record fails the gate: the one rule behind the report's headline,
the test outcome, JUnit and the exit code). The fixture and the plugin only carry records.

* Modes: ``point`` compares the estimate with the tolerance; ``strict`` needs the whole 95% interval
  inside the tolerance (an interval straddling it is *inconclusive*, which fails); ``lenient`` fails only
  when the whole interval violates the tolerance (a straddling violation is inconclusive and passes);
  ``familywise`` is lenient with each interval widened to 1 - 2 alpha / m for a pair of m checks
  (Bonferroni), so a pair whose every true value meets its tolerance fails with probability at most
  alpha = 0.05. Whether a pair fails is the same under Holm's step-down, which only adds rejections
  after a first one.
* Metrics that are ratios of sample counts (``counted`` in the catalogue: top-1/top-5 delta, agreement)
  are compared exactly, as fractions: one flip in 100 samples against a tolerance of 0.01 is exactly at
  the tolerance and passes.
* Fragility: how many samples would have to change their prediction to reverse a counted verdict, and
  for other metrics the margin in units of the interval's width. A verdict at most ``FRAGILE_FLIPS``
  samples (or ``FRAGILE_WIDTHS`` interval widths) from reversing is flagged: at this sample size it is a
  coin toss, and any numeric change (another CPU, thread count or seed) may reverse it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction

from qrobust.gate.modes import DECISIONS as MODES
from qrobust.errors import invalid
from qrobust.metrics.catalog import METRICS
from qrobust.metrics.stats import CONFIDENCE, clopper_pearson_interval, paired_interval, wilson_interval

VERDICTS = ("pass", "fail", "inconclusive", "xfail", "measured", "error")  # measured: reported, no tolerance set
FAMILYWISE_ALPHA = 0.05  # chance that a pair whose true values all meet their tolerances fails
FRAGILE_FLIPS = 2
FRAGILE_WIDTHS = 0.1
FLIP_SEARCH_LIMIT = 50  # beyond this many samples a verdict is not fragile: the search stops


@dataclass(frozen=True)
class Decision:
    """A verdict with the numbers behind it."""

    verdict: str  # "pass", "fail" or "inconclusive"
    mode: str
    estimate: float
    interval: tuple[float, float] | None
    tolerance: float
    higher_is_better: bool
    margin: float  # headroom to the tolerance: positive passes on the point estimate

    @property
    def passed(self) -> bool:
        """Whether a gate passes: strict mode needs proof, lenient mode tolerates an unproven violation."""
        return self.verdict == "pass" or (self.verdict == "inconclusive" and self.mode in ("lenient", "familywise"))


def family_confidence(size: int, alpha: float = FAMILYWISE_ALPHA) -> float:
    """The two-sided confidence whose one-sided tail is alpha / size (Bonferroni over a pair's checks)."""
    return 1 - 2 * alpha / max(1, size)


def exact(value: float) -> Fraction:
    """A tolerance as the decimal its user wrote (0.01 is 1/100, not the nearest binary float)."""
    return Fraction(repr(float(value)))


def decide(estimate: float, interval: tuple[float, float] | None, tolerance: float, higher_is_better: bool,
           mode: str = "point", *, exact_estimate: Fraction | None = None) -> Decision:
    """Point: the estimate against the tolerance. Strict: the whole interval must comply, an interval
    straddling the tolerance is inconclusive (not a pass). Lenient and familywise (given the widened
    interval): fail only when the whole interval violates the tolerance (the violation is significant);
    a straddling violation is inconclusive.
    ``exact_estimate`` (a ratio of counts) makes the point comparison exact."""
    if mode not in MODES:
        raise invalid("mode", mode, f"must be one of {', '.join(MODES)}")
    if not math.isfinite(tolerance):
        raise invalid("tolerance", tolerance, "must be finite")
    sign = 1 if higher_is_better else -1
    if not math.isfinite(estimate):
        return Decision("fail", mode, estimate, interval, tolerance, higher_is_better, float("nan"))
    if exact_estimate is not None:
        margin = float(sign * (exact_estimate - exact(tolerance)))
    else:
        margin = sign * (estimate - tolerance)
    if interval is None and mode == "strict":  # no uncertainty estimate: compliance cannot be proven
        return Decision("inconclusive" if margin >= 0 else "fail", mode, estimate, None, tolerance,
                        higher_is_better, margin)
    low, high = interval if interval is not None else (estimate, estimate)
    worst, best = (low, high) if higher_is_better else (high, low)
    worst_ok = sign * (worst - tolerance) >= 0
    best_ok = sign * (best - tolerance) >= 0
    point_ok = margin >= 0
    if mode == "point" or interval is None:
        verdict = "pass" if point_ok else "fail"
    elif worst_ok:
        verdict = "pass"
    elif not best_ok:
        verdict = "fail"
    elif mode == "strict":
        verdict = "inconclusive" if point_ok else "fail"
    else:
        verdict = "pass" if point_ok else "inconclusive"
    return Decision(verdict, mode, estimate, interval, tolerance, higher_is_better, margin)


def _shifted_table(n11: int, b: int, c: int, n22: int, shift: int):
    """The paired 2x2 table after ``shift`` twin predictions change for the worse (negative: better).

    FP32's outcomes are fixed; a worse twin first loses samples both got right (n11 -> b), then the ones
    only it got right (c -> n22); a better one the reverse. None when the table runs out of samples."""
    if shift >= 0:
        k = min(shift, n11)
        rest = shift - k
        return None if rest > c else (n11 - k, b + k, c - rest, n22 + rest)
    k = min(-shift, b)
    rest = -shift - k
    return None if rest > n22 else (n11 + k, b - k, c + rest, n22 - rest)


def counted_estimate(metric: str, details: dict, n: int, shift: int = 0, confidence: float = CONFIDENCE,
                     exact: bool = False):
    """(exact value, float value, interval) of a counted metric after ``shift`` samples change their
    prediction towards the twin doing worse (negative: better); None when impossible at this n.
    ``exact``: agreement gets the Clopper-Pearson interval (the familywise decision's, as its estimate's
    ``interval_at``), not Wilson's."""
    kind = METRICS[metric].counted
    if kind == "paired":
        b, c = details["b"], details["c"]
        n11 = details["fp32_right"] - b
        table = _shifted_table(n11, b, c, n - n11 - b - c, shift)
        if table is None:
            return None
        n11, b, c, _ = table
        return Fraction(b - c, n), (b - c) / n, paired_interval(n11 + b, n11 + c, b, c, n, confidence)
    if kind == "agreement":
        agree = n - details["flips"] - shift
        if not 0 <= agree <= n:
            return None
        interval = (clopper_pearson_interval if exact else wilson_interval)(agree, n, confidence)
        return Fraction(agree, n), agree / n, interval
    raise invalid("metric", metric, "is not a counted metric")


def has_counts(metric: str, details: dict) -> bool:
    """Whether ``details`` carry the sample counts of a counted metric (the evaluator's always do)."""
    needed = {"paired": ("fp32_right", "b", "c"), "agreement": ("flips",)}.get(METRICS[metric].counted)
    return needed is not None and all(k in details for k in needed)


def flips_to_reverse(metric: str, details: dict, n: int, tolerance: float, mode: str,
                     confidence: float = CONFIDENCE) -> int | None:
    """How many samples must change their prediction to reverse this verdict (None: more than
    FLIP_SEARCH_LIMIT, or impossible at this n)."""
    higher = METRICS[metric].higher_is_better
    exact = mode == "familywise"
    value, as_float, interval = counted_estimate(metric, details, n, confidence=confidence, exact=exact)
    passed = decide(as_float, interval, tolerance, higher, mode, exact_estimate=value).passed
    direction = 1 if passed else -1  # a pass reverses when the twin gets worse, a fail when it gets better
    for k in range(1, FLIP_SEARCH_LIMIT + 1):
        shifted = counted_estimate(metric, details, n, direction * k, confidence, exact)
        if shifted is None:
            return None
        value, as_float, interval = shifted
        if decide(as_float, interval, tolerance, higher, mode, exact_estimate=value).passed != passed:
            return k
    return None


def fragility(metric: str, decision: Decision, details: dict, n: int, confidence: float = CONFIDENCE) -> dict:
    """``{"flips_to_reverse": k}`` for counted metrics, ``{"margin_widths": m}`` for the others, plus
    ``"fragile": bool``."""
    if has_counts(metric, details):
        k = flips_to_reverse(metric, details, n, decision.tolerance, decision.mode, confidence)
        return {"flips_to_reverse": k, "fragile": k is not None and k <= FRAGILE_FLIPS}
    if decision.interval is None or not math.isfinite(decision.margin):
        return {"margin_widths": None, "fragile": False}
    width = decision.interval[1] - decision.interval[0]
    widths = decision.margin / width if width > 0 else (math.inf if decision.margin else 0.0)
    return {"margin_widths": widths, "fragile": abs(widths) <= FRAGILE_WIDTHS}


def describe_fragility(info: dict) -> str:
    if "flips_to_reverse" in info:
        k = info["flips_to_reverse"]
        return "" if k is None else f"{k} sample{'s' if k > 1 else ''} from reversing"
    widths = info.get("margin_widths")
    return "" if widths is None or math.isinf(widths) else f"margin {widths:+.2g} interval widths"


def _format(value: float) -> str:
    return f"{value:.4g}"


@dataclass
class CheckRecord:
    """One check of a gate run: where (test, pair, perturbation, level, metric), the numbers and the
    verdict. ``as_dict`` is its report.json form; ``extra`` holds the keys only some records have
    (``family``, ``flips_to_reverse`` or ``margin_widths``, ``error``, ``note``, ``diagnosis``)."""

    test: str
    pair: str
    perturbation: str
    level: float
    metric: str
    verdict: str
    mode: str
    value: float | None = None
    interval: list[float] | None = None
    n: int = 0
    tolerance: float | None = None
    failed_by: str | None = None
    margin: float | None = None
    fragile: bool = False
    baseline: dict | None = None
    context: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(out.pop("extra"))
        out["direction"] = METRICS[self.metric].direction if self.metric in METRICS else None
        return out


def fails(record: dict) -> bool:
    """Whether a record fails the gate: a failed or errored check, or an unproven one under strict (lenient
    and familywise pass an inconclusive check). The headline of every report, the test outcome, the
    JUnit counts and the exit code follow this one rule."""
    return record["verdict"] in ("fail", "error") or (record["verdict"] == "inconclusive" and record["mode"] == "strict")


def worst_cases(records: list[dict], keep=lambda r: r["verdict"] not in ("xfail", "measured")) \
        -> dict[tuple[str, str], dict]:
    """Per (pair, metric), the kept record closest to (or furthest past) its tolerance: the smallest
    recorded margin. By default the judged ones (expected failures and untoleranced measurements are
    not): the terminal, the Markdown page and the HTML report all read this one definition."""
    worst: dict[tuple[str, str], dict] = {}
    for r in records:
        if r["margin"] is None or not keep(r):
            continue
        key = (r["pair"], r["metric"])
        if key not in worst or r["margin"] < worst[key]["margin"]:
            worst[key] = r
    return dict(sorted(worst.items()))


def error_record(*, test: str, pair: str, perturbation: str, level: float, metric: str, mode: str,
                 error: str) -> CheckRecord:
    """A check that could not be judged (its pair cannot be built or gated, its metric cannot be computed,
    it crashed): an ``error`` verdict, which fails the gate, with the one-line reason."""
    return CheckRecord(test, pair, perturbation, level, metric, "error", mode, failed_by="error",
                       extra={"error": error})


def settle_expected_failure(records: list[CheckRecord], reason: str) -> None:
    """The records of a strict expected failure (a known-bad configuration the gate must keep catching):
    ``xfail`` when any judged one fails, else ``fail`` (XPASS: it was not caught), as pytest's strict
    xfail then decides the test. An error stays an error: a check that could not run caught nothing."""
    judged = [r for r in records if r.verdict != "error"]
    caught = any(fails(r.as_dict()) for r in judged)
    for r in judged:
        r.verdict = "xfail" if caught else "fail"
        if not caught:
            r.failed_by = "xpass"
            r.extra["note"] = f"XPASS(strict): a known-bad configuration was not caught ({reason})"


def judge(*, test: str, pair: str, perturbation: str, level: float, metric: str, estimate,
          tolerance: float | None, mode: str, context: dict | None = None, baseline_old: float | None = None,
          baseline_margin=None, family_size: int | None = None,
          baseline_mismatch: str | None = None) -> tuple[CheckRecord, str | None]:
    """Decide one measured ``estimate`` (a ``metrics.stats.Estimate``) against its tolerance and, when
    given, its baseline value. Returns the record and the failure message (None on a pass). Without a
    tolerance the value is recorded as ``measured``: reported, not gated. The familywise mode needs
    ``family_size``, the number of the pair's gated checks. ``baseline_mismatch``: why the baseline cannot
    be compared (another environment): a gated check then fails by baseline, with that reason."""
    from qrobust.gate.baseline import regression
    from qrobust.metrics.stats import required_sample_size

    info = METRICS[metric]
    details = dict(estimate.details)
    value, interval, n = estimate.value, estimate.interval, estimate.n
    where = (test, pair, perturbation, level, metric)
    if tolerance is None:
        return CheckRecord(*where, "measured", mode, value, list(interval) if interval else None, n,
                           context=dict(context or {}), details=details), None
    exact_value = counted_estimate(metric, details, n)[0] if has_counts(metric, details) else None
    if info.counted == "paired" and tolerance > 0 and "b" in details:
        details["n_required"] = required_sample_size(details["b"] + details["c"], n, tolerance)
    finite = value is not None and math.isfinite(value)
    confidence, decided_interval = CONFIDENCE, interval
    extra: dict = {}
    if mode == "familywise":
        if not family_size:
            raise invalid("family_size", family_size, "the familywise decision needs the pair's number of checks")
        confidence = family_confidence(family_size)
        adjusted = estimate.interval_at is not None and interval is not None and finite
        if adjusted:
            decided_interval = estimate.interval_at(confidence)
        extra["family"] = {"size": family_size, "alpha": FAMILYWISE_ALPHA, "confidence": confidence,
                           "adjusted": adjusted, "interval": list(decided_interval) if decided_interval and finite else None}
    decision = decide(value if finite else float("nan"), decided_interval, tolerance, info.higher_is_better, mode,
                      exact_estimate=exact_value)
    fragile = fragility(metric, decision, details, n, confidence) if finite else {"fragile": False}
    extra.update({k: v for k, v in fragile.items() if k != "fragile"})
    if decision.verdict == "pass" and details.get("unjudged"):  # part of what it covers could not be measured
        decision, extra["note"] = replace(decision, verdict="inconclusive"), details["unjudged"]
    verdict = decision.verdict
    failed_by = None if decision.passed else "tolerance"
    messages = []
    baseline_message = None
    if baseline_old is not None and finite:
        baseline_message = regression(metric, baseline_old, value, baseline_margin)
        if baseline_message:
            verdict, failed_by = "fail", failed_by or "baseline"
    record = CheckRecord(
        *where, verdict, mode, value if finite else None, list(interval) if interval and finite else None, n,
        tolerance, failed_by, decision.margin if math.isfinite(decision.margin) else None, fragile["fragile"],
        None if baseline_old is None else {"value": baseline_old, "regressed": bool(baseline_message)},
        dict(context or {}), details if finite else {**details, "value": repr(value)}, extra)
    if not decision.passed:
        messages.append(tolerance_message(record.as_dict()))
    if baseline_message:
        messages.append(f"{baseline_message} ({pair} / {perturbation} @ {level:g})")
    if baseline_mismatch:
        record.verdict, record.failed_by = "fail", "baseline"
        messages.append(baseline_mismatch)
    return record, ("\n".join(messages) or None)


def tolerance_message(record: dict) -> str:
    """One line that leads with the decisive comparison, so an 80-column CI summary keeps the reason:
    ``agreement 0.9244 < 0.95 at pair / contrast @ 0.8 (95% CI [...], n=450, flips=34; ...)``."""
    metric, value, tolerance = record["metric"], record["value"], record["tolerance"]
    higher = METRICS[metric].higher_is_better
    where = f"{record['pair']} / {record['perturbation']} @ {record['level']:g}"
    if value is None:
        return f"{metric} not computable at {where}: {record['details'].get('value', 'no value')}"
    violated = "<" if higher else ">"
    if record["verdict"] == "inconclusive":
        lead = f"{metric} {_format(value)} {record['direction']} {tolerance:g} unproven"
    else:
        lead = f"{metric} {_format(value)} {violated} {tolerance:g}"
    ci = "no interval" if record["interval"] is None else \
        f"95% CI [{_format(record['interval'][0])}, {_format(record['interval'][1])}]"
    extra = ", ".join(f"{k}={_format(v)}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in record["details"].items() if isinstance(v, (int, float, str)) and len(str(v)) < 80)
    parts = [f"{ci}, n={record['n']}" + (f", {extra}" if extra else "")]
    family = record.get("family")
    if family and family["interval"] is not None:
        low, high = family["interval"]
        parts.append(f"familywise {100 * family['confidence']:.4g}% CI [{_format(low)}, {_format(high)}] "
                     f"over {family['size']} checks" + ("" if family["adjusted"] else " (not widened: no such interval)"))
    if record["margin"] is not None:
        parts.append(f"margin {record['margin']:+.4g}")
    fragile = describe_fragility(record)
    if fragile:
        parts.append(fragile + (": fragile" if record.get("fragile") else ""))
    parts.append(f"decision {record['mode']}: {record['verdict']}")
    return f"{lead} at {where} ({'; '.join(parts)})"
