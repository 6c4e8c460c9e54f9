"""Loading ONNX models and folding what does not depend on the input's values.

Exporters leave shape arithmetic behind (Shape, ConstantOfShape, Slice, Concat feeding Pad or
Reshape, Identity nodes sharing constants); once the input shape is static, ONNX shape inference
and the ONNX reference evaluator turn it into constants, to a fixed point. A QuantizeLinear of a
constant folds to its integer constant (weights stored as float with a QuantizeLinear ->
DequantizeLinear pair, as ONNX Runtime's ``AddQDQPairToWeight`` and TensorRT/ModelOpt write them);
DequantizeLinear folds only for scalars: the integer constants and scales are what the reader keeps.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

MIN_OPSET = 13
QLINEAR_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
               "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu"}
"""ONNX Runtime's operator form (QOperator): integer ops with their scales and zero points as inputs."""
QUANTIZATION_OPS = {"QuantizeLinear", "DequantizeLinear", *QLINEAR_OPS}


TYPE_PRESERVING_OPS = {"Identity", "Dropout", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice",
                      "Split", "Concat", "Pad", "MaxPool", "Resize", "DepthToSpace", "SpaceToDepth"}
"""Operators whose output has their first input's element type (ONNX Runtime runs them on integers)."""


def integer_tensors(nodes: list[Any]) -> set[str]:
    """The tensors that hold quantized integers in the file: the outputs of QuantizeLinear and of ONNX
    Runtime's QLinear* operators, and what a type-preserving operator computes from them (a Resize of
    integers in the operator form); a DequantizeLinear's output, and what is computed from it, is float."""
    found: set[str] = set()
    for node in nodes:
        float_gemm = node.op_type == "QGemm" and (len(node.input) < 8 or not node.input[7])  # no output scale
        if node.op_type == "QuantizeLinear" or (node.op_type in QLINEAR_OPS and not float_gemm) \
                or (node.op_type in TYPE_PRESERVING_OPS and node.input and node.input[0] in found):
            found.update(node.output)
    return found


def with_input_shape(model: Any, shape: tuple[int, ...]) -> Any:
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializers = {t.name for t in model.graph.initializer}
    (graph_input,) = [i for i in model.graph.input if i.name not in initializers] or [None]
    dims = graph_input.type.tensor_type.shape.dim if graph_input is not None else []
    if len(dims) != len(shape):
        raise ValueError(f"input shape {tuple(shape)} has {len(shape)} dimensions, the model's input {len(dims)}")
    declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    if any(isinstance(d, int) and d != size for d, size in zip(declared, shape)):
        raise ValueError(f"input shape {tuple(shape)} does not fit the model's input {declared}")
    for dim, size in zip(dims, shape):
        dim.dim_value = size
    return model


def fold_constants(model: Any, inits: dict[str, np.ndarray]) -> list[Any]:
    """Evaluate what does not depend on the input's values (Constant nodes, shape arithmetic, Shape of
    a tensor whose shape is static, the QuantizeLinear of a constant, the dequantize of a scalar such
    as a Pad value) into ``inits``, to a fixed point; returns the nodes left to read."""
    import onnx
    from onnx import numpy_helper

    nodes = list(model.graph.node)
    while True:
        shapes = static_shapes(model, nodes, inits)
        remaining = []
        for node in nodes:
            if node.op_type == "Constant":
                value = onnx.helper.get_attribute_value(node.attribute[0])
                inits[node.output[0]] = numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) \
                    else np.asarray(value)
            elif node.op_type == "Shape" and node.input[0] in shapes:
                inits[node.output[0]] = np.asarray(shapes[node.input[0]], dtype=np.int64)
            elif node.op_type == "DequantizeLinear" and node.input[0] in inits \
                    and np.asarray(inits[node.input[0]]).size == 1 and all(i in inits or not i for i in node.input):
                inits[node.output[0]] = _scalar_dequantize(*(inits[i] if i else None for i in node.input))
            elif (node.op_type not in QUANTIZATION_OPS or node.op_type == "QuantizeLinear") and node.input \
                    and all(i in inits or not i for i in node.input):
                evaluate_constant(node, inits, model.opset_import)
            else:
                remaining.append(node)
        if len(remaining) == len(nodes):
            return nodes
        nodes = remaining


def evaluate_constant(node: Any, inits: dict[str, np.ndarray], opset_import: Any) -> None:
    """Run one node whose inputs are all constants with the ONNX reference evaluator; its outputs go
    into ``inits``."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    outputs = [onnx.helper.make_tensor_value_info(o, 0, None) for o in node.output]
    constants = [numpy_helper.from_array(np.asarray(inits[i]), i) for i in node.input if i]
    single = onnx.helper.make_model(onnx.helper.make_graph([node], "fold", [], outputs, constants),
                                    opset_imports=opset_import)
    results = ReferenceEvaluator(single).run(None, {})
    inits.update({o: np.asarray(r) for o, r in zip(node.output, results)})


def _scalar_dequantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None) -> np.ndarray:
    """DequantizeLinear of a scalar, per tensor."""
    zp = np.asarray(zero_point if zero_point is not None else np.uint8(0))
    scale = np.float32(np.asarray(scale).reshape(()))
    return np.asarray((np.float32(np.asarray(x).reshape(())) - np.float32(zp.reshape(()))) * scale, np.float32)


def static_shapes(model: Any, nodes: list[Any], inits: dict[str, np.ndarray],
                  open_batch: bool = False) -> dict[str, list[int]]:
    """Fully known tensor shapes, by ONNX shape inference over ``nodes`` with ``inits`` as constants; with
    ``open_batch`` also those whose only unknown is the first dimension (``None``)."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    known = {t.name for t in graph.initializer}
    extra = [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items() if k not in known]
    probe = onnx.helper.make_model(onnx.helper.make_graph(nodes, "shapes", list(graph.input), list(graph.output),
                                                          [*graph.initializer, *extra]),
                                   opset_imports=model.opset_import)
    inferred = onnx.shape_inference.infer_shapes(probe)
    shapes = {}
    for v in [*inferred.graph.value_info, *inferred.graph.input]:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        if v.type.tensor_type.HasField("shape") and dims and None not in dims[int(open_batch):]:
            shapes[v.name] = dims
    return shapes


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


