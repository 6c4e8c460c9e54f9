"""What real exporters and quantizers write between quantized layers, read by the ONNX reader.

Each small network (8x8 inputs, a few channels) gathers the patterns of a model family; each is
quantized by ONNX Runtime in the styles its users run (QDQ s8/u8, operator form, float weights with
Q/DQ pairs), compiled for llvm, and must equal the numpy reference on every element, contain no
float operation, and stay within an output step of ONNX Runtime on the same file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from third_party_quantizers import quantize_with
from torch import nn
from torch.nn import functional as F

import hawqc
from hawqc.frontend.onnx_qdq import from_onnx
from hawqc.models.layers import ConvBNAct, SqueezeExcitation
from hawqc.models.mobilenet import MBConv
from hawqc.quant.resize import resize_taps
from hawqc.relax_passes.float_ops import float_ops

SHAPE = (2, 3, 8, 8)


def cbr(i: int, o: int, k: int = 3, s: int = 1, g: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class Shuffle(nn.Module):
    """ShuffleNet-V2's unit (chunk, branch, concat, channel shuffle), GoogLeNet's ceil-mode max pool,
    MNASNet's mean over H, W."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.branch, self.fc = cbr(3, 8), nn.Sequential(cbr(4, 4), cbr(4, 4, 3, 1, 4)), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.stem(x), 3, 2, ceil_mode=True)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(x.mean((2, 3)))


