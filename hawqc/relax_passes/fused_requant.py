"""Which kernels carry their requantization: conv/dense kernels of a lowered module with the dyadic
multiply-shift fused in.

After TVM's default pipeline every PrimFunc is named after the operators ``FuseOps`` put in it;
a conv2d or matmul kernel whose name also holds ``right_shift`` computes accumulation and
requantization in one pass over memory; hawqc's own x86 kernels say ``requant`` in their names.
"""

from __future__ import annotations

from typing import Any


def fused_requant(lowered: Any) -> tuple[int, int]:
    """``(fused, total)``: conv2d/matmul kernels that requantize in their epilogue, and all of them."""
    import tvm

    names = [gv.name_hint for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    kernels = [n for n in names if "conv2d" in n or "matmul" in n or "dense" in n]
    return sum("right_shift" in n or "requant" in n for n in kernels), len(kernels)
