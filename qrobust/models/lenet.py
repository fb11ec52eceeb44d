"""LeNet-5 on scikit-learn's digits, the small built-in model, with weights shipped in the package.

The weights are a fixed artifact (``weights/lenet5-digits.safetensors``), never trained during a gate
run: training on another machine gives other weights (float reductions differ by CPU), and with them
other verdicts. ``tools/train_lenet5.py`` reproduces them (recipe below); a test retrains and checks the
shipped accuracy.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from torch import nn

from qrobust.models.pair import Preprocess

DIGITS_PREPROCESS = Preprocess(resolution=(32, 32), mean=(0.5,), std=(0.5,))
LENET5_WEIGHTS = Path(__file__).parent / "weights" / "lenet5-digits.safetensors"
# The recipe tools/train_lenet5.py follows: Adam, seed 0, one thread; each training image gets a random
# brightness offset, contrast reduction and Gaussian noise (photometric augmentation, as image classifiers
# are trained), so the FP32 model does not sit on decision boundaries under the gate's photometric sweep.
LENET5_RECIPE = {"epochs": 30, "batch_size": 32, "lr": 1e-3, "seed": 0, "brightness": [-0.1, 0.5],
                 "contrast_reduction": [0.0, 0.9], "noise_sigma": [0.0, 0.3]}


class LeNet5(nn.Module):
    """LeNet-5 as in seed 003: two conv and three fully connected layers, ReLU and max pooling."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@cache
def lenet5_digits() -> LeNet5:
    """The shipped FP32 LeNet-5 (one shared instance, so every twin shares its forwards)."""
    from safetensors.torch import load_file

    model = LeNet5()
    model.load_state_dict(load_file(str(LENET5_WEIGHTS)))
    return model.eval()
