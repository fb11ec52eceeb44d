"""Statistics: intervals against scipy, coverage and gate error rates by seeded simulation, the decision rule."""
import numpy as np
import pytest
import torch
from scipy import stats as sps

from qrobust.errors import InvalidArgument
from qrobust.gate.verdict import decide
from hypothesis import given, settings, strategies as st

from qrobust.metrics.stats import (
    BootstrapTrimmedMean, trimmed_means, mcnemar_exact_p, required_sample_size, paired_delta, percentile_interval, poisson_weights, quantile_rank_interval,
    wilson_interval,
)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (450, 450), (17, 1000), (1, 1)])
def test_wilson_matches_scipy(k, n):
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_mcnemar_exact_p_hand_cases():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(10, 0) == pytest.approx(2 * 0.5**10)
    assert mcnemar_exact_p(3, 3) == pytest.approx(1.0)


def test_paired_delta_counts_and_sign():
    d = paired_delta(first_right=90, second_right=85, b=8, c=3, n=100)
    assert d.delta == pytest.approx(0.05)
    assert d.interval[0] < 0.05 < d.interval[1]
    assert d.p_value == pytest.approx(sps.binomtest(3, 11, 0.5).pvalue)
    zero = paired_delta(97, 97, 0, 0, 100)
    assert zero.delta == 0 and zero.interval[0] < 0 < zero.interval[1]


def test_paired_delta_rejects_inconsistent_tables():
    with pytest.raises(InvalidArgument, match="inconsistent"):
        paired_delta(first_right=5, second_right=9, b=1, c=1, n=10)


def simulate_counts(rng, n, pb, pc, reps):
    """(reps, 4) multinomial draws of (both right, b, c, both wrong) with FP32 accuracy 0.9."""
    p11 = 0.9 - pb
    return rng.multinomial(n, [p11, pb, pc, 1 - p11 - pb - pc], size=reps)


def run_gate(counts, tol, mode):
    verdicts = []
    for n11, b, c, n22 in counts:
        n = n11 + b + c + n22
        d = paired_delta(n11 + b, n11 + c, b, c, n)
        verdicts.append(decide(d.delta, d.interval, tol, higher_is_better=False, mode=mode).passed)
    return np.array(verdicts)


# The docs recommend n >= 2,500 samples to gate an accuracy delta at a tolerance of 0.01 when about
# 3% of predictions flip: these simulations are what that recommendation rests on.
RECOMMENDED_N = 2500


@pytest.mark.parametrize("mode", ["point", "lenient"])
def test_false_fail_rate_at_half_the_tolerance_is_at_most_five_percent(mode):
    rng = np.random.default_rng(0)
    tol, pc = 0.01, 0.005
    counts = simulate_counts(rng, RECOMMENDED_N, pc + tol / 2, pc, reps=400)
    assert (~run_gate(counts, tol, mode)).mean() <= 0.05


@pytest.mark.parametrize("mode", ["point", "lenient", "strict"])
def test_detection_at_twice_the_tolerance_is_at_least_eighty_percent(mode):
    rng = np.random.default_rng(1)
    tol, pc = 0.01, 0.005
    counts = simulate_counts(rng, RECOMMENDED_N, pc + 2 * tol, pc, reps=400)
    assert (~run_gate(counts, tol, mode)).mean() >= 0.80


def test_paired_interval_covers_the_true_delta_at_about_95_percent():
    rng = np.random.default_rng(2)
    pb, pc, n = 0.03, 0.01, 500
    covered = 0
    counts = simulate_counts(rng, n, pb, pc, reps=1000)
    for n11, b, c, _ in counts:
        lo, hi = paired_delta(n11 + b, n11 + c, b, c, n).interval
        covered += lo <= pb - pc <= hi
    assert 0.93 <= covered / 1000 <= 0.98


def test_wilson_covers_at_about_95_percent():
    rng = np.random.default_rng(3)
    ks = rng.binomial(200, 0.97, size=2000)
    cover = np.mean([lo <= 0.97 <= hi for lo, hi in (wilson_interval(int(k), 200) for k in ks)])
    assert 0.93 <= cover <= 0.98


