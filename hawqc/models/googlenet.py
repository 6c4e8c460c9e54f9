"""GoogLeNet (Inception-V1) with torchvision's module names (its checkpoints load with ``strict=True``
into ``googlenet(aux_logits=True)``; torchvision drops the auxiliary heads after loading)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hawqc.models.inception import BasicConv2d
from hawqc.models.layers import init_truncated_normal

INCEPTIONS = {"inception3a": (192, 64, 96, 128, 16, 32, 32), "inception3b": (256, 128, 128, 192, 32, 96, 64),
              "maxpool3": (), "inception4a": (480, 192, 96, 208, 16, 48, 64),
              "inception4b": (512, 160, 112, 224, 24, 64, 64), "inception4c": (512, 128, 128, 256, 24, 64, 64),
              "inception4d": (512, 112, 144, 288, 32, 64, 64), "inception4e": (528, 256, 160, 320, 32, 128, 128),
              "maxpool4": (), "inception5a": (832, 256, 160, 320, 32, 128, 128),
              "inception5b": (832, 384, 192, 384, 48, 128, 128)}
"""Modules after the stem in order: an inception block's (in, 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool
projection), or a ceil-mode max pool."""


class Inception(nn.Module):
    """Four branches concatenated: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 (torchvision's "5x5"); ceil-mode 3x3 max pool -> 1x1."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int,
                 pool_proj: int) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(in_channels, ch3x3red, kernel_size=1),
                                     BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(in_channels, ch5x5red, kernel_size=1),
                                     BasicConv2d(ch5x5red, ch5x5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
                                     BasicConv2d(in_channels, pool_proj, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Training-time head: 4x4 adaptive average pool -> 1x1 conv -> fc1 (ReLU) -> dropout -> fc2."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = BasicConv2d(in_channels, 128, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=0.7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(F.adaptive_avg_pool2d(x, (4, 4))), 1)
        return self.fc2(self.dropout(F.relu(self.fc1(x), inplace=True)))


class GoogLeNet(nn.Module):
    """Stem (7x7 conv, ceil-mode max pools, 1x1 and 3x3 convs), nine inception blocks, global average pool,
    dropout, ``fc``. With ``aux_logits`` in training mode the forward returns ``(logits, aux2, aux1)``."""

    def __init__(self, num_classes: int = 1000, aux_logits: bool = False, dropout: float = 0.2) -> None:
        super().__init__()
        self.conv1 = BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        for name, widths in INCEPTIONS.items():
            pool = nn.MaxPool2d(3 if name == "maxpool3" else 2, stride=2, ceil_mode=True)
            setattr(self, name, Inception(*widths) if widths else pool)
        self.aux1 = InceptionAux(512, num_classes) if aux_logits else None
        self.aux2 = InceptionAux(528, num_classes) if aux_logits else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)
        init_truncated_normal(self, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool2(self.conv3(self.conv2(self.maxpool1(self.conv1(x)))))
        aux: list[torch.Tensor] = []
        for name in INCEPTIONS:
            x = getattr(self, name)(x)
            head = {"inception4a": self.aux1, "inception4d": self.aux2}.get(name)
            if head is not None and self.training:
                aux.insert(0, head(x))
        logits = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        return (logits, *aux) if aux else logits


def googlenet(num_classes: int = 1000, aux_logits: bool = False) -> GoogLeNet:
    return GoogLeNet(num_classes=num_classes, aux_logits=aux_logits)
