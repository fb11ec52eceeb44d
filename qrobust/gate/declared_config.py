"""Validation of the ``pairs:`` and ``datasets:`` sections of a thresholds file (specs, not models).

What can be checked without building a model is checked here, when pytest starts: keys, paths, numbers,
references between sections, that a builder imports, that a folder's class count, resolution and
channels fit the pair gated on it. Building and probing the models happens later, once per pair.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from qrobust.errors import QrobustWarning, show
from qrobust.registry import did_you_mean

PAIR_KEYS = {"arch", "builder", "fp32", "reference_outputs", "quantized", "outputs", "providers", "weights", "trust",
             "num_classes", "preset", "preprocess", "dataset", "calibration", "target_layer", "quantized_target_layer"}
DATASET_KEYS = {"folder", "builder", "resolution", "resize", "channels", "boxes", "saliency", "num_classes",
                "max_samples", "workers"}
SPLIT_NAMES = {"train", "val", "valid", "validation", "test", "calib", "calibration"}  # folder names that are not classes


def _one_of(v, spec: dict, key: str, options: tuple[str, ...]) -> str:
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
    if not directory and target.is_dir():  # "does not exist" would send the user looking for a missing file
        v.fail(key, f"{show(str(target), 200)} is a directory, not a file (name the file itself)")
    if not (target.is_dir() if directory else target.is_file()):
        v.fail(key, f"{show(str(target), 200)} does not exist" + (" or is not a folder" if directory else ""))


def validate_dataset(v, name: str, spec: dict, base: Path) -> None:
    key = v.join("datasets", name)
    v.keys(spec, key, DATASET_KEYS)
    if _one_of(v, spec, key, ("folder", "builder")) == "folder":
        _existing(v, base, spec["folder"], f"{key}.folder", directory=True)
        if "resolution" not in spec:
            v.fail(f"{key}.resolution", "an image folder needs the model resolution [height, width]")
        _resolution(v, spec["resolution"], f"{key}.resolution")
        resize = spec.get("resize")
        if resize is not None and resize != "stretch":
            v.whole(resize, f"{key}.resize", minimum=min(spec["resolution"]))
        if spec.get("channels", 3) not in (1, 3):
            v.fail(f"{key}.channels", f"expected 1 (greyscale) or 3 (RGB), got {show(spec['channels'])}")
        if "boxes" in spec:
            _existing(v, base, spec["boxes"], f"{key}.boxes")
        if "saliency" in spec:
            _existing(v, base, spec["saliency"], f"{key}.saliency", directory=True)
        if "workers" in spec:
            v.whole(spec["workers"], f"{key}.workers", minimum=0)
        _suspicious_classes(v, key, spec["folder"], _class_folders(base, spec))
    else:
        if "num_classes" not in spec:
            v.fail(f"{key}.num_classes", "a builder dataset needs its class count")
        _importable(v, spec["builder"], f"{key}.builder")
    for whole in ("num_classes", "max_samples"):
        if whole in spec:
            v.whole(spec[whole], f"{key}.{whole}", minimum=1)
    if "builder" in spec and spec["num_classes"] == 1:
        warnings.warn(f"{v.path}: {key}.num_classes: is 1: a one-class dataset gives every sample the same label, "
                      "so the gate sees one class only; give the dataset's real class count", QrobustWarning, stacklevel=2)


def _suspicious_classes(v, key: str, folder: str, classes: list[str]) -> None:
    """Warn about class subfolders that are probably a mistake: splits (``folder: data`` over data/train and
    data/val makes each split a class) or a single class (``folder:`` names one class's folder)."""
    splits = [c for c in classes if c.lower() in SPLIT_NAMES]
    if splits and (len(splits) >= 2 or len(splits) == len(classes)):
        warnings.warn(f"{v.path}: {key}.folder: class subfolders {', '.join(show(c) for c in splits)} are named like "
                      f"splits: each subfolder is a class, so the splits become the classes; point folder: at one "
                      f"split (e.g. {show(f'{folder}/{splits[0]}')})", QrobustWarning, stacklevel=3)
    elif len(classes) == 1:
        warnings.warn(f"{v.path}: {key}.folder: has one class subfolder ({show(classes[0])}): every image gets label "
                      "0; a folder dataset has one subfolder per class (does folder: name one class's folder?)",
                      QrobustWarning, stacklevel=3)


def _importable(v, target: str, key: str) -> None:
    from qrobust.errors import InvalidArgument
    from qrobust.registry import import_object

    try:
        import_object(target, key)
    except InvalidArgument as exc:
        v.fail(key, str(exc).split(": ", 1)[1])


def _class_folders(base: Path, spec: dict) -> list[str] | None:
    """The class subfolders of a folder dataset (sorted: they give the labels), or None for other datasets."""
    if "folder" not in spec:
        return None
    return sorted(p.name for p in (base / spec["folder"]).iterdir() if p.is_dir())


def _same_folder(base: Path, a: dict | None, b: dict | None) -> Path | None:
    """The folder two declared datasets both read (after resolving links and ``..``), or None."""
    if not (isinstance(a, dict) and isinstance(b, dict) and "folder" in a and "folder" in b):
        return None
    folder = (base / a["folder"]).resolve()
    return folder if folder == (base / b["folder"]).resolve() else None


def validate_pair(v, name: str, spec: dict, base: Path, datasets: dict[str, dict]) -> None:
    from qrobust.data import DATASETS
    from qrobust.quant import PRESETS

    key = v.join("pairs", name)
    v.keys(spec, key, PAIR_KEYS)
    source = _one_of(v, spec, key, ("arch", "builder", "fp32", "reference_outputs"))
    _onnx_models(v, spec, key, base)
    _recorded_outputs(v, spec, key)
    if source == "arch":
        from qrobust.models.archs import classification_archs
        known = classification_archs()
        if spec["arch"] not in known:
            v.fail(f"{key}.arch", f"unknown architecture {show(spec['arch'])}{did_you_mean(spec['arch'], known)} "
                                  "(any name of torchvision.models.list_models(module=torchvision.models))")
        if "weights" not in spec:
            v.fail(f"{key}.weights", "needs a checkpoint path, 'hub' (torch hub cache, never downloaded) or 'random' "
                                     "(explicit opt-in, for latency and pipeline checks only)")
    elif source == "builder":
        _importable(v, spec["builder"], f"{key}.builder")
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
        if ref in datasets:
            _fits(v, f"{key}.{ref_key}", spec, pre, ref, datasets[ref], base, classes=ref_key == "dataset")
    if "preset" in spec:
        if spec["preset"] not in PRESETS:
            v.fail(f"{key}.preset", f"unknown preset {show(spec['preset'])}{did_you_mean(spec['preset'], PRESETS)} "
                                    f"(known: {', '.join(PRESETS)})")
        if "quantized" in spec or "outputs" in spec:
            given = "quantized model (quantized:)" if "quantized" in spec else "device's outputs (outputs:)"
            v.fail(f"{key}.preset", f"the pair gives its {given}; a preset would build a twin: remove one of the two")
        if source == "fp32" and PRESETS.get(spec["preset"]).runtime != "onnxruntime":
            v.fail(f"{key}.preset", f"{show(spec['preset'])} quantizes torch models and fp32: is an ONNX file: use an "
                                    f"ONNX Runtime preset ({', '.join(PRESETS.names('onnxruntime'))})")
        if "calibration" not in spec:
            v.fail(f"{key}.calibration", "post-training quantization needs calibration data: "
                                         "{dataset: NAME, samples: N}, never the gated test split")
        cal = v.mapping(spec["calibration"], f"{key}.calibration")
        v.keys(cal, f"{key}.calibration", {"dataset", "samples"})
        if "samples" in cal:
            v.whole(cal["samples"], f"{key}.calibration.samples", minimum=1)
        if cal.get("dataset") == spec["dataset"]:
            warnings.warn(f"{v.path}: {key}.calibration: calibrates on the gated dataset {show(spec['dataset'])}: the "
                          "twin's ranges then fit the very samples it is judged on; calibrate on another split",
                          QrobustWarning, stacklevel=2)
        elif (folder := _same_folder(base, datasets.get(cal.get("dataset")), datasets.get(spec["dataset"]))) is not None:
            warnings.warn(f"{v.path}: {key}.calibration: calibrates on dataset {show(cal['dataset'])}, which reads the "
                          f"same folder as the gated dataset {show(spec['dataset'])} ({show(str(folder), 200)}): the "
                          "twin's ranges then fit the very samples it is judged on; calibrate on another split",
                          QrobustWarning, stacklevel=2)
    elif source != "builder" and "quantized" not in spec and "outputs" not in spec:
        v.fail(f"{key}.preset", f"an {source} pair needs a quantization preset, its quantized model (quantized:) or "
                                "a device's recorded outputs (outputs:)")


def _recorded_outputs(v, spec: dict, key: str) -> None:
    """``outputs:``: the folder of a device's logits for an export (read when the pair is first gated, so
    the file can name it before the device has run); ``reference_outputs:`` another device's, in place of
    the FP32 model (a device matrix)."""
    if "outputs" not in spec and "reference_outputs" not in spec:
        return
    if "reference_outputs" in spec and (not isinstance(spec["reference_outputs"], str) or not spec["reference_outputs"]):
        v.fail(f"{key}.reference_outputs", f"expected the folder of a device's outputs, got {show(spec['reference_outputs'])}")
    if "outputs" not in spec:
        return
    if not isinstance(spec["outputs"], str) or not spec["outputs"]:
        v.fail(f"{key}.outputs", f"expected the folder of the device's outputs, got {show(spec['outputs'])}")
    if "quantized" in spec:
        v.fail(f"{key}.outputs", "the pair gives its quantized model (quantized:) too: the twin is one or the other")
    if "reference_outputs" in spec:
        if "outputs" not in spec:
            v.fail(f"{key}.reference_outputs", "compares two devices' recorded logits: give the other's in outputs:")
        if "weights" in spec:
            v.fail(f"{key}.weights", "a device's recorded logits carry no weights; remove weights:")


def _onnx_models(v, spec: dict, key: str, base: Path) -> None:
    """``fp32:`` / ``quantized:`` ONNX files, and ``providers`` only where ONNX Runtime runs something."""
    for role in ("fp32", "quantized"):
        if role in spec:
            _existing(v, base, spec[role], f"{key}.{role}")
            if not str(spec[role]).endswith(".onnx"):
                v.fail(f"{key}.{role}", f"expected an .onnx file, got {show(spec[role])}")
    if "fp32" in spec and "weights" in spec:
        v.fail(f"{key}.weights", "an ONNX fp32 model carries its weights; remove weights:")
    if "providers" in spec:
        from qrobust.quant import PRESETS

        preset = PRESETS.get(spec["preset"]) if spec.get("preset") in PRESETS else None
        if not ("fp32" in spec or "quantized" in spec or (preset is not None and preset.runtime == "onnxruntime")):
            v.fail(f"{key}.providers", "execution providers apply to ONNX models; this pair has none")
        providers = spec["providers"]
        if not isinstance(providers, list) or not providers or not all(isinstance(p, str) and p for p in providers):
            v.fail(f"{key}.providers", f"expected a list of execution provider names, got {show(providers)}")


def _fits(v, key: str, pair: dict, pre: dict, name: str, dataset: dict, base: Path, classes: bool) -> None:
    """A declared dataset's resolution, channels and (for the gated one) class count fit the pair."""
    if "resolution" in dataset and list(dataset["resolution"]) != list(pre["resolution"]):
        v.fail(key, f"dataset {show(name)} has resolution {dataset['resolution']} but the pair's preprocess "
                    f"expects {pre['resolution']}")
    channels = dataset.get("channels", 3) if "folder" in dataset else None
    if channels is not None and channels != len(pre["mean"]):
        v.fail(key, f"dataset {show(name)} gives {channels}-channel images but the pair's preprocess has "
                    f"{len(pre['mean'])} channel(s) (set channels: {len(pre['mean'])} on the dataset)")
    folders = _class_folders(base, dataset) if classes else None
    count = dataset.get("num_classes", None if folders is None else len(folders)) if classes else None
    wanted = pair["num_classes"]
    if count is not None and count > wanted:
        v.fail(key, f"dataset {show(name)} has {count} classes but the pair has num_classes: {wanted}")
    if folders is not None and len(folders) < wanted:  # labels are folder indices: the last ones never appear
        found = len(folders)
        missing = f"class {found} never appears" if found == wanted - 1 else f"classes {found} to {wanted - 1} never appear"
        warnings.warn(f"{v.path}: {key}: dataset {show(name)} has {found} class folders but the pair has num_classes: "
                      f"{wanted} ({missing})", QrobustWarning, stacklevel=3)
