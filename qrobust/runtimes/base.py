"""What a non-torch runtime model offers the gate, and how the gate names where a model runs."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class RuntimeModel(nn.Module):
    """A model run by a runtime other than PyTorch: a callable on a batch plus what it can expose.

    It is an ``nn.Module`` so that a pair, the engine and the latency timer call it like any model
    (``.eval()`` is a no-op; inputs go to the CPU, and the runtime owns placement). Subclasses implement
    ``run``.
    """

    runtime = "runtime"
    input_device = "cpu"  # qrobust.placement: a runtime takes CPU tensors and places them itself

    def run(self, x: torch.Tensor, layers: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits of the batch ``x`` (float, CPU) and the named intermediate tensors, from one call."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]

    def train(self, mode: bool = True) -> RuntimeModel:
        """A no-op: the runtime's graph was built in inference mode and stays in it."""
        return self

    def layer_for(self, name: str, reference: RuntimeModel | None = None) -> str:
        """The runtime's tensor for a layer ``name`` (its own tensor name, or a torch module path);
        ``reference`` is the FP32 graph the model was made from, where that helps to find it."""
        raise NotImplementedError

    def describe(self) -> str:
        """The runtime and where it runs, for reports (e.g. ``onnxruntime CPUExecutionProvider``)."""
        return self.runtime


def differentiable(model: nn.Module) -> bool:
    """Whether gradients flow through ``model`` to its input (CAM methods and FGSM need them)."""
    from qrobust.quant.convert import is_int8

    return not isinstance(model, RuntimeModel) and not is_int8(model)


def runtime_name(model: nn.Module) -> str:
    """Where ``model`` runs, named for latency records and reports."""
    from qrobust.quant.convert import is_int8

    if isinstance(model, RuntimeModel):
        return model.describe()
    if is_int8(model):
        return f"torch int8 ({model.engine} kernels, cpu)"
    parameter = next(model.parameters(), None)
    return f"torch ({parameter.device if parameter is not None else 'cpu'})"
