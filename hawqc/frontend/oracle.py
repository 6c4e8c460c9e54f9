"""The float64 oracle: what an ONNX QDQ file means, computed in near-exact arithmetic.

:func:`oracle_run` executes the file with ``onnx.reference.ReferenceEvaluator`` after
:func:`widened` has made every float tensor float64 (initializers, constants, casts, value types;
the opset raised to 21, where the reference's QDQ kernels start), with a ``DequantizeLinear`` that
turns integers into float64 directly (the stock one passes int32 biases through float32) and a
``MaxPool`` of the spec's output size (the stock one pads a stride-1 ``ceil_mode`` pool twice). A
``QuantizeLinear`` then divides a float64 value by its float32 scale and rounds half to even: a
result flips only where the real value lies within ~1e-13 of a rounding boundary. ONNX Runtime's operator
form (QLinearConv, QLinearMatMul, and com.microsoft's QGemm, QLinearAdd, QLinearMul, QLinearConcat,
QLinearGlobalAveragePool, QLinearAveragePool, QLinearSigmoid, QLinearLeakyRelu) is first rewritten by
:func:`as_qdq` into what each operator is documented to compute: DequantizeLinear -> the float operator ->
QuantizeLinear.

:func:`layer_by_layer` compares an :class:`~hawqc.reference.IntegerGraph` read from the same file
with the oracle tensor by tensor: every quantized tensor (a ``QuantizeLinear`` output that the
integer graph computes) is recomputed by hawqc's reference kernels from the oracle's own values of
the quantized tensors it reads, so a rounding flip upstream does not count again downstream.
:func:`agreement` measures an end-to-end output against the oracle's in output steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hawqc.frontend.onnx_model import load_onnx
from hawqc.reference.graph import IntegerGraph, execute

ORACLE_OPSET = 21


def widened(model: Any) -> Any:
    """A copy of an ONNX model with every float32 tensor, attribute and type made float64, opset >= 21."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for i, t in enumerate(graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for value in [*graph.input, *graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    del graph.value_info[:]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float64), attr.t.name))
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.DOUBLE
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, ORACLE_OPSET)
    return model


def _dequantize_linear_float64() -> type:
    from onnx.reference.op_run import OpRun

    class DequantizeLinear(OpRun):
        """``(x - zero_point) * scale`` in float64: exact for every integer up to 32 bits."""

        op_domain = ""

        def _run(self, x: Any, x_scale: Any, x_zero_point: Any = None, axis: int = 1, block_size: int = 0,
                 output_dtype: Any = None) -> tuple[np.ndarray]:
            if block_size:
                raise ValueError("the oracle's DequantizeLinear does not take blocked scales")
            dx = np.asarray(x).astype(np.float64)
            scale = np.asarray(x_scale).astype(np.float64)
            shape = [1] * dx.ndim
            if scale.size > 1:
                shape[axis % dx.ndim] = -1
            if x_zero_point is not None:
                dx = dx - np.asarray(x_zero_point).astype(np.float64).reshape(shape if scale.size > 1 else ())
            return (dx * scale.reshape(shape if scale.size > 1 else ()),)

    return DequantizeLinear


def _max_pool_op() -> type:
    from onnx.reference.ops.op_max_pool import MaxPool as StockMaxPool

    class MaxPool(StockMaxPool):
        """``MaxPool`` with the output size the spec defines: ``onnx.reference`` (1.23) pads a stride-1
        ``ceil_mode`` pool with ``pads`` once more on each side (GoogLeNet's 28x28 becomes 30x30). Explicit
        pads, strides, dilations and ``ceil_mode`` (a window that would start in the right padding is
        dropped); ``auto_pad`` and the ``Indices`` output are left to the stock kernel."""

        op_domain = ""

        def _run(self, x: Any, auto_pad: Any = None, ceil_mode: int = 0, dilations: Any = None,  # type: ignore[override]
                 kernel_shape: Any = None, pads: Any = None, storage_order: int = 0, strides: Any = None) -> tuple[Any, ...]:
            if auto_pad not in (None, "NOTSET", b"NOTSET") or len(self.output) > 1:
                return super()._run(x, auto_pad, ceil_mode, dilations, kernel_shape, pads, storage_order, strides)
            return (max_pool(np.asarray(x), list(kernel_shape), strides, pads, dilations, bool(ceil_mode)),)

    return MaxPool