def test_cluster_bootstrap_covers_the_mean_of_clustered_data():
    rng = np.random.default_rng(4)
    covered, reps = 0, 150
    for rep in range(reps):
        groups = np.repeat(np.arange(60), 4)  # 60 source images, 4 views each
        effect = rng.exponential(1.0, size=60)[groups]  # views of one image are correlated
        x = torch.tensor(effect + rng.normal(0, 0.1, size=240))
        w = poisson_weights(rep, torch.tensor(groups), 500)
        lo, hi = percentile_interval((w @ x) / w.sum(1))
        covered += lo <= 1.0 <= hi
    assert covered / reps >= 0.88


@settings(deadline=None, max_examples=60)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=80), st.sampled_from([0.0, 0.1, 0.25]),
       st.integers(1, 5))
def test_trimmed_mean_equals_scipy_however_the_samples_arrive(values, trim, batches):
    acc = BootstrapTrimmedMean(50, trim)
    w = poisson_weights(0, torch.arange(len(values)), 50)
    x = torch.tensor(values, dtype=torch.float64)
    for chunk in np.array_split(np.arange(len(values)), batches):
        acc.update(x[chunk], w[:, chunk])
    estimate = acc.estimate()
    assert estimate.n == len(values)
    assert estimate.value == pytest.approx(sps.trim_mean(values, trim), rel=1e-9, abs=1e-6)
    assert estimate.details["untrimmed_mean"] == pytest.approx(np.mean(values), rel=1e-9, abs=1e-6)


def test_trimmed_replicates_trim_their_resample_as_if_each_copy_were_a_sample():
    rng = np.random.default_rng(5)
    values = torch.tensor(np.sort(rng.lognormal(0, 2, 30)))
    weights = torch.tensor(rng.poisson(1.0, (40, 30)), dtype=torch.float64)
    expanded = [np.repeat(values.numpy(), row.int().numpy()) for row in weights]
    expected = [sps.trim_mean(e, 0.1) if len(e) else np.nan for e in expanded]
    np.testing.assert_allclose(trimmed_means(values, weights, 0.1).numpy(), expected, rtol=1e-12)


def test_one_outlier_cannot_carry_a_trimmed_mean_but_carries_the_mean():
    values = torch.tensor([0.5] * 48 + [24.3], dtype=torch.float64)  # seed 1's Lite0 view, 49 views
    w = poisson_weights(1, torch.arange(49), 1000)
    acc = BootstrapTrimmedMean(1000)
    acc.update(values, w)
    estimate = acc.estimate()
    assert estimate.value == pytest.approx(0.5) and estimate.details["untrimmed_mean"] > 0.98
    assert estimate.interval[1] == pytest.approx(0.5)  # at most 4 copies of the outlier fit in the trim


def test_trimmed_bootstrap_covers_the_trimmed_population_mean_of_clustered_heavy_tails():
    true = sps.trim_mean(np.random.default_rng(99).lognormal(0, 1.5, 2_000_000), 0.1)
    rng = np.random.default_rng(6)
    covered, reps = 0, 120
    for rep in range(reps):
        groups = np.repeat(np.arange(50), 2)  # 50 photos, 2 views each
        x = torch.tensor(rng.lognormal(0, 1.5, 50)[groups] * np.exp(rng.normal(0, 0.05, 100)))
        acc = BootstrapTrimmedMean(400)
        acc.update(x, poisson_weights(rep, torch.tensor(groups), 400))
        lo, hi = acc.estimate().interval
        covered += lo <= true <= hi
    assert covered / reps >= 0.85


def test_a_trimmed_mean_releases_its_samples_once_estimated():
    acc = BootstrapTrimmedMean(100)
    acc.update(torch.arange(50, dtype=torch.float64), poisson_weights(0, torch.arange(50), 100))
    first = acc.estimate({"a": 1})
    assert acc.values == [] and acc.weights == [] and acc.n == 50
    again = acc.estimate({"b": 2})
    assert (again.value, again.interval) == (first.value, first.interval) and again.details["b"] == 2
    with pytest.raises(InvalidArgument, match="update"):
        acc.update(torch.ones(1, dtype=torch.float64), torch.ones(100, 1))


