"""Quantize what a quantizer left in float, from calibration inputs (``--calib-data``, ``calib_data=``).

NNCF leaves squeeze-excite blocks in float (float conv weights, ReLU, Sigmoid); PT2E leaves operators
that read tensors no QuantizeLinear rounded (a mean of a ReLU'd conv output, a gate times a tensor,
a pool of a pool). Given calibration inputs, hawqc quantizes these regions itself, as a QDQ
quantizer would have: it runs the file's float graph with ONNX Runtime on the inputs, takes the
largest magnitude of each tensor it has to round, and inserts a QuantizeLinear -> DequantizeLinear
pair there (symmetric int8 per tensor, scale ``max|x| / 127``); float conv/gemm weights become int8
per output channel (``max|w| / 127``), their float bias rounding onto the accumulator grid as the
reader rounds NNCF's. Where a pair goes, the reader says:

- every dynamic input of an operator it computed in float, unless a DequantizeLinear gives it, and
  every output of such an operator that is read by anything but a QuantizeLinear (a conv's output
  read only by a ReLU/Clip is left to that activation, whose bounds fold into the rescale);
- every input of an operator that reads a tensor no QuantizeLinear rounded (:class:`Unquantized`),
  found one reading at a time.

The rewritten file is read again until nothing is left in float but operators with no integer form
(a Softmax or ArgMax tail); every rescale of the result is a dyadic number of
:mod:`hawqc.quant.dyadic`, like any other file's. Tensors keep their names, so ranges come from the
original file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ACTIVATION_QMAX = 127
"""Symmetric int8: scale ``max|x| / 127``, zero point 0."""
FLOAT_ONLY = {"Softmax", "ArgMax"}
"""Operators with no integer form: left in float (and reported) even with calibration inputs."""
WEIGHTED = {"Conv", "Gemm", "MatMul"}
MAX_ROUNDS = 256
"""Readings of the rewritten file before giving up (each round quantizes at least one more tensor)."""


@dataclass
class Calibrated:
    """What calibration quantized: tensors given an int8 scale (name -> scale), weights made int8 per
    channel, and the ONNX nodes that were computed in float or refused before."""

    inputs: int
    tensors: dict[str, float] = field(default_factory=dict)
    weights: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        shown = ", ".join(self.nodes[:6]) + (f" and {len(self.nodes) - 6} more" if len(self.nodes) > 6 else "")
        return (f"quantized from {self.inputs} calibration inputs: {len(self.nodes)} ops that computed or read float "
                f"tensors ({shown}); {len(self.tensors)} tensors given int8 scales, {len(self.weights)} weights made "
                "int8 per channel")

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "nodes": self.nodes, "weights": self.weights,
                "tensors": {k: float(v) for k, v in self.tensors.items()}}


def calibration_inputs(data: Any) -> np.ndarray:
    """Calibration inputs as one float32 array (N, ...): an array, a ``.npy`` path, or a list of batches
    (arrays or tensors)."""
    if isinstance(data, (str, os.PathLike)):
        try:
            data = np.load(data, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"{data}: cannot read calibration inputs ({err})") from None
    if isinstance(data, (list, tuple)):
        data = np.concatenate([np.asarray(getattr(x, "numpy", lambda x=x: x)()) for x in data])
    array = np.asarray(data)
    if array.dtype.kind not in "fiu" or array.ndim < 2 or not array.shape[0]:
        raise ValueError(f"calibration inputs must be a non-empty numeric array (N, ...), got {array.dtype} "
                         f"{list(array.shape)}")
    return array.astype(np.float32)


def quantize_float_islands(model: Any, data: Any, read: Any) -> tuple[Any, Any, Calibrated]:
    """``model`` (an ``onnx.ModelProto``) with its float regions quantized from calibration ``data``;
    ``read(model)`` is the reader (returns an :class:`~hawqc.reference.IntegerGraph` or raises
    :class:`Unquantized`). Returns the rewritten model, its graph and what was quantized."""
    from hawqc.frontend.onnx_qdq import Unquantized

    inputs = calibration_inputs(data)
    report = Calibrated(len(inputs))
    current, done = model, set()
    for _ in range(MAX_ROUNDS):
        try:
            graph = read(current)
        except Unquantized as err:
            node = _node(current, err.node)
            edges = set() if node is None else {(t, err.node) for t in _unrounded_inputs(current, node)} - done
            if not edges:
                raise
            weights = []
            report.nodes.append(f"{err.node} ({node.op_type})")
        else:
            floating = [f for f in graph.metadata.get("float_ops", []) if f.rsplit(" (", 1)[1][:-1] not in FLOAT_ONLY]
            if not floating:
                if report.nodes:
                    graph.metadata["calibrated"] = report.to_dict()
                return current, graph, report
            names = {f.rsplit(" (", 1)[0] for f in floating}
            nodes = [n for n in current.graph.node if (n.name or n.output[0]) in names]
            edges, weights = _island_edges(current, nodes) - done, _float_weights(current, nodes)
            if not edges and not weights:
                raise ValueError(f"cannot quantize the float ops {', '.join(floating[:3])} from calibration inputs")
            report.nodes.extend(floating)
        ranges = _ranges(model, sorted({t for t, _ in edges} - set(report.tensors)), inputs)
        report.tensors.update({t: np.float32(r / ACTIVATION_QMAX) if r > 0 else np.float32(1.0)
                               for t, r in ranges.items()})
        current = _with_weights_quantized(_with_pairs(current, edges, report.tensors), weights)
        report.weights.extend(weights)
        done |= edges
    raise ValueError(f"float regions left after {MAX_ROUNDS} rounds of calibration")


def _node(model: Any, name: str) -> Any:
    return next((n for n in model.graph.node if (n.name or n.output[0]) == name), None)


def _producers(model: Any) -> dict[str, Any]:
    return {o: n for n in model.graph.node for o in n.output}


def _constants(model: Any) -> set[str]:
    """Initializers and what Constant nodes give."""
    constant_nodes = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return {t.name for t in model.graph.initializer} | constant_nodes


def _unrounded_inputs(model: Any, node: Any) -> list[str]:
    """The node's dynamic inputs that no DequantizeLinear gives (nor the graph input)."""
    producers, constants = _producers(model), _constants(model)
    graph_inputs = {i.name for i in model.graph.input}
    out = []
    for name in node.input:
        producer = producers.get(name)
        if name and name not in constants and name not in graph_inputs and producer is not None \
                and producer.op_type != "DequantizeLinear" and not _is_constant(model, name, producers, constants):
            out.append(name)
    return out


