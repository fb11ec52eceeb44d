"""Shared fixtures for qrobust's own tests."""
import pytest


@pytest.fixture(scope="session", autouse=True)
def _import_lazy_torch_modules():
    """Import, in the test process, the torch modules that quantization and CAMs import lazily.

    pytester restores sys.modules after each in-process run; a torch module first imported inside such a
    run would be imported again by the next one, and operator libraries refuse a second registration.
    """
    import torch
    from torch import nn

    from qrobust.quantize import get_preset, quantize_model
    from qrobust.session import QrobustSession  # noqa: F401

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    x = torch.rand(2, 3, 8, 8)
    for preset in ("int8-x86", "fake-w8a8"):
        quantize_model(model, get_preset(preset), [x])
