"""The AVX-512 VNNI dot product as TIR tensor intrinsics: 16 int32 lanes += 4 activation bytes x 16x4 weights.

``vpdpbusd`` multiplies *unsigned* bytes by signed bytes: the activations are uint8 (int8 ones are
offset by 128 before they get here, see :mod:`.conv2d`).

With 4-bit weights (``hawqc_vnni_w4``) the 16x4 block is 32 bytes, weight ``e = 4*channel + k`` in
byte ``e % 32`` (low nibble for channels 0-7, high nibble for 8-15): the nibbles are sign-extended in
registers and fed to two 256-bit ``vpdpbusd``, one per half of the channels (a 512-bit one costs two
256-bit operations on Zen 4 anyway).

TVM's own ``dot_16x4_vnni`` declares the intrinsic with 32-bit lanes, which the LLVM bundled with
TVM 0.27 refuses; these pass byte vectors as LLVM 22 expects.
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
            quad = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
            acc[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                "int32x16", "llvm.x86.avx512.vpdpbusd.512", acc.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(quad, 16), dtype="int8x64"), w.vload([0, 0], dtype="int8x64"))

    @T.prim_func(s_tir=True)
    def impl4(a: T.Buffer((4,), "uint8", offset_factor=1), w: T.Buffer((32,), "int8", offset_factor=1),
              acc: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(acc[0:16], a[0:4], w[0:32])
            T.writes(acc[0:16])
            quad = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
            x = T.reinterpret(T.broadcast(quad, 8), dtype="int8x32")
            packed = w.vload([0], dtype="int8x32")
            four = T.broadcast(T.int8(4), 32)
            acc[T.ramp(T.int32(0), 1, 8)] = T.call_llvm_pure_intrin(
                "int32x8", "llvm.x86.avx512.vpdpbusd.256", acc.vload([0], dtype="int32x8"), x,
                T.shift_right(T.shift_left(packed, four), four))
            acc[T.ramp(T.int32(8), 1, 8)] = T.call_llvm_pure_intrin(
                "int32x8", "llvm.x86.avx512.vpdpbusd.256", acc.vload([8], dtype="int32x8"), x,
                T.shift_right(packed, four))

    return (desc8, impl8) if weight_bits == 8 else (desc4, impl4)
