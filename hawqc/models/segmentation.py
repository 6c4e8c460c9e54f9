"""LR-ASPP on MobileNet-V3-Large (torchvision's ``lraspp_mobilenet_v3_large``, its state-dict keys):
a dilated backbone, a head whose high-resolution branch is gated by a sigmoid of its global average,
a 1x1 classifier per scale, bilinear upsampling. ``forward`` returns the logits tensor (torchvision
returns ``{"out": logits}``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hawqc.models.layers import init_weights
from hawqc.models.mobilenet import MobileNetV3

LOW, HIGH = 4, 16
"""Backbone stages whose outputs the head reads: stride 8 (40 channels) and stride 16 (960)."""


class LRASPPHead(nn.Module):
    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int) -> None:
        super().__init__()
        self.cbr = nn.Sequential(nn.Conv2d(high_channels, inter_channels, 1, bias=False),
                                 nn.BatchNorm2d(inter_channels), nn.ReLU(inplace=True))
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(high_channels, inter_channels, 1, bias=False),
                                   nn.Sigmoid())
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = self.cbr(high) * self.scale(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


class LRASPP(nn.Module):
    def __init__(self, num_classes: int = 21, inter_channels: int = 128) -> None:
        super().__init__()
        self.backbone = nn.Sequential(*MobileNetV3(dilated=True).features[: HIGH + 1])
        self.classifier = LRASPPHead(40, 960, num_classes, inter_channels)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        high = x
        for i, stage in enumerate(self.backbone):  # the backbone's own modules, so that torch.fx traces them
            high = stage(high)
            if i == LOW:
                low = high
        return F.interpolate(self.classifier(low, high), size=x.shape[-2:], mode="bilinear", align_corners=False)


def lraspp_mobilenet_v3_large(num_classes: int = 21) -> LRASPP:
    return LRASPP(num_classes)