def _is_constant(model: Any, name: str, producers: dict[str, Any], constants: set[str]) -> bool:
    """Computed from constants only (shape arithmetic, an Identity of a weight)."""
    stack, seen = [name], set()
    while stack:
        t = stack.pop()
        if t in constants or not t or t in seen:
            continue
        seen.add(t)
        producer = producers.get(t)
        if producer is None:
            return False
        stack.extend(producer.input)
    return True


def _island_edges(model: Any, nodes: list[Any]) -> set[tuple[str, str]]:
    """(tensor, reader) pairs to round: the unrounded inputs of the float nodes, and their outputs where
    anything but a QuantizeLinear reads them (a conv's output read only by ReLU/Clip: at the activation)."""
    readers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    weights = {n.input[1] for n in nodes if n.op_type in WEIGHTED and len(n.input) > 1}
    edges = set()
    for node in nodes:
        if node.op_type in FLOAT_ONLY:
            continue
        edges |= {(t, node.name or node.output[0]) for t in _unrounded_inputs(model, node) if t not in weights}
        for out in node.output:
            others = [r for r in readers.get(out, []) if r.op_type != "QuantizeLinear"]
            if node.op_type in WEIGHTED and others and all(r.op_type in ("Relu", "Clip") for r in others):
                continue
            edges |= {(out, r.name or r.output[0]) for r in others if r.op_type not in FLOAT_ONLY}
    return edges


def _float_weights(model: Any, nodes: list[Any]) -> list[str]:
    """The float weights (constants not given by a DequantizeLinear) of the float conv/gemm nodes."""
    producers, constants = _producers(model), _constants(model)
    return sorted({n.input[1] for n in nodes if n.op_type in WEIGHTED and len(n.input) > 1
                   and (producers.get(n.input[1]) is None or producers[n.input[1]].op_type != "DequantizeLinear")
                   and _is_constant(model, n.input[1], producers, constants)})


