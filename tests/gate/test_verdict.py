"""Verdicts: exact comparisons of counted metrics, fragility, messages, measured records, baselines."""
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrobust.errors import ConfigError
from qrobust.gate.baseline import load_baseline, regression
from qrobust.gate.config import BaselineMargin
from qrobust.gate.verdict import (
    FRAGILE_FLIPS, counted_estimate, decide, exact, flips_to_reverse, fragility,
)
from qrobust.gate import verdict as _verdict
from qrobust.metrics.stats import Estimate, paired_delta, wilson_interval


def judge(**kwargs):
    """``qrobust.gate.verdict.judge`` with the record as report.json has it."""
    record, message = _verdict.judge(**kwargs)
    return record.as_dict(), message


def top1(b, c, n, fp32_right):
    d = paired_delta(fp32_right, fp32_right - b + c, b, c, n)
    return Estimate(d.delta, d.interval, n, {"b": b, "c": c, "mcnemar_p": d.p_value, "fp32_right": fp32_right})


def agreement(agree, n):
    return Estimate(agree / n, wilson_interval(agree, n), n, {"flips": n - agree})


def verdict(estimate, tolerance, metric="top1_delta", mode="point"):
    return judge(test="t", pair="p", perturbation="awgn", level=0.1, metric=metric, estimate=estimate,
                 tolerance=tolerance, mode=mode)


def test_one_flip_in_a_hundred_is_exactly_at_a_tolerance_of_one_percent():
    # as floats, p1 - p2 = 0.97 - 0.96 = 0.010000000000000009 > 0.01 and the case would fail by rounding
    assert 0.97 - 0.96 > 0.01
    record, message = verdict(top1(b=1, c=0, n=100, fp32_right=97), 0.01)
    assert record["verdict"] == "pass" and record["margin"] == 0.0 and message is None
    assert record["value"] == 0.01  # (b - c) / n, not p1 - p2
    record, message = verdict(top1(b=2, c=0, n=100, fp32_right=97), 0.01)
    assert record["verdict"] == "fail" and message.startswith("top1_delta 0.02 > 0.01 at p / awgn @ 0.1 (")
    # agreement: 441 of 450 is exactly 0.98
    assert verdict(agreement(441, 450), 0.98, "agreement")[0]["verdict"] == "pass"
    assert verdict(agreement(440, 450), 0.98, "agreement")[0]["verdict"] == "fail"


def test_tolerances_are_the_decimals_users_wrote():
    assert exact(0.01) == Fraction(1, 100) and exact(0.98) == Fraction(49, 50)
    assert decide(0.98, None, 0.98, True, exact_estimate=Fraction(441, 450)).verdict == "pass"


@given(st.integers(1, 300), st.data())
def test_flips_to_reverse_matches_brute_force(n, data):
    """The counted search agrees with recomputing the verdict for every possible twin table."""
    fp32_right = data.draw(st.integers(0, n))
    b = data.draw(st.integers(0, fp32_right))
    c = data.draw(st.integers(0, n - fp32_right))
    tolerance = data.draw(st.sampled_from([0.0, 0.01, 0.02, 0.05, 0.1]))
    mode = data.draw(st.sampled_from(["point", "strict", "lenient"]))
    details = top1(b, c, n, fp32_right).details
    k = flips_to_reverse("top1_delta", details, n, tolerance, mode)
    passed = verdict(top1(b, c, n, fp32_right), tolerance, mode=mode)[0]["verdict"] in ("pass",) or (
        mode == "lenient" and verdict(top1(b, c, n, fp32_right), tolerance, mode=mode)[0]["verdict"] == "inconclusive")
    # brute force along the same path (worse: both-right first; better: b first)
    for step in range(1, 51):
        shifted = counted_estimate("top1_delta", details, n, step if passed else -step)
        if shifted is None:
            assert k is None
            return
        value, as_float, interval = shifted
        if decide(as_float, interval, tolerance, False, mode, exact_estimate=value).passed != passed:
            assert k == step
            return
    assert k is None


def test_fragile_verdicts_are_flagged():
    # 450 digits, tolerance 0.01: 4 net flips pass, 5 fail; 4 is one sample from reversing
    record, _ = verdict(top1(b=4, c=0, n=450, fp32_right=440), 0.01)
    assert record["verdict"] == "pass" and record["flips_to_reverse"] == 1 and record["fragile"]
    record, message = verdict(top1(b=5, c=0, n=450, fp32_right=440), 0.01)
    assert record["verdict"] == "fail" and record["flips_to_reverse"] == 1 and "1 sample from reversing: fragile" in message
    record, _ = verdict(top1(b=0, c=0, n=450, fp32_right=440), 0.01)
    assert record["flips_to_reverse"] == 5 and not record["fragile"] and FRAGILE_FLIPS < 5
    # float metrics: the margin in interval widths
    info = fragility("kl_mean", decide(0.0195, (0.015, 0.025), 0.02, False), {}, 100)
    assert info == {"margin_widths": pytest.approx(0.05), "fragile": True}
    info = fragility("kl_mean", decide(0.01, (0.008, 0.012), 0.02, False), {}, 100)
    assert info["margin_widths"] == pytest.approx(2.5) and not info["fragile"]


