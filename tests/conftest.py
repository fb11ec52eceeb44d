"""Shared fixtures for qrobust's own tests."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py, importable from every test folder


@pytest.fixture(scope="session", autouse=True)
def _import_lazy_torch_modules():
    """Import, in the test process, the torch modules that quantization and CAMs import lazily.

    pytester restores sys.modules after each in-process run; a torch module first imported inside such a
    run would be imported again by the next one, and operator libraries refuse a second registration.
    """
    import torch

    import qrobust.fixture  # noqa: F401
    import qrobust.session  # noqa: F401
    from helpers import tiny_net
    from qrobust.quant import get_preset, quantize_model

    x = torch.rand(2, 3, 8, 8)
    for preset in ("int8-x86", "fake-w8a8"):
        quantize_model(tiny_net(), get_preset(preset), [x])
