"""The integer graph's ``threshold`` op (an activation of a conv's accumulator, quantized) as one TIR loop.

Every element runs :func:`hawqc.quant.thresholds.count_thresholds` on TIR expressions: the binary search's
index bound once per step (a ``Bind``), each step one gather from the channel's row of the flat threshold
table and one compare, ``log2(Lu) + log2(Ld)`` steps in all (8 for a rising activation at 8 bits, 3 to 6 more
for SiLU's and HardSwish's falling side). Target-neutral: llvm parallelises it (hawqc's dlight rule), CUDA
gives each element a thread (dlight's fallback).
"""

from __future__ import annotations

import operator
from typing import Any

from hawqc.quant.thresholds import CountOps, count_thresholds


def threshold_func(channels: int, inner: int, up_length: int, down_length: int, out_dtype: str) -> Any:
    """A PrimFunc ``(acc, base, up, down) -> out`` on an int32 accumulator seen as ``(n, channels, inner)``
    (``n`` symbolic): ``base`` (channels,), ``up`` (channels * up_length,), ``down`` (channels * down_length,
    or one unread element where 0), int32."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    tables = (channels * max(up_length, 1), channels * max(down_length, 1))
    with IRBuilder() as builder, T.prim_func(private=True, s_tir=True):
        T.func_name("threshold")
        handles = [T.arg(name, T.handle()) for name in ("acc", "base", "up", "down", "out")]
        n = T.int64()
        acc = T.match_buffer(handles[0], (n, channels, inner), "int32")
        base = T.match_buffer(handles[1], (channels,), "int32")
        up, down = (T.match_buffer(h, (size,), "int32") for h, size in zip(handles[2:4], tables))
        out = T.match_buffer(handles[4], (n, channels, inner), out_dtype)
        with T.grid(n, channels, inner) as (i, c, j), T.sblock("threshold"):
            vi, vc, vj = T.axis.remap("SSS", [i, c, j])
            T.reads(acc[vi, vc, vj], base[vc], up[0:tables[0]], down[0:tables[1]])
            T.writes(out[vi, vc, vj])
            ops = CountOps(take=lambda table, index: table[index], greater=operator.gt, less=operator.lt,
                           crossed=lambda cond, step: tirx.Select(cond, tirx.const(step, "int32"),
                                                                  tirx.const(0, "int32")),
                           add=operator.add, subtract=operator.sub, let=lambda value, body: body(T.Bind(value)))
            channel = T.Bind(tirx.Cast("int32", vc))
            counted = count_thresholds(T.Bind(acc[vi, vc, vj]), base[vc], (up, channel * up_length, up_length),
                                       (down, channel * down_length, down_length), ops)
            T.buffer_store(out, tirx.Cast(out_dtype, counted), [vi, vc, vj])
    return builder.get()
