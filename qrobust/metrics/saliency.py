"""Saliency-map comparison: CAM agreement metrics (RMSE, SIM, CC, KLD), their streaming state, and
seed 002's activation statistics. Maps are batched over the first dimension.
"""
from __future__ import annotations

import torch

from qrobust.errors import invalid
from qrobust.metrics.stats import BootstrapMean, BootstrapTrimmedMean, Estimate

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


TRIMMED = ("cam_kld",)  # unbounded per image: one Lite0 view scored 24.3 nats, moving a 49-view mean by 0.5
TRIM = 0.1


def _aggregate(metric: str, replicates: int) -> BootstrapMean | BootstrapTrimmedMean:
    """Bounded metrics (RMSE, SIM, CC) are averaged; the unbounded KLD gets a 10% trimmed mean, so a
    verdict does not hinge on a single image (``scipy.stats.trim_mean``'s rule; README "Metrics")."""
    return BootstrapTrimmedMean(replicates, TRIM) if metric in TRIMMED else BootstrapMean(replicates)


class CamAgreement:
    """Streaming CAM agreement of one pair on one case: per-metric means with cluster-bootstrap intervals.

    Pairs where either map is degenerate (constant after ReLU) are counted as their own outcome and left
    out of the means; when every map is degenerate the metrics are NaN, which fails a gate.
    """

    def __init__(self, method: str, seed: int = 0, replicates: int = 1000, fraction: float = 0.05,
                 capacity: int = 1, overlays: int = 2):
        self.method, self.seed, self.replicates, self.fraction = method, seed, replicates, fraction
        self.capacity, self.overlay_count = max(1, capacity), overlays
        self.means = {name: _aggregate(name, replicates) for name in CAM_METRICS}
        self.degenerate = {"fp32": 0, "quantized": 0, "both": 0}
        # seed 001's "v. GT" rows: per-image change of each map's agreement with the ground truth
        self.gt_deltas = {name: _aggregate(name, replicates) for name in GT_METRICS}
        self.gt_sums = {name: {"fp32": 0.0, "quantized": 0.0} for name in GT_METRICS}
        self.most_different: list[tuple[float, int]] = []  # (rmse, id), the top ``fraction`` kept
        self.overlays: list[dict] = []  # pixels and both maps of the few most different images

    def update(self, ref: tuple[torch.Tensor, torch.Tensor], cand: tuple[torch.Tensor, torch.Tensor],
               ids: torch.Tensor, weights: torch.Tensor, pixels: torch.Tensor,
               saliency: torch.Tensor | None = None, top1: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """``top1``: both models' predicted classes for the batch, kept with the overlays (the report draws
        them without running a model again)."""
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
        values = {name: fn(ref_maps, cand_maps) for name, fn in CAM_METRICS.items()}
        for name, v in values.items():
            self.means[name].update(v, w)
        if saliency is not None:
            self._update_ground_truth(saliency.detach().cpu()[valid], ref_maps, cand_maps, w)
        rmse = values["cam_rmse"]
        merged = self.most_different + list(zip(rmse.tolist(), ids.tolist()))
        self.most_different = sorted(merged, reverse=True)[: self.capacity]
        pix = pixels.detach().cpu()[valid]
        classes = [t.cpu()[valid] for t in top1] if top1 is not None else None
        for j in rmse.argsort(descending=True)[: self.overlay_count].tolist():
            self.overlays.append({"id": int(ids[j]), "rmse": float(rmse[j]), "pixels": pix[j],
                                  "fp32": ref_maps[j], "quantized": cand_maps[j],
                                  "top1": [int(c[j]) for c in classes] if classes is not None else None})
        self.overlays = sorted(self.overlays, key=lambda o: -o["rmse"])[: self.overlay_count]

    def _update_ground_truth(self, gt: torch.Tensor, fp_maps: torch.Tensor, q_maps: torch.Tensor,
                             w: torch.Tensor) -> None:
        """Seed 001's "v. GT" rows: each map against the salient-object map, and the per-image change."""
        keep = gt.flatten(1).sum(dim=1) > 0  # an empty ground-truth map has no distribution to compare
        if not keep.any():
            return
        gt, fp_maps, q_maps, w = gt[keep], fp_maps[keep], q_maps[keep], w[:, keep]
        for name, (fn, worse_when_lower) in GT_METRICS.items():
            fp_v, q_v = fn(gt, fp_maps), fn(gt, q_maps)
            self.gt_deltas[name].update((fp_v - q_v) if worse_when_lower else (q_v - fp_v), w)
            self.gt_sums[name]["fp32"] += float(fp_v.sum())
            self.gt_sums[name]["quantized"] += float(q_v.sum())

    def merge(self, other: CamAgreement) -> None:
        """Add ``other``, the state of the next sample shard of the same case (see PairMetrics.merge)."""
        for name, mean in self.means.items():
            mean.merge(other.means[name])
        for name, delta in self.gt_deltas.items():
            delta.merge(other.gt_deltas[name])
            for model, total in other.gt_sums[name].items():
                self.gt_sums[name][model] += total
        for kind, count in other.degenerate.items():
            self.degenerate[kind] += count
        self.most_different = sorted(self.most_different + other.most_different, reverse=True)[: self.capacity]
        self.overlays = sorted(self.overlays + other.overlays, key=lambda o: -o["rmse"])[: self.overlay_count]

    def state(self) -> dict:
        """Plain tensors and numbers, as PairMetrics.state."""
        return {"config": [self.method, self.seed, self.replicates, self.fraction, self.capacity, self.overlay_count],
                "means": {n: m.state() for n, m in self.means.items()},
                "gt_deltas": {n: m.state() for n, m in self.gt_deltas.items()},
                "gt_sums": {n: dict(s) for n, s in self.gt_sums.items()}, "degenerate": dict(self.degenerate),
                "most_different": [list(p) for p in self.most_different], "overlays": list(self.overlays)}

    @classmethod
    def from_state(cls, state: dict) -> CamAgreement:
        method, seed, replicates, fraction, capacity, overlays = state["config"]
        cam = cls(method, seed, replicates, fraction, capacity, overlays)
        for field, kept in (("means", cam.means), ("gt_deltas", cam.gt_deltas)):
            for name, mean_state in state[field].items():
                kept[name] = type(kept[name]).from_state(mean_state)
        cam.gt_sums = {n: dict(s) for n, s in state["gt_sums"].items()}
        cam.degenerate = dict(state["degenerate"])
        cam.most_different = [tuple(p) for p in state["most_different"]]
        cam.overlays = list(state["overlays"])
        return cam

    @property
    def n(self) -> int:
        """Images whose two maps were both non-degenerate (the ones the means are over)."""
        return self.means["cam_rmse"].n

    def results(self) -> dict[str, Estimate]:
        details = {"method": self.method, "degenerate": dict(self.degenerate)}
        out = {}
        for name, mean in self.means.items():
            info = dict(details)
            if name == "cam_rmse":  # seed 002's most-different subset, (rmse, sample id), once per case
                info[f"top_{self.fraction:g}_by_rmse"] = self.most_different
            if self.n == 0:
                out[name] = Estimate(float("nan"), None, 0, {**info, "error": "every CAM was degenerate"})
            else:
                out[name] = mean.estimate(info)
        for name, delta in self.gt_deltas.items():
            if delta.n:
                sums = self.gt_sums[name]
                out[f"{name}_gt_delta"] = delta.estimate({**details, "fp32_vs_gt": sums["fp32"] / delta.n,
                                                          "quantized_vs_gt": sums["quantized"] / delta.n})
        return out
