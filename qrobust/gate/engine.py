"""The evaluation engine: each (pair, perturbation, level) case is computed once per session.

Pairs that share one FP32 model object, dataset and preprocessing form a *group*: a perturbed batch is
made once, the FP32 model runs on it once, and every quantized twin in the group runs on the same input
(bit sweeps and config matrices pay for one FP32 forward). All results of a group for a case are cached
together. Forward passes are counted per model so duplicated work shows up in the report.

Placement: FP32 and fake-quant models run on ``device``; real int8 twins on the CPU, their kernels'
only home. Batches are made and perturbed on the CPU (pixel-identical whatever the device; FGSM's
gradient flows back through the move) and meet each model only through ``qrobust.placement.feed``, on
the model's device. Metrics are computed on the CPU from the models' outputs.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator, Sequence

import torch

from qrobust.data import ImageSet, StreamingSet, load_dataset
from qrobust.data.perturbations import PERTURBATIONS, perturb
from qrobust.errors import ModelOutputError, UnsupportedError, invalid
from qrobust.explain.cam import compute_cams, method as cam_method
from qrobust.explain.layers import match_twin_layer
from qrobust.gate.config import Thresholds
from qrobust.gate.slots import SlotStore
from qrobust.metrics.catalog import LAYER_METRICS
from qrobust.metrics.classification import PairMetrics
from qrobust.metrics.saliency import CamAgreement
from qrobust.metrics.stats import Estimate, poisson_weights
from qrobust.models.pair import ModelPair
from qrobust.placement import feed, stage
from qrobust.quant.convert import is_runtime
from qrobust.quant.taps import Taps, calibration_batches, calibration_reference, leaf_modules, match_fp32, \
    quantized_layers, tappable
from qrobust.runtimes.base import differentiable, runtime_name

CLEAN = "clean"  # cache key of the unperturbed input (level 0 of every perturbation)
MAX_BATCH_PIXELS = 8 * 224 * 224  # input pixels per batch (per channel): 8 ImageNet images, 392 digits
SHARD_SAMPLES = 128  # a case's samples are folded in shards of about this many: the unit jobs split (qrobust.gate.shards)
MODEL_WORK_BYTES = 256 * 2**20  # fgsm's int8 gradient signs kept for the next level; beyond this, recomputed


class BoundedCache(dict):
    """A dict that stops taking tensors once they hold ``limit`` bytes (later entries are recomputed)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.used = limit, 0

    def __setitem__(self, key, value):
        size = value.numel() * value.element_size()
        if key in self or self.used + size <= self.limit:
            self.used += 0 if key in self else size
            super().__setitem__(key, value)


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


def case_key(perturbation: str, level: float) -> tuple[str, float]:
    """The evaluated case behind (perturbation, level): level 0 of every perturbation, and ``CLEAN``, is the
    one clean case; other levels are checked against the perturbation's range."""
    if perturbation == CLEAN:
        return CLEAN, 0.0
    spec = PERTURBATIONS.get(perturbation)
    level = spec.check_level(level)
    return (CLEAN, 0.0) if level == 0 else (spec.name, level)


def fold(parts: dict[int, dict[str, tuple[PairMetrics, CamAgreement | None]]],
         into: dict[str, tuple[PairMetrics, CamAgreement | None]]) -> None:
    """Merge shards' states into ``into`` (by pair) in shard order: the order every run folds them in, so
    one job, N jobs merged and N workers compute the same sums."""
    for index in sorted(parts):
        for name, (metrics, cam) in parts[index].items():
            total, total_cam = into[name]
            total.merge(metrics)
            if cam is not None:
                total_cam.merge(cam)


def case_result(pair: str, perturbation: str, level: float, state: PairMetrics, cam: CamAgreement | None,
                sample_name: Callable[[int], str] = str) -> CaseResult:
    """A case's result from its (folded) states."""
    estimates = state.results() if state.n else {}
    for row in state.flipped:  # shared by the agreement and top-k records of the case
        row["sample"] = sample_name(row["id"])
    if cam is not None:
        estimates.update(cam.results())
    return CaseResult(pair, perturbation, level, state.n, estimates, dict(state.nonfinite), list(state.nonfinite_ids),
                      state, cam)


