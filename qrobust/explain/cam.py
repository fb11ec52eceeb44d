"""Class activation maps on one template: Grad-CAM, Grad-CAM++ (seed 001) and EigenCAM (seed 002).

A method supplies only how it turns the target layer's activations (and gradients) into a raw map;
``compute_cams`` hooks the layer (hooks always released, also on error), picks the targets, runs one
forward (plus one backward when a method needs gradients) for the whole batch, however many methods
are asked for, and post-processes:
ReLU -> bilinear upsampling to the input size -> per-image min-max to [0, 1]. A map that is constant
after ReLU (common at high noise) is *degenerate*: it is returned as zeros and flagged, never NaN.

Real int8 models work with the gradient-free EigenCAM: quantized activations are dequantized in the
hook. Maps match pytorch-grad-cam's on FP32 models (tests/explain/test_cam_maps.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import UnsupportedError, invalid
from qrobust.placement import feed
from qrobust.quant.convert import layer_root
from qrobust.runtimes.base import RuntimeModel, differentiable
from qrobust.registry import Registry


@dataclass(frozen=True)
class CamOutputs:
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]]  # method -> ((N, H, W) maps in [0, 1], (N,) degenerate)
    targets: torch.Tensor  # (N,) the class every map explains
    logits: torch.Tensor  # (N, K) the model's output on the batch (detached)
    activations: torch.Tensor | None  # (N, C, h, w) float activations at the target layer; None: no layer used


INPUT = ":input"  # a layer spec ending in this names the tensor a module receives, not the one it returns


def split_layer(spec: str) -> tuple[str, bool]:
    """``("avgpool", True)`` for ``"avgpool:input"``: the module name and whether its input is meant.

    A block's output is not always some module's output: in an int8 graph the residual add and ReLU
    that end a ResNet block are functions, and the tensor they produce is what the next module
    (``avgpool``) receives."""
    if spec and spec.endswith(INPUT):
        return spec[: -len(INPUT)], True
    return spec, False


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (inside the graph of an int8 model); errors list the names there are."""
    name = split_layer(name)[0]
    root = layer_root(model)
    if name:
        try:
            return root.get_submodule(name)
        except AttributeError:
            pass
    names = [n for n, _ in root.named_modules() if n]
    shown = ", ".join(names[:60]) + (f", ... ({len(names)} in all)" if len(names) > 60 else "")
    raise invalid("target_layer", name, f"no such module (available: {shown})")


class _Capture(contextlib.AbstractContextManager):
    """Hook keeping the target layer's output (or its input); removed on exit whatever happens.

    The module's output is kept as computed and a copy travels on: an in-place op downstream (the
    ``out += identity`` of torchvision's BasicBlock on ``bn2``'s output) would otherwise change the kept
    tensor after the hook, and gradients are taken with respect to the value the hook saw.
    """

    def __init__(self, layer: nn.Module, on_input: bool = False):
        self.output: torch.Tensor | None = None
        self._handle = (layer.register_forward_pre_hook(self._pre_hook) if on_input
                        else layer.register_forward_hook(self._hook))

    def _hook(self, module, inputs, output):
        self.output = output
        return output.clone() if isinstance(output, torch.Tensor) else None

    def _pre_hook(self, module, inputs):
        self.output = inputs[0] if inputs else None

    def __exit__(self, *exc):
        self._handle.remove()
        return False