class Dense(nn.Module):
    """DenseNet: concat with the block input, a standalone BatchNorm + ReLU, a transition average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn, self.conv, self.fc = cbr(3, 8), nn.BatchNorm2d(11), nn.Conv2d(11, 8, 1), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.stem(x), x], 1)
        x = F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Segment(nn.Module):
    """LR-ASPP's head: a sigmoid gate from the global average, bilinear and nearest upsampling, a sum of
    two scales (the output stays a feature map)."""

    def __init__(self) -> None:
        super().__init__()
        self.low, self.high = cbr(3, 8), cbr(8, 8, 3, 2)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.Sigmoid())
        self.cls_high, self.cls_low = nn.Conv2d(8, 3, 1), nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.low(x)
        high = self.high(low)
        high = high * self.gate(high)
        up = F.interpolate(self.cls_high(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        near = F.interpolate(high, scale_factor=2, mode="nearest")
        return up + self.cls_low(low) + self.cls_low(near)


class Moves(nn.Module):
    """Data movement and arithmetic with constants: pixel (un)shuffle, transpose, a per-channel gain and
    an offset, F.pad, max over one axis at a time, squeeze/unsqueeze."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv, self.fc = cbr(3, 8), nn.Conv2d(8, 8, 3), nn.Linear(8, 5)
        self.register_buffer("gain", torch.linspace(0.5, 2.0, 8).view(1, 8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pixel_unshuffle(F.pixel_shuffle(self.stem(x), 2), 2)
        x = self.conv(F.pad(x.transpose(2, 3) * self.gain + 0.25, (1, 1, 1, 1)))
        x = x.max(3, keepdim=True)[0].amax(2, keepdim=True).squeeze(3).unsqueeze(3)
        return self.fc(x.flatten(1))


class Excite(nn.Module):
    """MobileNet-V3/EfficientNet blocks: SiLU and HardSwish, squeeze-excite gated by Sigmoid and HardSigmoid
    (NNCF leaves the squeeze-excite in float and applies activations to the conv's float output)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 16, 3, 1, activation=nn.Hardswish)
        self.b1 = MBConv(16, 32, 16, 3, 1, nn.SiLU, SqueezeExcitation(32, 8, nn.SiLU, nn.Sigmoid))
        self.b2 = MBConv(16, 32, 24, 3, 2, nn.Hardswish, SqueezeExcitation(32, 8, nn.ReLU, nn.Hardsigmoid))
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.b2(self.b1(self.stem(x))), 1), 1))


class Pools(nn.Module):
    """Average pools whose divisor changes by position: padding left out of the count
    (``count_include_pad=False``, ResNet-D, Xception) and a ceil-mode window overhanging the input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv, self.fc = cbr(3, 8), cbr(8, 8), nn.Linear(8 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.avg_pool2d(self.stem(x), 3, 2, 1, count_include_pad=False))
        return self.fc(torch.flatten(F.avg_pool2d(x, 3, 2, ceil_mode=True), 1))


class PoolAfterReLU(nn.Module):
    """GoogLeNet's stem (conv, BatchNorm, in-place functional ReLU, ceil-mode max pool): PT2E quantizes only
    after the pool, so the max pool reads the conv's accumulator."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn, self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), cbr(8, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.stem(x)), inplace=True), 3, 2, ceil_mode=True)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 1), 1))


class ShuffleChain(nn.Module):
    """ShuffleNet-V2's units one after another (``chunk``, concat, channel shuffle, a mean): PT2E quantizes
    neither the concat nor the shuffle, so each unit's concat reads the previous one's on its own grid (which
    must not get finer unit by unit); hawqc's own quantizer captures all of it."""

    def __init__(self, units: int = 10) -> None:
        super().__init__()
        self.stem, self.fc = cbr(3, 8), nn.Linear(8, 5)
        self.branches = nn.ModuleList(cbr(4, 4, 1) for _ in range(units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for branch in self.branches:
            a, b = x.chunk(2, dim=1)
            x = torch.cat([a, branch(b)], 1).unflatten(1, (2, -1)).transpose(1, 2).flatten(1, 2)
        return self.fc(x.mean((2, 3)))


class DenseTail(nn.Module):
    """DenseNet's end: a standalone BatchNorm and ReLU pooled (ONNX Runtime's operator form quantizes neither:
    the pool reads the ReLU'd affine map's accumulator)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn, self.fc = cbr(3, 8), nn.BatchNorm2d(11), nn.Linear(11, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.stem(x), x], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1), 1))


class MeanAfterReLU(nn.Module):
    """MNASNet's end: the mean over H, W of a conv's ReLU output, which PT2E quantizes only after the mean."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv, self.fc = cbr(3, 8), cbr(8, 16, 1), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(self.stem(x)).mean((2, 3)))


class CeilMean(nn.Module):
    """SqueezeNet's ceil-mode max pools and MNASNet's mean over H, W, as hawqc's own quantizer captures them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv, self.fc = cbr(3, 8), cbr(8, 8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.max_pool2d(self.stem(x), 3, 2, ceil_mode=True))
        return self.fc(F.max_pool2d(x, 2, 2, ceil_mode=True).mean([2, 3]))


class PoolOfPool(nn.Module):
    """Inception-V3's stem into its first block: an average pool of a max pool of a conv's ReLU, which PT2E
    quantizes only after the average pool (both pools read the accumulator's fine grid)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn, self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), cbr(8, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(F.max_pool2d(F.relu(self.bn(self.stem(x)), inplace=True), 2), 3, 1, 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 1), 1))


class AdaptiveTail(nn.Module):
    """VGG's end, as hawqc's own quantizer captures it: an adaptive average pool to a size above 1 (a 2x2
    window here), flattened into the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.fc = cbr(3, 8), nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.stem(x), (4, 4)), 1))


class SoftmaxTail(Shuffle):
    """A Softmax after the classifier: ONNX Runtime quantizes its output, computes it in float."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(super().forward(x), dim=1)


NETS = {"shuffle": Shuffle, "dense": Dense, "segment": Segment, "moves": Moves, "excite": Excite,
        "softmax": SoftmaxTail, "pools": Pools, "pool_after_relu": PoolAfterReLU, "dense_tail": DenseTail,
        "mean_after_relu": MeanAfterReLU, "shuffle_chain": ShuffleChain, "ceil_mean": CeilMean,
        "pool_of_pool": PoolOfPool, "adaptive_tail": AdaptiveTail}
CASES = [("shuffle", "ort-qdq-s8"), ("shuffle", "ort-qoperator"), ("dense", "ort-qdq-u8"),
         ("dense", "ort-weight-qdq"), ("dense", "ort-qoperator"), ("segment", "ort-qdq-s8"),
         ("segment", "ort-qoperator"), ("segment", "ort-weight-qdq"), ("moves", "ort-qdq-u8"),
         ("moves", "ort-qoperator"), ("moves", "ort-weight-qdq"),
         ("excite", "ort-qdq-u8"), ("softmax", "ort-qdq-s8"), ("pools", "ort-qdq-s8"), ("pools", "ort-qdq-u8"),
         *[(net, "nncf") for net in ("shuffle", "dense", "segment", "moves", "excite")], ("shuffle", "pt2e-x86"),
         ("pool_after_relu", "pt2e-x86"), ("dense_tail", "ort-qoperator"), ("mean_after_relu", "pt2e-x86"),
         ("shuffle_chain", "pt2e-x86"), ("ceil_mean", "hawqc"),
         ("shuffle_chain", "hawqc"), ("pool_of_pool", "pt2e-x86"), ("adaptive_tail", "hawqc"),
         ("excite", "pt2e-x86")]
EXPECTED_OPS = {"shuffle": {"transpose", "slice", "maxpool", "global_avgpool"}, "dense": {"affine", "concat"},
                "segment": {"resize", "mul", "lut"}, "moves": {"transpose", "affine", "maxpool", "pad"},
                "excite": {"lut", "mul"}, "softmax": {"float_op"}, "pools": {"avgpool"},
                "pool_after_relu": {"maxpool"}, "dense_tail": {"affine", "global_avgpool"},
                "mean_after_relu": {"global_avgpool"}, "shuffle_chain": {"transpose", "slice", "concat"},
                "ceil_mean": {"maxpool", "global_avgpool"}, "pool_of_pool": {"maxpool", "avgpool"},
                "adaptive_tail": {"avgpool"}}
FLOAT_OPS = {("excite", "nncf"): {"GlobalAveragePool", "Conv", "Sigmoid", "Mul", "Relu", "HardSigmoid"},
             ("softmax", "ort-qdq-s8"): {"Softmax"},
             ("excite", "pt2e-x86"): {"Sigmoid", "Mul", "HardSwish", "HardSigmoid"}}
"""ONNX operators the quantizer left in float (reported in the graph's metadata); none elsewhere."""


def built(name: str) -> nn.Module:
    """The net with BatchNorm statistics and affine parameters away from their defaults."""
    torch.manual_seed(0)
    model = NETS[name]()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


def output_step(path: Path) -> float | None:
    """The output's quantization step; None where the last layer computes in float (NNCF)."""
    model = onnx.load(path)
    producer = next(n for n in model.graph.node if model.graph.output[0].name in n.output)
    if producer.op_type != "DequantizeLinear":
        return None
    return float(next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == producer.input[1]))


@pytest.mark.parametrize(("net", "quantizer"), CASES)
def test_pattern_compiles_bit_exact(net: str, quantizer: str, tmp_path: Path) -> None:
    for module_name in {"nncf": ["nncf"], "pt2e-x86": ["torchao", "onnxscript"]}.get(quantizer, []):
        pytest.importorskip(module_name)
    path = quantize_with(quantizer, built(net), SHAPE, tmp_path)
    module = hawqc.compile_integer_only(path, input_shape=SHAPE)
    assert EXPECTED_OPS[net] <= {op.op for op in module.graph.ops} or quantizer == "nncf" or (net, quantizer) in FLOAT_OPS
    left_in_float = {f.split(" (")[1][:-1] for f in module.graph.metadata.get("float_ops", [])}
    assert left_in_float == FLOAT_OPS.get((net, quantizer), set())
    assert bool(float_ops(module.ir)) == bool(left_in_float)
    options = ort.SessionOptions()
    if net == "pools":  # ORT's fused quantized AveragePool disagrees with ONNX's on ceil-mode windows that
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # overhang: run the file as written
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    step = output_step(path)
    for seed in range(3):
        x = np.random.default_rng(100 + seed).standard_normal(SHAPE).astype(np.float32)
        y = module(x)
        np.testing.assert_array_equal(y, module.reference(x))
        theirs = session.run(None, {"input": x})[0]
        steps = np.abs(y - theirs) / (step or np.abs(theirs).max() / 127)  # a float output: 8-bit steps of its range
        assert steps.max() <= 2 + 1e-3 and (steps <= 1 + 1e-3).mean() >= 0.98


@pytest.mark.parametrize("transform", ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"])
@pytest.mark.parametrize(("size", "new"), [(4, 8), (7, 3), (5, 13)])
def test_linear_resize_taps_are_exact(transform: str, size: int, new: int) -> None:
    """Integer taps / denominator equal ONNX's float linear Resize (up to float32 rounding)."""
    (iy, wy, dy), (ix, wx, dx) = (resize_taps(size, new, None, "linear", transform, "floor") for _ in range(2))
    x = np.random.default_rng(0).integers(-128, 128, (1, 1, size, size))
    rows = sum(wy[a][:, None] * x[0, 0][iy[a], :] for a in range(2))
    ours = sum(wx[b] * rows[:, ix[b]] for b in range(2)) / (dy * dx)
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear",
                            coordinate_transformation_mode=transform)
    graph = helper.make_graph([node], "r", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([1, 1, new, new], np.int64), "sizes")])
    theirs = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                  .SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.astype(np.float32)})[0][0, 0]
    np.testing.assert_allclose(ours, theirs, atol=1e-3)


