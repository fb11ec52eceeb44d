"""Tiny models and data shared by qrobust's own tests (one place, so every test builds them the same way)."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import torch
from torch import nn

from qrobust.data import ImageSet
from qrobust.models import ModelPair, Preprocess
from qrobust.quant import get_preset, quantize_model

PRE = Preprocess((16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def tiny_net(classes: int = 4, channels: int = 3, width: int = 6) -> nn.Module:
    """Conv -> ReLU -> global pool -> Linear, seeded: the smallest classifier every kind of twin accepts."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, classes)).eval()


def small_net(classes: int = 5) -> nn.Module:
    """Two padded conv blocks and a Linear head (for 12x12 or 16x16 RGB inputs): enough to fuse and quantize."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes)).eval()


def synthetic_set(n: int = 100, k: int = 4, name: str = "synthetic", size: int = 16) -> ImageSet:
    """Pixels whose brightness depends on the label (learnable), ids from 1000, two samples per group."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % k
    images = (torch.rand(n, 3, size, size, generator=gen) * 0.4 + labels.view(-1, 1, 1, 1) * 0.15).clamp(0, 1)
    return ImageSet(name, images, labels, torch.arange(1000, 1000 + n), torch.arange(n) // 2, num_classes=k)


def make_pair(name: str, fp32: nn.Module, quantized: nn.Module | None = None, k: int = 4, preset: str = "fake-w8a8",
              dataset: str = "synthetic", **kw) -> ModelPair:
    """A pair on the synthetic set; the twin is calibrated on seeded noise unless given."""
    config = get_preset(preset)
    if quantized is None:
        quantized = quantize_model(fp32, config, [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))])
    return ModelPair(name, fp32, quantized, config, PRE, num_classes=k, dataset=dataset, **kw)


# ---- a gate on the built-in LeNet pairs, for plugin tests (pytester) ----------------------------------
SUITE = """
def test_top1_delta(qrobust_case, qrobust_check):
    qrobust_check(qrobust_case, "top1_delta")

def test_agreement(qrobust_case, qrobust_check):
    qrobust_check(qrobust_case, "agreement")

def test_kl_mean(qrobust_case, qrobust_check):
    qrobust_check(qrobust_case, "kl_mean")
"""

BITWIDTH_SUITE = """
def test_bitwidth(qrobust_bitwidth_case, qrobust_check):
    qrobust_check(qrobust_bitwidth_case, list(qrobust_bitwidth_case.tolerances))
"""


def thresholds(pair="lenet5-digits-int8-x86", extra="", decision="point", tolerances=None):
    tolerances = tolerances or "{top1_delta: 0.01, agreement: 0.98, kl_mean: 0.02}"
    return textwrap.dedent(f"""\
        decision: {decision}
        max_samples: 120
        replicates: 200
        defaults: {tolerances}
        perturbations:
          awgn: {{levels: [0, 0.1]}}
          occlusion_vertical: {{levels: [0, 2]}}
        gate:
          {pair}: {{}}
        """) + extra


def five_class_set() -> list[tuple[torch.Tensor, int]]:
    """A declared dataset's builder (``helpers:five_class_set``): 60 synthetic 16x16 (image, label), 5 classes."""
    data = synthetic_set(60, 5, "shapes")
    return list(zip(data.images, data.labels.tolist()))


# ---- the README's code blocks, which tests run as written -----------------------------------------------
README = Path(__file__).parents[1] / "README.md"


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
