"""Smooth activations between quantized layers: their PyTorch function and the ONNX form hawqc exports.

An activation reads a quantized tensor and is quantized after it: the integer graph looks each input
integer up in a table (:func:`hawqc.reference.graph.lut_op`) computed from the float function as the
exported file states it (an ``ELEMENTWISE`` operator of the ONNX reader with its float32 attributes,
times its input for SiLU and HardSwish, which opset 13 writes as ``x * Sigmoid(x)`` and
``x * HardSigmoid(x)``): the ONNX reader builds the same table from the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hawqc.quant.elementwise import ELEMENTWISE


@dataclass(frozen=True)
class Activation:
    torch_fn: Callable[[torch.Tensor], torch.Tensor]
    onnx_op: str
    """The ONNX operator (a key of ``ELEMENTWISE``)."""
    onnx_attrs: dict[str, float] = field(default_factory=dict)
    times_input: bool = False
    """``x * onnx_op(x)``."""
    nonneg: bool = False
    """Its output is never negative."""

    def attrs(self) -> dict[str, float]:
        """The attributes as ONNX stores them (float32)."""
        return {k: float(np.float32(v)) for k, v in self.onnx_attrs.items()}

    def table_fn(self) -> Callable[[np.ndarray], np.ndarray]:
        """The float64 function the exported file means (as the ONNX reader evaluates it)."""
        fn, attrs = ELEMENTWISE[self.onnx_op], self.attrs()
        if self.times_input:
            return lambda x: x * fn(x, **attrs)
        return lambda x: fn(x, **attrs)


_HARD_SIGMOID = {"alpha": 1 / 6, "beta": 0.5}  # relu6(x + 3) / 6
ACTIVATIONS = {
    "sigmoid": Activation(torch.sigmoid, "Sigmoid", nonneg=True),
    "hardsigmoid": Activation(F.hardsigmoid, "HardSigmoid", _HARD_SIGMOID, nonneg=True),
    "silu": Activation(F.silu, "Sigmoid", times_input=True),
    "hardswish": Activation(F.hardswish, "HardSigmoid", _HARD_SIGMOID, times_input=True),
}
MODULES = {nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid", nn.SiLU: "silu", nn.Hardswish: "hardswish"}
FUNCTIONS: dict[Any, str] = {torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.hardsigmoid: "hardsigmoid",
                             F.silu: "silu", F.hardswish: "hardswish"}
METHODS = {"sigmoid": "sigmoid"}


def activation_kind(n: torch.fx.Node, module: nn.Module | None) -> str | None:
    """The ``ACTIVATIONS`` key of an fx node (module, function or ``x.sigmoid()``), None for anything else."""
    if module is not None:
        return MODULES.get(type(module))
    if n.op == "call_function":
        return FUNCTIONS.get(n.target)
    if n.op == "call_method":
        return METHODS.get(n.target)
    return None