def qdq_model(nodes: list, initializers: list, opset: int = 17) -> onnx.ModelProto:
    """input -> QuantizeLinear -> DequantizeLinear -> ``nodes`` (reading ``x``, writing ``y``) -> output."""
    scale = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
    edges = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["xq"], name="q_in"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"], name="dq_in"),
             *nodes, helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"], name="q_out"),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["output"], name="dq_out")]
    graph = helper.make_graph(edges, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
                              [*scale, *initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_unsupported_input_gets_one_line_naming_the_node() -> None:
    cubic = qdq_model([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="cubic")],
                      [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    with pytest.raises(ValueError, match=r"^ONNX node 'up' \(Resize\): Resize mode 'cubic' is not supported"):
        from_onnx(cubic)
    dangling = qdq_model([helper.make_node("Relu", ["nowhere"], ["y"], name="orphan")], [])
    with pytest.raises(ValueError, match=r"^ONNX node 'orphan' \(Relu\): .*KeyError") as err:
        from_onnx(dangling)
    assert "\n" not in str(err.value)
    coarse = qdq_model([helper.make_node("QuantizeLinear", ["x", "huge", "z"], ["t"], name="coarse"),
                        helper.make_node("DequantizeLinear", ["t", "huge", "z"], ["y"])],
                       [numpy_helper.from_array(np.array(1e12, np.float32), "huge")])
    with pytest.raises(ValueError, match=r"^ONNX node 'coarse' \(QuantizeLinear\): dyadic: scale ratio .* outside"):
        from_onnx(coarse)
    divide = qdq_model([helper.make_node("Div", ["x", "x"], ["y"], name="ratio")], [])
    with pytest.raises(ValueError, match=r"'ratio' \(Div\): Div of two tensors has no integer lowering"):
        from_onnx(divide)


def test_per_channel_activations_are_read_where_they_can_be() -> None:
    """An activation quantized per channel (NNCF, before depthwise convs): requantized per tensor by the
    next QuantizeLinear; refused with one line where an op would need one grid, or with zero points."""
    scales = numpy_helper.from_array(np.array([0.05, 0.02], np.float32), "sc")

    def per_channel(zero_points: np.ndarray, between: list) -> onnx.ModelProto:
        return qdq_model([helper.make_node("QuantizeLinear", ["x", "sc", "zc"], ["t"], name="per_channel", axis=1),
                          helper.make_node("DequantizeLinear", ["t", "sc", "zc"], ["d"], axis=1), *between],
                         [scales, numpy_helper.from_array(zero_points, "zc")])

    graph = from_onnx(per_channel(np.zeros(2, np.int8), [helper.make_node("Identity", ["d"], ["y"])]))
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    per_channel_grid = np.rint(x / np.array([0.05, 0.02], np.float32).reshape(1, 2, 1, 1)).clip(-128, 127)
    expected = np.rint(per_channel_grid * np.array([1.0, 0.4]).reshape(1, 2, 1, 1)) * np.float32(0.05)
    steps = np.abs(graph.run(x) - expected) / np.float32(0.05)  # ties may round either way (twice rounded)
    assert steps.max() <= 1 + 1e-4 and (steps < 1e-4).mean() >= 0.9
    pooled = per_channel(np.zeros(2, np.int8), [helper.make_node("MaxPool", ["d"], ["y"], name="pool",
                                                                 kernel_shape=[2, 2])])
    with pytest.raises(ValueError, match=r"'pool' \(MaxPool\): reads an activation quantized per channel"):
        from_onnx(pooled)
    with pytest.raises(ValueError, match=r"'per_channel'.*per channel \(axis 1\) with zero points"):
        from_onnx(per_channel(np.array([3, 3], np.int8), [helper.make_node("Identity", ["d"], ["y"])]))


@pytest.mark.parametrize("op", ["ArgMax", "Flatten"])
def test_a_float_tail_compiles_and_is_reported(op: str) -> None:
    """An ArgMax (or HardSwish, pool and Flatten: ONNX Runtime's operator form of MobileNet-V3 leaves its
    classifier's input in float) after the last DequantizeLinear runs in float after the integer graph, listed."""
    s, z = numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")
    tail = ([helper.make_node("ArgMax", ["x"], ["output"], name="tail", axis=1, keepdims=0)] if op == "ArgMax" else
            [helper.make_node("HardSwish", ["x"], ["act"], name="act"),
             helper.make_node("GlobalAveragePool", ["act"], ["pooled"], name="pool"),
             helper.make_node("Flatten", ["pooled"], ["output"], name="tail", axis=1)])
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"]), *tail]
    out_type = TensorProto.INT64 if op == "ArgMax" else TensorProto.FLOAT
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 2, 2])],
                              [helper.make_tensor_value_info("output", out_type, None)], [s, z])
    module = hawqc.compile_integer_only(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert module.graph.metadata["float_ops"] == (["tail (ArgMax)"] if op == "ArgMax" else
                                                  ["act (HardSwish)", "pool (GlobalAveragePool)", "tail (Flatten)"])
    x = np.random.default_rng(0).standard_normal((1, 4, 2, 2)).astype(np.float32)
    np.testing.assert_allclose(module(x), module.reference(x), rtol=1e-6)  # float tails: float32 rounding
    q = np.clip(np.rint(x / np.float32(0.05)), -128, 127)
    if op == "ArgMax":
        np.testing.assert_array_equal(module(x), q.argmax(axis=1))
    else:
        v = q * 0.05
        np.testing.assert_allclose(module(x), (v * np.clip(v / 6 + 0.5, 0, 1)).mean(axis=(2, 3)), rtol=1e-6)


def test_compiling_an_activation_of_a_conv_writes_nothing_to_stderr(tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """A sigmoid of a conv's float output, quantized only after (NNCF, PT2E's HardSwish) is a threshold count;
    its lowering once made TVM warn at every build, one line per table lookup (~190 for a PT2E MobileNet)."""
    from hawqc.cli import main
    from hawqc.reference import IntegerGraph

    weight = np.random.default_rng(0).integers(-127, 128, (2, 2, 3, 3)).astype(np.int8)
    model = qdq_model([helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0),
                       helper.make_node("Conv", ["x", "w"], ["acc"], pads=[1, 1, 1, 1]),
                       helper.make_node("Sigmoid", ["acc"], ["y"])],
                      [numpy_helper.from_array(weight, "wq"), numpy_helper.from_array(np.array([0.01, 0.02], np.float32), "ws")])
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 2, 4, 4]))
    onnx.save(model, tmp_path / "gate.onnx")
    capfd.readouterr()
    assert main(["compile", str(tmp_path / "gate.onnx"), "-o", str(tmp_path / "out")]) == 0
    assert capfd.readouterr().err == ""
    assert "threshold" in {op.op for op in IntegerGraph.load(tmp_path / "out" / "graph.int.npz").ops}


