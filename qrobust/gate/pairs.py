"""The pairs of a gate run: each built once per process and probed before its first case, the ones that
cannot be built or probed remembered with their one line (each of their checks fails with it, the others
run), grouped by the FP32 model they share, and what each can compute known before it is built."""
from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from qrobust.errors import QrobustError, one_line
from qrobust.gate.config import Thresholds


class PairUnavailable(QrobustError):
    """A pair could not be built or failed its probe; every check of it fails with this one line."""


class PairCache:
    """Builds pairs on demand (declared in the thresholds file, or registered), each once per process.

    ``probe`` (the evaluator's ``add``) checks a built pair before its first use; ``datasets`` returns the
    run's declared datasets (a declared pair calibrates on them); ``announce`` says which pair is built.
    Whatever fails while a pair is built or probed (a dataset that cannot be read too) is that pair's line."""

    def __init__(self, thresholds: Thresholds, *, probe: Callable, datasets: Callable[[], dict],
                 x86_kernels: str | None = None, announce: Callable[[str], None] | None = None):
        self.thresholds, self.probe, self._datasets = thresholds, probe, datasets
        self.x86_kernels, self.announce = x86_kernels, announce
        self.loaded: dict = {}  # built and probed
        self._built: dict = {}  # built (probed or not)
        self._unbuildable: dict[str, Exception] = {}  # pair -> why its build failed (not tried again)
        self.broken: dict[str, str] = {}  # pair -> the one-line reason it cannot be gated
        self.loads: Counter[str] = Counter()
        self._fp32_cache: dict = {}  # declared pairs on the same weights share one FP32 model

    # ---- before anything is built ------------------------------------------------------------------------
    def facts_of(self, name: str):
        """What pair ``name`` can compute: a registered pair's declared facts, a declared pair's from its
        YAML (its target layer or its architecture's, its dataset's maps and boxes, its class count)."""
        from qrobust.explain.cam import method
        from qrobust.models import PairFacts, pair_entry
        from qrobust.models.archs import TORCHVISION_ARCHS
        from qrobust.quant import PRESETS

        t = self.thresholds
        layer_free = t.cam_method != "auto" and not method(t.cam_method).uses_layer
        spec = t.pairs.get(name)
        if spec is None:
            facts = pair_entry(name).facts
            return dataclasses.replace(facts, cam=True) if layer_free else facts
        recorded = "outputs" in spec  # CAMs only on the activations a runner recorded, for a layer it names
        layer = spec.get("target_layer") or (None if recorded else TORCHVISION_ARCHS.get(spec.get("arch", "")))
        dataset = spec["dataset"]
        runtime = "quantized" in spec or (spec.get("preset") and PRESETS.get(spec["preset"]).runtime != "torch")
        return PairFacts(cam=(layer_free and not recorded) or layer is not None, saliency=self._dataset_has(dataset, "saliency"),
                         boxes=self._dataset_has(dataset, "boxes"), classes=spec["num_classes"], dataset=dataset,
                         live="outputs" not in spec, layers=False if runtime else None)

    def _dataset_has(self, dataset: str, what: str) -> bool | None:
        """Whether a dataset carries ``saliency`` maps or ``boxes``: a declared one's key of that name, a
        built-in's tag; None for other registered datasets (known once loaded)."""
        from qrobust.data import DATASETS

        if dataset in self.thresholds.datasets:
            return what in self.thresholds.datasets[dataset]
        if dataset in DATASETS.names("builtin"):
            return dataset in DATASETS.names(what)
        return None

    def bits_of(self, name: str) -> int | None:
        """The weight bit width of a pair's preset (the bit-width sweep), None without a preset."""
        from qrobust.models import pair_entry
        from qrobust.quant import PRESETS

        spec = self.thresholds.pairs.get(name)
        preset = spec.get("preset") if spec is not None else pair_entry(name).preset
        return None if preset is None else PRESETS.get(preset).weight.bits

    def group_of(self, name: str):
        """Which FP32 model a pair shares with others (None: its own), known before building: a registered
        pair's ``group``, a declared pair's architecture or builder and weights. (The evaluator groups
        built pairs by the FP32 object itself; this says which pairs to build together.)"""
        from qrobust.models import pair_entry
        from qrobust.models.declared import fp32_key

        spec = self.thresholds.pairs.get(name)
        if spec is not None:
            return ("declared", *fp32_key(spec, Path(self.thresholds.path).parent))
        group = pair_entry(name).group
        return None if group is None else ("registered", group)

    # ---- building -------------------------------------------------------------------------------------------
    def pair(self, name: str):
        """A pair, built and probed at most once per process; a pair that cannot be raises PairUnavailable
        with the same one line every time."""
        if name in self.broken:
            raise PairUnavailable(self.broken[name])
        if name not in self.loaded:
            if self.announce is not None:
                self.announce(f"building pair {name}")
            try:
                pair = self.built(name)
                self.probe(pair)  # a pair that fails its probe raises and is not loaded
                self.loaded[name] = pair
            except Exception as exc:  # noqa: BLE001 - any failure of user code is one line, once per pair
                self.broken[name] = f"pair {name} cannot be gated: {one_line(exc)}"
                raise PairUnavailable(self.broken[name]) from None
        return self.loaded[name]

    def built(self, name: str):
        """The pair as built, before (or whatever) its probe says: the quantizer-property checks read a
        twin's parameters even when they are broken enough to fail the probe. A build that failed raises
        the same exception again without building again (it would fail the same way, and could take minutes)."""
        if name in self._unbuildable:
            raise self._unbuildable[name]
        if name not in self._built:
            self.loads[name] += 1
            try:
                self._built[name] = self._build(name)
            except Exception as exc:
                self._unbuildable[name] = exc
                raise
        return self._built[name]

    def _build(self, name: str):
        from qrobust.models import load_pair
        from qrobust.models.declared import build_pair

        declared = self.thresholds.pairs.get(name)
        if declared:
            pair = build_pair(name, declared, Path(self.thresholds.path).parent, self._datasets(), self._fp32_cache)
        else:
            pair = load_pair(name)
        return pair if self.x86_kernels is None else with_x86_kernels(pair, self.x86_kernels)

    def load_with_group(self, name: str, planned: list[str]) -> None:
        """Build ``name`` and the ``planned`` pairs of its group, so one FP32 forward serves all of them."""
        group = self.group_of(name)
        for mate in [p for p in planned if group is not None and self.group_of(p) == group and p != name]:
            try:
                self.pair(mate)
            except PairUnavailable:
                pass  # a broken mate fails its own checks
        self.pair(name)

    def mark_broken(self, name: str, exc: BaseException) -> PairUnavailable:
        """A pair found unusable after its probe (evaluating a case raised): its one line from now on."""
        self.broken.setdefault(name, f"pair {name} cannot be gated: {one_line(exc)}")
        return PairUnavailable(self.broken[name])

    # ---- what the report records of them -------------------------------------------------------------------
    def weights(self) -> dict[str, str]:
        """Tensor fingerprints of every loaded FP32 model's weights, by pair."""
        out = {}
        for pair in self.loaded.values():
            fp = pair.metadata.get("weights_fingerprint")
            if pair.metadata.get("random_weights"):
                fp = "RANDOM WEIGHTS: for latency and pipeline checks only, not a robustness verdict"
            if fp:
                out[pair.name] = fp
        return out

    def provenance(self, evaluator) -> dict[str, dict]:
        """Per loaded pair: its metadata, kind, data, runtimes, int8 kernels and CAM layers."""
        from qrobust.quant.convert import int8_kernels, is_int8
        from qrobust.runtimes import runtime_name

        out = {}
        for name, pair in self.loaded.items():
            out[name] = {**{k: v for k, v in pair.metadata.items() if k != "weights_fingerprint"},
                         "kind": pair.kind, "dataset": pair.dataset, "num_classes": pair.num_classes,
                         "runtimes": {"fp32": runtime_name(pair.fp32), "quantized": runtime_name(pair.quantized)},
                         **({"kernels": int8_kernels(pair.quantized)} if is_int8(pair.quantized) else {}),
                         "cam": {"method": evaluator.cam_methods.get(name) if evaluator else None,
                                 "fp32_layer": pair.target_layer, "quantized_layer": pair.quantized_target_layer},
                         "samples": len(evaluator.dataset(pair.dataset)) if evaluator else None}
        return out


def with_x86_kernels(pair, library: str):
    """``pair`` with its x86-engine int8 twin (and every requantized one) running its convolutions on
    ``library``, as another CPU would; a copy, so the process-wide built-in pair stays as this CPU runs it."""
    from qrobust.quant.convert import is_int8, route_x86_convs

    def routed(twin):
        if not is_int8(twin) or twin.engine != "x86":
            return twin
        twin = copy.deepcopy(twin)
        route_x86_convs(twin, library)
        return twin

    requantize = pair.requantize
    copied = dataclasses.replace(pair, quantized=routed(pair.quantized),
                                 requantize=None if requantize is None else lambda keep: routed(requantize(keep)))
    copied.twin_layer_given = pair.twin_layer_given  # an init=False field: replace() resets it
    return copied
