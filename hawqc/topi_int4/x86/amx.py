"""The conv kernel's accumulation on Intel AMX tiles (``tdpbusd``: 16 rows x 16 int32 += 16 x 64 uint8 . 64 x 16 int8).

A row of output pixels (two rows where they are 16 pixels or fewer: :class:`Tiling`) against a block of :data:`BLOCK`
output channels is one tensor intrinsic: per pair of A tiles (each pixel's 64 input channels of one kernel tap, rows
``stride`` pixels apart)
and the block's two 16-channel weight tiles (B: the packed weights ``[OC/16, KH, KW, IC/4, 16, 4]`` as they are,
64 bytes a row), four accumulator tiles (C) zeroed, summed over every tap and 64-channel chunk, stored to the row
buffer: 8 tile registers. Input channels come in whole chunks of 64 (the input copy pads them with zeros). The
kernel's int32 row buffer then goes through the same epilogue as the VNNI kernel's (:mod:`.conv2d`).

A process must ask Linux for the tile state before the first AMX instruction
(:func:`hawqc.runtime.threads.request_amx`). Each call puts back the thread's tile configuration as it found it
(none, or another library's): ONNX Runtime's AMX kernels load theirs once per thread and stop with an illegal
instruction on tiles shaped by anyone else.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

CHUNK = 64
"""Input channels (bytes) per tile row."""
BLOCK = 32
"""Output channels per intrinsic: two 16-channel B tiles."""
MAX_ROWS = 16
"""Rows of a tile."""


def tile_rows(width: int) -> int:
    """Pixels per A tile for an output row of ``width`` over 16: the fewest pairs of tiles that hold the row, then
    the smallest tiles that do (the fewest columns computed past its end)."""
    pairs = -(-width // (2 * MAX_ROWS))
    return -(-width // (2 * pairs))


@dataclass(frozen=True)
class Tiling:
    """How an intrinsic covers output rows ``width`` pixels wide: ``lines`` rows of ``pixels`` (whole tiles, some
    columns past the row's end) in A tiles of ``rows`` pixels. Rows of up to 16 pixels: two rows, a tile each."""

    width: int

    @property
    def lines(self) -> int:
        return 2 if self.width <= MAX_ROWS else 1

    @property
    def rows(self) -> int:
        return self.width if self.lines == 2 else tile_rows(self.width)

    @property
    def pixels(self) -> int:
        return -(-self.width // (2 * self.rows)) * 2 * self.rows if self.lines == 1 else self.width

    @property
    def efficiency(self) -> float:
        """The share of the tiles' rows that compute pixels of the output."""
        return self.width / (self.pixels * MAX_ROWS / self.rows)


def pixel_grid(pixels: int) -> tuple[int, int]:
    """Rows and width to lay out ``pixels`` (a pointwise conv's, the batch's included) in: the width of at most
    64 dividing them whose tiles waste the fewest rows, the widest of those."""
    width = max((w for w in range(1, 4 * MAX_ROWS + 1) if pixels % w == 0), key=lambda w: (Tiling(w).efficiency, w))
    return pixels // width, width


@cache
def intrinsic_name(width: int, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
                   span: int) -> str:
    """Register (once) the intrinsic for :class:`Tiling` ``(width)``'s rows x :data:`BLOCK` channels over a ``kernel``
    of taps, ``span`` input channels; its name."""
    from tvm.s_tir import TensorIntrin

    name = "hawqc_amx_" + "_".join(f"{k}{v}" for k, v in (("w", width), ("k", kernel), ("s", stride),
                                                          ("d", dilation), ("c", span))).replace(" ", "")
    TensorIntrin.register(name, *_intrinsic(Tiling(width), kernel, stride, dilation, span), override=True)
    return name


def _intrinsic(tiling: Tiling, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
               span: int) -> tuple[Any, Any]:
    from tvm.script import tirx as T

    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    lines, pixels, m = tiling.lines, tiling.pixels, tiling.rows
    rows, cols = (lines - 1) * sh + (kh - 1) * dh + 1, (pixels - 1) * sw + (kw - 1) * dw + 1
    per_line, chunks = pixels // m, span // CHUNK
    i8 = T.int8
    # the compute has no axis of extent 1: one line, rows of one pixel, kernels of one tap
    used = [lines > 1, pixels > 1, True, kh > 1, kw > 1, True]
    kinds = "".join(kind for kind, use in zip("SSSRRR", used) if use)

    def axes(*loops: Any) -> list[Any]:
        return [loop for loop, use in zip(loops, used) if use]

    def operands(a: Any, w: Any, v: list[Any]) -> tuple[Any, Any, list[Any]]:
        """The activation and weight an output ``(line, pixel, channel)`` multiplies at a tap and input channel; its
        indices."""
        vr, vp, vo, vry, vrx, vrc = (v.pop(0) if use else 0 for use in used)
        return (a[vr * sh + vry * dh, vp * sw + vrx * dw, vrc], w[vo // 16, vry, vrx, vrc // 4, vo % 16, vrc % 4],
                [vr, vp, vo])

    @T.macro
    def update(a: Any, w: Any, c: Any, r: Any, p: Any, o: Any, ry: Any, rx: Any, rc: Any) -> None:
        with T.sblock("update"):
            v = T.meta_var(T.axis.remap(kinds, axes(r, p, o, ry, rx, rc)))
            x, y, i = T.meta_var(operands(a, w, list(v)))
            T.reads(c[i[0], i[1], i[2]], x, y)
            T.writes(c[i[0], i[1], i[2]])
            with T.init():
                c[i[0], i[1], i[2]] = 0
            c[i[0], i[1], i[2]] = c[i[0], i[1], i[2]] + T.Cast("int32", x) * T.Cast("int32", y)

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((rows, cols, span), "uint8", offset_factor=1),
             w: T.Buffer((BLOCK // 16, kh, kw, span // 4, 16, 4), "int8", offset_factor=1),
             c: T.Buffer((lines, pixels, BLOCK), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(a[0:rows, 0:cols, 0:span], w[0:BLOCK // 16, 0:kh, 0:kw, 0:span // 4, 0:16, 0:4])
            T.writes(c[0:lines, 0:pixels, 0:BLOCK])
            if lines > 1:
                for r, p, o, ry, rx, rc in T.grid(lines, pixels, BLOCK, kh, kw, span):
                    update(a, w, c, r, p, o, ry, rx, rc)
            else:
                for p, o, ry, rx, rc in T.grid(pixels, BLOCK, kh, kw, span):
                    update(a, w, c, 0, p, o, ry, rx, rc)

    @T.prim_func(s_tir=True)
    def impl(a_handle: T.handle, w_handle: T.handle, c_handle: T.handle) -> None:
        sa0, sa1, sc0, sc1 = T.int32(), T.int32(), T.int32(), T.int32()
        a = T.match_buffer(a_handle, (rows, cols, span), "uint8", strides=[sa0, sa1, 1], offset_factor=1)
        w = T.match_buffer(w_handle, (BLOCK // 16, kh, kw, span // 4, 16, 4), "int8", offset_factor=1)
        c = T.match_buffer(c_handle, (lines, pixels, BLOCK), "int32", strides=[sc0, sc1, 1], offset_factor=1)
        with T.sblock("root"):
            T.reads(a[0:rows, 0:cols, 0:span], w[0:BLOCK // 16, 0:kh, 0:kw, 0:span // 4, 0:16, 0:4])
            T.writes(c[0:lines, 0:pixels, 0:BLOCK])
            config = T.alloc_buffer((64,), "uint8")
            caller = T.alloc_buffer((64,), "uint8")  # the thread's tile configuration, restored at the end
            for i in range(64):  # every byte written here, so that TVM keeps all 64 of each buffer
                config[i] = T.uint8(0)
                caller[i] = T.uint8(0)
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.sttilecfg", T.address_of(caller[0])))
            config[0] = T.uint8(1)  # palette 1; tiles 0-3 C, 4-5 A (m rows of 64 bytes), 6-7 B (16 rows)
            for t in range(8):
                config[16 + 2 * t] = T.uint8(64)
                config[48 + t] = T.uint8(16 if t >= 6 else m)
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(config[0])))
            for pair in range(lines * per_line // 2):  # tile 2 * pair + t: line (2 * pair + t) // per_line
                for t in T.unroll(4):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", i8(t)))
                for ry, rx, kc in T.grid(kh, kw, chunks):
                    for t in T.unroll(2):
                        T.evaluate(T.call_llvm_intrin(
                            "void", "llvm.x86.tileloadd64", i8(4 + t),
                            T.address_of(a[(2 * pair + t) // per_line * sh + ry * dh,
                                           (2 * pair + t) % per_line * m * sw + rx * dw, kc * CHUNK]),
                            T.int64(sa1 * sw)))
                    for t in T.unroll(2):
                        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", i8(6 + t),
                                                      T.address_of(w[t, ry, rx, kc * 16, 0, 0]), T.int64(64)))
                    for t in T.unroll(4):
                        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", i8(t), i8(4 + t // 2), i8(6 + t % 2)))
                for t in T.unroll(4):
                    T.evaluate(T.call_llvm_intrin(
                        "void", "llvm.x86.tilestored64", i8(t),
                        T.address_of(c[(2 * pair + t // 2) // per_line, (2 * pair + t // 2) % per_line * m, t % 2 * 16]),
                        T.int64(sc1 * 4)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(caller[0])))

    return desc, impl