def max_pool(x: np.ndarray, kernel: list[int], strides: Any = None, pads: Any = None, dilations: Any = None,
             ceil_mode: bool = False) -> np.ndarray:
    """ONNX ``MaxPool`` of ``x`` (N, C, spatial...), explicit pads, exact for any dtype."""
    n = len(kernel)
    strides, dilations = list(strides or [1] * n), list(dilations or [1] * n)
    pads = list(pads or [0] * (2 * n))
    low = np.iinfo(x.dtype).min if x.dtype.kind in "iu" else -np.inf
    widths, index = [(0, 0), (0, 0)], [slice(None), slice(None)]
    for i in range(n):
        extent = (kernel[i] - 1) * dilations[i] + 1
        size = (x.shape[2 + i] + pads[i] + pads[n + i] - extent) / strides[i] + 1
        out = int(np.ceil(size) if ceil_mode else np.floor(size))
        if ceil_mode and (out - 1) * strides[i] >= x.shape[2 + i] + pads[i]:
            out -= 1
        widths.append((pads[i], max((out - 1) * strides[i] + extent - x.shape[2 + i] - pads[i], 0)))
        index.append(slice(0, (out - 1) * strides[i] + 1, strides[i]))
    padded = np.pad(x, widths, constant_values=low)
    windows = np.lib.stride_tricks.sliding_window_view(padded, [(k - 1) * d + 1 for k, d in zip(kernel, dilations)],
                                                       axis=tuple(range(2, 2 + n)))
    windows = windows[tuple(index) + tuple(slice(None, None, d) for d in dilations)]
    return windows.max(axis=tuple(range(2 + n, 2 + 2 * n)))


def as_qdq(model: Any) -> Any:
    """A copy of an ONNX model with every operator-form node (``QLinear*``, ``QGemm``) replaced by its meaning:
    its quantized inputs dequantized, the float operator, its output quantized (a bias, int32 at the scale
    ``x_scale * w_scale``, dequantized with that product). Other nodes are kept."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = []
    for node in model.graph.node:
        nodes.extend(_qdq_meaning(node) if node.op_type in _OPERATOR_FORM else [node])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


_OPERATOR_FORM = ("QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat",
                  "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu")


def _qdq_meaning(node: Any) -> list[Any]:
    """DequantizeLinear -> float operator -> QuantizeLinear for one operator-form node."""
    from onnx import helper

    i, out = list(node.input) + [""] * 9, node.output[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    nodes: list[Any] = []

    def dq(x: str, scale: str, zero_point: str, tag: str, **kw: Any) -> str:
        nodes.append(helper.make_node("DequantizeLinear", [x, scale, zero_point] if zero_point else [x, scale],
                                      [f"{out}:{tag}"], **kw))
        return f"{out}:{tag}"

    def bias(b: str, x_scale: str, w_scale: str) -> list[str]:
        if not b:
            return []
        nodes.append(helper.make_node("Mul", [x_scale, w_scale], [f"{out}:bias_scale"]))
        return [dq(b, f"{out}:bias_scale", "", "bias", axis=0)]

    op = node.op_type
    if attrs.pop("channels_last", 0):
        raise ValueError(f"{op} {node.name or out!r}: channels_last is not supported")
    if op == "QLinearConv":
        x, w = dq(i[0], i[1], i[2], "x"), dq(i[3], i[4], i[5], "w", axis=0)
        float_node = helper.make_node("Conv", [x, w, *bias(i[8], i[1], i[4])], [f"{out}:f"], **attrs)
        y_scale, y_zp = i[6], i[7]
    elif op in ("QLinearMatMul", "QGemm"):
        weight_axis = (0 if attrs.get("transB", 0) else 1) if op == "QGemm" else -1
        a, b = dq(i[0], i[1], i[2], "a"), dq(i[3], i[4], i[5], "b", axis=weight_axis)
        if op == "QGemm":
            float_node = helper.make_node("Gemm", [a, b, *bias(i[6], i[1], i[4])], [f"{out}:f"], **attrs)
            y_scale, y_zp = i[7], i[8]
        else:
            float_node = helper.make_node("MatMul", [a, b], [f"{out}:f"])
            y_scale, y_zp = i[6], i[7]
    elif op in ("QLinearAdd", "QLinearMul"):
        float_node = helper.make_node(op[7:], [dq(i[0], i[1], i[2], "a"), dq(i[3], i[4], i[5], "b")], [f"{out}:f"])
        y_scale, y_zp = i[6], i[7]
    elif op == "QLinearConcat":
        parts = [dq(*node.input[k:k + 3], f"in{k}") for k in range(2, len(node.input), 3)]
        float_node = helper.make_node("Concat", parts, [f"{out}:f"], **attrs)
        y_scale, y_zp = i[0], i[1]
    else:  # (x, x_scale, x_zero_point, y_scale, y_zero_point)
        float_node = helper.make_node(op[7:], [dq(i[0], i[1], i[2], "x")], [f"{out}:f"], **attrs)
        y_scale, y_zp = i[3], i[4]
    nodes.append(float_node)
    if not y_scale:  # QGemm with a float output
        nodes.append(helper.make_node("Identity", [f"{out}:f"], [out]))
    else:
        nodes.append(helper.make_node("QuantizeLinear", [f"{out}:f", y_scale, y_zp] if y_zp else [f"{out}:f", y_scale],
                                      [out]))
    return nodes


def evaluator(model: Any) -> Any:
    """A ``ReferenceEvaluator`` of the widened model (a path or an ``onnx.ModelProto``; operator form read
    as :func:`as_qdq` gives it)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(widened(as_qdq(load_onnx(model))), new_ops=[_dequantize_linear_float64(), _max_pool_op()])


