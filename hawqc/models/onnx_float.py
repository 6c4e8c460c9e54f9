"""A float ONNX model as a module of standard layers that hawqc can capture.

Supported operators (the common CNN ones): Conv (2-D, explicit or asymmetric zero padding),
Gemm (``transA=0``, ``alpha=beta=1``) and MatMul (+ Add of a bias) with a constant weight,
BatchNormalization, Relu, Clip to ``[0, m]``, Add, MaxPool, AveragePool, GlobalAveragePool, Flatten
(axis 1), Reshape to ``(batch, -1)``, Concat on channels, and Identity / Dropout. Layers are named
after their weights (``layer1.0.conv1.weight`` -> ``layer1.0.conv1``) or, where an exporter renamed
the weight (BatchNorm folded), after the node (``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``).
Anything else is refused by name. The rebuilt model is checked against ONNX Runtime on a random input.
"""

from __future__ import annotations

import operator
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hawqc.models.rebuild import GraphBuilder, batch_norm, check_same, conv2d, linear

SUPPORTED = ("Conv, Gemm, MatMul, BatchNormalization, Relu, Clip(0, m), Add, MaxPool, AveragePool, "
             "GlobalAveragePool, Flatten, Reshape(batch, -1), Concat (channels), Identity, Dropout")
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger",
                 "MatMulInteger", "QLinearAdd", "QLinearGlobalAveragePool"}


def read(path: str | os.PathLike[str]) -> Any:
    """The ``ModelProto`` of ``path``, with a one-line error."""
    import onnx

    try:
        return onnx.load(str(path))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as err:  # protobuf decode errors
        raise ValueError(f"{path}: not an ONNX model ({str(err).splitlines()[0]})") from None


def is_quantized(model: Any) -> bool:
    """True for a QDQ or operator-form quantized model (what ``hawqc compile`` reads directly)."""
    return any(node.op_type in QUANTIZED_OPS for node in model.graph.node)


def is_float_model(model: Any) -> bool:
    """A float network to quantize: no quantization operators, and at least one Conv, Gemm or MatMul."""
    ops = {node.op_type for node in model.graph.node}
    return not ops & QUANTIZED_OPS and bool(ops & {"Conv", "Gemm", "MatMul"})


