"""Quantization: the quantizer math, recipes (presets) and twins (fake-quant and real int8)."""
from qrobust.quant.convert import (
    FakeQuantLayer, Int8Model, check_engine, convert_int8, fake_quantize_model, is_int8, layer_root,
    quantize_model, quantized_module_names, twin_layer_name,
)
from qrobust.quant.presets import KINDS, PRESETS, QuantConfig, TensorSpec, get_preset

__all__ = ["FakeQuantLayer", "Int8Model", "KINDS", "PRESETS", "QuantConfig", "TensorSpec", "check_engine",
           "convert_int8", "fake_quantize_model", "get_preset", "is_int8", "layer_root", "quantize_model",
           "quantized_module_names", "twin_layer_name"]
