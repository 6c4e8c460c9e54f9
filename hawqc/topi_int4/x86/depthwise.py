"""Depthwise conv2d for x86 (one input channel per group, one output channel each), NHWC, with the
dyadic requantization of :mod:`.conv2d` in the epilogue.

A depthwise layer does ``KH*KW`` MACs per output value: no dot product to feed ``vpdpbusd``. Each
output row runs on one core; a register tile of up to 15 pixels x 16 channels (kept in registers, see
:func:`.conv2d.accumulator_scope`: measured 5-11% faster than 16 pixels in a workspace) is accumulated in
int32 lanes (activations widened from bytes, weights stored ``[KH, KW, C/16*16]``: :func:`weight_dtype`) over the
window, then requantized while it is in registers (the high-word form with :func:`.intrin.requantize_name`
where it applies, as in :mod:`.conv2d`: with 9 MACs per output the epilogue costs as much as the window,
and LLVM's own vectorization of it is 20-30% slower per layer, batch 8, one thread: 144 channels 56x56
1.43 against 1.10 ms, 576 channels 14x14 0.42 against 0.29). Spatial padding is read in place (the pad value where a
tap falls outside the input: measured 35% faster than a padded copy at stride 2, the same at stride 1); the
input is copied first only where its channels are not whole vectors, or where uint8 activations take the
``vpdpbusd`` step (:func:`depthwise`), which reads whole vectors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hawqc.topi_int4.x86.conv2d import (
    STACK_VECTORS,
    Conv2dWorkload,
    Requant,
    accumulator_scope,
    batch_extent,
    extra_columns,
    finish_schedule,
    input_copy,
    parallel_rows,
    row_pixels,
    tensorized_requant,
    with_epilogue,
)
from hawqc.topi_int4.x86.intrin import LANES, depthwise_name


def is_depthwise(wl: Conv2dWorkload) -> bool:
    return wl.groups == wl.in_channels == wl.out_channels


def pack_weight(weight: np.ndarray, dtype: str = "int32") -> np.ndarray:
    """``[C, 1, KH, KW]`` int8 weights to ``dtype`` ``[KH, KW, C]``, channels zero-padded to whole vectors."""
    c = weight.shape[0]
    packed = np.zeros((*weight.shape[2:], -(-c // LANES) * LANES), dtype=dtype)
    packed[..., :c] = weight[:, 0].transpose(1, 2, 0)
    return packed


def weight_dtype(wl: Conv2dWorkload, vnni: bool) -> str:
    """The packed weights' type: int32 for the ``vpdpbusd`` step (:func:`.intrin.depthwise_name`), else int16,
    which LLVM multiplies with a zero-extended uint8 activation by ``vpmaddwd`` (one uop, where an int32 weight
    takes ``vpmulld``, two; int8 activations keep ``vpmulld``). MobileNet-V2 batch 8, 2 threads: its stride-2
    layers 8-23% faster, the model 2% (paired calls)."""
    return "int32" if uses_dot(wl, vnni) else "int16"


def uses_dot(wl: Conv2dWorkload, vnni: bool) -> bool:
    """Whether each step is one ``vpdpbusd``: VNNI, uint8 activations, stride 1 (see :func:`depthwise`)."""
    return vnni and wl.in_dtype == "uint8" and wl.stride == (1, 1)


def depthwise_compute(wl: Conv2dWorkload, requant: Requant | None, pixels: int = 1, wdtype: str = "int32") -> Any:
    """The unscheduled PrimFunc ``(x, weight, bias[, b, round, shift]) -> out``, accumulating rows of whole
    tiles of ``pixels`` (past the row's end where they do not divide it: columns of the pad value)."""
    from tvm import te

    n, h, w, c = batch_extent(wl), wl.height, wl.width, wl.in_channels
    (kh, kw), (sh, sw), (dh, dw) = wl.kernel, wl.stride, wl.dilation
    oh, ow = wl.out_size
    cp = wl.packed_out
    x = te.placeholder((n, h, w, c), wl.in_dtype, name="x")
    weight = te.placeholder((kh, kw, cp), wdtype, name="weight")
    extra = extra_columns(wl, pixels)
    data = input_copy(x, wl, cp, 0, extra) if copies_input(wl) or any(wl.padding) or extra else x
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    acc = te.compute(
        (n, oh, -(-ow // pixels) * pixels, cp),
        lambda i, y, z, o: te.sum(data[i, y * sh + ry * dh, z * sw + rx * dw, o].astype("int32")
                                  * weight[ry, rx, o].astype("int32"), axis=[ry, rx]),
        name="acc")
    return with_epilogue(x, weight, acc, (n, oh, ow, c), requant)


def depthwise(wl: Conv2dWorkload, requant: Requant | None, vnni: bool = False) -> Any:
    """The scheduled PrimFunc; with ``vnni``, uint8 activations and stride 1 each step is one ``vpdpbusd``
    (:func:`.intrin.depthwise_name`), reading a padded copy of the input (with the widening multiply-add
    the padding is read in place instead: at stride 2, where the copy is four times the output, measured
    faster, one thread: 96 channels 112x112 batch 8 1.81 against 2.18 ms; at stride 1 the ``vpdpbusd`` step
    is: 144 channels 56x56 1.38 against 1.85 ms)."""
    from tvm import s_tir

    dot = uses_dot(wl, vnni)
    # 17-pixel rows: 2 tiles of 9 (1-pixel tiles: Inception-V3's 17x17x768 average pools 2.4x slower)
    pixels = row_pixels(wl.out_size[1], STACK_VECTORS)
    sch = s_tir.Schedule(depthwise_compute(wl, requant, pixels, weight_dtype(wl, vnni)))
    conv = sch.get_sblock("acc")
    n, y, z, o, ry, rx = sch.get_loops(conv)
    zo, zi = sch.split(z, [None, pixels])
    oo, oi = sch.split(o, [None, LANES])
    sch.reorder(n, y, zo, oo, ry, rx, zi, oi)
    sch.reverse_compute_at(sch.get_sblock("out"), oo)
    parallel_rows(sch, wl, n, y)
    sch.unroll(ry)
    sch.unroll(rx)
    sch.unroll(zi)
    if not dot:
        sch.vectorize(oi)
    init = sch.decompose_reduction(conv, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    if dot:
        sch.tensorize(oi, depthwise_name())
    scope = accumulator_scope(pixels)
    sch.set_scope(init, 0, scope)
    padded = any(wl.padding) or extra_columns(wl, pixels) > 0
    copies = copies_input(wl) or (dot and padded)
    if padded and not copies:
        sch.compute_inline(sch.get_sblock("pad"))
    return finish_schedule(sch, wl, copies, scope, tensorized_requant(wl, requant, vnni, pixels))


def copies_input(wl: Conv2dWorkload) -> bool:
    """Whether the input is copied first (channels padded to whole vectors); spatial padding alone is
    inlined into the window's reads."""
    return wl.packed_out != wl.in_channels