def test_records_carry_direction_test_id_and_n_required():
    record, message = verdict(top1(b=10, c=1, n=120, fp32_right=110), 0.01)
    assert record["direction"] == "<=" and record["test"] == "t" and record["failed_by"] == "tolerance"
    assert record["details"]["n_required"] > 120 and "n_required=" in message
    assert verdict(agreement(100, 120), 0.98, "agreement")[0]["direction"] == ">="


def test_without_a_tolerance_a_value_is_measured_not_gated():
    record, message = judge(test="t", pair="p", perturbation="latency", level=64, metric="speedup",
                            estimate=Estimate(0.74, (0.7, 0.78), 30, {}), tolerance=None, mode="point")
    assert record["verdict"] == "measured" and record["tolerance"] is None and message is None


def test_strict_inconclusive_message_says_unproven():
    _, message = verdict(Estimate(0.018, (0.012, 0.025), 50, {}), 0.02, "kl_mean", mode="strict")
    assert message.startswith("kl_mean 0.018 <= 0.02 unproven at p / awgn @ 0.1 (95% CI [0.012, 0.025]")


def test_non_finite_values_fail_with_one_line():
    record, message = verdict(Estimate(float("nan"), None, 10, {"error": "every CAM was degenerate"}), 0.4,
                              "cam_kld")
    assert record["verdict"] == "fail" and record["value"] is None and "\n" not in message


def test_baseline_margins_absolute_and_relative():
    # the 40x kl_mean regression the absolute default lets through; a relative margin catches it
    assert regression("kl_mean", 1e-4, 4e-3, BaselineMargin(absolute=0.005)) is None
    message = regression("kl_mean", 1e-4, 4e-3, BaselineMargin(relative=0.5))
    assert message.startswith("kl_mean regressed from baseline 0.0001 to 0.004")
    # both: the larger allowance (a floor near zero)
    assert regression("kl_mean", 1e-4, 4e-3, BaselineMargin(absolute=0.005, relative=0.5)) is None
    # direction from the catalogue: agreement falls to regress
    assert regression("agreement", 0.99, 0.97, BaselineMargin(absolute=0.005)) and \
        regression("agreement", 0.97, 0.99, BaselineMargin(absolute=0.005)) is None
    record, message = judge(test="t", pair="p", perturbation="awgn", level=0.1, metric="kl_mean",
                            estimate=Estimate(4e-3, (3e-3, 5e-3), 100, {}), tolerance=0.02, mode="point",
                            baseline_old=1e-4, baseline_margin=BaselineMargin(relative=0.5))
    assert record["verdict"] == "fail" and record["failed_by"] == "baseline" and "regressed from baseline" in message


@pytest.mark.parametrize("values", [{"p|awgn|0.1|kl_mean": float("nan")}, {"p|awgn|0.1|kl_mean": "0.1"},
                                    {"p|awgn|0.1|kl_mean": True}, {"nonsense": 0.1}])
def test_a_baseline_with_non_finite_or_malformed_values_is_refused(tmp_path, values):
    import json

    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"fingerprint": {}, "values": values}))
    with pytest.raises(ConfigError, match="baseline.json: values."):
        load_baseline(path)


def test_one_rule_says_which_records_fail_the_gate():
    from qrobust.gate.verdict import fails

    for verdict, mode, failing in (("pass", "point", False), ("fail", "point", True), ("error", "familywise", True),
                                   ("inconclusive", "strict", True), ("inconclusive", "familywise", False),
                                   ("inconclusive", "lenient", False), ("xfail", "point", False),
                                   ("measured", "point", False)):
        assert fails({"verdict": verdict, "mode": mode}) is failing, (verdict, mode)


def test_an_error_record_fails_and_says_why():
    from qrobust.gate.verdict import error_record, fails

    record = error_record(test="t", pair="p", perturbation="awgn", level=0.1, metric="cam_cc", mode="point",
                          error="pair 'p' has no CAM target layer").as_dict()
    assert fails(record) and record["verdict"] == "error" and record["error"] == "pair 'p' has no CAM target layer"
    assert record["value"] is None and record["direction"] == ">=" and record["failed_by"] == "error"


def test_an_expected_failure_is_caught_by_any_failing_check_and_an_error_is_not_a_catch():
    from qrobust.gate.verdict import error_record, settle_expected_failure

    failing, _ = _verdict.judge(test="t", pair="p", perturbation="awgn", level=0.1, metric="kl_mean",
                                estimate=Estimate(0.9, (0.8, 1.0), 50, {}), tolerance=0.02, mode="point")
    passing, _ = _verdict.judge(test="t", pair="p", perturbation="awgn", level=0.1, metric="top1_delta",
                                estimate=Estimate(0.0, (-0.01, 0.01), 50, {}), tolerance=0.02, mode="point")
    settle_expected_failure([failing, passing], "known bad")
    assert (failing.verdict, passing.verdict) == ("xfail", "xfail")
    passing.verdict = "pass"
    settle_expected_failure([passing], "known bad")  # not caught: XPASS
    assert passing.verdict == "fail" and passing.failed_by == "xpass" and "known bad" in passing.extra["note"]
    error = error_record(test="t", pair="p", perturbation="awgn", level=0.1, metric="kl_mean", mode="point",
                         error="crashed")
    settle_expected_failure([error], "known bad")
    assert error.verdict == "error"
