"""Read an ONNX QDQ model into an :class:`~hawqc.reference.IntegerGraph`.

The reader walks the graph once, keeping float-side values symbolic until a ``QuantizeLinear``
fixes their integer form:

- ``DequantizeLinear`` of an integer tensor is a *view* (integer tensor + scale); of an initializer,
  a constant (weights per channel, int32 biases);
- ``Conv``/``Gemm``/``MatMul`` of views and constants give an *accumulator* (int32, scale
  ``S_in * S_w``); ``Relu``/``Clip`` on it narrow the clip bounds of its requantization;
- ``Add``/``Concat`` collect their inputs; at the ``QuantizeLinear`` each input of a Concat is
  requantized to the output scale by its own dyadic number; the inputs of an Add meet on an int64
  grid about 2^50 times finer than the output (exactly, for integer tensors; accumulators first
  requantized onto a grid 2^20 times finer, 2^24 at 4 bits) and their sum is rounded once;
- ``MaxPool``/``AveragePool``/``GlobalAveragePool``/``Flatten``/``Relu`` on a view are integer ops;
- element-wise non-linearities between a DQ and a Q (Sigmoid, Tanh, HardSigmoid, HardSwish,
  LeakyRelu, Elu, Gelu, and ``x * sigmoid(x)``) become an exact lookup table over the input's
  integer range (256 entries at 8 bits, 16 at 4), computed from the float function and both scales;
  on a conv's accumulator (NNCF) a count of per-channel thresholds (:mod:`hawqc.quant.thresholds`);

Activation zero points (asymmetric uint8/int8, as ONNX Runtime's ``quantize_static`` writes by
default) are carried exactly: a convolution over an input with zero point ``z`` pads with ``z`` and
folds ``-z * sum(w)`` into its int32 bias; requantizations subtract the input zero point and add
the output one. Weight zero points must be 0. Anything unsupported fails with one error naming
the node.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import numpy as np

from hawqc.frontend.onnx_model import (
    QLINEAR_OPS,
    QUANTIZATION_OPS,
    evaluate_constant,
    fold_constants,
    integer_tensors,
    load_onnx,
    static_shapes,
    with_input_shape,
)
from hawqc.quant.dyadic import bias_in_accumulator, scale_ratio
from hawqc.quant.elementwise import ELEMENTWISE
from hawqc.quant.resize import NEAREST_MODES, TRANSFORMS, float_resize_consts, resize_consts
from hawqc.quant.thresholds import activation_thresholds
from hawqc.reference.float_kernels import FLOAT_OPS
from hawqc.reference.graph import (
    AddInput,
    IntegerGraph,
    IntOp,
    accumulator_bound,
    accumulator_grid_bits,
    affine_op,
    aligned_add_ops,
    batch_norm_affine,
    ceil_mode_padding,
    lut_op,
    pool_consts,
    pool_grid_bits,
    product_op,
    rescale_op,
)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT16_MAX = 2**15 - 1
FINE_STEPS = 16
"""A grid no QuantizeLinear fixes (an add or concat of different grids, a per-channel activation's first,
per-tensor rounding) is 16 times finer than the finest it holds."""


class Unquantized(ValueError):
    """A node reads a float tensor that no QuantizeLinear rounded (a float region the quantizer left):
    ``node`` is the ONNX node's name (its first output's where it has none)."""

    def __init__(self, message: str, node: str) -> None:
        super().__init__(message)
        self.node = node


class _StandIn(Exception):
    """A shape traced through the stand-in of a node this reading refused (its output, computed in float only
    by the next reading): the reading ends there."""


CALIBRATE_HINT = "; give calibration inputs (--calib-data, calib_data=) and hawqc quantizes it"


@dataclass
class _View:
    """An integer tensor seen as float: ``name`` in the integer graph, times ``scale``."""

    name: str
    scale: np.float32
    qmin: int
    qmax: int
    zero_point: int = 0


@dataclass
class _Const:
    values: np.ndarray
    scale: np.ndarray


@dataclass
class _Acc:
    """An int32 accumulator of a conv/dense: scale ``s_in * s_w`` per channel, clip bounds in float."""

    name: str
    s_in: np.float32
    s_w: np.ndarray
    lo: float = -np.inf
    hi: float = np.inf
    fraction: np.ndarray | None = None
    """The bias below the accumulator's integer grid, per channel (see ``bias_in_accumulator``)."""
    exact_w: bool = False
    """``s_w`` is exact in float64 (an affine map's gain), not a float32 scale."""
    bound: int | None = None
    """The largest ``|acc|`` (a conv's or dense layer's, from its weights and input range)."""


@dataclass
class _Float:
    """A float tensor: the output of an operator computed in float (a float island or tail)."""

    name: str


