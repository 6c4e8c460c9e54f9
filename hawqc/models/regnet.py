"""RegNetY-400MF with torchvision's module names (its checkpoints load with ``strict=True``)."""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict

import torch
from torch import nn

from hawqc.models.layers import ConvBNAct, SqueezeExcitation, init_weights, make_divisible


def regnet_stages(depth: int, w_0: int, w_a: float, w_m: float, group_width: int) -> list[tuple[int, int, int]]:
    """(width, blocks, group width) per stage from RegNet's quantized linear rule, computed in float32
    exactly as torchvision's ``BlockParams.from_init_params`` (bottleneck multiplier 1)."""
    widths_cont = torch.arange(depth) * w_a + w_0
    capacity = torch.round(torch.log(widths_cont / w_0) / math.log(w_m))
    block_widths = (torch.round(w_0 * torch.pow(w_m, capacity) / 8) * 8).int().tolist()
    stages = []
    for width, run in itertools.groupby(block_widths):
        g = min(group_width, width)
        stages.append((make_divisible(width, g), len(list(run)), g))
    return stages


class ResBottleneckBlock(nn.Module):
    """``relu(shortcut(x) + f(x))``, f = 1x1, grouped 3x3, squeeze-excitation, 1x1; the shortcut is a
    strided 1x1 conv + BatchNorm (``proj``) when the shape changes."""

    def __init__(self, width_in: int, width_out: int, stride: int, group_width: int, se_ratio: float) -> None:
        super().__init__()
        self.proj = None
        if width_in != width_out or stride != 1:
            self.proj = ConvBNAct(width_in, width_out, 1, stride, activation=None)
        self.f = nn.Sequential(OrderedDict(
            a=ConvBNAct(width_in, width_out, 1),
            b=ConvBNAct(width_out, width_out, 3, stride, groups=width_out // group_width),
            se=SqueezeExcitation(width_out, int(round(se_ratio * width_in))),
            c=ConvBNAct(width_out, width_out, 1, activation=None),
        ))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.f(x))


class RegNet(nn.Module):
    """torchvision's RegNetY: a 3x3/2 stem, stages ``trunk_output.block{i}`` of blocks ``block{i}-{j}``."""

    def __init__(
        self, stages: list[tuple[int, int, int]], num_classes: int = 1000, stem_width: int = 32, se_ratio: float = 0.25
    ) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, stem_width, 3, 2)
        trunk = OrderedDict()
        width_in = stem_width
        for i, (width, blocks, group_width) in enumerate(stages, 1):
            trunk[f"block{i}"] = nn.Sequential(OrderedDict(
                (f"block{i}-{j}", ResBottleneckBlock(width_in if j == 0 else width, width, 2 if j == 0 else 1,
                                                     group_width, se_ratio))
                for j in range(blocks)
            ))
            width_in = width
        self.trunk_output = nn.Sequential(trunk)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width_in, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.trunk_output(self.stem(x))), 1))


def regnet_y_400mf(num_classes: int = 1000) -> RegNet:
    return RegNet(regnet_stages(depth=16, w_0=48, w_a=27.89, w_m=2.09, group_width=8), num_classes)
