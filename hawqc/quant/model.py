"""``QuantModel``: a captured model with HAWQ-V3 quantizers, and ``quantize`` (PTQ).

Where tensors are quantized (the plan, fixed at construction):

- the input, and every conv/dense output that feeds anything but an add or a concat, get their own
  activation quantizer; so do add and concat outputs;
- a conv/dense output feeding only adds/concats stays an int32 accumulator: each add/concat input
  is requantized straight to the output scale by its own dyadic number (HAWQ-V3's residual rule);
- max/avg/global-avg pool, flatten and ReLU keep their input's scale;
- a bounded ReLU (ReLU6) clips at its bound on the integer grid of the tensor it is rounded to,
  ``rint(6 / scale)``: in the requantization of its conv/dense/add, or in its own clip;
- an activation (sigmoid, hard-sigmoid, SiLU, hard-swish), a product of two tensors (a squeeze-excite
  gate), a BatchNorm that follows no conv (its running statistics: a per-channel affine map, rounded
  once with the ReLU after it) and a bilinear resize read quantized tensors and get their own quantizer;
  the integer graph computes an activation as a table over its input's integers, the others as an
  int32 product / affine map / exact weighted sum requantized by one dyadic number;
- an activation's bits are the largest ``a_bits`` of the layers that read it (8 if none), and it is
  unsigned only when it is 4-bit and non-negative (after a ReLU).

Modes (``QuantModel.mode``): ``"int"`` runs the integer graph with torch kernels, the integers
the deployed graph must produce; ``"fake"`` is the QAT forward (fake-quant, straight-through
gradients); ``"float"`` is the folded float model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hawqc import distributed
from hawqc.bitconfig import BitConfig, LayerBits
from hawqc.quant.activations import ACTIVATIONS
from hawqc.quant.capture import Node, capture, pool_window
from hawqc.quant.dyadic import bias_in_accumulator
from hawqc.quant.modules import INT32_MAX, INT32_MIN, QuantConv2d, QuantLinear
from hawqc.quant.quantizers import ActQuantizer
from hawqc.quant.resize import resize_consts
from hawqc.reference.graph import (
    AddInput,
    IntegerGraph,
    IntOp,
    accumulator_bound,
    accumulator_grid_bits,
    affine_op,
    aligned_add_ops,
    batch_norm_affine,
    execute,
    lut_op,
    pool_consts,
    product_op,
    rescale_op,
)

MODES = ("int", "fake", "float")
_RESCALING = {"add", "concat", "output"}
_SCALE_PRESERVING = {"maxpool", "avgpool", "gap", "flatten", "relu", "slice", "shuffle"}
_OWN_SCALE = {"input", "add", "concat", "act", "mul", "bn", "resize"}
"""Kinds whose output always gets its own activation quantizer."""


def _key(layer: str) -> str:
    """ModuleDict keys cannot hold dots."""
    return layer.replace(".", "/")


def _pads(padding: list[int]) -> list[int]:
    return [padding[0], padding[1], padding[0], padding[1]]


class QuantModel(nn.Module):
    """A quantized model: captured graph, quantized layers and activation quantizers."""

    def __init__(self, model: nn.Module, bits: Mapping[str, LayerBits], observer: str = "minmax",
                 momentum: float = 0.9, percentile: float = 99.99, weight_percentile: float | None = None) -> None:
        super().__init__()
        self.nodes = capture(model.eval())
        self.bits = dict(bits)
        self.mode = "int"
        modules = dict(model.named_modules())
        self.layers = nn.ModuleDict()
        self.norms = nn.ModuleDict()
        for node in self.nodes:
            if node.kind == "bn":
                self.norms[_key(node.layer)] = copy.deepcopy(modules[node.layer])
            if node.kind in ("conv", "dense"):
                w_bits = self.bits[node.layer].w_bits
                self.layers[_key(node.layer)] = (
                    QuantConv2d(modules[node.layer], modules.get(node.bn), w_bits, weight_percentile,
                                node.attrs["padding"])
                    if node.kind == "conv" else QuantLinear(modules[node.layer], w_bits, weight_percentile))
        consumers: dict[str, list[Node]] = {n.name: [] for n in self.nodes}
        for node in self.nodes:
            for i in node.inputs:
                consumers[i].append(node)
        self.accumulators = {n.name for n in self.nodes if n.kind in ("conv", "dense")
                             and all(c.kind in _RESCALING for c in consumers[n.name])}
        nonneg: dict[str, bool] = {}
        self.scale_source: dict[str, str] = {}
        self.acts = nn.ModuleDict()
        for node in self.nodes:
            ins = node.inputs
            nonneg[node.name] = node.relu or node.kind == "relu" or (
                node.kind in _SCALE_PRESERVING | {"concat", "mul", "resize"} and all(nonneg[i] for i in ins)) or (
                node.kind == "act" and ACTIVATIONS[node.attrs["fn"]].nonneg)
            if node.kind in _SCALE_PRESERVING:
                self.scale_source[node.name] = self.scale_source[ins[0]]
            elif node.kind in _OWN_SCALE or (
                    node.kind in ("conv", "dense") and node.name not in self.accumulators):
                a_bits = self._reader_bits(node.name, consumers)
                self.acts[node.name] = ActQuantizer(a_bits, signed=not (a_bits == 4 and nonneg[node.name]),
                                                    relu=node.relu, observer=observer, momentum=momentum,
                                                    percentile=percentile)
                self.scale_source[node.name] = node.name
        self.input_shape: tuple[int, ...] = ()
        self._int_cache: tuple[tuple[int, ...], IntegerGraph] | None = None

    def _reader_bits(self, name: str, consumers: Mapping[str, list[Node]]) -> int:
        """Largest a_bits of the layers reading tensor ``name`` (through scale-preserving ops)."""
        found, stack = [], list(consumers[name])
        while stack:
            node = stack.pop()
            if node.kind in ("conv", "dense"):
                found.append(self.bits[node.layer].a_bits)
            elif node.kind in _SCALE_PRESERVING:
                stack.extend(consumers[node.name])
        return max(found, default=8)

    def layer(self, node: Node) -> QuantConv2d | QuantLinear:
        """The quantized layer of a conv/dense node."""
        return self.layers[_key(node.layer)]

    def norm(self, node: Node) -> nn.BatchNorm2d:
        """The BatchNorm of a bn node (a copy of the source model's)."""
        return self.norms[_key(node.layer)]

    def input_scale(self, node: Node) -> np.float32:
        """The float32 scale of a node's (first) integer input."""
        return np.float32(self.acts[self.scale_source[node.inputs[0]]].scale.item())

    # ---- float and fake-quant execution ---------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "int":
            return execute(self.integer_graph(), x, _torch_kernels())
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        return self._float_forward(x, fake=self.mode == "fake", observe=False)

    def node_inputs(self, x: torch.Tensor, name: str, fake: bool) -> list[torch.Tensor]:
        """The input tensors of node ``name`` when running ``x`` with fake quantization or in float
        (the run stops there)."""
        found = self._float_forward(x, fake=fake, observe=False, stop_at=name)
        assert isinstance(found, list), f"no node {name!r}"
        return found

    def segment_forward(self, x: torch.Tensor, after: str, last: str, fake: bool) -> torch.Tensor:
        """The value of node ``last`` (quantized if ``fake``) when node ``after``'s value is ``x``:
        the nodes between them must read nothing from before ``after`` but its value."""
        names = [n.name for n in self.nodes]
        start, stop = names.index(after), names.index(last)
        values = self._run(x, self.nodes[start + 1:stop + 1], {after: x}, fake, observe=False)
        assert isinstance(values, dict)
        return values[last]

    def _float_forward(self, x: torch.Tensor, fake: bool, observe: bool, stop_at: str | None = None,
                       world: distributed.World | None = None,
                       trace: dict[str, torch.Tensor] | None = None) -> torch.Tensor | list[torch.Tensor]:
        """The float or fake-quantized forward; ``observe`` feeds the activation quantizers' observers
        (with ``world``, the ranks calibrating together); ``trace`` keeps every node's value."""
        found = self._run(x, self.nodes, trace if trace is not None else {}, fake, observe, stop_at, world)
        if isinstance(found, dict):
            raise AssertionError("captured graph has no output")
        return found

    def _run(self, x: torch.Tensor, nodes: list[Node], values: dict[str, torch.Tensor], fake: bool, observe: bool,
             stop_at: str | None = None, world: distributed.World | None = None
             ) -> torch.Tensor | list[torch.Tensor] | dict[str, torch.Tensor]:
        """Run ``nodes`` on ``values`` (the values computed before them); the output, the inputs of
        ``stop_at``, or (neither reached) every value."""
        for node in nodes:
            ins = [values[i] for i in node.inputs]
            kind, attrs = node.kind, node.attrs
            if node.name == stop_at:
                return ins
            if kind == "output":
                return ins[0]
            if kind == "input":
                y = x
            elif kind in ("conv", "dense"):
                layer = self.layer(node)
                if fake:
                    y = layer.fake_forward(ins[0], self.acts[self.scale_source[node.inputs[0]]].scale)
                else:
                    y = layer.float_forward(ins[0])
            elif kind == "add":
                y = ins[0] + ins[1]  # the integer add rounds the sum once, as the output's quantizer does
            elif kind == "concat":
                y = torch.cat(ins, dim=1)
            elif kind == "maxpool":
                y = F.max_pool2d(ins[0], attrs["kernel"], attrs["stride"], attrs["padding"],
                                 ceil_mode=attrs.get("ceil_mode", False))
            elif kind == "avgpool":
                window = pool_window(attrs, ins[0].shape[2:])
                y = F.avg_pool2d(ins[0], window["kernel"], window["stride"], window["padding"], count_include_pad=True)
            elif kind == "gap":
                y = ins[0].mean(dim=(2, 3), keepdim=True)
            elif kind == "flatten":
                y = ins[0].flatten(1)
            elif kind == "slice":
                y = ins[0].chunk(attrs["parts"], dim=1)[attrs["index"]]
            elif kind == "shuffle":
                y = ins[0].unflatten(1, (attrs["groups"], -1)).transpose(1, 2).flatten(1, 2)
            elif kind == "act":
                y = ACTIVATIONS[attrs["fn"]].torch_fn(ins[0])
            elif kind == "mul":
                y = ins[0] * ins[1]
            elif kind == "bn":
                bn = self.norm(node)
                y = F.batch_norm(ins[0], bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
            elif kind == "resize":
                size = values[attrs["size_of"]].shape[2:] if "size_of" in attrs else attrs.get("size")
                y = F.interpolate(ins[0], size=size, scale_factor=attrs.get("scale_factor"), mode="bilinear",
                                  align_corners=attrs["align_corners"])
            else:  # relu
                y = _relu(ins[0], node.relu_max)
            if node.relu:
                y = _relu(y, node.relu_max)
            if node.name in self.acts:
                quantizer = self.acts[node.name]
                if observe:
                    quantizer.observe(y, world)
                if fake:
                    y = quantizer.fake(y)
            elif fake and kind in ("avgpool", "gap"):  # integer pooling rounds to the input's grid
                y = self.acts[self.scale_source[node.name]].fake(y)
            values[node.name] = y
        return values

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Any]) -> int:
        """Observe activation ranges on float batches, then fix the scales. Returns the batch count.

        Under ``torchrun`` every rank calibrates together, batch by batch (each rank gives the same
        number of batches: its shards of the global batches, or the same batches): the ranges are
        those of the global batches on every rank."""
        world = distributed.setup()
        count, shape = 0, None
        for batch in batches:
            x = _as_input(batch)
            if shape is not None and x.shape[1:] != shape:
                raise ValueError(f"calibration batch {count} has shape {tuple(x.shape)}, earlier batches "
                                 f"{(-1, *shape)}")
            shape = x.shape[1:]
            try:
                self._float_forward(x, fake=False, observe=True, world=world)
            except RuntimeError as err:
                raise ValueError(f"calibration batch of shape {tuple(x.shape)} does not fit the model: "
                                 f"{str(err).splitlines()[0]}") from None
            count += 1
        if count == 0:
            raise ValueError("calibration data is empty: give at least one batch of inputs")
        for name, quantizer in self.acts.items():
            quantizer.freeze(name)
        self.input_shape = tuple(int(d) for d in shape)
        return count

    # ---- the integer graph ----------------------------------------------------------------------
    def integer_graph(self) -> IntegerGraph:
        """The integer-only program of this model (rebuilt only when parameters or scales change)."""
        key = tuple(t._version for t in [*self.parameters(), *self.buffers()])
        if self._int_cache is None or self._int_cache[0] != key:
            self._int_cache = (key, self._build_integer_graph())
        return self._int_cache[1]

    @torch.no_grad()
    def _build_integer_graph(self) -> IntegerGraph:
        ops: list[IntOp] = []
        # QInt tensors: (scale, qmin, qmax); accumulators: (input scale, weight scales, acc scales, bias
        # fraction, lo, float upper bound of a fused ReLU6 or None, largest |acc|)
        qint: dict[str, tuple[np.float32, int, int]] = {}
        acc: dict[str, tuple[np.float32, np.ndarray, np.ndarray, np.ndarray, int, float | None, int]] = {}

        def rescale(src: str, dst: str, scale_out: np.float32, lo: int, hi: int) -> None:
            if src in acc:
                s_in, s_w, _, fraction, acc_lo, acc_max, _ = acc[src]
                ops.append(rescale_op(src, dst, s_in, s_w, scale_out, max(lo, acc_lo), _upper(acc_max, scale_out, hi),
                                      fraction=fraction))
            else:
                ops.append(rescale_op(src, dst, qint[src][0], np.float32(1.0), scale_out, lo, hi))

        def add_input(src: str, dst: str, j: int, scale_out: np.float32, qmin: int, qmax: int) -> AddInput:
            """Input ``j`` of the add ``dst`` (output bounds ``qmin``, ``qmax``): a QInt tensor, an accumulator as
            it is, or one with a ReLU requantized onto a grid ``2^accumulator_grid_bits`` times finer than the
            add's output."""
            if src not in acc:
                s, lo, hi = qint[src]
                return AddInput(src, np.float64(s), 0, max(abs(lo), abs(hi)))
            s_in, s_w, _, fraction, acc_lo, acc_max, bound = acc[src]
            if acc_lo == INT32_MIN and acc_max is None:
                return AddInput(src, np.float64(s_in) * np.asarray(s_w, np.float64), 0, bound, fraction, accumulator=True)
            fine = np.float32(scale_out / np.float32(2 ** accumulator_grid_bits(qmin, qmax)))
            rescale(src, f"{dst}:in{j}", fine, INT32_MIN, INT32_MAX)
            return AddInput(f"{dst}:in{j}", np.float64(fine), 0, 2**31)

        output = None
        shapes: dict[str, list[int]] = {}
        if any(node.kind in ("slice", "shuffle", "resize") or "output_size" in node.attrs for node in self.nodes):  # from a float run
            trace: dict[str, torch.Tensor] = {}
            self._float_forward(torch.zeros(1, *self.input_shape), fake=False, observe=False, trace=trace)
            shapes = {k: list(v.shape) for k, v in trace.items()}
        for node in self.nodes:
            name, kind, attrs = node.name, node.kind, node.attrs
            quantizer = self.acts[name] if name in self.acts else None
            qmin, qmax = quantizer.qrange if quantizer is not None else (0, 0)
            scale = np.float32(quantizer.scale.item()) if quantizer is not None else np.float32(0)
            if quantizer is not None:
                qmax = _upper(node.relu_max, scale, qmax)
            if kind == "input":
                ops.append(IntOp("quantize", ["input"], name, {"qmin": qmin, "qmax": qmax},
                                 {"scale": np.array(scale, dtype=np.float32)}))
            elif kind in ("conv", "dense"):
                layer = self.layer(node)
                s_in = self.input_scale(node)
                p = layer.integer_params(s_in)
                target = name if name in self.accumulators else f"{name}:acc"
                a_bits = self.acts[self.scale_source[node.inputs[0]]].bits
                op_attrs = {"layer": node.layer, "w_bits": layer.w_bits, "a_bits": a_bits}
                if kind == "conv":
                    conv = layer.layer
                    op_attrs.update(stride=list(conv.stride), padding=list(layer.padding),
                                    dilation=list(conv.dilation), groups=conv.groups)
                # the export's bias means p["bias"] * float32(acc_scale): its fraction on the exact grid is kept
                bias, fraction = bias_in_accumulator(p["bias"], p["acc_scale"], s_in, p["w_scale"])
                ops.append(IntOp("conv2d" if kind == "conv" else "dense", node.inputs, target, op_attrs,
                                 {"weight": p["weight"], "bias": bias.astype(np.int32)}))
                in_lo, in_hi = qint[node.inputs[0]][1:]
                acc[target] = (s_in, p["w_scale"], p["acc_scale"], fraction, 0 if node.relu else INT32_MIN,
                               node.relu_max, accumulator_bound(p["weight"], in_lo, in_hi, bias))
                if target != name:
                    rescale(target, name, scale, qmin, qmax)
            elif kind == "add":  # the real sum, rounded once
                ops.extend(aligned_add_ops([add_input(src, name, j, scale, qmin, qmax) for j, src in enumerate(node.inputs)],
                                           name, scale, qmin, qmax))
            elif kind == "concat":
                parts = [f"{name}:in{j}" for j in range(len(node.inputs))]
                for src, part in zip(node.inputs, parts):
                    rescale(src, part, scale, qmin, qmax)
                ops.append(IntOp(kind, parts, name))
            elif kind in ("act", "mul", "bn", "resize"):
                self._own_scale_ops(node, ops, qint, shapes, scale, qmin, qmax)
            elif kind == "output":
                src = node.inputs[0]
                out_scale = acc[src][2] if src in acc else np.array(qint[src][0], dtype=np.float32)
                ops.append(IntOp("dequantize", [src], "output", {}, {"scale": out_scale}))
                output = "output"
            else:
                s, in_min, in_max = qint[node.inputs[0]]
                if kind == "maxpool":
                    pool = {"kernel": attrs["kernel"], "stride": attrs["stride"], "padding": _pads(attrs["padding"]),
                            **({"ceil_mode": True} if attrs.get("ceil_mode") else {})}
                    ops.append(IntOp("maxpool", node.inputs, name, pool))
                elif kind == "avgpool":
                    attrs = pool_window(attrs, shapes.get(node.inputs[0], [])[2:])
                    bound = max(abs(in_min), abs(in_max))
                    consts, tie = pool_consts(1.0, 1.0, attrs["kernel"][0] * attrs["kernel"][1], bound)
                    ops.append(IntOp("avgpool", node.inputs, name,
                                     {"kernel": attrs["kernel"], "stride": attrs["stride"],
                                      "padding": _pads(attrs["padding"]), "qmin": in_min, "qmax": in_max, **tie},
                                     consts))
                elif kind == "gap":
                    ops.append(IntOp("global_avgpool", node.inputs, name,
                                     {"qmin": in_min, "qmax": in_max, "input_scale": 1.0,
                                      "input_bound": max(abs(in_min), abs(in_max))}))
                elif kind == "flatten":
                    ops.append(IntOp("flatten", node.inputs, name))
                elif kind in ("slice", "shuffle"):
                    ops.extend(moved_ops(node, shapes[node.inputs[0]]))
                else:  # relu
                    in_min, in_max = max(in_min, 0), _upper(node.relu_max, s, in_max)
                    ops.append(IntOp("clip", node.inputs, name, {"qmin": in_min, "qmax": in_max}))
                qint[name] = (s, in_min, in_max)
                continue
            if quantizer is not None:
                qint[name] = (scale, qmin, qmax)
        metadata = {"bit_config": {k: v.to_dict() for k, v in self.bits.items()},
                    "input_shape": [None, *self.input_shape]}
        return IntegerGraph("input", output or "output", ops, metadata)

    def _own_scale_ops(self, node: Node, ops: list[IntOp], qint: Mapping[str, tuple[np.float32, int, int]],
                       shapes: Mapping[str, list[int]], scale: np.float32, qmin: int, qmax: int) -> None:
        """The integer ops of an activation, product, standalone BatchNorm or resize of quantized tensors,
        rounded to ``scale`` and [qmin, qmax] (the ops the ONNX reader makes of :func:`~hawqc.quant.export.to_onnx`'s
        nodes for them)."""
        name, src = node.name, node.inputs[0]
        s_in, in_min, in_max = qint[src]
        if node.kind == "act":
            ops.append(lut_op(src, name, ACTIVATIONS[node.attrs["fn"]].table_fn(), (in_min, in_max), s_in, scale,
                              qmin, qmax))
            return
        if node.kind == "mul":
            ops.append(product_op(src, node.inputs[1], name, s_in, qint[node.inputs[1]][0], scale, qmin, qmax))
            return
        if node.kind == "bn":
            bn = self.norm(node)
            params = (t.detach().cpu().numpy().astype(np.float32) for t in (bn.weight, bn.bias, bn.running_mean,
                                                                              bn.running_var))  # as exported
            gain, offset = batch_norm_affine(*params, np.float32(bn.eps))
            op, s_w, fraction = affine_op(src, f"{name}:acc", gain, offset, s_in, 1.0, max(abs(in_min), abs(in_max)))
        else:  # resize
            (h, w), (out_h, out_w) = shapes[src][2:], shapes[name][2:]
            consts, denominator = resize_consts((h, w), (out_h, out_w), resize_scales((h, w), (out_h, out_w)),
                                                "linear", resize_transform(node.attrs["align_corners"]))
            op, s_w, fraction = IntOp("resize", [src], f"{name}:acc", {}, consts), np.float64(1.0 / denominator), None
        ops.extend([op, rescale_op(op.output, name, s_in, s_w, scale, qmin, qmax, fraction=fraction, exact_w=True)])


