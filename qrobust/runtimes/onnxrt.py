"""ONNX Runtime models: a user's ``.onnx`` file (or one qrobust exported) run by an InferenceSession.

Loading never executes code: an ONNX file is data (a protobuf graph); the two ways ONNX Runtime can run
foreign code or read foreign files are refused unless the pair says ``trust: true``: operators of a
custom domain (they need a custom-op shared library, loaded only from ``custom_ops`` with trust) and
external-data tensors stored outside the model's folder.

CAM layers: an intermediate tensor is exposed by adding it to the graph's outputs (in a second session;
the plain session, the shipped graph, serves logits-only calls). A layer is named by its ONNX tensor name
or by the torch module path it was exported from: ``torch.onnx.export`` records module scopes
(``pkg.torch.onnx.name_scopes`` metadata, or ``/layer4/layer4.1/...`` node names from the legacy
exporter), and the module's output is the last tensor produced inside its scope.
"""
from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from qrobust._files import check_regular_file
from qrobust.errors import UnsupportedError, invalid, show
from qrobust.runtimes.base import RuntimeModel

MAX_ONNX_BYTES = 4 << 30
# operator domains ONNX Runtime implements itself (no shared library is loaded for them)
BUILTIN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.preview.training"}
QUANTIZED_OPS = {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger"}
COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"} | QUANTIZED_OPS


def require_onnxruntime():
    """``onnxruntime``, or one line naming the extra that installs it."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as exc:
        raise UnsupportedError(f"ONNX models need onnxruntime and onnx ({exc.name} is not installed): "
                               "pip install 'qrobust[onnx]'") from None
    return onnxruntime


def check_providers(providers: Sequence[str] | None) -> list[str]:
    """The execution providers to use (default: CPU), each one this onnxruntime build has."""
    ort = require_onnxruntime()
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str) or not providers or not all(isinstance(p, str) for p in providers):
        raise invalid("providers", providers, "expected a non-empty list of execution provider names")
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise invalid("providers", providers, f"{', '.join(missing)} not in this onnxruntime build "
                                              f"(available: {', '.join(available)})")
    return list(providers)


def _check_safe(proto, path: Path | None, trust: bool) -> None:
    """Refuse custom-op domains and external data outside the model's folder unless trusted."""
    from onnx.external_data_helper import uses_external_data

    where = show(str(path), 200) if path else "ONNX model"
    if trust:
        return
    domains = {d.domain for d in proto.opset_import} | {n.domain for n in proto.graph.node}
    custom = sorted(domains - BUILTIN_DOMAINS)
    if custom:
        raise UnsupportedError(f"{where}: uses operators of custom domain(s) {', '.join(map(show, custom))}, which "
                               "need a custom-op library (native code): set trust: true and custom_ops only for "
                               "a library you trust")
    folder = (path.parent if path else Path.cwd()).resolve()
    for tensor in proto.graph.initializer:
        if uses_external_data(tensor):
            location = dict((e.key, e.value) for e in tensor.external_data).get("location", "")
            target = (folder / location).resolve()
            if not target.is_relative_to(folder):
                raise UnsupportedError(f"{where}: tensor {show(tensor.name)} reads external data from "
                                       f"{show(location, 200)}, outside the model's folder: refused unless trust: true")


def _scopes(node) -> list[str]:
    """The torch module paths a node was exported from (dynamo metadata, or a legacy node name)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                return [s for s in ast.literal_eval(prop.value) if isinstance(s, str)]
            except (ValueError, SyntaxError):
                return []
    if node.name.startswith("/"):  # legacy exporter: /layer4/layer4.1/relu_1/Relu
        parts = node.name.strip("/").split("/")[:-1]
        return [".".join(parts[:i]) for i in range(1, len(parts) + 1)] + parts
    return []


class OnnxModel(RuntimeModel):
    """An ONNX graph run by ONNX Runtime. Input: one float tensor (N, C, H, W); output 0: the logits."""

    runtime = "onnxruntime"

    def __init__(self, proto, *, providers: Sequence[str] | None = None, source: str = "", trust: bool = False,
                 custom_ops: Sequence[str] = ()):
        super().__init__()
        require_onnxruntime()
        self.providers = check_providers(providers)
        if custom_ops and not trust:
            raise invalid("custom_ops", list(custom_ops), "loads native code: only with trust: true")
        self.custom_ops = [str(check_regular_file(p, "custom_ops library")) for p in custom_ops]
        self.proto, self.source = proto, source or "ONNX model"
        graph = proto.graph
        initializers = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        if len(inputs) != 1 or not graph.output:
            raise invalid("onnx", self.source, f"expected one image input and the logits as first output, got "
                                               f"{len(inputs)} input(s) and {len(graph.output)} output(s)")
        self.input_name = inputs[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        self.fixed_batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
        self._tensors = [o for node in graph.node for o in node.output]
        self._known = set(self._tensors) | {i.name for i in inputs}
        self._sessions: dict[tuple[str, ...], object] = {}
        self._layers: dict[tuple[str, int], str] = {}  # (layer name, id of the reference) -> tensor: run() asks per batch

    @classmethod
    def load(cls, path, *, providers=None, trust: bool = False, custom_ops=()) -> OnnxModel:
        """Load ``path`` (a regular file; external data only from its folder unless ``trust``)."""
        require_onnxruntime()
        import onnx
        from google.protobuf.message import DecodeError

        path = check_regular_file(path, "ONNX model", MAX_ONNX_BYTES)
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise invalid("onnx", str(path), f"is not an ONNX model ({type(exc).__name__}: {show(str(exc), 120)})") from None
        _check_safe(proto, path, trust)
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError) as exc:
            raise invalid("onnx", str(path), f"external data cannot be read: {show(str(exc), 160)}") from None
        return cls(proto, providers=providers, source=str(path), trust=trust, custom_ops=custom_ops)

    def describe(self) -> str:
        return f"onnxruntime {self.providers[0]}"

    def use_providers(self, providers: Sequence[str] | None) -> None:
        """Run on these execution providers from the next call on."""
        self.providers = check_providers(providers)
        self._sessions.clear()

    def _session(self, outputs: tuple[str, ...]):
        """A session of the graph whose outputs are the logits plus ``outputs`` (cached per tuple)."""
        if outputs not in self._sessions:
            import onnx
            import onnxruntime as ort

            proto = self.proto
            if outputs:
                proto = onnx.ModelProto()
                proto.CopyFrom(self.proto)
                del proto.graph.output[1:]
                proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = torch.get_num_threads()  # the same thread budget as torch's
            for library in self.custom_ops:
                options.register_custom_ops_library(library)
            try:
                self._sessions[outputs] = ort.InferenceSession(proto.SerializeToString(), options,
                                                               providers=self.providers)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise invalid("onnx", self.source, f"onnxruntime cannot load it: {show(str(exc), 200)}") from None
        return self._sessions[outputs]

    def run(self, x: torch.Tensor, layers: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tensors = tuple(dict.fromkeys(self.layer_for(name) for name in layers))
        session = self._session(tensors)
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        step = self.fixed_batch or max(len(array), 1)
        chunks = []
        for start in range(0, len(array), step):
            part = array[start:start + step]
            short = step - len(part) if self.fixed_batch else 0
            if short:  # a fixed-batch graph: pad the last chunk, drop the padding's outputs
                part = np.concatenate([part, np.zeros((short, *part.shape[1:]), part.dtype)])
            out = session.run(None, {self.input_name: part})
            chunks.append([o[:len(o) - short] if short else o for o in out])
        results = [torch.from_numpy(np.concatenate([c[i] for c in chunks])) for i in range(1 + len(tensors))]
        named = {name: results[1 + tensors.index(self.layer_for(name))] for name in layers}
        return results[0], named

    def layer_for(self, name: str, reference: OnnxModel | None = None) -> str:
        """The tensor of layer ``name``: an ONNX tensor name as is, else the last output of the nodes
        exported from that torch module, looked up here or in the FP32 graph the twin was quantized from
        (``reference``, else ``fp32_reference``; the quantizer drops a fused ReLU's node and its scope).
        In a QDQ twin it is taken after its QuantizeLinear -> DequantizeLinear: as the next layer sees it."""
        key = (name, id(reference))
        if key not in self._layers:
            self._layers[key] = self._find_layer(name, reference)
        return self._layers[key]

    def _find_layer(self, name: str, reference: OnnxModel | None) -> str:
        if name in self._known:
            return self._as_consumed(name)
        inside = [node.output[0] for node in self.proto.graph.node if node.output and name in _scopes(node)]
        reference = reference or getattr(self, "fp32_reference", None)
        if not inside and reference is not None and reference is not self:
            tensor = reference.layer_for(name)
            inside = [tensor] if tensor in self._known else []
        if not inside:
            raise invalid("target_layer", name, f"is neither a tensor of {show(self.source, 120)} nor a torch module "
                                                f"its nodes were exported from; name an ONNX tensor "
                                                f"(e.g. {show(self._tensors[-3] if len(self._tensors) > 2 else '')})")
        return self._as_consumed(inside[-1])

    def _as_consumed(self, tensor: str) -> str:
        nodes = self.proto.graph.node
        quantize = next((n for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] == tensor), None)
        if quantize is not None:
            dequantize = next((n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] == quantize.output[0]),
                              None)
            if dequantize is not None:
                return dequantize.output[0]
        return tensor

    def nodes_in(self, modules: Sequence[str]) -> list[str]:
        """Names of the nodes exported from the torch modules ``modules`` (to keep them in float)."""
        wanted = set(modules)
        return [node.name for node in self.proto.graph.node if wanted & set(_scopes(node))]

    # ---- what the twin quantizes (coverage and quantizer properties) -------------------------------------
    def _initializers(self) -> dict[str, np.ndarray]:
        from onnx import numpy_helper

        return {t.name: numpy_helper.to_array(t) for t in self.proto.graph.initializer}

    def compute_layers(self) -> list[dict]:
        """Each Conv/Gemm/MatMul with a constant weight: ``{"layer", "macs", "quantized"}`` (MACs per image,
        from ONNX shape inference); quantized when it is an integer op or its weight is dequantized (QDQ)."""
        import onnx

        graph = onnx.shape_inference.infer_shapes(self.proto).graph
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                  for v in list(graph.value_info) + list(graph.output)}
        weights = self._initializers()
        producer = {o: node for node in graph.node for o in node.output}
        rows = []
        for node in graph.node:
            if node.op_type not in COMPUTE_OPS:
                continue
            w_name = node.input[3] if node.op_type == "QLinearConv" else node.input[1]
            source = producer.get(w_name)
            dequantized = source is not None and source.op_type == "DequantizeLinear"
            w = weights.get(source.input[0] if dequantized else w_name)
            if w is None:
                continue  # an activation x activation product: no weight to quantize
            spatial = shapes.get(node.output[0], [])[2:] if node.op_type.endswith("Conv") else []
            macs = int(w.size) * int(np.prod([d or 1 for d in spatial]))
            rows.append({"layer": node.name or node.output[0], "macs": macs,
                         "quantized": dequantized or node.op_type in QUANTIZED_OPS})
        return rows

    def quant_params(self) -> list[dict]:
        """Every QuantizeLinear/DequantizeLinear's constant parameters: where, scale, zero point (its dtype is
        the grid's), axis and (for a weight) its output channels. int32 bias grids are left out: their scale
        is derived from the input's and the weight's, and they hold no rounding decision of their own."""
        weights = self._initializers()
        found = []
        for node in self.proto.graph.node:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.input[1] not in weights:
                continue
            scale, data = weights[node.input[1]], weights.get(node.input[0])
            zero = weights.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if zero is None:  # ONNX's default: the data's dtype for DequantizeLinear, uint8 for QuantizeLinear
                dtype = data.dtype if data is not None and node.op_type == "DequantizeLinear" else np.uint8
                zero = np.zeros_like(scale, dtype=dtype)
            if zero.dtype not in (np.uint8, np.int8):
                continue
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) if scale.ndim else None
            found.append({"where": f"{node.op_type} {node.name or node.output[0]}", "scale": scale, "zero_point": zero,
                          "axis": axis, "channels": data.shape[axis] if data is not None and axis is not None else None})
        return found