def test_trimmed_mean_rejects_a_trim_of_half():
    with pytest.raises(InvalidArgument, match="trim"):
        BootstrapTrimmedMean(10, 0.5)


def test_bootstrap_weights_depend_only_on_seed_and_group():
    a = poisson_weights(7, torch.tensor([3, 5, 3]), 100)
    b = poisson_weights(7, torch.tensor([5]), 100)
    assert torch.equal(a[:, 0], a[:, 2]) and torch.equal(a[:, 1], b[:, 0])
    assert not torch.equal(a[:, 0], poisson_weights(8, torch.tensor([3]), 100)[:, 0])
    assert a.mean().item() == pytest.approx(1.0, abs=0.15)


def test_quantile_rank_interval_brackets_the_rank():
    lo, hi = quantile_rank_interval(1000, 0.95)
    assert lo < 950 < hi and hi - lo < 60
    assert quantile_rank_interval(5, 0.95) == (4, 5)


@pytest.mark.parametrize("mode,interval,estimate,expected", [
    ("point", (0.0, 0.02), 0.009, "pass"), ("point", (0.0, 0.02), 0.011, "fail"),
    ("strict", (0.0, 0.009), 0.005, "pass"), ("strict", (0.0, 0.02), 0.009, "inconclusive"),
    ("strict", (0.0, 0.02), 0.011, "fail"), ("strict", (0.012, 0.02), 0.015, "fail"),
    ("lenient", (0.0, 0.02), 0.011, "inconclusive"), ("lenient", (0.0, 0.02), 0.009, "pass"),
    ("lenient", (0.011, 0.02), 0.015, "fail"),
])
def test_decision_modes_for_a_maximum_tolerance(mode, interval, estimate, expected):
    d = decide(estimate, interval, 0.01, higher_is_better=False, mode=mode)
    assert d.verdict == expected
    assert d.margin == pytest.approx(0.01 - estimate)
    assert d.passed == (expected == "pass" or (expected == "inconclusive" and mode == "lenient"))


def test_strict_without_an_interval_is_inconclusive_never_a_pass():
    assert decide(0.001, None, 0.01, higher_is_better=False, mode="strict").verdict == "inconclusive"
    assert decide(0.02, None, 0.01, higher_is_better=False, mode="strict").verdict == "fail"
    assert decide(0.001, None, 0.01, higher_is_better=False, mode="point").verdict == "pass"


def test_required_sample_size_matches_the_simulated_recommendation():
    # 3% discordance at a 0.01 budget: the README's ~2,500 (simulated in the tests above)
    assert 2300 <= required_sample_size(discordant=75, n=2500, tolerance=0.01) <= 2400
    assert required_sample_size(0, 450, 0.01) == required_sample_size(1, 450, 0.01)
    with pytest.raises(InvalidArgument, match="tolerance=0"):
        required_sample_size(5, 100, 0)


def test_decision_for_a_minimum_tolerance_and_nan():
    assert decide(0.99, (0.985, 0.995), 0.98, higher_is_better=True, mode="strict").verdict == "pass"
    assert decide(0.99, (0.97, 0.995), 0.98, higher_is_better=True, mode="strict").verdict == "inconclusive"
    nan = decide(float("nan"), None, 0.98, higher_is_better=True, mode="point")
    assert nan.verdict == "fail" and not nan.passed
    with pytest.raises(InvalidArgument, match="mode='loose'"):
        decide(0.5, None, 0.5, True, mode="loose")


def test_paired_interval_is_newcombes_method_10_with_his_continuity_corrected_phi():
    """Newcombe (1998) worked example, also R biostatUZH::confIntPairedProportion: [0.0115, 0.2265]."""
    d = paired_delta(14 + 5, 14 + 0, 5, 0, 41)  # table [[14, 5], [0, 22]]
    assert d.delta == pytest.approx(5 / 41)
    assert d.interval == pytest.approx((0.0115, 0.2265), abs=5e-5)
