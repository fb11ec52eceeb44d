"""Where a batch meets a model: one function, ``feed``, moves the batch to the model's device and calls it.

Every stage that runs a model (calibrate, probe, evaluate, CAM, attack, diagnose, explain, latency,
coverage) goes through ``feed``, so a tensor can only reach a model on the model's own device: the
FP32 model on ``--qrobust-device``, a real int8 twin or a deployment runtime on the CPU (their
``input_device``), a fake-quant twin wherever its weights are. Data, perturbations and metrics stay on
the CPU. A placement error that still happens inside a model (a user module keeping a tensor on
another device) is re-raised naming the pair, the stage and the model, with torch's own line.

``stage(...)`` names what runs for those messages; tests wrap a model's ``forward`` with
``checked_forward`` to prove that nothing calls a model except through ``feed``.
"""
from __future__ import annotations

import itertools

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch

from qrobust.errors import QrobustError

STAGES = ("calibrate", "probe", "evaluate", "export", "CAM", "attack", "diagnose", "explain", "latency", "coverage",
          "match layer", "export")
_stage: contextvars.ContextVar[tuple[str | None, str]] = contextvars.ContextVar("qrobust_stage", default=(None, "run"))
_feeding: contextvars.ContextVar[object] = contextvars.ContextVar("qrobust_feeding", default=None)


class PlacementError(QrobustError):
    """A tensor met a model (or a model's part) on another device; names the pair, the stage and the model."""


@contextlib.contextmanager
def stage(name: str, pair: str | None = None) -> Iterator[None]:
    """Name what runs (``pair``, one of STAGES) in the placement errors raised inside."""
    if name not in STAGES:
        raise ValueError(f"stage {name!r} is not one of {STAGES}")
    token = _stage.set((pair, name))
    try:
        yield
    finally:
        _stage.reset(token)


def device_of(model) -> torch.device:
    """Where ``model`` takes its inputs: its declared ``input_device`` (real int8 kernels and deployment
    runtimes: the CPU), else the device of its first parameter or buffer, else the CPU."""
    declared = getattr(model, "input_device", None)
    if declared is not None:
        return torch.device(declared)
    if isinstance(model, torch.nn.Module):  # the first tensor only: feed asks on every batch
        first = next(itertools.chain(model.parameters(), model.buffers()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` itself when it is on the CPU, else a CPU copy: exporters and int8 conversion need the
    CPU, and the caller's model (an FP32 shared by a pair's group, on the gate's device) must stay put."""
    import copy

    return model if device_of(model).type == "cpu" else copy.deepcopy(model).cpu()


def place(model, x: torch.Tensor) -> torch.Tensor:
    """``x`` on ``model``'s device (the batch a timer hands ``feed`` ahead of the clock)."""
    return x.to(device_of(model))


def feed(model, x: torch.Tensor, *args, call: Callable | None = None, role: str = "model"):
    """``model(x, *args)`` (or ``call(x, *args)``, a method of ``model``) with ``x`` on the model's device.

    Gradients flow back through the move, so an attack or a gradient CAM can take its input on the CPU.
    ``role`` (``fp32``, ``twin``) names the model in a placement error."""
    device = device_of(model)
    token = _feeding.set(model)
    try:
        return (call or model)(x.to(device), *args)
    except RuntimeError as exc:
        text = str(exc)
        if not _device_error(text):
            raise
        pair, name = _stage.get()
        who = f"pair {pair}, " if pair else ""
        first = " ".join(text.split())[:240]
        raise PlacementError(f"{who}stage {name}: the {role} on {device} met a tensor on another device "
                             f"({first})") from None
    finally:
        _feeding.reset(token)


def _device_error(text: str) -> bool:
    """Whether torch's message is about a tensor on the wrong device, whichever op met it first
    ("Expected all tensors to be on the same device", "Input type (torch.FloatTensor) and weight type
    (torch.cuda.FloatTensor) should be the same")."""
    return "device" in text or ("Input type" in text and "cuda" in text)


def checked_forward(model: torch.nn.Module, name: str) -> None:
    """Make ``model`` refuse any call that does not come through ``feed`` (a test's placement probe):
    on a machine with one device, a stage that calls a model directly would pass with the wrong device.
    A forward pre-hook, so copies of the model (a twin's calibration copy, FGSM's float64 copy) check
    their own calls too."""

    def guard(module, inputs):
        if _feeding.get() is not module:
            pair, where = _stage.get()
            raise AssertionError(f"{name} was called outside qrobust.placement.feed (pair {pair}, stage {where})")

    model.register_forward_pre_hook(guard)
