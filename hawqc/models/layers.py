"""Blocks shared by the torchvision-layout CNNs: torchvision's ``Conv2dNormActivation`` and
``SqueezeExcitation`` with their state-dict names, its channel rounding and its initialisation."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def make_divisible(value: float, divisor: int = 8) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``), never more than 10% below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNAct(nn.Sequential):
    """Conv (no bias, "same" padding) -> BatchNorm -> optional activation: keys ``0.weight``, ``1.*``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: Callable[..., nn.Module] | None = nn.ReLU,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
        dilation: int = 1,
    ) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)]
        layers.append(norm(out_channels))
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """``x * gate(fc2(act(fc1(avgpool(x)))))``, the 1x1 convs ``fc1``/``fc2`` with biases."""

    def __init__(
        self,
        channels: int,
        squeeze_channels: int,
        activation: Callable[[], nn.Module] = nn.ReLU,
        gate: Callable[[], nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = activation()
        self.scale_activation = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


def init_weights(model: nn.Module, linear: str = "normal") -> None:
    """torchvision's initialisation: Kaiming-normal (fan-out) convs, unit BatchNorms, zero biases, and linear
    weights ``normal`` N(0, 0.01), ``uniform`` U(+-1/sqrt(out_features)) (EfficientNet), ``kaiming`` Kaiming-uniform
    (fan-out, MNASNet) or ``default`` (PyTorch's own, biases too: ResNet)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
        elif isinstance(m, nn.Linear) and linear == "default":
            continue
        elif isinstance(m, nn.Linear) and linear == "uniform":
            bound = 1.0 / math.sqrt(m.out_features)
            nn.init.uniform_(m.weight, -bound, bound)
        elif isinstance(m, nn.Linear) and linear == "kaiming":
            nn.init.kaiming_uniform_(m.weight, mode="fan_out", nonlinearity="sigmoid")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) and m.bias is not None:
            nn.init.zeros_(m.bias)


def init_truncated_normal(model: nn.Module, std: float) -> None:
    """The initialisation of torchvision's Inception-V3 and GoogLeNet: conv and linear weights from a normal of
    ``std`` truncated to [-2, 2], unit BatchNorms with zero bias."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, mean=0.0, std=std, a=-2, b=2)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
