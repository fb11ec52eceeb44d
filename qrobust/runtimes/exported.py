"""``torch.export`` programs as twins: PT2E quantization (torchao) and users' exported modules.

An exported module is a flat FX graph: its layers are graph nodes, not submodules, so hooks cannot reach
them, and it refuses ``.eval()``. ``ExportedModel`` runs it as it is and exposes a node's output for CAMs
by interpreting the graph once (``torch.fx.Interpreter``); a torch module path finds its node through the
``nn_module_stack`` that export records, and in a quantized graph the tensor is read after its
quantize -> dequantize pair, as the next layer sees it. The PT2E graph is PyTorch's reference
representation (integer grids, computed in float); ``torch.compile`` would lower it to int8 kernels,
which a gate does not need to judge the numerics.

``quantize_pt2e`` builds a twin with torchao's ``X86InductorQuantizer`` (the PT2E successor of
``torch.ao``'s x86 recipe): per-channel symmetric int8 weights, uint8 activations calibrated by histogram.
torchao is an optional extra: ``pip install 'qrobust[pt2e]'``.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from qrobust.errors import UnsupportedError, invalid, show
from qrobust.placement import cpu_copy, feed, stage
from qrobust.quant.convert import register_quantizer
from qrobust.runtimes.base import RuntimeModel

QUANTIZE = ("quantize_per_tensor", "quantize_per_channel")
DEQUANTIZE = ("dequantize_per_tensor", "dequantize_per_channel")
COMPUTE = ("conv2d", "conv1d", "conv3d", "linear")


def _op(node) -> str:
    """The ATen/decomposed op name of a call_function node (``conv2d``, ``quantize_per_tensor``...)."""
    return str(node.target).split(".")[1] if node.op == "call_function" and "." in str(node.target) else ""


def _modules(node) -> list[str]:
    return [path for path, _ in node.meta.get("nn_module_stack", {}).values()]


class _Tap(torch.fx.Interpreter):
    """Runs a graph node by node, keeping the outputs of the ``wanted`` nodes."""

    def __init__(self, graph_module: torch.fx.GraphModule, wanted: set[str]):
        super().__init__(graph_module)
        self.wanted, self.seen = wanted, {}

    def run_node(self, node):
        value = super().run_node(node)
        if node.name in self.wanted:
            self.seen[node.name] = value
        return value


class ExportedModel(RuntimeModel):
    """A ``torch.export`` module (``program.module()``, or a PT2E-converted graph) run as exported."""

    runtime = "torch.export"

    def __init__(self, graph_module: torch.fx.GraphModule, source: str = "exported program"):
        super().__init__()
        if not isinstance(graph_module, torch.fx.GraphModule):
            raise invalid("graph_module", type(graph_module).__name__, "expected a torch.export program's module()")
        self.graph_module, self.source = graph_module, source
        self._nodes = {node.name: node for node in graph_module.graph.nodes}

    def describe(self) -> str:
        return "torch.export graph (cpu)"

    def run(self, x: torch.Tensor, layers: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.inference_mode():
            if not layers:
                return self.graph_module(x), {}
            wanted = {self.layer_for(name): name for name in layers}
            tap = _Tap(self.graph_module, set(wanted))
            logits = tap.run(x)
        return logits, {name: tap.seen.get(node) for node, name in wanted.items()}

    def layer_for(self, name: str, reference: RuntimeModel | None = None) -> str:
        if name in self._nodes:
            return self._as_consumed(self._nodes[name]).name
        inside = [node for node in self._nodes.values() if node.op == "call_function" and name in _modules(node)]
        if not inside:
            raise invalid("target_layer", name, f"is neither a node of {show(self.source, 80)} nor a torch module "
                                                "recorded in its nn_module_stack")
        return self._as_consumed(inside[-1]).name

    @staticmethod
    def _as_consumed(node):
        users = [u for u in node.users if _op(u) in QUANTIZE]
        if users:
            after = [u for u in users[0].users if _op(u) in DEQUANTIZE]
            if after:
                return after[0]
        return node

    # ---- what the twin quantizes (coverage and quantizer properties) -------------------------------------
    def _value(self, arg):
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            value = self.graph_module
            for part in str(arg.target).split("."):
                value = getattr(value, part)
            return value
        return arg

    def compute_layers(self) -> list[dict]:
        """Each conv/linear node: ``{"layer", "macs", "quantized"}``, quantized when its weight is dequantized
        from an integer grid (MACs per image from the shapes export recorded)."""
        rows = []
        for node in self._nodes.values():
            if _op(node) not in COMPUTE or len(node.args) < 2 or not isinstance(node.args[1], torch.fx.Node):
                continue
            weight = node.args[1]
            quantized = _op(weight) in DEQUANTIZE
            source = weight.args[0] if quantized else weight
            tensor = self._value(source)
            if not isinstance(tensor, torch.Tensor):
                continue
            out = node.meta.get("val")
            spatial = [int(d) for d in out.shape[2:]] if out is not None and _op(node).startswith("conv") else []
            rows.append({"layer": (_modules(node) or [node.name])[-1], "macs": int(tensor.numel() * np.prod(spatial or [1])),
                         "quantized": quantized})
        return rows

    def quant_params(self) -> list[dict]:
        """Each quantize/dequantize node's constant scale and zero point (uint8/int8 grids)."""
        found = []
        for node in self._nodes.values():
            op = _op(node)
            if op not in QUANTIZE + DEQUANTIZE:
                continue
            per_channel = op.endswith("channel")
            scale, zero = (self._value(a) for a in node.args[1:3])
            dtype = node.args[6] if per_channel else node.args[5]
            if dtype not in (torch.uint8, torch.int8):
                continue
            data = self._value(node.args[0])
            axis = node.args[3] if per_channel else None
            found.append({"where": f"{op} {node.name}", "scale": np.asarray(torch.as_tensor(scale, dtype=torch.float32)),
                          "zero_point": np.asarray(torch.as_tensor(zero)).astype(np.uint8 if dtype == torch.uint8 else np.int8),
                          "axis": axis, "channels": data.shape[axis] if per_channel and isinstance(data, torch.Tensor) else None})
        return found


