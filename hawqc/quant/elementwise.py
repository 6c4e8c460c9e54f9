"""Element-wise non-linearities by ONNX operator, whose exact lookup tables the ONNX reader and
hawqc's own quantizer (:mod:`hawqc.quant.activations`) build alike.

Each entry maps an ONNX operator to its float function (numpy, evaluated in float64) with the
operator's attributes as keyword arguments and ONNX's defaults. The table evaluates it on every
integer an input can hold, once, at compile time (:func:`hawqc.quant.dyadic.function_table`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _gelu(x: np.ndarray, approximate: Any = "none") -> np.ndarray:
    if approximate in ("tanh", b"tanh"):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


ELEMENTWISE: dict[str, Any] = {
    "Sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "Tanh": lambda x: np.tanh(x),
    "HardSigmoid": lambda x, alpha=0.2, beta=0.5: np.clip(alpha * x + beta, 0, 1),
    "HardSwish": lambda x: x * np.clip(x / 6 + 0.5, 0, 1),
    "LeakyRelu": lambda x, alpha=0.01: np.where(x >= 0, x, alpha * x),
    "Elu": lambda x, alpha=1.0: np.where(x >= 0, x, alpha * (np.exp(x) - 1)),
    "Gelu": _gelu,
}
