"""Depthwise conv2d for x86 (one input channel per group, one output channel each), NHWC, with the
dyadic requantization of :mod:`.conv2d` in the epilogue.

A depthwise layer does ``KH*KW`` MACs per output value and none across channels: no dot product for
``vpdpbusd`` to sum. Each task takes a few output rows (:func:`task_rows`); a register tile of up to 15 pixels x 16
channels (kept in registers, see :func:`.conv2d.accumulator_scope`: measured 5-11% faster than 16 pixels in
a workspace) is accumulated in int32 lanes over the window (weights stored ``[KH, KW, C/16*16]``,
:func:`pack_weight`), then requantized while it is in registers (the high-word form with
:func:`.intrin.requantize_name` where it applies, as in :mod:`.conv2d`: with 9 MACs per output the epilogue
costs as much as the window, and LLVM's own vectorization of it is 20-30% slower per layer, batch 8, one
thread: 144 channels 56x56 1.43 against 1.10 ms, 576 channels 14x14 0.42 against 0.29). With VNNI, uint8
activations and stride 1, a row of taps is one ``vpdpbusd`` each (:func:`.intrin.depthwise_name`) reading
whole vectors of a padded copy of the input rows the task needs, made by the task; else activations are
widened from bytes and spatial padding is read in place (the pad value where a tap falls outside the input:
measured 35% faster than a padded copy at stride 2), the input copied only where its channels are not
whole vectors.
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
    epilogue_blocks,
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


def pack_weight(weight: np.ndarray, dot: bool) -> np.ndarray:
    """``[C, 1, KH, KW]`` int8 weights to ``[KH, KW, C]``, channels zero-padded to whole vectors: int8 for the
    ``vpdpbusd`` window (:func:`uses_dot`), else int16, which LLVM multiplies with a zero-extended uint8
    activation by ``vpmaddwd`` (one uop, where an int32 weight takes ``vpmulld``, two; int8 activations keep
    ``vpmulld``). MobileNet-V2 batch 8, 2 threads: its stride-2 layers 8-23% faster than with int32 weights,
    the model 2% (paired calls)."""
    c = weight.shape[0]
    packed = np.zeros((*weight.shape[2:], -(-c // LANES) * LANES), dtype=np.int8 if dot else np.int16)
    packed[..., :c] = weight[:, 0].transpose(1, 2, 0)
    return packed


def uses_dot(wl: Conv2dWorkload, vnni: bool) -> bool:
    """Whether each window is a ``vpdpbusd`` per tap (:func:`.intrin.depthwise_name`): VNNI, uint8 activations,
    stride 1 and no dilation (see :func:`depthwise`)."""
    return vnni and wl.in_dtype == "uint8" and wl.stride == wl.dilation == (1, 1)


def depthwise_compute(wl: Conv2dWorkload, requant: Requant | None, pixels: int = 1, dot: bool = False) -> Any:
    """The unscheduled PrimFunc ``(x, weight, bias[, b, round, shift]) -> out``, accumulating rows of whole
    tiles of ``pixels`` (past the row's end where they do not divide it: columns of the pad value)."""
    from tvm import te

    n, h, w, c = batch_extent(wl), wl.height, wl.width, wl.in_channels
    (kh, kw), (sh, sw), (dh, dw) = wl.kernel, wl.stride, wl.dilation
    oh, ow = wl.out_size
    cp = wl.packed_out
    x = te.placeholder((n, h, w, c), wl.in_dtype, name="x")
    weight = te.placeholder((kh, kw, cp), "int8" if dot else "int16", name="weight")
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
    """The scheduled PrimFunc; with ``vnni``, uint8 activations and stride 1 each window is a ``vpdpbusd``
    per tap (:func:`.intrin.depthwise_name`), reading a padded copy of the input (with the widening
    multiply-add the padding is read in place instead: at stride 2, where the copy is four times the output,
    measured faster, one thread: 96 channels 112x112 batch 8 1.81 against 2.18 ms; at stride 1 the
    ``vpdpbusd`` step is: 144 channels 56x56 1.38 against 1.85 ms). A task copies the input rows of its
    :func:`task_rows` output rows itself, into its own caches (one copy of the whole input first: 144
    channels 56x56 batch 8 20% slower, 2 threads)."""
    from tvm import s_tir

    dot = uses_dot(wl, vnni)
    # 17-pixel rows: 2 tiles of 9 (1-pixel tiles: Inception-V3's 17x17x768 average pools 2.4x slower)
    pixels = row_pixels(wl.out_size[1], STACK_VECTORS)
    sch = s_tir.Schedule(depthwise_compute(wl, requant, pixels, dot))
    conv = sch.get_sblock("acc")
    n, y, z, o, ry, rx = sch.get_loops(conv)
    yo, yi = sch.split(y, [None, task_rows(wl)])
    zo, zi = sch.split(z, [None, pixels])
    oo, oi = sch.split(o, [None, LANES])
    # one intrinsic per row of taps and pixel (the whole 3x3 window as one: no faster; 5x5: 1.7x slower, its 25
    # weight vectors outgrowing the registers), else each tap's weights over the whole tile
    sch.reorder(n, yo, yi, zo, oo, ry, *((zi, rx) if dot else (rx, zi)), oi)
    for block in epilogue_blocks(wl, requant):
        sch.reverse_compute_at(sch.get_sblock(block), oo)
    padded = any(wl.padding) or extra_columns(wl, pixels) > 0
    if copies_input(wl) or (dot and padded):
        pad = sch.get_sblock("pad")
        sch.compute_at(pad, yo)
        if not copies_input(wl):  # whole vectors: each one copied or set to the pad value
            sch.vectorize(sch.split(sch.get_loops(pad)[-1], [None, LANES])[-1])
    elif padded:
        sch.compute_inline(sch.get_sblock("pad"))
    parallel_rows(sch, wl, n, yo)
    sch.unroll(ry)
    sch.unroll(zi)
    if not dot:
        sch.unroll(rx)
        sch.vectorize(oi)
    init = sch.decompose_reduction(conv, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    if dot:
        sch.tensorize(rx, depthwise_name(wl.kernel[1]))
    scope = accumulator_scope(pixels)
    sch.set_scope(init, 0, scope)
    return finish_schedule(sch, wl, False, scope, tensorized_requant(wl, requant, vnni, pixels),
                           epilogue_blocks(wl, requant))


def task_rows(wl: Conv2dWorkload) -> int:
    """Output rows per parallel task: the most, up to 16, that divide the map's height and leave 8 tasks or
    more (batch 8, 2 threads, against 1 row a task: 56x56 maps 10% faster, 7x7 and 14x14 maps 10-20%)."""
    oh, batch = wl.out_size[0], wl.batch or 1
    return max(r for r in range(1, 17) if r == 1 or oh % r == 0 and batch * oh // r >= 8)


def copies_input(wl: Conv2dWorkload) -> bool:
    """Whether the input is copied (channels padded to whole vectors); spatial padding alone is inlined
    into the window's reads."""
    return wl.packed_out != wl.in_channels
