"""Classification and confidence metrics for an FP32/quantized pair, as streaming state.

Deltas are FP32 minus quantized: positive means the quantized model is worse. ``PairMetrics`` keeps
counts, per-class tp/fp/fn, a log-scale KL histogram and O(replicates) bootstrap sums, so its memory
does not grow with the dataset.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from qrobust.errors import invalid
from qrobust.metrics.internal import SQNR_CAP_DB, LayerEvidence, sqnr_db
from qrobust.metrics.segments import ConfidenceRecord, worst_class
from qrobust.metrics.stats import (
    CONFIDENCE, BootstrapMean, Estimate, PairedDelta, bootstrap_estimate, clopper_pearson_interval, paired_delta,
    paired_interval, poisson_weights, quantile_rank_interval, replicate_ratio, wilson_interval,
)

F1_AVERAGES = ("macro", "micro", "weighted")
FLIPPED_KEPT = 20  # samples whose prediction changed, kept per case for the report (memory stays bounded)
KL_KEPT = 64  # the first samples' per-sample KL, kept per case: a failing case's diagnosis ranks them without a forward


def kl_per_sample(fp32_logits: torch.Tensor, quant_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_fp32 || P_quant) per sample, natural log, from logits via log_softmax (float64)."""
    log_p = F.log_softmax(fp32_logits.double(), dim=1)
    log_q = F.log_softmax(quant_logits.double(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).clamp_min(0.0)


def logit_sqnr_db(fp32_logits: torch.Tensor, quant_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample SQNR of the twin's logits against FP32's, dB (``qrobust.metrics.internal.sqnr_db``)."""
    return sqnr_db(fp32_logits, quant_logits)


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

    def merge(self, other: LogHistogram) -> None:
        self.counts += other.counts

    def value_at_rank(self, rank: int) -> float:
        """The value of the ``rank``-th smallest observation (1-based), at its bin's geometric centre."""
        idx = int(torch.searchsorted(torch.cumsum(self.counts, 0), torch.tensor(rank)))
        if idx == 0:
            return 0.0
        return 10 ** (self.low_exp + (idx - 0.5) / self.per_decade)

    def quantile(self, q: float) -> float:
        return self.value_at_rank(max(1, math.ceil(q * int(self.counts.sum()))))

    def quantile_interval(self, q: float, confidence: float) -> tuple[float, float]:
        """The distribution-free order-statistic interval of the ``q``-quantile (independent samples)."""
        low, high = quantile_rank_interval(int(self.counts.sum()), q, confidence)
        return self.value_at_rank(low), self.value_at_rank(high)


class PairMetrics:
    """Streaming accuracy / F1 / agreement / KL state for one pair on one case."""

    def __init__(self, num_classes: int, seed: int = 0, replicates: int = 1000, f1_average: str = "macro",
                 operating_point: float | None = None):
        if num_classes < 1:
            raise invalid("num_classes", num_classes, "must be >= 1")
        if f1_average not in F1_AVERAGES:
            raise invalid("f1_average", f1_average, f"must be one of {', '.join(F1_AVERAGES)}")
        self.k, self.seed, self.replicates, self.f1_average = num_classes, seed, replicates, f1_average
        self.operating_point = operating_point
        self.n = 0
        self.counts = dict.fromkeys(("fp_top1", "q_top1", "b1", "c1", "fp_top5", "q_top5", "b5", "c5", "agree"), 0)
        zeros = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.class_counts = {m: {c: zeros(num_classes) for c in ("tp", "fp", "fn")} for m in ("fp", "q")}
        self.boot_counts = {m: {c: zeros(replicates, num_classes) for c in ("tp", "fp", "fn")} for m in ("fp", "q")}
        self.boot_weight = zeros(replicates)
        self.class_flips = {"b": zeros(num_classes), "c": zeros(num_classes)}  # per label: FP32 right only, twin right only
        self.confidences = ConfidenceRecord(seed, replicates, operating_point)  # ECE, the operating point
        self.layers = LayerEvidence(replicates)  # the twin's clipping and layer SQNR, where the case taps them
        # per-sample means by metric: KL, logit SQNR (dB), logit cosine similarity (merged and written by name)
        self.means = {name: BootstrapMean(replicates) for name in ("kl_mean", "logit_sqnr_db", "logit_cosine")}
        self.kl_max = 0.0
        self.kl_hist = LogHistogram()
        self.nonfinite = {"fp32": 0, "quantized": 0}
        self.nonfinite_ids: list[int] = []
        self.flipped: list[dict] = []  # the first FLIPPED_KEPT samples whose top-1 changed, with both top-3
        self.first_kl: dict[int, float] = {}  # sample id -> KL, for the first KL_KEPT finite samples

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
            if suffix == "1":
                for name, mask in (("b", fp_right & ~q_right), ("c", ~fp_right & q_right)):
                    self.class_flips[name].index_add_(0, labels[mask], torch.ones(int(mask.sum()), dtype=torch.float64))
        self.counts["agree"] += int((fp_pred == q_pred).sum())
        self._keep_flipped(fp_logits, q_logits, labels, ids, fp_pred != q_pred)
        for model, pred in (("fp", fp_pred), ("q", q_pred)):
            right = pred == labels
            for name, cls, mask in (("tp", labels, right), ("fp", pred, ~right), ("fn", labels, ~right)):
                self.class_counts[model][name].index_add_(0, cls[mask], torch.ones(int(mask.sum()), dtype=torch.float64))
                self.boot_counts[model][name].index_add_(1, cls[mask], weights[:, mask])
        kl = kl_per_sample(fp_logits, q_logits)
        room = KL_KEPT - len(self.first_kl)
        if room > 0:
            self.first_kl.update(zip(ids[:room].tolist(), kl[:room].tolist()))
        self.means["kl_mean"].update(kl, weights)
        self.means["logit_sqnr_db"].update(logit_sqnr_db(fp_logits, q_logits), weights)
        self.means["logit_cosine"].update(F.cosine_similarity(fp_logits.double(), q_logits.double(), dim=1), weights)
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.kl_hist.add(kl)
        self.boot_weight += weights.sum(dim=1)
        self.confidences.update(fp_logits, q_logits, labels, groups)

    def _keep_flipped(self, fp_logits, q_logits, labels, ids, flipped) -> None:
        room = FLIPPED_KEPT - len(self.flipped)
        if room <= 0 or not flipped.any():
            return
        rows = flipped.nonzero()[:room, 0]
        k = min(3, fp_logits.shape[1])
        tops = {m: torch.softmax(logits[rows].double(), 1).topk(k, dim=1) for m, logits in (("fp32", fp_logits),
                                                                                             ("quantized", q_logits))}
        for j, row in enumerate(rows.tolist()):
            self.flipped.append({"id": int(ids[row]), "label": int(labels[row]), **{
                m: [[int(c), round(float(p), 4)] for c, p in zip(t.indices[j].tolist(), t.values[j].tolist())]
                for m, t in tops.items()}})

    # ---- shards ------------------------------------------------------------------------------------
    def merge(self, other: PairMetrics) -> None:
        """Add ``other``, the state of the samples after this one's (the next sample shard of the same case):
        the result is the state one pass over both would hold, up to float sums added per shard, so runs
        that fold the same shards in order agree bit for bit (qrobust.gate.shards)."""
        if (other.k, other.seed, other.replicates, other.f1_average, other.operating_point) != (
                self.k, self.seed, self.replicates, self.f1_average, self.operating_point):
            raise invalid("merge", (other.k, other.seed, other.replicates), "states of different configurations")
        self.n += other.n
        for name, count in other.counts.items():
            self.counts[name] += count
        for model in ("fp", "q"):
            for name in ("tp", "fp", "fn"):
                self.class_counts[model][name] += other.class_counts[model][name]
                self.boot_counts[model][name] += other.boot_counts[model][name]
        self.boot_weight += other.boot_weight
        for name in self.class_flips:
            self.class_flips[name] += other.class_flips[name]
        self.confidences.merge(other.confidences)
        self.layers.merge(other.layers)
        for name, mean in self.means.items():
            mean.merge(other.means[name])
        self.kl_max = max(self.kl_max, other.kl_max)
        self.kl_hist.merge(other.kl_hist)
        for model, count in other.nonfinite.items():
            self.nonfinite[model] += count
        self.nonfinite_ids = (self.nonfinite_ids + other.nonfinite_ids)[:10]
        self.flipped = (self.flipped + other.flipped)[:FLIPPED_KEPT]
        for sample, kl in other.first_kl.items():
            if len(self.first_kl) < KL_KEPT:
                self.first_kl[sample] = kl

    def state(self) -> dict:
        """Plain tensors and numbers (``torch.load(weights_only=True)`` reads them back). The bootstrap's
        per-class counts keep only the classes seen: 48 MB dense for 1,000 classes, a few kB sparse."""
        boot = {}
        for model in ("fp", "q"):
            for name in ("tp", "fp", "fn"):
                seen = self.class_counts[model][name].nonzero().flatten()
                boot[f"{model}_{name}"] = (seen, self.boot_counts[model][name][:, seen].clone())
        return {"config": [self.k, self.seed, self.replicates, self.f1_average, self.operating_point], "n": self.n,
                "class_flips": dict(self.class_flips), "confidences": self.confidences.state(),
                "layers": self.layers.state(),
                "counts": dict(self.counts), "class_counts": {m: dict(c) for m, c in self.class_counts.items()},
                "boot": boot, "boot_weight": self.boot_weight,
                "means": {name: mean.state() for name, mean in self.means.items()},
                "kl_max": self.kl_max, "kl_hist": self.kl_hist.counts, "nonfinite": dict(self.nonfinite),
                "nonfinite_ids": list(self.nonfinite_ids), "flipped": list(self.flipped),
                "first_kl": [[i, v] for i, v in self.first_kl.items()]}

    @classmethod
    def from_state(cls, state: dict) -> PairMetrics:
        k, seed, replicates, f1_average, operating_point = state["config"]
        metrics = cls(k, seed, replicates, f1_average, operating_point)
        metrics.n, metrics.counts = state["n"], dict(state["counts"])
        metrics.class_flips = dict(state["class_flips"])
        metrics.confidences = ConfidenceRecord.from_state(state["confidences"])
        metrics.layers = LayerEvidence.from_state(state["layers"])
        metrics.class_counts = {m: dict(c) for m, c in state["class_counts"].items()}
        for key, (seen, columns) in state["boot"].items():
            model, name = key.split("_")
            metrics.boot_counts[model][name][:, seen] = columns
        metrics.boot_weight = state["boot_weight"]
        metrics.means = {name: BootstrapMean.from_state(mean) for name, mean in state["means"].items()}
        metrics.kl_max, metrics.kl_hist.counts = state["kl_max"], state["kl_hist"]
        metrics.nonfinite, metrics.nonfinite_ids = dict(state["nonfinite"]), list(state["nonfinite_ids"])
        metrics.flipped, metrics.first_kl = list(state["flipped"]), {int(i): v for i, v in state["first_kl"]}
        return metrics

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
        for k in (1, 5) if self.k > 5 else (1,):  # with <= 5 classes every label is in the top 5
            d = self.accuracy_delta(k)
            out[f"top{k}_delta"] = Estimate(d.delta, d.interval, n, {"b": d.b, "c": d.c, "mcnemar_p": d.p_value,
                                                                     "fp32_right": c[f"fp_top{k}"],
                                                                     "flipped": list(self.flipped)},
                                            partial(paired_interval, c[f"fp_top{k}"], c[f"q_top{k}"], d.b, d.c, n))
            out[f"top{k}_fp32"] = Estimate(c[f"fp_top{k}"] / n, wilson_interval(c[f"fp_top{k}"], n), n, {})
            out[f"top{k}_quant"] = Estimate(c[f"q_top{k}"] / n, wilson_interval(c[f"q_top{k}"], n), n, {})
        f1_fp, f1_q = float(self._f1(self.class_counts["fp"])), float(self._f1(self.class_counts["q"]))
        boot = self._f1(self.boot_counts["fp"]) - self._f1(self.boot_counts["q"])
        boot = replicate_ratio(boot, (self.boot_weight > 0).double())  # NaN for an empty resample
        out["f1_fp32"] = Estimate(f1_fp, None, n, {"average": self.f1_average})
        out["f1_quant"] = Estimate(f1_q, None, n, {"average": self.f1_average})
        out["f1_delta"] = bootstrap_estimate(f1_fp - f1_q, boot, n, {"average": self.f1_average})
        agree = c["agree"]
        out["agreement"] = Estimate(agree / n, wilson_interval(agree, n), n, {"flips": n - agree,
                                                                              "flipped": list(self.flipped)},
                                    partial(clopper_pearson_interval, agree, n))
        out["flip_rate"] = Estimate(1 - agree / n, tuple(1 - v for v in reversed(wilson_interval(agree, n))), n,
                                    {"flips": n - agree})
        out["kl_mean"] = self.means["kl_mean"].estimate()
        out["kl_p95"] = Estimate(self.kl_hist.quantile(0.95), self.kl_hist.quantile_interval(0.95, CONFIDENCE), n,
                                 {"resolution": "log histogram, 200 bins per decade"},
                                 partial(self.kl_hist.quantile_interval, 0.95))
        out["kl_max"] = Estimate(self.kl_max, None, n, {})
        out["logit_sqnr_db"] = self.means["logit_sqnr_db"].estimate({"cap_db": SQNR_CAP_DB})
        out["logit_cosine"] = self.means["logit_cosine"].estimate()
        fp, q = self.class_counts["fp"], self.class_counts["q"]
        worst = worst_class(fp["tp"] + fp["fn"], fp["tp"], q["tp"], self.class_flips["b"], self.class_flips["c"])
        if worst is not None:
            out["class_top1_delta"] = worst
        out.update(self.confidences.results())
        out.update(self.layers.results())
        return out
