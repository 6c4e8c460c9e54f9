"""numpy kernels of the integer graph: the golden model, written to be read.

Integer tensors are int32 arrays. Convolutions and matrix products multiply integers in float64
through BLAS: every product and partial sum is an integer below 2^53, so the result is exact
(checked per call), and it is much faster than numpy's integer matmul.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from hawqc.quant.dyadic import requantize
from hawqc.quant.thresholds import count_thresholds
from hawqc.reference.float_kernels import float_op
from hawqc.reference.graph import pool_padding, pool_rescale, slices

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_EXACT = 2**53


def _int32(x: np.ndarray, what: str) -> np.ndarray:
    if x.size and (x.min() < INT32_MIN or x.max() > INT32_MAX):
        raise ValueError(f"{what}: int32 accumulator overflow")
    return x.astype(np.int32)


def _exact_product_bound(x: np.ndarray, w: np.ndarray, depth: int, what: str) -> None:
    bound = depth * (int(np.abs(x).max(initial=0)) * int(np.abs(w).max(initial=0)))
    if bound >= _EXACT:
        raise ValueError(f"{what}: integer products too large to evaluate exactly ({bound})")


def _pad_nchw(x: np.ndarray, pads: list[int], value: int) -> np.ndarray:
    top, left, bottom, right = pads
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=value)


def _windows(x: np.ndarray, kernel: list[int], stride: list[int], dilation: tuple[int, int] = (1, 1)) -> np.ndarray:
    """(N, C, OH, OW, KH, KW) view of the windows of an already padded NCHW tensor."""
    kh, kw = (kernel[0] - 1) * dilation[0] + 1, (kernel[1] - 1) * dilation[1] + 1
    view = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, :: stride[0], :: stride[1]]
    return view[..., :: dilation[0], :: dilation[1]]


def quantize(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    # x / scale as QuantizeLinear means it: the float32 input, or a float island's float64 value
    x = np.asarray(inputs[0], dtype=np.float64 if attrs.get("internal") else np.float32).astype(np.float64)
    q = np.rint(x / consts["scale"].astype(np.float32).astype(np.float64)) + attrs.get("zero_point", 0)
    return np.clip(q, attrs["qmin"], attrs["qmax"]).astype(np.int32)


def dequantize(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    q = inputs[0]
    dtype = np.float64 if attrs.get("float64") else np.float32
    scale = consts["scale"].astype(dtype)
    if scale.ndim == 1:  # per channel, channels on axis 1
        scale = scale.reshape((1, -1) + (1,) * (q.ndim - 2))
    return (q.astype(np.int64) - attrs.get("zero_point", 0)).astype(dtype) * scale


def conv2d(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    x, w = _pad_nchw(inputs[0], attrs["padding"], attrs.get("pad_value", 0)), consts["weight"]
    groups = attrs["groups"]
    out_ch, in_per_group, kh, kw = w.shape
    _exact_product_bound(x, w, in_per_group * kh * kw, "conv2d")
    windows = _windows(x, [kh, kw], attrs["stride"], tuple(attrs["dilation"]))  # N, C, OH, OW, KH, KW
    outs = []
    for g in range(groups):
        cols = windows[:, g * in_per_group:(g + 1) * in_per_group].astype(np.float64)
        wg = w[g * out_ch // groups:(g + 1) * out_ch // groups].astype(np.float64)
        outs.append(np.einsum("ncijkl,ockl->noij", cols, wg, optimize=True))
    acc = np.rint(np.concatenate(outs, axis=1)).astype(np.int64)
    if "bias" in consts:
        acc += consts["bias"].astype(np.int64).reshape(1, -1, 1, 1)
    return _int32(acc, "conv2d")


def dense(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    x, w = inputs[0], consts["weight"]
    _exact_product_bound(x, w, w.shape[1], "dense")
    acc = np.rint(x.astype(np.float64) @ w.astype(np.float64).T).astype(np.int64)
    if "bias" in consts:
        acc += consts["bias"].astype(np.int64)
    return _int32(acc, "dense")


def requantize_op(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    per_channel = consts["b"].ndim == 1
    return requantize(inputs[0], consts["b"], consts["c"], attrs["qmin"], attrs["qmax"], axis=1 if per_channel else None,
                      input_zero_point=attrs.get("input_zero_point", 0), zero_point=attrs.get("zero_point", 0),
                      offset=consts.get("offset", 0))


def add(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    if "m" not in consts:  # inputs already on the output grid
        total = sum(x.astype(np.int64) for x in inputs) + attrs.get("zero_point", 0)
        return np.clip(total, attrs["qmin"], attrs["qmax"]).astype(np.int32)
    zero_points = attrs.get("input_zero_points", [0] * len(inputs))
    total = sum((x.astype(np.int64) - z) * _per_channel(m, x.ndim) for x, z, m in zip(inputs, zero_points, consts["m"]))
    if "offset" in consts:  # the inputs' bias fractions, on the common grid
        total = total + _per_channel(consts["offset"], inputs[0].ndim)
    return requantize(total, 1, consts["c"], attrs["qmin"], attrs["qmax"], zero_point=attrs.get("zero_point", 0),
                      tie_window=attrs.get("tie_window", 0))


def concat(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate(inputs, axis=attrs.get("axis", 1))


def clip(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.clip(inputs[0], attrs["qmin"], attrs["qmax"]).astype(np.int32)


def maxpool(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    x = _pad_nchw(inputs[0], pool_padding(attrs, inputs[0].shape[2:]), INT32_MIN)
    return _windows(x, attrs["kernel"], attrs["stride"]).max(axis=(-2, -1)).astype(np.int32)


def avgpool(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    kernel = attrs["kernel"]
    x = _pad_nchw(inputs[0], attrs["padding"], attrs.get("input_zero_point", 0)).astype(np.int64)
    return _pooled(_windows(x, kernel, attrs["stride"]).sum(axis=(-2, -1)), attrs, consts, kernel[0] * kernel[1])


def global_avgpool(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    x = inputs[0]
    return _pooled(x.astype(np.int64).sum(axis=(2, 3), keepdims=True), attrs, consts, x.shape[2] * x.shape[3])


def _pooled(sums: np.ndarray, attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray], window: int) -> np.ndarray:
    m, c, offset, zp, tie = pool_rescale(attrs, consts, window)
    return requantize((sums - offset) * np.asarray(m, np.int64), 1, c, attrs["qmin"], attrs["qmax"], zero_point=zp,
                      tie_window=tie)


def lut(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    return consts["table"][inputs[0].astype(np.int64) - attrs["offset"]]


def threshold(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    acc = inputs[0]
    shape = (1, -1) + (1,) * (acc.ndim - 2)
    rows = np.arange(consts["base"].shape[0]).reshape(shape)
    up, down = consts["up"], consts["down"]
    counted = count_thresholds(acc, consts["base"].reshape(shape), (up.ravel(), rows * up.shape[1], up.shape[1]),
                               (down.ravel(), rows * down.shape[1], down.shape[1]))
    return np.broadcast_to(counted, acc.shape).astype(np.int32)


def mul(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    a = inputs[0].astype(np.int64) - attrs.get("a_zero_point", 0)
    b = inputs[1].astype(np.int64) - attrs.get("b_zero_point", 0)
    return requantize(a * b, consts["b"], consts["c"], attrs["qmin"], attrs["qmax"], zero_point=attrs.get("zero_point", 0))


def pad(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    return _pad_nchw(inputs[0], attrs["pads"], attrs.get("pad_value", 0))


def flatten(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    return inputs[0].reshape(inputs[0].shape[0], -1)


def reshape(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    return inputs[0].reshape(attrs["shape"])


def transpose(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(inputs[0], attrs["perm"]))


def slice_op(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    return inputs[0][slices(attrs, inputs[0].ndim)]


def _per_channel(a: np.ndarray, ndim: int) -> np.ndarray:
    return a.astype(np.int64).reshape((1, -1) + (1,) * (ndim - 2)) if a.ndim == 1 else a.astype(np.int64)


def affine(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    x = inputs[0].astype(np.int64) - attrs.get("input_zero_point", 0)
    ndim = x.ndim
    return _int32(x * _per_channel(consts["multiplier"], ndim) + _per_channel(consts["bias"], ndim), "affine")


def resize(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    x, iy, ix = inputs[0], consts["iy"], consts["ix"]
    if "wy" not in consts:  # nearest
        return x[:, :, iy[0]][:, :, :, ix[0]]
    x = x.astype(np.int64) - attrs.get("input_zero_point", 0)
    rows = sum(consts["wy"][a].astype(np.int64)[:, None] * x[:, :, iy[a], :] for a in range(len(iy)))
    return _int32(sum(consts["wx"][b].astype(np.int64) * rows[:, :, :, ix[b]] for b in range(len(ix))), "resize")


KERNELS = {"quantize": quantize, "conv2d": conv2d, "dense": dense, "requantize": requantize_op, "add": add,
           "concat": concat, "clip": clip, "maxpool": maxpool, "avgpool": avgpool,
           "global_avgpool": global_avgpool, "lut": lut, "threshold": threshold, "mul": mul, "pad": pad, "flatten": flatten, "reshape": reshape,
           "transpose": transpose, "slice": slice_op, "affine": affine, "resize": resize, "float_op": float_op,
           "dequantize": dequantize}
