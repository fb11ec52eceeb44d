"""Quantization coverage: which Conv/Linear layers of the FP32 model run quantized in the twin, and the
share of multiply-accumulates they carry. A twin that silently left layers in float (dynamic quantization
of the Linear layers only; a keep_fp32 list grown too long) passes accuracy checks easily; this says so.
"""
from __future__ import annotations

import torch
from torch import nn

from qrobust.placement import feed
from qrobust.quant.convert import FakeQuantLayer, is_runtime, layer_root

COMPUTE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
QUANTIZED_MODULES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")


def quantized_layer_names(twin: nn.Module) -> set[str]:
    """Names of the twin's modules that compute quantized: converted int8 (static or dynamic) modules and
    fake-quant wrappers; an int8 graph names a fused Conv+BN+ReLU after its conv."""
    return {name for name, module in layer_root(twin).named_modules()
            if isinstance(module, FakeQuantLayer) or (type(module).__module__.startswith(QUANTIZED_MODULES)
                                                      and not name.endswith("_packed_params"))}


def mac_coverage(fp32: nn.Module, twin: nn.Module, x: torch.Tensor) -> dict:
    """``{"fraction": share of MACs quantized, "layers": [{"layer", "macs", "quantized"}], "quantized": k,
    "total": n}`` for one sample of ``x`` (MACs per image). A runtime twin (ONNX) counts its own graph's
    Conv/Gemm/MatMul nodes, named as in the graph."""
    if is_runtime(twin):
        return _summary(twin.compute_layers())
    macs: dict[str, int] = {}
    handles = []

    def count(name):
        def hook(module, inputs, output):
            if isinstance(module, nn.Linear):
                macs[name] = macs.get(name, 0) + module.in_features * module.out_features * (output[0].numel() // module.out_features)
            else:
                per_output = module.in_channels // module.groups * int(torch.tensor(module.kernel_size).prod())
                macs[name] = macs.get(name, 0) + per_output * output[0].numel()
        return hook

    try:
        for name, module in fp32.named_modules():
            if isinstance(module, COMPUTE):
                handles.append(module.register_forward_hook(count(name)))
        with torch.inference_mode():
            feed(fp32, x[:1], role="fp32")
    finally:
        for handle in handles:
            handle.remove()
    quantized = quantized_layer_names(twin)
    return _summary([{"layer": name, "macs": m, "quantized": name in quantized} for name, m in macs.items()])


def _summary(layers: list[dict]) -> dict:
    macs = {row["layer"]: row["macs"] for row in layers}
    total = sum(macs.values())
    done = sum(row["macs"] for row in layers if row["quantized"])
    return {"fraction": done / total if total else 0.0, "layers": layers,
            "quantized": sum(row["quantized"] for row in layers), "total": len(layers)}
