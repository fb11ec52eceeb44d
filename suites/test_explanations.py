"""Explanation gate (seed 002): does the quantized model's own CAM explain as well as FP32's?

Deletion / insertion AUC deltas (and WSOL IoU where the dataset has boxes) on clean images.
"""


def test_explanations(qrobust_explanation_pair, qrobust_check):
    qrobust_check.explanations(qrobust_explanation_pair)
