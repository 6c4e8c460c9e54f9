"""The float64 oracle: what an ONNX QDQ file means, computed in near-exact arithmetic.

:func:`oracle_run` executes the file with ``onnx.reference.ReferenceEvaluator`` after
:func:`widened` has made every float tensor float64 (initializers, constants, casts, value types;
the opset raised to 21, where the reference's QDQ kernels start), with a ``DequantizeLinear`` that
turns integers into float64 directly (the stock one passes int32 biases through float32). A
``QuantizeLinear`` then divides a float64 value by its float32 scale and rounds half to even: a
result flips only where the real value lies within ~1e-13 of a rounding boundary.

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


def evaluator(model: Any) -> Any:
    """A ``ReferenceEvaluator`` of the widened model (a path or an ``onnx.ModelProto``)."""
    from onnx.reference import ReferenceEvaluator

    from hawqc.frontend.onnx_model import load_onnx

    return ReferenceEvaluator(widened(load_onnx(model)), new_ops=[_dequantize_linear_float64()])


def oracle_run(model: Any, x: np.ndarray, intermediate: bool = False) -> Any:
    """The oracle's output for ``x`` (float64), or with ``intermediate`` every tensor by name."""
    session = model if hasattr(model, "run") else evaluator(model)
    feeds = {session.input_names[0]: np.asarray(x, dtype=np.float64)}
    if intermediate:
        return session.run(None, feeds, intermediate=True)
    return session.run(None, feeds)[0]


def quantized_names(model: Any) -> list[str]:
    """The outputs of the model's ``QuantizeLinear`` nodes."""
    from hawqc.frontend.onnx_model import load_onnx

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