@dataclass
class _Pending:
    """An add, concat or average pool of views/accumulators, resolved by the QuantizeLinear that
    follows (whose scale it is rescaled to in one rounding)."""

    kind: str
    parts: list[Any]
    lo: float = -np.inf
    hi: float = np.inf
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Reader:
    model: Any
    ops: list[IntOp] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    """Static tensor shapes from ONNX shape inference (after constants are folded)."""
    open_shapes: dict[str, list[int | None]] = field(default_factory=dict)
    """Shapes whose only unknown is the batch (``None``), for operators that need the others only."""
    input: str = ""
    trace: dict[str, Any] = field(default_factory=dict)
    """The integer graph read so far run on zeros, for shapes that shape inference leaves open."""
    float_nodes: list[str] = field(default_factory=list)
    """The ONNX nodes computed in float, as ``name (op)``."""
    dequantized_from: dict[str, str] = field(default_factory=dict)
    viewed: dict[str, _View] = field(default_factory=dict)
    """Pending values (pools, concats, adds) made integer tensors by :meth:`_Reader.view`, by ONNX tensor."""
    fine_views: dict[tuple[str, float, float], _View] = field(default_factory=dict)
    """Accumulators read before any QuantizeLinear, on their fine grid (``accumulator_view``)."""
    in_float: set[str] = field(default_factory=set)
    """ONNX nodes (by name) computed in float because they read a tensor no QuantizeLinear rounded."""
    producers: dict[str, str] = field(default_factory=dict)
    """ONNX tensor -> the name of the node that writes it."""
    integer_tensors: set[str] = field(default_factory=set)
    """The ONNX tensors that hold integers in the file (:func:`integer_tensors`)."""
    stand_ins: set[str] = field(default_factory=set)
    """Outputs of the nodes this reading refused, read on as float tensors that no op computes."""

    def fail(self, node: Any, why: str) -> None:
        raise ValueError(f"ONNX node {node.name or node.op_type!r} ({node.op_type}): {why}")

    def unquantized(self, node: Any, why: str) -> NoReturn:
        """Fail at a node that reads a tensor no QuantizeLinear rounded."""
        raise Unquantized(f"ONNX node {node.name or node.op_type!r} ({node.op_type}): {why}{CALIBRATE_HINT}",
                          node.name or node.output[0])

    def const_array(self, name: str) -> np.ndarray:
        if name not in self.inits:
            raise ValueError(f"ONNX tensor {name!r} must be a constant initializer")
        return self.inits[name]

    def zero_point(self, node: Any) -> int:
        """The (per-tensor) zero point of a QuantizeLinear/DequantizeLinear, 0 if absent."""
        if len(node.input) < 3 or not node.input[2]:
            return 0
        zp = self.const_array(node.input[2])
        if zp.size != 1 and np.any(zp != zp.flat[0]):
            self.fail(node, "per-channel zero points are not supported")
        return int(zp.flat[0])

    def emit(self, op: str, inputs: list[str], output: str, attrs: dict[str, Any] | None = None,
             consts: dict[str, np.ndarray] | None = None) -> str:
        self.ops.append(IntOp(op, inputs, output, attrs or {}, consts or {}))
        return output

    def rescale(self, value: Any, dst: str, scale_out: np.float32, lo: int, hi: int,
                zero_point: int = 0) -> tuple[int, int]:
        """Requantize a view or accumulator to ``scale_out`` (and ``zero_point``), clipped to [lo, hi];
        returns the bounds."""
        if isinstance(value, _Acc):
            lo = max(lo, _bound(value.lo, scale_out, zero_point, "lo"))
            hi = min(hi, _bound(value.hi, scale_out, zero_point, "hi"))
            op = rescale_op(value.name, dst, value.s_in, value.s_w, scale_out, lo, hi, zero_point=zero_point,
                            fraction=value.fraction, exact_w=value.exact_w)
        else:
            op = rescale_op(value.name, dst, value.scale, np.float32(1.0), scale_out, lo, hi, value.zero_point,
                            zero_point)
        self.ops.append(op)
        return lo, hi

    # ---- node handlers ------------------------------------------------------------------------
    def quantize_linear(self, node: Any) -> None:
        constant = self.float_const(node.input[0])
        if constant is not None:  # a dequantized constant quantized again (exporters share equal weights)
            self.inits[node.output[0]] = self.quantized_constant(node, constant)
            return
        zp = self.zero_point(node)
        scale = np.asarray(self.const_array(node.input[1]), dtype=np.float32)
        if scale.size > 1:
            return self.quantize_per_channel(node, scale)
        scale = np.float32(scale.reshape(()))
        qmin, qmax = _qrange(self.model, node, self.inits)
        src, out = self.values[node.input[0]], node.output[0]
        if isinstance(src, (str, _Float)):
            self.quantize_float(src, out, scale, zp, qmin, qmax)
        elif isinstance(src, _Acc):
            qmin, qmax = self.rescale(src, out, scale, qmin, qmax, zp)
        elif isinstance(src, _View):
            if np.size(src.scale) == 1 and src.scale == scale and src.zero_point == zp and qmin <= src.qmin \
                    and src.qmax <= qmax:
                self.values[out] = src  # already on this grid
                return
            qmin, qmax = self.rescale(src, out, scale, qmin, qmax, zp)
        elif isinstance(src, _Pending):
            lo = max(qmin, _bound(src.lo, scale, zp, "lo"))
            hi = min(qmax, _bound(src.hi, scale, zp, "hi"))
            parts = [f"{out}:in{j}" for j in range(len(src.parts))]
            if src.kind in ("avgpool", "global_avgpool"):
                self.pool(src, out, scale, zp, lo, hi)
            elif src.kind == "lut":
                self.lut(src, out, scale, zp, lo, hi)
            elif src.kind == "mul":
                self.product(src, out, scale, zp, lo, hi)
            elif src.kind == "pad":
                self.quantized_pad(src, out, scale, zp, lo, hi)
            elif src.kind == "concat":
                for part, value in zip(parts, src.parts):
                    self.rescale(value, part, scale, lo, hi, zp)
                self.emit("concat", parts, out, dict(src.attrs))
            else:  # the real sum, rounded once
                self.aligned_add(node, src, out, scale, zp, lo, hi)
            qmin, qmax = lo, hi
        else:
            self.fail(node, "cannot quantize a constant")
        self.values[out] = _View(out, scale, qmin, qmax, zp)

    def quantized_constant(self, node: Any, value: np.ndarray) -> np.ndarray:
        """QuantizeLinear of a constant as the file means it (its float64 oracle): ``value / scale`` in float64
        (``value`` exact: a float32 number or a dequantized integer), rounded half to even, plus the zero point,
        saturated; per-channel scales along ``axis``. (A float32 division can round a quotient within 2^-24
        of a tie to it; ONNX Runtime computes so.)"""
        scale = np.asarray(self.const_array(node.input[1]), np.float32)
        zp = self.const_array(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        if scale.ndim == 1 and value.ndim > 1:
            shape = [1] * value.ndim
            shape[_axis(_attr(node, "axis", 1), value.ndim)] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        qmin, qmax = _qrange(self.model, node, self.inits)
        q = np.rint(value.astype(np.float64) / scale.astype(np.float64)).astype(np.int64) + zp.astype(np.int64)
        return np.clip(q, qmin, qmax).astype(zp.dtype)

    def quantize_per_channel(self, node: Any, scales: np.ndarray) -> None:
        """An activation quantized per channel (NNCF, on depthwise inputs), only read by depthwise convs: an
        accumulator or integer tensor requantized per channel in one rounding, if its clip bounds give the
        same integer bounds on every channel, an accumulator's activation counted against per-channel
        thresholds; else first per tensor onto an int16 grid finer than every
        channel's, then per channel."""
        from dataclasses import replace

        from onnx import helper

        out = node.output[0]
        shape = self.shapes.get(node.input[0]) or self.shapes.get(out)
        axis = _axis(_attr(node, "axis", 1), len(shape) if shape else 4)
        if axis != 1 or self.zero_point(node) != 0:
            self.fail(node, f"quantizes the tensor {node.input[0]!r}, computed from the input, per channel (axis "
                            f"{axis}) with zero points: hawqc reads per-channel activations on axis 1 with zero points 0")
        qmin, qmax = _qrange(self.model, node, self.inits)
        src = self.values[node.input[0]]
        if isinstance(src, _Pending) and src.kind == "lut" and isinstance(src.parts[0], _Acc) \
                and (src.lo, src.hi) == (-np.inf, np.inf):  # an activation of a conv: thresholds per channel
            self.lut(src, out, scales, 0, qmin, qmax)
            self.values[out] = _View(out, scales, qmin, qmax)
            return
        if isinstance(src, _Acc) or (isinstance(src, _View) and np.size(src.scale) == 1):
            clip = (src.lo, src.hi) if isinstance(src, _Acc) else (-np.inf, np.inf)
            lows = {max(qmin, _bound(clip[0], s, 0, "lo")) for s in scales}
            highs = {min(qmax, _bound(clip[1], s, 0, "hi")) for s in scales}
            if len(lows) == 1 and len(highs) == 1:
                unclipped = replace(src, lo=-np.inf, hi=np.inf) if isinstance(src, _Acc) else src
                lo, hi = self.rescale(unclipped, out, scales, lows.pop(), highs.pop())
                self.values[out] = _View(out, scales, lo, hi)
                return
        fine = np.float32(max(scales.min() / FINE_STEPS, scales.max() * 128 / INT16_MAX))
        self.inits[f"{out}:fine_scale"], self.inits[f"{out}:fine_zero"] = np.array(fine), np.array(0, np.int16)
        self.quantize_linear(helper.make_node("QuantizeLinear", [node.input[0], f"{out}:fine_scale", f"{out}:fine_zero"],
                                              [f"{out}:fine"], name=node.name))
        self.rescale(self.values[f"{out}:fine"], out, scales, qmin, qmax)
        self.values[out] = _View(out, scales, qmin, qmax)

    def aligned_add(self, node: Any, pending: _Pending, out: str, scale: np.float32, zp: int, lo: int, hi: int) -> None:
        """The real sum of the inputs rounded once: :func:`hawqc.reference.graph.aligned_add_ops`."""
        parts = []
        for j, value in enumerate(pending.parts):
            if isinstance(value, _Acc) and value.bound is not None and (value.lo, value.hi) == (-np.inf, np.inf):
                parts.append(AddInput(value.name, np.float64(value.s_in) * value.s_w.astype(np.float64), 0, value.bound,
                                      value.fraction, accumulator=True))  # read as it is
                continue
            if isinstance(value, _Acc):  # clipped: requantized (fused into its conv) onto a grid 2^20 (2^24) times finer
                fine = np.float32(scale / np.float32(2 ** accumulator_grid_bits(lo, hi, zp)))
                lo_j, hi_j = self.rescale(value, f"{out}:in{j}", fine, INT32_MIN, INT32_MAX)
                value = _View(f"{out}:in{j}", fine, lo_j, hi_j)
            parts.append(AddInput(value.name, np.float64(value.scale), value.zero_point,
                                  max(abs(value.qmin), abs(value.qmax)) + abs(value.zero_point)))
        self.ops.extend(aligned_add_ops(parts, out, scale, lo, hi, zp))

    def pool(self, pending: _Pending, out: str, scale: np.float32, zp: int, lo: int, hi: int) -> None:
        """An average pool rescaled straight to the output scale and zero point, exactly
        (:func:`~hawqc.reference.graph.pool_consts`). A pool of a concat of tensors on different grids is a
        concat of pools, each of one grid."""
        if len(pending.parts) > 1:
            parts = [f"{out}:in{j}" for j in range(len(pending.parts))]
            for part, src in zip(parts, pending.parts):
                self.pool(replace(pending, parts=[src], attrs={k: v for k, v in pending.attrs.items()
                                                               if k not in ("reshape", "concat")}), part, scale, zp, lo, hi)
            concat = f"{out}:pooled" if "reshape" in pending.attrs else out
            self.emit("concat", parts, concat, dict(pending.attrs["concat"].attrs))
            if concat != out:
                self.emit("reshape", [concat], out, {"shape": pending.attrs["reshape"]})
            return
        (src,) = pending.parts
        if isinstance(src, _Acc):
            src = self.fine_pool_input(pending, src, out, scale, zp, lo, hi)
        s_in = np.float64(np.float32(src.scale)) * pending.attrs.get("sum_of", 1)
        bound = max(abs(src.qmin), abs(src.qmax)) + abs(src.zero_point)
        reshape = pending.attrs.get("reshape")
        pooled = f"{out}:pooled" if reshape else out
        attrs = {**{k: v for k, v in pending.attrs.items() if k not in ("sum_of", "reshape", "divisor")},
                 "qmin": lo, "qmax": hi}
        attrs.update({k: v for k, v in (("input_zero_point", src.zero_point), ("zero_point", zp)) if v})
        consts = {}
        if pending.kind == "avgpool":  # one divisor, or one per output position (H, W)
            consts, tie = pool_consts(s_in, scale, pending.attrs.get("divisor", attrs["kernel"][0] * attrs["kernel"][1]),
                                      bound)
            attrs.update(tie)
        else:  # the divisor is the input's H*W
            attrs.update(input_scale=float(s_in), scale=float(scale), input_bound=bound)
        self.emit(pending.kind, [src.name], pooled, attrs, consts)
        if reshape:
            self.emit("reshape", [pooled], out, {"shape": reshape})

    def fine_pool_input(self, pending: _Pending, acc: _Acc, out: str, scale: np.float32, zp: int, lo: int,
                        hi: int) -> _View:
        """A conv's or affine map's output that an average pool reads before its QuantizeLinear, requantized
        onto a grid ``2^pool_grid_bits`` times finer than the pool's output (int32), so that the mean is rounded
        once, as the file means."""
        kernel = pending.attrs.get("kernel") or self.traced_shape(acc.name)[2:]
        bits = pool_grid_bits(lo, hi, zp, int(np.prod(kernel)), acc.lo >= 0 or acc.hi <= 0)
        fine = np.float32(scale / np.float32(2**bits))
        name = f"{out}:fine"
        fine_lo, fine_hi = self.rescale(acc, name, fine, INT32_MIN, INT32_MAX)
        return _View(name, fine, fine_lo, fine_hi)

    def view(self, node: Any, value: Any, per_channel: bool = False, tensor: str | None = None) -> _View:
        """``value`` (ONNX tensor ``tensor``, by default the node's first input) as an integer tensor; a pool
        not followed by a QuantizeLinear keeps its input scale. What this computes (a pool, a concat, a common
        grid) is computed once, whatever number of nodes read it. Tensors quantized per channel are refused
        unless ``per_channel`` (a depthwise conv reads them)."""
        tensor = node.input[0] if tensor is None else tensor
        if isinstance(value, _Pending):
            if tensor not in self.viewed:
                self.viewed[tensor] = self.pending_view(node, value, tensor)
            return self.viewed[tensor]
        if isinstance(value, _View) and np.size(value.scale) > 1 and not per_channel:
            self.fail(node, "reads an activation quantized per channel: hawqc reads those only into depthwise "
                            "convolutions")
        if isinstance(value, _Acc):
            return self.accumulator_view(value)
        if not isinstance(value, _View):
            self.unquantized(node, "input must be a dequantized tensor")
        return value

    def pending_view(self, node: Any, value: _Pending, tensor: str) -> _View:
        """A pool, concat or add that no QuantizeLinear rounds, as an integer tensor (see :meth:`view`)."""
        if value.kind in ("avgpool", "global_avgpool"):
            if len(value.parts) > 1:  # a pool of a concat of grids, not quantized: the concat on a common grid
                value = replace(value, parts=[self.view(node, value.attrs["concat"], tensor=f"{tensor}:of")],
                                attrs={k: v for k, v in value.attrs.items() if k != "concat"})
            src = self.pool_source(value.parts[0])
            name = f"{tensor}:pooled"
            self.pool(replace(value, parts=[src]), name, src.scale, src.zero_point, src.qmin, src.qmax)
            return _View(name, src.scale, src.qmin, src.qmax, src.zero_point)
        if value.kind == "concat" and all(
                isinstance(p, _View) and (p.scale, p.zero_point) == (value.parts[0].scale, value.parts[0].zero_point)
                for p in value.parts):  # a concat of tensors on one grid, not quantized again
            name = f"{tensor}:concat"
            self.emit("concat", [p.name for p in value.parts], name, dict(value.attrs))
            first = value.parts[0]
            return _View(name, first.scale, min(p.qmin for p in value.parts), max(p.qmax for p in value.parts),
                         first.zero_point)
        if value.kind in ("add", "concat") and all(
                isinstance(p, _Acc) or np.size(p.scale) == 1 for p in value.parts):
            return self.common_grid(tensor, value)
        self.unquantized(node, "input must be a dequantized tensor")

    def accumulator_view(self, acc: _Acc) -> _View:
        """A conv's or affine map's output (clipped by a ReLU/Clip or not) that an operator reads before any
        QuantizeLinear rounds it (PT2E's mean of a ReLU'd conv, ONNX Runtime's operator form pooling a
        ReLU'd BatchNorm): requantized once onto a grid ``FINE_STEPS`` times finer than its finest
        channel's, in int32, for every reader."""
        key = (acc.name, acc.lo, acc.hi)
        if key not in self.fine_views:
            name = f"{acc.name}:fine{len(self.fine_views)}"
            fine = np.float32(np.min(np.float32(acc.s_in) * np.asarray(acc.s_w, np.float32)) / FINE_STEPS)
            lo, hi = self.rescale(acc, name, fine, INT32_MIN, INT32_MAX)
            self.fine_views[key] = _View(name, fine, lo, hi)
        return self.fine_views[key]

    def pool_source(self, src: _View | _Acc) -> _View:
        """A pool's input read with no output scale to rescale to: an accumulator on its fine grid
        (:meth:`accumulator_view`)."""
        return self.accumulator_view(src) if isinstance(src, _Acc) else src

    def common_grid(self, tensor: str, pending: _Pending) -> _View:
        """An add or concat of integer tensors or accumulators on different grids that no QuantizeLinear
        rounds (NNCF, PT2E): each input requantized onto a grid ``FINE_STEPS`` times finer than the finest
        accumulator's, or the finest integer tensor's own, then summed or concatenated there (int32). An
        integer tensor already on that grid (a concat read again, as ShuffleNet's units chain) is not made
        finer again."""
        scales = [np.min(np.float32(p.s_in) * p.s_w) / FINE_STEPS if isinstance(p, _Acc) else p.scale
                  for p in pending.parts]
        fine = np.float32(min(scales) if any(isinstance(p, _Acc) for p in pending.parts) else min(scales) / FINE_STEPS)
        name = f"{tensor}:{pending.kind}"
        parts, lows, highs = [], [], []
        for j, p in enumerate(pending.parts):
            if isinstance(p, _Acc):
                lo, hi = INT32_MIN // len(pending.parts), INT32_MAX // len(pending.parts)
            else:
                lo = max(int(np.floor((p.qmin - p.zero_point) * np.float64(p.scale) / fine)) - 1, INT32_MIN)
                hi = min(int(np.ceil((p.qmax - p.zero_point) * np.float64(p.scale) / fine)) + 1, INT32_MAX)
            lows.append(lo)
            highs.append(hi)
            parts.append(f"{name}:in{j}")
            self.rescale(p, parts[-1], fine, lo, hi)
        if pending.kind == "concat":
            self.emit("concat", parts, name, dict(pending.attrs))
            return _View(name, fine, min(lows), max(highs))
        lo, hi = max(sum(lows), INT32_MIN), min(sum(highs), INT32_MAX)
        self.emit("add", parts, name, {"qmin": lo, "qmax": hi})
        return _View(name, fine, lo, hi)

    def dequantize_linear(self, node: Any) -> None:
        scale = np.asarray(self.const_array(node.input[1]), dtype=np.float32)
        if node.input[0] in self.inits:
            if len(node.input) > 2 and node.input[2] and np.any(self.const_array(node.input[2]) != 0):
                # an asymmetric constant (an operand of Mul/Add, a BatchNormalization's scale): its exact value
                # (float64, as the oracle dequantizes); weights need zero point 0
                q = self.inits[node.input[0]].astype(np.int64) - self.const_array(node.input[2]).astype(np.int64)
                self.inits[node.output[0]] = q.astype(np.float64) * scale.astype(np.float64)
                return
            self.values[node.output[0]] = _Const(self.inits[node.input[0]], scale)
            self.dequantized_from[node.output[0]] = node.input[0]
            return
        src = self.values.get(node.input[0])
        if not isinstance(src, _View):
            self.fail(node, "dequantizes a tensor that is not the output of a QuantizeLinear")
        if self.zero_point(node) != src.zero_point or scale.size != np.size(src.scale) or np.any(scale != src.scale):
            self.fail(node, "dequantizes with another scale or zero point than its QuantizeLinear")
        self.values[node.output[0]] = src

    def conv_or_dense(self, node: Any) -> None:
        w = self.values.get(node.input[1])
        depthwise = isinstance(w, _Const) and node.op_type == "Conv" and w.values.shape[1] == 1 \
            and _attr(node, "group", 1) == w.values.shape[0]
        x = self.view(node, self.values.get(node.input[0]), per_channel=depthwise)
        if not isinstance(w, _Const):
            self.fail(node, "has float weights (a float island, as NNCF leaves squeeze-excite blocks): hawqc needs "
                            "quantized weights (a DequantizeLinear of integer constants) on every conv/gemm")
        transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not _attr(node, "transB", 0))
        weight = w.values.T if transposed else w.values  # (out, ...) in every case
        w_scale = np.broadcast_to(w.scale, (weight.shape[0],))
        if node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0
                                       or _attr(node, "beta", 1.0) != 1.0):
            self.fail(node, "only Gemm with transA=0, alpha=1, beta=1 is supported")
        consts = {"weight": weight.astype(np.int8)}
        bias, fraction = np.zeros(weight.shape[0], dtype=np.int64), None
        if len(node.input) > 2 and node.input[2]:
            b = self.values.get(node.input[2])
            if isinstance(b, _Const):
                bias, fraction = bias_in_accumulator(b.values, b.scale, x.scale, w_scale)
            else:  # a float bias (NNCF) on the accumulator grid
                real = self.float_const(node.input[2])
                if real is None:
                    self.fail(node, "bias must be a constant")
                units = real / (np.asarray(np.float32(x.scale), np.float64) * w_scale.astype(np.float32).astype(np.float64))
                bias = np.rint(units).astype(np.int64)
                fraction = units - bias
        if x.zero_point:  # sum((x - z) * w) = sum(x * w) - z * sum(w); padding pads with z
            bias = bias - x.zero_point * weight.reshape(weight.shape[0], -1).astype(np.int64).sum(axis=1)
        if np.any(bias):
            consts["bias"] = np.clip(bias, INT32_MIN, INT32_MAX).astype(np.int32)
        name = node.output[0]
        w_bits = 4 if _is_int4(self.model, node.input[1], self.dequantized_from) else 8
        attrs = {"layer": node.name or name, "w_bits": w_bits, "a_bits": 4 if x.qmax - x.qmin < 16 else 8}
        if x.zero_point and node.op_type == "Conv":
            attrs["pad_value"] = x.zero_point
        if node.op_type == "Conv":
            pads = _attr(node, "pads", [0, 0, 0, 0])
            if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                self.fail(node, "auto_pad is not supported: export with explicit pads")
            attrs.update(stride=list(_attr(node, "strides", [1, 1])), dilation=list(_attr(node, "dilations", [1, 1])),
                         groups=int(_attr(node, "group", 1)), padding=[pads[0], pads[1], pads[2], pads[3]])
        self.emit("conv2d" if node.op_type == "Conv" else "dense", [x.name], name, attrs, consts)
        self.values[name] = _Acc(name, np.float32(x.scale), w_scale.astype(np.float32), fraction=fraction,
                                 bound=accumulator_bound(weight, x.qmin, x.qmax, bias))

    def relu_or_clip(self, node: Any) -> None:
        src = self.values[node.input[0]]
        lo, hi = 0.0, np.inf
        if node.op_type == "Clip":
            lo = float(self.const_array(node.input[1])) if len(node.input) > 1 and node.input[1] else -np.inf
            hi = float(self.const_array(node.input[2])) if len(node.input) > 2 and node.input[2] else np.inf
        if isinstance(src, (_Acc, _Pending)):
            bounded = type(src)(**{**src.__dict__, "lo": max(src.lo, lo), "hi": min(src.hi, hi)})
            self.values[node.output[0]] = bounded
        elif isinstance(src, _View):
            qmin = max(src.qmin, _bound(lo, src.scale, src.zero_point, "lo"))
            qmax = min(src.qmax, _bound(hi, src.scale, src.zero_point, "hi"))
            self.emit("clip", [src.name], node.output[0], {"qmin": qmin, "qmax": qmax})
            self.values[node.output[0]] = _View(node.output[0], src.scale, qmin, qmax, src.zero_point)
        else:
            self.fail(node, "applies to a constant")

    def add_or_concat(self, node: Any) -> None:
        values = [(name, self.values.get(name)) for name in node.input]
        parts = [v if isinstance(v, _Acc) else self.view(node, v, tensor=name) for name, v in values]
        attrs = {}
        if node.op_type == "Concat" and _attr(node, "axis", 1) != 1:
            attrs["axis"] = _axis(_attr(node, "axis", 1), len(self.shape_of(node, node.input[0])))
        self.values[node.output[0]] = _Pending("add" if node.op_type == "Add" else "concat", parts, attrs=attrs)

    def pool_or_flatten(self, node: Any) -> None:
        """Pooling and Flatten on an integer tensor. A max pool may also read a conv's accumulator (PT2E
        quantizes after the pool): the maximum commutes with its positive per-channel rescale and clip."""
        value = self.values.get(node.input[0])
        if node.op_type != "MaxPool" and _concat_of_grids(value):
            sources: list[Any] = value.parts  # pooled one grid at a time (see :meth:`pool`)
            src = sources[0]
        else:  # an accumulator is read as it is: the max commutes with its rescale, a mean is rescaled at its Q
            src = value if isinstance(value, _Acc) else self.view(node, value)
            sources = [src]
        out, attrs = node.output[0], {}
        if node.op_type in ("MaxPool", "AveragePool"):
            explicit = list(_attr(node, "pads", [0, 0, 0, 0]))
            if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or \
                    any(d != 1 for d in _attr(node, "dilations", [1, 1])):
                self.fail(node, "auto_pad and dilated pooling are not supported: export with explicit pads")
            pads = self.ceil_mode_pads(node, explicit) if _attr(node, "ceil_mode", 0) else explicit
            attrs = {"kernel": list(_attr(node, "kernel_shape", None)), "stride": list(_attr(node, "strides", [1, 1])),
                     "padding": [pads[0], pads[1], pads[2], pads[3]]}
        if node.op_type == "MaxPool":
            self.emit("maxpool", [src.name], out, attrs)
        elif node.op_type == "AveragePool":
            counts = _window_counts(self.shape_of(node, node.input[0])[2:], attrs, explicit,
                                    bool(_attr(node, "count_include_pad", 0)))
            if np.any(counts != attrs["kernel"][0] * attrs["kernel"][1]):
                attrs["divisor"] = counts
            self.values[out] = _Pending("avgpool", sources, attrs=_with_concat(attrs, value, sources))
            return
        else:  # GlobalAveragePool
            self.values[out] = _Pending("global_avgpool", sources, attrs=_with_concat({}, value, sources))
            return
        self.values[out] = replace(src, name=out) if isinstance(src, _Acc) else \
            _View(out, src.scale, src.qmin, src.qmax, src.zero_point)

    def ceil_mode_pads(self, node: Any, pads: list[int]) -> list[int]:
        """Pooling with ``ceil_mode=1`` as extra bottom/right padding (:func:`ceil_mode_padding`). A max pool
        pads with the smallest integer; an average pool divides by the cells of each window inside the
        input and the explicit padding (``_window_counts``)."""
        kernel, strides = list(_attr(node, "kernel_shape", None)), list(_attr(node, "strides", [1, 1]))
        return ceil_mode_padding(self.shape_of(node, node.input[0])[2:], kernel, strides, pads)

    def elementwise(self, node: Any) -> None:
        """A non-linearity on an integer tensor: an exact lookup table once its output scale is known. On
        a conv's accumulator (NNCF quantizes only after the activation) the table reads a fine grid."""
        value = self.values.get(node.input[0])
        src = value if isinstance(value, _Acc) else self.view(node, value)
        fn = ELEMENTWISE[node.op_type]
        attrs = {a.name: _attr(node, a.name, None) for a in node.attribute}
        self.values[node.output[0]] = _Pending("lut", [src], attrs={"fn": lambda x: fn(x, **attrs)})

    def mul(self, node: Any) -> None:
        """A product of two integer tensors (requantized once at the QuantizeLinear); ``x * f(x)`` with
        ``f`` not quantized in between (SiLU/Swish as exporters write it) becomes one lookup table."""
        a, b = (self.values.get(i) for i in node.input)
        for x, gate in ((a, b), (b, a)):
            if isinstance(x, (_View, _Acc)) and isinstance(gate, _Pending) and gate.kind == "lut" and gate.parts[0] is x:
                fn = gate.attrs["fn"]
                self.values[node.output[0]] = _Pending("lut", [x], attrs={"fn": lambda v, fn=fn: v * fn(v)})
                return
        self.values[node.output[0]] = _Pending("mul", [self.view(node, a), self.view(node, b, tensor=node.input[1])])

    def product(self, pending: _Pending, out: str, scale: np.float32, zp: int, lo: int, hi: int) -> None:
        a, b = pending.parts
        self.ops.append(product_op(a.name, b.name, out, a.scale, b.scale, scale, lo, hi, a.zero_point, b.zero_point, zp))

    def lut(self, pending: _Pending, out: str, scale: Any, zp: int, lo: int, hi: int) -> None:
        """An element-wise function quantized: a table over an integer input's range, or over a conv's
        accumulator the count of thresholds crossed (:mod:`hawqc.quant.thresholds`, no second rounding)."""
        (src,) = pending.parts
        if isinstance(src, _Acc):
            s_acc = scale_ratio(src.s_in, src.s_w, np.float32(1.0), src.exact_w)
            try:
                t = activation_thresholds(pending.attrs["fn"], s_acc, src.fraction, scale, zp, lo, hi, src.lo, src.hi)
            except ValueError as err:
                raise ValueError(f"the activation quantized into {out!r}: {err}") from None
            self.emit("threshold", [src.name], out, {"qmin": lo, "qmax": hi},
                      {"base": t.base, "up": t.up, "down": t.down})
            return
        self.ops.append(lut_op(src.name, out, pending.attrs["fn"], (src.qmin, src.qmax), src.scale, scale, lo, hi,
                               src.zero_point, zp))

    def pad(self, node: Any) -> None:
        """Constant Pad of the spatial dimensions of an integer tensor (a real value put on its grid, an integer
        one (a Pad of the file's integers, ONNX Runtime's operator form) as it is; zeros also on a tensor
        quantized per channel, as NNCF leaves a depthwise conv's input before its padding). A Pad of a float
        tensor (the graph input, which ONNX Runtime's operator form pads before quantizing it) waits for its
        QuantizeLinear: quantizing is element-wise, so the pad of the quantized tensor with the quantized value
        is the same integers."""
        value = float(self.const_array(node.input[2])) if len(node.input) > 2 and node.input[2] else 0.0
        out = node.output[0]
        pads = [int(p) for p in self.const_array(node.input[1])]
        if _attr(node, "mode", b"constant") not in (b"constant", "constant") or len(pads) != 8 or any(pads[:2] + pads[4:6]):
            self.fail(node, "only constant padding of the spatial dimensions is supported")
        attrs = {"pads": [pads[2], pads[3], pads[6], pads[7]]}
        if isinstance(self.values.get(node.input[0]), (str, _Float)):
            self.values[out] = _Pending("pad", [self.values[node.input[0]]], attrs={**attrs, "value": value})
            return
        src = self.view(node, self.values.get(node.input[0]), per_channel=value == 0.0)
        if node.input[0] in self.integer_tensors:
            pad_value = int(value)
        else:
            pad_value = src.zero_point if value == 0.0 else _bound(value, src.scale, src.zero_point, "lo")
        self.emit("pad", [src.name], out, {**attrs, "pad_value": pad_value})
        self.values[out] = _View(out, src.scale, src.qmin, src.qmax, src.zero_point)

    def quantized_pad(self, pending: _Pending, out: str, scale: np.float32, zp: int, lo: int, hi: int) -> None:
        """A float tensor padded, then quantized: quantized, then padded with the value quantized."""
        (src,) = pending.parts
        self.quantize_float(src, f"{out}:unpadded", scale, zp, lo, hi)
        pad_value = min(max(_bound(pending.attrs["value"], scale, zp, "lo"), lo), hi)
        self.emit("pad", [f"{out}:unpadded"], out, {"pads": pending.attrs["pads"], "pad_value": pad_value})

    def quantize_float(self, src: str | _Float, out: str, scale: np.float32, zp: int, qmin: int, qmax: int) -> None:
        """QuantizeLinear of the float graph input (``src``, its name) or of a float op's output (in the module's
        layout)."""
        attrs = {"qmin": qmin, "qmax": qmax, **({"zero_point": zp} if zp else {})}
        attrs.update({"internal": True} if isinstance(src, _Float) else {})
        self.emit("quantize", [src if isinstance(src, str) else src.name], out, attrs, {"scale": np.array(scale)})

    # ---- data movement: an integer tensor keeps its grid ---------------------------------------
    def shape_of(self, node: Any, name: str) -> list[int]:
        """The static shape of tensor ``name``: from ONNX shape inference, else (after operators that
        shape inference does not know, such as ONNX Runtime's QLinear*) from running the integer graph
        read so far on zeros."""
        shape = self.shapes.get(name)
        value = self.values.get(name)
        if shape is None and isinstance(value, (_View, _Acc)) and self.input in self.shapes:
            shape = self.shapes[name] = self.traced_shape(value.name)
        if shape is None:
            self.fail(node, f"needs the static shape of {name!r}: give the input shape (--input-shape)")
        return list(shape)

    def batch_open_shape(self, node: Any, name: str) -> list[int | None]:
        """The shape of tensor ``name`` whose batch may be open (``None``, from ONNX shape inference); else as
        :meth:`shape_of` finds it."""
        return list(self.open_shapes[name]) if name in self.open_shapes else self.shape_of(node, name)

    def traced_shape(self, name: str) -> list[int]:
        """The shape of integer tensor ``name``, from the graph read so far run on zeros."""
        from hawqc.reference.kernels import KERNELS

        if not self.trace:
            self.trace[self.input] = np.zeros(self.shapes[self.input], np.float32)
        for op in self.ops[len(self.trace) - 1:]:
            if self.stand_ins.intersection(op.inputs):
                raise _StandIn(op.output)
            self.trace[op.output] = KERNELS[op.op]([self.trace[i] for i in op.inputs], op.attrs, op.consts)
        return list(self.trace[name].shape)

    def output_shape(self, node: Any) -> list[int]:
        """The shape of a Reshape/Flatten/Squeeze/Unsqueeze/Resize output, by ONNX's rules."""
        if node.output[0] in self.shapes:
            return list(self.shapes[node.output[0]])
        shape = self.shape_of(node, node.input[0])
        second = [int(v) for v in self.const_array(node.input[1]).reshape(-1)] \
            if len(node.input) > 1 and node.input[1] else None
        if node.op_type == "Reshape":
            new = [shape[i] if d == 0 else d for i, d in enumerate(second)]
            if -1 in new:
                new[new.index(-1)] = int(np.prod(shape)) // int(np.prod([d for d in new if d != -1]))
            return new
        if node.op_type == "Flatten":
            axis = _axis(_attr(node, "axis", 1), len(shape))
            return [int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))]
        axes = second if second is not None else _attr(node, "axes", None)
        if node.op_type == "Squeeze":
            drop = [_axis(a, len(shape)) for a in axes] if axes else [i for i, d in enumerate(shape) if d == 1]
            return [d for i, d in enumerate(shape) if i not in drop]
        if node.op_type == "Unsqueeze":
            rank = len(shape) + len(axes)
            inserted = sorted(_axis(a, rank) for a in axes)
            rest = iter(shape)
            return [1 if i in inserted else next(rest) for i in range(rank)]
        if node.op_type == "Resize":
            sizes = self.const_array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if sizes is not None and sizes.size:
                return [int(d) for d in sizes]
            scales = self.const_array(node.input[2])
            return [int(np.floor(d * np.float32(f))) for d, f in zip(shape, scales)]
        self.fail(node, "its output shape is not known")

    def split_sizes(self, node: Any, size: int) -> list[int]:
        """The sizes of Split's outputs along its axis."""
        if len(node.input) > 1 and node.input[1]:
            return [int(v) for v in self.const_array(node.input[1])]
        if _attr(node, "split", None):
            return [int(v) for v in _attr(node, "split", None)]
        parts = len(node.output)
        step = -(-size // parts)
        return [min(step, size - k * step) for k in range(parts)]

    def moved(self, node: Any, src: _View, out: str, op: str, attrs: dict[str, Any]) -> None:
        self.emit(op, [src.name], out, attrs)
        self.values[out] = _View(out, src.scale, src.qmin, src.qmax, src.zero_point)

    def movement(self, node: Any) -> None:
        """Transpose, Reshape, Flatten, Squeeze, Unsqueeze, DepthToSpace, SpaceToDepth, Slice and Split of
        an integer tensor: the same integers rearranged (reshapes take ONNX's inferred output shape). A Flatten or
        reshape of an average pool no QuantizeLinear rounded yet keeps it pending: its exact mean is rounded
        once, at the QuantizeLinear that follows."""
        value, out, op_type = self.values.get(node.input[0]), node.output[0], node.op_type
        if isinstance(value, _Pending) and value.kind in ("avgpool", "global_avgpool") and \
                op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            shape = self.flattened_pool(node, value) if op_type == "Flatten" and _attr(node, "axis", 1) == 1 \
                else self.output_shape(node)
            if shape is not None:
                self.values[out] = replace(value, attrs={**value.attrs, "reshape": shape})
                return
        src = self.view(node, value)
        if op_type == "Transpose":
            perm = _attr(node, "perm", None) or list(reversed(range(len(self.shape_of(node, node.input[0])))))
            self.moved(node, src, out, "transpose", {"perm": [int(p) for p in perm]})
        elif op_type == "Flatten" and _attr(node, "axis", 1) == 1:
            self.moved(node, src, out, "flatten", {})
        elif op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            self.moved(node, src, out, "reshape", {"shape": self.output_shape(node)})
        elif op_type in ("DepthToSpace", "SpaceToDepth"):
            self.depth_space(node, src)
        elif op_type == "Slice":
            self.slice(node, src, out, self.slice_spec(node))
        else:  # Split
            shape = self.shape_of(node, node.input[0])
            axis = _axis(_attr(node, "axis", 0), len(shape))
            sizes = self.split_sizes(node, shape[axis])
            start = 0
            for name, size in zip(node.output, sizes):
                begin, end = [0] * len(shape), list(shape)
                begin[axis], end[axis] = start, start + size
                self.slice(node, src, name, (begin, end, [1] * len(shape)))
                start += size

    def flattened_pool(self, node: Any, pending: _Pending) -> list[int] | None:
        """The shape ``[-1, C * H * W]`` of a pending pool flattened (any batch), or None where its size is not
        known (an average pool after operators shape inference does not know: pooled first)."""
        if node.input[0] in self.shapes:
            return [-1, int(np.prod(self.shapes[node.input[0]][1:]))]
        if pending.kind == "global_avgpool" and "reshape" not in pending.attrs:
            return [-1, sum(self.traced_shape(p.name)[1] for p in pending.parts)]
        return None

    def slice_spec(self, node: Any) -> tuple[list[int], list[int], list[int]]:
        """ONNX Slice's starts/ends/axes/steps as a begin, end and stride per axis (steps > 0)."""
        shape = self.shape_of(node, node.input[0])
        arg = [[int(v) for v in self.const_array(i)] if len(node.input) > k and node.input[k] else None
               for k, i in enumerate(list(node.input) + [""] * 5) if 1 <= k <= 4]
        starts, ends, axes, steps = arg
        axes = [_axis(a, len(shape)) for a in (axes or range(len(starts)))]
        begin, end, strides = [0] * len(shape), list(shape), [1] * len(shape)
        for a, s, e, st in zip(axes, starts, ends, steps or [1] * len(axes)):
            if st < 1:
                self.fail(node, "only slices with positive steps are supported")
            begin[a], end[a], strides[a] = slice(s, e, st).indices(shape[a])
        return begin, end, strides

    def slice(self, node: Any, src: _View, out: str, spec: tuple[list[int], list[int], list[int]]) -> None:
        begin, end, strides = spec
        self.moved(node, src, out, "slice", {"begin": begin, "end": end, "strides": strides})

    def depth_space(self, node: Any, src: _View) -> None:
        """DepthToSpace (DCR or CRD) and SpaceToDepth as reshape -> transpose -> reshape."""
        n, c, h, w = self.shape_of(node, node.input[0])
        b = int(_attr(node, "blocksize", None))
        if node.op_type == "SpaceToDepth":
            steps = [(n, c, h // b, b, w // b, b), (0, 3, 5, 1, 2, 4), (n, c * b * b, h // b, w // b)]
        elif _attr(node, "mode", b"DCR") in (b"CRD", "CRD"):
            steps = [(n, c // (b * b), b, b, h, w), (0, 1, 4, 2, 5, 3), (n, c // (b * b), h * b, w * b)]
        else:
            steps = [(n, b, b, c // (b * b), h, w), (0, 3, 4, 1, 5, 2), (n, c // (b * b), h * b, w * b)]
        out = node.output[0]
        self.moved(node, src, f"{out}:split", "reshape", {"shape": list(steps[0])})
        self.moved(node, self.values[f"{out}:split"], f"{out}:moved", "transpose", {"perm": list(steps[1])})
        self.moved(node, self.values[f"{out}:moved"], out, "reshape", {"shape": list(steps[2])})

    # ---- reductions over H, W --------------------------------------------------------------------
    def reduce(self, node: Any) -> None:
        """ReduceMean/ReduceSum (a global average pool, resolved at the QuantizeLinear) and ReduceMax (a
        global max pool) over H and W of an NCHW tensor; a mean reads an accumulator as an average pool does."""
        value = self.values.get(node.input[0])
        src = value if isinstance(value, _Acc) and node.op_type != "ReduceMax" else self.view(node, value)
        shape = self.shape_of(node, node.input[0])
        axes = _attr(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self.const_array(node.input[1])
        axes = sorted(_axis(int(a), len(shape)) for a in (axes if axes is not None else range(len(shape))))
        if len(shape) != 4 or not axes or not set(axes) <= {2, 3}:
            self.fail(node, "only reductions over the spatial axes (2, 3) of an NCHW tensor are supported")
        out = node.output[0]
        kernel = [shape[2] if 2 in axes else 1, shape[3] if 3 in axes else 1]
        squeeze = {} if _attr(node, "keepdims", 1) else {"reshape": [d for i, d in enumerate(shape) if i not in axes]}
        if node.op_type == "ReduceMax":
            pooled = f"{out}:pooled" if squeeze else out
            self.moved(node, src, pooled, "maxpool", {"kernel": kernel, "stride": [1, 1], "padding": [0, 0, 0, 0]})
            if squeeze:
                self.moved(node, self.values[pooled], out, "reshape", {"shape": squeeze["reshape"]})
            return
        window = kernel[0] * kernel[1] if node.op_type == "ReduceSum" else 1
        attrs = {**squeeze, **({"sum_of": window} if window > 1 else {})}
        if axes == [2, 3]:
            self.values[out] = _Pending("global_avgpool", [src], attrs=attrs)
        else:
            attrs.update(kernel=kernel, stride=[1, 1], padding=[0, 0, 0, 0])
            self.values[out] = _Pending("avgpool", [src], attrs=attrs)

    # ---- per-channel affine maps: BatchNormalization, arithmetic with a constant ----------------
    def float_const(self, name: str) -> np.ndarray | None:
        """A constant operand as float64: a float initializer or a dequantized constant; else None."""
        value = self.values.get(name)
        if isinstance(value, _Const):
            scale = value.scale.reshape(value.scale.shape + (1,) * (value.values.ndim - value.scale.ndim)) \
                if value.scale.ndim and value.scale.shape[0] == value.values.shape[0] else value.scale
            return value.values.astype(np.float64) * scale.astype(np.float64)
        if name in self.inits and value is None:
            return np.asarray(self.inits[name], dtype=np.float64)
        return None

    def per_channel(self, node: Any, const: np.ndarray, shape: list[int]) -> np.ndarray:
        """A constant broadcast against a tensor of ``shape`` (channels on axis 1) as one value per channel."""
        aligned = [1] * (len(shape) - const.ndim) + list(const.shape)
        if const.ndim > len(shape) or len(shape) < 2 or any(d != 1 for i, d in enumerate(aligned) if i != 1):
            self.fail(node, f"only scalar or per-channel constants are supported (got shape {list(const.shape)})")
        return np.broadcast_to(const.reshape(-1), (shape[1],)).astype(np.float64)

    def arithmetic(self, node: Any) -> None:
        """Add/Sub/Mul/Div: with a constant operand a per-channel affine map, else Add and Mul of
        integer tensors."""
        consts = [self.float_const(i) for i in node.input]
        if consts[0] is None and consts[1] is None:
            if node.op_type == "Add":
                return self.add_or_concat(node)
            if node.op_type == "Mul":
                return self.mul(node)
            self.fail(node, f"{node.op_type} of two tensors has no integer lowering in hawqc")
        if consts[0] is not None and consts[1] is not None:
            self.fail(node, "operates on two constants that were not folded")
        k = 1 if consts[0] is None else 0
        src = self.values.get(node.input[1 - k])
        shape = self.shape_of(node, node.input[1 - k])
        c = self.per_channel(node, consts[k], shape)
        one, zero = np.ones_like(c), np.zeros_like(c)
        if node.op_type == "Div":
            if k == 0:
                self.fail(node, "division by a tensor has no integer lowering in hawqc")
            gain, offset = 1.0 / c, zero
        else:
            gain, offset = {"Add": (one, c), "Mul": (c, zero), "Sub": (one, -c) if k == 1 else (-one, c)}[node.op_type]
        self.values[node.output[0]] = self.affine(node, src, gain, offset, node.output[0], node.input[1 - k])

    def batch_norm(self, node: Any) -> None:
        """A BatchNormalization that no conv absorbed (DenseNet's after a Concat): a per-channel affine map."""
        src = self.values.get(node.input[0])
        params = [self.float_const(i) for i in node.input[1:5]]
        if any(p is None for p in params):
            self.fail(node, "needs constant scale, bias, mean and variance")
        gain, offset = batch_norm_affine(*params, _attr(node, "epsilon", 1e-5))
        self.values[node.output[0]] = self.affine(node, src, gain, offset, node.output[0])

    def affine(self, node: Any, value: Any, gain: np.ndarray, offset: np.ndarray, out: str,
               tensor: str | None = None) -> _Acc | _Pending:
        """``gain * x + offset`` per channel (float64) as an int32 accumulator of scale ``S * |gain|``, rounded
        once at the next QuantizeLinear like a conv's: ``(q - z) * sign(gain) + whole`` on an integer tensor
        of scale ``S``, ``acc * sign(gain) + whole`` on an accumulator (nothing quantized in between, as NNCF
        leaves it), where ``offset / (S * |gain|) = whole + fraction`` and the fraction is carried below the
        grid like a conv bias's (:func:`bias_in_accumulator`); on a channel concatenation, each part with
        its channels' constants."""
        if isinstance(value, _Pending) and value.kind == "concat" and value.attrs.get("axis", 1) == 1:
            bounds = np.cumsum([0] + [self.traced_shape(p.name)[1] for p in value.parts])
            parts = [self.affine(node, p, gain[a:b], offset[a:b], f"{out}:part{j}")
                     for j, (p, a, b) in enumerate(zip(value.parts, bounds, bounds[1:]))]
            return _Pending("concat", parts, value.lo, value.hi, dict(value.attrs))
        if isinstance(value, _Acc):
            if np.isfinite(value.lo) or np.isfinite(value.hi):
                self.unquantized(node, "applies to a clipped accumulator that no QuantizeLinear rounded")
            name, s_in, s_w, reach, zp = value.name, value.s_in, value.s_w, 0, 0
            below = 0.0 if value.fraction is None else value.fraction * np.sign(gain)
        else:
            src = self.view(node, value, tensor=tensor)
            name, s_in, s_w, below, zp = src.name, np.float32(src.scale), 1.0, 0.0, src.zero_point
            reach = max(abs(src.qmin - src.zero_point), abs(src.qmax - src.zero_point))
        try:
            op, s_w, fraction = affine_op(name, out, gain, offset, s_in, s_w, reach, zp)
        except ValueError as err:
            self.fail(node, str(err))
        self.ops.append(op)
        return _Acc(out, s_in, s_w, fraction=fraction + below, exact_w=True)

    # ---- operators left in float --------------------------------------------------------------
    def computes_in_float(self, node: Any) -> bool:
        """Whether a node reads a float op's output, is a conv/gemm with float weights (a float island) or
        reads a tensor no QuantizeLinear rounded (``in_float``)."""
        if node.op_type not in FLOAT_OPS:
            return False
        if (node.name or node.output[0]) in self.in_float or any(isinstance(self.values.get(i), _Float) for i in node.input):
            return True
        return node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and \
            not isinstance(self.values.get(node.input[1]), _Const) and self.float_const(node.input[1]) is not None

    def float_op(self, node: Any) -> None:
        """An ONNX operator computed in float, as the quantizer left it; recorded in ``float_nodes``."""
        from onnx import helper

        dynamic, consts, absent = [], {}, [k for k, name in enumerate(node.input) if not name]
        for k, name in enumerate(node.input):
            if not name:  # an optional input left out (Resize's roi and scales)
                continue
            value = self.float_const(name)
            if value is not None:
                raw = self.inits.get(name)
                keep = raw is not None and np.asarray(raw).dtype.kind in "iu" and name not in self.values
                consts[f"input{k}"] = np.asarray(raw) if keep else value.astype(np.float64)
            else:
                dynamic.append(self.as_float(node, name))
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else list(v) if isinstance(v, (list, tuple)) else v
                 for k, v in attrs.items()}
        out = node.output[0]
        opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 17)
        if node.op_type == "Resize":  # the module gathers with the taps; the reference runs ONNX's Resize
            consts.update(float_resize_consts(*self.resize_geometry(node)))
        self.emit("float_op", dynamic, out, {"onnx_op": node.op_type, "onnx_attrs": attrs, "arity": len(node.input),
                                             "opset": opset, **({"absent": absent} if absent else {})}, consts)
        self.values[out] = _Float(out)
        self.float_nodes.append(f"{node.name or out} ({node.op_type})")

    def as_float(self, node: Any, name: str) -> str:
        """Tensor ``name`` as float64 (a dequantize of an integer tensor or accumulator): a float island computes
        in float64, as the file means it (its oracle)."""
        value = self.values.get(name)
        if isinstance(value, _Float):
            return value.name
        if isinstance(value, _Pending) and value.kind == "global_avgpool" and len(value.parts) == 1 \
                and "reshape" not in value.attrs:
            src = self.pool_source(value.parts[0])  # the exact mean, not rounded to a grid
            if any(op.output == f"{name}:float" for op in self.ops):  # read by another float op already
                return f"{name}:float"
            opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 17)
            attrs = {"onnx_op": "GlobalAveragePool", "onnx_attrs": {}, "arity": 1, "opset": opset}
            self.float_nodes.append(f"{name} (GlobalAveragePool)")
            return self.emit("float_op", [self.dequantized(src, f"{name}:input")], f"{name}:float", attrs)
        if isinstance(value, _Pending):
            try:
                value = self.view(node, value, tensor=name)
            except Unquantized as err:  # e.g. a sigmoid of an accumulator: its producer computes in float too
                raise Unquantized(str(err), self.producers.get(name, err.node)) from None
        if isinstance(value, _Acc) and (np.isfinite(value.lo) or np.isfinite(value.hi)):
            value = self.accumulator_view(value)
        if isinstance(value, _Acc):
            scale = scale_ratio(value.s_in, value.s_w, np.float32(1.0), value.exact_w)
            return self.emit("dequantize", [value.name], f"{name}:float", {"float64": True}, {"scale": scale})
        if isinstance(value, _View):
            return self.dequantized(value, name)
        self.fail(node, f"input {name!r} is neither a tensor computed from the input nor a constant")

    def dequantized(self, value: _View, name: str) -> str:
        """An integer tensor as float64, named ``{name}:float``."""
        scale = np.asarray(np.asarray(value.scale, np.float32), np.float64)
        attrs = {"zero_point": value.zero_point, "float64": True} if value.zero_point else {"float64": True}
        return self.emit("dequantize", [value.name], f"{name}:float", attrs, {"scale": scale})

    # ---- Resize ----------------------------------------------------------------------------------
    def resize(self, node: Any) -> None:
        """Resize of H, W: nearest is a gather (the same grid); linear a weighted sum with exact integer
        weights, an accumulator on a grid ``denominator`` times finer, rescaled at the QuantizeLinear, or at
        once onto the input's grid where the file resizes integers (ONNX Runtime's operator form: a
        DequantizeLinear -> Resize -> QuantizeLinear on one grid)."""
        src = self.view(node, self.values.get(node.input[0]))
        out = node.output[0]
        size, new, scales, mode, transform, nearest = self.resize_geometry(node)
        consts, denominator = resize_consts(size, new, scales, mode, transform, nearest)
        if mode == "nearest":
            self.moved(node, src, out, "resize", {})
            self.ops[-1].consts.update(consts)
            return
        attrs_out = {"input_zero_point": src.zero_point} if src.zero_point else {}
        on_grid = out in self.integer_tensors
        acc = self.emit("resize", [src.name], f"{out}:acc" if on_grid else out, attrs_out, consts)
        value = _Acc(acc, np.float32(src.scale), np.asarray(1.0 / denominator, np.float64), exact_w=True)
        if on_grid:
            lo, hi = self.rescale(value, out, np.float32(src.scale), src.qmin, src.qmax, src.zero_point)
            value = _View(out, src.scale, lo, hi, src.zero_point)
        self.values[out] = value

    def resize_geometry(self, node: Any) -> tuple[tuple[int, int], tuple[int, int], tuple[float, float] | None, str,
                                                  str, str]:
        """A Resize of H, W in a mode hawqc lowers (checked): input and output H, W, the model's H, W factors
        (None where it gives sizes), mode, coordinate transformation and nearest mode."""
        (n, c, h, w), out = self.batch_open_shape(node, node.input[0]), node.output[0]
        out_shape = self.open_shapes[out] if out in self.open_shapes else self.output_shape(node)
        if out_shape[:2] != [n, c]:
            self.fail(node, "only resizing of H and W is supported")
        scales = self.const_array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        attrs = {a.name: _attr(node, a.name, None) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        mode = attrs.get("mode", "nearest")
        if mode not in ("nearest", "linear") or attrs.get("antialias", 0):
            self.fail(node, f"Resize mode {mode!r} is not supported (nearest and linear are)")
        transform = attrs.get("coordinate_transformation_mode", "half_pixel")
        nearest = attrs.get("nearest_mode", "round_prefer_floor")
        if transform not in TRANSFORMS or nearest not in NEAREST_MODES:
            self.fail(node, f"coordinate_transformation_mode {transform!r} / nearest_mode {nearest!r} is not supported "
                            f"({', '.join(TRANSFORMS)} / {', '.join(NEAREST_MODES)} are)")
        return ((h, w), (out_shape[2], out_shape[3]),
                None if scales is None or not scales.size else (float(scales[2]), float(scales[3])), mode, transform,
                nearest)

    def qlinear(self, node: Any) -> None:
        """ONNX Runtime's operator form (QLinearConv, QLinearMatMul, QGemm, QLinearAdd, QLinearMul,
        QLinearConcat, QLinearGlobalAveragePool, QLinearAveragePool, QLinearSigmoid, QLinearLeakyRelu)
        read as the DequantizeLinear -> op -> QuantizeLinear it stands for."""
        from onnx import helper

        i, out = list(node.input), node.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in ("QLinearConv", "QLinearMatMul", "QGemm"):
            weight, w_scale, w_zp = i[3], i[4], i[5]
            self.dequantize_linear(helper.make_node("DequantizeLinear", [weight, w_scale, w_zp], [f"{out}:w"], name=node.name))
            inputs = [i[0], f"{out}:w"]
            bias = i[8] if node.op_type == "QLinearConv" and len(i) > 8 else i[6] if node.op_type == "QGemm" else ""
            if bias:
                acc_scale = (np.float64(np.float32(self.const_array(i[1])))  # exact: the bias adds to the accumulator
                             * np.asarray(self.const_array(w_scale), np.float32).astype(np.float64))
                self.values[f"{out}:b"] = _Const(self.const_array(bias), acc_scale)
                inputs.append(f"{out}:b")
            op_type = {"QLinearConv": "Conv", "QLinearMatMul": "MatMul", "QGemm": "Gemm"}[node.op_type]
            self.conv_or_dense(helper.make_node(op_type, inputs, [f"{out}:f"], name=node.name, **attrs))
            y_scale, y_zp = (i[7], i[8] if len(i) > 8 else "") if node.op_type == "QGemm" else (i[6], i[7])
            if node.op_type == "QGemm" and (len(i) < 8 or not y_scale):  # float output
                self.values[out] = self.values[f"{out}:f"]
                return
        elif node.op_type in ("QLinearAdd", "QLinearMul"):
            for k in (0, 3):  # a constant operand, dequantized
                if i[k] in self.inits:
                    self.dequantize_linear(helper.make_node("DequantizeLinear", i[k:k + 3], [f"{out}:{k}"]))
                    i[k] = f"{out}:{k}"
            self.arithmetic(helper.make_node(node.op_type[7:], [i[0], i[3]], [f"{out}:f"], name=node.name))
            y_scale, y_zp = i[6], i[7] if len(i) > 7 else ""
        elif node.op_type == "QLinearConcat":
            self.add_or_concat(helper.make_node("Concat", i[2::3], [f"{out}:f"], name=node.name, **attrs))
            self.shapes.setdefault(f"{out}:f", self.shapes.get(out))
            y_scale, y_zp = i[0], i[1]
        else:  # QLinearGlobalAveragePool, QLinearAveragePool, QLinearSigmoid, QLinearLeakyRelu: (x, s, z, s_y, z_y)
            if attrs.pop("channels_last", 0):
                self.fail(node, "channels_last pooling is not supported")
            op_type = node.op_type[7:]
            self.shapes.setdefault(f"{out}:f", self.shapes.get(out))
            handler = _Reader.elementwise if op_type in ELEMENTWISE else _Reader.pool_or_flatten
            handler(self, helper.make_node(op_type, [i[0]], [f"{out}:f"], name=node.name, **attrs))
            y_scale, y_zp = i[3], i[4] if len(i) > 4 else ""
        self.quantize_linear(helper.make_node("QuantizeLinear", [f"{out}:f", y_scale, y_zp], [out], name=node.name))

    def rename(self, old: str, new: str) -> None:
        """Rename integer-graph tensor ``old`` to ``new`` everywhere."""
        for op in self.ops:
            op.inputs = [new if i == old else i for i in op.inputs]
            op.output = new if op.output == old else op.output

    def output(self, name: str) -> str:
        value = self.values.get(name)
        if isinstance(value, _Float):  # a float tail: its last op writes the graph's output, in float32
            self.rename(value.name, "output")
            next(op for op in self.ops if op.output == "output").attrs["float32_output"] = True
            return "output"
        if isinstance(value, _Pending) and value.kind in ("add", "concat"):  # a float sum or concat at the end
            value = self.common_grid(name, value)
        if isinstance(value, _Acc):
            scale = np.float32(value.s_in) * value.s_w
        elif isinstance(value, _View):
            scale = np.array(value.scale, dtype=np.float32)
        else:
            raise ValueError(f"ONNX output {name!r} is not an integer tensor or a conv/dense output")
        if value.name == "output":  # a float-output conv/dense written straight to the ONNX output
            self.rename("output", "output:int")
            value.name = "output:int"
        attrs = {"zero_point": value.zero_point} if isinstance(value, _View) and value.zero_point else {}
        return self.emit("dequantize", [value.name], "output", attrs, {"scale": scale})


_PASS_THROUGH = {"Identity", "Dropout"}


def _concat_of_grids(value: Any) -> bool:
    """A concat (along channels) of integer tensors on different per-tensor grids, not quantized again."""
    return (isinstance(value, _Pending) and value.kind == "concat" and value.attrs.get("axis", 1) == 1
            and all(isinstance(p, _View) and np.size(p.scale) == 1 for p in value.parts)
            and len({(float(p.scale), p.zero_point) for p in value.parts}) > 1)


def _with_concat(attrs: dict[str, Any], value: Any, sources: list[Any]) -> dict[str, Any]:
    """A pool's attrs, with the concat it pools where it pools one grid at a time."""
    return {**attrs, "concat": value} if len(sources) > 1 else attrs


_HANDLERS = {"QuantizeLinear": _Reader.quantize_linear, "DequantizeLinear": _Reader.dequantize_linear,
             "Conv": _Reader.conv_or_dense, "Gemm": _Reader.conv_or_dense, "MatMul": _Reader.conv_or_dense,
             "Relu": _Reader.relu_or_clip, "Clip": _Reader.relu_or_clip, "Concat": _Reader.add_or_concat,
             "MaxPool": _Reader.pool_or_flatten, "AveragePool": _Reader.pool_or_flatten,
             "GlobalAveragePool": _Reader.pool_or_flatten, "Pad": _Reader.pad,
             **{op: _Reader.qlinear for op in QLINEAR_OPS},
             **{op: _Reader.movement for op in ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice",
                                                "Split", "DepthToSpace", "SpaceToDepth")},
             **{op: _Reader.reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax")},
             **{op: _Reader.arithmetic for op in ("Add", "Sub", "Mul", "Div")},
             "BatchNormalization": _Reader.batch_norm, "Resize": _Reader.resize,
             **{op: _Reader.elementwise for op in ELEMENTWISE}}



def _window_counts(sizes: list[int], attrs: dict[str, Any], explicit: list[int], include_pad: bool) -> np.ndarray:
    """An average pool's divisor at each output position (H, W): the cells of its window inside the input,
    and inside the explicit padding with ``count_include_pad`` (never the extra rows of ``ceil_mode``).
    Padded cells hold the input's zero point, so the window sum minus ``kernel * zero_point`` is the sum
    over exactly these cells."""
    per_axis = []
    for axis, (n, k, s) in enumerate(zip(sizes, attrs["kernel"], attrs["stride"])):
        lo, hi = attrs["padding"][axis], attrs["padding"][axis + 2]
        starts = np.arange((n + lo + hi - k) // s + 1) * s - lo
        first, last = (-explicit[axis], n + explicit[axis + 2]) if include_pad else (0, n)
        per_axis.append(np.minimum(starts + k, last) - np.maximum(starts, first))
    return np.outer(*per_axis).astype(np.int64)


def _axis(axis: int, ndim: int) -> int:
    return int(axis) + ndim if int(axis) < 0 else int(axis)


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _is_int4(model: Any, tensor: str, dequantized_from: dict[str, str]) -> bool:
    from onnx import TensorProto

    source = dequantized_from.get(tensor, tensor)
    return any(t.name == source and t.data_type in (TensorProto.INT4, TensorProto.UINT4) for t in model.graph.initializer)


def _bound(value: float, scale: np.float32, zero_point: int, side: str) -> int:
    """A float clip bound as the integer bound QuantizeLinear would give it (float64, half to even)."""
    if not np.isfinite(value):
        return INT32_MIN if side == "lo" else INT32_MAX
    return int(np.rint(np.float64(np.float32(value)) / np.float64(scale))) + zero_point


def _qrange(model: Any, node: Any, inits: dict[str, np.ndarray]) -> tuple[int, int]:
    from onnx import TensorProto, helper

    zp_type = TensorProto.UINT8
    if len(node.input) > 2 and node.input[2]:
        zp_type = next((t.data_type for t in model.graph.initializer if t.name == node.input[2]), None) or \
            helper.np_dtype_to_tensor_dtype(np.asarray(inits[node.input[2]]).dtype)
    ranges = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT4: (-8, 7),
              TensorProto.UINT4: (0, 15), TensorProto.INT16: (-(2**15), 2**15 - 1)}
    if zp_type not in ranges:
        raise ValueError(f"ONNX node {node.name!r}: quantized type {TensorProto.DataType.Name(zp_type)} is not supported")
    return ranges[zp_type]


def from_onnx(source: str | os.PathLike[str] | Any, input_shape: tuple[int, ...] | None = None,
              float_regions: bool = True) -> IntegerGraph:
    """The integer graph of an ONNX QDQ model (a path or an ``onnx.ModelProto``). ``input_shape``
    fixes dynamic input dimensions, so that shape arithmetic folds to constants. An operator that reads
    a tensor no QuantizeLinear rounded (PT2E's gate times a tensor), and what computes that tensor, is
    computed in float as the quantizer left it (``metadata["float_ops"]``, as NNCF's float islands);
    without ``float_regions`` it raises :class:`Unquantized` (calibration quantizes it)."""
    from onnx import numpy_helper

    model = load_onnx(source)
    if input_shape is not None:
        model = with_input_shape(model, input_shape)
    graph = model.graph
    if len(graph.input) - len({t.name for t in graph.initializer} & {i.name for i in graph.input}) != 1 \
            or len(graph.output) != 1:
        raise ValueError("the ONNX model must have exactly one input and one output")
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = fold_constants(model, inits)
    inferred = static_shapes(model, nodes, inits, open_batch=True)
    shapes = {k: v for k, v in inferred.items() if None not in v}
    open_shapes = {k: v for k, v in inferred.items() if k not in shapes}
    producers = {o: n.name or n.output[0] for n in nodes for o in n.output}
    op_types = {n.name or n.output[0]: n.op_type for n in nodes}
    integers = integer_tensors(nodes)
    in_float: set[str] = set()
    while True:  # each reading computes in float the nodes the one before found reading unrounded tensors
        reader = _Reader(model, inits=dict(inits), shapes=dict(shapes), open_shapes=open_shapes, in_float=in_float,
                         producers=producers, integer_tensors=integers)
        refused = _read_nodes(reader, nodes, float_regions)
        if not refused:
            break
        stuck = next((e for e in refused if e.node in in_float or op_types.get(e.node) not in FLOAT_OPS), None)
        if stuck is not None:
            raise stuck
        in_float = in_float | {e.node for e in refused}
    reader.output(graph.output[0].name)
    props = {p.key: p.value for p in model.metadata_props}
    metadata = {"bit_config": json.loads(props["hawqc.bit_config"])} if "hawqc.bit_config" in props else {}
    if reader.float_nodes:
        metadata["float_ops"] = reader.float_nodes
    input_name = reader.input
    dims = graph.input[[i.name for i in graph.input].index(input_name)].type.tensor_type.shape.dim
    metadata["input_shape"] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return IntegerGraph(input_name, "output", reader.ops, metadata)


def _read_nodes(reader: _Reader, nodes: list[Any], float_regions: bool) -> list[Unquantized]:
    """Read ``nodes`` in order into ``reader``; with ``float_regions`` the nodes that read a tensor no
    QuantizeLinear rounded are returned (their outputs read on as float stand-ins, to find the others in the
    same reading, up to the first shape that needs a stand-in's), else the first raises. A node whose form
    the reader does not know fails naming it."""
    model = reader.model
    input_name = next(i.name for i in model.graph.input if i.name not in reader.inits)
    reader.values[input_name] = reader.input = input_name
    refused: list[Unquantized] = []
    for node in nodes:
        try:
            _read_node(reader, node)
        except Unquantized as err:
            if not float_regions:
                raise
            refused.append(err)
            reader.values.update({out: _Float(out) for out in node.output})
            reader.stand_ins.update(node.output)
        except _StandIn:
            return refused
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            reader.fail(node, f"this form of {node.op_type} cannot be read ({type(err).__name__}: {err}); "
                              "hawqc reads the forms ONNX Runtime, NNCF, PT2E and hawqc's export write")
    return refused


def _read_node(reader: _Reader, node: Any) -> None:
    model = reader.model
    if node.op_type in _PASS_THROUGH:
        reader.values[node.output[0]] = reader.values.get(node.input[0])
    elif node.op_type == "Shape" and isinstance(reader.values.get(node.input[0]), (_View, _Acc)) \
            and reader.input in reader.shapes:  # behind an operator shape inference does not know
        reader.inits[node.output[0]] = np.asarray(reader.shape_of(node, node.input[0]), dtype=np.int64)
    elif node.op_type not in QUANTIZATION_OPS and node.input and all(i in reader.inits or not i for i in node.input):
        evaluate_constant(node, reader.inits, model.opset_import)
    elif reader.computes_in_float(node) or (node.op_type in FLOAT_OPS and node.op_type not in _HANDLERS):
        reader.float_op(node)
    elif node.op_type in _HANDLERS:
        try:
            _HANDLERS[node.op_type](reader, node)
        except ValueError as err:  # e.g. a rescale no dyadic number represents: name the node
            if str(err).startswith("ONNX "):
                raise
            reader.fail(node, str(err))
    elif node.op_type == "Shape":  # left unfolded: the input shape is not static
        dims = [d.dim_value if d.HasField("dim_value") else "?" for d in model.graph.input[0].type.tensor_type.shape.dim]
        raise ValueError(f"the model's input shape is {'x'.join(map(str, dims))}: give a static input shape "
                         "(e.g. --input-shape 1,3,224,224)")
    else:
        reader.fail(node, f"operator has no integer lowering in hawqc, nor a float one (hawqc runs {', '.join(FLOAT_OPS)} "
                          "in float)")