def test_a_dequantized_constant_quantized_again_is_a_constant() -> None:
    """The exporter shares equal BatchNorm weights through Identity, and ONNX Runtime quantizes the shared
    (already dequantized) weight again for the next BatchNormalization (DenseNet-121): folded to a constant."""
    gamma = np.array([40, -70], np.int8)
    chain = [helper.make_node("DequantizeLinear", ["gq", "gs"], ["g0"]), helper.make_node("Identity", ["g0"], ["g1"]),
             helper.make_node("QuantizeLinear", ["g1", "gs2", "gz2"], ["g2"], name="again"),
             helper.make_node("DequantizeLinear", ["g2", "gs2", "gz2"], ["gamma"]),
             helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["y"])]
    consts = {"gq": gamma, "gs": np.array(0.013, np.float32), "gs2": np.array(0.0071, np.float32),
              "gz2": np.array(0, np.int8), "beta": np.array([0.1, -0.2], np.float32),
              "mean": np.array([0.3, 0.0], np.float32), "var": np.array([1.5, 0.7], np.float32)}
    model = qdq_model(chain, [numpy_helper.from_array(v, k) for k, v in consts.items()])
    graph = from_onnx(model)
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    theirs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(graph.run(x) - theirs).max() <= 0.05 + 1e-6  # within one output step (0.05)
    assert np.abs(graph.run(x) - theirs).mean() < 0.01



