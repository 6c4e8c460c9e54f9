"""The conv/dense workloads of a model, and the one-layer integer graph that measures each.

A workload is what decides a layer's latency: input shape, weight shape, stride, padding,
dilation, groups. Layers with the same workload are measured once and share the result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from hawqc.reference.graph import IntegerGraph, IntOp, conv_output_size


@dataclass(frozen=True)
class Workload:
    """One conv2d (NCHW input, OIHW weight) or dense (N x in input, out x in weight) layer shape."""

    op: str
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    """top, left, bottom, right (the integer graph's convention)."""
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def key(self) -> str:
        """A stable, readable name, e.g. ``conv2d 1x64x56x56 w64x64x3x3 s1x1 p1,1,1,1 d1x1 g1``."""
        def dims(v: tuple[int, ...]) -> str:
            return "x".join(map(str, v))
        if self.op == "dense":
            return f"dense {dims(self.input_shape)} w{dims(self.weight_shape)}"
        return (f"conv2d {dims(self.input_shape)} w{dims(self.weight_shape)} s{dims(self.stride)} "
                f"p{','.join(map(str, self.padding))} d{dims(self.dilation)} g{self.groups}")

    @classmethod
    def from_key(cls, key: str) -> Workload:
        """The workload a :attr:`key` names."""
        try:
            op, *fields = key.split()
            values = {f[0]: f[1:] for f in fields[1:]}
            input_shape, weight = _ints(fields[0]), _ints(values["w"])
            if op == "dense":
                return cls("dense", input_shape, weight)
            return cls("conv2d", input_shape, weight, _ints(values["s"]), _ints(values["p"], ","), _ints(values["d"]),
                       int(values["g"]))
        except (ValueError, KeyError, IndexError):
            raise ValueError(f"not a workload: {key!r}") from None

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one run."""
        if self.op == "dense":
            return int(np.prod(self.input_shape)) * self.weight_shape[0]
        n, (cout, cin_per_group, kh, kw) = self.input_shape[0], self.weight_shape
        return n * cout * self.output_hw[0] * self.output_hw[1] * cin_per_group * kh * kw

    @property
    def output_hw(self) -> tuple[int, int]:
        return conv_output_size(tuple(self.input_shape[2:]), tuple(self.weight_shape[2:]), self.stride, self.padding,
                                self.dilation)

    def features(self) -> dict[str, float]:
        """Numbers that describe the workload, for the latency regressor."""
        if self.op == "dense":
            n, cin = self.input_shape
            shape = {"n": n, "cin": cin, "cout": self.weight_shape[0], "h": 1, "w": 1, "kh": 1, "kw": 1,
                     "stride": 1, "groups": 1, "oh": 1, "ow": 1}
        else:
            n, cin, h, w = self.input_shape
            oh, ow = self.output_hw
            shape = {"n": n, "cin": cin, "cout": self.weight_shape[0], "h": h, "w": w, "kh": self.weight_shape[2],
                     "kw": self.weight_shape[3], "stride": self.stride[0], "groups": self.groups, "oh": oh, "ow": ow}
        reduction = shape["cin"] // shape["groups"] * shape["kh"] * shape["kw"]
        return {**shape, "reduction": reduction, "log_macs": float(np.log(self.macs)), "is_dense": self.op == "dense"}


def _ints(text: str, sep: str = "x") -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(sep))


@dataclass
class LayerGroup:
    """A workload and every layer (in model order) that has it."""

    workload: Workload
    layers: list[str]


def extract(model: Any, input_shape: tuple[int, ...] | None = None) -> list[LayerGroup]:
    """The workloads of a built-in model (by name, at its default input shape unless given), of a
    model file (ONNX QDQ or ``.int.npz``) or of a float ``nn.Module`` (``input_shape`` required),
    deduplicated, in order of first use."""
    from torch import nn

    from hawqc import models

    if isinstance(model, nn.Module):
        if input_shape is None:
            raise ValueError("a torch model needs its input shape to extract its workloads")
        found = _from_torch(model, tuple(input_shape))
    elif str(model) in models.MODELS:
        spec = models.spec(str(model))
        shape = tuple(input_shape) if input_shape else (1, *spec.input_shape)
        found = _from_torch(spec.build(), shape)
    elif os.path.exists(model):
        found = _from_graph(model, input_shape)
    else:
        raise ValueError(f"{model}: neither a built-in model ({', '.join(models.MODELS)}) nor a model file")
    groups: dict[Workload, LayerGroup] = {}
    for name, workload in found:
        groups.setdefault(workload, LayerGroup(workload, [])).layers.append(name)
    if not groups:
        raise ValueError(f"{model} has no conv2d or dense layer to tune")
    return list(groups.values())


def _from_torch(model: Any, input_shape: tuple[int, ...]) -> list[tuple[str, Workload]]:
    """Trace the input shape of every Conv2d and Linear with forward hooks; conv padding as captured
    (zero padding before a conv, inside a "same"-padding Conv2d subclass or not, is part of it)."""
    import torch
    from torch import nn

    from hawqc.quant.capture import capture

    padding = {n.layer: tuple(n.attrs["padding"]) for n in capture(model.eval()) if n.kind == "conv"}
    found: list[tuple[str, Workload]] = []

    def hook(name: str, module: nn.Module) -> Any:
        def record(_: nn.Module, inputs: tuple[torch.Tensor, ...], __: Any) -> None:
            shape = tuple(inputs[0].shape)
            if isinstance(module, nn.Linear):
                found.append((name, Workload("dense", shape, tuple(module.weight.shape))))
            else:
                found.append((name, Workload("conv2d", shape, tuple(module.weight.shape), tuple(module.stride),
                                             padding[name], tuple(module.dilation), module.groups)))
        return record

    handles = [m.register_forward_hook(hook(name, m)) for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return found


def _from_graph(path: str | os.PathLike[str], input_shape: tuple[int, ...] | None) -> list[tuple[str, Workload]]:
    """Read shapes off a reference run of the integer graph on a zero input."""
    from hawqc import api
    from hawqc.reference.graph import execute
    from hawqc.reference.kernels import KERNELS

    graph = api.integer_graph_of(path, input_shape=input_shape)
    values: dict[str, Any] = {}
    shape = api.example_shape(api.input_shape_of(graph, input_shape))  # an open batch: the table is for batch 1
    execute(graph, np.zeros(shape, np.float32), KERNELS, trace=values)
    found = []
    for op in graph.ops:
        if op.op not in ("conv2d", "dense"):
            continue
        shape, weight = tuple(values[op.inputs[0]].shape), tuple(op.consts["weight"].shape)
        a = op.attrs
        workload = (Workload("dense", shape, weight) if op.op == "dense" else
                    Workload("conv2d", shape, weight, tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"]),
                             a["groups"]))
        found.append((a.get("layer", op.output), workload))
    return found


def weight_range(bits: int) -> tuple[int, int]:
    """Weights as hawqc quantizes them: symmetric, [-(2^(b-1) - 1), 2^(b-1) - 1]."""
    from hawqc.quant.quantizers import weight_qmax

    return -weight_qmax(bits), weight_qmax(bits)


def activation_range(bits: int) -> tuple[int, int]:
    """Activations as hawqc stores them in int8: 8-bit signed, narrower unsigned (post-ReLU)."""
    from hawqc.quant.quantizers import activation_range as quant_range

    return quant_range(bits, signed=bits == 8)


OUTPUT_RANGE = (-128, 127)
"""Every layer graph requantizes to full int8 whatever its bits: the next layer's bits do not belong
to this workload, and the same output clip lets INT4 and INT8 share one kernel when they compile alike."""


def layer_graph(workload: Workload, w_bits: int, a_bits: int, seed: int = 0) -> IntegerGraph:
    """``[conv2d | dense -> requantize]`` with random weights in the ``w_bits`` range; its input is
    int8 in the ``a_bits`` range (see :func:`random_input`)."""
    rng = np.random.default_rng(seed)
    cout = workload.weight_shape[0]
    low, high = weight_range(w_bits)
    consts = {"weight": rng.integers(low, high + 1, workload.weight_shape).astype(np.int8),
              "bias": rng.integers(-1000, 1000, cout).astype(np.int32)}
    if workload.op == "dense":
        layer = IntOp("dense", ["input"], "accumulator", {}, consts)
    else:
        attrs = {"stride": list(workload.stride), "padding": list(workload.padding),
                 "dilation": list(workload.dilation), "groups": workload.groups}
        layer = IntOp("conv2d", ["input"], "accumulator", attrs, consts)
    shift = np.full(cout, 24, np.int64)
    multiplier = (_output_gain(workload, w_bits, a_bits) * (1 << 24) * rng.uniform(0.8, 1.2, cout)).astype(np.int64)
    requantize = IntOp("requantize", ["accumulator"], "output", {"qmin": OUTPUT_RANGE[0], "qmax": OUTPUT_RANGE[1]},
                       {"b": multiplier, "c": shift})
    return IntegerGraph("input", "output", [layer, requantize], {"workload": workload.key})


def _output_gain(workload: Workload, w_bits: int, a_bits: int) -> float:
    """A rescale that spreads the outputs over int8 (standard deviation about 40), so that the
    bit-exactness check compares informative values rather than zeros or saturated ones."""
    low, high = activation_range(a_bits)
    reduction = int(np.prod(workload.weight_shape[1:]))
    weight_std = weight_range(w_bits)[1] / np.sqrt(3)
    activation_rms = np.sqrt((low * low + low * high + high * high) / 3)
    return 40 / max(np.sqrt(reduction) * weight_std * activation_rms, 1.0)


def random_input(workload: Workload, a_bits: int, seed: int = 0) -> np.ndarray:
    """An int8 input in the ``a_bits`` activation range."""
    low, high = activation_range(a_bits)
    return np.random.default_rng(seed).integers(low, high + 1, workload.input_shape).astype(np.int8)
