"""torch kernels of the integer graph: the PyTorch integer simulation.

Same operations and rounding as :mod:`hawqc.reference.kernels`, computed with torch's own
convolution and pooling (in float64, exact for these integer ranges) so that the two
implementations check each other. Integer tensors are int32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hawqc.quant.dyadic import requantize
from hawqc.reference.graph import pool_padding, pool_rescale, slices

Consts = Mapping[str, np.ndarray]


def _t(a: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def _pad(x: torch.Tensor, pads: list[int], value: float) -> torch.Tensor:
    top, left, bottom, right = pads
    return F.pad(x, (left, right, top, bottom), value=value)


def quantize(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    x = torch.as_tensor(inputs[0]).to(torch.float32).to(torch.float64)
    q = torch.round(x / _t(consts["scale"].astype(np.float32))) + attrs.get("zero_point", 0)
    return q.clamp(attrs["qmin"], attrs["qmax"]).to(torch.int32)


def dequantize(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    q = inputs[0]
    scale = _t(consts["scale"], torch.float32)
    if scale.dim() == 1:
        scale = scale.reshape((1, -1) + (1,) * (q.dim() - 2))
    return (q.to(torch.int64) - attrs.get("zero_point", 0)).to(torch.float32) * scale


def _with_bias(acc: torch.Tensor, consts: Consts, shape: tuple[int, ...]) -> torch.Tensor:
    acc = torch.round(acc).to(torch.int64)
    if "bias" in consts:
        acc = acc + _t(consts["bias"], torch.int64).reshape(shape)
    if acc.numel() and (acc.min() < -(2**31) or acc.max() > 2**31 - 1):
        raise ValueError("int32 accumulator overflow")
    return acc.to(torch.int32)


def conv2d(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    x = _pad(inputs[0].to(torch.float64), attrs["padding"], float(attrs.get("pad_value", 0)))
    acc = F.conv2d(x, _t(consts["weight"]), stride=attrs["stride"], dilation=attrs["dilation"], groups=attrs["groups"])
    return _with_bias(acc, consts, (1, -1, 1, 1))


def dense(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    return _with_bias(F.linear(inputs[0].to(torch.float64), _t(consts["weight"])), consts, (1, -1))


def requantize_op(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    per_channel = consts["b"].ndim == 1
    return requantize(inputs[0], consts["b"], consts["c"], attrs["qmin"], attrs["qmax"], axis=1 if per_channel else None,
                      input_zero_point=attrs.get("input_zero_point", 0), zero_point=attrs.get("zero_point", 0),
                      offset=consts.get("offset", 0))


def add(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    if "m" not in consts:  # inputs already on the output grid
        total = sum(x.to(torch.int64) for x in inputs) + attrs.get("zero_point", 0)
        return total.clamp(attrs["qmin"], attrs["qmax"]).to(torch.int32)
    zero_points = attrs.get("input_zero_points", [0] * len(inputs))
    total = sum((x.to(torch.int64) - z) * _t(m.reshape([1, -1] + [1] * (x.dim() - 2)) if m.ndim else m, torch.int64)
                for x, z, m in zip(inputs, zero_points, consts["m"]))
    if "offset" in consts:  # the inputs' bias fractions, on the common grid
        total = total + _t(consts["offset"].reshape([1, -1] + [1] * (inputs[0].dim() - 2)), torch.int64)
    return requantize(total, 1, consts["c"], attrs["qmin"], attrs["qmax"], zero_point=attrs.get("zero_point", 0),
                      tie_window=attrs.get("tie_window", 0))


def concat(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    return torch.cat(inputs, dim=1)


def clip(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    return inputs[0].clamp(attrs["qmin"], attrs["qmax"])


def maxpool(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    x = _pad(inputs[0].to(torch.float64), pool_padding(attrs, inputs[0].shape[2:]), float("-inf"))
    return F.max_pool2d(x, attrs["kernel"], attrs["stride"]).to(torch.int32)


def avgpool(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    kernel = attrs["kernel"]
    x = _pad(inputs[0].to(torch.float64), attrs["padding"], float(attrs.get("input_zero_point", 0)))
    sums = torch.round(F.avg_pool2d(x, kernel, attrs["stride"], divisor_override=1)).to(torch.int64)
    return _pooled(sums, attrs, consts, kernel[0] * kernel[1])


def global_avgpool(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    x = inputs[0]
    return _pooled(x.to(torch.int64).sum(dim=(2, 3), keepdim=True), attrs, consts, x.shape[2] * x.shape[3])


def _pooled(sums: torch.Tensor, attrs: Mapping[str, Any], consts: Consts, window: int) -> torch.Tensor:
    m, c, offset, zp, tie = pool_rescale(attrs, consts, window)
    m = torch.as_tensor(np.asarray(m, np.int64), device=sums.device)
    return requantize((sums - offset) * m, 1, c, attrs["qmin"], attrs["qmax"], zero_point=zp, tie_window=tie)


def lut(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    return _t(consts["table"], torch.int32)[inputs[0].to(torch.int64) - attrs["offset"]]


def mul(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    a = inputs[0].to(torch.int64) - attrs.get("a_zero_point", 0)
    b = inputs[1].to(torch.int64) - attrs.get("b_zero_point", 0)
    return requantize(a * b, consts["b"], consts["c"], attrs["qmin"], attrs["qmax"], zero_point=attrs.get("zero_point", 0))


def pad(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    return _pad(inputs[0], attrs["pads"], attrs.get("pad_value", 0))


def flatten(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    return inputs[0].flatten(1)


def reshape(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    return inputs[0].reshape(attrs["shape"])


def transpose(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    return inputs[0].permute(*attrs["perm"]).contiguous()


def slice_op(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    return inputs[0][slices(attrs, inputs[0].ndim)].contiguous()


def _per_channel(a: np.ndarray, ndim: int) -> torch.Tensor:
    t = _t(a, torch.int64)
    return t.reshape((1, -1) + (1,) * (ndim - 2)) if t.dim() == 1 else t


def _int32(x: torch.Tensor) -> torch.Tensor:
    if x.numel() and (x.min() < -(2**31) or x.max() > 2**31 - 1):
        raise ValueError("int32 accumulator overflow")
    return x.to(torch.int32)


def affine(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    x = inputs[0].to(torch.int64) - attrs.get("input_zero_point", 0)
    return _int32(x * _per_channel(consts["multiplier"], x.dim()) + _per_channel(consts["bias"], x.dim()))


def resize(inputs: list[Any], attrs: Mapping[str, Any], consts: Consts) -> torch.Tensor:
    x, iy, ix = inputs[0], _t(consts["iy"], torch.int64), _t(consts["ix"], torch.int64)
    if "wy" not in consts:  # nearest
        return x[:, :, iy[0]][:, :, :, ix[0]]
    x = x.to(torch.int64) - attrs.get("input_zero_point", 0)
    wy, wx = _t(consts["wy"], torch.int64), _t(consts["wx"], torch.int64)
    rows = sum(wy[a][:, None] * x[:, :, iy[a], :] for a in range(len(iy)))
    return _int32(sum(wx[b] * rows[:, :, :, ix[b]] for b in range(len(ix))))


KERNELS = {"quantize": quantize, "conv2d": conv2d, "dense": dense, "requantize": requantize_op, "add": add,
           "concat": concat, "clip": clip, "maxpool": maxpool, "avgpool": avgpool,
           "global_avgpool": global_avgpool, "lut": lut, "mul": mul, "pad": pad, "flatten": flatten, "reshape": reshape,
           "transpose": transpose, "slice": slice_op, "affine": affine, "resize": resize, "dequantize": dequantize}
