"""The model input's quantize and its move to NHWC in one pass: float32 NCHW in, 8-bit NHWC out.

TVM lowers the transpose of a few-channel image (``C`` = 3) to a vector loop over the row whose stores,
``C`` bytes apart, become one scalar store per element (ResNet-18 at batch 8, 2 threads: 1.4 ms, 5% of the
model; this kernel: 0.5 ms). Here each step quantizes 16 pixels of every channel, ``clip(rint(x / scale) +
zero_point)`` in float64 (:func:`hawqc.reference.kernels.quantize`'s rule), and interleaves the ``C``
vectors into ``16 C`` contiguous bytes with one shuffle; the rest of a row (its width mod 16) pixel by
pixel. Both tensors are read flat; the input assumes no more alignment than a float's, so a call reads the
caller's array in place (:attr:`hawqc.runtime.module.CompiledModule.input_in_place`).
"""

from __future__ import annotations

from typing import Any

LANES = 16
NAME = "quantize_nhwc"
"""The kernel's function name in the lowered module (TVM may add a numeric suffix)."""
MAX_CHANNELS = 4
"""Images: the kernel runs where the input has at most this many channels (one shuffle of their vectors)."""


def quantize_nhwc(channels: int, height: int, width: int, scale: float, zero_point: int, qmin: int, qmax: int,
                  out_dtype: str) -> Any:
    """The PrimFunc ``(x, out)`` over flat tensors of any batch: ``x`` NCHW float32, ``out`` NHWC
    ``out_dtype``, ``out = clip(rint(float64(x) / scale) + zero_point, qmin, qmax)``."""
    from tvm.script import tirx as T

    plane, steps, rest = height * width, width // LANES, width % LANES

    def quantized(value: Any, lanes: int) -> Any:
        def f64(v: float) -> Any:
            return T.float64(v) if lanes == 1 else T.Broadcast(T.float64(v), lanes)
        q = T.nearbyint(T.Cast("float64" if lanes == 1 else f"float64x{lanes}", value) / f64(scale))
        q = T.max(T.min(q + f64(zero_point), f64(qmax)), f64(qmin))
        return T.Cast(out_dtype if lanes == 1 else f"{out_dtype}x{lanes}", q)

    def source(row: Any, c: int, w: Any) -> Any:
        """Flat index of pixel ``w`` of channel ``c`` on row ``row`` (image ``row // height``)."""
        return (row // height * channels + c) * plane + row % height * width + w

    @T.macro
    def quantize_row(x: Any, out: Any, row: Any) -> None:
        for k in T.serial(steps):
            with T.sblock("vector"):
                T.reads(x[source(row, 0, 0): source(row, channels - 1, width)])
                T.writes(out[(row * width + k * LANES) * channels: (row * width + k * LANES + LANES) * channels])
                out[T.ramp((row * width + k * LANES) * channels, 1, LANES * channels)] = T.Shuffle(
                    [quantized(x[T.ramp(source(row, c, k * LANES), 1, LANES)], LANES) for c in range(channels)],
                    [c * LANES + w for w in range(LANES) for c in range(channels)])
        for t in T.serial(rest * channels):
            with T.sblock("tail"):
                T.reads(x[source(row, 0, 0): source(row, channels - 1, width)])
                T.writes(out[(row * width + steps * LANES) * channels + t])
                out[(row * width + steps * LANES) * channels + t] = quantized(
                    x[source(row, t % channels, steps * LANES + t // channels)], 1)

    @T.prim_func(private=True, s_tir=True)
    def quantize(x_handle: T.handle, out_handle: T.handle) -> None:
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        size = T.int64()
        x = T.match_buffer(x_handle, (size,), "float32", align=4)  # the caller's array, read in place
        out = T.match_buffer(out_handle, (size,), out_dtype)
        for row in T.parallel(size // T.int64(channels * width)):
            quantize_row(x, out, row)

    return quantize
