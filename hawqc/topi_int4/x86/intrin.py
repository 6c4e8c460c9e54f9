"""The AVX-512 VNNI dot product as TIR tensor intrinsics: 16 int32 lanes += 4 activation bytes x 16x4 weights.

``vpdpbusd`` multiplies *unsigned* bytes by signed bytes: the activations are uint8 (int8 ones are
offset by 128 before they get here, see :mod:`.conv2d`).

With 4-bit weights (``hawqc_vnni_w4``) the 16x4 block is 32 bytes, weight ``e = 4*channel + k`` in
byte ``e % 32`` (low nibble for channels 0-7, high nibble for 8-15): the nibbles are sign-extended in
registers and fed to two 256-bit ``vpdpbusd``, one per half of the channels (a 512-bit one costs two
256-bit operations on Zen 4 anyway).

TVM's own ``dot_16x4_vnni`` declares the intrinsic with 32-bit lanes, which the LLVM bundled with
TVM 0.27 refuses; these pass byte vectors as LLVM 22 expects. The implementations bind no local
variables: TVM 0.27 gives each one a workspace allocation in the kernel.

:func:`requantize_name` registers the epilogue's high-word requantization of 16 accumulators
(:func:`hawqc.quant.dyadic.high_word_form`) written for AVX-512 without 64-bit lanes at either end: the
even and odd int32 lanes are multiplied as two ``vpmuldq`` (``b`` < 2^31), the high words of the two int64
products are blended back into one int32 vector. LLVM's own lowering of the same TIR sign-extends both
halves, multiplies with ``vpmullq`` and narrows them again: measured 13-23% slower on 1x1 convolutions
once the accumulators stay in registers.
"""

from __future__ import annotations

from functools import cache
from typing import Any

LANES, GROUP = 16, 4
"""Output channels per instruction, input channels per lane."""


def intrinsic_name(weight_bits: int) -> str:
    """The registered intrinsic for uint8 activations and 8- or 4-bit weights."""
    register()
    return f"hawqc_vnni_w{weight_bits}"


def unpack_nibble(byte: Any, high: Any) -> Any:
    """A sign-extended 4-bit weight: the low (``high`` = 0) or high (1) nibble of an int8 ``byte``."""
    from tvm import tirx

    return (byte << (4 - high * 4).astype("int8")) >> tirx.const(4, "int8")


@cache
def register() -> None:
    """Register the two intrinsics with TVM (once per process)."""
    from tvm.s_tir import TensorIntrin

    for bits in (8, 4):
        TensorIntrin.register(f"hawqc_vnni_w{bits}", *_intrinsic(bits), override=True)


