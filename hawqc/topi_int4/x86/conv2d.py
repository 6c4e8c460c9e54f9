"""INT8/INT4 conv2d for x86, NHWC, with the dyadic requantization in the epilogue.

Compute (one PrimFunc): an optional copy of the input (spatial padding, input channels up to a
multiple of 4 with zeros, and int8 activations offset by 128 into uint8 for VNNI), the int32 accumulation against weights packed
``[OC/16, KH, KW, IC/4, 16, 4]`` (see :func:`pack_weight`), then per output channel
``clip(round_shift(acc * b + bias, c) + zero_point, qmin, qmax)`` in int64 (a shift rounding half to even; ``bias``
already multiplied by ``b``, with the requantization's offset), cast to the output
type: the rule of :func:`hawqc.quant.dyadic.requantize`, with the input zero point and the VNNI
offset compensation folded into ``bias``. Without requantization the epilogue writes ``acc + bias``.

Schedule (VNNI and AVX2; :func:`conv2d_amx` for AMX tiles): output rows in parallel (blocks of output channels
x rows where the rows are few), a register tile of ``ow_block`` pixels x ``oc_vectors`` x 16
channels accumulated over (kh, kw, ic/4), its innermost 16x4 step tensorized with ``vpdpbusd``
(:mod:`.intrin`) or, without VNNI, left to LLVM as 16-lane int32 multiply-adds; the epilogue runs on the
tile while it is in registers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hawqc.quant.dyadic import high_word_shift, round_shift
from hawqc.reference.graph import conv_output_size
from hawqc.topi_int4.x86 import amx
from hawqc.topi_int4.x86.intrin import GROUP, LANES, intrinsic_name, requantize_name, unpack_nibble

OPAQUE = 8
"""TVM's ``kOpaque`` operator pattern: FuseOps leaves a scheduled kernel alone."""
STACK_BYTES = 1024
"""TVM's ``kMaxStackAlloca``: smaller ``global`` buffers of a CPU kernel are stack arrays."""
STACK_VECTORS = (STACK_BYTES - 1) // (LANES * 4)
"""Accumulator vectors of the largest register tile that stays on the stack: 15."""
SERIAL_MACS = 1 << 20
"""Layers with fewer multiply-adds run on one core (squeeze-excite convs, a classifier at batch 1): a
parallel region costs more than it shares out (TVM's launch of an empty two-task kernel: 0.7 us here)."""
UNROLLED_BLOCKS = 6
"""A row's blocks of output channels are unrolled up to this many (one thread: MobileNet-V2's 16->96 1x1
layer 13% faster, 32->192 7%; no change on 3x3 or wider layers)."""


@dataclass(frozen=True)
class AddStage:
    """An aligned Add after the requantize, in int32 (:class:`hawqc.quant.dyadic.Int32Sum`): the requantized
    output times ``mine`` plus a second tensor (stored as ``residual``) times ``other`` plus ``d``, shifted
    right by ``shift``, clipped to ``[qmin, qmax]`` and stored as ``dtype``."""

    mine: int
    other: int
    d: int
    shift: int
    qmin: int
    qmax: int
    dtype: str
    residual: str


@dataclass(frozen=True)
class Requant:
    """The epilogue's clip bounds, output zero point and storage type; ``high_word``: the kernel takes
    the constants of :func:`hawqc.quant.dyadic.high_word_form` (``bias`` = its ``d``, ``shift`` = its
    ``s``) and computes that cheaper, equal form; ``tie_window``: that of :func:`hawqc.quant.dyadic.round_shift`
    (an exact average pool's); ``residual``: the storage type of a second tensor of the output's shape
    that an aligned Add sums in, times its per-channel multiplier (the kernel's parameters before the
    output end with the multiplier, the layer's own bias where ``accumulator_clip`` is set, the tensor)."""

    qmin: int
    qmax: int
    zero_point: int
    dtype: str
    high_word: bool = False
    tie_window: int = 0
    residual: str | None = None
    accumulator_clip: tuple[int, int] | None = None
    """With ``residual``: the bounds the layer's own output (``acc`` plus its own bias) is clipped to before
    it is multiplied."""
    then: AddStage | None = None
    """An Add of the requantized output and a second tensor (the kernel's last parameter before the output)."""

    @property
    def out_dtype(self) -> str:
        return self.then.dtype if self.then else self.dtype


