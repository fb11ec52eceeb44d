"""The familywise decision: a pair whose true values all meet their tolerances fails with probability at
most 5%, at the built-in gate's size (568 checks per LeNet pair) and at n = 450 (default) and n = 200.

Counted metrics are checked exactly, summing the binomial / multinomial probability of every outcome the
gate would fail; bootstrap means by simulating whole pairs of heavy-tailed per-sample values."""
from functools import partial

import numpy as np
import pytest
import torch
from scipy import stats as sps

from qrobust.errors import InvalidArgument
from qrobust.gate.plan import make_plan
from qrobust.gate import verdict as _verdict
from qrobust.gate.verdict import FAMILYWISE_ALPHA, decide, family_confidence
from qrobust.metrics.stats import (
    BootstrapMean, Estimate, clopper_pearson_interval, paired_delta, paired_interval, poisson_weights, wilson_interval,
)
from qrobust.suites import BUILTIN_THRESHOLDS

BUILTIN_FAMILY = 568  # checks of lenet5-digits-int8-x86 in the shipped gate (a test below keeps it honest)


def judge(**kwargs):
    """``qrobust.gate.verdict.judge`` with the record as report.json has it."""
    record, message = _verdict.judge(**kwargs)
    return record.as_dict(), message


def decided(estimate, tolerance, metric, size=BUILTIN_FAMILY, mode="familywise"):
    return judge(test="t", pair="p", perturbation="awgn", level=0.1, metric=metric, estimate=estimate,
                 tolerance=tolerance, mode=mode, family_size=size)


def agreement(agree, n):
    return Estimate(agree / n, wilson_interval(agree, n), n, {"flips": n - agree},
                    partial(clopper_pearson_interval, agree, n))


def top1(b, c, n, fp32_right):
    d = paired_delta(fp32_right, fp32_right - b + c, b, c, n)
    return Estimate(d.delta, d.interval, n, {"b": b, "c": c, "fp32_right": fp32_right},
                    partial(paired_interval, fp32_right, fp32_right - b + c, b, c, n))


def test_the_builtin_family_size_is_what_the_plan_counts(builtin_thresholds):
    plan = make_plan(builtin_thresholds, lambda name: 8)
    assert plan.family_sizes(builtin_thresholds)["lenet5-digits-int8-x86"] == BUILTIN_FAMILY


@pytest.fixture
def builtin_thresholds():

    from qrobust.gate.config import load_thresholds

    return load_thresholds(BUILTIN_THRESHOLDS)


@pytest.mark.parametrize("n", [450, 200])
def test_agreement_at_its_tolerance_fails_a_pair_of_568_such_checks_at_most_5_percent(n):
    """Every check's true agreement exactly at the 0.98 minimum (the worst benign twin there is)."""
    flips = np.arange(n + 1)
    pmf = sps.binom.pmf(flips, n, 0.02)
    confidence = family_confidence(BUILTIN_FAMILY)
    fails = np.array([decide((n - k) / n, agreement(n - k, n).interval_at(confidence), 0.98, True, "familywise").verdict
                      == "fail" for k in flips])
    per_check = pmf[fails].sum()
    assert 0 < per_check * BUILTIN_FAMILY <= FAMILYWISE_ALPHA  # union bound over the pair's checks
    # Wilson's interval would not keep the promise:
    wilson_fails = np.array([wilson_interval(n - k, n, confidence)[1] < 0.98 for k in flips])
    assert pmf[wilson_fails].sum() * BUILTIN_FAMILY > 1.5 * FAMILYWISE_ALPHA
    assert pmf[flips > 0.02 * n].sum() > 0.3  # the point decision at the same true value: a coin toss


