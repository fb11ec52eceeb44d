"""qrobust: a pytest-native robustness gate for quantized vision models.

The public API, for conftest.py files and scripts; everything here is imported lazily, so the pytest
plugin (which loads with every pytest run) stays light:

    from qrobust import ModelPair, Preprocess, register_pair, get_preset, quantize_model, load_onnx

Modules of earlier releases (``qrobust.pairs``, ``qrobust.quantize``, ...) still import, with a
DeprecationWarning, until the next release (see ``qrobust._compat``).

PYTEST_DONT_REWRITE: no assertions to rewrite here, and ``qrobust run`` imports this package before
pytest starts.
"""
from __future__ import annotations

import importlib

from qrobust import _compat

__version__ = "0.2.0"

_PUBLIC = {
    # models and pairs
    "ModelPair": "qrobust.models.pair", "Preprocess": "qrobust.models.pair", "register_pair": "qrobust.models",
    "load_pair": "qrobust.models", "pair_names": "qrobust.models",
    # quantization
    "QuantConfig": "qrobust.quant", "TensorSpec": "qrobust.quant", "PRESETS": "qrobust.quant",
    "get_preset": "qrobust.quant", "quantize_model": "qrobust.runtimes",  # with every runtime's quantizer registered
    # runtimes
    "load_onnx": "qrobust.runtimes", "load_outputs": "qrobust.runtimes", "RuntimeModel": "qrobust.runtimes",
    # data and perturbations
    "ImageSet": "qrobust.data", "StreamingSet": "qrobust.data", "DATASETS": "qrobust.data",
    "load_dataset": "qrobust.data", "perturb": "qrobust.data", "register_perturbation": "qrobust.data",
    "PERTURBATIONS": "qrobust.data",
    # explanations and metrics
    "compute_cams": "qrobust.explain", "CamMethod": "qrobust.explain", "register_cam_method": "qrobust.explain",
    "METRICS": "qrobust.metrics",
    # the gate
    "Evaluator": "qrobust.gate.engine", "load_thresholds": "qrobust.gate.config",
    # errors
    "QrobustError": "qrobust.errors", "InvalidArgument": "qrobust.errors", "ConfigError": "qrobust.errors",
    "ModelOutputError": "qrobust.errors", "UnsupportedError": "qrobust.errors",
}
__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qrobust' has no attribute {name!r}")


def __dir__():
    return __all__


_compat.install()