@dataclass(frozen=True)
class Conv2dWorkload:
    """An NHWC convolution with packed weights.

    Grouped convolutions run as block-diagonal ones: each block of 16 output channels reads the
    ``block_span`` input channels of the groups it meets, starting at ``block_base(block)``, against
    weights that are zero outside its own group (``16 / (out channels per group)`` times the MACs where
    a group has fewer than 16 output channels)."""

    batch: int | None
    """None: any batch (a symbolic dimension of the kernel)."""
    height: int
    width: int
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    in_dtype: str
    pad_value: int = 0
    weight_bits: int = 8
    """4: weights packed two per byte (VNNI only), sign-extended in registers."""
    groups: int = 1
    channel_align: int = GROUP
    """Input channels the kernel reads come in multiples of this (the AMX kernel's 64), zeros past the last."""

    @property
    def out_size(self) -> tuple[int, int]:
        return conv_output_size((self.height, self.width), self.kernel, self.stride, self.padding, self.dilation)

    @property
    def packed_in(self) -> int:
        """Input channels the kernel reads (its input copy has this many): whole groups of 4."""
        return max(self.block_base(j) for j in range(self.packed_out // LANES)) + self.block_span

    @property
    def block_span(self) -> int:
        """Input channels a block of 16 output channels reads, a multiple of 4."""
        icg, ocg = self.in_channels // self.groups, self.out_channels // self.groups
        groups_met = max(min((LANES * j + LANES - 1) // ocg, self.groups - 1) - LANES * j // ocg + 1
                         for j in range(self.packed_out // LANES))
        return -(-groups_met * icg // self.channel_align) * self.channel_align

    def block_base(self, block: Any) -> Any:
        """The first input channel block ``block`` (an int or a TIR expression) reads."""
        if self.groups == 1:
            return 0
        return block * LANES // (self.out_channels // self.groups) * (self.in_channels // self.groups)

    @property
    def packed_out(self) -> int:
        return -(-self.out_channels // LANES) * LANES


def pack_weight(weight: np.ndarray, vnni: bool = True, weight_bits: int = 8, groups: int = 1,
                channel_align: int = GROUP) -> np.ndarray:
    """OIHW int8 weights to ``[OC/16, KH, KW, IC/4, 16, 4]`` (``[..., 4, 16]`` without VNNI: 16
    channels contiguous for plain vector multiply-adds), zero-padded to whole blocks; ``IC`` is the
    block span of a grouped convolution (see :class:`Conv2dWorkload`). With
    ``weight_bits=4`` (values in [-8, 7]) each 16x4 block becomes 32 bytes: ``[..., IC/4, 32]``, the
    weight ``e = 4*channel + k`` in the low nibble of byte ``e`` (e < 32) or the high one of ``e - 32``."""
    oc, icg, kh, kw = weight.shape
    wl = Conv2dWorkload(1, 1, 1, icg * groups, oc, (kh, kw), (1, 1), (0, 0, 0, 0), (1, 1), "int8", groups=groups,
                        channel_align=channel_align)
    ocp, icp, ocg = wl.packed_out, wl.block_span, oc // groups
    padded = np.zeros((ocp, icp, kh, kw), dtype=np.int8)
    for o in range(oc):
        start = o // ocg * icg - wl.block_base(o // LANES)
        padded[o, start:start + icg] = weight[o]
    blocks = padded.reshape(ocp // LANES, LANES, icp // GROUP, GROUP, kh, kw)
    packed = np.ascontiguousarray(blocks.transpose((0, 4, 5, 2, 1, 3) if vnni else (0, 4, 5, 2, 3, 1)))
    if weight_bits == 8:
        return packed
    if not vnni or weight.min() < -8 or weight.max() > 7:
        raise ValueError("4-bit packing needs VNNI kernels and weights in [-8, 7]")
    flat = packed.reshape(*packed.shape[:4], LANES * GROUP).astype(np.uint8)
    return ((flat[..., :32] & 0xF) | (flat[..., 32:] << 4)).astype(np.int8)


def offset_of(in_dtype: str, vnni: bool) -> int:
    """What the kernel adds to each activation: 128 for int8 under VNNI (it wants unsigned bytes), else 0."""
    return 128 if vnni and in_dtype == "int8" else 0


def copies_input(wl: Conv2dWorkload, vnni: bool, ow_block: int = 1, oh_block: int = 1) -> bool:
    """Whether the input is copied first: for spatial padding, channels up to a multiple of 4, the
    VNNI offset of int8 activations (once per input byte, measured faster than in every dot product),
    or columns (rows) for rows (row blocks) computed in whole tiles of ``ow_block`` pixels (``oh_block`` rows)."""
    return (any(wl.padding) or wl.packed_in != wl.in_channels or offset_of(wl.in_dtype, vnni) > 0
            or extra_columns(wl, ow_block) > 0 or extra_rows(wl, oh_block) > 0)


def extra_columns(wl: Conv2dWorkload, ow_block: int) -> int:
    """Input columns beyond the padded input that rows of whole ``ow_block``-pixel tiles read."""
    return _past_end(wl, 1, ow_block)


def extra_rows(wl: Conv2dWorkload, oh_block: int) -> int:
    """Input rows beyond the padded input that whole blocks of ``oh_block`` output rows read."""
    return _past_end(wl, 0, oh_block)


def _past_end(wl: Conv2dWorkload, axis: int, block: int) -> int:
    out, stride, kernel, dilation = wl.out_size[axis], wl.stride[axis], wl.kernel[axis], wl.dilation[axis]
    needed = (-(-out // block) * block - 1) * stride + (kernel - 1) * dilation + 1
    return max(0, needed - ((wl.height, wl.width)[axis] + wl.padding[axis] + wl.padding[axis + 2]))


def conv2d_compute(wl: Conv2dWorkload, requant: Requant | None, vnni: bool = True, ow_block: int = 1,
                   oh_block: int = 1) -> Any:
    """The unscheduled PrimFunc ``(x, packed_weight, bias[, b, round, shift]) -> out``; the accumulator
    rows are computed in whole tiles of ``ow_block`` pixels and whole blocks of ``oh_block`` rows (the columns and
    rows past the output are dropped)."""
    from tvm import te

    n, h, w, cin = batch_extent(wl), wl.height, wl.width, wl.in_channels
    (kh, kw), (sh, sw), (dh, dw) = wl.kernel, wl.stride, wl.dilation
    oh, ow = wl.out_size
    span, ocp = wl.block_span, wl.packed_out
    x = te.placeholder((n, h, w, cin), wl.in_dtype, name="x")
    block = {(True, 8): (LANES, GROUP), (False, 8): (GROUP, LANES), (True, 4): (LANES * GROUP // 2,)}
    weight = te.placeholder((ocp // LANES, kh, kw, span // GROUP, *block[vnni, wl.weight_bits]), "int8",
                            name="weight")

    def weight_at(o: Any, ry: Any, rx: Any, rc: Any) -> Any:
        outer, i, k = (o // LANES, ry, rx, rc // GROUP), o % LANES, rc % GROUP
        if wl.weight_bits == 4:
            return unpack_nibble(weight[(*outer, i % 8 * 4 + k)], i // 8)
        return weight[(*outer, i, k) if vnni else (*outer, k, i)]

    data = (input_copy(x, wl, wl.packed_in, offset_of(wl.in_dtype, vnni), extra_columns(wl, ow_block),
                       extra_rows(wl, oh_block)) if copies_input(wl, vnni, ow_block, oh_block) else x)
    ry, rx, rc = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx"), te.reduce_axis((0, span), "rc")
    acc = te.compute(
        (n, -(-oh // oh_block) * oh_block, -(-ow // ow_block) * ow_block, ocp),
        lambda i, y, z, o: te.sum(
            data[i, y * sh + ry * dh, z * sw + rx * dw, wl.block_base(o // LANES) + rc].astype("int32")
            * weight_at(o, ry, rx, rc).astype("int32"),
            axis=[ry, rx, rc]),
        name="acc")
    return with_epilogue(x, weight, acc, (n, oh, ow, wl.out_channels), requant)


def batch_extent(wl: Conv2dWorkload) -> Any:
    """The batch of the kernel: the workload's, or a symbolic ``n`` where it is open."""
    from tvm import te

    return te.var("n", "int32") if wl.batch is None else wl.batch


def input_copy(x: Any, wl: Conv2dWorkload, channels: int, offset: int, extra: int = 0, extra_rows: int = 0) -> Any:
    """The input padded spatially with ``pad_value`` (and ``extra`` more columns on the right, ``extra_rows`` more
    rows at the bottom) and to ``channels`` channels with zeros, ``offset`` added (int8 + 128 as uint8 for VNNI)."""
    from tvm import te, tirx

    n, h, w, cin = x.shape
    top, left, bottom, right = wl.padding

    def pad(i: Any, y: Any, z: Any, c: Any) -> Any:
        inside = tirx.all(y >= top, y < h + top, z >= left, z < w + left)
        value = tirx.if_then_else(inside, x[i, y - top, z - left, c], tirx.const(wl.pad_value, wl.in_dtype))
        value = tirx.if_then_else(c < cin, value, tirx.const(0, wl.in_dtype))
        return (value.astype("int16") + offset).astype("uint8") if offset else value
    return te.compute((n, h + top + bottom + extra_rows, w + left + right + extra, channels), pad, name="pad")


def with_epilogue(x: Any, weight: Any, acc: Any, shape: tuple[int, ...], requant: Requant | None) -> Any:
    """The PrimFunc ``(x, weight, bias[, b, round, shift]) -> out`` writing the int32 accumulator ``acc``
    (NHWC, rows and channels padded) cut to ``shape``, plus ``bias`` or, with ``requant``, per output channel
    ``clip(round_shift(acc * b + bias, shift, round) + zero_point)``: :func:`hawqc.quant.dyadic.requantize`,
    ``bias`` being the accumulator's bias times ``b`` plus the requantization's offset and ``round``
    :func:`hawqc.quant.dyadic.rounding_bias` of ``shift``. With ``requant.high_word`` the PrimFunc is
    ``(x, weight, d, b, s) -> out`` computing ``clip(high_word_shift(acc * b + d, s))``, the same numbers
    (:func:`hawqc.quant.dyadic.high_word_form`) in half the int64 operations. With ``requant.then`` that result
    (block ``requant``) goes through the :class:`AddStage` into ``out``, its second tensor the parameter before it;
    where the output's channels are not whole vectors (and no residual is read), block ``requant`` takes all of
    the accumulator's and ``out`` cuts them (:func:`epilogue_blocks`): the requantization on whole vectors, as
    :func:`.intrin.requantize_name` takes them (MobileNet-V3 batch 8 20% faster end to end)."""
    from tvm import te, tirx

    ocp = acc.shape[-1]
    bias = te.placeholder((ocp,), "int64", name="bias")
    if requant is None:
        out = te.compute(shape, lambda i, y, z, o: (acc[i, y, z, o].astype("int64") + bias[o]).astype("int32"),
                         name="out")
        return te.create_prim_func([x, weight, bias, out])

    def clip(v: Any) -> Any:
        return tirx.max(tirx.min(v, requant.qmax), requant.qmin).astype(requant.dtype)

    if requant.high_word:
        b, shift = te.placeholder((ocp,), "int64", name="b"), te.placeholder((ocp,), "int32", name="shift")
        params = [bias, b, shift]

        def epilogue(i: Any, y: Any, z: Any, o: Any) -> Any:
            return clip(high_word_shift(acc[i, y, z, o].astype("int64") * b[o] + bias[o], shift[o],
                                        lambda v: v.astype("int32")))
    else:
        b, rnd, shift = (te.placeholder((ocp,), "int64", name=k) for k in ("b", "round", "shift"))
        m = te.placeholder((ocp,), "int64", name="m")
        own = te.placeholder((ocp,), "int32", name="acc_bias")
        residual = te.placeholder(shape, requant.residual or "int8", name="residual")
        params = [bias, b, rnd, shift, *([m, *([own] if requant.accumulator_clip else []), residual]
                                        if requant.residual else [])]

        def epilogue(i: Any, y: Any, z: Any, o: Any) -> Any:
            value = acc[i, y, z, o]
            if requant.accumulator_clip:
                low, high = requant.accumulator_clip
                value = tirx.max(tirx.min(value + own[o], high), low)
            total = value.astype("int64") * b[o] + bias[o]
            if requant.residual:
                total = total + residual[i, y, z, o].astype("int64") * m[o]
            v = round_shift(total, shift[o], rnd[o], tie_window=requant.tie_window)
            return clip(v + requant.zero_point if requant.zero_point else v)

    if not requantize_apart(requant, shape[-1], int(acc.shape[-1])):
        return te.create_prim_func([x, weight, *params, te.compute(shape, epilogue, name="out")])
    # whole vectors of channels, where :func:`.intrin.requantize_name` takes them, then the cut or the Add
    q = te.compute((*shape[:-1], shape[-1] if requant.residual else acc.shape[-1]), epilogue, name="requant")
    if requant.then is None:
        return te.create_prim_func([x, weight, *params, te.compute(shape, lambda *i: q[i], name="out")])
    add = requant.then
    other = te.placeholder(shape, add.residual, name="residual")
    out = te.compute(shape, lambda i, y, z, o: tirx.max(tirx.min(
        (q[i, y, z, o].astype("int32") * add.mine + other[i, y, z, o].astype("int32") * add.other + add.d)
        >> add.shift, add.qmax), add.qmin).astype(add.dtype), name="out")
    return te.create_prim_func([x, weight, *params, other, out])


def conv2d(wl: Conv2dWorkload, requant: Requant | None, vnni: bool, tile: tuple[int, int] | None = None) -> Any:
    """The scheduled PrimFunc; ``tile`` = (output pixels, 16-channel vectors) per register tile."""
    from tvm import s_tir

    ow_block, oc_vectors = tile or default_tile(wl)
    func = conv2d_compute(wl, requant, vnni, ow_block)
    sch = s_tir.Schedule(func)
    conv = sch.get_sblock("acc")
    n, y, z, o, ry, rx, rc = sch.get_loops(conv)
    oco, ocv, oci = sch.split(o, [None, oc_vectors, LANES])
    zo, zi = sch.split(z, [None, ow_block])
    rco, rci = sch.split(rc, [None, GROUP])
    if channels_outer(wl):
        rows = (oco, n, y) if wl.batch is not None else (n, oco, y)
        sch.reorder(*rows, zo, ry, rx, rco, zi, ocv, *((oci, rci) if vnni else (rci, oci)))
        for block in epilogue_blocks(wl, requant):
            sch.reverse_compute_at(sch.get_sblock(block), zo)
        parallel_rows(sch, wl, *rows)
    else:
        sch.reorder(n, y, zo, oco, ry, rx, rco, zi, ocv, *((oci, rci) if vnni else (rci, oci)))
        for block in epilogue_blocks(wl, requant):
            sch.reverse_compute_at(sch.get_sblock(block), oco)
        parallel_rows(sch, wl, n, y)
        if int(sch.get(oco).extent) <= UNROLLED_BLOCKS:
            sch.unroll(oco)
    sch.unroll(zi)
    sch.unroll(ocv)
    if not vnni:  # 16-lane int32 multiply-adds, vectorized while the block still has its init
        sch.unroll(rci)
        sch.vectorize(oci)
    init = sch.decompose_reduction(conv, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    if vnni:
        sch.tensorize(oci, intrinsic_name(wl.weight_bits))
    scope = accumulator_scope(ow_block * oc_vectors)
    sch.set_scope(init, 0, scope)
    return finish_schedule(sch, wl, copies_input(wl, vnni, ow_block), scope,
                           tensorized_requant(wl, requant, vnni, ow_block), epilogue_blocks(wl, requant))


def runs_on_amx(wl: Conv2dWorkload) -> bool:
    """Whether the AMX kernel takes the layer: not grouped, 8-bit weights, whole blocks of 32 output channels, not
    small, at least 64 input channels of which the padding to whole chunks of 64 adds at most a quarter
    (MobileNet-V2's 144-channel 1x1 convs, padded to 192, ran 1.3-1.5x the VNNI kernel's time), and 128 products
    per output (ResNet-50's 1x1 convs of 64 input channels ran 1.0-1.4x: their epilogue is most of the work)."""
    padded = -(-wl.in_channels // amx.CHUNK) * amx.CHUNK
    return (wl.groups == 1 and wl.weight_bits == 8 and wl.packed_out % amx.BLOCK == 0 and not is_small(wl)
            and amx.CHUNK <= wl.in_channels and 4 * padded <= 5 * wl.in_channels
            and wl.in_channels * math.prod(wl.kernel) >= 2 * amx.CHUNK)


def conv2d_amx(wl: Conv2dWorkload, requant: Requant | None) -> Any:
    """The scheduled PrimFunc on AMX tiles (:mod:`.amx`) for a layer :func:`runs_on_amx` takes, its input channels
    aligned to :data:`.amx.CHUNK`: each output row (in whole pairs of tiles) x block of 32 channels accumulated
    by the tiles into a row buffer, the epilogue after it; rows and blocks in the order of :func:`channels_outer`."""
    from tvm import s_tir

    tiling = amx.Tiling(wl.out_size[1])
    sch = s_tir.Schedule(conv2d_compute(wl, requant, True, tiling.pixels, tiling.lines))
    conv = sch.get_sblock("acc")
    n, y, z, o, ry, rx, rc = sch.get_loops(conv)
    oco, oci = sch.split(o, [None, amx.BLOCK])
    y, line = sch.split(y, [None, tiling.lines]) if tiling.lines > 1 else (y, None)
    outer = channels_outer(wl)
    rows = ((oco, n, y) if wl.batch is not None else (n, oco, y)) if outer else (n, y)
    sch.reorder(*rows, *(() if outer else (oco,)), *((line,) if line else ()), z, oci, ry, rx, rc)
    for block in epilogue_blocks(wl, requant):
        sch.reverse_compute_at(sch.get_sblock(block), rows[-1] if outer else oco)
    parallel_rows(sch, wl, *rows)
    sch.tensorize(line or z, amx.intrinsic_name(tiling.width, wl.kernel, wl.stride, wl.dilation, wl.block_span))
    return finish_schedule(sch, wl, copies_input(wl, True, tiling.pixels, tiling.lines),
                           high_word=tensorized_requant(wl, requant, True, 1, tiling.lines), blocks=epilogue_blocks(wl, requant))


def epilogue_blocks(wl: Conv2dWorkload, requant: Requant | None) -> tuple[str, ...]:
    """The blocks after the accumulator, in order: the requantize, and the Add after it where there is one
    or the cut to the output's channels where they are not whole vectors (:func:`with_epilogue`)."""
    return ("requant", "out") if requantize_apart(requant, wl.out_channels, wl.packed_out) else ("out",)


def requantize_apart(requant: Requant | None, out_channels: int, acc_channels: int) -> bool:
    """Whether the requantize is a block of its own before ``out``: an Add follows it, or the output's
    channels are fewer than the accumulator's whole vectors (and no residual, read per output channel)."""
    return requant is not None and (requant.then is not None or (out_channels != acc_channels and not requant.residual))


def parallel_rows(sch: Any, wl: Conv2dWorkload, *loops: Any) -> None:
    """Run the nested ``loops`` (the batch among them) on all cores, fused; an open batch, which must be
    the first, stays a serial loop outside (fused with it, the batch index becomes a division the
    accumulator's buffer compaction cannot follow: measured 3x slower). A layer of fewer than
    :data:`SERIAL_MACS` runs on one core."""
    if is_small(wl):
        return
    loops = loops if wl.batch is not None else loops[1:]
    sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])


def is_small(wl: Conv2dWorkload) -> bool:
    """Whether the layer (a static batch) has fewer than :data:`SERIAL_MACS` multiply-adds."""
    oh, ow = wl.out_size
    return wl.batch is not None and wl.batch * oh * ow * wl.packed_out * wl.block_span * math.prod(wl.kernel) < SERIAL_MACS


def accumulator_scope(vectors: int) -> str:
    """Where a register tile of ``vectors`` accumulator vectors lives: TVM 0.27 puts a ``global`` buffer
    under 1 KB on the stack, where LLVM keeps it in registers, and every ``local`` one (or larger one) in
    a workspace from ``TVMBackendAllocWorkspace`` that it must store to and reload."""
    return "global" if vectors * LANES * 4 < STACK_BYTES else "local"


def tensorized_requant(wl: Conv2dWorkload, requant: Requant | None, vnni: bool, pixels: int,
                       lines: int = 1) -> Requant | None:
    """``requant`` where the epilogue of rows of ``pixels``-pixel tiles (in blocks of ``lines`` rows) takes
    :func:`.intrin.requantize_name` (AVX-512, the high-word form, whole tiles: else the epilogue has a predicate,
    columns or rows past the output, that no intrinsic matches), else None."""
    oh, ow = wl.out_size
    whole_tiles = ow % pixels == 0 and oh % lines == 0
    return requant if vnni and whole_tiles and requant is not None and requant.high_word else None


def finish_schedule(sch: Any, wl: Conv2dWorkload, copies: bool, scope: str = "local",
                    high_word: Requant | None = None, blocks: tuple[str, ...] = ("out",)) -> Any:
    """The epilogue ``blocks`` over 16 output channels at a time (where they divide evenly): unrolled over the
    tile where the accumulators are in registers (``scope`` ``global``, see :func:`accumulator_scope`), the
    first with :func:`.intrin.requantize_name` for a ``high_word`` requantization, else vectorized by LLVM; the
    input copy (if ``copies``) parallel over rows. The scheduled PrimFunc, marked opaque for FuseOps."""
    for block in blocks:
        *_, pixels, last = sch.get_loops(sch.get_sblock(block))
        if int(sch.get(last).extent) % LANES == 0:
            vectors, inner = sch.split(last, [None, LANES])
            if scope == "global":
                sch.unroll(pixels)
                sch.unroll(vectors)
            if high_word is not None and block == blocks[0]:
                sch.tensorize(inner, requantize_name(high_word.qmin, high_word.qmax, high_word.dtype))
            else:
                sch.vectorize(inner)
    if copies and not is_small(wl):
        pn, py, *_ = sch.get_loops(sch.get_sblock("pad"))
        sch.parallel(sch.fuse(pn, py))
    func = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE)
    return func.without_attr("global_symbol")


def channels_outer(wl: Conv2dWorkload) -> bool:
    """Whether blocks of output channels are the outer parallel loop, the batch's rows inside (each core
    then reads only its share of the weights, each block of them for every row):

    - where the rows do not share evenly among the pool's tasks (``threads.TASKS_PER_THREAD`` x 2 threads:
      each task a whole range of rows, so 17 rows run as 5 + 5 + 5 + 2), i.e. fewer than 16 rows or fewer
      than 64 not a multiple of 4 (an open batch counts as 1). Measured: 7x7 maps at batch 1 10-20% faster,
      Inception-V3 batch 1 (17- and 35-row maps) 6% faster end to end at two threads;
    - where the weights take more than 3/4 of a core's L2 cache: rows outside would stream all of them from
      the last-level cache for every row. Measured on an Intel Xeon (2 MB L2), batch 8: 3x3 512->512 layers
      (2.4 MB) 20-25% faster on 7x7, 14x14 and 28x28 maps (28x28 at batch 1: 30%), ResNet-50's 1024->2048
      strided 1x1 (2 MB) 25%; 1 MB and 1.2 MB layers the same or 3% slower."""
    rows = (wl.batch or 1) * wl.out_size[0]
    return rows < 16 or (rows < 64 and rows % 4 != 0) or weight_bytes(wl) > l2_bytes() * 3 // 4


def weight_bytes(wl: Conv2dWorkload) -> int:
    """Bytes of the packed weights."""
    return wl.packed_out * wl.block_span * math.prod(wl.kernel) * wl.weight_bits // 8


@functools.cache
def l2_bytes() -> int:
    """This machine's L2 cache per core (Linux's sysfs), 1 MB where it does not say."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip()
        return int(size[:-1]) << {"K": 10, "M": 20}[size[-1]] if size[-1] in "KM" else int(size)
    except (OSError, ValueError):
        return 1 << 20


def default_tile(wl: Conv2dWorkload) -> tuple[int, int]:
    """Register tile: the largest that stays in registers (:func:`stack_tile`; measured against the 16- and
    24-accumulator workspace tiles below: 13-28% faster on MobileNet's and ResNet-50's 1x1 layers, whose
    epilogue is a large share of the work, 19% on MobileNet's stem, 3-4% on 3x3 layers). Where the row
    width has no divisor for one (prime widths such as 17 or 149): still in registers, 2 channel vectors
    preferred (each broadcast feeds two dot products); output pixels dividing the row width where such a
    tile is at least half full, else the tile that wastes the fewest columns when the row is rounded up to
    whole tiles (Inception-V3, batch 8, one thread: 17- and 73-pixel rows 1-5% faster in 6 x 2 and 5 x 2
    tiles than in 9 x 2 and 11 x 2 ones in a workspace)."""
    _, ow = wl.out_size
    if (tile := stack_tile(ow, wl.packed_out // LANES)) is not None:
        return tile
    vectors = 2 if wl.packed_out % (2 * LANES) == 0 else 1
    return row_pixels(ow, STACK_VECTORS // vectors), vectors


def row_pixels(width: int, limit: int) -> int:
    """Pixels of a register tile of at most ``limit``: the largest divisor of the row ``width`` where it fills
    half a tile or more, else the tile wasting the fewest columns when the row is rounded up to whole tiles."""
    pixels = max(d for d in range(1, limit + 1) if width % d == 0)
    if 2 * pixels >= min(limit, width):
        return pixels
    return min(range(limit // 2, limit + 1), key=lambda p: (-(-width // p) * p, -p))


def stack_tile(width: int, vectors: int) -> tuple[int, int] | None:
    """The tile of 2 or more pixels dividing the row ``width`` x channel vectors dividing ``vectors`` with at
    most :data:`STACK_VECTORS` accumulators, or None where none holds 8 (prime widths): 4 pixels or more
    where the width allows (each weight vector feeds that many dot products: on 8x8 maps 2 x 6 ran 20-25%
    slower than 4 x 3, 4 x 2 or 8 x 1), then the most dot products per load (``p`` broadcasts and ``v`` weight
    vectors feed ``p * v``: MobileNet-V2's 144-channel layers take 4 x 3 tiles rather than 14 x 1, the model
    batch 8 3% faster), 2 channel vectors preferred."""
    tiles = [(p, v) for p in range(2, STACK_VECTORS + 1) for v in range(1, STACK_VECTORS // p + 1)
             if width % p == 0 and vectors % v == 0 and p * v >= 8]
    return max(tiles, key=lambda t: (min(t[0], 4), t[0] * t[1] / (t[0] + t[1]), t[1] == 2, t[1]), default=None)
