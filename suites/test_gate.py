"""The gate's checks: one test per case (pair x perturbation x level) and metric with a tolerance, all
generated from the plan and the metric catalogue (``qrobust.metrics.catalog``), so every tolerance a
thresholds file sets is judged here; a metric added to the catalogue needs no suite code."""


def test_metric(qrobust_gate_check, qrobust_check):
    qrobust_check.judge(qrobust_gate_check)