def _ranges(model: Any, tensors: list[str], inputs: np.ndarray) -> dict[str, float]:
    """The largest magnitude of each tensor over the calibration inputs (ONNX Runtime, the file as written)."""
    if not tensors:
        return {}
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    probe = onnx.ModelProto.FromString(model.SerializeToString())
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # Q/DQ as written
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001  (ONNX Runtime's own exception types)
        raise ValueError(f"ONNX Runtime cannot run the file to calibrate it: {str(err).splitlines()[0]}") from None
    feed = session.get_inputs()[0]
    batch = feed.shape[0] if isinstance(feed.shape[0], int) else 8
    if list(inputs.shape[1:]) != [d for d in feed.shape[1:]] and all(isinstance(d, int) for d in feed.shape[1:]):
        raise ValueError(f"calibration inputs of shape {list(inputs.shape)} do not fit the model's input "
                         f"{['N' if not isinstance(d, int) else d for d in feed.shape]}")
    peaks = np.zeros(len(tensors))
    for start in range(0, len(inputs), batch):
        chunk = inputs[start:start + batch]
        if len(chunk) < batch and isinstance(feed.shape[0], int):
            chunk = np.concatenate([chunk, inputs[:batch - len(chunk)]])  # a fixed batch: filled from the start
        outs = session.run(None, {feed.name: chunk})
        peaks = np.maximum(peaks, [float(np.abs(o).max()) if np.size(o) else 0.0 for o in outs])
    return dict(zip(tensors, peaks.tolist()))


def _with_pairs(model: Any, edges: Iterable[tuple[str, str]], scales: dict[str, float]) -> Any:
    """``model`` with a QuantizeLinear -> DequantizeLinear pair (int8, zero point 0) on each (tensor,
    reader) edge, placed right after the tensor's producer."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    readers: dict[str, set[str]] = {}
    for tensor, reader in edges:
        readers.setdefault(tensor, set()).add(reader)
    pairs: dict[str, list[Any]] = {}
    existing = {o for n in model.graph.node for o in n.output}
    for tensor in readers:
        base = f"{tensor}:hawqc_calibrated"
        if base in existing:  # rounded for another reader already
            continue
        model.graph.initializer.extend([numpy_helper.from_array(np.array(scales[tensor], np.float32), f"{base}_scale"),
                                        numpy_helper.from_array(np.array(0, np.int8), f"{base}_zero")])
        pairs[tensor] = [helper.make_node("QuantizeLinear", [tensor, f"{base}_scale", f"{base}_zero"], [f"{base}_q"],
                                          name=f"{base}_q"),
                         helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zero"],
                                          [f"{base}"], name=f"{base}_dq")]
    nodes = list(model.graph.node)
    for node in nodes:
        if (node.name or node.output[0]) in {r for rs in readers.values() for r in rs}:
            for k, name in enumerate(node.input):
                if name in readers and (node.name or node.output[0]) in readers[name]:
                    node.input[k] = f"{name}:hawqc_calibrated"
    ordered = [p for t in pairs if t not in _producers(model) for p in pairs[t]]  # graph inputs first
    for node in nodes:
        ordered.append(node)
        ordered.extend(p for t in node.output if t in pairs for p in pairs[t])
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


def _with_weights_quantized(model: Any, weights: list[str]) -> Any:
    """``model`` with each float weight (a constant) replaced by int8 values per output channel and a
    DequantizeLinear (axis 0 for a conv or a transposed gemm weight, 1 for a MatMul's)."""
    if not weights:
        return model
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in model.graph.initializer}
    producers = _producers(model)
    added = []
    for name in weights:
        reader = next(n for n in model.graph.node if n.op_type in WEIGHTED and len(n.input) > 1 and n.input[1] == name)
        value = _constant_value(model, name, inits, producers, ReferenceEvaluator)
        column = reader.op_type == "MatMul" or (
            reader.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in reader.attribute))
        axis = 1 if column else 0
        peak = np.abs(np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)).max(axis=1).astype(np.float32)
        scale = np.where(peak > 0, peak / np.float32(ACTIVATION_QMAX), np.float32(1.0)).astype(np.float32)
        shape = [1] * value.ndim
        shape[axis] = -1
        q = np.clip(np.rint(value / scale.reshape(shape)), -ACTIVATION_QMAX, ACTIVATION_QMAX).astype(np.int8)
        base = f"{name}:hawqc_int8"
        model.graph.initializer.extend([numpy_helper.from_array(q, base),
                                        numpy_helper.from_array(scale, f"{base}_scale"),
                                        numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{base}_zero")])
        added.append(helper.make_node("DequantizeLinear", [base, f"{base}_scale", f"{base}_zero"], [f"{base}_dq"],
                                      name=f"{base}_dq", axis=axis))
        for node in model.graph.node:
            if node.op_type in WEIGHTED and len(node.input) > 1 and node.input[1] == name:
                node.input[1] = f"{base}_dq"
    nodes = added + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _constant_value(model: Any, name: str, inits: dict[str, Any], producers: dict[str, Any],
                    evaluator: Any) -> np.ndarray:
    """A constant tensor's value: an initializer, or computed from constants only (an Identity of one)."""
    from onnx import helper, numpy_helper

    if name in inits:
        return numpy_helper.to_array(inits[name]).astype(np.float32)
    chain, stack = [], [name]
    while stack:
        t = stack.pop()
        if t in inits or not t or any(t in n.output for n in chain):
            continue
        chain.append(producers[t])
        stack.extend(producers[t].input)
    used = {i for n in chain for i in n.input}
    position = {n.output[0]: k for k, n in enumerate(model.graph.node)}
    graph = helper.make_graph(sorted(chain, key=lambda n: position[n.output[0]]), "weight", [],
                              [helper.make_tensor_value_info(name, 0, None)], [inits[i] for i in used if i in inits])
    sub = helper.make_model(graph, opset_imports=model.opset_import)
    return np.asarray(evaluator(sub).run(None, {})[0], np.float32)