@pytest.mark.parametrize("pool", ["avgpool", "global_avgpool"])
def test_pools_of_int32_tensors_sum_in_int64(pool: str) -> None:
    """An accumulator read before any QuantizeLinear is an int32 tensor on a fine grid: a pool of it sums
    past the int32 range, in the compiled module as in the reference."""
    from hawqc.reference.graph import IntegerGraph, IntOp, pool_consts

    s_in, s_out = np.float32(1e-9), np.float32(0.05)
    consts, tie = pool_consts(s_in, s_out, 9, 2**31)
    pooled = IntOp("avgpool", ["fine"], "pooled", {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1, 1, 1],
                                                    "qmin": -128, "qmax": 127, **tie}, consts) \
        if pool == "avgpool" else IntOp("global_avgpool", ["fine"], "pooled", {
            "qmin": -128, "qmax": 127, "input_scale": float(s_in), "scale": float(s_out), "input_bound": 2**31})
    ops = [IntOp("quantize", ["input"], "fine", {"qmin": -(2**31), "qmax": 2**31 - 1},
                 {"scale": np.array(1e-9, np.float32)}), pooled,
           IntOp("dequantize", ["pooled"], "output", {}, {"scale": np.array(0.05, np.float32)})]
    module = hawqc.compile_integer_only(IntegerGraph("input", "output", ops), input_shape=(1, 2, 4, 4))
    x = np.random.default_rng(0).uniform(0.3, 0.35, (1, 2, 4, 4)).astype(np.float32)  # ~3.2e8: 9 of them pass 2^31
    y = module(x)
    np.testing.assert_array_equal(y, module.reference(x))
    assert y.min() > 0.12  # means of values in [0.3, 0.35] (a corner window: 4 of 9 cells inside), not wrapped


