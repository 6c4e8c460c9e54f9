"""The conv kernel's accumulation on Intel AMX tiles (``tdpbusd``: 16 rows x 16 int32 += 16 x 64 uint8 . 64 x 16 int8).

A row of output pixels against a block of :data:`BLOCK` output channels is one tensor intrinsic: per pair of
``pixels``-row tiles of the row (A: each pixel's 64 input channels of one kernel tap, rows ``stride`` pixels apart)
and the block's two 16-channel weight tiles (B: the packed weights ``[OC/16, KH, KW, IC/4, 16, 4]`` as they are,
64 bytes a row), four accumulator tiles (C) zeroed, summed over every tap and 64-channel chunk, stored to the row
buffer: 8 tile registers. Input channels come in whole chunks of 64 (the input copy pads them with zeros). The
kernel's int32 row buffer then goes through the same epilogue as the VNNI kernel's (:mod:`.conv2d`).

A process must ask Linux for the tile state before the first AMX instruction
(:func:`hawqc.runtime.threads.request_amx`).
"""

from __future__ import annotations

from functools import cache
from typing import Any

CHUNK = 64
"""Input channels (bytes) per tile row."""
BLOCK = 32
"""Output channels per intrinsic: two 16-channel B tiles."""
MAX_ROWS = 16
"""Rows of a tile."""


def tile_rows(width: int) -> int:
    """Pixels per A tile for an output row of ``width``: the fewest pairs of tiles that hold the row, then the
    smallest tiles that do (the fewest columns computed past its end)."""
    pairs = -(-width // (2 * MAX_ROWS))
    return -(-width // (2 * pairs))


def row_pixels(width: int) -> int:
    """Pixels of an output row of ``width`` computed in whole pairs of :func:`tile_rows` tiles."""
    m = tile_rows(width)
    return -(-width // (2 * m)) * 2 * m


@cache
def intrinsic_name(pixels: int, kernel: tuple[int, int], stride: int, dilation: tuple[int, int], span: int) -> str:
    """Register (once) the intrinsic for a row of ``pixels`` output pixels (whole pairs of tiles) x :data:`BLOCK`
    channels over a ``kernel`` of taps, columns ``stride`` apart, ``span`` input channels; its name."""
    from tvm.s_tir import TensorIntrin

    name = f"hawqc_amx_{pixels}_{kernel[0]}x{kernel[1]}_s{stride}_d{dilation[0]}x{dilation[1]}_c{span}"
    TensorIntrin.register(name, *_intrinsic(pixels, kernel, stride, dilation, span), override=True)
    return name


def _intrinsic(pixels: int, kernel: tuple[int, int], stride: int, dilation: tuple[int, int], span: int) -> tuple[Any, Any]:
    from tvm.script import tirx as T

    (kh, kw), (dh, dw) = kernel, dilation
    rows, cols = (kh - 1) * dh + 1, (pixels - 1) * stride + (kw - 1) * dw + 1
    m = tile_rows(pixels)
    pairs, chunks = pixels // (2 * m), span // CHUNK
    i8 = T.int8

    taps = [extent > 1 for extent in (kh, kw)]  # the compute has no axis for a kernel dimension of 1
    kinds = "SS" + "R" * sum(taps) + "R"

    def axes(p: Any, o: Any, ry: Any, rx: Any, rc: Any) -> list[Any]:
        return [p, o, *(v for v, tap in zip((ry, rx), taps) if tap), rc]

    def operands(a: Any, w: Any, v: list[Any]) -> tuple[Any, Any]:
        vp, vo, *vr, vrc = v
        vry, vrx = (vr.pop(0) if tap else 0 for tap in taps)
        return a[vry * dh, vp * stride + vrx * dw, vrc], w[vo // 16, vry, vrx, vrc // 4, vo % 16, vrc % 4]

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((rows, cols, span), "uint8", offset_factor=1),
             w: T.Buffer((BLOCK // 16, kh, kw, span // 4, 16, 4), "int8", offset_factor=1),
             c: T.Buffer((pixels, BLOCK), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(a[0:rows, 0:cols, 0:span], w[0:BLOCK // 16, 0:kh, 0:kw, 0:span // 4, 0:16, 0:4])
            T.writes(c[0:pixels, 0:BLOCK])
            for p, o, ry, rx, rc in T.grid(pixels, BLOCK, kh, kw, span):
                with T.sblock("update"):
                    v = T.meta_var(T.axis.remap(kinds, axes(p, o, ry, rx, rc)))
                    x, y = T.meta_var(operands(a, w, v))
                    T.reads(c[v[0], v[1]], x, y)
                    T.writes(c[v[0], v[1]])
                    with T.init():
                        c[v[0], v[1]] = 0
                    c[v[0], v[1]] = c[v[0], v[1]] + T.Cast("int32", x) * T.Cast("int32", y)

    @T.prim_func(s_tir=True)
    def impl(a_handle: T.handle, w_handle: T.handle, c_handle: T.handle) -> None:
        sa0, sa1, sc0 = T.int32(), T.int32(), T.int32()
        a = T.match_buffer(a_handle, (rows, cols, span), "uint8", strides=[sa0, sa1, 1], offset_factor=1)
        w = T.match_buffer(w_handle, (BLOCK // 16, kh, kw, span // 4, 16, 4), "int8", offset_factor=1)
        c = T.match_buffer(c_handle, (pixels, BLOCK), "int32", strides=[sc0, 1], offset_factor=1)
        with T.sblock("root"):
            T.reads(a[0:rows, 0:cols, 0:span], w[0:BLOCK // 16, 0:kh, 0:kw, 0:span // 4, 0:16, 0:4])
            T.writes(c[0:pixels, 0:BLOCK])
            config = T.alloc_buffer((64,), "uint8")
            for i in range(64):
                config[i] = T.uint8(0)
            config[0] = T.uint8(1)  # palette 1; tiles 0-3 C, 4-5 A (m rows of 64 bytes), 6-7 B (16 rows)
            for t in range(8):
                config[16 + 2 * t] = T.uint8(64)
                config[48 + t] = T.uint8(16 if t >= 6 else m)
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(config[0])))
            for pair in range(pairs):
                for t in T.unroll(4):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", i8(t)))
                for ry, rx, kc in T.grid(kh, kw, chunks):
                    for t in T.unroll(2):
                        T.evaluate(T.call_llvm_intrin(
                            "void", "llvm.x86.tileloadd64", i8(4 + t),
                            T.address_of(a[ry * dh, (2 * pair + t) * m * stride + rx * dw, kc * CHUNK]),
                            T.int64(sa1 * stride)))
                    for t in T.unroll(2):
                        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", i8(6 + t),
                                                      T.address_of(w[t, ry, rx, kc * 16, 0, 0]), T.int64(64)))
                    for t in T.unroll(4):
                        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", i8(t), i8(4 + t // 2), i8(6 + t % 2)))
                for t in T.unroll(4):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", i8(t),
                                                  T.address_of(c[(2 * pair + t // 2) * m, t % 2 * 16]), T.int64(sc0 * 4)))

    return desc, impl
