"""Export a :class:`~hawqc.quant.model.QuantModel` as a standard ONNX QDQ model.

Every quantized activation is ``QuantizeLinear -> DequantizeLinear`` (zero point 0: int8, or
int4/uint4 at opset 21); weights are int8/int4 initializers behind a per-channel
``DequantizeLinear`` (axis 0); biases are int32 behind a ``DequantizeLinear`` with scale
``S_in * S_w``. Activations are their ONNX operators (SiLU and HardSwish as ``x * Sigmoid(x)``,
``x * HardSigmoid(x)``), a standalone BatchNorm a ``BatchNormalization`` with float parameters, a bilinear
resize a ``Resize`` by factors, each between a ``DequantizeLinear`` and a ``QuantizeLinear``. A conv output that the integer graph keeps as an int32 accumulator (it feeds an add
or a concat) goes to that add/concat unquantized, which is how a QDQ reader recognises it. The
resolved bit config is stored in the model's metadata (``hawqc.bit_config``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

import hawqc
from hawqc.fileio import atomic_output
from hawqc.quant.activations import ACTIVATIONS
from hawqc.quant.capture import pool_window
from hawqc.quant.model import QuantModel, moved_ops, resize_scales, resize_transform
from hawqc.quant.quantizers import ActQuantizer
from hawqc.reference.graph import IntOp

INT4_OPSET = 21
_ZERO_POINT_TYPES = {(8, True): TensorProto.INT8, (8, False): TensorProto.UINT8,
                     (4, True): TensorProto.INT4, (4, False): TensorProto.UINT4}


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, data_type: int, array: np.ndarray) -> str:
        array = np.asarray(array)
        self.inits.append(helper.make_tensor(name, data_type, array.shape, array.ravel().tolist()))
        return name

    def node(self, op: str, inputs: list[str], output: str, node_name: str | None = None, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=node_name or output, **attrs))
        return output

    def relu(self, src: str, name: str, upper: float | None) -> str:
        """``Relu``, or ``Clip(0, upper)`` for a bounded one (ReLU6)."""
        if upper is None:
            return self.node("Relu", [src], name)
        bounds = [self.const(f"{name}.{k}", TensorProto.FLOAT, np.float32(v)) for k, v in (("min", 0.0), ("max", upper))]
        return self.node("Clip", [src, *bounds], name)

    def moved(self, ops: list[IntOp], names: dict[str, str]) -> str:
        """Integer data movement (``slice``, ``reshape``, ``transpose`` ops) as the ONNX nodes that mean it;
        ``names``: ONNX names of the ops' outside inputs. Returns the last output."""
        for op in ops:
            x, out = names.get(op.inputs[0], op.inputs[0]), op.output
            if op.op == "slice":
                bounds = [self.const(f"{out}.{k}", TensorProto.INT64, np.asarray(op.attrs[v], np.int64))
                          for k, v in (("starts", "begin"), ("ends", "end"), ("axes", "axes"), ("steps", "strides"))]
                self.node("Slice", [x, *bounds], out)
            elif op.op == "reshape":
                shape = self.const(f"{out}.shape", TensorProto.INT64, np.asarray(op.attrs["shape"]))
                self.node("Reshape", [x, shape], out)
            else:
                self.node("Transpose", [x], out, perm=op.attrs["perm"])
        return ops[-1].output

    def qdq(self, src: str, name: str, quantizer: ActQuantizer) -> str:
        scale = self.const(f"{name}.scale", TensorProto.FLOAT, np.float32(quantizer.scale.item()))
        zp = self.const(f"{name}.zero_point", _ZERO_POINT_TYPES[(quantizer.bits, quantizer.signed)], np.int8(0))
        q = self.node("QuantizeLinear", [src, scale, zp], f"{name}.q")
        return self.node("DequantizeLinear", [q, scale, zp], f"{name}.dq")


