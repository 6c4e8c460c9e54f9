"""Operators an integer graph computes in float: what a quantizer left unquantized (NNCF's float
squeeze-excite islands, a Softmax or ArgMax after the last DequantizeLinear).

A ``float_op`` carries one ONNX node (operator, attributes, constant inputs); the reference runs it with
ONNX's own reference evaluator, so its meaning is ONNX's. Islands compute in float64 (the file's meaning, as
its oracle computes it; their dequantizes have ``float64``); a float tail's last op gives float32
(``float32_output``). Every float op of a graph is listed in its
metadata (``float_ops``) and reported by ``hawqc compile``; ``--strict`` refuses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

FLOAT_OPS = ("Conv", "Gemm", "MatMul", "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Mul", "Add",
             "Sub", "Div", "GlobalAveragePool", "ReduceMean", "Flatten", "Softmax", "ArgMax", "Resize")
"""ONNX operators hawqc can compute in float."""


def node_inputs(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> list[Any]:
    """The node's inputs in order: tensors from ``inputs``, constants from ``consts["input<k>"]``, None for an
    optional input left out (``attrs["absent"]``)."""
    dynamic, absent = iter(inputs), attrs.get("absent", ())
    return [None if k in absent else consts[f"input{k}"] if f"input{k}" in consts else next(dynamic)
            for k in range(attrs["arity"])]


def float_op(inputs: list[Any], attrs: Mapping[str, Any], consts: Mapping[str, np.ndarray]) -> np.ndarray:
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    values = node_inputs(inputs, attrs, consts)
    names = ["" if v is None else f"i{k}" for k, v in enumerate(values)]
    node = helper.make_node(attrs["onnx_op"], names, ["y"], **attrs["onnx_attrs"])
    graph = helper.make_graph([node], "float_op", [], [helper.make_tensor_value_info("y", 0, None)],
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in zip(names, values) if n])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", attrs.get("opset", 17))])
    y = np.asarray(ReferenceEvaluator(model).run(None, {})[0])
    return y.astype(np.float32) if attrs.get("float32_output") and y.dtype.kind == "f" else y
