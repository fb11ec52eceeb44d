"""Pairs declared in the thresholds file (``pairs:``), built on demand.

A pair is a torchvision architecture (``arch``) or a user function (``builder: module:function``)
returning the FP32 model or an (FP32, quantized) tuple, with weights from a checkpoint (loaded safely,
see qrobust.models.checkpoints), a quantization ``preset`` calibrated on a ``calibration`` dataset, the
``preprocess`` of the model and the ``dataset`` it is gated on. Paths are relative to the thresholds file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qrobust._files import sha256_file
from qrobust.errors import InvalidArgument, invalid
from qrobust.models.checkpoints import tensor_fingerprint
from qrobust.models.pair import ModelPair, Preprocess
from qrobust.registry import import_object


def build_pair(name: str, spec: dict, base: Path, datasets: dict) -> ModelPair:
    """The ModelPair a ``pairs:`` entry describes (validated already by qrobust.gate.config)."""
    from qrobust.models.archs import TORCHVISION_ARCHS, build_arch
    from qrobust.models.checkpoints import load_checkpoint
    from qrobust.quant import PRESETS, quantize_model, quantized_module_names

    pre = spec["preprocess"]
    preprocess = Preprocess(tuple(pre["resolution"]), tuple(pre["mean"]), tuple(pre["std"]))
    weights = spec.get("weights")
    weights_path = None if weights in (None, "hub", "random") else base / weights
    if "arch" in spec:
        fp32 = build_arch(spec["arch"], int(spec["num_classes"]), str(weights_path or weights), spec.get("trust", False))
        quantized = None
    else:
        built = import_object(spec["builder"], f"pairs.{name}.builder")()
        fp32, quantized = built if isinstance(built, tuple) else (built, None)
        if weights_path is not None:
            state = load_checkpoint(weights_path, trust=spec.get("trust", False))
            fp32.load_state_dict(state.state_dict() if isinstance(state, torch.nn.Module) else state)
    fp32.eval()
    if quantized is None:
        config = PRESETS.get(spec["preset"])
        cal = spec["calibration"]
        data = datasets[cal["dataset"]].subset(int(cal.get("samples", 128)), 0)
        quantized = quantize_model(fp32, config, (preprocess.normalize(b.images) for b in data.batches(32)))
    else:
        config = PRESETS.get(spec.get("preset") or ("int8-x86" if quantized_module_names(quantized) else "fake-w8a8"))
    target = spec.get("target_layer") or TORCHVISION_ARCHS.get(spec.get("arch", ""))
    metadata = {"recipe": config.summary(), "declared": True, "weights_source": str(weights),
                "random_weights": weights == "random", "weights_fingerprint": tensor_fingerprint(fp32.state_dict())}
    if weights_path is not None:
        metadata["weights"] = {str(weights_path): sha256_file(weights_path)}
    try:
        return ModelPair(name, fp32, quantized, config, preprocess, num_classes=int(spec["num_classes"]),
                         dataset=spec["dataset"], target_layer=target,
                         quantized_target_layer=spec.get("quantized_target_layer"), metadata=metadata)
    except InvalidArgument as exc:
        raise invalid(f"pairs.{name}", spec, str(exc)) from None