def test_operator_form_float_pool_then_resize_sized_by_shape() -> None:
    """ONNX Runtime's operator form of LR-ASPP: a squeeze-excite pool of a float HardSwish (a float region,
    refused by the first reading) before a Shape that only the integer graph's trace can size (after a
    com.microsoft QLinearMul), feeding a linear Resize of the integers themselves (rounded onto their grid)."""
    consts = {"s": np.array(0.05, np.float32), "s2": np.array(0.01, np.float32), "s3": np.array(0.02, np.float32),
              "z": np.array(128, np.uint8), "starts": np.array([0], np.int64), "ends": np.array([2], np.int64),
              "hw": np.array([7, 7], np.int64)}
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"]),
             helper.make_node("HardSwish", ["x"], ["act"], name="act"),
             helper.make_node("GlobalAveragePool", ["act"], ["pooled"], name="pool"),
             helper.make_node("QuantizeLinear", ["pooled", "s2", "z"], ["pooled_q"]),
             helper.make_node("QuantizeLinear", ["act", "s", "z"], ["act_q"]),
             helper.make_node("QLinearMul", ["act_q", "s", "z", "pooled_q", "s2", "z", "s3", "z"], ["m"],
                              name="gate", domain="com.microsoft"),
             helper.make_node("DequantizeLinear", ["m", "s3", "z"], ["m_float"]),
             helper.make_node("Shape", ["m_float"], ["shape"]),
             helper.make_node("Slice", ["shape", "starts", "ends"], ["nc"]),
             helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
             helper.make_node("Resize", ["m", "", "", "sizes"], ["up"], name="up", mode="linear"),
             helper.make_node("DequantizeLinear", ["up", "s3", "z"], ["output"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 4, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    module = hawqc.compile_integer_only(model)
    assert module.graph.metadata["float_ops"] == ["act (HardSwish)", "pool (GlobalAveragePool)"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((1, 4, 4, 4)).astype(np.float32) * 3
        y = module(x)
        np.testing.assert_array_equal(y, module.reference(x))
        steps = np.abs(y - session.run(None, {"input": x})[0]) / consts["s3"]
        # ORT's uint8 Resize truncates; a one-step tie of its float32 pool times |act| up to 6 makes 3 output steps
        assert y.shape == (1, 4, 7, 7) and steps.max() <= 3 + 1e-3 and (steps <= 1 + 1e-3).mean() >= 0.95
