"""Which tensor of a twin is the FP32 CAM layer's tensor: so both maps are computed from the same thing.

A twin's graph need not have the FP32 layer under its name: FX int8 graphs flatten and fuse modules
(``quant.twin_layer_name`` guesses from the structure), and the output of a ResNet block is produced by a
functional residual add and ReLU that no module returns. ``match_twin_layer`` settles it with data: it
runs one probe batch through both models, captures the FP32 layer's output and the twin's candidate
tensors (the structural guess, the outputs of modules inside the layer, the input of the first module
after it), and takes the same-shaped candidate closest to the FP32 one (relative L2 error). The
structural guess wins ties; the error of the choice is returned, so a bad match is visible.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from qrobust.explain.cam import INPUT, resolve_layer, split_layer
from qrobust.placement import feed
from qrobust.quant.convert import layer_root, twin_layer_name


def _candidates(called: list[str], name: str, guess: str) -> list[str]:
    """The twin tensors that can be FP32's ``name``: the structural guess, the outputs of the modules
    inside ``name``, and the input of the first module called after them (a block ends in functions)."""
    inside = [i for i, n in enumerate(called) if n == name or n.startswith(name + ".") or n == guess]
    if not inside:
        return [guess]
    after = called[max(inside) + 1:max(inside) + 2]
    return list(dict.fromkeys([guess] + [called[i] for i in inside] + [n + INPUT for n in after]))


def _called_modules(model: nn.Module) -> list[str]:
    """Names of the modules a forward runs: the graph's module calls for FX graphs, else every leaf."""
    root = layer_root(model)
    graph = getattr(root, "graph", None)
    if isinstance(graph, torch.fx.Graph):
        return list(dict.fromkeys(n.target for n in graph.nodes if n.op == "call_module"))
    return [name for name, m in root.named_modules() if name and not list(m.children())]


def _float(t) -> torch.Tensor | None:
    """A copy of a captured tensor as float on the CPU (where FP32's and the twin's are compared; a copy,
    as an in-place op after the hook, such as a residual add, would change it)."""
    if not isinstance(t, torch.Tensor):
        return None
    return (t.dequantize() if t.is_quantized else t).detach().to("cpu", torch.float32, copy=True)


@contextlib.contextmanager
def _record_all(model: nn.Module, names: list[str]):
    """Hooks keeping every named module's output and input (``name`` and ``name:input``)."""
    root, seen, handles = layer_root(model), {}, []

    def keep(spec):
        def out_hook(module, inputs, output):
            seen[spec] = _float(output)

        def in_hook(module, inputs):
            seen[spec + INPUT] = _float(inputs[0]) if inputs else None

        return out_hook, in_hook

    try:
        for name in names:
            module = root.get_submodule(name)
            out_hook, in_hook = keep(name)
            handles += [module.register_forward_hook(out_hook), module.register_forward_pre_hook(in_hook)]
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def activation(model: nn.Module, spec: str, x: torch.Tensor) -> torch.Tensor:
    """The float tensor at ``spec`` (a module's output, or ``name:input``) for the batch ``x``."""
    name, on_input = split_layer(spec)
    layer, box = resolve_layer(model, name), {}
    handle = (layer.register_forward_pre_hook(lambda m, i: box.__setitem__("t", _float(i[0]))) if on_input
              else layer.register_forward_hook(lambda m, i, o: box.__setitem__("t", _float(o))))
    try:
        with torch.inference_mode():
            feed(model, x)
    finally:
        handle.remove()
    return box["t"]


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return float((candidate - reference).norm() / reference.norm().clamp_min(1e-12))


def match_twin_layer(fp32: nn.Module, twin: nn.Module, name: str, x: torch.Tensor) -> tuple[str, float]:
    """The twin's tensor (module name, or ``name:input``) closest to FP32's ``name`` on the batch ``x``,
    with its relative L2 error."""
    reference = activation(fp32, name, x)
    guess = twin_layer_name(fp32, twin, name)
    called = _called_modules(twin)
    candidates = _candidates(called, name, guess)
    modules = list(dict.fromkeys(split_layer(c)[0] for c in candidates if split_layer(c)[0] in called))
    with _record_all(twin, modules) as seen, torch.inference_mode():
        feed(twin, x, role="twin")
    scores = {spec: relative_error(reference, t) for spec, t in seen.items()
              if spec in candidates and t is not None and t.shape == reference.shape}
    if not scores:
        return guess, float("nan")
    best = min(scores, key=lambda spec: (scores[spec], spec != guess))
    if guess in scores and scores[guess] <= scores[best] * (1 + 1e-6):
        best = guess
    return best, scores[best]
