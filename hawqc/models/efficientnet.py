"""EfficientNet-B0 with torchvision's module names (its checkpoints load with ``strict=True``)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from hawqc.models.layers import ConvBNAct, SqueezeExcitation, init_weights, make_divisible
from hawqc.models.mobilenet import MBConv


class EfficientNet(nn.Module):
    """torchvision's EfficientNet-B0: SiLU everywhere, squeeze-excitation in every block.

    Stochastic depth, the identity in eval mode and without parameters, is left out.
    """

    STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
    """(expand ratio, kernel, stride of the first block, output channels, blocks) per stage."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(3, 32, 3, 2, activation=nn.SiLU)]
        channels = 32
        for expand_ratio, kernel, stride, out_channels, blocks in self.STAGES:
            stage = []
            for i in range(blocks):
                expanded = make_divisible(channels * expand_ratio)
                se = SqueezeExcitation(expanded, max(1, channels // 4), partial(nn.SiLU, inplace=True))
                stage.append(MBConv(channels, expanded, out_channels, kernel, stride if i == 0 else 1, nn.SiLU, se))
                channels = out_channels
            layers.append(nn.Sequential(*stage))
        layers.append(ConvBNAct(channels, 4 * channels, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * channels, num_classes))
        init_weights(self, linear="uniform")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def efficientnet_b0(num_classes: int = 1000) -> EfficientNet:
    return EfficientNet(num_classes)