def _intrinsic(weight_bits: int) -> tuple[Any, Any]:
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc8(a: T.Buffer((4,), "uint8", offset_factor=1), w: T.Buffer((16, 4), "int8", offset_factor=1),
              acc: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(acc[0:16], a[0:4], w[0:16, 0:4])
            T.writes(acc[0:16])
            for i, k in T.grid(16, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    acc[vi] = acc[vi] + T.Cast("int32", a[vk]) * T.Cast("int32", w[vi, vk])

    @T.prim_func(s_tir=True)
    def desc4(a: T.Buffer((4,), "uint8", offset_factor=1), w: T.Buffer((32,), "int8", offset_factor=1),
              acc: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(acc[0:16], a[0:4], w[0:32])
            T.writes(acc[0:16])
            for i, k in T.grid(16, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    acc[vi] = acc[vi] + T.Cast("int32", a[vk]) * T.Cast(
                        "int32", T.shift_right(T.shift_left(w[vi % 8 * 4 + vk], T.Cast("int8", 4 - vi // 8 * 4)),
                                               T.int8(4)))

    @T.prim_func(s_tir=True)
    def impl8(a: T.Buffer((4,), "uint8", offset_factor=1), w: T.Buffer((16, 4), "int8", offset_factor=1),
              acc: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(acc[0:16], a[0:4], w[0:16, 0:4])
            T.writes(acc[0:16])
            acc[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                "int32x16", "llvm.x86.avx512.vpdpbusd.512", acc.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(T.reinterpret(a.vload([0], "uint8x4"), dtype="int32"), 16), dtype="int8x64"),
                w.vload([0, 0], dtype="int8x64"))

    @T.prim_func(s_tir=True)
    def impl4(a: T.Buffer((4,), "uint8", offset_factor=1), w: T.Buffer((32,), "int8", offset_factor=1),
              acc: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(acc[0:16], a[0:4], w[0:32])
            T.writes(acc[0:16])
            acc[T.ramp(T.int32(0), 1, 8)] = T.call_llvm_pure_intrin(
                "int32x8", "llvm.x86.avx512.vpdpbusd.256", acc.vload([0], dtype="int32x8"),
                T.reinterpret(T.broadcast(T.reinterpret(a.vload([0], "uint8x4"), dtype="int32"), 8), dtype="int8x32"),
                T.shift_right(T.shift_left(w.vload([0], dtype="int8x32"), T.broadcast(T.int8(4), 32)),
                              T.broadcast(T.int8(4), 32)))
            acc[T.ramp(T.int32(8), 1, 8)] = T.call_llvm_pure_intrin(
                "int32x8", "llvm.x86.avx512.vpdpbusd.256", acc.vload([8], dtype="int32x8"),
                T.reinterpret(T.broadcast(T.reinterpret(a.vload([0], "uint8x4"), dtype="int32"), 8), dtype="int8x32"),
                T.shift_right(w.vload([0], dtype="int8x32"), T.broadcast(T.int8(4), 32)))

    return (desc8, impl8) if weight_bits == 8 else (desc4, impl4)


SPREAD = 0x8888444422221111
"""The byte mask of :func:`depthwise_name`'s weights: byte ``L`` of each int32 lane in 128-bit lane ``L``."""


@cache
def depthwise_name(taps: int) -> str:
    """The registered depthwise step ``acc[c] += sum over taps of a[tap, c] * w[tap, c]`` for 16 channels over
    a row of ``taps`` taps, uint8 activations and int8 weights (each ``[taps, 16]``, taps any stride apart),
    one ``vpdpbusd`` per tap: the 16 activation bytes loaded as they are into each 128-bit lane
    (``vbroadcasti32x4``, a load alone), the weights likewise with all bytes but byte ``L`` of each int32 lane
    of 128-bit lane ``L`` zeroed (mask :data:`SPREAD`), so int32 lane ``4L + d`` sums channel ``4d + L`` (the
    other products are zero); one ``vpermd`` puts the row's sums back in channel order. Measured against each
    activation zero-extended to its own lane (``vpmovzxbd``, a shuffle on top of the load): 14% faster
    (144 channels 56x56, batch 8)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    def row(a: Any, w: Any) -> Any:  # int32x16 in channel order
        sums = T.broadcast(T.int32(0), 16)
        for tap in range(taps):
            pixels = T.Shuffle([a.vload([tap, 0], "uint8x16")] * 4, list(range(64)))
            weights = T.Shuffle([w.vload([tap, 0], "int8x16"), *[T.broadcast(T.int8(0), 16)] * 3],
                                [b % 16 if SPREAD >> b & 1 else 16 for b in range(64)])
            sums = T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", sums,
                                           T.reinterpret(pixels, dtype="int8x64"), weights)
        return T.Shuffle([sums], [c % 4 * 4 + c // 4 for c in range(16)])

    @T.prim_func(s_tir=True)
    def desc(a_h: T.handle, w_h: T.handle, acc_h: T.handle) -> None:
        ac, wc = T.int32(), T.int32()
        a = T.match_buffer(a_h, (taps, 16), "uint8", strides=[ac, 1], offset_factor=1)
        w = T.match_buffer(w_h, (taps, 16), "int8", strides=[wc, 1], offset_factor=1)
        acc = T.match_buffer(acc_h, (16,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(acc[0:16], a[0:taps, 0:16], w[0:taps, 0:16])
            T.writes(acc[0:16])
            for tap, i in T.grid(taps, 16):
                with T.sblock("update"):
                    vi, vtap = T.axis.remap("SR", [i, tap])
                    acc[vi] = acc[vi] + T.Cast("int32", a[vtap, vi]) * T.Cast("int32", w[vtap, vi])

    @T.prim_func(s_tir=True)
    def impl(a_h: T.handle, w_h: T.handle, acc_h: T.handle) -> None:
        ac, wc = T.int32(), T.int32()
        a = T.match_buffer(a_h, (taps, 16), "uint8", strides=[ac, 1], offset_factor=1)
        w = T.match_buffer(w_h, (taps, 16), "int8", strides=[wc, 1], offset_factor=1)
        acc = T.match_buffer(acc_h, (16,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(acc[0:16], a[0:taps, 0:16], w[0:taps, 0:16])
            T.writes(acc[0:16])
            acc[T.ramp(T.int32(0), 1, 16)] = acc.vload([0], dtype="int32x16") + row(a, w)

    TensorIntrin.register(f"hawqc_vnni_depthwise_{taps}", desc, impl, override=True)
    return f"hawqc_vnni_depthwise_{taps}"


@cache
def requantize_name(qmin: int, qmax: int, dtype: str) -> str:
    """The registered epilogue ``clip(high_word_shift(acc * b + d, s))`` of 16 int32 accumulators held in
    a ``global`` (register-resident) buffer (``b``, ``d``: int64 per channel, ``s``: int32), cast to ``dtype``."""
    from tvm.s_tir import TensorIntrin

    name = f"hawqc_requantize_{qmin}_{qmax}_{dtype}"
    TensorIntrin.register(name, *_requantize(qmin, qmax, dtype), override=True)
    return name


def _requantize(qmin: int, qmax: int, dtype: str) -> tuple[Any, Any]:
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(acc: T.Buffer((16,), "int32", offset_factor=1), b: T.Buffer((16,), "int64", offset_factor=1),
             d: T.Buffer((16,), "int64", offset_factor=1), s: T.Buffer((16,), "int32", offset_factor=1),
             out: T.Buffer((16,), dtype, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(acc[0:16], b[0:16], d[0:16], s[0:16])
            T.writes(out[0:16])
            for i in T.serial(16):
                with T.sblock("out"):
                    vi = T.axis.remap("S", [i])
                    out[vi] = T.Cast(dtype, T.max(T.min(T.shift_right(T.Cast("int32", T.shift_right(
                        T.Cast("int64", acc[vi]) * b[vi] + d[vi], T.int64(32))), s[vi]), qmax), qmin))

    @T.prim_func(s_tir=True)
    def impl(acc: T.Buffer((16,), "int32", offset_factor=1), b: T.Buffer((16,), "int64", offset_factor=1),
             d: T.Buffer((16,), "int64", offset_factor=1), s: T.Buffer((16,), "int32", offset_factor=1),
             out: T.Buffer((16,), dtype, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(acc[0:16], b[0:16], d[0:16], s[0:16])
            T.writes(out[0:16])
            # the even and odd int32 lanes as sign-extended int64 (LLVM multiplies them with vpmuldq), times
            # b of the same channels (b < 2^31), plus d; the high words of the even sums shifted down into
            # the even lanes, blended with the odd sums' high words
            out[T.ramp(T.int32(0), 1, 16)] = T.Cast(f"{dtype}x16", T.max(T.min(T.shift_right(T.reinterpret(
                T.bitwise_or(
                    T.bitwise_and(T.shift_right(
                        T.shift_right(T.shift_left(T.reinterpret(acc.vload([0], "int32x16"), dtype="int64x8"),
                                                   T.broadcast(T.int64(32), 8)), T.broadcast(T.int64(32), 8))
                        * T.shift_right(T.shift_left(T.Shuffle([b.vload([0], "int64x8"), b.vload([8], "int64x8")],
                                                               [0, 2, 4, 6, 8, 10, 12, 14]),
                                                     T.broadcast(T.int64(32), 8)), T.broadcast(T.int64(32), 8))
                        + T.Shuffle([d.vload([0], "int64x8"), d.vload([8], "int64x8")], [0, 2, 4, 6, 8, 10, 12, 14]),
                        T.broadcast(T.int64(32), 8)), T.broadcast(T.int64(0xFFFFFFFF), 8)),
                    T.bitwise_and(
                        T.shift_right(T.reinterpret(acc.vload([0], "int32x16"), dtype="int64x8"),
                                      T.broadcast(T.int64(32), 8))
                        * T.shift_right(T.shift_left(T.Shuffle([b.vload([0], "int64x8"), b.vload([8], "int64x8")],
                                                               [1, 3, 5, 7, 9, 11, 13, 15]),
                                                     T.broadcast(T.int64(32), 8)), T.broadcast(T.int64(32), 8))
                        + T.Shuffle([d.vload([0], "int64x8"), d.vload([8], "int64x8")], [1, 3, 5, 7, 9, 11, 13, 15]),
                        T.broadcast(T.int64(-(1 << 32)), 8))),
                dtype="int32x16"), s.vload([0], "int32x16")), T.broadcast(T.int32(qmax), 16)),
                T.broadcast(T.int32(qmin), 16)))

    return desc, impl
