"""The runtime layer: what the gate needs of a model, whatever runs it.

A model in a pair is either a torch ``nn.Module`` (eager, fake-quant, an FX int8 graph, a
``torch.export`` program: the "torch" runtime, whose layers are reached with hooks) or a
``RuntimeModel``: a deployment runtime's session behind the same call, exposing what that runtime can
(logits; named intermediate tensors for gradient-free CAMs; no gradients). ONNX Runtime is the one
implemented (``qrobust.runtimes.onnxrt``); its export and static quantization live in
``qrobust.runtimes.onnx_quantize``. A device's recorded logits stand in for a twin that runs elsewhere
(``qrobust.runtimes.recorded``). ONNX Runtime is an optional extra: ``pip install qrobust[onnx]``.
"""
from qrobust.quant.convert import quantize_model
from qrobust.runtimes import exported, onnx_quantize  # noqa: F401  (register the onnxruntime and torchao quantizers)
from qrobust.runtimes.base import RuntimeModel, differentiable, runtime_name
from qrobust.runtimes.recorded import RecordedOutputs, load_outputs

__all__ = ["RecordedOutputs", "RuntimeModel", "differentiable", "runtime_name", "load_onnx", "load_outputs",
           "quantize_model", "same_runtime_fp32"]


def load_onnx(path, *, providers=None, trust: bool = False, custom_ops=()):
    """An ONNX file as a model qrobust can gate (see ``qrobust.runtimes.onnxrt.OnnxModel``)."""
    from qrobust.runtimes.onnxrt import OnnxModel

    return OnnxModel.load(path, providers=providers, trust=trust, custom_ops=custom_ops)


def same_runtime_fp32(fp32, twin, example):
    """The FP32 model to time against ``twin``: on the twin's runtime where one can be had (an ONNX Runtime
    twin's exported FP32, made once and kept on the twin), so a speedup compares like with like; else
    ``fp32`` itself (torch and torch.export twins; an FP32 that already runs on a runtime)."""
    from qrobust.runtimes.onnxrt import OnnxModel

    if not isinstance(twin, OnnxModel) or isinstance(fp32, RuntimeModel):
        return fp32
    reference = getattr(twin, "fp32_reference", None)
    if reference is None:
        from qrobust.runtimes.onnx_quantize import export_onnx

        reference = twin.fp32_reference = export_onnx(fp32, example)
        reference.use_providers(twin.providers)
    return reference
