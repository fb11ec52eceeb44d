"""Pairs declared in the thresholds file (``pairs:``), built on demand.

A pair is a torchvision architecture (``arch``) or a user function (``builder: module:function``)
returning the FP32 model or an (FP32, quantized) tuple, with weights from a checkpoint (loaded safely,
see qrobust.models.checkpoints), a quantization ``preset`` calibrated on a ``calibration`` dataset, the
``preprocess`` of the model and the ``dataset`` it is gated on. Paths are relative to the thresholds file.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import torch

from qrobust._files import sha256_file
from qrobust.errors import InvalidArgument, QrobustWarning, invalid, show
from qrobust.models.checkpoints import tensor_fingerprint
from qrobust.models.pair import ModelPair, Preprocess
from qrobust.registry import import_object


def fp32_key(spec: dict, base: Path) -> tuple:
    """What determines a declared pair's FP32 model: pairs with the same key share one FP32 object (so
    one FP32 forward per perturbed batch serves all of them)."""
    weights = spec.get("weights")
    path = str((base / weights).resolve()) if weights not in (None, "hub", "random") else weights
    files = [spec[k] for k in ("fp32", "reference_outputs") if k in spec]
    source = str((base / files[0]).resolve()) if files else spec.get("arch") or spec.get("builder")
    return source, path, int(spec["num_classes"]), bool(spec.get("trust", False)), tuple(spec.get("providers", ()))


def _fp32(spec: dict, base: Path, name: str):
    """The FP32 model (and the user's own twin, from a tuple builder) of a ``pairs:`` entry."""
    from qrobust.models.archs import build_arch
    from qrobust.models.checkpoints import load_checkpoint
    from qrobust.runtimes import load_onnx

    weights = spec.get("weights")
    weights_path = None if weights in (None, "hub", "random") else base / weights
    if "fp32" in spec:
        return load_onnx(base / spec["fp32"], providers=spec.get("providers"), trust=spec.get("trust", False)), None
    if "reference_outputs" in spec:  # a device matrix: another device's recorded logits as the reference
        from qrobust.runtimes import load_outputs

        return load_outputs(base / spec["reference_outputs"]), None
    if "arch" in spec:
        return build_arch(spec["arch"], int(spec["num_classes"]), str(weights_path or weights),
                          spec.get("trust", False)), None
    built = import_object(spec["builder"], f"pairs.{name}.builder")()
    fp32, quantized = built if isinstance(built, tuple) else (built, None)
    if not isinstance(fp32, torch.nn.Module) or (quantized is not None and not isinstance(quantized, torch.nn.Module)):
        raise invalid(f"pairs.{name}.builder", spec["builder"], "must return an nn.Module or an (fp32, twin) tuple "
                                                              f"of them, got {type(built).__name__}")
    if weights_path is not None:
        if quantized is not None:
            raise invalid(f"pairs.{name}.weights", weights, "the builder returned an (fp32, twin) tuple: its twin "
                                                            "was built before qrobust could load these weights; "
                                                            "load them inside the builder, or return the FP32 "
                                                            "model alone and set a preset")
        state = load_checkpoint(weights_path, trust=spec.get("trust", False))
        try:
            fp32.load_state_dict(state.state_dict() if isinstance(state, torch.nn.Module) else state)
        except RuntimeError as exc:  # torch lists every mismatched key over hundreds of lines
            first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
            raise invalid(f"pairs.{name}.weights", weights, f"does not fit the builder's model: "
                                                            f"{show(first, 200)}") from None
    return fp32, quantized


def build_pair(name: str, spec: dict, base: Path, datasets: dict, fp32_cache: dict | None = None) -> ModelPair:
    """The ModelPair a ``pairs:`` entry describes (validated already by qrobust.gate.declared_config).

    ``fp32_cache`` (key: ``fp32_key``) shares the FP32 model between pairs declared on the same weights."""
    from qrobust.models.archs import TORCHVISION_ARCHS
    from qrobust.quant import PRESETS, quantize_model, quantized_module_names

    pre = spec["preprocess"]
    preprocess = Preprocess(tuple(pre["resolution"]), tuple(pre["mean"]), tuple(pre["std"]))
    key = fp32_key(spec, base)
    cache = {} if fp32_cache is None else fp32_cache
    cached = cache.get(key)
    if cached is not None and cached[1] is None:  # an FP32 model alone (no user twin): share it
        fp32, quantized = cached[0], None
    else:
        fp32, quantized = _fp32(spec, base, name)
        cache.setdefault(key, (fp32, quantized))
    from qrobust.runtimes import RuntimeModel, load_onnx

    if not isinstance(fp32, RuntimeModel):
        fp32.eval()
    calibration, requantize = None, None
    if "outputs" in spec:
        from qrobust.runtimes import load_outputs

        quantized = load_outputs(base / spec["outputs"])
        config = replace(PRESETS.get("int8-x86"), name="recorded-outputs",
                         source=f"logits recorded on a device in {spec['outputs']} (its recipe is whatever built it)")
    elif "quantized" in spec:
        if quantized is not None:
            raise invalid(f"pairs.{name}.quantized", spec["quantized"], "the builder returned a twin already")
        quantized = load_onnx(base / spec["quantized"], providers=spec.get("providers"), trust=spec.get("trust", False))
        config = replace(PRESETS.get("ort-int8"), name="onnx-file",
                         source=f"the ONNX file {spec['quantized']} (its recipe is whatever built it)")
    elif quantized is None:
        config = PRESETS.get(spec["preset"])
        cal = spec["calibration"]
        wanted = int(cal.get("samples", 128))
        data = datasets[cal["dataset"]].subset(wanted, 0)
        if len(data) < wanted:
            warnings.warn(f"pairs.{name}.calibration: asked for {wanted} samples, dataset {show(cal['dataset'])} has "
                          f"{len(data)}: calibrating on all of them", QrobustWarning, stacklevel=2)
        calibration = {"dataset": cal["dataset"], "samples": len(data)}
        quantized = quantize_model(fp32, config, (preprocess.normalize(b.images) for b in data.batches(32)))
        if "providers" in spec:  # validated: only ONNX Runtime presets take providers
            quantized.use_providers(spec["providers"])

        def requantize(keep: tuple[str, ...]) -> torch.nn.Module:
            kept = replace(config, keep_fp32=config.keep_fp32 + tuple(keep))
            return quantize_model(fp32, kept, (preprocess.normalize(b.images) for b in data.batches(32)))
    else:
        config = PRESETS.get(spec.get("preset") or ("int8-x86" if quantized_module_names(quantized) else "fake-w8a8"))
    # a device's recorded twin has activations only for a layer the pair names (its runner recorded them)
    target = spec.get("target_layer") or (None if "outputs" in spec else TORCHVISION_ARCHS.get(spec.get("arch", "")))
    weights = spec.get("weights")
    metadata = {"recipe": config.summary(), "declared": True, "weights_source": str(weights),
                "random_weights": weights == "random", "calibration": calibration or "its own twin (not calibrated by qrobust)"}
    if not isinstance(fp32, RuntimeModel):
        metadata["weights_fingerprint"] = tensor_fingerprint(fp32.state_dict())
    files = [base / spec[k] for k in ("fp32", "quantized") if k in spec]
    if weights not in (None, "hub", "random"):
        files.append(base / weights)
    if files:
        metadata["weights"] = {str(f): sha256_file(f) for f in files}
    try:
        return ModelPair(name, fp32, quantized, config, preprocess, num_classes=int(spec["num_classes"]),
                         dataset=spec["dataset"], target_layer=target,
                         quantized_target_layer=spec.get("quantized_target_layer"), metadata=metadata,
                         requantize=requantize)
    except InvalidArgument as exc:
        raise invalid(f"pairs.{name}", name, str(exc)) from None