def to_onnx(qmodel: QuantModel, path: str | os.PathLike[str], example_input: Any = None,
            opset: int | None = None) -> onnx.ModelProto:
    """Write ``qmodel`` to ``path`` as an ONNX QDQ model (atomically) and return it.

    ``example_input`` (a batch) fixes the input's channel and spatial sizes; without it the
    calibration shape is used. The batch dimension stays symbolic. ``opset`` defaults to 13, or 21
    when any weight or activation is 4-bit.
    """
    needs_int4 = any(b.w_bits == 4 for b in qmodel.bits.values()) or any(q.bits == 4 for q in qmodel.acts.values())
    opset = opset or (INT4_OPSET if needs_int4 else 13)
    if needs_int4 and opset < INT4_OPSET:
        raise ValueError(f"4-bit tensors need ONNX opset {INT4_OPSET} or later, got opset {opset}")
    if opset < 13:
        raise ValueError(f"per-channel QDQ needs ONNX opset 13 or later, got {opset}")
    shape = tuple(np.asarray(example_input).shape[1:]) if example_input is not None else qmodel.input_shape
    if not shape:
        raise ValueError("give example_input: the model has no calibration shape")
    trace: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out_shape = qmodel._float_forward(torch.zeros(1, *shape), fake=False, observe=False, trace=trace).shape[1:]
    g = _Builder()
    values: dict[str, str] = {}
    for node in qmodel.nodes:
        name, kind, attrs = node.name, node.kind, node.attrs
        ins = [values[i] for i in node.inputs]
        if kind == "output":
            g.node("Identity", ins, "output")
            break
        if kind == "input":
            out = "input"
        elif kind in ("conv", "dense"):
            layer = qmodel.layer(node)
            p = layer.integer_params(qmodel.input_scale(node))  # the integers the integer graph runs
            w_type = TensorProto.INT4 if layer.w_bits == 4 else TensorProto.INT8
            wq = g.const(f"{node.layer}.weight_quantized", w_type, p["weight"])
            w = g.node("DequantizeLinear", [wq, g.const(f"{node.layer}.weight_scale", TensorProto.FLOAT,
                                                          p["w_scale"])], f"{node.layer}.weight", axis=0)
            bq = g.const(f"{node.layer}.bias_quantized", TensorProto.INT32, p["bias"])
            b = g.node("DequantizeLinear", [bq, g.const(f"{node.layer}.bias_scale", TensorProto.FLOAT,
                                                          p["acc_scale"])], f"{node.layer}.bias", axis=0)
            if kind == "conv":
                conv = layer.layer
                out = g.node("Conv", [ins[0], w, b], name, node.layer, strides=list(conv.stride), pads=layer.padding,
                             dilations=list(conv.dilation), group=conv.groups,
                             kernel_shape=list(conv.kernel_size))
            else:
                out = g.node("Gemm", [ins[0], w, b], name, node.layer, transB=1)
        elif kind == "add":
            out = g.node("Add", ins, name)
        elif kind == "concat":
            out = g.node("Concat", ins, name, axis=1)
        elif kind == "maxpool":
            out = g.node("MaxPool", ins, name, kernel_shape=attrs["kernel"], strides=attrs["stride"],
                         pads=attrs["padding"] * 2, ceil_mode=int(attrs.get("ceil_mode", False)))
        elif kind == "avgpool":
            attrs = pool_window(attrs, trace[node.inputs[0]].shape[2:])
            out = g.node("AveragePool", ins, name, kernel_shape=attrs["kernel"], strides=attrs["stride"],
                         pads=attrs["padding"] * 2, count_include_pad=1)
        elif kind == "gap":
            out = g.node("GlobalAveragePool", ins, name)
        elif kind == "flatten":
            out = g.node("Flatten", ins, name, axis=1)
        elif kind == "act":
            activation = ACTIVATIONS[attrs["fn"]]
            f = g.node(activation.onnx_op, ins, f"{name}.f" if activation.times_input else name, **activation.attrs())
            out = g.node("Mul", [ins[0], f], name) if activation.times_input else f
        elif kind == "mul":
            out = g.node("Mul", ins, name)
        elif kind == "bn":
            bn = qmodel.norm(node)
            params = [g.const(f"{node.layer}.{k}", TensorProto.FLOAT, getattr(bn, k).detach().numpy().astype(np.float32))
                      for k in ("weight", "bias", "running_mean", "running_var")]
            out = g.node("BatchNormalization", [ins[0], *params], name, node.layer, epsilon=float(bn.eps))
        elif kind == "resize":
            factors = resize_scales(tuple(trace[node.inputs[0]].shape[2:]), tuple(trace[name].shape[2:]))
            scales = g.const(f"{name}.scales", TensorProto.FLOAT, np.array([1.0, 1.0, *factors], np.float32))
            out = g.node("Resize", [ins[0], "", scales], name, mode="linear",
                         coordinate_transformation_mode=resize_transform(attrs["align_corners"]))
        elif kind in ("slice", "shuffle"):
            out = g.moved(moved_ops(node, list(trace[node.inputs[0]].shape)), {node.inputs[0]: ins[0]})
        else:
            out = g.relu(ins[0], name, node.relu_max)
        if node.relu:
            out = g.relu(out, f"{name}.relu", node.relu_max)
        if name in qmodel.acts:
            out = g.qdq(out, name, qmodel.acts[name])
        elif kind in ("avgpool", "gap", "maxpool"):  # pooled integers stay on the input's grid
            out = g.qdq(out, name, qmodel.acts[qmodel.scale_source[name]])
        values[name] = out
    model = helper.make_model(
        helper.make_graph(g.nodes, "hawqc", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", *out_shape])], g.inits),
        opset_imports=[helper.make_opsetid("", opset)], producer_name="hawqc", producer_version=hawqc.__version__)
    helper.set_model_props(model, {"hawqc.bit_config": json.dumps({k: v.to_dict() for k, v in qmodel.bits.items()}),
                                   "hawqc.version": hawqc.__version__})
    onnx.checker.check_model(model)
    with atomic_output(path) as tmp:
        onnx.save(model, str(tmp))
    return model
