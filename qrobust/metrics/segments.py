"""Where an average hides a regression: the worst class's top-1 delta, the calibration of confidence
(ECE, 15 bins) and the decisions at a deployment threshold, FP32 against the twin.

* ``class_top1_delta``: per class c, recall_fp32(c) - recall_twin(c) = (b_c - c_c) / n_c on the samples
  labelled c (paired, as ``top1_delta``). The worst class is reported; its interval is Newcombe's at a
  confidence Bonferroni-widened over the K classes judged (1 - (1 - confidence) / K), so picking the
  worst of K does not inflate false alarms, and the familywise decision's level widens it further.
  Classes with fewer than ``MIN_CLASS_SAMPLES`` samples are not judged; when any exists the check cannot
  pass (it is inconclusive at best, never silently passed).
* ``ece_delta``: ECE(twin) - ECE(FP32), ECE = sum over 15 equal-width confidence bins (k/15, (k+1)/15]
  of |sum(correct - confidence)| / n (Guo et al. 2017), top-1 confidence and correctness per model.
  Cluster-bootstrap interval from the same Poisson weights as every other mean.
* ``operating_point_flips``: at a user's threshold tau (YAML ``operating_point``), the share of samples
  where "top-1 confidence >= tau" differs between FP32 and the twin: the deployed accept/reject decision
  that changed.

ECE and the operating point need each sample's confidences (26 bytes per sample, kept like the CAM
trimmed mean's values), since a binned absolute value does not stream into bootstrap sums.
"""
from __future__ import annotations

from functools import partial

import torch

from qrobust.metrics.stats import (
    CONFIDENCE, Estimate, bootstrap_estimate, clopper_pearson_interval, paired_interval, poisson_weights,
    wilson_interval,
)

ECE_BINS = 15
MIN_CLASS_SAMPLES = 10
CHUNK = 2048  # samples per bootstrap block (the weights of 1,000 replicates x 2,048 samples: 16 MB)


def ece_bins(confidence: torch.Tensor) -> torch.Tensor:
    """The bin of each top-1 confidence: (k/15, (k+1)/15] is bin k (a confidence of 0 joins bin 0)."""
    return (torch.ceil(confidence.double() * ECE_BINS).long() - 1).clamp(0, ECE_BINS - 1)


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """ECE of one model's top-1 confidences and correctness (15 equal-width bins)."""
    gap = torch.zeros(ECE_BINS, dtype=torch.float64).index_add_(0, ece_bins(confidence),
                                                                correct.double() - confidence.double())
    return float(gap.abs().sum() / max(1, len(confidence)))


