"""Metrics: the catalogue, classification/confidence and saliency metrics, statistics, timing.

The names below were the flat ``qrobust.metrics`` module of 0.1 and stay importable from here.
"""
from qrobust.metrics.catalog import METRICS, Metric
from qrobust.metrics.classification import PairMetrics, f1_from_counts, kl_per_sample, topk_correct
from qrobust.metrics.saliency import (
    KLD_EPS, CamAgreement, activation_stats, cam_cc, cam_kld, cam_rmse, cam_sim,
)
from qrobust.metrics.stats import Estimate

__all__ = ["KLD_EPS", "METRICS", "CamAgreement", "Estimate", "Metric", "PairMetrics", "activation_stats", "cam_cc",
           "cam_kld", "cam_rmse", "cam_sim", "f1_from_counts", "kl_per_sample", "topk_correct"]
