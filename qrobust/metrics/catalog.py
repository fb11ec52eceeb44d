"""The metric catalogue: one entry per metric, read by the config validator, the verdicts, baselines,
the terminal summary and the report. Adding a metric means one entry here plus the code computing it.

Names follow one rule: ``*_delta`` is FP32 minus quantized (or the quantized model's loss), so positive
is worse and the tolerance is a maximum; agreement-type metrics are fractions where higher is better and
the tolerance is a minimum.
"""
from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("accuracy", "confidence", "cam", "saliency_gt", "explanation", "latency", "quantizer")
CASE_FAMILIES = ("accuracy", "confidence", "cam", "saliency_gt")  # computed per pair x perturbation x level


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    family: str
    description: str
    baseline_margin: float  # how far a value may move against a saved baseline (absolute, default)
    default_tolerance: float | None = None  # applies where a thresholds file sets none for a gated pair
    counted: bool = False  # a ratio of sample counts: compared exactly, fragility counted in samples

    @property
    def direction(self) -> str:
        """``>=`` when the tolerance is a minimum, ``<=`` when it is a maximum."""
        return ">=" if self.higher_is_better else "<="

    @property
    def case_metric(self) -> bool:
        return self.family in CASE_FAMILIES


# default tolerances: the sources are in the shipped thresholds template (qrobust/thresholds.yaml)
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("top1_delta", False, "accuracy", "top-1 accuracy, FP32 minus quantized", 0.005, 0.01, counted=True),
    Metric("top5_delta", False, "accuracy", "top-5 accuracy, FP32 minus quantized", 0.005, 0.01, counted=True),
    Metric("f1_delta", False, "accuracy", "F1 (macro by default), FP32 minus quantized", 0.005, 0.01),
    Metric("agreement", True, "accuracy", "fraction of samples with the same top-1 class", 0.005, 0.98, counted=True),
    Metric("kl_mean", False, "confidence", "mean KL(P_fp32 || P_quant), nats", 0.005, 0.02),
    Metric("kl_p95", False, "confidence", "95th percentile of per-sample KL, nats", 0.01, 0.05),
    Metric("logit_sqnr_db", True, "confidence", "mean per-sample SQNR of the twin's logits against FP32's, dB", 1.0),
    Metric("logit_cosine", True, "confidence", "mean per-sample cosine similarity of the logits", 0.001),
    Metric("cam_rmse", False, "cam", "RMSE between FP32 and quantized CAMs on [0, 1]", 0.01),
    Metric("cam_sim", True, "cam", "histogram intersection of the sum-normalized CAMs", 0.01),
    Metric("cam_cc", True, "cam", "Pearson correlation of the CAMs", 0.02),
    Metric("cam_kld", False, "cam", "saliency KLD of the quantized CAM from the FP32 CAM (10% trimmed mean)", 0.02),
    Metric("cam_sim_gt_delta", False, "saliency_gt",
           "SIM with the ground-truth saliency map, FP32 CAM minus quantized CAM", 0.01),
    Metric("cam_cc_gt_delta", False, "saliency_gt",
           "CC with the ground-truth saliency map, FP32 CAM minus quantized CAM", 0.02),
    Metric("cam_kld_gt_delta", False, "saliency_gt",
           "KLD from the ground-truth saliency map, quantized CAM minus FP32 CAM (10% trimmed mean)", 0.02),
    Metric("deletion_auc_delta", False, "explanation", "quantized minus FP32 deletion AUC, each with its own CAM", 0.01),
    Metric("insertion_auc_delta", False, "explanation", "FP32 minus quantized insertion AUC, each with its own CAM",
           0.01),
    Metric("wsol_iou_delta", False, "explanation", "FP32 minus quantized WSOL box IoU (datasets with boxes)", 0.05),
    Metric("activation_dice", True, "explanation",
           "Dice of the target layer's channel-mean activation histograms", 0.02),
    Metric("speedup", True, "latency", "FP32 latency / quantized latency, measured interleaved", 0.25),
    Metric("cam_speedup", True, "latency",
           "FP32 / quantized time of inference plus EigenCAM, measured interleaved", 0.25),
    Metric("quantized_fraction", True, "quantizer",
           "share of the FP32 model's Conv/Linear multiply-accumulates that the twin computes quantized", 0.01),
    Metric("quantizer_violations", False, "quantizer",
           "quantizers of the twin that break a quantizer property (qrobust.quant.properties)", 0.0, 0.0,
           counted=False),
)}


def names(*families: str) -> tuple[str, ...]:
    """Metric names of the given families (all metrics when none is given), in catalogue order."""
    return tuple(m.name for m in METRICS.values() if not families or m.family in families)


CASE_METRICS = names(*CASE_FAMILIES)
CAM_METRICS = names("cam", "saliency_gt")  # a case computes CAMs only when it gates one of these
EXPLANATION_METRICS = names("explanation")
LATENCY_METRICS = names("latency")


def default_tolerances() -> dict[str, float]:
    """The tolerances a gated pair gets where the thresholds file sets none (documented in the README)."""
    return {m.name: m.default_tolerance for m in METRICS.values() if m.default_tolerance is not None}
