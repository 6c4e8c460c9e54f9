"""MobileNet-V2 and MobileNet-V3-Large with torchvision's module names (its checkpoints load with
``strict=True``), and the inverted residual block with squeeze-excitation that EfficientNet shares."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from hawqc.models.layers import ConvBNAct, SqueezeExcitation, init_weights, make_divisible


class InvertedResidual(nn.Module):
    """MobileNet-V2 block: 1x1 expand (skipped at ratio 1), 3x3 depthwise, both ReLU6, then a linear 1x1."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = [] if expand_ratio == 1 else [ConvBNAct(in_channels, hidden, 1, activation=nn.ReLU6)]
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MBConv(nn.Module):
    """MobileNet-V3/EfficientNet block: 1x1 expand (skipped when ``expanded == in_channels``), kxk
    depthwise, optional squeeze-excitation, linear 1x1 projection; a residual when shapes allow."""

    def __init__(
        self,
        in_channels: int,
        expanded: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        activation: Callable[..., nn.Module],
        se: nn.Module | None,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(ConvBNAct(in_channels, expanded, 1, activation=activation, norm=norm))
        layers.append(ConvBNAct(expanded, expanded, kernel_size, stride, expanded, activation, norm, dilation))
        if se is not None:
            layers.append(se)
        layers.append(ConvBNAct(expanded, out_channels, 1, activation=None, norm=norm))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res_connect else self.block(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNet-V2 (width multiplier 1)."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))
    """(expand ratio, output channels, blocks, stride of the first block) per stage."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(3, 32, 3, 2, activation=nn.ReLU6)]
        channels = 32
        for expand_ratio, out_channels, blocks, stride in self.SETTINGS:
            for i in range(blocks):
                layers.append(InvertedResidual(channels, out_channels, stride if i == 0 else 1, expand_ratio))
                channels = out_channels
        layers.append(ConvBNAct(channels, 1280, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class MobileNetV3(nn.Module):
    """torchvision's MobileNet-V3-Large: hardswish in the deeper half, hardsigmoid-gated squeeze-excitation.
    ``dilated``: the last stage keeps stride 16 with dilation 2 (the segmentation backbone)."""

    SETTINGS = (
        (3, 16, 16, False, False, 1), (3, 64, 24, False, False, 2), (3, 72, 24, False, False, 1),
        (5, 72, 40, True, False, 2), (5, 120, 40, True, False, 1), (5, 120, 40, True, False, 1),
        (3, 240, 80, False, True, 2), (3, 200, 80, False, True, 1), (3, 184, 80, False, True, 1),
        (3, 184, 80, False, True, 1), (3, 480, 112, True, True, 1), (3, 672, 112, True, True, 1),
        (5, 672, 160, True, True, 2), (5, 960, 160, True, True, 1), (5, 960, 160, True, True, 1),
    )
    """(kernel, expanded channels, output channels, squeeze-excitation, hardswish, stride) per block."""

    def __init__(self, num_classes: int = 1000, dilated: bool = False) -> None:
        super().__init__()
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        layers: list[nn.Module] = [ConvBNAct(3, 16, 3, 2, activation=nn.Hardswish, norm=norm)]
        channels = 16
        for i, (kernel, expanded, out_channels, use_se, hardswish, stride) in enumerate(self.SETTINGS):
            se = SqueezeExcitation(expanded, make_divisible(expanded // 4), gate=nn.Hardsigmoid) if use_se else None
            activation = nn.Hardswish if hardswish else nn.ReLU
            dilation = 2 if dilated and i >= len(self.SETTINGS) - 3 else 1
            layers.append(MBConv(channels, expanded, out_channels, kernel, 1 if dilation > 1 else stride, activation,
                                 se, norm, dilation))
            channels = out_channels
        layers.append(ConvBNAct(channels, 6 * channels, 1, activation=nn.Hardswish, norm=norm))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * channels, 1280), nn.Hardswish(inplace=True), nn.Dropout(0.2), nn.Linear(1280, num_classes)
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v2(num_classes: int = 1000) -> MobileNetV2:
    return MobileNetV2(num_classes)


def mobilenet_v3_large(num_classes: int = 1000) -> MobileNetV3:
    return MobileNetV3(num_classes)