def written_states(part: dict[str, tuple[PairMetrics, CamAgreement | None]]) -> dict[str, dict]:
    """One shard's states as plain tensors and numbers, by pair (what slot and job files hold)."""
    return {name: {"metrics": metrics.state(), "cam": cam.state() if cam is not None else None}
            for name, (metrics, cam) in part.items()}


def read_states(written: dict[int, dict[str, dict]]) -> dict[int, dict[str, tuple[PairMetrics, CamAgreement | None]]]:
    """Shards' states as written (``written_states``), back as objects."""
    return {index: {name: (PairMetrics.from_state(s["metrics"]),
                           CamAgreement.from_state(s["cam"]) if s["cam"] is not None else None)
                    for name, s in part.items()} for index, part in written.items()}


def shard_layout(samples: int, batch_size: int) -> tuple[int, int]:
    """(batches per shard, shards) of a case: shards of SHARD_SAMPLES samples in whole batches, whatever
    the machine, so every run folds the same shards."""
    per_shard = max(1, SHARD_SAMPLES // batch_size)
    return per_shard, max(1, math.ceil(math.ceil(samples / batch_size) / per_shard))


def fp32_label(group: Sequence[ModelPair]) -> str:
    return f"fp32[{group[0].name}]"


def forwards_per_batch(forwards: Counter, batches: Counter, groups: dict[str, str]) -> dict[str, float]:
    """Model calls per perturbed batch, per FP32 model and per twin (1.0 means no duplicated forward).
    ``groups`` maps each pair to its FP32 model's label."""
    per_batch = {}
    for pair, fp_label in groups.items():
        if batches[fp_label]:
            per_batch[fp_label] = forwards[fp_label] / batches[fp_label]
            per_batch[pair] = forwards[pair] / batches[fp_label]
    return per_batch


class _Case:
    """One case's evaluation plan: its group, data, CAM pairs, shard layout and the shards this run takes."""

    def __init__(self, evaluator: Evaluator, group: list[ModelPair], perturbation: str, level: float):
        lead = group[0]
        self.evaluator, self.group, self.perturbation, self.level = evaluator, group, perturbation, level
        self.data = evaluator.dataset(lead.dataset)
        # pairs without a CAM layer get no CAM metrics (their CAM checks skip, with the reason)
        self.cam_pairs = [p for p in group if (p.target_layer or not cam_method(evaluator.cam_methods[p.name]).uses_layer)
                          and evaluator._listed(evaluator.cam_cases, p.name, perturbation, level)]
        self.fp_layer = next((p.target_layer for p in self.cam_pairs if p.target_layer), None)
        if any(p.target_layer not in (None, self.fp_layer) for p in self.cam_pairs):
            raise invalid("target_layer", sorted({p.target_layer for p in self.cam_pairs}),
                          f"pairs sharing {lead.name!r}'s FP32 model must name one CAM layer")
        # pairs whose twin's layers are tapped in this case's forwards (qrobust.quant.taps)
        live = [p for p in group if tappable(p.quantized)]
        self.clip_pairs = [p for p in live if evaluator._listed(evaluator.layer_cases["clip_excess"], p.name,
                                                                perturbation, level)]
        self.sqnr_pairs = [p for p in live if not is_runtime(p.fp32) and evaluator._listed(
            evaluator.layer_cases["layer_sqnr_db"], p.name, perturbation, level)]
        self.batch_size = evaluator.batch_size_for(lead)
        self.per_shard, self.count = shard_layout(len(self.data), self.batch_size)
        shard = evaluator.shard
        self.mine = [i for i in range(self.count) if shard is None or i % shard[1] == shard[0] - 1]
        batches = math.ceil(len(self.data) / self.batch_size)
        self.total = sum(min((i + 1) * self.per_shard, batches) - i * self.per_shard for i in self.mine)
        self.label, self.done = f"{lead.name} {perturbation} @ {level:g}", 0
        # the same key in every worker: which pairs, which case, which cams
        self.unit = repr((sorted(p.name for p in group), perturbation, level, sorted(p.name for p in self.cam_pairs),
                          sorted(p.name for p in self.clip_pairs), sorted(p.name for p in self.sqnr_pairs)))

    def fresh(self) -> tuple[dict[str, PairMetrics], dict[str, CamAgreement]]:
        ev = self.evaluator
        return ({p.name: PairMetrics(p.num_classes, ev.seed, ev.replicates, ev.f1_average,
                                     ev.operating_points.get(p.name)) for p in self.group},
                {p.name: CamAgreement(ev.cam_methods[p.name], ev.seed, ev.replicates,
                                      capacity=math.ceil(0.05 * len(self.data))) for p in self.cam_pairs})


class Evaluator:
    """Evaluates cases lazily and caches them; ``forward_passes`` counts model calls per model.

    ``wanted`` (pair, perturbation, level) triples, when given, limit which group mates run along with a
    requested case, so a pair gated only on clean inputs (a bit sweep) is not run on every perturbation.
    Pairs can be added after construction (``add``), or built on first use by ``loader(name)``.
    """

    def __init__(self, pairs: Sequence[ModelPair] = (), *, seed: int = Thresholds.seed,
                 batch_size: int = Thresholds.batch_size, max_samples: int | None = None,
                 replicates: int = Thresholds.replicates, f1_average: str = Thresholds.f1_average,
                 datasets: dict[str, ImageSet | StreamingSet] | None = None, device: str = "cpu",
                 wanted: set[tuple[str, str, float]] | None = None,
                 cam_cases: set[tuple[str, str, float]] | None = None, cam_methods: dict[str, str] | None = None,
                 loader: Callable[[str], None] | None = None,
                 progress: Callable[[str, int, int], None] | None = None, shard: tuple[int, int] | None = None,
                 slots: SlotStore | None = None, layer_cases: dict[str, set[tuple[str, str, float]]] | None = None,
                 operating_points: dict[str, float] | None = None):
        from qrobust._validation import check_int

        check_int("batch_size", batch_size, minimum=1)
        self.device = torch.device(device)
        self.pairs: dict[str, ModelPair] = {}
        self.cam_methods: dict[str, str] = {}
        self._method_overrides = dict(cam_methods or {})
        self.wanted = wanted
        self.cam_cases = set(cam_cases or ())
        # per layer metric, the cases that gate it: their forwards tap the twin's layers
        self.layer_cases = {m: set((layer_cases or {}).get(m, ())) for m in LAYER_METRICS}
        self.operating_points = dict(operating_points or {})  # pair -> its deployment threshold tau
        self._clip_reference: dict[str, tuple[dict, bool]] = {}  # pair -> (its layers' clip reference, calibrated)
        self._layer_match: dict[str, dict[str, str]] = {}  # pair -> {twin layer: the FP32 module it computes}
        self.seed, self.batch_size, self.max_samples = seed, batch_size, max_samples
        self.replicates, self.f1_average = replicates, f1_average
        self.datasets = dict(datasets or {})  # declared datasets by name (others load from the registry)
        self._subsets: dict[str, ImageSet | StreamingSet] = {}
        self._cache: dict[tuple[str, str, float], CaseResult] = {}
        self._loader = loader
        self._model_work: dict[int, BoundedCache] = {}  # per FP32 model: fgsm's gradient signs by batch
        self._fp64: dict[int, torch.nn.Module] = {}  # per FP32 model: its float64 copy, for fgsm's gradient
        self.forward_passes: Counter[str] = Counter()
        self.perturbed_batches: Counter[str] = Counter()
        self.progress = progress  # progress(label, batches done, batches in all), after every batch
        self.shard = shard  # (K, N): evaluate only the sample shards i with i % N == K - 1 (qrobust.gate.shards)
        self.shard_states: dict[tuple[str, str, float], dict[int, dict]] = {}  # with ``shard``: each shard's states
        self.shard_counts: dict[tuple[str, str, float], int] = {}  # shards per evaluated case
        self.slots = slots  # under xdist: the store through which workers share a case's shards
        for pair in pairs:
            self.add(pair)

    def add(self, pair: ModelPair, probe: bool = True) -> None:
        """Make ``pair`` available after probing it: its FP32 model (and fake-quant twin) move to the
        evaluator's device, and one clean batch must give both models' outputs the right shape, finite.
        A pair that fails the probe raises ModelOutputError and is not added. ``probe=False`` is for
        exporting a pair's inputs (qrobust.exchange), which never runs its twin."""
        if pair.name in self.pairs:
            return
        pair.fp32.to(self.device)
        pair.quantized.to(self.twin_device(pair))
        if probe:
            self.probe(pair)
        self.pairs[pair.name] = pair
        gradients = pair.kind != "int8" and differentiable(pair.fp32) and differentiable(pair.quantized)
        self.cam_methods[pair.name] = self._method_overrides.get(pair.name, "gradcampp" if gradients else "eigencam")

    def twin_device(self, pair: ModelPair) -> torch.device:
        """Real int8 kernels run on the CPU (an ONNX Runtime twin takes CPU tensors and places them on its
        execution provider); fake-quant twins are plain float models on ``device``."""
        return torch.device("cpu") if pair.kind == "int8" else self.device

    def _pair(self, name: str) -> ModelPair:
        if name not in self.pairs and self._loader is not None:
            self._loader(name)
        if name not in self.pairs:
            raise invalid("pair", name, f"not loaded in this session (loaded: {', '.join(self.pairs) or 'none'})")
        return self.pairs[name]

    # ---- groups and data ---------------------------------------------------------------------------
    def group_of(self, pair: ModelPair) -> list[ModelPair]:
        """The pairs evaluated together with ``pair`` (same FP32 object, dataset and preprocessing)."""
        return [p for p in self.pairs.values()
                if p.fp32 is pair.fp32 and p.dataset == pair.dataset and p.preprocess == pair.preprocess]

    def dataset(self, name: str) -> ImageSet | StreamingSet:
        """The dataset as evaluated (subsampled to ``max_samples``), built once per session."""
        if name not in self._subsets:
            data = self.datasets[name] if name in self.datasets else load_dataset(name)
            self._subsets[name] = data.subset(self.max_samples, self.seed)
        return self._subsets[name]

    def batch_size_for(self, pair: ModelPair) -> int:
        """``batch_size``, capped at MAX_BATCH_PIXELS of input: results do not depend on the batch size,
        but large batches of large images make every activation bigger than the allocator's 32 MB
        mmap threshold, and each op then pays fresh page faults."""
        height, width = pair.preprocess.resolution
        return max(1, min(self.batch_size, MAX_BATCH_PIXELS // (height * width)))

    def probe(self, pair: ModelPair) -> None:
        """One small clean batch through both models: right resolution and labels for the dataset, output
        shape (batch, num_classes), finite outputs. Raises with one line naming what is wrong."""
        data = self.dataset(pair.dataset)
        batch = next(data.batches(min(self.batch_size_for(pair), len(data), 8)))
        if tuple(batch.images.shape[-3:]) != (pair.preprocess.channels, *pair.preprocess.resolution):
            raise invalid("dataset", pair.dataset, f"images are {tuple(batch.images.shape[-3:])} (C, H, W) but pair "
                                                   f"{pair.name!r} expects {(pair.preprocess.channels, *pair.preprocess.resolution)}")
        self._check_labels(pair, batch.labels)
        x = pair.preprocess.normalize(batch.images)
        with torch.inference_mode(), stage("probe", pair.name):
            outputs = {"fp32": feed(pair.fp32, x, role="fp32"), "quantized": feed(pair.quantized, x, role="twin")}
        self.forward_passes["probe"] += 2
        expected = (len(x), pair.num_classes)
        for model, out in outputs.items():
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ModelOutputError(f"pair {pair.name!r}: {model} model returned shape {shape}, "
                                       f"expected {expected} (batch, num_classes)")
            bad = ~torch.isfinite(out.cpu()).all(dim=1)
            if bad.any():
                raise ModelOutputError(f"pair {pair.name!r}: {model} model returned NaN/Inf on clean input "
                                       f"for {int(bad.sum())} of {len(x)} probe samples "
                                       f"(first ids {batch.ids[bad][:5].tolist()})")
        if pair.target_layer is not None and not pair.twin_layer_given and differentiable(pair.fp32):
            # the twin's CAM tensor must be FP32's: settle the structural guess with this batch
            with stage("match layer", pair.name):
                layer, error = match_twin_layer(pair.fp32, pair.quantized, pair.target_layer, x)
            pair.quantized_target_layer = layer
            pair.metadata["cam_layer_match_error"] = error

    # ---- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, pair: str, perturbation: str, level: float, cam: bool = False,
                 layers: tuple[str, ...] = ()) -> CaseResult:
        """The result of one case, computed once (with every pair of its group) and then cached.

        ``cam=True`` asks for the CAM agreement metrics too; cases listed in ``cam_cases`` get them in
        their one pass, any other case pays a second pass (counted in ``forward_passes``). ``layers``
        names layer metrics to compute, as ``layer_cases`` does for a whole run (before the first pass).
        """
        self._pair(pair)
        spec = PERTURBATIONS.get(perturbation)
        level = spec.check_level(level)
        if cam:
            self.cam_cases.add((pair, spec.name, level))
        for metric in layers:
            self.layer_cases[metric].add((pair, spec.name, level))
        if level == 0:  # every perturbation's level 0 is the clean input: evaluate it once
            clean = self._cached(pair, CLEAN, 0.0, cam)
            return dataclasses.replace(clean, perturbation=spec.name)
        return self._cached(pair, spec.name, level, cam)

    def _cached(self, pair: str, perturbation: str, level: float, cam: bool = False) -> CaseResult:
        key = (pair, perturbation, level)
        if key not in self._cache:
            self._run(self._group_for(pair, perturbation, level), perturbation, level)
        elif cam and self._cache[key].cam is None:
            self._run([self.pairs[pair]], perturbation, level)
        return self._cache[key]

    def _group_for(self, pair: str, perturbation: str, level: float) -> list[ModelPair]:
        """The pairs evaluated with ``pair`` on this case: its group mates the plan wants there."""
        return [p for p in self.group_of(self.pairs[pair])
                if p.name == pair or self._listed(self.wanted, p.name, perturbation, level)]

    @staticmethod
    def _listed(cases: set[tuple[str, str, float]] | None, pair: str, perturbation: str, level: float) -> bool:
        """Whether (pair, perturbation, level) is in ``cases`` (None lists everything); CLEAN matches any
        perturbation's level 0."""
        if cases is None:
            return True
        if perturbation == CLEAN:
            return any(p == pair and lv == 0 for p, _, lv in cases)
        return (pair, perturbation, level) in cases

    @staticmethod
    def _check_labels(pair: ModelPair, labels: torch.Tensor) -> None:
        if len(labels) and (int(labels.max()) >= pair.num_classes or int(labels.min()) < 0):
            raise invalid("dataset", pair.dataset, f"has labels {int(labels.min())}..{int(labels.max())} "
                                                   f"but pair {pair.name!r} has {pair.num_classes} classes")

    def _run(self, group: list[ModelPair], perturbation: str, level: float) -> None:
        """Evaluate one case for ``group``, shard by shard: each sample shard gets fresh states, folded in
        shard order into the case's (so a job running only some shards, ``shard``, holds exactly the states
        another run's fold adds: qrobust.gate.shards). Under xdist with ``slots``, other workers may
        evaluate some of the shards meanwhile (qrobust.gate.slots)."""
        case = _Case(self, group, perturbation, level)
        parts: dict[int, dict[str, tuple[PairMetrics, CamAgreement | None]]] = {}
        if self.slots is None or len(case.mine) < 2:
            parts = self._evaluate_shards(case, case.mine)
        else:
            others = []
            for slot in range(self.slots.count):
                indices = case.mine[slot::self.slots.count]
                if indices and self.slots.claim(case.unit, slot):
                    parts.update(self._evaluate_shards(case, indices))
                elif indices:
                    others.append(slot)
            for slot in others:  # being evaluated by another worker now: wait for its states
                written = self.slots.take(case.unit, slot)
                parts.update(read_states(written) if written is not None
                             else self._evaluate_shards(case, case.mine[slot::self.slots.count]))
        states, cam_states = case.fresh()
        fold(parts, {name: (state, cam_states.get(name)) for name, state in states.items()})
        if self.shard is not None:
            for index, part in parts.items():
                for name, state in written_states(part).items():
                    self.shard_states.setdefault((name, perturbation, level), {})[index] = state
        for pair in group:
            self.shard_counts[(pair.name, perturbation, level)] = case.count
            self._cache[(pair.name, perturbation, level)] = case_result(
                pair.name, perturbation, level, states[pair.name], cam_states.get(pair.name), case.data.sample_name)

    def evaluate_share(self, pair: str, perturbation: str, level: float, slot: int) -> None:
        """Under xdist: evaluate ``slot`` of a case's shards for the worker judging it, unless the case is
        done here or the slot is taken (qrobust.gate.slots)."""
        if self.slots is None:
            return
        self._pair(pair)
        name, level = case_key(perturbation, level)
        if (pair, name, level) in self._cache:
            return
        case = _Case(self, self._group_for(pair, name, level), name, level)
        indices = case.mine[slot::self.slots.count]
        if not indices or not self.slots.claim(case.unit, slot):
            return
        try:
            parts = self._evaluate_shards(case, indices)
            self.slots.put(case.unit, slot, {index: written_states(part) for index, part in parts.items()})
        except BaseException:
            self.slots.give_up(case.unit, slot)
            raise

    def _evaluate_shards(self, case: _Case, indices: list[int]) -> dict[int, dict[str, tuple[PairMetrics, CamAgreement | None]]]:
        """The states of the shards ``indices``, each from fresh states: {shard: {pair: (metrics, cam)}}."""
        parts = {}
        for index in indices:
            part, part_cams = case.fresh()
            for batch in case.data.batches(case.batch_size, index * case.per_shard, (index + 1) * case.per_shard):
                self._evaluate_batch(case, batch, part, part_cams)
                case.done += 1
                if self.progress is not None:
                    self.progress(case.label, case.done, case.total)
            parts[index] = {name: (state, part_cams.get(name)) for name, state in part.items()}
        return parts

    def _evaluate_batch(self, case: _Case, batch, states: dict[str, PairMetrics],
                        cam_states: dict[str, CamAgreement]) -> None:
        """One batch through the group: perturbed once, one FP32 forward, one forward per twin (the layer
        taps and CAM hooks ride on those forwards)."""
        group, perturbation, level = case.group, case.perturbation, case.level
        lead = group[0]
        fp_methods = sorted({cam.method for cam in cam_states.values()})
        fp_label = fp32_label(self.group_of(lead))
        self._check_labels(lead, batch.labels)
        pixels = batch.images if perturbation == CLEAN else self._perturb(lead, batch, perturbation, level)
        self.perturbed_batches[fp_label] += 1
        x = lead.preprocess.normalize(pixels)
        weights = poisson_weights(self.seed, batch.groups, self.replicates)
        matches = {p.name: self.layer_match(p) for p in case.sqnr_pairs}
        fp_keep = {name for found in matches.values() for name in found.values()}
        with stage("CAM" if fp_methods else "evaluate", lead.name), Taps(lead.fp32, keep=fp_keep) as fp_taps:
            fp_cams = compute_cams(lead.fp32, x, case.fp_layer, fp_methods) if fp_methods else None
            with torch.inference_mode():
                fp_logits = fp_cams.logits if fp_cams else feed(lead.fp32, x, role="fp32").cpu()
        self.forward_passes[fp_label] += 1
        for pair in group:
            cam = cam_states.get(pair.name)
            reference, calibrated = self.clip_reference(pair) if pair in case.clip_pairs else ({}, True)
            rules = {layer: rule for layer, (rule, _) in reference.items()}
            with Taps(pair.quantized, rules, keep=matches.get(pair.name, {})) as taps:
                if cam is None:
                    with torch.inference_mode(), stage("evaluate", pair.name):
                        q_logits = feed(pair.quantized, x, role="twin").cpu()
                else:  # the CAM forward's logits serve the classification metrics: no second forward
                    with stage("CAM", pair.name):
                        q_cams = compute_cams(pair.quantized, x, pair.quantized_target_layer, [cam.method],
                                              targets=fp_cams.targets)
                    q_logits = q_cams.logits
                    cam.update(fp_cams.maps[cam.method], q_cams.maps[cam.method], batch.ids, weights, pixels,
                               batch.saliency, top1=(fp_logits.argmax(1), q_logits.argmax(1)))
            self.forward_passes[pair.name] += 1
            if rules:
                states[pair.name].layers.update_clip(taps.clips, {k: share for k, (_, share) in reference.items()},
                                                     calibrated, weights)
            if pair.name in matches:
                states[pair.name].layers.update_sqnr(fp_taps.outputs, taps.outputs, matches[pair.name], weights)
            states[pair.name].update(fp_logits, q_logits, batch.labels, batch.ids, batch.groups, weights)

    def clip_reference(self, pair: ModelPair) -> tuple[dict, bool]:
        """The twin's clip rule and calibration-split share per quantized layer, and whether its calibration
        split is known (qrobust.quant.taps), computed once per pair."""
        if pair.name not in self._clip_reference:
            batches = calibration_batches(pair.quantized)
            device = self.twin_device(pair)
            with stage("calibrate", pair.name):
                reference = calibration_reference(pair.quantized, [b.to(device) for b in batches] if batches else None)
            self._clip_reference[pair.name] = reference, batches is not None
        return self._clip_reference[pair.name]

    def layer_match(self, pair: ModelPair) -> dict[str, str]:
        """Which FP32 module each of the twin's quantized layers computes, settled once per pair on the
        dataset's first clean batch (as the probe: the same in every process and shard)."""
        if pair.name not in self._layer_match:
            data = self.dataset(pair.dataset)
            x = pair.preprocess.normalize(next(data.batches(min(self.batch_size_for(pair), len(data), 8))).images)
            layers = quantized_layers(pair.quantized)
            with Taps(pair.fp32, keep=leaf_modules(pair.fp32)) as fp, torch.inference_mode():
                feed(pair.fp32, x, role="fp32")
            with Taps(pair.quantized, keep=layers) as twin, torch.inference_mode():
                feed(pair.quantized, x, role="twin")
            self.forward_passes["layer match"] += 2
            self._layer_match[pair.name] = match_fp32(fp.outputs, twin.outputs)
        return self._layer_match[pair.name]

    def _perturb(self, lead: ModelPair, batch, perturbation: str, level: float) -> torch.Tensor:
        """The perturbed pixels of ``batch`` (CPU), the same for every pair of the group."""
        if PERTURBATIONS.get(perturbation).needs_model:
            if not differentiable(lead.fp32):
                raise UnsupportedError(f"{perturbation} needs the FP32 model's input gradients and pair {lead.name!r}'s "
                                       f"FP32 runs on {runtime_name(lead.fp32)}: give the pair a torch FP32 model")
            normalize = lead.preprocess.normalize
            cache = self._model_work.setdefault(id(lead.fp32), BoundedCache(MODEL_WORK_BYTES))
            fp64 = self._float64(lead.fp32)

            def model(x):  # counted: the attack's gradient pass is model work too
                self.forward_passes[f"{fp32_label(self.group_of(lead))} gradient"] += 1
                return feed(fp64, x.double(), role="fp32 (float64 copy)")

            with stage("attack", lead.name):
                return perturb(perturbation, batch.images, level, ids=batch.ids, seed=self.seed, boxes=batch.boxes,
                               model=model, normalize=normalize, cache=cache)
        return perturb(perturbation, batch.images, level, ids=batch.ids, seed=self.seed, boxes=batch.boxes)

    def _float64(self, fp32: torch.nn.Module) -> torch.nn.Module:
        """A float64 copy of an FP32 model, made once: FGSM's gradient signs are then the same on every CPU
        (``qrobust.data.perturbations.fgsm``). Kept while the session runs, beside the FP32 model."""
        if id(fp32) not in self._fp64:
            self._fp64[id(fp32)] = copy.deepcopy(fp32).double()
        return self._fp64[id(fp32)]

    def case_batches(self, pair: str, perturbation: str, level: float) -> Iterator[tuple[object, torch.Tensor]]:
        """Every batch of a case with the normalized input the twin is fed, as the evaluation cuts and
        perturbs it (the export of qrobust.exchange)."""
        lead = self._pair(pair)
        name, level = case_key(perturbation, level)
        for batch in self.dataset(lead.dataset).batches(self.batch_size_for(lead)):
            pixels = batch.images if name == CLEAN else self._perturb(lead, batch, name, level)
            yield batch, lead.preprocess.normalize(pixels)

    def case_inputs(self, pair: str, perturbation: str, level: float, count: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalized model inputs of a case's first ``count`` samples (as the gate fed them: the same
        seeded perturbation), and their sample ids."""
        xs, ids, seen = [], [], 0
        for batch, x in self.case_batches(pair, perturbation, level):
            xs.append(x)
            ids.append(batch.ids)
            seen += len(batch.ids)
            if seen >= count:
                break
        return torch.cat(xs)[:count], torch.cat(ids)[:count]

    def cached_results(self) -> list[CaseResult]:
        return list(self._cache.values())

    def groups(self) -> dict[str, str]:
        """Each loaded pair's FP32 label (which FP32 forward it shares)."""
        return {name: fp32_label(self.group_of(pair)) for name, pair in self.pairs.items()}

    def forward_report(self) -> dict:
        """Model calls per model and per perturbed batch (1.0 means no duplicated forward)."""
        return {"forward_passes": dict(self.forward_passes), "perturbed_batches": dict(self.perturbed_batches),
                "forwards_per_perturbed_batch": forwards_per_batch(self.forward_passes, self.perturbed_batches,
                                                                   self.groups())}
