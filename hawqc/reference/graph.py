"""The integer graph: a plain, serialisable program of integer operations.

Float enters once (``quantize``) and leaves once (``dequantize``); in between every tensor is an
integer tensor (int32 values) and every rescale is a ``requantize`` by a dyadic number. The same
graph runs on numpy (:mod:`hawqc.reference.kernels`, the golden model) and on torch (the PyTorch
integer simulation); both walk it with :func:`execute`.

Operations (inputs -> output; ``attrs`` are JSON values, ``consts`` numpy arrays):

================  ==============================================================================
quantize          float -> int: ``clip(rint(float64(float32(x)) / scale) + zero_point, qmin, qmax)``
conv2d            int x int -> int32 accumulator, + int32 bias (consts: weight OIHW, bias;
                  attrs: stride, padding [top, left, bottom, right], dilation, groups, pad_value)
dense             int x int -> int32 accumulator, + int32 bias (consts: weight [out, in], bias)
requantize        dyadic rescale and clip (consts: b, c, scalar or per channel, optional offset;
                  attrs: qmin, qmax, input_zero_point, zero_point)
add               elementwise sum of its inputs, + zero_point, clipped (attrs: qmin, qmax); with
                  consts ``m`` (int64, a row per input, per channel or scalar) and ``c``: inputs of
                  different scales, ``requantize(sum((x_i - z_i) * m_i) + offset, 1, c)`` rounded once
                  (:func:`hawqc.quant.dyadic.aligned_multipliers`; optional ``offset``, int64 per channel:
                  the bias fractions of accumulator inputs; attrs: input_zero_points, tie_window:
                  :func:`hawqc.quant.dyadic.tie_window`, input_bounds: each input's ``|x| + |z|`` where one is
                  an accumulator)
concat            along the channel axis (attrs: axis, default 1)
clip              clip to [qmin, qmax]: ReLU on integers
maxpool           attrs: kernel, stride, padding [top, left, bottom, right], ceil_mode (extra bottom/right
                  padding by :func:`ceil_mode_padding`)
avgpool           window sum (padding counts as the input zero point), then rescaled by ratio/(kh*kw), or
                  ratio/divisor[h, w] with ``m`` of shape (OH, OW) where the divisor differs by position
                  (count_include_pad=0, ceil_mode), rounded once exactly: ``requantize((sum - z * kh*kw) * m,
                  1, c)`` (:func:`pool_consts`; consts: m (int64), c; attrs: qmin, qmax, input_zero_point,
                  zero_point, tie_window)
global_avgpool    sum over H and W, then rescaled like avgpool by input_scale/(scale*H*W), the constants made for
                  the input's H*W by :func:`pool_consts`; keeps dims (N, C, 1, 1) (attrs: qmin, qmax, input_scale,
                  scale (default 1), input_bound, input_zero_point, zero_point)
lut               ``table[x - offset]``: an element-wise function on integers (consts: table, int32;
                  attrs: offset, the smallest input value)
threshold         an activation of a conv's real output, quantized: ``base + #{acc > up} + #{acc < down}`` per
                  channel (:mod:`hawqc.quant.thresholds`; consts: base (C,), up (C, Lu), down (C, Ld), int32;
                  attrs: qmin, qmax)
mul               ``requantize((a - a_zero_point) * (b - b_zero_point))``, broadcasting (consts: b, c;
                  attrs: qmin, qmax, a_zero_point, b_zero_point, zero_point)
pad               constant padding (attrs: pads [top, left, bottom, right], pad_value)
flatten           (N, ...) -> (N, -1)
reshape           attrs: shape
transpose         attrs: perm
slice             attrs: begin, end, strides (one entry per axis of ``axes``, default every axis;
                  normalised, strides > 0)
affine            per-channel ``(x - input_zero_point) * multiplier + bias`` -> int32 accumulator (consts:
                  multiplier, bias, int32, per channel or scalar): BatchNormalization, Mul/Add by constants
resize            along H and W: nearest, ``x[:, :, iy[0]][..., ix[0]]``; linear (consts wy, wx),
                  ``sum_a sum_b wy[a, i] * wx[b, j] * (x[iy[a, i], ix[b, j]] - input_zero_point)`` -> int32
                  accumulator (consts: iy, ix (k, out) indices; wy, wx (2, out) integer weights)
float_op          one ONNX operator computed in float, where a quantizer left it (attrs: onnx_op, onnx_attrs,
                  arity; consts: input<k> for constant inputs); see :mod:`hawqc.reference.float_kernels`.
                  A ``quantize`` after it has ``internal``: its input is already in the module's layout (and
                  float64: islands compute in float64); a float tail's last op has ``float32_output``
dequantize        int -> float32: ``float32(q - zero_point) * scale`` (consts: scale); with attrs ``float64``, a float
                  island's input, in float64
================  ==============================================================================

Zero points (attrs, default 0) exist for asymmetric tensors that other tools produce; hawqc's own
quantization is symmetric. A convolution over an input with zero point ``z`` pads with ``z`` and
carries ``-z * sum(w)`` in its bias, so its accumulator is exactly ``sum((x - z) * w)``.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from hawqc.fileio import write_atomic

FORMAT_VERSION = 3
"""3: an ``add`` may carry a per-channel ``offset`` (an accumulator read on its exact grid); 2: average pools
carry the exact multipliers of :func:`pool_consts` (1: 31-bit dyadic ratios)."""
OPS = ("quantize", "conv2d", "dense", "requantize", "add", "concat", "clip", "maxpool", "avgpool",
       "global_avgpool", "lut", "threshold", "mul", "pad", "flatten", "reshape", "transpose", "slice", "affine", "resize",
       "float_op", "dequantize")

Kernel = Callable[[list[Any], Mapping[str, Any], Mapping[str, Any]], Any]


@dataclass
class IntOp:
    """One operation: ``output = op(*inputs)`` with attributes and constant arrays."""

    op: str
    inputs: list[str]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class IntegerGraph:
    """An integer-only program with one float input and one float output."""

    input: str
    output: str
    ops: list[IntOp]
    metadata: dict[str, Any] = field(default_factory=dict)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run the golden model on a float input batch; returns the dequantized float32 output."""
        from hawqc.reference.kernels import KERNELS

        return execute(self, np.asarray(x), KERNELS)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write one ``.npz`` file (a JSON header plus the constants), atomically."""
        header = {"format_version": FORMAT_VERSION, "input": self.input, "output": self.output,
                  "metadata": self.metadata,
                  "ops": [{"op": o.op, "inputs": o.inputs, "output": o.output, "attrs": o.attrs,
                           "consts": sorted(o.consts)} for o in self.ops]}
        arrays = {f"{i}/{k}": v for i, o in enumerate(self.ops) for k, v in o.consts.items()}
        buffer = io.BytesIO()
        np.savez(buffer, __header__=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
        write_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> IntegerGraph:
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(bytes(data["__header__"]).decode())
                arrays = {k: data[k] for k in data.files if k != "__header__"}
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as err:  # empty, cut, not a zip
            raise ValueError(f"{path}: not an integer graph file ({err})") from None
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: integer graph format {header.get('format_version')} is not supported")
        unknown = sorted({o["op"] for o in header["ops"]} - set(OPS))
        if unknown:
            raise ValueError(f"{path}: unknown integer operations {', '.join(unknown)} (a newer hawqc wrote it?)")
        ops = [IntOp(o["op"], o["inputs"], o["output"], o["attrs"], {k: arrays[f"{i}/{k}"] for k in o["consts"]})
               for i, o in enumerate(header["ops"])]
        return cls(header["input"], header["output"], ops, header["metadata"])


def rescale_op(src: str, dst: str, s_in: Any, s_w: Any, s_out: Any, qmin: int, qmax: int,
               input_zero_point: int = 0, zero_point: int = 0, fraction: Any = None, exact_w: bool = False) -> IntOp:
    """A ``requantize`` from scale ``s_in * s_w`` (``s_w`` per channel for an accumulator, 1 for a
    tensor) to ``s_out``, its dyadic numbers from :mod:`hawqc.quant.dyadic`; ``fraction``: what the
    accumulator holds below its integer grid (per channel, see :func:`~hawqc.quant.dyadic.bias_in_accumulator`);
    ``exact_w``: ``s_w`` exact in float64 (:func:`~hawqc.quant.dyadic.scale_ratio`)."""
    from hawqc.quant.dyadic import dyadic_per_channel, exact_product, exact_requantization, fraction_offset, scale_ratio

    b, c = dyadic_per_channel(scale_ratio(s_in, s_w, s_out, exact_w))
    attrs = {"qmin": qmin, "qmax": qmax}
    attrs.update({k: v for k, v in (("input_zero_point", input_zero_point), ("zero_point", zero_point)) if v})
    offset = np.zeros(b.shape, np.int64) if fraction is None else np.broadcast_to(fraction_offset(fraction, b), b.shape)
    w = np.asarray(s_w, np.float64) if exact_w else np.asarray(np.asarray(s_w, np.float32), np.float64)
    num, den = (exact_product(np.asarray(np.asarray(s, np.float32), np.float64), v) for s, v in ((s_in, w), (s_out, 1.0)))
    ratios = list(np.broadcast_to(num / den, b.shape).ravel())
    b, offset = exact_requantization(ratios, fraction, b, c, offset, qmin - zero_point, qmax - zero_point)
    consts = {"b": b.astype(np.int32), "c": c}
    if np.any(offset):
        consts["offset"] = offset.copy()
    return IntOp("requantize", [src], dst, attrs, consts)


ACCUMULATOR_HEADROOM = 8
"""How far past the Add's output range an accumulator it reads is kept (beyond, it saturates)."""


