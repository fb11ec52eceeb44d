"""Classification and confidence metrics for an FP32/quantized pair, as streaming state.

Deltas are FP32 minus quantized: positive means the quantized model is worse. ``PairMetrics`` keeps
counts, per-class tp/fp/fn, a log-scale KL histogram and O(replicates) bootstrap sums, so its memory
does not grow with the dataset; per-sample arrays are kept only when asked (``keep_samples``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qrobust.errors import invalid
from qrobust.stats import (
    PairedDelta, paired_delta, percentile_interval, poisson_weights, quantile_rank_interval, wilson_interval,
)

F1_AVERAGES = ("macro", "micro", "weighted")


def kl_per_sample(fp32_logits: torch.Tensor, quant_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_fp32 || P_quant) per sample, natural log, from logits via log_softmax (float64)."""
    log_p = F.log_softmax(fp32_logits.double(), dim=1)
    log_q = F.log_softmax(quant_logits.double(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).clamp_min(0.0)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Whether the label is among the top ``k`` logits (k capped at the class count)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


def f1_from_counts(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, average: str = "macro") -> torch.Tensor:
    """F1 from per-class counts (last dim = classes), matching sklearn.metrics.f1_score.

    As sklearn does, classes that appear neither in the labels nor in the predictions are left out of
    the macro average, and a class with no true or predicted sample scores 0.
    """
    if average not in F1_AVERAGES:
        raise invalid("average", average, f"must be one of {', '.join(F1_AVERAGES)}")
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    if average == "micro":
        denom = 2 * tp.sum(-1) + fp.sum(-1) + fn.sum(-1)
        return torch.where(denom > 0, 2 * tp.sum(-1) / denom.clamp_min(1e-300), torch.zeros_like(denom))
    denom = 2 * tp + fp + fn
    per_class = torch.where(denom > 0, 2 * tp / denom.clamp_min(1e-300), torch.zeros_like(denom))
    if average == "macro":
        present = (denom > 0).double()
        return (per_class * present).sum(-1) / present.sum(-1).clamp_min(1)
    support = tp + fn
    return (per_class * support).sum(-1) / support.sum(-1).clamp_min(1e-300)


class LogHistogram:
    """Quantiles of non-negative values from a log-spaced histogram (relative resolution ~1.2%)."""

    def __init__(self, low_exp: float = -12.0, high_exp: float = 4.0, bins_per_decade: int = 200):
        self.low_exp, self.high_exp, self.per_decade = low_exp, high_exp, bins_per_decade
        self.counts = torch.zeros(int((high_exp - low_exp) * bins_per_decade) + 2, dtype=torch.int64)

    def add(self, values: torch.Tensor) -> None:
        logs = torch.log10(values.double().clamp_min(10**self.low_exp))
        idx = ((logs - self.low_exp) * self.per_decade).floor().long() + 1
        idx = torch.where(values <= 10**self.low_exp, torch.zeros_like(idx), idx)
        self.counts += torch.bincount(idx.clamp_(0, len(self.counts) - 1), minlength=len(self.counts))

    def value_at_rank(self, rank: int) -> float:
        """The value of the ``rank``-th smallest observation (1-based), at its bin's geometric centre."""
        idx = int(torch.searchsorted(torch.cumsum(self.counts, 0), torch.tensor(rank)))
        if idx == 0:
            return 0.0
        return 10 ** (self.low_exp + (idx - 0.5) / self.per_decade)

    def quantile(self, q: float) -> float:
        return self.value_at_rank(max(1, math.ceil(q * int(self.counts.sum()))))


@dataclass(frozen=True)
class Estimate:
    """One metric of one case: value, 95% interval (or None), sample count and supporting numbers."""

    value: float
    interval: tuple[float, float] | None
    n: int
    details: dict


class PairMetrics:
    """Streaming accuracy / F1 / agreement / KL state for one pair on one case."""

    def __init__(self, num_classes: int, seed: int = 0, replicates: int = 1000, f1_average: str = "macro",
                 keep_samples: bool = False):
        if num_classes < 1:
            raise invalid("num_classes", num_classes, "must be >= 1")
        if f1_average not in F1_AVERAGES:
            raise invalid("f1_average", f1_average, f"must be one of {', '.join(F1_AVERAGES)}")
        self.k, self.seed, self.replicates, self.f1_average = num_classes, seed, replicates, f1_average
        self.n = 0
        self.counts = dict.fromkeys(("fp_top1", "q_top1", "b1", "c1", "fp_top5", "q_top5", "b5", "c5", "agree"), 0)
        zeros = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.class_counts = {m: {c: zeros(num_classes) for c in ("tp", "fp", "fn")} for m in ("fp", "q")}
        self.boot_counts = {m: {c: zeros(replicates, num_classes) for c in ("tp", "fp", "fn")} for m in ("fp", "q")}
        self.boot_weight = zeros(replicates)
        self.boot_kl = zeros(replicates)
        self.kl_sum, self.kl_max = 0.0, 0.0
        self.kl_hist = LogHistogram()
        self.nonfinite = {"fp32": 0, "quantized": 0}
        self.nonfinite_ids: list[int] = []
        self.samples: list[torch.Tensor] | None = [] if keep_samples else None

    def update(self, fp_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
               groups: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add a batch; ``weights`` are this batch's bootstrap weights when the caller shares them."""
        if weights is None:
            weights = poisson_weights(self.seed, groups.cpu(), self.replicates)
        fp_ok = torch.isfinite(fp_logits).all(dim=1)
        q_ok = torch.isfinite(q_logits).all(dim=1)
        self.nonfinite["fp32"] += int((~fp_ok).sum())
        self.nonfinite["quantized"] += int((~q_ok).sum())
        bad = ~(fp_ok & q_ok)
        if bad.any():
            self.nonfinite_ids.extend(ids[bad].tolist()[: max(0, 10 - len(self.nonfinite_ids))])
            keep = ~bad
            fp_logits, q_logits, labels, ids, groups = fp_logits[keep], q_logits[keep], labels[keep], ids[keep], groups[keep]
            weights = weights[:, keep.cpu()]
        if len(labels) == 0:
            return
        fp_logits, q_logits = fp_logits.detach().float().cpu(), q_logits.detach().float().cpu()
        labels, ids, groups = labels.cpu(), ids.cpu(), groups.cpu()
        self.n += len(labels)
        fp_pred, q_pred = fp_logits.argmax(1), q_logits.argmax(1)
        for suffix, fp_right, q_right in (("1", fp_pred == labels, q_pred == labels),
                                          ("5", topk_correct(fp_logits, labels, 5), topk_correct(q_logits, labels, 5))):
            self.counts[f"fp_top{suffix}"] += int(fp_right.sum())
            self.counts[f"q_top{suffix}"] += int(q_right.sum())
            self.counts[f"b{suffix}"] += int((fp_right & ~q_right).sum())
            self.counts[f"c{suffix}"] += int((~fp_right & q_right).sum())
        self.counts["agree"] += int((fp_pred == q_pred).sum())
        for model, pred in (("fp", fp_pred), ("q", q_pred)):
            right = pred == labels
            for name, cls, mask in (("tp", labels, right), ("fp", pred, ~right), ("fn", labels, ~right)):
                self.class_counts[model][name].index_add_(0, cls[mask], torch.ones(int(mask.sum()), dtype=torch.float64))
                self.boot_counts[model][name].index_add_(1, cls[mask], weights[:, mask])
        kl = kl_per_sample(fp_logits, q_logits)
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.kl_hist.add(kl)
        self.boot_weight += weights.sum(dim=1)
        self.boot_kl += weights @ kl
        if self.samples is not None:
            self.samples.append(torch.stack([ids.double(), groups.double(), labels.double(), fp_pred.double(),
                                             q_pred.double(), kl], dim=1))

    # ---- results -----------------------------------------------------------------------------------
    def _require_samples(self) -> None:
        if self.n == 0:
            raise invalid("samples", 0, "no finite outputs were evaluated: nothing to measure")

    def accuracy_delta(self, k: int = 1) -> PairedDelta:
        self._require_samples()
        c = self.counts
        return paired_delta(c[f"fp_top{k}"], c[f"q_top{k}"], c[f"b{k}"], c[f"c{k}"], self.n)

    def _f1(self, counts: dict) -> torch.Tensor:
        return f1_from_counts(counts["tp"], counts["fp"], counts["fn"], self.f1_average)

    def results(self) -> dict[str, Estimate]:
        """Every metric of this state, by name."""
        self._require_samples()
        n, c = self.n, self.counts
        out: dict[str, Estimate] = {}
        for k in (1, 5):
            d = self.accuracy_delta(k)
            out[f"top{k}_delta"] = Estimate(d.delta, d.interval, n, {"b": d.b, "c": d.c, "mcnemar_p": d.p_value})
            out[f"top{k}_fp32"] = Estimate(c[f"fp_top{k}"] / n, wilson_interval(c[f"fp_top{k}"], n), n, {})
            out[f"top{k}_quant"] = Estimate(c[f"q_top{k}"] / n, wilson_interval(c[f"q_top{k}"], n), n, {})
        f1_fp, f1_q = float(self._f1(self.class_counts["fp"])), float(self._f1(self.class_counts["q"]))
        boot = self._f1(self.boot_counts["fp"]) - self._f1(self.boot_counts["q"])
        boot = torch.where(self.boot_weight > 0, boot, torch.full_like(boot, float("nan")))
        out["f1_fp32"] = Estimate(f1_fp, None, n, {"average": self.f1_average})
        out["f1_quant"] = Estimate(f1_q, None, n, {"average": self.f1_average})
        out["f1_delta"] = Estimate(f1_fp - f1_q, percentile_interval(boot), n, {"average": self.f1_average})
        agree = c["agree"]
        out["agreement"] = Estimate(agree / n, wilson_interval(agree, n), n, {"flips": n - agree})
        out["flip_rate"] = Estimate(1 - agree / n, tuple(1 - v for v in reversed(wilson_interval(agree, n))), n,
                                    {"flips": n - agree})
        boot_mean = self.boot_kl / self.boot_weight.clamp_min(1e-300)
        boot_mean = torch.where(self.boot_weight > 0, boot_mean, torch.full_like(boot_mean, float("nan")))
        out["kl_mean"] = Estimate(self.kl_sum / n, percentile_interval(boot_mean), n, {})
        lo_rank, hi_rank = quantile_rank_interval(n, 0.95)
        out["kl_p95"] = Estimate(self.kl_hist.quantile(0.95),
                                 (self.kl_hist.value_at_rank(lo_rank), self.kl_hist.value_at_rank(hi_rank)), n,
                                 {"resolution": "log histogram, 200 bins per decade"})
        out["kl_max"] = Estimate(self.kl_max, None, n, {})
        return out

    def sample_table(self) -> torch.Tensor:
        """(n, 6) float64 rows id, group, label, fp32 prediction, quantized prediction, KL (if kept)."""
        if self.samples is None:
            raise invalid("keep_samples", False, "per-sample rows were not kept for this case")
        return torch.cat(self.samples) if self.samples else torch.zeros(0, 6, dtype=torch.float64)


# ---- saliency-map comparison (per image, batched over the first dim) -----------------------------------
KLD_EPS = 2.2204e-16


def _flat(maps: torch.Tensor) -> torch.Tensor:
    if maps.dim() < 2:
        raise invalid("maps", tuple(maps.shape), "expected (N, H, W) maps")
    return maps.flatten(1).double()


def cam_rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(mean((a - b)^2)) on [0, 1] maps (seed 002 reports it on the 0-255 scale: x 255)."""
    return (_flat(a) - _flat(b)).pow(2).mean(dim=1).sqrt()


def _normalized(maps: torch.Tensor) -> torch.Tensor:
    flat = _flat(maps)
    return flat / flat.sum(dim=1, keepdim=True).clamp_min(1e-300)


def cam_sim(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Histogram intersection of the sum-normalized maps: 1 for identical distributions, 0 for disjoint."""
    return torch.minimum(_normalized(p), _normalized(q)).sum(dim=1)


def cam_cc(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over pixels (NaN when a map is constant: such maps are degenerate)."""
    a, b = _flat(p), _flat(q)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def cam_kld(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """sum R log(eps + R / (C + eps)) with R, C sum-normalized (Bylinskii et al.'s saliency KLD).

    Seed 001's eq. 7 weights the log by the CAM instead of the reference; we follow the MIT saliency
    benchmark, with the FP32 map (or a ground-truth saliency map) as the reference.
    """
    r, c = _normalized(reference), _normalized(candidate)
    return (r * torch.log(KLD_EPS + r / (c + KLD_EPS))).sum(dim=1)


CAM_METRICS = {"cam_rmse": cam_rmse, "cam_sim": cam_sim, "cam_cc": cam_cc, "cam_kld": cam_kld}


# ---- activation statistics (seed 002) -------------------------------------------------------------------
def activation_stats(fp32: torch.Tensor, quant: torch.Tensor, bins: int = 256) -> dict:
    """Entropy (bits) of a 256-bin histogram on a range shared by both models, std, sparsity (% zeros),
    and the Sorensen-Dice overlap of the two normalized histograms."""
    a, b = fp32.detach().double().flatten(), quant.detach().double().flatten()
    if a.numel() == 0 or b.numel() == 0:
        raise invalid("activations", (a.numel(), b.numel()), "need non-empty activations")
    lo, hi = float(torch.minimum(a.min(), b.min())), float(torch.maximum(a.max(), b.max()))
    if hi <= lo:
        hi = lo + 1.0
    hists = [torch.histc(t, bins=bins, min=lo, max=hi) for t in (a, b)]
    probs = [h / h.sum() for h in hists]
    out = {}
    for name, t, p in (("fp32", a, probs[0]), ("quantized", b, probs[1])):
        out[name] = {"entropy": float(-(p * torch.log2(p + 1e-10)).sum()), "std": float(t.std()),
                     "sparsity": float(100.0 * (t == 0).sum() / t.numel())}
    out["dice"] = float(2 * torch.minimum(probs[0], probs[1]).sum() / (probs[0].sum() + probs[1].sum()))
    out["histograms"] = {"range": [lo, hi], "fp32": probs[0].tolist(), "quantized": probs[1].tolist()}
    return out


# metric -> (function of (ground truth, map), whether lower means worse); KLD takes the GT as reference
GT_METRICS = {"cam_sim": (cam_sim, True), "cam_cc": (cam_cc, True), "cam_kld": (cam_kld, False)}


class CamAgreement:
    """Streaming CAM agreement of one pair on one case: per-metric means with cluster-bootstrap intervals.

    Pairs where either map is degenerate (constant after ReLU) are counted as their own outcome and left
    out of the means; when every map is degenerate the metrics are NaN, which fails a gate.
    """

    def __init__(self, method: str, seed: int = 0, replicates: int = 1000, fraction: float = 0.05,
                 capacity: int = 1, overlays: int = 2):
        self.method, self.seed, self.replicates, self.fraction = method, seed, replicates, fraction
        self.capacity, self.overlay_count = max(1, capacity), overlays
        self.sums = dict.fromkeys(CAM_METRICS, 0.0)
        self.boot = {name: torch.zeros(replicates, dtype=torch.float64) for name in CAM_METRICS}
        self.boot_weight = torch.zeros(replicates, dtype=torch.float64)
        self.n = 0
        self.degenerate = {"fp32": 0, "quantized": 0, "both": 0}
        self.gt = {name: {"fp32": 0.0, "quantized": 0.0, "boot": torch.zeros(replicates, dtype=torch.float64)}
                   for name in GT_METRICS}
        self.n_gt = 0
        self.gt_boot_weight = torch.zeros(replicates, dtype=torch.float64)
        self.most_different: list[tuple[float, int]] = []  # (rmse, id), the top ``fraction`` kept
        self.overlays: list[dict] = []  # pixels and both maps of the few most different images

    def update(self, ref: tuple[torch.Tensor, torch.Tensor], cand: tuple[torch.Tensor, torch.Tensor],
               ids: torch.Tensor, weights: torch.Tensor, pixels: torch.Tensor,
               saliency: torch.Tensor | None = None) -> None:
        (ref_maps, ref_deg), (cand_maps, cand_deg) = ref, cand
        ref_deg, cand_deg = ref_deg.cpu(), cand_deg.cpu()
        self.degenerate["fp32"] += int((ref_deg & ~cand_deg).sum())
        self.degenerate["quantized"] += int((cand_deg & ~ref_deg).sum())
        self.degenerate["both"] += int((ref_deg & cand_deg).sum())
        valid = ~(ref_deg | cand_deg)
        if not valid.any():
            return
        ref_maps, cand_maps = ref_maps.detach().cpu()[valid], cand_maps.detach().cpu()[valid]
        ids, w = ids.cpu()[valid], weights[:, valid]
        self.n += int(valid.sum())
        self.boot_weight += w.sum(dim=1)
        values = {name: fn(ref_maps, cand_maps) for name, fn in CAM_METRICS.items()}
        for name, v in values.items():
            self.sums[name] += float(v.sum())
            self.boot[name] += w @ v
        if saliency is not None:
            self._update_ground_truth(saliency.detach().cpu()[valid], ref_maps, cand_maps, w)
        rmse = values["cam_rmse"]
        merged = self.most_different + list(zip(rmse.tolist(), ids.tolist()))
        self.most_different = sorted(merged, reverse=True)[: self.capacity]
        pix = pixels.detach().cpu()[valid]
        for j in rmse.argsort(descending=True)[: self.overlay_count].tolist():
            self.overlays.append({"id": int(ids[j]), "rmse": float(rmse[j]), "pixels": pix[j],
                                  "fp32": ref_maps[j], "quantized": cand_maps[j]})
        self.overlays = sorted(self.overlays, key=lambda o: -o["rmse"])[: self.overlay_count]

    def _update_ground_truth(self, gt: torch.Tensor, fp_maps: torch.Tensor, q_maps: torch.Tensor,
                             w: torch.Tensor) -> None:
        """Seed 001's "v. GT" rows: each map against the salient-object map, and the per-image change."""
        keep = gt.flatten(1).sum(dim=1) > 0  # an empty ground-truth map has no distribution to compare
        if not keep.any():
            return
        gt, fp_maps, q_maps, w = gt[keep], fp_maps[keep], q_maps[keep], w[:, keep]
        self.n_gt += int(keep.sum())
        self.gt_boot_weight += w.sum(dim=1)
        for name, (fn, worse_when_lower) in GT_METRICS.items():
            fp_v, q_v = fn(gt, fp_maps), fn(gt, q_maps)
            delta = (fp_v - q_v) if worse_when_lower else (q_v - fp_v)
            self.gt[name]["fp32"] += float(fp_v.sum())
            self.gt[name]["quantized"] += float(q_v.sum())
            self.gt[name]["boot"] += w @ delta

    def results(self) -> dict[str, Estimate]:
        details = {"method": self.method, "degenerate": dict(self.degenerate)}
        out = {}
        for name in CAM_METRICS:
            info = dict(details)
            if name == "cam_rmse":  # seed 002's most-different subset, (rmse, sample id), once per case
                info[f"top_{self.fraction:g}_by_rmse"] = self.most_different
            if self.n == 0:
                out[name] = Estimate(float("nan"), None, 0, {**info, "error": "every CAM was degenerate"})
                continue
            boot = self.boot[name] / self.boot_weight.clamp_min(1e-300)
            boot = torch.where(self.boot_weight > 0, boot, torch.full_like(boot, float("nan")))
            out[name] = Estimate(self.sums[name] / self.n, percentile_interval(boot), self.n, info)
        if self.n_gt:
            weight = self.gt_boot_weight
            for name, acc in self.gt.items():
                boot = torch.where(weight > 0, acc["boot"] / weight.clamp_min(1e-300), torch.full_like(weight, float("nan")))
                fp_mean, q_mean = acc["fp32"] / self.n_gt, acc["quantized"] / self.n_gt
                delta = (fp_mean - q_mean) if GT_METRICS[name][1] else (q_mean - fp_mean)
                out[f"{name}_gt_delta"] = Estimate(delta, percentile_interval(boot), self.n_gt,
                                                   {**details, "fp32_vs_gt": fp_mean, "quantized_vs_gt": q_mean})
        return out
