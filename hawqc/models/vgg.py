"""VGG-16 (without BatchNorm) with torchvision's module names (its checkpoints load with ``strict=True``)."""

from __future__ import annotations

import torch
from torch import nn

from hawqc.models.layers import init_weights

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
"""3x3 conv widths, ``"M"`` a 2x2 max pool: ``features`` in order."""


class VGG(nn.Module):
    """torchvision's VGG: ``features`` (conv + ReLU, max pools), a 7x7 adaptive average pool and a
    three-layer ``classifier`` with dropout."""

    def __init__(self, config: tuple[int | str, ...] = VGG16, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                in_channels = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg16(num_classes: int = 1000, in_channels: int = 3) -> VGG:
    return VGG(VGG16, num_classes, in_channels)
