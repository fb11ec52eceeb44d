"""Paired statistics, intervals and streaming means: every estimate carries the uncertainty of its sample size.

* Accuracy deltas are paired (both models see the same inputs): with b = #(FP32 right, quantized
  wrong) and c = #(FP32 wrong, quantized right), delta = (b - c) / n, the exact McNemar p-value is a
  two-sided binomial test of b against b + c, and the 95% interval is Newcombe's (1998, method 10)
  score interval for a paired difference of proportions (well behaved at b = c = 0).
* Single proportions (agreement) get Wilson score intervals.
* Means get a seeded Poisson bootstrap that resamples source images: every sample of one group (views
  of one photo) gets the same Poisson(1) weight in a replicate, so clusters move together; weights depend
  only on (seed, group id, replicate), so intervals do not depend on batching, and the state is O(B).
* Quantiles get a distribution-free order-statistic interval (binomial ranks).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial

import torch
from scipy import stats as sps

from qrobust.errors import invalid

CONFIDENCE = 0.95


@lru_cache(maxsize=64)
def z_score(confidence: float) -> float:
    """The two-sided normal quantile of ``confidence`` (cached: scipy's ppf costs more than the interval
    around it, and the flip search asks for the same few confidences thousands of times)."""
    return float(sps.norm.ppf(0.5 + confidence / 2))


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    if n <= 0:
        raise invalid("n", n, "a proportion needs at least one sample")
    if not 0 <= k <= n:
        raise invalid("k", k, f"must be between 0 and n={n}")
    z = z_score(confidence)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def clopper_pearson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact binomial interval: it never covers less than ``confidence``. The familywise decision
    uses it for agreement, where Wilson's interval at 1 - 2 * 0.05 / 472 errs 3.5x more often than asked
    (0.00037 per check at a true agreement of 0.98, n = 450: tests/gate/test_familywise.py)."""
    if n <= 0 or not 0 <= k <= n:
        raise invalid("k, n", (k, n), "need 0 <= k <= n and n >= 1")
    tail = (1 - confidence) / 2
    low = 0.0 if k == 0 else float(sps.beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(sps.beta.ppf(1 - tail, k + 1, n - k))
    return low, high


@dataclass(frozen=True)
class PairedDelta:
    """Paired difference of two accuracies on the same samples (first minus second)."""

    n: int
    b: int  # first right, second wrong
    c: int  # first wrong, second right
    delta: float
    interval: tuple[float, float]
    p_value: float  # exact McNemar


def mcnemar_exact_p(b: int, c: int) -> float:
    if b + c == 0:
        return 1.0
    return float(sps.binomtest(min(b, c), b + c, 0.5).pvalue)


def paired_delta(first_right: int, second_right: int, b: int, c: int, n: int,
                 confidence: float = CONFIDENCE) -> PairedDelta:
    """The paired difference of two accuracies, its Newcombe interval and the exact McNemar p-value."""
    interval = paired_interval(first_right, second_right, b, c, n, confidence)
    return PairedDelta(n, b, c, (b - c) / n, interval, mcnemar_exact_p(b, c))


def paired_interval(first_right: int, second_right: int, b: int, c: int, n: int,
                    confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Newcombe's score interval for p1 - p2 from the 2x2 table of paired outcomes (without the McNemar
    test: the flip search and the familywise decision need only the interval)."""
    n11 = first_right - b  # both right
    n22 = n - n11 - b - c  # both wrong
    if n <= 0 or min(n11, n22, b, c) < 0 or second_right != n11 + c:
        raise invalid("counts", (first_right, second_right, b, c, n), "inconsistent paired 2x2 table")
    p1, p2 = first_right / n, second_right / n
    l1, u1 = wilson_interval(first_right, n, confidence)
    l2, u2 = wilson_interval(second_right, n, confidence)
    denom = (n11 + b) * (c + n22) * (n11 + c) * (b + n22)
    # Newcombe's phi with his continuity correction: A = ad - bc shrinks by n/2 towards 0 (to 0 when
    # 0 <= A <= n/2); his worked example [[14, 5], [0, 22]] gives [0.0115, 0.2265] (a test checks it)
    agreement = n11 * n22 - b * c
    corrected = agreement - n / 2 if agreement > n / 2 else (0.0 if agreement >= 0 else agreement)
    phi = corrected / math.sqrt(denom) if denom > 0 else 0.0
    delta = (b - c) / n  # exactly the paired difference, not p1 - p2 (which rounds twice)
    low = delta - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = delta + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, low), min(1.0, high)


@lru_cache(maxsize=4096)  # 8 KB per group at 1,000 replicates: at most 32 MB, reused by every pass
def _group_weights(seed: int, group: int, replicates: int) -> torch.Tensor:
    key = hashlib.sha256(f"bootstrap|{int(seed)}|{int(group)}".encode()).digest()[:8]
    gen = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
    return torch.poisson(torch.ones(replicates, dtype=torch.float64), generator=gen)


def poisson_weights(seed: int, groups: torch.Tensor, replicates: int) -> torch.Tensor:
    """(replicates, n) Poisson(1) bootstrap weights; samples of one group share their column.

    A group's weights depend only on (seed, group, replicates), so results do not depend on batching.
    """
    columns = [_group_weights(seed, g, replicates) for g in groups.tolist()]
    if not columns:
        return torch.zeros(replicates, 0, dtype=torch.float64)
    return torch.stack(columns, dim=1)


@dataclass(frozen=True)
class Estimate:
    """One metric of one case: value, 95% interval (or None), sample count and supporting numbers.

    ``interval_at(confidence)`` recomputes the interval at another confidence (the familywise decision
    needs 1 - 2 alpha / m); None where the metric has no sampling uncertainty or no such interval."""

    value: float
    interval: tuple[float, float] | None
    n: int
    details: dict
    interval_at: Callable[[float], tuple[float, float] | None] | None = field(default=None, compare=False, repr=False)


def normal_interval(value: float, se: float, confidence: float) -> tuple[float, float] | None:
    """value +- z * se: bootstrap percentiles cannot reach the tails a familywise level asks for (1,000
    replicates hold no 0.00005 quantile), the bootstrap's standard error can."""
    if not math.isfinite(se):
        return None
    z = z_score(confidence)
    return value - z * se, value + z * se


def bootstrap_estimate(value: float, replicates: torch.Tensor, n: int, details: dict) -> Estimate:
    """An estimate with the percentile interval of its bootstrap ``replicates`` and, for other
    confidences, the normal interval of their standard error."""
    finite = replicates[torch.isfinite(replicates)]
    se = float(finite.std()) if finite.numel() >= 10 else float("nan")
    return Estimate(value, percentile_interval(replicates), n, details, partial(normal_interval, value, se))


def replicate_ratio(numerators: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-replicate ``numerator / weight``; NaN where a resample drew no weight (dropped later)."""
    return torch.where(weights > 0, numerators / weights.clamp_min(1e-300), torch.full_like(numerators, float("nan")))


class BootstrapMean:
    """A streaming mean with a cluster-bootstrap interval: per replicate, sum(w * value) and sum(w).

    Memory is O(replicates) whatever the number of samples; with the Poisson weights of
    ``poisson_weights`` the interval does not depend on how the samples were batched.
    """

    def __init__(self, replicates: int):
        self.n, self.total = 0, 0.0
        self.weighted = torch.zeros(replicates, dtype=torch.float64)
        self.weight = torch.zeros(replicates, dtype=torch.float64)

    def update(self, values: torch.Tensor, weights: torch.Tensor) -> None:
        """Add per-sample ``values`` (n,) with their bootstrap ``weights`` (replicates, n)."""
        values = values.detach().double().cpu()
        self.n += values.numel()
        self.total += float(values.sum())
        self.weighted += weights @ values
        self.weight += weights.sum(dim=1)

    def merge(self, other: BootstrapMean) -> None:
        """Add ``other``'s samples (a later shard of the same case): exact for the counts and weights; the
        float sums are added once per shard, so every run that folds the same shards in order agrees bit
        for bit (qrobust.gate.shards)."""
        self.n += other.n
        self.total += other.total
        self.weighted += other.weighted
        self.weight += other.weight

    def state(self) -> dict:
        return {"n": self.n, "total": self.total, "weighted": self.weighted, "weight": self.weight}

    @classmethod
    def from_state(cls, state: dict) -> BootstrapMean:
        mean = cls(len(state["weight"]))
        mean.n, mean.total, mean.weighted, mean.weight = state["n"], state["total"], state["weighted"], state["weight"]
        return mean

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

    def estimate(self, details: dict | None = None) -> Estimate:
        if not self.n:
            return Estimate(self.mean, None, 0, dict(details or {}))
        return bootstrap_estimate(self.mean, replicate_ratio(self.weighted, self.weight), self.n, dict(details or {}))


class BootstrapTrimmedMean:
    """A trimmed mean (``trim`` of the samples cut from each end) with the same cluster-bootstrap
    interval as ``BootstrapMean``: for heavy-tailed per-sample metrics, where one sample can decide a mean.

    The point estimate is ``scipy.stats.trim_mean(values, trim)`` (floor(trim * n) samples cut from each
    end). Each replicate applies the same rule to its resample: Poisson weights are whole copies of a
    sample, so floor(trim * W) copies are cut from each end of the W drawn. A trimmed mean cannot stream:
    the values (8 bytes each) and their weights (1 byte per replicate) are kept until the first
    ``estimate``, O(n * replicates) bytes (5 MB for 5,000 CAM samples at 1,000 replicates), then only
    the replicate estimates: a finished case cached for the report holds O(replicates).
    """

    def __init__(self, replicates: int, trim: float = 0.1):
        if not 0 <= trim < 0.5:
            raise invalid("trim", trim, "must be in [0, 0.5)")
        self.replicates, self.trim = replicates, trim
        self.values: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        self._final: tuple[float, torch.Tensor, int, float] | None = None  # (point, replicates, n, mean)

    def update(self, values: torch.Tensor, weights: torch.Tensor) -> None:
        """Add per-sample ``values`` (n,) with their bootstrap ``weights`` (replicates, n)."""
        if self._final is not None:
            raise invalid("update", "after estimate", "a trimmed mean's samples are released by its estimate")
        if weights.numel() and float(weights.max()) > 255:
            raise invalid("weights", float(weights.max()), "Poisson bootstrap weights above 255")
        self.values.append(values.detach().double().cpu().flatten())
        self.weights.append(weights.to(torch.uint8))

    def merge(self, other: BootstrapTrimmedMean) -> None:
        """Add ``other``'s samples after this one's (a later shard); both must still hold their samples."""
        if self._final is not None or other._final is not None:
            raise invalid("merge", "after estimate", "a trimmed mean's samples are released by its estimate")
        self.values += other.values
        self.weights += other.weights

    def state(self) -> dict:
        if self._final is not None:
            raise invalid("state", "after estimate", "a trimmed mean's samples are released by its estimate")
        return {"trim": self.trim, "replicates": self.replicates, "values": list(self.values),
                "weights": list(self.weights)}

    @classmethod
    def from_state(cls, state: dict) -> BootstrapTrimmedMean:
        mean = cls(state["replicates"], state["trim"])
        mean.values, mean.weights = list(state["values"]), list(state["weights"])
        return mean

    @property
    def n(self) -> int:
        return self._final[2] if self._final is not None else sum(v.numel() for v in self.values)

    def estimate(self, details: dict | None = None) -> Estimate:
        info = {**(details or {}), "aggregate": f"trimmed mean, {self.trim:g} cut from each end"}
        if not self.n:
            return Estimate(float("nan"), None, 0, info)
        if self._final is None:
            values = torch.cat(self.values)
            order = values.argsort()
            values, weights = values[order], torch.cat(self.weights, dim=1)[:, order]
            point = float(trimmed_means(values, torch.ones(1, values.numel(), dtype=torch.float64), self.trim)[0])
            replicates = torch.cat([trimmed_means(values, weights[i:i + 64].double(), self.trim)
                                    for i in range(0, weights.shape[0], 64)])
            self._final = (point, replicates, values.numel(), float(values.mean()))
            self.values, self.weights = [], []
        point, replicates, n, mean = self._final
        return bootstrap_estimate(point, replicates, n, {**info, "untrimmed_mean": mean})


def trimmed_means(sorted_values: torch.Tensor, weights: torch.Tensor, trim: float) -> torch.Tensor:
    """Per row of integer ``weights`` (copies of each sorted value): the mean after cutting floor(trim * W)
    copies from each end of the W drawn; NaN for a row that keeps nothing."""
    total = weights.sum(dim=1, keepdim=True)
    cut = torch.floor(trim * total)
    upper = torch.cumsum(weights, dim=1)
    lower = upper - weights
    kept = (torch.minimum(upper, total - cut) - torch.maximum(lower, cut)).clamp_min(0)
    count = (total - 2 * cut).squeeze(1)
    return torch.where(count > 0, (kept * sorted_values).sum(dim=1) / count.clamp_min(1),
                       torch.full_like(count, float("nan")))


def percentile_interval(replicates: torch.Tensor, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Percentile bootstrap interval from replicate estimates (NaN replicates, empty resamples, dropped)."""
    finite = replicates[torch.isfinite(replicates)].double()
    if finite.numel() < 10:
        return None
    tail = (1 - confidence) / 2
    return float(torch.quantile(finite, tail)), float(torch.quantile(finite, 1 - tail))


def quantile_rank_interval(n: int, q: float, confidence: float = CONFIDENCE) -> tuple[int, int]:
    """1-based ranks (l, u) of order statistics bracketing the q-quantile with >= ``confidence``."""
    tail = (1 - confidence) / 2
    low = int(sps.binom.ppf(tail, n, q))
    high = int(sps.binom.ppf(1 - tail, n, q)) + 1
    return max(1, low), min(n, high)


def required_sample_size(discordant: int, n: int, tolerance: float, power: float = 0.8,
                         confidence: float = CONFIDENCE) -> int:
    """Samples needed to tell a paired accuracy delta one ``tolerance`` away from the tolerance with
    ``power`` at the observed discordance rate (b + c) / n: n = (z_(1-a/2) + z_power)^2 * rate / tol^2.

    The variance of a paired difference of proportions is about (b + c) / n^2; with no discordant pair
    observed yet the rate is taken as 1 / n (the smallest one could observe)."""
    if tolerance <= 0:
        raise invalid("tolerance", tolerance, "must be > 0 to size a sample")
    rate = max(discordant, 1) / max(n, 1)
    z = float(sps.norm.ppf(0.5 + confidence / 2) + sps.norm.ppf(power))
    return math.ceil(z * z * rate / tolerance**2)
