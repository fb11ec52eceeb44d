"""Confidence gate: KL(P_fp32 || P_quant) mean and 95th percentile per level."""

import pytest


@pytest.mark.qrobust_metrics("kl_mean")
def test_kl_mean(qrobust_case, qrobust_check):
    qrobust_check.metric(qrobust_case, "kl_mean")


@pytest.mark.qrobust_metrics("kl_p95")
def test_kl_p95(qrobust_case, qrobust_check):
    qrobust_check.metric(qrobust_case, "kl_p95")
