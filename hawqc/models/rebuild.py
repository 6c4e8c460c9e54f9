"""Rebuild an imported graph as a ``torch.fx.GraphModule`` of standard layers.

Float models brought as a ``torch.export`` program (``.pt2``) or as ONNX become the kind of module
:mod:`hawqc.quant.capture` reads: ``nn.Conv2d``, ``nn.BatchNorm2d`` and ``nn.Linear`` submodules
named after the source's weights (``layer1.0.conv1``, so bit configs name layers as the user does),
and ``F.relu`` / ``F.hardtanh`` / ``+`` / ``torch.cat`` / pooling / ``torch.flatten`` calls between them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn


class GraphBuilder:
    """Appends input, layer, call and output nodes; :meth:`build` makes the module."""

    def __init__(self) -> None:
        self.root = nn.Module()
        self.graph = torch.fx.Graph()
        self._names: dict[str, str] = {}

    def input(self, name: str) -> torch.fx.Node:
        return self.graph.placeholder(_identifier(name))

    def layer(self, source_name: str, module: nn.Module, x: torch.fx.Node) -> torch.fx.Node:
        """Call ``module`` (registered under ``source_name``, made a valid dotted module path) on ``x``."""
        path = self._names.get(source_name)
        if path is not None:
            raise ValueError(f"{source_name}: a layer whose weights are used twice is not supported")
        path = ".".join(_identifier(part) for part in source_name.split(".")) or "layer"
        while _has_module(self.root, path):
            path += "_"
        self._names[source_name] = path
        parent, _, leaf = path.rpartition(".")
        owner = self.root
        for part in parent.split(".") if parent else []:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.add_module(leaf, module)
        return self.graph.call_module(path, (x,))

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.fx.Node:
        return self.graph.call_function(function, args, kwargs)

    def build(self, output: torch.fx.Node) -> torch.fx.GraphModule:
        self.graph.output(output)
        module = torch.fx.GraphModule(self.root, self.graph, class_name="ImportedModel")
        return module.eval()


def conv2d(weight: torch.Tensor, bias: torch.Tensor | None, stride: Any, padding: Any, dilation: Any,
           groups: int) -> nn.Conv2d:
    """An ``nn.Conv2d`` holding ``weight`` ``[OC, IC/groups, KH, KW]`` and ``bias``."""
    if weight.dim() != 4:
        raise ValueError(f"only 2-D convolutions are supported, got a weight of shape {tuple(weight.shape)}")
    conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                     padding=padding, dilation=dilation, groups=groups, bias=bias is not None)
    _fill(conv, weight=weight, bias=bias)
    return conv


def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` ``[out, in]`` and ``bias``."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    _fill(layer, weight=weight, bias=bias)
    return layer


def batch_norm(weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
               eps: float) -> nn.BatchNorm2d:
    """An eval-mode ``nn.BatchNorm2d`` with these statistics (no affine parameters where both are None)."""
    bn = nn.BatchNorm2d(mean.numel(), eps=eps, affine=weight is not None or bias is not None)
    if bn.affine:
        _fill(bn, weight=weight if weight is not None else torch.ones_like(mean),
              bias=bias if bias is not None else torch.zeros_like(mean))
    _fill(bn, running_mean=mean, running_var=var)
    return bn.eval()


def _fill(module: nn.Module, **tensors: torch.Tensor | None) -> None:
    with torch.no_grad():
        for name, value in tensors.items():
            if value is not None:
                getattr(module, name).copy_(torch.as_tensor(value, dtype=torch.float32).reshape(
                    getattr(module, name).shape))


def check_same(rebuilt: nn.Module, source: Callable[[torch.Tensor], Any], shape: tuple[int, ...], what: str) -> None:
    """Run both on one random input of ``shape``; a ``ValueError`` if their outputs differ."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.as_tensor(source(x))
        got = rebuilt(x)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * float(
            expected.abs().max().clamp_min(1.0))):
        raise ValueError(f"{what}: the rebuilt model does not reproduce the original's output "
                         f"(shapes {tuple(got.shape)} vs {tuple(expected.shape)}); one of its operations is "
                         "read wrongly: please report it")


def _identifier(name: str) -> str:
    text = re.sub(r"\W", "_", name).strip("_") or "x"
    return text


def _has_module(root: nn.Module, path: str) -> bool:
    owner = root
    for part in path.split("."):
        if not hasattr(owner, part):
            return False
        owner = getattr(owner, part)
    return True
