"""MNASNet 1.0 with torchvision's module names (its checkpoints load with ``strict=True``)."""

from __future__ import annotations

import torch
from torch import nn

from hawqc.models.layers import init_weights

BN_MOMENTUM = 1 - 0.9997
"""torchvision's (TensorFlow's) BatchNorm momentum for MNASNet."""
STACKS = ((24, 3, 2, 3, 3), (40, 5, 2, 3, 3), (80, 5, 2, 6, 3), (96, 3, 1, 6, 2), (192, 5, 2, 6, 4), (320, 3, 1, 6, 1))
"""(out channels, kernel, first stride, expansion, repeats) of each stack at depth multiplier 1.0."""


class MnasBlock(nn.Module):
    """1x1 expand -> kxk depthwise (both BN + ReLU) -> linear 1x1; a residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = in_channels * expansion
        self.apply_residual = in_channels == out_channels and stride == 1
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid, momentum=BN_MOMENTUM), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False),
            nn.BatchNorm2d(mid, momentum=BN_MOMENTUM), nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x) if self.apply_residual else self.layers(x)


class MNASNet(nn.Module):
    """``layers`` (stem, separable conv, six stacks, 1x1 to 1280), a mean over H and W (ReduceMean in
    ONNX) and ``classifier`` (dropout, linear)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32, momentum=BN_MOMENTUM), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False), nn.BatchNorm2d(32, momentum=BN_MOMENTUM),
            nn.ReLU(inplace=True), nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16, momentum=BN_MOMENTUM),
        ]
        channels = 16
        for out, kernel, stride, expansion, repeats in STACKS:
            layers.append(nn.Sequential(*[MnasBlock(channels if i == 0 else out, out, kernel, stride if i == 0 else 1,
                                                    expansion) for i in range(repeats)]))
            channels = out
        layers += [nn.Conv2d(channels, 1280, 1, bias=False), nn.BatchNorm2d(1280, momentum=BN_MOMENTUM),
                   nn.ReLU(inplace=True)]
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(1280, num_classes))
        init_weights(self, linear="kaiming")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layers(x).mean([2, 3]))


def mnasnet1_0(num_classes: int = 1000) -> MNASNet:
    return MNASNet(num_classes=num_classes)
