"""The metric catalogue: one entry per metric, read by the config validator, the plan (one gate test
per case and per-case metric), the verdicts, baselines, the terminal summary and the report. Adding a
metric means one entry here plus the code computing it (README, "Development").

Names follow one rule: ``*_delta`` is FP32 minus quantized (or the quantized model's loss), so positive
is worse and the tolerance is a maximum; agreement-type metrics are fractions where higher is better and
the tolerance is a minimum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

FAMILIES = ("accuracy", "confidence", "layer", "cam", "saliency_gt", "explanation", "latency", "quantizer")
CASE_FAMILIES = ("accuracy", "confidence", "layer", "cam", "saliency_gt")  # computed per pair x perturbation x level
INF = math.inf


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    family: str
    description: str
    baseline_margin: float  # how far a value may move against a saved baseline (absolute, default)
    default_tolerance: float | None = None  # applies where a thresholds file sets none for a gated pair
    counted: str = ""  # "paired" (FP32/twin outcomes b, c) or "agreement" (top-1 flips): a ratio of sample
    # counts, compared exactly, fragility counted in samples
    values: tuple[float, float] = (-INF, INF)  # the values the metric can take, ends included
    unit: str = "score"

    @property
    def direction(self) -> str:
        """``>=`` when the tolerance is a minimum, ``<=`` when it is a maximum."""
        return ">=" if self.higher_is_better else "<="

    @property
    def case_metric(self) -> bool:
        return self.family in CASE_FAMILIES

    @property
    def needs_cam(self) -> bool:
        """Computed from CAMs of both models (a pair needs a CAM layer, or a layer-free method)."""
        return self.family in ("cam", "saliency_gt")

    @property
    def needs_layers(self) -> bool:
        """Read off the twin's quantized layers during the evaluation's forwards (a live torch twin)."""
        return self.family == "layer"

    @property
    def needs_saliency(self) -> bool:
        """Compared with ground-truth saliency maps (a dataset needs them)."""
        return self.family == "saliency_gt"

    def tolerance_problem(self, tolerance: float) -> str | None:
        """Why no value of the metric could meet or could miss ``tolerance``, or None: a minimum at or
        below the lowest value always passes, above the highest always fails (a maximum the reverse)."""
        low, high = self.values
        if not math.isfinite(tolerance):
            return "must be finite"
        if self.higher_is_better and tolerance <= low or not self.higher_is_better and tolerance >= high:
            return f"no value of {self.name} can miss it ({self.name} runs from {low:g} to {high:g})"
        if self.higher_is_better and tolerance > high or not self.higher_is_better and tolerance < low:
            return f"no value of {self.name} can meet it ({self.name} runs from {low:g} to {high:g})"
        return None


# default tolerances: the sources are in the built-in gate's thresholds.yaml (the repository's top level)
FRACTION, DELTA = (0.0, 1.0), (-1.0, 1.0)
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("top1_delta", False, "accuracy", "top-1 accuracy, FP32 minus quantized", 0.005, 0.01, counted="paired",
           values=DELTA, unit="fraction of samples"),
    Metric("top5_delta", False, "accuracy", "top-5 accuracy, FP32 minus quantized", 0.005, 0.01, counted="paired",
           values=DELTA, unit="fraction of samples"),
    Metric("f1_delta", False, "accuracy", "F1 (macro by default), FP32 minus quantized", 0.005, 0.01, values=DELTA),
    Metric("agreement", True, "accuracy", "fraction of samples with the same top-1 class", 0.005, 0.98,
           counted="agreement", values=FRACTION, unit="fraction of samples"),
    Metric("class_top1_delta", False, "accuracy",
           "the worst class's top-1 accuracy (recall), FP32 minus quantized; interval widened over the classes", 0.02,
           values=DELTA, unit="fraction of the class's samples"),
    Metric("kl_mean", False, "confidence", "mean KL(P_fp32 || P_quant), nats", 0.005, 0.02, values=(0, INF), unit="nats"),
    Metric("kl_p95", False, "confidence", "95th percentile of per-sample KL, nats", 0.01, 0.05, values=(0, INF),
           unit="nats"),
    Metric("logit_sqnr_db", True, "confidence", "mean per-sample SQNR of the twin's logits against FP32's, dB", 1.0,
           unit="dB"),
    Metric("logit_cosine", True, "confidence", "mean per-sample cosine similarity of the logits", 0.001,
           values=(-1, 1)),
    Metric("ece_delta", False, "confidence", "expected calibration error (15 bins), quantized minus FP32", 0.005,
           values=DELTA),
    Metric("operating_point_flips", False, "confidence",
           "share of samples whose 'top-1 confidence >= operating_point' decision differs", 0.005, values=FRACTION,
           unit="fraction of samples"),
    Metric("clip_excess", False, "layer",
           "worst quantized activation's share of values its calibrated range clips, minus that share on the "
           "calibration split", 0.005, values=DELTA, unit="fraction of values"),
    Metric("layer_sqnr_db", True, "layer", "worst quantized layer's mean per-sample output SQNR against FP32's, dB",
           1.0, values=(-INF, 120.0), unit="dB"),
    Metric("cam_rmse", False, "cam", "RMSE between FP32 and quantized CAMs on [0, 1]", 0.01, values=FRACTION),
    Metric("cam_sim", True, "cam", "histogram intersection of the sum-normalized CAMs", 0.01, values=FRACTION),
    Metric("cam_cc", True, "cam", "Pearson correlation of the CAMs", 0.02, values=(-1, 1)),
    Metric("cam_kld", False, "cam", "saliency KLD of the quantized CAM from the FP32 CAM (10% trimmed mean)", 0.02,
           values=(0, INF), unit="nats"),
    Metric("cam_sim_gt_delta", False, "saliency_gt",
           "SIM with the ground-truth saliency map, FP32 CAM minus quantized CAM", 0.01, values=DELTA),
    Metric("cam_cc_gt_delta", False, "saliency_gt",
           "CC with the ground-truth saliency map, FP32 CAM minus quantized CAM", 0.02, values=(-2, 2)),
    Metric("cam_kld_gt_delta", False, "saliency_gt",
           "KLD from the ground-truth saliency map, quantized CAM minus FP32 CAM (10% trimmed mean)", 0.02, unit="nats"),
    Metric("deletion_auc_delta", False, "explanation", "quantized minus FP32 deletion AUC, each with its own CAM", 0.01,
           values=DELTA),
    Metric("insertion_auc_delta", False, "explanation", "FP32 minus quantized insertion AUC, each with its own CAM",
           0.01, values=DELTA),
    Metric("wsol_iou_delta", False, "explanation", "FP32 minus quantized WSOL box IoU (datasets with boxes)", 0.05,
           values=DELTA),
    Metric("activation_dice", True, "explanation",
           "Dice of the target layer's channel-mean activation histograms", 0.02, values=FRACTION),
    Metric("speedup", True, "latency", "FP32 latency / quantized latency, measured interleaved", 0.25,
           values=(0, INF), unit="ratio"),
    Metric("cam_speedup", True, "latency",
           "FP32 / quantized time of inference plus EigenCAM, measured interleaved", 0.25, values=(0, INF), unit="ratio"),
    Metric("quantized_fraction", True, "quantizer",
           "share of the FP32 model's Conv/Linear multiply-accumulates that the twin computes quantized", 0.01,
           values=FRACTION, unit="fraction of MACs"),
    Metric("quantizer_violations", False, "quantizer",
           "quantizers of the twin that break a quantizer property (qrobust.quant.properties)", 0.0, 0.0,
           values=(0, INF), unit="quantizers"),
)}


def names(*families: str) -> tuple[str, ...]:
    """Metric names of the given families (all metrics when none is given), in catalogue order."""
    return tuple(m.name for m in METRICS.values() if not families or m.family in families)


CASE_METRICS = names(*CASE_FAMILIES)
CAM_METRICS = names("cam", "saliency_gt")  # a case computes CAMs only when it gates one of these
LAYER_METRICS = names("layer")  # a case taps the twin's layers only when it gates one of these
EXPLANATION_METRICS = names("explanation")
LATENCY_METRICS = names("latency")


def default_tolerances() -> dict[str, float]:
    """The tolerances a gated pair gets where the thresholds file sets none (documented in the README)."""
    return {m.name: m.default_tolerance for m in METRICS.values() if m.default_tolerance is not None}
