"""Validation of the ``pairs:`` and ``datasets:`` sections of a thresholds file (specs, not models).

What can be checked without building a model is checked here, when pytest starts: keys, paths, numbers,
references between sections. Building and probing the models happens later, once per pair.
"""
from __future__ import annotations

from pathlib import Path

from qrobust.errors import show
from qrobust.registry import did_you_mean

PAIR_KEYS = {"arch", "builder", "weights", "trust", "num_classes", "preset", "preprocess", "dataset", "calibration",
             "target_layer", "quantized_target_layer"}
DATASET_KEYS = {"folder", "builder", "resolution", "boxes", "saliency", "num_classes", "max_samples", "workers"}


def _one_of(v, spec: dict, key: str, options: tuple[str, str]) -> str:
    present = [o for o in options if o in spec]
    if len(present) != 1:
        v.fail(key, f"needs exactly one of {' or '.join(options)}, got {present or 'neither'}")
    value = spec[present[0]]
    if not isinstance(value, str) or not value:
        v.fail(f"{key}.{present[0]}", f"expected a string, got {show(value)}")
    if present[0] == "builder" and value.count(":") != 1:
        v.fail(f"{key}.builder", f"expected 'module:function', got {show(value)}")
    return present[0]


def _resolution(v, value, key: str) -> None:
    if not isinstance(value, list) or len(value) != 2:
        v.fail(key, f"expected [height, width], got {show(value)}")
    for i, side in enumerate(value):
        v.whole(side, f"{key}[{i}]", minimum=1)


def _existing(v, base: Path, value, key: str, directory: bool = False) -> None:
    if not isinstance(value, str):
        v.fail(key, f"expected a path, got {show(value)}")
    target = base / value
    if not (target.is_dir() if directory else target.is_file()):
        v.fail(key, f"{target} does not exist" + (" or is not a folder" if directory else ""))


def validate_dataset(v, name: str, spec: dict, base: Path) -> None:
    key = v.join("datasets", name)
    v.keys(spec, key, DATASET_KEYS)
    if _one_of(v, spec, key, ("folder", "builder")) == "folder":
        _existing(v, base, spec["folder"], f"{key}.folder", directory=True)
        if "resolution" not in spec:
            v.fail(f"{key}.resolution", "an image folder needs the model resolution [height, width]")
        _resolution(v, spec["resolution"], f"{key}.resolution")
        if "boxes" in spec:
            _existing(v, base, spec["boxes"], f"{key}.boxes")
        if "saliency" in spec:
            _existing(v, base, spec["saliency"], f"{key}.saliency", directory=True)
        if "workers" in spec:
            v.whole(spec["workers"], f"{key}.workers", minimum=0)
    elif "num_classes" not in spec:
        v.fail(f"{key}.num_classes", "a builder dataset needs its class count")
    for whole in ("num_classes", "max_samples"):
        if whole in spec:
            v.whole(spec[whole], f"{key}.{whole}", minimum=1)


def validate_pair(v, name: str, spec: dict, base: Path, datasets: set[str]) -> None:
    from qrobust.data import DATASETS
    from qrobust.quant import PRESETS

    key = v.join("pairs", name)
    v.keys(spec, key, PAIR_KEYS)
    source = _one_of(v, spec, key, ("arch", "builder"))
    if source == "arch":
        from qrobust.models.archs import TORCHVISION_ARCHS
        if spec["arch"] not in TORCHVISION_ARCHS:
            v.fail(f"{key}.arch", f"unknown architecture {show(spec['arch'])}{did_you_mean(spec['arch'], TORCHVISION_ARCHS)}")
        if "weights" not in spec:
            v.fail(f"{key}.weights", "needs a checkpoint path, 'hub' (torch hub cache, never downloaded) or 'random' "
                                     "(explicit opt-in, for latency and pipeline checks only)")
    weights = spec.get("weights")
    if weights is not None and weights not in ("hub", "random"):
        _existing(v, base, weights, f"{key}.weights")
    if "trust" in spec and not isinstance(spec["trust"], bool):
        v.fail(f"{key}.trust", f"expected true or false, got {show(spec['trust'])}")
    for required in ("num_classes", "preprocess", "dataset"):
        if required not in spec:
            v.fail(f"{key}.{required}", "is required")
    v.whole(spec["num_classes"], f"{key}.num_classes", minimum=1)
    pre = v.mapping(spec["preprocess"], f"{key}.preprocess")
    v.keys(pre, f"{key}.preprocess", {"resolution", "mean", "std"})
    _resolution(v, pre.get("resolution"), f"{key}.preprocess.resolution")
    for part in ("mean", "std"):
        values = pre.get(part)
        if not isinstance(values, list) or not values:
            v.fail(f"{key}.preprocess.{part}", f"expected a list with one number per channel, got {show(values)}")
        for i, x in enumerate(values):
            v.number(x, f"{key}.preprocess.{part}[{i}]", minimum=None if part == "mean" else 1e-12)
    if len(pre["mean"]) != len(pre["std"]):
        v.fail(f"{key}.preprocess", "mean and std need one entry per channel each")
    for ref_key in ("dataset",) + (("calibration",) if "calibration" in spec else ()):
        ref = spec[ref_key] if ref_key == "dataset" else v.mapping(spec["calibration"], f"{key}.calibration").get("dataset")
        if ref not in datasets and ref not in DATASETS:
            v.fail(f"{key}.{ref_key}", f"unknown dataset {show(ref)} (declared: {', '.join(sorted(datasets)) or 'none'})")
    if "preset" in spec:
        if spec["preset"] not in PRESETS:
            v.fail(f"{key}.preset", f"unknown preset {show(spec['preset'])}{did_you_mean(spec['preset'], PRESETS)} "
                                    f"(known: {', '.join(PRESETS)})")
        if "calibration" not in spec:
            v.fail(f"{key}.calibration", "post-training quantization needs calibration data: "
                                         "{dataset: NAME, samples: N}, never the gated test split")
        cal = v.mapping(spec["calibration"], f"{key}.calibration")
        v.keys(cal, f"{key}.calibration", {"dataset", "samples"})
        if "samples" in cal:
            v.whole(cal["samples"], f"{key}.calibration.samples", minimum=1)
    elif source == "arch":
        v.fail(f"{key}.preset", "an arch pair needs a quantization preset")