def accumulator_grid_bits(qmin: int, qmax: int, zero_point: int = 0) -> int:
    """An accumulator that an Add reads and that :func:`aligned_add_ops` cannot take as it is (one clipped by a
    ReLU before the Add) is first requantized (fused into its conv) onto a grid ``2^k`` times finer than the
    Add's output, in int32, with ``k`` the largest for which ``ACCUMULATOR_HEADROOM`` times the output's range
    fits: 20 at 8 bits, 24 at 4 bits. The sum is then rounded once, off only within ``2^-(k+1)`` steps of a tie."""
    reach = ACCUMULATOR_HEADROOM * max(abs(qmin - zero_point), abs(qmax - zero_point), 1)
    return ((2**31 - 1) // reach).bit_length() - 1


def pool_grid_bits(qmin: int, qmax: int, zero_point: int, window: int, one_sided: bool) -> int:
    """An accumulator that an average pool reads before any QuantizeLinear (ONNX Runtime's operator form pooling
    DenseNet's last BatchNorm + ReLU) is first requantized onto a grid ``2^k`` times finer than the pool's output,
    in int32, with ``k`` the largest for which ``window`` times the output's range (plus one step) fits, times
    ``ACCUMULATOR_HEADROOM`` unless a ReLU keeps every cell on one side of 0: a cell clipped there alone makes
    the window's mean saturate, so clipping it changes nothing. The pool is then rounded once, off only within
    ``2^-(k+1)`` steps of a tie."""
    reach = window * (max(abs(qmin - zero_point), abs(qmax - zero_point)) + 1)
    return ((2**31 - 1) // (reach if one_sided else ACCUMULATOR_HEADROOM * reach)).bit_length() - 1


def accumulator_bound(weight: np.ndarray, lo: int, hi: int, bias: Any = 0) -> int:
    """The largest ``|acc|`` of a conv/dense accumulator ``sum(w * x) + bias`` (``weight`` [out, ...]) over
    inputs ``x`` in ``[lo, hi]``."""
    w = np.asarray(weight, np.int64).reshape(np.shape(weight)[0], -1)
    pos, neg = np.clip(w, 0, None).sum(axis=1), np.clip(w, None, 0).sum(axis=1)
    b = np.broadcast_to(np.asarray(bias, np.int64), pos.shape)
    top, bottom = pos * hi + neg * lo + b, pos * lo + neg * hi + b
    return int(max(np.abs(top).max(initial=0), np.abs(bottom).max(initial=0)))


@dataclass(frozen=True)
class AddInput:
    """An input of an :func:`aligned_add_op`: a tensor, its scale (exact in float64: a float32 scale or
    the product of two, per channel for an accumulator), zero point and a bound on ``|x| + |zero_point|``
    (not only ``|x - zero_point|``: the compiler may regroup ``(x - z) * m`` as ``x * m - z * m``, whose
    int64 terms must not overflow either). ``fraction``: a constant per channel, in units of ``scale``, that the
    input carries beside its integers (a conv bias below its accumulator's grid, as
    :func:`hawqc.quant.dyadic.bias_in_accumulator` gives it). ``accumulator``: a conv's int32 accumulator, which
    :func:`aligned_add_ops` clips where it can no longer change the result."""

    name: str
    scale: Any
    zero_point: int
    magnitude: int
    fraction: Any = None
    accumulator: bool = False


def aligned_add_ops(parts: list[AddInput], dst: str, s_out: Any, qmin: int, qmax: int, zero_point: int = 0) -> list[IntOp]:
    """An Add that reads conv accumulators as they are: each clipped (a ``requantize`` by exactly 1, fused into
    its conv) to the bound past which its term saturates the output whatever the other inputs hold, then the
    :func:`aligned_add_op` of every input on one int64 grid, the real sum (bias fractions included) rounded
    once. Clipping one term to ``B_i = reach + 2 + sum_{j != i} M_j`` output steps (``M_j`` the largest term
    of input ``j`` unclipped) keeps the sum beyond the output's range whenever it was, so it is exact."""
    from hawqc.quant.dyadic import dyadic

    terms = [(p.magnitude + 1) * float(np.max(np.asarray(p.scale, np.float64))) / float(np.float32(s_out)) for p in parts]
    reach = max(abs(qmin - zero_point), abs(qmax - zero_point))
    b, c = dyadic(1.0)
    ops, inputs = [], []
    for j, p in enumerate(parts):
        if p.accumulator:
            smallest = float(np.min(np.asarray(p.scale, np.float64))) / float(np.float32(s_out))
            bound = (reach + 2 + sum(terms) - terms[j]) / smallest + 1
            clip = int(min(p.magnitude, 2**31 - 1, math.ceil(bound)))
            ops.append(IntOp("requantize", [p.name], f"{dst}:in{j}", {"qmin": -clip, "qmax": clip},
                             {"b": np.array(b, np.int32), "c": np.array(c, np.int32)}))
            p = replace(p, name=f"{dst}:in{j}", magnitude=clip)
        inputs.append(p)
    return [*ops, aligned_add_op(inputs, dst, s_out, qmin, qmax, zero_point)]


def aligned_add_op(parts: list[AddInput], dst: str, s_out: Any, qmin: int, qmax: int, zero_point: int = 0) -> IntOp:
    """An ``add`` that rounds the real sum of its inputs once onto the grid of ``s_out``: the inputs meet
    on an int64 grid ``2^c`` times finer (:func:`hawqc.quant.dyadic.aligned_multipliers`), their
    ``fraction`` constants as one per-channel ``offset`` on that grid."""
    from hawqc.quant.dyadic import aligned_multipliers, exact_product, tie_window

    scales, magnitudes = [p.scale for p in parts], [p.magnitude for p in parts]
    constants = [exact_product(p.fraction, p.scale) for p in parts if p.fraction is not None and np.any(p.fraction)]
    if constants:  # one term of magnitude 1: the constants' sum, per channel
        scales.append(sum(constants[1:], constants[0]))
        magnitudes.append(1)
    multipliers, c = aligned_multipliers(scales, s_out, magnitudes)
    channels = max(m.size for m in multipliers)
    attrs: dict[str, Any] = {"qmin": qmin, "qmax": qmax}
    if window := tie_window(scales, s_out, magnitudes, multipliers, c):
        attrs["tie_window"] = window
    if zero_point:
        attrs["zero_point"] = zero_point
    if any(p.zero_point for p in parts):
        attrs["input_zero_points"] = [p.zero_point for p in parts]
    if any(p.accumulator for p in parts):  # ranges beyond 8 bits: for the uint8 storage pass
        attrs["input_bounds"] = [int(p.magnitude) for p in parts]
    consts = {"c": np.array(c, np.int32)}
    if constants:
        consts["offset"] = np.broadcast_to(multipliers.pop(), (channels,)).copy()
    consts["m"] = np.stack([np.broadcast_to(v, (channels,)) if channels > 1 else v for v in multipliers])
    return IntOp("add", [p.name for p in parts], dst, attrs, consts)


def lut_op(src: str, dst: str, fn: Any, in_range: tuple[int, int], in_scale: Any, s_out: Any, qmin: int, qmax: int,
           input_zero_point: int = 0, zero_point: int = 0) -> IntOp:
    """A ``lut`` of the element-wise function ``fn`` (float64) on an integer tensor of scale ``in_scale`` holding
    values in ``in_range``, quantized to ``s_out`` (:func:`hawqc.quant.dyadic.function_table`)."""
    from hawqc.quant.dyadic import function_table

    table = function_table(fn, *in_range, in_scale, input_zero_point, s_out, zero_point, qmin, qmax)
    return IntOp("lut", [src], dst, {"offset": in_range[0]}, {"table": table})


def product_op(a: str, b: str, dst: str, s_a: Any, s_b: Any, s_out: Any, qmin: int, qmax: int,
               a_zero_point: int = 0, b_zero_point: int = 0, zero_point: int = 0) -> IntOp:
    """A ``mul`` of two integer tensors rescaled once to ``s_out`` by the dyadic number of ``s_a * s_b / s_out``."""
    from hawqc.quant.dyadic import dyadic_per_channel, scale_ratio

    bb, c = dyadic_per_channel(scale_ratio(s_a, s_b, s_out))
    attrs = {"qmin": qmin, "qmax": qmax}
    attrs.update({k: v for k, v in (("a_zero_point", a_zero_point), ("b_zero_point", b_zero_point),
                                    ("zero_point", zero_point)) if v})
    return IntOp("mul", [a, b], dst, attrs, {"b": bb, "c": c})


def batch_norm_affine(gamma: Any, beta: Any, mean: Any, var: Any, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(gain, offset)`` per channel (float64) of an inference BatchNormalization with these parameters (their
    exact values: float32 numbers, or dequantized constants that float32 cannot hold, as ONNX Runtime's quantizer
    leaves a shared scale) and ``epsilon``: ``gain * x + offset``."""
    gamma, beta, mean, var = (np.asarray(v, np.float64) for v in (gamma, beta, mean, var))
    gain = gamma / np.sqrt(var + float(eps))
    return gain, beta - mean * gain


def affine_op(src: str, dst: str, gain: Any, offset: Any, s_in: Any, s_w: Any, reach: int,
              input_zero_point: int = 0) -> tuple[IntOp, np.ndarray, np.ndarray]:
    """``gain * x + offset`` per channel (float64) on an integer tensor or accumulator of scale ``s_in * s_w``
    (``s_w`` 1 for a tensor; ``|x - input_zero_point| <= reach``) as an ``affine`` op giving an int32
    accumulator of scale ``s_in * s_w * |gain|``: ``(x - z) * sign(gain) + whole`` where ``offset / (s_in * s_w *
    |gain|) = whole + fraction``. Returns the op, that accumulator's ``s_w * |gain|`` (exact in float64) and the
    fraction (carried below its grid like a conv bias's). ``ValueError`` if the offset overflows int32."""
    gain = np.asarray(gain, np.float64)
    magnitude = np.where(gain == 0, 1.0, np.abs(gain))
    s_w = np.asarray(s_w, np.float64) * magnitude
    units = np.asarray(offset, np.float64) / (np.float64(s_in) * s_w)
    whole = np.rint(units)
    if reach + np.abs(whole).max() > 2**31 - 1:
        raise ValueError("its constant offset does not fit the int32 accumulator at this scale")
    attrs = {"input_zero_point": input_zero_point} if input_zero_point else {}
    op = IntOp("affine", [src], dst, attrs, {"multiplier": np.sign(gain).astype(np.int32),
                                             "bias": whole.astype(np.int32)})
    return op, s_w, units - whole


def ceil_mode_padding(size: Any, kernel: list[int], stride: list[int], padding: list[int]) -> list[int]:
    """Pooling with ``ceil_mode`` as extra bottom/right padding ([top, left, bottom, right] of an (H, W)
    input): the output has ``ceil((n + pads - k) / s) + 1`` rows, less one if the last window would
    start in the padding (PyTorch's and ONNX Runtime's rule)."""
    extra = []
    for n, k, s, lo, hi in zip([int(d) for d in size], kernel, stride, padding[:2], padding[2:]):
        out = -(-(n + lo + hi - k) // s) + 1
        if (out - 1) * s >= n + lo:
            out -= 1
        extra.append(max(0, (out - 1) * s + k - (n + lo + hi)))
    return [padding[0], padding[1], padding[2] + extra[0], padding[3] + extra[1]]


def slices(attrs: Mapping[str, Any], ndim: int) -> tuple[slice, ...]:
    """A ``slice`` op's index: begin/end/strides on its ``axes`` (default every axis), the others whole."""
    index = [slice(None)] * ndim
    for axis, begin, end, stride in zip(attrs.get("axes", range(ndim)), attrs["begin"], attrs["end"], attrs["strides"]):
        index[axis] = slice(begin, end, stride)
    return tuple(index)


def pool_padding(attrs: Mapping[str, Any], size: Any) -> list[int]:
    """A max pool's padding of an (H, W) input: its own, extended where it has ``ceil_mode``."""
    if not attrs.get("ceil_mode"):
        return list(attrs["padding"])
    return ceil_mode_padding(size, attrs["kernel"], attrs["stride"], list(attrs["padding"]))


def conv_output_size(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                     padding: tuple[int, int, int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a conv2d output; ``padding`` is [top, left, bottom, right]."""
    top, left, bottom, right = padding
    return tuple((n + lo + hi - d * (k - 1) - 1) // s + 1  # type: ignore[return-value]
                 for n, k, s, d, lo, hi in zip(size, kernel, stride, dilation, (top, left), (bottom, right)))


def pool_consts(s_in: Any, s_out: Any, divisors: Any, input_bound: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The consts (``m``, ``c``) and attrs (``tie_window`` where there is one) of an ``avgpool`` or
    ``global_avgpool`` that rescales its window sums by ``s_in / (s_out * divisor)`` exactly, for inputs with
    ``|x| + |input_zero_point| <= input_bound`` (:func:`hawqc.quant.dyadic.pool_multipliers`)."""
    from hawqc.quant.dyadic import pool_multipliers

    m, c, window = pool_multipliers(s_in, s_out, divisors, int(np.max(divisors)) * input_bound)
    return {"m": m, "c": np.array(c, np.int32)}, ({"tie_window": window} if window else {})


def pool_rescale(attrs: Mapping[str, Any], consts: Mapping[str, Any], window: int) -> tuple[Any, Any, int, int, int]:
    """``(m, c, input offset, output zero point, tie window)`` that turn the sum of a pooling window of
    ``window`` cells into the output: ``requantize((sum - offset) * m, 1, c, zero_point=..., tie_window=...)``
    (:func:`pool_consts`), the offset being ``window`` times the input zero point."""
    if "m" not in consts:  # a global pool: the constants of its input's H*W
        consts, extra = pool_consts(attrs["input_scale"], attrs.get("scale", 1.0), window, attrs["input_bound"])
        attrs = {**attrs, **extra}
    return (consts["m"], consts["c"], window * attrs.get("input_zero_point", 0), attrs.get("zero_point", 0),
            attrs.get("tie_window", 0))


def execute(graph: IntegerGraph, x: Any, kernels: Mapping[str, Kernel], trace: dict[str, Any] | None = None) -> Any:
    """Walk the graph once with the given kernels (numpy or torch); returns the output value.
    With ``trace``, every intermediate value is left in it, by tensor name."""
    values = trace if trace is not None else {}
    values[graph.input] = x
    for op in graph.ops:
        values[op.output] = kernels[op.op]([values[i] for i in op.inputs], op.attrs, op.consts)
    return values[graph.output]
