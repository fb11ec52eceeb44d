"""Accuracy gate: paired top-1 / top-5 / F1 deltas and top-1 agreement, per pair x perturbation x level."""

import pytest


@pytest.mark.qrobust_metrics("top1_delta")
def test_top1_delta(qrobust_case, qrobust_check):
    qrobust_check.metric(qrobust_case, "top1_delta")


@pytest.mark.qrobust_metrics("top5_delta")
def test_top5_delta(qrobust_case, qrobust_check):
    qrobust_check.metric(qrobust_case, "top5_delta")


@pytest.mark.qrobust_metrics("f1_delta")
def test_f1_delta(qrobust_case, qrobust_check):
    qrobust_check.metric(qrobust_case, "f1_delta")


@pytest.mark.qrobust_metrics("agreement")
def test_agreement(qrobust_case, qrobust_check):
    qrobust_check.metric(qrobust_case, "agreement")
