"""Which kernels carry their requantization: conv/dense kernels of a lowered module with the dyadic
multiply-shift fused in.

After TVM's default pipeline every PrimFunc is named after the operators ``FuseOps`` put in it;
a conv2d or matmul kernel whose name also holds ``right_shift`` computes accumulation and
requantization in one pass over memory; so do hawqc's CUDA ``tensor_core_conv2d`` kernels.
"""

from __future__ import annotations

from typing import Any


def fused_requant(lowered: Any) -> tuple[int, int]:
    """``(fused, total)``: conv2d/matmul kernels that requantize in their epilogue, and all of them."""
    import tvm

    names = [gv.name_hint for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    kernels = [n for n in names if "conv2d" in n or "matmul" in n]
    return sum("right_shift" in n or n.startswith("tensor_core_conv2d") for n in kernels), len(kernels)
