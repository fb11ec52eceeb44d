"""The evaluation engine: each (pair, perturbation, level) case is computed once per session.

Pairs that share one FP32 model object, dataset and preprocessing form a *group*: a perturbed batch is
made once, the FP32 model runs on it once, and every quantized twin in the group runs on the same input
(bit sweeps and config matrices pay for one FP32 forward). All results of a group for a case are cached
together. Forward passes are counted per model so duplicated work shows up in the report.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from qrobust.cam import compute_cams
from qrobust.data import ImageSet, StreamingSet, check_batch_size, load_dataset
from qrobust.errors import ModelOutputError, invalid
from qrobust.metrics import CamAgreement, Estimate, PairMetrics
from qrobust.pairs import ModelPair
from qrobust.perturbations import PERTURBATIONS, perturb
from qrobust.stats import poisson_weights

CLEAN = "clean"  # cache key of the unperturbed input (level 0 of every perturbation)


@dataclass
class CaseResult:
    """All metrics of one pair on one perturbation level, plus the output-health record."""

    pair: str
    perturbation: str
    level: float
    n: int
    estimates: dict[str, Estimate]
    nonfinite: dict[str, int]
    nonfinite_ids: list[int]
    state: PairMetrics = field(repr=False)
    cam: CamAgreement | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.pair} / {self.perturbation} @ {self.level:g}"

    @property
    def healthy(self) -> bool:
        return self.n > 0 and not any(self.nonfinite.values())

    def health_message(self) -> str:
        """Why the case cannot pass, or '' when the outputs are fine."""
        if any(self.nonfinite.values()):
            counts = ", ".join(f"{m}: {c}" for m, c in self.nonfinite.items() if c)
            return (f"{self.label}: non-finite model outputs ({counts} of {self.n + max(self.nonfinite.values())} "
                    f"samples; first sample ids {self.nonfinite_ids[:5]})")
        if self.n == 0:
            return f"{self.label}: no samples were evaluated"
        return ""

    def metric(self, name: str) -> Estimate:
        if name not in self.estimates:
            raise invalid("metric", name, f"not computed for this case (available: {', '.join(self.estimates)})")
        return self.estimates[name]


MAX_BATCH_PIXELS = 8 * 224 * 224  # input pixels per batch (per channel): 8 ImageNet images, 392 digits


class Evaluator:
    """Evaluates cases lazily and caches them; ``forward_passes`` counts model calls per model.

    ``wanted`` (pair, perturbation, level) triples, when given, limit which group mates run along with a
    requested case, so a pair gated only on clean inputs (a bit sweep) is not run on every perturbation.
    """

    def __init__(self, pairs: Sequence[ModelPair], seed: int = 0, batch_size: int = 64,
                 max_samples: int | None = None, replicates: int = 1000, f1_average: str = "macro",
                 keep_samples: bool = False, datasets: dict[str, ImageSet | StreamingSet] | None = None,
                 device: str = "cpu", wanted: set[tuple[str, str, float]] | None = None,
                 cam_cases: set[tuple[str, str, float]] | None = None, cam_methods: dict[str, str] | None = None):
        if not pairs:
            raise invalid("pairs", [], "need at least one model pair")
        check_batch_size(batch_size)
        self.device = torch.device(device)
        for p in pairs:
            if p.kind == "int8" and self.device.type != "cpu":
                raise invalid("device", device, f"pair {p.name!r} runs real int8 CPU kernels; use device='cpu'")
        self.pairs = {p.name: p for p in pairs}
        self.wanted = wanted
        self.cam_cases = set(cam_cases or ())
        self.cam_methods = {p.name: ("eigencam" if p.kind == "int8" else "gradcampp") for p in pairs}
        self.cam_methods.update(cam_methods or {})
        self.seed, self.batch_size, self.max_samples = seed, batch_size, max_samples
        self.replicates, self.f1_average, self.keep_samples = replicates, f1_average, keep_samples
        self._datasets = dict(datasets or {})
        self._subsets: dict[str, ImageSet | StreamingSet] = {}
        self._cache: dict[tuple[str, str, float], CaseResult] = {}
        self._probed: set[int] = set()
        self.forward_passes: Counter[str] = Counter()
        self.perturbed_batches: Counter[str] = Counter()
        # progress(label, batches done, batches in all), called after every batch (the plugin draws it)
        self.progress: Callable[[str, int, int], None] | None = None

    # ---- groups and data ---------------------------------------------------------------------------
    def group_of(self, pair: ModelPair) -> list[ModelPair]:
        """The pairs evaluated together with ``pair`` (same FP32 object, dataset and preprocessing)."""
        return [p for p in self.pairs.values()
                if p.fp32 is pair.fp32 and p.dataset == pair.dataset and p.preprocess == pair.preprocess]

    @staticmethod
    def fp32_label(group: list[ModelPair]) -> str:
        return f"fp32[{group[0].name}]"

    def dataset(self, name: str) -> ImageSet | StreamingSet:
        """The dataset as evaluated (subsampled to ``max_samples``), built once per session."""
        if name not in self._subsets:
            data = self._datasets[name] if name in self._datasets else load_dataset(name)
            self._subsets[name] = data.subset(self.max_samples, self.seed)
        return self._subsets[name]

    def batch_size_for(self, pair: ModelPair) -> int:
        """``batch_size``, capped at MAX_BATCH_PIXELS of input: results do not depend on the batch size,
        but large batches of large images make every activation bigger than the allocator's 32 MB
        mmap threshold, and each op then pays fresh page faults (EfficientNet-Lite0 at 224 px: 1.96 s
        per 49 images in one batch, 0.88 s in batches of 8)."""
        height, width = pair.preprocess.resolution
        return max(1, min(self.batch_size, MAX_BATCH_PIXELS // (height * width)))

    def _probe(self, group: list[ModelPair], data: ImageSet) -> None:
        """One clean batch first: same output shape and class count for both models, finite outputs."""
        batch = next(data.batches(min(self.batch_size_for(group[0]), len(data))))
        x = group[0].preprocess.normalize(batch.images.to(self.device))
        with torch.inference_mode():
            fp = group[0].fp32(x)
            self.forward_passes["probe"] += 1
            for pair in group:
                q = pair.quantized(x)
                self.forward_passes["probe"] += 1
                expected = (len(x), pair.num_classes)
                for model, out in (("fp32", fp), ("quantized", q)):
                    if tuple(out.shape) != expected:
                        raise ModelOutputError(f"pair {pair.name!r}: {model} model returned shape {tuple(out.shape)}, "
                                               f"expected {expected} (batch, num_classes)")
                    bad = ~torch.isfinite(out).all(dim=1)
                    if bad.any():
                        raise ModelOutputError(f"pair {pair.name!r}: {model} model returned NaN/Inf on clean input "
                                               f"for {int(bad.sum())} of {len(x)} probe samples "
                                               f"(first ids {batch.ids[bad][:5].tolist()})")
        self._probed.add(id(group[0].fp32))

    # ---- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, pair: str, perturbation: str, level: float, cam: bool = False) -> CaseResult:
        """The result of one case, computed once (with every pair of its group) and then cached.

        ``cam=True`` asks for the CAM agreement metrics too; cases listed in ``cam_cases`` get them in
        their one pass, any other case pays a second pass (counted in ``forward_passes``).
        """
        if pair not in self.pairs:
            raise invalid("pair", pair, f"not loaded in this session (loaded: {', '.join(self.pairs)})")
        spec = PERTURBATIONS.get(perturbation)
        level = spec.check_level(level)
        if cam:
            self.cam_cases.add((pair, spec.name, level))
        if level == 0:  # every perturbation's level 0 is the clean input: evaluate it once
            clean = self._cached(pair, CLEAN, 0.0, cam)
            return dataclasses.replace(clean, perturbation=spec.name)
        return self._cached(pair, spec.name, level, cam)

    def _cached(self, pair: str, perturbation: str, level: float, cam: bool = False) -> CaseResult:
        key = (pair, perturbation, level)
        if key not in self._cache:
            group = [p for p in self.group_of(self.pairs[pair]) if p.name == pair or self._wants(p.name, perturbation, level)]
            self._run(group, perturbation, level)
        elif cam and self._cache[key].cam is None:
            self._run([self.pairs[pair]], perturbation, level)
        return self._cache[key]

    def _wants_cam(self, pair: str, perturbation: str, level: float) -> bool:
        if perturbation == CLEAN:
            return any(p == pair and lv == 0 for p, _, lv in self.cam_cases)
        return (pair, perturbation, level) in self.cam_cases

    def _wants(self, pair: str, perturbation: str, level: float) -> bool:
        """Whether a group mate's result for this case will be asked for (all, when ``wanted`` is None)."""
        if self.wanted is None:
            return True
        if perturbation == CLEAN:
            return any(p == pair and lv == 0 for p, _, lv in self.wanted)
        return (pair, perturbation, level) in self.wanted

    @staticmethod
    def _check_labels(pair: ModelPair, labels: torch.Tensor) -> None:
        if len(labels) and (int(labels.max()) >= pair.num_classes or int(labels.min()) < 0):
            raise invalid("dataset", pair.dataset, f"has labels {int(labels.min())}..{int(labels.max())} "
                                                   f"but pair {pair.name!r} has {pair.num_classes} classes")

    def _run(self, group: list[ModelPair], perturbation: str, level: float) -> None:
        lead = group[0]
        data = self.dataset(lead.dataset)
        if id(lead.fp32) not in self._probed:
            self._probe(group, data)
        states = {p.name: PairMetrics(p.num_classes, self.seed, self.replicates, self.f1_average, self.keep_samples)
                  for p in group}
        cam_states = {p.name: CamAgreement(self.cam_methods[p.name], self.seed, self.replicates,
                                           capacity=math.ceil(0.05 * len(data)))
                      for p in group if self._wants_cam(p.name, perturbation, level)}
        fp_methods = sorted({cam.method for cam in cam_states.values()})
        if fp_methods and lead.target_layer is None:
            raise invalid("target_layer", None, f"pair {lead.name!r} declares no CAM target layer")
        normalize = lead.preprocess.normalize
        fp_label = self.fp32_label(self.group_of(lead))
        batch_size = self.batch_size_for(lead)
        total = math.ceil(len(data) / batch_size)
        label = f"{lead.name} {perturbation} @ {level:g}"
        for done, batch in enumerate(data.batches(batch_size), 1):
            images = batch.images.to(self.device)
            pixels = images if perturbation == CLEAN else perturb(
                perturbation, images, level, ids=batch.ids, seed=self.seed, boxes=batch.boxes,
                model=lead.fp32, normalize=normalize)
            self.perturbed_batches[fp_label] += 1
            self._check_labels(lead, batch.labels)
            if tuple(batch.images.shape[-2:]) != tuple(lead.preprocess.resolution):
                raise invalid("dataset", lead.dataset, f"images are {tuple(batch.images.shape[-2:])} but pair "
                                                       f"{lead.name!r} expects {tuple(lead.preprocess.resolution)}")
            x = normalize(pixels)
            weights = poisson_weights(self.seed, batch.groups, self.replicates)
            fp_cams = compute_cams(lead.fp32, x, lead.target_layer, fp_methods) if fp_methods else None
            with torch.inference_mode():
                fp_logits = fp_cams.logits if fp_cams else lead.fp32(x)
            self.forward_passes[fp_label] += 1
            for pair in group:
                cam = cam_states.get(pair.name)
                if cam is None:
                    with torch.inference_mode():
                        q_logits = pair.quantized(x)
                else:  # the CAM forward's logits serve the classification metrics: no second forward
                    q_cams = compute_cams(pair.quantized, x, pair.quantized_target_layer, [cam.method],
                                          targets=fp_cams.targets)
                    q_logits = q_cams.logits
                    cam.update(fp_cams.maps[cam.method], q_cams.maps[cam.method], batch.ids, weights, pixels,
                               batch.saliency)
                self.forward_passes[pair.name] += 1
                states[pair.name].update(fp_logits, q_logits, batch.labels, batch.ids, batch.groups, weights)
            if self.progress is not None:
                self.progress(label, done, total)
        for pair in group:
            st = states[pair.name]
            estimates = st.results() if st.n else {}
            cam = cam_states.get(pair.name)
            if cam is not None:
                estimates.update(cam.results())
            self._cache[(pair.name, perturbation, level)] = CaseResult(
                pair.name, perturbation, level, st.n, estimates, dict(st.nonfinite), list(st.nonfinite_ids), st, cam)

    def cached_results(self) -> list[CaseResult]:
        return list(self._cache.values())

    def forward_report(self) -> dict:
        """Model calls per model and per perturbed batch (1.0 means no duplicated forward)."""
        per_batch = {}
        for pair in self.pairs.values():
            fp_label = self.fp32_label(self.group_of(pair))
            batches = self.perturbed_batches[fp_label]
            if batches:
                per_batch[fp_label] = self.forward_passes[fp_label] / batches
                per_batch[pair.name] = self.forward_passes[pair.name] / batches
        return {"forward_passes": dict(self.forward_passes), "perturbed_batches": dict(self.perturbed_batches),
                "forwards_per_perturbed_batch": per_batch}
