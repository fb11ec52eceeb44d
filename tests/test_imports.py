"""No import circle in the package, function-level imports included: each wing imports only those below
it (the review's layering), so a module can be read, tested and changed from the bottom up."""
import ast
from pathlib import Path

import qrobust

PACKAGE = Path(qrobust.__file__).parent


def module_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (packages are their __init__)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_back_through_others():
    assert cycles(module_graph()) == []


def test_the_walker_sees_function_level_imports_and_finds_a_circle():
    graph = module_graph()
    assert "qrobust.quant.convert" in graph["qrobust.runtimes.onnx_quantize"]  # a module-level import
    assert "qrobust.gate.html_report" in graph["qrobust.plugin"]  # imported inside a hook
    graph["qrobust.quant.convert"].add("qrobust.runtimes.onnx_quantize")  # the circle this package had
    assert any({"qrobust.quant.convert", "qrobust.runtimes.onnx_quantize"} <= set(c) for c in cycles(graph))


def test_runtimes_register_their_quantizers_in_the_registry_quant_owns(monkeypatch):
    import pytest
    from torch import nn

    from qrobust.errors import InvalidArgument
    from qrobust.quant import convert, get_preset
    from qrobust.quant.presets import RUNTIMES
    from qrobust.registry import Registry

    assert sorted(convert.QUANTIZERS.names()) == sorted(RUNTIMES)  # every recipe runtime has its builder
    monkeypatch.setattr(convert, "QUANTIZERS", Registry("quantizer"))  # as if qrobust.runtimes were never imported
    with pytest.raises(InvalidArgument, match="runtime='onnxruntime': has no quantizer registered: import "
                                              "qrobust.runtimes first"):
        convert.quantize_model(nn.Linear(2, 2), get_preset("ort-int8"), [])