def oracle_run(model: Any, x: np.ndarray, intermediate: bool = False) -> Any:
    """The oracle's output for ``x`` (float64), or with ``intermediate`` every tensor by name."""
    session = model if hasattr(model, "run") else evaluator(model)
    feeds = {session.input_names[0]: np.asarray(x, dtype=np.float64)}
    if intermediate:
        return session.run(None, feeds, intermediate=True)
    return session.run(None, feeds)[0]


def quantized_names(model: Any) -> list[str]:
    """The outputs of the model's ``QuantizeLinear`` nodes."""
    return [n.output[0] for n in load_onnx(model).graph.node if n.op_type == "QuantizeLinear"]


@dataclass
class Agreement:
    """How far values are from the oracle's, in steps of the output grid."""

    elements: int
    exact: int
    within_one: int
    mean_steps: float

    @property
    def exact_pct(self) -> float:
        return 100.0 * self.exact / max(self.elements, 1)

    @property
    def within_one_pct(self) -> float:
        return 100.0 * self.within_one / max(self.elements, 1)


def agreement(got: np.ndarray, oracle: np.ndarray, step: Any) -> Agreement:
    """``got`` against ``oracle`` (float outputs on a grid of ``step``, per channel on axis 1 if 1-D)."""
    step = np.asarray(step, dtype=np.float64)
    if step.ndim == 1 and step.size > 1:
        step = step.reshape((1, -1) + (1,) * (np.ndim(oracle) - 2))
    steps = np.abs(np.asarray(got, np.float64) - np.asarray(oracle, np.float64)) / step
    steps = np.where(steps < 0.5, 0.0, steps)  # float32 outputs carry their own sub-step rounding
    return Agreement(int(steps.size), int(np.count_nonzero(steps == 0)), int(np.count_nonzero(steps < 1.5)),
                     float(steps.mean()) if steps.size else 0.0)


@dataclass
class LayerMismatch:
    """One quantized tensor recomputed from the oracle's inputs: elements that differ, of how many."""

    name: str
    mismatches: int
    elements: int


def layer_by_layer(graph: IntegerGraph, values: Mapping[str, Any], x: np.ndarray,
                   kernels: Mapping[str, Any] | None = None) -> list[LayerMismatch]:
    """Every tensor of ``graph`` that is an oracle quantized tensor (``values``: the oracle's
    intermediate values by name, as :func:`oracle_run` gives them), recomputed by ``kernels``
    (hawqc's numpy reference by default) from the oracle's quantized tensors it depends on."""
    if kernels is None:
        from hawqc.reference.kernels import KERNELS as kernels  # noqa: N811
    oracle = {n: np.asarray(v).astype(np.int64) for n, v in values.items() if _is_integer(np.asarray(v))}
    producer = {op.output: op for op in graph.ops}
    order = {op.output: i for i, op in enumerate(graph.ops)}
    results = []
    for target in (op.output for op in graph.ops if op.output in oracle):
        segment: dict[str, Any] = {}
        stack = [target]
        while stack:
            name = stack.pop()
            if name in segment:
                continue
            segment[name] = producer[name]
            stack.extend(i for i in producer[name].inputs
                         if i not in segment and i != graph.input and i not in oracle)
        feeds = {graph.input: x, **{i: oracle[i].astype(np.int32) for op in segment.values() for i in op.inputs
                                    if i not in segment and i != graph.input}}
        sub = IntegerGraph(graph.input, target, sorted(segment.values(), key=lambda op: order[op.output]))
        trace = dict(feeds)
        execute(sub, x, kernels, trace)
        got, want = np.asarray(trace[target]), oracle[target]
        results.append(LayerMismatch(target, int(np.count_nonzero(got != want.reshape(got.shape))), int(got.size)))
    return results


def _is_integer(value: np.ndarray) -> bool:
    """An integer tensor: numpy's kinds, and the 4-bit types (``ml_dtypes``) of int4/uint4 tensors."""
    return value.dtype.kind in "iu" or str(value.dtype) in ("int4", "uint4")