def resize_scales(size: tuple[int, int], new: tuple[int, int]) -> tuple[float, float]:
    """The float32 H, W factors of a resize from ``size`` to ``new`` that :func:`~hawqc.quant.export.to_onnx`
    writes (the batch stays open, so the file gives factors, not sizes)."""
    scales = tuple(float(np.float32(m / n)) for n, m in zip(size, new))
    if any(int(np.floor(n * np.float32(f))) != m for n, m, f in zip(size, new, scales)):
        raise ValueError(f"a resize from {size[0]}x{size[1]} to {new[0]}x{new[1]}: its float32 factors do not give "
                         "that size back; resize by factors whose products with the input size are whole")
    return scales  # type: ignore[return-value]


def resize_transform(align_corners: bool) -> str:
    """ONNX's coordinate transformation of PyTorch's bilinear interpolation."""
    return "align_corners" if align_corners else "pytorch_half_pixel"


def moved_ops(node: Node, shape: list[int]) -> list[IntOp]:
    """A channel slice (a part of ``chunk``) or a channel shuffle of an input of ``shape`` (N, C, H, W) as
    integer data movement: a slice of axis 1; reshape -> transpose -> reshape (the batch left open)."""
    (src,), (_, channels, h, w) = node.inputs, shape
    if node.kind == "slice":
        size = -(-channels // node.attrs["parts"])
        begin = node.attrs["index"] * size
        return [IntOp("slice", [src], node.name, {"axes": [1], "begin": [begin], "end": [min(begin + size, channels)],
                                                  "strides": [1]})]
    groups = node.attrs["groups"]
    return [IntOp("reshape", [src], f"{node.name}:split", {"shape": [-1, groups, channels // groups, h, w]}),
            IntOp("transpose", [f"{node.name}:split"], f"{node.name}:moved", {"perm": [0, 2, 1, 3, 4]}),
            IntOp("reshape", [f"{node.name}:moved"], node.name, {"shape": [-1, channels, h, w]})]


def _relu(x: torch.Tensor, upper: float | None) -> torch.Tensor:
    return F.relu(x) if upper is None else torch.clamp(x, 0.0, upper)


def _upper(bound: float | None, scale: np.float32, qmax: int) -> int:
    """``qmax`` narrowed to a ReLU's float upper bound on the integer grid of ``scale`` (rounded as
    the quantizer rounds: ``relu6(x)`` then quantize is ``min(quantize(x), rint(6 / scale))``)."""
    return qmax if bound is None else min(qmax, int(np.rint(np.float64(np.float32(bound)) / np.float64(scale))))


def _torch_kernels() -> Mapping[str, Any]:
    from hawqc.quant.torch_kernels import KERNELS

    return KERNELS


def _as_input(batch: Any) -> torch.Tensor:
    """The input tensor of a calibration batch: a tensor/array, or the first item of a tuple/list/dict."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    elif isinstance(batch, Mapping) and batch:
        batch = next(iter(batch.values()))
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point():
        raise ValueError(f"calibration batches must be float tensors or arrays, got {type(batch).__name__}"
                         + (f" of {batch.dtype}" if isinstance(batch, torch.Tensor) else ""))
    return batch.float()


PTQ_METHODS = ("nearest", "learned")


def quantize(model: nn.Module, bit_config: BitConfig | Mapping[str, Any] | str, calib_data: Iterable[Any], *,
             observer: str = "minmax", momentum: float = 0.9, percentile: float = 99.99,
             weight_percentile: float | None = None, ptq: str = "nearest", learned: Any = None,
             log: Any = None) -> QuantModel:
    """Quantize a float model the HAWQ-V3 way (post-training): fold BatchNorm, quantize weights per
    channel, calibrate static activation ranges on ``calib_data`` (an iterable of input batches or
    ``(input, label)`` pairs). ``ptq="learned"`` then fits activation ranges, weight rounding and biases
    on the same data (:mod:`hawqc.quant.adaround`; ``learned``: its ``LearnedOptions``, ``log``: a
    callable for progress lines). Returns a :class:`QuantModel` in integer-simulation mode."""
    if ptq not in PTQ_METHODS:
        raise ValueError(f"unknown PTQ method {ptq!r}; choose one of {', '.join(PTQ_METHODS)}")
    config = BitConfig.from_any(bit_config)
    bits = config.resolve(model)
    qmodel = QuantModel(model, bits, observer, momentum, percentile, weight_percentile)
    batches = list(calib_data) if ptq == "learned" else calib_data
    qmodel.calibrate(batches)
    if ptq == "learned":
        from hawqc.quant.adaround import LearnedOptions, learn

        learn(qmodel, batches, learned or LearnedOptions(), log)
    return qmodel.eval()
