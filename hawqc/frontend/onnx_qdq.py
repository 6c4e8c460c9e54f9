"""Read an ONNX QDQ model into an :class:`~hawqc.reference.IntegerGraph`.

The reader walks the graph once, keeping float-side values symbolic until a ``QuantizeLinear``
fixes their integer form:

- ``DequantizeLinear`` of an integer tensor is a *view* (integer tensor + scale); of an initializer,
  a constant (weights per channel, int32 biases);
- ``Conv``/``Gemm``/``MatMul`` of views and constants give an *accumulator* (int32, scale
  ``S_in * S_w``); ``Relu``/``Clip`` on it narrow the clip bounds of its requantization;
- ``Add``/``Concat`` collect their inputs; at the ``QuantizeLinear`` each input is requantized to
  the output scale by its own dyadic number (then summed or concatenated);
- ``MaxPool``/``AveragePool``/``GlobalAveragePool``/``Flatten``/``Relu`` on a view are integer ops.

Zero points must be 0 (symmetric quantization, as hawqc and HAWQ-V3 produce). A model that needs
anything else fails with one error naming the node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hawqc.quant.dyadic import dyadic, dyadic_per_channel, scale_ratio
from hawqc.reference.graph import IntegerGraph, IntOp

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MIN_OPSET = 13


@dataclass
class _View:
    """An integer tensor seen as float: ``name`` in the integer graph, times ``scale``."""

    name: str
    scale: np.float32
    qmin: int
    qmax: int


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


@dataclass
class _Pending:
    """An add or concat of views/accumulators, resolved by the QuantizeLinear that follows."""

    kind: str
    parts: list[Any]
    lo: float = -np.inf
    hi: float = np.inf
    name: str = ""


@dataclass
class _Reader:
    model: Any
    ops: list[IntOp] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    dequantized_from: dict[str, str] = field(default_factory=dict)

    def fail(self, node: Any, why: str) -> None:
        raise ValueError(f"ONNX node {node.name or node.op_type!r} ({node.op_type}): {why}")

    def const_array(self, name: str) -> np.ndarray:
        if name not in self.inits:
            raise ValueError(f"ONNX tensor {name!r} must be a constant initializer")
        return self.inits[name]

    def zero_point_is_zero(self, node: Any) -> None:
        if len(node.input) > 2 and node.input[2] and np.any(self.const_array(node.input[2]) != 0):
            self.fail(node, "non-zero zero points are not supported (hawqc quantizes symmetrically)")

    def emit(self, op: str, inputs: list[str], output: str, attrs: dict[str, Any] | None = None,
             consts: dict[str, np.ndarray] | None = None) -> str:
        self.ops.append(IntOp(op, inputs, output, attrs or {}, consts or {}))
        return output

    def rescale(self, value: Any, dst: str, scale_out: np.float32, lo: int, hi: int) -> tuple[int, int]:
        """Requantize a view or accumulator to ``scale_out``, clipped to [lo, hi]; returns the bounds."""
        if isinstance(value, _Acc):
            b, c = dyadic_per_channel(scale_ratio(value.s_in, value.s_w, scale_out))
            lo = max(lo, _bound(value.lo, scale_out, "lo"))
            hi = min(hi, _bound(value.hi, scale_out, "hi"))
        else:
            b, c = dyadic_per_channel(scale_ratio(value.scale, np.float32(1.0), scale_out))
        self.emit("requantize", [value.name], dst, {"qmin": lo, "qmax": hi}, {"b": b, "c": c})
        return lo, hi

    # ---- node handlers ------------------------------------------------------------------------
    def quantize_linear(self, node: Any) -> None:
        self.zero_point_is_zero(node)
        scale = np.float32(self.const_array(node.input[1]))
        if scale.ndim:
            self.fail(node, "activations must be quantized per tensor")
        qmin, qmax = _qrange(self.model, node)
        src, out = self.values[node.input[0]], node.output[0]
        if isinstance(src, str):  # the float graph input
            self.emit("quantize", [src], out, {"qmin": qmin, "qmax": qmax}, {"scale": np.array(scale)})
        elif isinstance(src, _Acc):
            qmin, qmax = self.rescale(src, out, scale, qmin, qmax)
        elif isinstance(src, _View):
            if src.scale == scale and qmin <= src.qmin and src.qmax <= qmax:  # already on this grid
                self.values[out] = src
                return
            qmin, qmax = self.rescale(src, out, scale, qmin, qmax)
        elif isinstance(src, _Pending):
            lo, hi = max(qmin, _bound(src.lo, scale, "lo")), min(qmax, _bound(src.hi, scale, "hi"))
            parts = [f"{out}:in{j}" for j in range(len(src.parts))]
            for part, value in zip(parts, src.parts):
                if src.kind == "add":
                    self.rescale(value, part, scale, INT32_MIN, INT32_MAX)
                else:
                    self.rescale(value, part, scale, lo, hi)
            self.emit(src.kind, parts, out, {"qmin": lo, "qmax": hi} if src.kind == "add" else {})
            qmin, qmax = lo, hi
        else:
            self.fail(node, "cannot quantize a constant")
        self.values[out] = _View(out, scale, qmin, qmax)

    def dequantize_linear(self, node: Any) -> None:
        self.zero_point_is_zero(node)
        scale = np.asarray(self.const_array(node.input[1]), dtype=np.float32)
        if node.input[0] in self.inits:
            self.values[node.output[0]] = _Const(self.inits[node.input[0]], scale)
            self.dequantized_from[node.output[0]] = node.input[0]
            return
        src = self.values.get(node.input[0])
        if not isinstance(src, _View):
            self.fail(node, "dequantizes a tensor that is not the output of a QuantizeLinear")
        self.values[node.output[0]] = src

    def conv_or_dense(self, node: Any) -> None:
        x, w = self.values.get(node.input[0]), self.values.get(node.input[1])
        if not isinstance(x, _View) or not isinstance(w, _Const):
            self.fail(node, "needs a dequantized input and dequantized constant weights")
        transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not _attr(node, "transB", 0))
        weight = w.values.T if transposed else w.values  # (out, ...) in every case
        w_scale = np.broadcast_to(w.scale, (weight.shape[0],))
        if node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0
                                       or _attr(node, "beta", 1.0) != 1.0):
            self.fail(node, "only Gemm with transA=0, alpha=1, beta=1 is supported")
        acc_scale = np.float32(x.scale) * w_scale.astype(np.float32)
        consts = {"weight": weight.astype(np.int8)}
        if len(node.input) > 2 and node.input[2]:
            bias = self.values.get(node.input[2])
            if not isinstance(bias, _Const):
                self.fail(node, "bias must be a dequantized constant")
            real = bias.values.astype(np.float64) * bias.scale.astype(np.float64)
            exact = bias.values if np.array_equal(bias.scale, acc_scale) else np.rint(real / acc_scale)
            consts["bias"] = np.clip(exact, INT32_MIN, INT32_MAX).astype(np.int32)
        name = node.output[0]
        w_bits = 4 if _is_int4(self.model, node.input[1], self.dequantized_from) else 8
        attrs = {"layer": node.name or name, "w_bits": w_bits, "a_bits": 4 if x.qmax - x.qmin < 16 else 8}
        if node.op_type == "Conv":
            pads = _attr(node, "pads", [0, 0, 0, 0])
            if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                self.fail(node, "auto_pad is not supported: export with explicit pads")
            attrs.update(stride=list(_attr(node, "strides", [1, 1])), dilation=list(_attr(node, "dilations", [1, 1])),
                         groups=int(_attr(node, "group", 1)), padding=[pads[0], pads[1], pads[2], pads[3]])
        self.emit("conv2d" if node.op_type == "Conv" else "dense", [x.name], name, attrs, consts)
        self.values[name] = _Acc(name, np.float32(x.scale), w_scale.astype(np.float32))

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
            qmin = max(src.qmin, _bound(lo, src.scale, "lo"))
            qmax = min(src.qmax, _bound(hi, src.scale, "hi"))
            self.emit("clip", [src.name], node.output[0], {"qmin": qmin, "qmax": qmax})
            self.values[node.output[0]] = _View(node.output[0], src.scale, qmin, qmax)
        else:
            self.fail(node, "applies to a constant")

    def add_or_concat(self, node: Any) -> None:
        parts = [self.values.get(i) for i in node.input]
        if not all(isinstance(p, (_View, _Acc)) for p in parts):
            self.fail(node, "inputs must be dequantized tensors or conv/dense outputs")
        if node.op_type == "Concat" and _attr(node, "axis", 1) != 1:
            self.fail(node, "only channel concatenation (axis 1) is supported")
        self.values[node.output[0]] = _Pending("add" if node.op_type == "Add" else "concat", parts)

    def pool_or_flatten(self, node: Any) -> None:
        src = self.values.get(node.input[0])
        if not isinstance(src, _View):
            self.fail(node, "input must be a dequantized tensor")
        out, attrs = node.output[0], {}
        if node.op_type in ("MaxPool", "AveragePool"):
            pads = list(_attr(node, "pads", [0, 0, 0, 0]))
            if _attr(node, "ceil_mode", 0):
                self.fail(node, "ceil_mode is not supported")
            attrs = {"kernel": list(_attr(node, "kernel_shape", None)), "stride": list(_attr(node, "strides", [1, 1])),
                     "padding": [pads[0], pads[1], pads[2], pads[3]]}
        if node.op_type == "MaxPool":
            self.emit("maxpool", [src.name], out, attrs)
        elif node.op_type == "AveragePool":
            if not _attr(node, "count_include_pad", 0) and any(attrs["padding"]):
                self.fail(node, "padded average pooling must count the padding (count_include_pad=1)")
            b, c = dyadic(1.0 / (attrs["kernel"][0] * attrs["kernel"][1]))
            self.emit("avgpool", [src.name], out, {**attrs, "qmin": src.qmin, "qmax": src.qmax},
                      {"b": np.array(b, np.int32), "c": np.array(c, np.int32)})
        elif node.op_type == "GlobalAveragePool":
            self.emit("global_avgpool", [src.name], out, {"qmin": src.qmin, "qmax": src.qmax})
        else:  # Flatten
            if _attr(node, "axis", 1) != 1:
                self.fail(node, "only Flatten(axis=1) is supported")
            self.emit("flatten", [src.name], out)
        self.values[out] = _View(out, src.scale, src.qmin, src.qmax)

    def output(self, name: str) -> str:
        value = self.values.get(name)
        if isinstance(value, _Acc):
            scale = np.float32(value.s_in) * value.s_w
        elif isinstance(value, _View):
            scale = np.array(value.scale, dtype=np.float32)
        else:
            raise ValueError(f"ONNX output {name!r} is not an integer tensor or a conv/dense output")
        return self.emit("dequantize", [value.name], "output", {}, {"scale": scale})


_HANDLERS = {"QuantizeLinear": _Reader.quantize_linear, "DequantizeLinear": _Reader.dequantize_linear,
             "Conv": _Reader.conv_or_dense, "Gemm": _Reader.conv_or_dense, "MatMul": _Reader.conv_or_dense,
             "Relu": _Reader.relu_or_clip, "Clip": _Reader.relu_or_clip, "Add": _Reader.add_or_concat,
             "Concat": _Reader.add_or_concat, "MaxPool": _Reader.pool_or_flatten,
             "AveragePool": _Reader.pool_or_flatten, "GlobalAveragePool": _Reader.pool_or_flatten,
             "Flatten": _Reader.pool_or_flatten}
_PASS_THROUGH = {"Identity", "Dropout"}


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


def _bound(value: float, scale: np.float32, side: str) -> int:
    """A float clip bound as the integer bound QuantizeLinear would give it (round half to even)."""
    if not np.isfinite(value):
        return INT32_MIN if side == "lo" else INT32_MAX
    return int(np.rint(np.float32(value) / scale))


def _qrange(model: Any, node: Any) -> tuple[int, int]:
    from onnx import TensorProto

    zp_type = TensorProto.UINT8
    if len(node.input) > 2 and node.input[2]:
        zp_type = next(t.data_type for t in model.graph.initializer if t.name == node.input[2])
    ranges = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT4: (-8, 7),
              TensorProto.UINT4: (0, 15)}
    if zp_type not in ranges:
        raise ValueError(f"ONNX node {node.name!r}: quantized type {TensorProto.DataType.Name(zp_type)} is not supported")
    return ranges[zp_type]


def load_onnx(source: str | os.PathLike[str] | Any) -> Any:
    """An ``onnx.ModelProto`` from a path or a model, checked; one clear error for anything else."""
    import onnx

    if isinstance(source, onnx.ModelProto):
        model = source
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file")
        try:
            model = onnx.load(path)
            onnx.checker.check_model(model)
        except Exception as err:  # protobuf decode errors and checker errors have many types
            raise ValueError(f"{path}: not a valid ONNX model ({str(err).splitlines()[0][:200]})") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ValueError(f"ONNX opset {opset} is too old: QDQ models need opset {MIN_OPSET} or later")
    return model


def from_onnx(source: str | os.PathLike[str] | Any) -> IntegerGraph:
    """The integer graph of an ONNX QDQ model (a path or an ``onnx.ModelProto``)."""
    import json

    from onnx import numpy_helper

    model = load_onnx(source)
    graph = model.graph
    if len(graph.input) - len({t.name for t in graph.initializer} & {i.name for i in graph.input}) != 1 \
            or len(graph.output) != 1:
        raise ValueError("the ONNX model must have exactly one input and one output")
    reader = _Reader(model, inits={t.name: numpy_helper.to_array(t) for t in graph.initializer})
    input_name = next(i.name for i in graph.input if i.name not in reader.inits)
    reader.values[input_name] = input_name
    for node in graph.node:
        if node.op_type in _PASS_THROUGH:
            reader.values[node.output[0]] = reader.values[node.input[0]]
        elif node.op_type in _HANDLERS:
            _HANDLERS[node.op_type](reader, node)
        else:
            reader.fail(node, "operator has no integer lowering in hawqc")
    reader.output(graph.output[0].name)
    props = {p.key: p.value for p in model.metadata_props}
    metadata = {"bit_config": json.loads(props["hawqc.bit_config"])} if "hawqc.bit_config" in props else {}
    dims = graph.input[[i.name for i in graph.input].index(input_name)].type.tensor_type.shape.dim
    metadata["input_shape"] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return IntegerGraph(input_name, "output", reader.ops, metadata)
