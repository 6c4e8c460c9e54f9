"""The AVX-512 VNNI dot product as TIR tensor intrinsics: 16 int32 lanes += 4 activation bytes x 16x4 weights.

``vpdpbusd`` multiplies *unsigned* bytes by signed bytes. Two descriptions cover hawqc's activations:

- ``hawqc_vnni_u8``: uint8 activations, used as they are;
- ``hawqc_vnni_s8``: int8 activations, computed as ``(x + 128) * w`` by flipping the sign bit
  (``x ^ 0x80`` is ``x + 128`` as a byte); the kernel subtracts ``128 * sum(w)`` per output channel
  in its epilogue, so the result stays exact.

TVM's own ``dot_16x4_vnni`` declares the intrinsic with 32-bit lanes, which the LLVM bundled with
TVM 0.27 refuses; these pass ``<64 x i8>`` operands as LLVM 22 expects.
"""

from __future__ import annotations

from functools import cache

VNNI_U8, VNNI_S8 = "hawqc_vnni_u8", "hawqc_vnni_s8"
LANES, GROUP = 16, 4
"""Output channels per instruction, input channels per lane."""


@cache
def register() -> None:
    """Register both intrinsics with TVM (once per process)."""
    from tvm.s_tir import TensorIntrin

    for name, signed in ((VNNI_U8, False), (VNNI_S8, True)):
        TensorIntrin.register(name, *_intrinsic(signed), override=True)


def _intrinsic(signed: bool) -> tuple:
    from tvm.script import tirx as T

    dtype = "int8" if signed else "uint8"
    offset = 128 if signed else 0
    flip = -0x7F7F7F80 if signed else 0  # 0x80808080 as int32: the sign bit of each byte

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), dtype, offset_factor=1), w: T.Buffer((16, 4), "int8", offset_factor=1),
             acc: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(acc[0:16], a[0:4], w[0:16, 0:4])
            T.writes(acc[0:16])
            for i, k in T.grid(16, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    acc[vi] = acc[vi] + (T.cast(a[vk], "int32") + offset) * T.cast(w[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((4,), dtype, offset_factor=1), w: T.Buffer((16, 4), "int8", offset_factor=1),
             acc: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(acc[0:16], a[0:4], w[0:16, 0:4])
            T.writes(acc[0:16])
            quad = T.bitwise_xor(T.reinterpret(a.vload([0], dtype + "x4"), dtype="int32"), flip)
            acc[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                "int32x16", "llvm.x86.avx512.vpdpbusd.512", acc.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(quad, 16), dtype="int8x64"), w.vload([0, 0], dtype="int8x64"))

    return desc, impl
