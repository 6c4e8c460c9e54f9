"""Implicit-GEMM int8/int4 conv2d on Turing Tensor Cores, dyadic requantization fused in the epilogue.

The GEMM is ``Y[m, o] = sum_k A[m, k] * W[o, k]`` with ``m`` an output pixel ``(n, oh, ow)``, ``o`` an
output channel and ``k = (kh, kw, c)`` (channel fastest). Both operands are int32 words holding
``32 / bits`` values along ``k``: weights are packed once at compile time (:func:`pack_weight`), the
activation tile is loaded packed (a packed input) or packed while it is staged in shared memory. A block of 4 warps computes a 64x64
tile; each warp issues ``mma.sync.aligned.m8n8k32`` (s4/u4 x s4) or ``m8n8k16`` (s8/u8 x s8) on
fragments of one word per lane: lane ``l`` holds row ``l // 4``, word ``l % 4`` of A and B and the
accumulators of row ``l // 4``, columns ``2 * (l % 4) + {0, 1}``. The epilogue applies
``clip(round_shift(acc * b + bias, c))`` in int64 (:func:`hawqc.quant.dyadic.requantize`, half to even; the bias
scaled by ``b`` at compile time, with the requantization's offset), stages the tile
in shared memory and stores it NHWC, each thread a run of channels (coalesced).

Activations are NHWC. A *packed* activation (4-bit values only) is an int32 tensor
``[N, H, W, ceil(C / 8)]``: 8 channels per word, channel ``8w + e`` at bits ``[4e, 4e + 4)``, channels
past ``C`` zero. A kernel with ``packed_input`` loads its A words straight from it (one int32 load per
word, no gather or packing); one with ``packed_output`` writes its requantized 4-bit output that way
(:func:`pack_words` is the same rule in numpy).

``conv2d_kernel(spec, tensor_cores=False)`` is the same program with every thread loop serial and
each ``mma`` computed by plain loops over the same fragments: it builds for llvm, so the index math
and the packing are checked on a CPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hawqc.quant.dyadic import ShiftOps, round_shift
from hawqc.reference.graph import conv_output_size

BLOCK_M, BLOCK_N = 64, 64
"""Output pixels x output channels per thread block."""
WARPS_M, WARPS_N = 2, 2
"""Warps per block along M and N; each computes a (BLOCK_M / WARPS_M) x (BLOCK_N / WARPS_N) tile."""
STAGE_WORDS = 8
"""int32 words of K staged in shared memory per step (two mma K steps)."""
MMA_WORDS = 4
"""int32 words of K per mma (16 int8 or 32 int4 values)."""
WARP = 32
FRAG = 8
"""mma tile: 8 x 8 outputs."""


@dataclass(frozen=True)
class ConvSpec:
    """One conv2d + requantize: NHWC input and output (packed or not), OIHW weights, groups 1."""

    batch: int | None
    """None: any batch (a symbolic dimension of the kernel: its grid follows it)."""
    channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    """top, left, bottom, right (zeros)."""
    dilation: tuple[int, int]
    bits: int
    """4 or 8: the width of both operands on the Tensor Cores."""
    signed_input: bool
    input_dtype: str
    out_dtype: str
    qmin: int
    qmax: int
    packed_input: bool = False
    """The input is packed 8 int4 per int32 along channels (needs ``bits == 4``)."""
    packed_output: bool = False
    """The output is written packed 8 int4 per int32 (needs a 4-bit ``[qmin, qmax]``)."""

    def __post_init__(self) -> None:
        if self.packed_input and self.bits != 4:
            raise ValueError("a packed input needs 4-bit operands")
        if self.packed_output and not fits_4_bits(self.qmin, self.qmax):
            raise ValueError(f"output range [{self.qmin}, {self.qmax}] does not fit 4 bits: it cannot be packed")

    @property
    def input_shape(self) -> tuple[tuple[int, ...], str]:
        """Shape and dtype of the (NHWC) input tensor."""
        if self.packed_input:
            return (self.batch, self.height, self.width, packed_channels(self.channels)), "int32"
        return (self.batch, self.height, self.width, self.channels), self.input_dtype

    @property
    def output_shape(self) -> tuple[tuple[int, ...], str]:
        """Shape and dtype of the (NHWC) output tensor."""
        if self.packed_output:
            return (self.batch, self.out_height, self.out_width, packed_channels(self.out_channels)), "int32"
        return (self.batch, self.out_height, self.out_width, self.out_channels), self.out_dtype

    @property
    def k_channels(self) -> int:
        """Channels per kernel position along K: 4-bit operands' are padded to whole packed words (zero
        weights), so that the packed weights are the same whether the input is packed or not."""
        return packed_channels(self.channels) * PACK if self.bits == 4 else self.channels

    @property
    def out_height(self) -> int:
        return self._out_size[0]

    @property
    def out_width(self) -> int:
        return self._out_size[1]

    @property
    def _out_size(self) -> tuple[int, int]:
        return conv_output_size((self.height, self.width), self.kernel, self.stride, self.padding, self.dilation)

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    def gemm_m(self, batch: Any) -> Any:
        """GEMM rows (output pixels) at ``batch`` (an int or the kernel's symbolic batch)."""
        return batch * self.out_height * self.out_width

    @property
    def gemm_k(self) -> int:
        return self.kernel[0] * self.kernel[1] * self.k_channels

    @property
    def k_words(self) -> int:
        """K in packed words, padded to a whole number of stages."""
        return math.ceil(self.gemm_k / (self.per_word * STAGE_WORDS)) * STAGE_WORDS

    @property
    def padded_out_channels(self) -> int:
        return math.ceil(self.out_channels / BLOCK_N) * BLOCK_N

    @property
    def mma_shape(self) -> str:
        return "m8n8k32" if self.bits == 4 else "m8n8k16"


PACK = 8
"""4-bit values per int32 word of a packed activation."""


def packed_channels(channels: int) -> int:
    """int32 words per pixel of a packed activation of ``channels`` channels."""
    return math.ceil(channels / PACK)


def fits_4_bits(lo: int, hi: int) -> bool:
    """Whether ``[lo, hi]`` fits a signed or an unsigned 4-bit value."""
    return -8 <= lo and hi <= 7 or 0 <= lo and hi <= 15


def operand_bits(weight_range: tuple[int, int], input_range: tuple[int, int], int4: bool) -> int | None:
    """4 or 8: the Tensor Core operand width that holds both ranges (4 only if ``int4``); None if neither does.
    Weights are signed; activations are signed or unsigned (``[0, 2^bits)``)."""
    for bits in (4, 8) if int4 else (8,):
        half = 1 << (bits - 1)
        signed_input = input_range[0] < 0
        lo, hi = (-half, half - 1) if signed_input else (0, 2 * half - 1)
        if -half <= weight_range[0] and weight_range[1] < half and lo <= input_range[0] and input_range[1] <= hi:
            return bits
    return None


def pack_weight(weight: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """OIHW integer weights as int32 words ``[padded O, k_words]``, ``per_word`` values of K per word
    (K = kh, kw, then ``spec.k_channels`` channels, zeros past the real ones)."""
    w = np.asarray(weight, dtype=np.int64).transpose(0, 2, 3, 1)
    w = np.pad(w, [(0, 0)] * 3 + [(0, spec.k_channels - spec.channels)]).reshape(spec.out_channels, -1)
    lo, hi = -(1 << (spec.bits - 1)), (1 << (spec.bits - 1)) - 1
    if w.size and (w.min() < lo or w.max() > hi):
        raise ValueError(f"weights span [{w.min()}, {w.max()}]: they do not fit {spec.bits}-bit Tensor Core operands")
    padded = np.zeros((spec.padded_out_channels, spec.k_words * spec.per_word), dtype=np.int64)
    padded[: spec.out_channels, : w.shape[1]] = w
    return pack_words(padded, spec.bits)


def pack_words(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis ``32 / bits`` values per int32 word, element ``e`` at bits ``[bits*e, bits*(e+1))``."""
    per_word = 32 // bits
    fields = (np.asarray(values, dtype=np.int64) & ((1 << bits) - 1)).reshape(*values.shape[:-1], -1, per_word)
    words = (fields << (bits * np.arange(per_word))).sum(axis=-1)
    return words.astype(np.uint32).view(np.int32)


@functools.lru_cache(maxsize=256)
def conv2d_kernel(spec: ConvSpec, tensor_cores: bool = True) -> Any:
    """The PrimFunc ``(X, packed W, bias int64[O], b int64[O], c int64[O]) -> Y`` of ``spec``; ``bias`` is the
    accumulator's bias times ``b`` plus the requantization's offset (:func:`_requantize`)."""
    from tvm import tirx
    from tvm.script import tirx as T

    loop = T.thread_binding if tensor_cores else (lambda extent, thread: T.serial(extent))
    unroll = T.unroll if tensor_cores else T.serial  # unrolled loops only slow the llvm build down
    shared, local = ("shared", "local") if tensor_cores else ("global", "global")
    bits, per_word, mask = spec.bits, spec.per_word, (1 << spec.bits) - 1
    kw_size = spec.kernel[1]
    (sh, sw), (dh, dw), (pt, pl) = spec.stride, spec.dilation, spec.padding[:2]
    channels = spec.channels
    oh_size, ow_size, out_channels = spec.out_height, spec.out_width, spec.out_channels
    batch = tirx.Var("n", "int32") if spec.batch is None else spec.batch
    gemm_m = spec.gemm_m(batch)
    x_shape, x_dtype = spec.input_shape
    y_shape, y_dtype = spec.output_shape
    warp_m, warp_n = BLOCK_M // WARPS_M, BLOCK_N // WARPS_N
    frags_m, frags_n = warp_m // FRAG, warp_n // FRAG
    threads = WARPS_M * WARPS_N * WARP
    a_loads, b_loads = BLOCK_M * STAGE_WORDS // threads, BLOCK_N * STAGE_WORDS // threads
    k_channels = spec.k_channels
    word_in_pixel = k_channels % per_word == 0
    """Whether the values of a word are channels of one input pixel (all but stems like C=3)."""
    in_words = packed_channels(channels)
    k_words_used = spec.kernel[0] * kw_size * in_words
    """Words of K in a packed input's GEMM (past them: the zero padding of K)."""
    row_elements = BLOCK_N // PACK if spec.packed_output else BLOCK_N
    """Output elements (words, when packed) per row of the output tile."""
    stores = BLOCK_M * row_elements // threads
    y_channels = spec.output_shape[0][3]
    a_type = ("int" if spec.signed_input else "uint") + str(bits)
    b_type = f"int{bits}"

    @T.macro
    def mma_tensor_core(acc, a_tile, b_tile, warp, lane, fm, fn, kk):
        """One warp-wide mma: lane ``l`` gives word ``l % 4`` of A row ``l // 4`` and of B column ``l // 4``."""
        a_frag = T.alloc_buffer((1,), "int32", scope="local")
        b_frag = T.alloc_buffer((1,), "int32", scope="local")
        c_frag = T.alloc_buffer((2,), "int32", scope="local")
        a_frag[0] = a_tile[warp // WARPS_N * warp_m + fm * FRAG + lane // 4, kk * MMA_WORDS + lane % 4]
        b_frag[0] = b_tile[warp % WARPS_N * warp_n + fn * FRAG + lane // 4, kk * MMA_WORDS + lane % 4]
        for i in T.unroll(2):
            c_frag[i] = acc[warp, lane, fm, fn, i]
        T.evaluate(T.ptx_legacy.mma("int32", spec.mma_shape, "row", "col", a_type, b_type, "int32",
                                    a_frag.data, 0, b_frag.data, 0, c_frag.data, 0, False))
        for i in T.unroll(2):
            acc[warp, lane, fm, fn, i] = c_frag[i]

    @T.macro
    def mma_loops(acc, a_tile, b_tile, warp, lane, fm, fn, kk):
        """The same mma per lane: accumulators of row ``l // 4``, columns ``2 * (l % 4) + i``."""
        for i, j, e in T.grid(2, MMA_WORDS, per_word):
            acc[warp, lane, fm, fn, i] = acc[warp, lane, fm, fn, i] + _unpack(
                a_tile[warp // WARPS_N * warp_m + fm * FRAG + lane // 4, kk * MMA_WORDS + j], e, bits,
                spec.signed_input) * _unpack(
                b_tile[warp % WARPS_N * warp_n + fn * FRAG + (lane % 4) * 2 + i, kk * MMA_WORDS + j], e, bits, True)

    mma = mma_tensor_core if tensor_cores else mma_loops

    @T.macro
    def gather_word(word, X, m, kword):
        """A word of A unpacked: ``per_word`` values of K gathered from the NHWC input and packed."""
        word[0] = 0
        for e in unroll(per_word):
            k = kword * per_word + e
            pixel_k = _pixel_position(k, e, word_in_pixel)
            ih = m // ow_size % oh_size * sh - pt + pixel_k // (kw_size * k_channels) * dh
            iw = m % ow_size * sw - pl + pixel_k // k_channels % kw_size * dw
            value = T.if_then_else(  # zero padding, and zeros past M, K and the channels
                _inside(spec, gemm_m, m, T.And(k < spec.gemm_k, k % k_channels < channels), ih, iw),
                T.Cast("int32", X[m // (oh_size * ow_size), ih, iw, k % k_channels]), 0)
            word[0] = T.bitwise_or(word[0], T.shift_left(T.bitwise_and(value, mask), bits * e))

    @T.macro
    def load_word(word, X, m, kword):
        """A word of A from a packed input: one load (zero padding, and zeros past M and K)."""
        ih = m // ow_size % oh_size * sh - pt + kword // (kw_size * in_words) * dh
        iw = m % ow_size * sw - pl + kword // in_words % kw_size * dw
        word[0] = T.if_then_else(_inside(spec, gemm_m, m, kword < k_words_used, ih, iw),
                                 X[m // (oh_size * ow_size), ih, iw, kword % in_words], 0)

    a_word = load_word if spec.packed_input else gather_word

    @T.macro
    def store(Y, out_tile, row, col, m, bn):
        """Output element ``col`` of tile row ``row``: ``PACK`` channels packed in a word, or one value."""
        if spec.packed_output:
            word = T.alloc_buffer((1,), "int32", scope=local)
            word[0] = 0
            for e in unroll(PACK):
                word[0] = T.bitwise_or(word[0], T.shift_left(T.bitwise_and(out_tile[row, col * PACK + e], 15), 4 * e))
            Y[m // (oh_size * ow_size), m // ow_size % oh_size, m % ow_size, bn * row_elements + col] = word[0]
        else:
            Y[m // (oh_size * ow_size), m // ow_size % oh_size, m % ow_size, bn * row_elements + col] = T.Cast(
                spec.out_dtype, out_tile[row, col])

    @T.prim_func(s_tir=True)
    def kernel(X: T.Buffer((batch, *x_shape[1:]), x_dtype), W: T.Buffer((spec.padded_out_channels, spec.k_words), "int32"),
               bias: T.Buffer((out_channels,), "int64"), mult: T.Buffer((out_channels,), "int64"),
               shift: T.Buffer((out_channels,), "int64"), Y: T.Buffer((batch, *y_shape[1:]), y_dtype)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "hawqc.packed_input": spec.packed_input,
                     "hawqc.packed_output": spec.packed_output})
        for bm in loop((gemm_m + BLOCK_M - 1) // BLOCK_M, "blockIdx.x"):
            for bn in loop(spec.padded_out_channels // BLOCK_N, "blockIdx.y"):
                with T.sblock("tile"):
                    T.reads(X[:, :, :, :], W[:, :], bias[:], mult[:], shift[:])
                    T.writes(Y[:, :, :, :])
                    a_tile = T.alloc_buffer((BLOCK_M, STAGE_WORDS), "int32", scope=shared)
                    b_tile = T.alloc_buffer((BLOCK_N, STAGE_WORDS), "int32", scope=shared)
                    out_tile = T.alloc_buffer((BLOCK_M, BLOCK_N), "int32", scope=shared)
                    acc = T.alloc_buffer((WARPS_M * WARPS_N, WARP, frags_m, frags_n, 2), "int32", scope=local)
                    for warp in loop(WARPS_M * WARPS_N, "threadIdx.y"):
                        for lane in loop(WARP, "threadIdx.x"):
                            for fm, fn, i in T.grid(frags_m, frags_n, 2):
                                acc[warp, lane, fm, fn, i] = 0
                    for ko in T.serial(spec.k_words // STAGE_WORDS):
                        for warp in loop(WARPS_M * WARPS_N, "threadIdx.y"):
                            for lane in loop(WARP, "threadIdx.x"):
                                for s in unroll(a_loads):  # the activation tile, a word per thread and step
                                    word = T.alloc_buffer((1,), "int32", scope=local)
                                    a_word(word, X, bm * BLOCK_M + (s * threads + warp * WARP + lane) // STAGE_WORDS,
                                           ko * STAGE_WORDS + (s * threads + warp * WARP + lane) % STAGE_WORDS)
                                    # stored at the thread index itself: an index read from a local buffer would
                                    # make TVM's sync analysis put a barrier before every store
                                    a_tile[(s * threads + warp * WARP + lane) // STAGE_WORDS,
                                           (s * threads + warp * WARP + lane) % STAGE_WORDS] = word[0]
                                for s in unroll(b_loads):  # the weights are packed already
                                    b_tile[(s * threads + warp * WARP + lane) // STAGE_WORDS,
                                           (s * threads + warp * WARP + lane) % STAGE_WORDS] = W[
                                        bn * BLOCK_N + (s * threads + warp * WARP + lane) // STAGE_WORDS,
                                        ko * STAGE_WORDS + (s * threads + warp * WARP + lane) % STAGE_WORDS]
                        for warp in loop(WARPS_M * WARPS_N, "threadIdx.y"):
                            for lane in loop(WARP, "threadIdx.x"):
                                for kk in unroll(STAGE_WORDS // MMA_WORDS):
                                    for fm in unroll(frags_m):
                                        for fn in unroll(frags_n):
                                            mma(acc, a_tile, b_tile, warp, lane, fm, fn, kk)
                    for warp in loop(WARPS_M * WARPS_N, "threadIdx.y"):  # requantize into the output tile
                        for lane in loop(WARP, "threadIdx.x"):
                            for fm, fn, i in T.grid(frags_m, frags_n, 2):
                                o = bn * BLOCK_N + warp % WARPS_N * warp_n + fn * FRAG + (lane % 4) * 2 + i
                                if o < out_channels:
                                    out_tile[warp // WARPS_N * warp_m + fm * FRAG + lane // 4,
                                             warp % WARPS_N * warp_n + fn * FRAG + (lane % 4) * 2 + i] = T.Cast(
                                        "int32", _requantize(acc[warp, lane, fm, fn, i], mult[o], bias[o],
                                                             shift[o], spec.qmin, spec.qmax))
                                else:  # channels past O: zeros (a packed output's padding)
                                    out_tile[warp // WARPS_N * warp_m + fm * FRAG + lane // 4,
                                             warp % WARPS_N * warp_n + fn * FRAG + (lane % 4) * 2 + i] = 0
                    for warp in loop(WARPS_M * WARPS_N, "threadIdx.y"):  # store it, consecutive threads on a row
                        for lane in loop(WARP, "threadIdx.x"):
                            for s in unroll(stores):
                                if (bm * BLOCK_M + (s * threads + warp * WARP + lane) // row_elements < gemm_m
                                        and bn * row_elements + (s * threads + warp * WARP + lane) % row_elements
                                        < y_channels):
                                    store(Y, out_tile, (s * threads + warp * WARP + lane) // row_elements,
                                          (s * threads + warp * WARP + lane) % row_elements,
                                          bm * BLOCK_M + (s * threads + warp * WARP + lane) // row_elements, bn)

    return kernel


def _unpack(word: Any, e: Any, bits: int, signed: bool) -> Any:
    """Element ``e`` of a packed int32 word, sign-extended or zero-extended (a TIR expression)."""
    from tvm import tirx

    if signed:
        return tirx.shift_right(tirx.shift_left(word, 32 - bits * (e + 1)), 32 - bits)
    return tirx.bitwise_and(tirx.shift_right(word, bits * e), (1 << bits) - 1)


def _requantize(acc: Any, b: Any, bias: Any, c: Any, qmin: int, qmax: int) -> Any:
    """``clip(round_shift(acc * b + bias, c), qmin, qmax)`` in int64, rounding half to even, ``bias``
    already scaled by ``b``: :func:`hawqc.quant.dyadic.requantize` in TIR."""
    from tvm import tirx

    one = tirx.const(1, "int64")
    scaled = round_shift(tirx.Cast("int64", acc) * b + bias, c, tirx.shift_left(one, c - 1) - one, ShiftOps(one=one))
    return tirx.max(tirx.min(scaled, tirx.const(qmax, "int64")), tirx.const(qmin, "int64"))


def _pixel_position(k: Any, e: int, word_in_pixel: bool) -> Any:
    """The K index that locates the input pixel of element ``e`` of a word (its first element's, when the
    word lies in one pixel: the index math is then the same for the whole word)."""
    return k - e if word_in_pixel else k


def _inside(spec: ConvSpec, gemm_m: Any, m: Any, k_exists: Any, ih: Any, iw: Any) -> Any:
    """Whether GEMM row ``m`` (of ``gemm_m``) and the K position (``k_exists``) exist and read a pixel
    inside the (unpadded) input."""
    from tvm import tirx

    return tirx.all(m < gemm_m, k_exists, ih >= 0, ih < spec.height, iw >= 0, iw < spec.width)
