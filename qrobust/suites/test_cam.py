"""CAM gate: does the quantized model look where FP32 looks? RMSE / SIM / CC / KLD of the two maps.

Real int8 twins use EigenCAM (gradient-free, activations dequantized), fake-quant twins Grad-CAM++
(seed 001); the FP32 top-1 is the target class of both maps.
"""

import pytest


@pytest.mark.qrobust_metrics("cam_rmse")
def test_cam_rmse(qrobust_case, qrobust_check):
    qrobust_check.metric(qrobust_case, "cam_rmse")


@pytest.mark.qrobust_metrics("cam_sim")
def test_cam_sim(qrobust_case, qrobust_check):
    qrobust_check.metric(qrobust_case, "cam_sim")


@pytest.mark.qrobust_metrics("cam_cc")
def test_cam_cc(qrobust_case, qrobust_check):
    qrobust_check.metric(qrobust_case, "cam_cc")


@pytest.mark.qrobust_metrics("cam_kld")
def test_cam_kld(qrobust_case, qrobust_check):
    qrobust_check.metric(qrobust_case, "cam_kld")
