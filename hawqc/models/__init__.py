"""Built-in models, by name: ``hawqc.models.get("resnet50")``.

All but ``tiny_resnet`` use torchvision's module names, so torchvision checkpoints load with
``load_state_dict(strict=True)``. Importing this package does not import torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model: where its constructor lives and what input it expects."""

    name: str
    constructor: str
    """``module:function`` under ``hawqc.models``."""
    input_shape: tuple[int, int, int]
    """Default (channels, height, width)."""
    description: str

    def build(self, **kwargs: Any) -> Any:
        module, function = self.constructor.split(":")
        return getattr(importlib.import_module(f"hawqc.models.{module}"), function)(**kwargs)


_SPECS = [
    ModelSpec("resnet18", "resnet:resnet18", (3, 224, 224), "ResNet-18 (torchvision layout)"),
    ModelSpec("resnet50", "resnet:resnet50", (3, 224, 224), "ResNet-50 v1.5 (torchvision layout)"),
    ModelSpec("resnext50_32x4d", "resnet:resnext50_32x4d", (3, 224, 224), "ResNeXt-50 32x4d (torchvision layout)"),
    ModelSpec("wide_resnet50_2", "resnet:wide_resnet50_2", (3, 224, 224), "Wide ResNet-50-2 (torchvision layout)"),
    ModelSpec("mobilenet_v2", "mobilenet:mobilenet_v2", (3, 224, 224), "MobileNet-V2 (torchvision layout)"),
    ModelSpec("mobilenet_v3_large", "mobilenet:mobilenet_v3_large", (3, 224, 224),
              "MobileNet-V3-Large (torchvision layout)"),
    ModelSpec("efficientnet_b0", "efficientnet:efficientnet_b0", (3, 224, 224), "EfficientNet-B0 (torchvision layout)"),
    ModelSpec("regnet_y_400mf", "regnet:regnet_y_400mf", (3, 224, 224), "RegNetY-400MF (torchvision layout)"),
    ModelSpec("vgg16", "vgg:vgg16", (3, 224, 224), "VGG-16, no BatchNorm (torchvision layout)"),
    ModelSpec("inceptionv3", "inception:inception_v3", (3, 299, 299), "Inception-V3 (torchvision layout)"),
    ModelSpec("shufflenet_v2_x1_0", "shufflenet:shufflenet_v2_x1_0", (3, 224, 224),
              "ShuffleNet-V2 x1.0 (torchvision layout)"),
    ModelSpec("densenet121", "densenet:densenet121", (3, 224, 224), "DenseNet-121 (torchvision layout)"),
    ModelSpec("squeezenet1_1", "squeezenet:squeezenet1_1", (3, 224, 224), "SqueezeNet 1.1 (torchvision layout)"),
    ModelSpec("googlenet", "googlenet:googlenet", (3, 224, 224), "GoogLeNet, no auxiliary heads (torchvision layout)"),
    ModelSpec("mnasnet1_0", "mnasnet:mnasnet1_0", (3, 224, 224), "MNASNet 1.0 (torchvision layout)"),
    ModelSpec("lraspp_mobilenet_v3_large", "segmentation:lraspp_mobilenet_v3_large", (3, 224, 224),
              "LR-ASPP segmentation on MobileNet-V3-Large, 21 classes (torchvision layout)"),
    ModelSpec("tiny_resnet", "resnet:tiny_resnet", (1, 28, 28), "3-block residual CNN for 28x28 images"),
]
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


def spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a built-in model; ``ValueError`` naming the choices otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; built-in models: {', '.join(MODELS)}")
    return MODELS[name]


def get(name: str, **kwargs: Any) -> Any:
    """Build a built-in model with random weights (``num_classes=...`` and other options pass through)."""
    return spec(name).build(**kwargs)


def quantizable_layers(model: Any) -> list[str]:
    """Names of the model's Conv2d and Linear modules, in registration order: the layers a
    :class:`~hawqc.bitconfig.BitConfig` gives bits to."""
    from torch import nn

    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def recalibrate_bn(model: Any, batches: Any) -> Any:
    """Reset BatchNorm running statistics to the mean over ``batches`` (inputs only), in place.

    Gives a randomly initialised model sane activation scales, so that it can stand in for a
    trained one in tests and latency benchmarks. Returns the model in eval mode.
    """
    import torch
    from torch import nn

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [bn.momentum for bn in bns]
    model.eval()  # only BatchNorm trains: no dropout, no auxiliary heads
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
        bn.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for bn, momentum in zip(bns, saved):
        bn.momentum = momentum
    return model.eval()