def postprocess(raw: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU, bilinear upsampling to ``size``, per-image min-max; degenerate maps become zeros."""
    up = F.interpolate(raw.clamp_min(0).unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    flat = up.flatten(1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    span = hi - lo
    degenerate = span <= 1e-12 * hi.abs().clamp_min(1.0)
    maps = (up - lo[:, None, None]) / torch.where(degenerate, torch.ones_like(span), span)[:, None, None]
    maps[degenerate] = 0.0
    return maps, degenerate


class CamMethod:
    """The template: a method turns the target layer's activations (and gradients) into a raw map."""

    name = "cam"
    uses_gradients = True
    uses_layer = True  # False: the method probes the model's outputs only (any runtime, no layer needed)

    def raw(self, activations: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
        """(N, h, w) map before ReLU and upsampling."""
        raise NotImplementedError

    def probe(self, model, x: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(N, h, w) map of a method that needs no layer (``uses_layer = False``), from model calls alone
        (``logits``: the model's output on ``x``, already computed)."""
        raise NotImplementedError


def _check_targets(logits: torch.Tensor, targets) -> torch.Tensor:
    if targets is None:
        return logits.argmax(dim=1)
    targets = torch.as_tensor(targets, device=logits.device).long().clone()  # never an inference tensor
    if targets.shape != (logits.shape[0],):
        raise invalid("targets", tuple(targets.shape), f"expected one class per image ({logits.shape[0]})")
    if len(targets) and (targets.min() < 0 or targets.max() >= logits.shape[1]):
        raise invalid("targets", targets.tolist()[:8], f"class out of range for {logits.shape[1]} classes")
    return targets


def _checked(act, target_layer: str) -> torch.Tensor:
    """The layer's output as a float (N, C, h, w) tensor, or one line saying why it is not one."""
    if act is None:
        raise invalid("target_layer", target_layer, "was not called during the forward pass")
    if not isinstance(act, torch.Tensor) or act.dim() != 4:
        shape = tuple(act.shape) if isinstance(act, torch.Tensor) else type(act).__name__
        raise invalid("target_layer", target_layer, f"output has shape {shape}; expected (N, C, h, w)")
    return act.dequantize() if act.is_quantized else act


def compute_cams(model: nn.Module, x: torch.Tensor, target_layer: str, methods, targets=None) -> CamOutputs:
    """Maps of several methods from ONE forward (and one backward when a method needs gradients).

    ``targets`` default to the model's own top-1; pass the FP32 top-1 for a quantized twin so both maps
    explain the same class. The logits of that forward are returned too, so callers need no other pass.
    A runtime model (ONNX Runtime) exposes the layer's tensor from the same call; it has no gradients.
    """
    methods = [m if isinstance(m, CamMethod) else method(m) for m in methods]
    needs_grad = any(m.uses_gradients for m in methods)
    if needs_grad and not differentiable(model):
        names = ", ".join(m.name for m in methods if m.uses_gradients)
        where = f"an {model.runtime} model" if isinstance(model, RuntimeModel) else "a real int8 model"
        raise UnsupportedError(
            f"{names} needs gradients, and {where} has none: use the gradient-free eigencam or occlusion (or "
            "compute gradient maps on the pair's fake-quant twin, a fake-* preset with the same bit widths)")
    act, grads = None, None
    if not any(m.uses_layer for m in methods):
        with torch.inference_mode():
            logits = feed(model, x)
        targets = _check_targets(logits, targets)
    elif isinstance(model, RuntimeModel):
        logits, acts = feed(model, x, [target_layer], call=model.run)
        targets = _check_targets(logits, targets)
        act = _checked(acts[target_layer], target_layer)
    else:
        layer = resolve_layer(model, target_layer)
        with _Capture(layer, on_input=split_layer(target_layer)[1]) as capture:
            if needs_grad:
                with torch.enable_grad():
                    logits = feed(model, x.detach().requires_grad_(True))  # a graph even for frozen weights
                    targets = _check_targets(logits, targets)
                    act = _checked(capture.output, target_layer)
                    grads, = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), act)
                act, grads = act.detach(), grads.detach()
            else:
                with torch.inference_mode():
                    logits = feed(model, x)
                    targets = _check_targets(logits, targets)
                    act = _checked(capture.output, target_layer)
    size = tuple(x.shape[-2:])
    maps = {m.name: _on_cpu(postprocess(m.raw(act.float(), grads if m.uses_gradients else None) if m.uses_layer
                                        else m.probe(model, x, targets, logits), size)) for m in methods}
    return CamOutputs(maps, targets.cpu(), logits.detach().cpu(), None if act is None else act.float().cpu())


def _on_cpu(maps: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A method's (maps, degenerate) on the CPU, where metrics are computed whatever the model's device."""
    return maps[0].cpu(), maps[1].cpu()


CAM_METHODS: Registry[type[CamMethod]] = Registry("CAM method")


def register_cam_method(cls: type[CamMethod]) -> type[CamMethod]:
    """Class decorator: make a ``CamMethod`` subclass available by its ``name`` (in thresholds files too)."""
    CAM_METHODS.register(cls.name, cls, tags=("gradient",) if cls.uses_gradients else ("gradient-free",))
    return cls


@register_cam_method
class GradCAM(CamMethod):
    """Selvaraju et al.: channel weights = spatial mean of the gradients."""

    name = "gradcam"

    def raw(self, activations, grads):
        return (grads.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1)


@register_cam_method
class GradCAMPlusPlus(CamMethod):
    """Chattopadhay et al. (eq. 19): pixel-weighted positive gradients."""

    name = "gradcampp"

    def raw(self, activations, grads):
        g2 = grads.pow(2)
        g3 = g2 * grads
        sum_act = activations.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + sum_act * g3 + 1e-6)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        weights = (grads.clamp_min(0) * alpha).sum(dim=(2, 3), keepdim=True)
        return (weights * activations).sum(dim=1)


def eigen_projection(activations: torch.Tensor) -> torch.Tensor:
    """(N, h, w) projection of the centred activations on their first principal component (raw sign)."""
    n, c, h, w = activations.shape
    flat = activations.reshape(n, c, h * w).transpose(1, 2).double()  # (N, hw, C)
    flat = torch.nan_to_num(flat) - flat.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    return (flat @ vh[:, 0, :, None]).reshape(n, h, w).float()


def canonical_sign(projection: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """Flip each projection to correlate positively with the channel-mean activation.

    The principal component's sign is arbitrary, so an FP32 map and its int8 twin could otherwise come out
    inverted while explaining the same thing.
    """
    reference = activations.mean(dim=1).flatten(1).double()
    p = projection.flatten(1).double()
    cov = ((p - p.mean(1, keepdim=True)) * (reference - reference.mean(1, keepdim=True))).sum(1)
    sign = torch.where(cov < 0, -1.0, 1.0).to(projection.dtype)
    return projection * sign[:, None, None]


@register_cam_method
class EigenCAM(CamMethod):
    """Bany Muhammad and Yeasin: first principal component of the activations; needs no gradient."""

    name = "eigencam"
    uses_gradients = False

    def raw(self, activations, grads):
        return canonical_sign(eigen_projection(activations), activations)


@register_cam_method
class Occlusion(CamMethod):
    """Zeiler and Fergus's occlusion sensitivity: how much the target class's log-probability drops when one
    cell of a ``grid`` x ``grid`` partition is set to the batch's mean input (log-softmax rather than their
    probability: a confident model's probability sits at 1 whatever is hidden). Needs only the
    model's outputs, so it explains any twin the same way (an ONNX graph, a compiled engine); it costs
    ``grid**2`` extra forwards of the batch (49 with the default 7 x 7), run ``cells_per_call`` at a time."""

    name = "occlusion"
    uses_gradients = False
    uses_layer = False
    grid = 7
    cells_per_call = 8

    def probe(self, model, x, targets, logits):
        n, _, height, width = x.shape
        rows = torch.linspace(0, height, self.grid + 1).round().long().tolist()
        cols = torch.linspace(0, width, self.grid + 1).round().long().tolist()
        cells = [(r, c) for r in range(self.grid) for c in range(self.grid)]
        fill = x.mean(dim=(0, 2, 3), keepdim=True)
        with torch.inference_mode():
            targets = targets.cpu()
            base = torch.log_softmax(logits.detach().cpu().double(), 1).gather(1, targets[:, None])[:, 0]
            drops = torch.zeros(n, self.grid, self.grid, dtype=torch.float64)
            for start in range(0, len(cells), self.cells_per_call):
                chunk = cells[start:start + self.cells_per_call]
                masked = x.repeat(len(chunk), 1, 1, 1)
                for k, (r, c) in enumerate(chunk):
                    masked[k * n:(k + 1) * n, :, rows[r]:rows[r + 1], cols[c]:cols[c + 1]] = fill[0]
                probs = torch.log_softmax(feed(model, masked).double(), 1).cpu()
                for k, (r, c) in enumerate(chunk):
                    drops[:, r, c] = base - probs[k * n:(k + 1) * n].gather(1, targets[:, None])[:, 0]
        return drops.float()


def method(name: str) -> CamMethod:
    """An instance of the registered CAM method ``name``."""
    return CAM_METHODS.get(name)()

