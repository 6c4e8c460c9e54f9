"""ShuffleNet-V2 x1.0 with torchvision's module names (its checkpoints load with ``strict=True``)."""

from __future__ import annotations

import torch
from torch import nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave ``groups`` channel groups: Reshape -> Transpose -> Reshape in ONNX."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


def depthwise(channels: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False), nn.BatchNorm2d(channels)]


def pointwise(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class ShuffleBlock(nn.Module):
    """torchvision's ``InvertedResidual``: stride 1 splits the channels in two (``chunk``) and transforms one
    half; stride 2 transforms the whole input on both branches. The halves concatenate and shuffle."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = out_channels // 2
        self.branch1 = nn.Sequential(*depthwise(in_channels, stride), *pointwise(in_channels, half)) \
            if stride > 1 else nn.Sequential()
        self.branch2 = nn.Sequential(*pointwise(in_channels if stride > 1 else half, half), *depthwise(half, stride),
                                     *pointwise(half, half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """Stem conv + max pool, three stages of shuffle blocks, a 1x1 ``conv5``, global mean, ``fc``."""

    def __init__(self, repeats: tuple[int, ...] = (4, 8, 4), widths: tuple[int, ...] = (24, 116, 232, 464, 1024),
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                   nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = widths[0]
        for i, (count, width) in enumerate(zip(repeats, widths[1:]), start=2):
            blocks = [ShuffleBlock(channels, width, 2)] + [ShuffleBlock(width, width, 1) for _ in range(count - 1)]
            setattr(self, f"stage{i}", nn.Sequential(*blocks))
            channels = width
        self.conv5 = nn.Sequential(*pointwise(channels, widths[-1]))
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.maxpool(self.conv1(x)))))
        return self.fc(self.conv5(x).mean([2, 3]))


def shufflenet_v2_x1_0(num_classes: int = 1000) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes=num_classes)
