"""Old module paths (qrobust 0.1's flat layout) as deprecated aliases of the new wings, for one release.

``import qrobust.pairs`` gives a thin module whose attributes are those of ``qrobust.models.pair`` (the
same objects), with a DeprecationWarning naming the new path. Nothing is imported until an old name is
used.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "qrobust.pairs": "qrobust.models.pair", "qrobust.zoo": "qrobust.models.zoo",
    "qrobust.efficientnet_lite": "qrobust.models.efficientnet_lite", "qrobust.loading": "qrobust.models.checkpoints",
    "qrobust.declared": "qrobust.models.declared", "qrobust.quantize": "qrobust.quant.convert",
    "qrobust.quantizer": "qrobust.quant.quantizer", "qrobust.perturbations": "qrobust.data.perturbations",
    "qrobust.cam": "qrobust.explain.cam", "qrobust.explain_quality": "qrobust.explain.quality",
    "qrobust.stats": "qrobust.metrics.stats", "qrobust.timing": "qrobust.metrics.timing",
    "qrobust.engine": "qrobust.gate.engine", "qrobust.thresholds": "qrobust.gate.config",
    "qrobust.report": "qrobust.gate.report",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return None  # the default: a fresh module, filled below

    def exec_module(self, module):
        target = importlib.import_module(self.target)
        module.__getattr__ = lambda name: getattr(target, name)
        module.__all__ = getattr(target, "__all__", [n for n in vars(target) if not n.startswith("_")])


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        warnings.warn(f"{fullname} moved to {MOVED[fullname]}; the old path goes away in the next release "
                      "(the public API is `import qrobust`)", DeprecationWarning, stacklevel=3)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(MOVED[fullname]))


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