class ConfidenceRecord:
    """Each sample's top-1 confidence and correctness for both models, and its bootstrap group."""

    def __init__(self, seed: int, replicates: int, operating_point: float | None = None):
        self.seed, self.replicates, self.operating_point = seed, replicates, operating_point
        self.columns: dict[str, list[torch.Tensor]] = {k: [] for k in ("fp_conf", "q_conf", "fp_right", "q_right",
                                                                      "groups")}

    def update(self, fp_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> None:
        for model, logits in (("fp", fp_logits), ("q", q_logits)):
            probs = torch.softmax(logits.double(), 1)
            conf, pred = probs.max(1)
            self.columns[f"{model}_conf"].append(conf)
            self.columns[f"{model}_right"].append(pred == labels)
        self.columns["groups"].append(groups.long())

    def merge(self, other: ConfidenceRecord) -> None:
        for key, parts in other.columns.items():
            self.columns[key].extend(parts)

    def state(self) -> dict:
        return {"config": [self.seed, self.replicates, self.operating_point],
                "columns": {k: torch.cat(v) if v else torch.zeros(0) for k, v in self.columns.items()}}

    @classmethod
    def from_state(cls, state: dict) -> ConfidenceRecord:
        record = cls(*state["config"])
        record.columns = {k: [v] if len(v) else [] for k, v in state["columns"].items()}
        return record

    def _column(self, key: str) -> torch.Tensor:
        return torch.cat(self.columns[key])

    def results(self) -> dict[str, Estimate]:
        if not self.columns["groups"]:
            return {}
        fp_conf, q_conf = self._column("fp_conf").double(), self._column("q_conf").double()
        fp_right, q_right, groups = self._column("fp_right"), self._column("q_right"), self._column("groups")
        n = len(groups)
        out = {}
        ece_fp, ece_q = expected_calibration_error(fp_conf, fp_right), expected_calibration_error(q_conf, q_right)
        gaps = {m: torch.zeros(self.replicates, ECE_BINS, dtype=torch.float64) for m in ("fp", "q")}
        weight = torch.zeros(self.replicates, dtype=torch.float64)
        for start in range(0, n, CHUNK):  # per replicate: the bins' weighted sums of (correct - confidence)
            part = slice(start, start + CHUNK)
            weights = poisson_weights(self.seed, groups[part], self.replicates)
            weight += weights.sum(1)
            for model, conf, right in (("fp", fp_conf, fp_right), ("q", q_conf, q_right)):
                bins = torch.nn.functional.one_hot(ece_bins(conf[part]), ECE_BINS).double()
                gaps[model] += weights @ (bins * (right[part].double() - conf[part])[:, None])
        per_replicate = {m: gaps[m].abs().sum(1) / weight.clamp_min(1e-300) for m in gaps}
        boot = torch.where(weight > 0, per_replicate["q"] - per_replicate["fp"], torch.full_like(weight, float("nan")))
        out["ece_fp32"] = Estimate(ece_fp, None, n, {"bins": ECE_BINS})
        out["ece_quant"] = Estimate(ece_q, None, n, {"bins": ECE_BINS})
        out["ece_delta"] = bootstrap_estimate(ece_q - ece_fp, boot, n, {"bins": ECE_BINS, "ece_fp32": ece_fp,
                                                                         "ece_quant": ece_q})
        if self.operating_point is not None:
            tau = self.operating_point
            flips = int(((fp_conf >= tau) != (q_conf >= tau)).sum())
            out["operating_point_flips"] = Estimate(
                flips / n, wilson_interval(flips, n), n,
                {"operating_point": tau, "flips": flips, "fp32_accepted": int((fp_conf >= tau).sum()),
                 "quant_accepted": int((q_conf >= tau).sum())},
                partial(clopper_pearson_interval, flips, n))
        return out


def worst_class(support: torch.Tensor, fp_right: torch.Tensor, q_right: torch.Tensor, b: torch.Tensor,
                c: torch.Tensor) -> Estimate | None:
    """``class_top1_delta`` from per-class counts (see the module docstring); None with no labelled sample.
    Its n is the case's samples, as every record's; the worst class's own count is ``details["n_class"]``."""
    present = (support > 0).nonzero().flatten().tolist()
    if not present:
        return None
    judged = [k for k in present if support[k] >= MIN_CLASS_SAMPLES]
    too_few = [k for k in present if support[k] < MIN_CLASS_SAMPLES]
    pool = judged or present
    delta = {k: float((b[k] - c[k]) / support[k]) for k in pool}
    worst = max(pool, key=lambda k: (delta[k], -int(support[k])))
    counts = [int(t[worst]) for t in (fp_right, q_right, b, c, support)]
    classes = len(pool)

    def interval_at(confidence: float) -> tuple[float, float]:
        return paired_interval(*counts, confidence=1 - (1 - confidence) / classes)

    details = {"class": worst, "n_class": counts[4], "b": counts[2], "c": counts[3], "classes_judged": len(judged),
               "worst": sorted(([k, round(delta[k], 4)] for k in pool), key=lambda r: -r[1])[:5]}
    if too_few:
        details["unjudged"] = (f"{len(too_few)} class(es) have fewer than {MIN_CLASS_SAMPLES} samples "
                               f"(first: {too_few[:5]}): their regressions cannot be judged")
    return Estimate(delta[worst], interval_at(CONFIDENCE), int(support.sum()), details, interval_at)