def input_shape(model: Any) -> tuple[int | None, ...]:
    """The graph input's shape, None for a dynamic dimension."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"the ONNX model must take one input tensor, it takes {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


def from_onnx(model: Any, name: str = "model") -> torch.nn.Module:
    """The float ONNX ``model`` as an fx module of standard layers."""
    from onnx import helper, numpy_helper

    if is_quantized(model):
        raise ValueError(f"{name}: a quantized ONNX model; give it to hawqc compile / verify as it is")
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    (graph_input,) = [i for i in model.graph.input if i.name not in consts]
    builder = GraphBuilder()
    env: dict[str, Any] = {graph_input.name: builder.input("x")}
    pending_bias: dict[str, torch.nn.Linear] = {}  # MatMul outputs whose Linear still lacks the following Add's bias
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        ins = list(node.input)
        if op == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(attrs["value"])
            continue
        if op in ("Identity", "Dropout") and ins[0] in consts:
            consts[node.output[0]] = consts[ins[0]]
            continue
        where = f"{name}: {op} {node.name or node.output[0]}"
        if op == "Add" and ins[0] in pending_bias and ins[1] in consts:
            layer = pending_bias.pop(ins[0])
            bias = _tensor(consts, ins[1]).reshape(-1)
            layer.bias = torch.nn.Parameter(bias.expand(layer.out_features).clone())
            env[node.output[0]] = env[ins[0]]
            continue
        if any(i not in env and i not in consts for i in ins if i):
            raise ValueError(f"{where}: reads a tensor the converter does not know")
        result = _convert(builder, op, ins, attrs, env, consts, _layer_name(node, consts), where)
        if op == "MatMul":
            pending_bias[node.output[0]] = result[1]
            result = result[0]
        env[node.output[0]] = result
    outputs = [o.name for o in model.graph.output]
    if len(outputs) != 1:
        raise ValueError(f"{name}: the ONNX model must return one tensor, it returns {len(outputs)}")
    return builder.build(env[outputs[0]])


def _tensor(consts: dict[str, np.ndarray], name: str | None) -> torch.Tensor | None:
    return torch.tensor(np.asarray(consts[name], dtype=np.float32)) if name else None


def _convert(builder: GraphBuilder, op: str, ins: list[str], attrs: dict[str, Any], env: dict[str, Any],
             consts: dict[str, np.ndarray], layer: str, where: str) -> Any:
    x = env.get(ins[0]) if ins else None
    if op == "Conv":
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or ins[1] not in consts:
            raise ValueError(f"{where}: only convolutions with a constant weight and explicit pads are supported")
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        top, left, bottom, right = pads[0], pads[1], pads[2], pads[3]
        if (top, left) != (bottom, right):
            x = builder.call(F.pad, x, [left, right, top, bottom])
            top = left = 0
        conv = conv2d(_tensor(consts, ins[1]), _tensor(consts, ins[2] if len(ins) > 2 else None),
                      tuple(attrs.get("strides", [1, 1])), (top, left), tuple(attrs.get("dilations", [1, 1])),
                      int(attrs.get("group", 1)))
        return builder.layer(layer, conv, x)
    if op == "Gemm":
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or \
                ins[1] not in consts:
            raise ValueError(f"{where}: only Gemm(x, W, b) with a constant W, no transA, alpha = beta = 1")
        weight = _tensor(consts, ins[1])
        weight = weight if attrs.get("transB", 0) else weight.T
        bias = _tensor(consts, ins[2] if len(ins) > 2 else None)
        return builder.layer(layer, linear(weight, None if bias is None else bias.expand(weight.shape[0])), x)
    if op == "MatMul":
        if ins[1] not in consts or consts[ins[1]].ndim != 2:
            raise ValueError(f"{where}: only MatMul by a constant 2-D weight is supported")
        dense = linear(_tensor(consts, ins[1]).T, None)
        return builder.layer(layer, dense, x), dense
    if op == "BatchNormalization":
        w, b, mean, var = (_tensor(consts, i) for i in ins[1:5])
        return builder.layer(layer, batch_norm(w, b, mean, var, float(attrs.get("epsilon", 1e-5))), x)
    if op == "Relu":
        return builder.call(F.relu, x)
    if op == "Clip":
        low = attrs.get("min", consts[ins[1]] if len(ins) > 1 and ins[1] else -np.inf)
        high = attrs.get("max", consts[ins[2]] if len(ins) > 2 and ins[2] else np.inf)
        if float(low) != 0.0:
            raise ValueError(f"{where}: only Clip(0, m) (ReLU, ReLU6) is supported")
        return builder.call(F.relu, x) if np.isinf(float(high)) else builder.call(F.hardtanh, x, 0.0, float(high))
    if op == "Add":
        if not all(i in env for i in ins):
            raise ValueError(f"{where}: only Add of two tensors (residuals) or a dense layer's bias is supported")
        return builder.call(operator.add, env[ins[0]], env[ins[1]])
    if op == "Concat":
        if attrs.get("axis") != 1:
            raise ValueError(f"{where}: only Concat on channels (axis 1) is supported")
        return builder.call(torch.cat, [env[i] for i in ins], 1)
    if op in ("MaxPool", "AveragePool"):
        return _pool(builder, op, x, attrs, where)
    if op == "GlobalAveragePool":
        return builder.call(F.adaptive_avg_pool2d, x, 1)
    if op == "Flatten":
        if attrs.get("axis", 1) != 1:
            raise ValueError(f"{where}: only Flatten(axis=1) is supported")
        return builder.call(torch.flatten, x, 1)
    if op == "Reshape" and ins[1] in consts and consts[ins[1]].shape == (2,):
        return builder.call(torch.flatten, x, 1)  # checked against ONNX Runtime after conversion
    if op in ("Identity", "Dropout"):
        return x
    raise ValueError(f"{where}: unsupported operator; supported: {SUPPORTED}")


def _pool(builder: GraphBuilder, op: str, x: Any, attrs: dict[str, Any], where: str) -> Any:
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:] or attrs.get("ceil_mode", 0) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ValueError(f"{where}: only symmetric explicit padding without ceil_mode is supported")
    kernel = list(attrs["kernel_shape"])
    stride = list(attrs.get("strides", [1, 1]))
    if op == "MaxPool":
        if list(attrs.get("dilations", [1, 1])) != [1, 1]:
            raise ValueError(f"{where}: dilated max pooling is not supported")
        return builder.call(F.max_pool2d, x, kernel, stride, pads[:2])
    if any(pads) and not attrs.get("count_include_pad", 0):
        raise ValueError(f"{where}: padded average pooling must count the padding (count_include_pad=1)")
    return builder.call(F.avg_pool2d, x, kernel, stride, pads[:2], False, True)


def _layer_name(node: Any, consts: dict[str, np.ndarray]) -> str:
    """The module name of a weighted node: its weight's name without ``.weight``, else its scope path."""
    weight = node.input[1] if len(node.input) > 1 else ""
    if weight.endswith(".weight"):
        return weight[: -len(".weight")]
    if node.op_type == "BatchNormalization" and node.input[1].endswith(".weight"):
        return node.input[1][: -len(".weight")]
    parts: list[str] = []
    for segment in node.name.strip("/").split("/")[:-1]:  # torch's scopes: /layer1/layer1.0/conv1/Conv
        parts = segment.split(".") if parts and segment.startswith(".".join(parts) + ".") else parts + [segment]
    return ".".join(parts) or node.name or node.output[0]


def load(path: str | os.PathLike[str], batch: int = 2) -> tuple[torch.nn.Module, tuple[int | None, ...]]:
    """A float ``.onnx`` as (module of standard layers, input shape with None for dynamic dims), checked
    against ONNX Runtime where the shape is known."""
    import onnxruntime

    model = read(path)
    module = from_onnx(model, str(path))
    shape = input_shape(model)
    if len(shape) == 4 and all(d is not None for d in shape[1:]):
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        check_same(module, lambda x: session.run(None, {name: x.numpy()})[0], (shape[0] or batch, *shape[1:]),
                   str(path))
    return module, shape
