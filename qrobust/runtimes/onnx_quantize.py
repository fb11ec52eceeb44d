"""FP32 torch model -> ONNX (torch.onnx.export) -> ONNX Runtime static int8 quantization (QDQ).

The recipe is a ``QuantConfig`` with ``runtime="onnxruntime"``: weights int8 symmetric, per channel or
per tensor; activations uint8 affine per tensor, calibrated by ONNX Runtime's calibrator named by the
activation ``observer`` (``minmax``, ``entropy``, ``percentile``). Weights of ``bits=7`` mean ONNX
Runtime's ``reduce_range``: on x86 CPUs without VNNI (AVX2), uint8 x int8 products are summed in
saturating int16 pairs, so full 8-bit weights compute differently per CPU; 7-bit weights cannot
saturate, and the twin's outputs are the same on every x86-64 machine (the gate's verdicts too).
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from qrobust.errors import UnsupportedError, invalid, show
from qrobust.placement import cpu_copy
from qrobust.quant.convert import register_quantizer
from qrobust.runtimes.onnxrt import OnnxModel, require_onnxruntime

CALIBRATE_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
OPSET = 18


def export_onnx(model: nn.Module, example: torch.Tensor) -> OnnxModel:
    """``model`` exported with torch.onnx.export (the torch.export-based exporter, dynamic batch)."""
    require_onnxruntime()
    if isinstance(model, OnnxModel):
        return model
    model = cpu_copy(model).eval()
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example[:2].cpu(),), dynamo=True, input_names=["input"],
                                        output_names=["logits"], opset_version=OPSET,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; one line says which
        raise UnsupportedError(f"torch.onnx.export failed for {type(model).__name__}: {type(exc).__name__}: "
                               f"{show(str(exc).splitlines()[0] if str(exc) else '', 200)}") from None
    return OnnxModel(program.model_proto, source=f"{type(model).__name__} exported to ONNX")


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol over torch batches."""

    def __init__(self, name: str, batches: list[torch.Tensor]):
        # one sample per item: ORT's histogram calibrators stack items and need them all the same shape
        self._items = iter([{name: x[None].numpy()} for b in batches for x in b.detach().cpu().float()])

    def get_next(self):
        return next(self._items, None)


@register_quantizer("onnxruntime")
def quantize_onnx(model: nn.Module, config, calibration: Iterable[torch.Tensor]) -> OnnxModel:
    """The ORT int8 twin of ``model`` (a torch model, exported first, or an ``OnnxModel``), calibrated on
    ``calibration``. The twin keeps its FP32 ONNX model as ``fp32_reference`` (same runtime, for latency)."""
    require_onnxruntime()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    batches = list(calibration)
    if not batches:
        raise invalid("calibration", [], "ONNX Runtime static quantization needs at least one calibration batch")
    if config.activation.observer not in CALIBRATE_METHODS:
        raise invalid("observer", config.activation.observer,
                      f"ONNX Runtime calibrates with {', '.join(CALIBRATE_METHODS)}")
    fp32 = export_onnx(model, batches[0])
    exclude = fp32.nodes_in(config.keep_fp32)
    if config.keep_fp32 and not exclude:
        raise invalid("keep_fp32", list(config.keep_fp32), "names no module the exported graph records")
    with tempfile.TemporaryDirectory() as folder:  # quantize_static reads and writes files
        src, dst = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        src.write_bytes(fp32.proto.SerializeToString())
        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.ERROR)  # ORT logs a pre-processing advice at WARNING on every call
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its histogram calibrators print progress
                quantize_static(str(src), str(dst), _Batches(fp32.input_name, batches), quant_format=QuantFormat.QDQ,
                                per_channel=config.weight.per_channel, reduce_range=config.weight.bits == 7,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=getattr(CalibrationMethod,
                                                         CALIBRATE_METHODS[config.activation.observer]),
                                nodes_to_exclude=exclude)
        finally:
            logger.setLevel(level)
        import onnx

        twin = OnnxModel(onnx.load(str(dst)), providers=fp32.providers, source=f"{fp32.source}, {config.name}")
    twin.metadata = {"calibrate_method": config.activation.observer, "reduce_range": config.weight.bits == 7,
                     "excluded_nodes": len(exclude)}
    twin.fp32_reference = fp32
    return twin
