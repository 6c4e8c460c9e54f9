"""The integer-only reference executor (numpy): the golden model every compiled module must match."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hawqc.reference.graph import IntegerGraph, IntOp, execute

if TYPE_CHECKING:
    from hawqc.quant.model import QuantModel

__all__ = ["IntegerGraph", "IntOp", "execute", "from_torch"]


def from_torch(qmodel: QuantModel) -> IntegerGraph:
    """The integer graph of a model quantized with :func:`hawqc.quantize`; ``.run(x)`` executes it."""
    return qmodel.integer_graph()
