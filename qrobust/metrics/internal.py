"""The twin's internal evidence on a case, as streaming state: per quantized layer, how much more of its
activation the calibrated range clips on these inputs than on the calibration split (``clip_excess``),
and how far its output strays from FP32's (``layer_sqnr_db``). The taps that read them ride on the
evaluation's own forwards (``qrobust.quant.taps``); this keeps per-layer bootstrap sums.

Each metric reports its worst layer, named in the details: the largest mean excess, the lowest mean
SQNR. Picking the worst of L layers makes the estimate a maximum (or minimum) of L means, biased towards
failing; tolerances fitted to benign twins carry the same bias, which is why these metrics have no
default tolerance.
"""
from __future__ import annotations

import torch

from qrobust.metrics.stats import BootstrapMean, Estimate

SHOWN_LAYERS = 5  # layers listed in a result's details, worst first
SQNR_CAP_DB = 120.0  # identical tensors would be +inf dB; float32 carries about 140 dB anyway


def sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per sample (first dim), 20 log10(||x|| / ||x - y||) over the rest, capped at SQNR_CAP_DB: it moves
    with a changed recipe long before a decision does."""
    f, q = reference.double().flatten(1), other.double().flatten(1)
    ratio = f.norm(dim=1) / (f - q).norm(dim=1).clamp_min(1e-300)
    return (20 * torch.log10(ratio.clamp_min(1e-300))).clamp(max=SQNR_CAP_DB)


class LayerEvidence:
    """Per-layer bootstrap means of one pair on one case: clip excess (clipped share minus the
    calibration split's, per sample) and output SQNR against the matched FP32 tensor."""

    def __init__(self, replicates: int):
        self.replicates = replicates
        self.clip: dict[str, BootstrapMean] = {}
        self.reference: dict[str, float] = {}  # the calibration split's clipped share per layer
        self.calibrated = True  # False: the twin's calibration split is unknown, references are 0
        self.sqnr: dict[str, BootstrapMean] = {}
        self.fp32_tensor: dict[str, str] = {}  # twin layer -> the FP32 module it is compared with

    def update_clip(self, shares: dict[str, torch.Tensor], reference: dict[str, float], calibrated: bool,
                    weights: torch.Tensor) -> None:
        """Add a batch's per-sample clipped shares by layer, ``reference`` the calibration split's."""
        self.calibrated = calibrated
        for layer, share in shares.items():
            self.reference[layer] = reference.get(layer, 0.0)
            self.clip.setdefault(layer, BootstrapMean(self.replicates)).update(share.double() - self.reference[layer],
                                                                              weights)

    def update_sqnr(self, fp32: dict[str, torch.Tensor], twin: dict[str, torch.Tensor], matches: dict[str, str],
                    weights: torch.Tensor) -> None:
        """Add a batch's per-sample output SQNR of every twin layer matched to an FP32 tensor."""
        for layer, fp_name in matches.items():
            if layer in twin and fp_name in fp32:
                self.fp32_tensor[layer] = fp_name
                self.sqnr.setdefault(layer, BootstrapMean(self.replicates)).update(
                    sqnr_db(fp32[fp_name], twin[layer]), weights)

    def merge(self, other: LayerEvidence) -> None:
        """Add a later shard's samples (qrobust.gate.shards)."""
        self.calibrated = self.calibrated and other.calibrated
        self.reference.update(other.reference)
        self.fp32_tensor.update(other.fp32_tensor)
        for mine, theirs in ((self.clip, other.clip), (self.sqnr, other.sqnr)):
            for layer, mean in theirs.items():
                if layer in mine:
                    mine[layer].merge(mean)
                else:
                    mine[layer] = BootstrapMean.from_state(mean.state())

    def state(self) -> dict:
        return {"replicates": self.replicates, "calibrated": self.calibrated, "reference": dict(self.reference),
                "fp32_tensor": dict(self.fp32_tensor), "clip": {k: m.state() for k, m in self.clip.items()},
                "sqnr": {k: m.state() for k, m in self.sqnr.items()}}

    @classmethod
    def from_state(cls, state: dict) -> LayerEvidence:
        evidence = cls(state["replicates"])
        evidence.calibrated, evidence.reference = state["calibrated"], dict(state["reference"])
        evidence.fp32_tensor = dict(state["fp32_tensor"])
        evidence.clip = {k: BootstrapMean.from_state(s) for k, s in state["clip"].items()}
        evidence.sqnr = {k: BootstrapMean.from_state(s) for k, s in state["sqnr"].items()}
        return evidence

    def results(self) -> dict[str, Estimate]:
        out = {}
        if self.clip:
            ranked = sorted(self.clip, key=lambda k: -self.clip[k].mean)
            worst = ranked[0]
            out["clip_excess"] = self.clip[worst].estimate({
                "layer": worst, "calibration_share": self.reference[worst],
                "gated_share": self.clip[worst].mean + self.reference[worst],
                "reference": "calibration split" if self.calibrated else
                "none: the twin was not built by qrobust.quantize_model, so its calibration split is unknown "
                "(the share clipped at the grid's ends, against 0)",
                "layers": [[k, round(self.clip[k].mean, 6)] for k in ranked[:SHOWN_LAYERS]]})
        if self.sqnr:
            ranked = sorted(self.sqnr, key=lambda k: self.sqnr[k].mean)
            worst = ranked[0]
            out["layer_sqnr_db"] = self.sqnr[worst].estimate({
                "layer": worst, "fp32_tensor": self.fp32_tensor[worst],
                "layers": [[k, round(self.sqnr[k].mean, 3)] for k in ranked[:SHOWN_LAYERS]]})
        return out