def require_torchao():
    try:
        from torchao.quantization.pt2e import quantize_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except ImportError as exc:
        raise UnsupportedError(f"PT2E twins need torchao ({exc.name} is not installed): pip install 'qrobust[pt2e]'") from None
    return quantize_pt2e, x86_inductor_quantizer


@register_quantizer("torchao")
def quantize_pt2e(model: nn.Module, config, calibration: Iterable[torch.Tensor]) -> ExportedModel:
    """The PT2E int8 twin of ``model``: torch.export (dynamic batch), torchao's X86InductorQuantizer with
    ``config.keep_fp32`` modules left in float, calibration on ``calibration``, convert_pt2e."""
    pt2e, x86 = require_torchao()
    batches = list(calibration)
    if not batches:
        raise invalid("calibration", [], "PT2E quantization needs at least one calibration batch")
    model = cpu_copy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export and torchao warn about their own deprecations
        try:
            graph = torch.export.export(model, (batches[0][:2].cpu(),),
                                        dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
            quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
            for name in config.keep_fp32:
                quantizer.set_module_name_qconfig(name, None)
            prepared = pt2e.prepare_pt2e(graph, quantizer)
            with torch.no_grad(), stage("calibrate"):
                for batch in batches:
                    feed(prepared, batch, role="twin being calibrated")
            converted = pt2e.convert_pt2e(prepared)
        except Exception as exc:  # noqa: BLE001 - export and torchao raise many types; one line says which
            raise UnsupportedError(f"torchao PT2E cannot quantize {type(model).__name__}: {type(exc).__name__}: "
                                   f"{show(str(exc).splitlines()[0] if str(exc) else '', 160)} (ort-int8 or "
                                   "int8-x86 quantize it)") from None
    return ExportedModel(converted, source=f"{type(model).__name__}, {config.name}")