@pytest.mark.parametrize("n", [450, 200])
def test_top1_delta_at_its_tolerance_fails_a_pair_of_568_such_checks_at_most_5_percent(n):
    """True accuracy loss exactly 0.01 with 4% of samples discordant: multinomial over (b, c)."""
    p_b, p_c, fp32_right = 0.025, 0.015, int(0.95 * n)
    confidence, total = family_confidence(BUILTIN_FAMILY), 0.0
    for b in range(0, 60):
        for c in range(0, 60):
            p = sps.multinomial.pmf([b, c, n - b - c], n, [p_b, p_c, 1 - p_b - p_c])
            if p < 1e-12 or b > fp32_right or c > n - fp32_right:
                continue
            interval = top1(b, c, n, fp32_right).interval_at(confidence)
            total += p * (decide((b - c) / n, interval, 0.01, False, "familywise").verdict == "fail")
    assert total * BUILTIN_FAMILY <= FAMILYWISE_ALPHA


@pytest.mark.parametrize("n", [450, 200])
def test_heavy_tailed_means_at_their_tolerance_fail_a_simulated_pair_at_most_5_percent(n):
    """kl_mean-like per-sample values (lognormal, sigma 1) with the true mean exactly at the tolerance:
    1,000 simulated pairs of 20 such checks, each decided at 1 - 2 * 0.05 / 20 with the bootstrap's
    standard error (the rule of ``bootstrap_estimate``, vectorized over checks)."""
    rng = np.random.default_rng(n)
    sigma, checks, pairs, replicates = 1.0, 20, 1000, 400
    tolerance = float(np.exp(sigma**2 / 2))  # the lognormal's mean
    weights = poisson_weights(0, torch.arange(n), replicates)
    values = torch.tensor(rng.lognormal(0, sigma, (pairs * checks, n)))
    boot = (values @ weights.T) / weights.sum(dim=1)
    z = sps.norm.ppf(1 - FAMILYWISE_ALPHA / checks)
    low = values.mean(dim=1) - z * boot.std(dim=1)
    failed_pairs = (low > tolerance).reshape(pairs, checks).any(dim=1).double().mean().item()
    assert failed_pairs <= FAMILYWISE_ALPHA + 0.015  # 0.05 plus about two Monte Carlo errors


def test_a_bootstrap_mean_widens_by_the_standard_error_of_its_replicates():
    weights = poisson_weights(3, torch.arange(50), 300)
    values = torch.tensor(np.random.default_rng(3).lognormal(0, 1, 50))
    mean = BootstrapMean(300)
    mean.update(values, weights)
    estimate = mean.estimate()
    se = ((weights @ values) / weights.sum(dim=1)).std().item()
    z = sps.norm.ppf(1 - 0.001 / 2)
    assert estimate.interval_at(0.999) == pytest.approx((estimate.value - z * se, estimate.value + z * se))


def test_a_clear_violation_still_fails_and_a_marginal_one_is_inconclusive():
    bad, _ = decided(agreement(360, 450), 0.98, "agreement")  # 0.80: the asym2-like broken twin
    assert bad["verdict"] == "fail" and bad["family"]["size"] == BUILTIN_FAMILY and bad["family"]["adjusted"]
    marginal, message = decided(agreement(437, 450), 0.98, "agreement")  # 0.971: fails the point decision
    assert marginal["verdict"] == "inconclusive" and message is None
    point, _ = decided(agreement(437, 450), 0.98, "agreement", mode="point")
    assert point["verdict"] == "fail"
    assert marginal["family"]["confidence"] == pytest.approx(family_confidence(BUILTIN_FAMILY))
    low, high = marginal["family"]["interval"]
    assert low < marginal["interval"][0] and high > marginal["interval"][1]  # wider than the 95% interval


def test_the_failure_message_names_the_familywise_interval():
    _, message = decided(agreement(360, 450), 0.98, "agreement")
    assert message.startswith("agreement 0.8 < 0.98") and "familywise 99.98% CI" in message
    assert "over 568 checks" in message


def test_a_check_without_sampling_error_is_decided_on_its_value():
    record, message = decided(Estimate(0.5, None, 3, {}), 0.95, "quantized_fraction")
    assert record["verdict"] == "fail" and not record["family"]["adjusted"] and message


def test_familywise_without_a_family_size_is_refused():
    with pytest.raises(InvalidArgument, match="family_size"):
        decided(agreement(440, 450), 0.98, "agreement", size=None)
