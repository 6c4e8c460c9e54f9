"""hawqc against the float64 oracle of a QDQ file (hawqc.frontend.oracle), on small hand-built graphs.

Each graph is what ONNX Runtime's ``quantize_static`` writes (QuantizeLinear/DequantizeLinear pairs,
per-channel int8 weights, int32 biases at scale ``float32(S_in * S_w)``, uint8 or int8 activations),
with scales chosen so that exact ties occur (power-of-two ratios, 2x2 average pools) beside ratios
that no float32 product forms exactly. hawqc must equal the oracle on every element, end to end and
layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import hawqc
from hawqc import quantize
from hawqc.frontend import oracle
from hawqc.frontend.onnx_qdq import from_onnx

SHAPE = (2, 4, 12, 12)


class _Graph:
    """A QDQ graph under construction: ``q(name, scale)`` quantizes a float tensor and gives its DQ."""

    def __init__(self, unsigned: bool, seed: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.unsigned, self.rng = unsigned, np.random.default_rng(seed)
        self.channels = {"input": SHAPE[1]}

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def q(self, src: str, scale: float, zero_point: int | None = None) -> str:
        zp = (128 if zero_point is None else zero_point) if self.unsigned else 0
        args = [self.init(f"{src}.scale", np.array(scale, np.float32)),
                self.init(f"{src}.zp", np.array(zp, np.uint8 if self.unsigned else np.int8))]
        q = self.node("QuantizeLinear", [src, *args], f"{src}.q")
        dq = self.node("DequantizeLinear", [q, *args], f"{src}.dq")
        self.channels[dq] = self.channels.get(src, 0)
        return dq

    def conv(self, src: str, s_in: float | np.ndarray, out_channels: int, name: str, groups: int = 1, kernel: int = 3) -> str:
        in_channels = self.channels[src]
        w = self.rng.integers(-127, 128, (out_channels, in_channels // groups, kernel, kernel)).astype(np.int8)
        s_w = (self.rng.uniform(0.5, 2.0, out_channels) / (kernel * kernel * in_channels // groups * 16)).astype(np.float32)
        bias = self.rng.integers(-3000, 3000, out_channels).astype(np.int32)
        wdq = self.node("DequantizeLinear", [self.init(f"{name}.w", w), self.init(f"{name}.ws", s_w)], f"{name}.wdq",
                        axis=0)
        bdq = self.node("DequantizeLinear", [self.init(f"{name}.b", bias),
                                             self.init(f"{name}.bs", (np.float32(s_in) * s_w).astype(np.float32))],
                        f"{name}.bdq", axis=0)
        self.channels[name] = out_channels
        return self.node("Conv", [src, wdq, bdq], name, pads=[kernel // 2] * 4, group=groups)

    def model(self, output: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, SHAPE)],
                                  [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def conv_relu(g: _Graph) -> str:
    x = g.q("input", 0.0123)
    return g.q(g.node("Relu", [g.conv(x, 0.0123, 8, "conv")], "relu"), 0.0371, zero_point=0)


def residual_add(g: _Graph) -> str:
    """Two branches of different scales (one a power-of-two multiple of the output's) meet in an Add."""
    x = g.q("input", 0.0123)
    a = g.q(g.conv(x, 0.0123, 4, "a"), 0.05)
    b = g.q(g.conv(x, 0.0123, 4, "b"), 0.0313)
    return g.q(g.node("Add", [a, b], "add"), 0.025)


def concat(g: _Graph) -> str:
    x = g.q("input", 0.0123)
    a = g.q(g.conv(x, 0.0123, 4, "a"), 0.05)
    b = g.q(g.conv(x, 0.0123, 4, "b"), 0.0313)
    return g.q(g.node("Concat", [a, b], "cat", axis=1), 0.1)


def avgpool(g: _Graph) -> str:
    """2x2 windows on the input's grid (ties on every quarter), then a padded 3x3 to another scale."""
    x = g.q("input", 0.0123)
    pooled = g.q(g.node("AveragePool", [x], "pool2", kernel_shape=[2, 2], strides=[2, 2]), 0.0123)
    return g.q(g.node("AveragePool", [pooled], "pool3", kernel_shape=[3, 3], pads=[1] * 4, count_include_pad=1),
               0.0071)


def depthwise(g: _Graph) -> str:
    x = g.q("input", 0.0123)
    dw = g.q(g.node("Relu", [g.conv(x, 0.0123, 4, "dw", groups=4)], "dw_relu"), 0.017, zero_point=0)
    return g.q(g.node("GlobalAveragePool", [dw], "gap"), 0.011, zero_point=0)


def batchnorm(g: _Graph) -> str:
    """A BatchNormalization that no conv absorbs (DenseNet's after a Concat): gains and offsets that no
    float32 number holds, then a ReLU."""
    c = 16
    x = g.q(g.conv(g.q("input", 0.0123), 0.0123, c, "conv"), 0.0123)
    params = [g.init(f"bn.{k}", v.astype(np.float32)) for k, v in (
        ("gamma", g.rng.uniform(0.5, 3.0, c) * g.rng.choice([-1, 1], c)), ("beta", g.rng.uniform(-1, 1, c)),
        ("mean", g.rng.uniform(-0.3, 0.3, c)), ("var", g.rng.uniform(0.2, 2.0, c)))]
    bn = g.node("BatchNormalization", [x, *params], "bn", epsilon=1e-5)
    return g.q(g.node("Relu", [bn], "bn_relu"), 0.0041, zero_point=0)


def per_channel_activation(g: _Graph) -> str:
    """NNCF's depthwise input: a conv's ReLU6 quantized per channel (uint8, zero points 0), padded."""
    c = 8
    clip = g.node("Clip", [g.conv(g.q("input", 0.0123), 0.0123, c, "conv"), g.init("zero", np.array(0, np.float32)),
                           g.init("six", np.array(6, np.float32))], "relu6")
    scales = g.rng.uniform(0.004, 0.02, c).astype(np.float32)
    args = [g.init("relu6.scale", scales), g.init("relu6.zp", np.zeros(c, np.uint8))]
    dq = g.node("DequantizeLinear", [g.node("QuantizeLinear", [clip, *args], "relu6.q", axis=1), *args], "relu6.dq", axis=1)
    padded = g.node("Pad", [dq, g.init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], "pad")
    g.channels[padded] = c
    return g.q(g.conv(padded, scales, c, "dw", groups=c), 0.031)


def activations(g: _Graph) -> str:
    """NNCF's activations of a conv's float output, quantized once after: SiLU (falls, then rises), HardSwish
    (quantized per channel, int8, before a depthwise conv), Sigmoid and HardSigmoid."""
    x = g.q("input", 0.0123)
    a = g.conv(x, 0.0123, 8, "a")
    g.channels.update(silu=8, sigmoid=8)
    silu = g.q(g.node("Mul", [a, g.node("Sigmoid", [a], "a_gate")], "silu"), 0.0071)
    scales = g.rng.uniform(0.008, 0.02, 8).astype(np.float32)
    args = [g.init("hswish.scale", scales), g.init("hswish.zp", np.zeros(8, np.int8))]
    hswish = g.node("HardSwish", [g.conv(silu, 0.0071, 8, "b")], "hswish")
    swish = g.node("DequantizeLinear", [g.node("QuantizeLinear", [hswish, *args], "hswish.q", axis=1), *args],
                   "hswish.dq", axis=1)
    g.channels[swish] = 8
    sigmoid = g.q(g.node("Sigmoid", [g.conv(swish, scales, 8, "c", groups=8)], "sigmoid"), 1 / 256, zero_point=0)
    return g.q(g.node("HardSigmoid", [g.conv(sigmoid, 1 / 256, 4, "d")], "hsigmoid", alpha=1 / 6), 1 / 255,
               zero_point=0)


def shared_concat(g: _Graph) -> str:
    """Inception's block as NNCF leaves it: a Concat of branches on one grid, not quantized again, read by two
    convs and an average pool."""
    x = g.q("input", 0.0123)
    cat = g.node("Concat", [g.q(g.conv(x, 0.0123, 4, f"branch{j}"), 0.05) for j in range(2)], "cat", axis=1)
    g.channels[cat] = 8
    pooled = g.q(g.node("AveragePool", [cat], "pool", kernel_shape=[3, 3], pads=[1] * 4, count_include_pad=1), 0.05)
    g.channels[pooled] = 8
    convs = [g.q(g.conv(src, 0.05, 4, f"after{j}"), 0.031) for j, src in enumerate([cat, cat, pooled])]
    return g.q(g.node("Add", [g.node("Add", convs[:2], "sum"), convs[2]], "sum3"), 0.047)


def pool_ties(g: _Graph) -> str:
    """Pools whose exact ratio allows ties: a 6x6 window (36 cells) and a 12x12 global pool (144) with one scale
    in and out, after an average pool of a concat of two grids (NNCF's Inception block)."""
    x = g.q("input", 0.0123)
    cat = g.node("Concat", [g.q(g.conv(x, 0.0123, 4, f"branch{j}"), s) for j, s in enumerate((0.05, 0.0313))], "cat",
                 axis=1)
    g.channels[cat] = 8
    pooled = g.q(g.node("AveragePool", [cat], "pool3", kernel_shape=[3, 3], pads=[1] * 4, count_include_pad=1), 0.05)
    six = g.q(g.node("AveragePool", [pooled], "pool6", kernel_shape=[6, 6]), 0.05)
    means = [g.q(g.node("GlobalAveragePool", [src], f"gap{j}"), 0.05) for j, src in enumerate((pooled, six))]
    return g.q(g.node("Concat", means, "means", axis=1), 0.05)


def float_island(g: _Graph) -> str:
    """NNCF's squeeze-excite: a GlobalAveragePool not quantized, convs with float weights and biases, a
    HardSigmoid quantized, then the gate multiplied in; the oracle computes the island in float64."""
    x = g.q(g.node("Relu", [g.conv(g.q("input", 0.0123), 0.0123, 8, "conv")], "relu"), 0.0213, zero_point=0)
    w1, w2 = (g.init(f"fc{j}.w", g.rng.uniform(-4, 4, shape).astype(np.float32))
              for j, shape in ((1, (4, 8, 1, 1)), (2, (8, 4, 1, 1))))
    b1, b2 = (g.init(f"fc{j}.b", g.rng.uniform(-0.3, 0.3, n).astype(np.float32)) for j, n in ((1, 4), (2, 8)))
    hidden = g.node("Relu", [g.node("Conv", [g.node("GlobalAveragePool", [x], "gap"), w1, b1], "fc1")], "fc1_relu")
    gate = g.q(g.node("HardSigmoid", [g.node("Conv", [hidden, w2, b2], "fc2")], "gate", alpha=1 / 6), 1 / 255,
               zero_point=0)
    return g.q(g.node("Mul", [x, gate], "excite"), 0.0173, zero_point=0)


def accumulator_add(g: _Graph) -> str:
    """hawqc's own residual blocks: a conv's float output added to a quantized shortcut, and two conv outputs
    added (a downsampling block), each Add rounded once to a scale one float32 ulp below 1/2. Identity convs of
    an input on a grid of 1/8, one with a bias at a scale one ulp above its accumulator's: the real sums lie
    within 2^-20 steps above ties (a quarter of the elements), where a conv output first rounded onto a grid
    2^21 times finer than the Add's (hawqc's old rule) lands on the tie and half of them round down."""
    c, step = SHAPE[1], np.nextafter(np.float32(0.5), np.float32(0))

    def identity(src: str, name: str, s_in: float, bias: bool) -> str:
        w = g.node("DequantizeLinear", [g.init(f"{name}.w", np.eye(c, dtype=np.int8).reshape(c, c, 1, 1)),
                                        g.init(f"{name}.ws", np.ones(c, np.float32))], f"{name}.wdq", axis=0)
        args = [src, w]
        if bias:
            scale = np.full(c, np.nextafter(np.float32(s_in), np.float32(1)), np.float32)
            args.append(g.node("DequantizeLinear", [g.init(f"{name}.b", np.arange(c, dtype=np.int32) - 1),
                                                    g.init(f"{name}.bs", scale)], f"{name}.bdq", axis=0))
        return g.node("Conv", args, name)

    x = g.q("input", 2.0**-3)
    shortcut = g.q(g.node("Identity", ["input"], "shortcut"), step)
    block = g.q(g.node("Add", [identity(x, "conv1", 2.0**-3, bias=True), shortcut], "add1"), step)
    down = g.node("Add", [identity(x, "conv2", 2.0**-3, bias=False), identity(block, "conv3", step, bias=True)], "add2")
    return g.q(down, step)


def mean_of_relu(g: _Graph) -> str:
    """PT2E's mean of a ReLU'd conv: a ReduceMean (keepdims 0) of the conv's float output, quantized after."""
    x = g.q("input", 0.0123)
    mean = g.node("ReduceMean", [g.node("Relu", [g.conv(x, 0.0123, 16, "conv")], "relu")], "mean", axes=[2, 3],
                  keepdims=0)
    return g.q(mean, 0.011, zero_point=0)


GRAPHS: dict[str, Callable[[_Graph], str]] = {"conv_relu": conv_relu, "residual_add": residual_add,
                                                 "concat": concat, "avgpool": avgpool, "depthwise": depthwise,
                                                 "batchnorm": batchnorm,
                                                 "per_channel_activation": per_channel_activation,
                                                 "activations": activations, "shared_concat": shared_concat,
                                                 "pool_ties": pool_ties, "float_island": float_island,
                                                 "accumulator_add": accumulator_add, "mean_of_relu": mean_of_relu}


def qdq_model(name: str, unsigned: bool) -> onnx.ModelProto:
    g = _Graph(unsigned, seed=len(name))
    return g.model(GRAPHS[name](g))


def images(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(SHAPE) * 0.6).astype(np.float32)


def output_step(model: onnx.ModelProto) -> float:
    """The scale of the QuantizeLinear whose DequantizeLinear is the output."""
    scale = model.graph.output[0].name.removesuffix(".dq") + ".scale"
    return float(next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == scale))


@pytest.mark.parametrize("unsigned", [True, False], ids=["uint8", "int8"])
@pytest.mark.parametrize("name", list(GRAPHS))
def test_reference_equals_the_oracle_layer_by_layer_and_end_to_end(name: str, unsigned: bool) -> None:
    model = qdq_model(name, unsigned)
    graph = from_onnx(model)
    x = images()
    values = oracle.oracle_run(model, x, intermediate=True)
    layers = oracle.layer_by_layer(graph, values, x)
    assert len(layers) >= 2
    assert [(layer.name, layer.mismatches) for layer in layers if layer.mismatches] == []
    result = oracle.agreement(graph.run(x), values[model.graph.output[0].name], output_step(model))
    assert result.exact == result.elements


@pytest.mark.parametrize("name", ["batchnorm", "per_channel_activation"])
def test_rescales_the_old_reader_rounded_twice_equal_the_oracle_on_more_images(name: str) -> None:
    """A standalone BatchNorm (once on a grid only 2^8 times finer than its input's, its gain rounded to
    float32) and a per-channel activation (once first on a per-tensor int16 grid): over a few images,
    not one element may differ from the oracle layer by layer."""
    model = qdq_model(name, unsigned=True)
    graph = from_onnx(model)
    mismatches = {}
    for seed in range(4):
        x = images(seed)
        for layer in oracle.layer_by_layer(graph, oracle.oracle_run(model, x, intermediate=True), x):
            mismatches[layer.name] = mismatches.get(layer.name, 0) + layer.mismatches
    assert len(mismatches) >= 3 and {k: v for k, v in mismatches.items() if v} == {}


def test_a_concat_read_by_many_nodes_is_computed_once() -> None:
    graph = from_onnx(qdq_model("shared_concat", unsigned=True))
    assert [op.op for op in graph.ops].count("concat") == 1


def test_an_accumulator_added_at_4_bits_keeps_a_bias_fraction_of_2_to_the_minus_24_steps() -> None:
    """A 1x1 conv (a channel permutation) added to its input, rounded to uint4: the sums lie on ties of the
    output grid, moved up by 2^-24 output steps by a bias whose float32 scale is one ulp above the
    accumulator's. The accumulator must meet the add on a grid at least 2^24 times finer than the output's
    (it was 2^20: every tie then rounded to even)."""
    g = _Graph(unsigned=True, seed=0)
    c = SHAPE[1]
    x = g.q("input", 2.0**-4)
    w = np.roll(np.eye(c, dtype=np.int8), 1, axis=1).reshape(c, c, 1, 1)
    bias_scale = np.full(c, np.nextafter(np.float32(2.0**-4), np.float32(1)), np.float32)
    wdq = g.node("DequantizeLinear", [g.init("w", w), g.init("ws", np.ones(c, np.float32))], "wdq", axis=0)
    bdq = g.node("DequantizeLinear", [g.init("b", np.ones(c, np.int32)), g.init("bs", bias_scale)], "bdq", axis=0)
    add = g.node("Add", [g.node("Conv", [x, wdq, bdq], "conv"), x], "add")
    g.inits.append(helper.make_tensor("add.zp", TensorProto.UINT4, [], [0]))
    args = [g.init("add.scale", np.array(2.0**-3, np.float32)), "add.zp"]
    out = g.node("DequantizeLinear", [g.node("QuantizeLinear", [add, *args], "add.q"), *args], "add.dq")
    model = g.model(out)
    model.opset_import[0].version = 21
    graph = from_onnx(model)
    x = images()
    values = oracle.oracle_run(model, x, intermediate=True)
    real = values["add"] / 2.0**-3
    assert np.count_nonzero((np.abs(real - np.floor(real) - 0.5) < 1e-6) & (real > 0) & (real < 15)) > 100
    assert [(layer.name, layer.mismatches) for layer in oracle.layer_by_layer(graph, values, x) if layer.mismatches] == []


@pytest.mark.parametrize("unsigned", [True, False], ids=["uint8", "int8"])
def test_a_conv_output_1e_8_steps_from_a_boundary_rounds_as_the_oracle(unsigned: bool) -> None:
    """A conv requantized by a 31-bit dyadic b is off by up to |value| * 2^-31 steps: with these float32 scales
    the accumulators +-10987 mean +-58.49999999 steps, and b rounds them to +-59 (hawqc's old rule).
    ``dyadic.exact_requantization`` moves the multiplier so that both round to +-58, as the oracle does."""
    g = _Graph(unsigned, seed=0)
    c = SHAPE[1]
    x = g.q("input", 2.0**-3)
    w = np.zeros((c, c, 1, 1), np.int8)
    w[:, 0], w[:, 1] = 127, 1  # acc = 127 * x0 + x1
    wdq = g.node("DequantizeLinear", [g.init("w", w), g.init("ws", np.full(c, 0.007057627663016319, np.float32))],
                 "wdq", axis=0)
    out = g.q(g.node("Conv", [x, wdq], "conv"), 0.16568836569786072)
    model = g.model(out)
    x = images()
    x[0, :2, 0, 0], x[1, :2, 0, 0] = (87 / 8, -62 / 8), (-87 / 8, 62 / 8)
    values = oracle.oracle_run(model, x, intermediate=True)
    real = values["conv"][:, 0, 0, 0] / float(np.float32(0.16568836569786072))
    assert np.allclose(np.abs(real), 58.5, atol=1e-7) and np.all(np.abs(real) != 58.5)
    layers = oracle.layer_by_layer(from_onnx(model), values, x)
    assert [(layer.name, layer.mismatches) for layer in layers if layer.mismatches] == []


def test_the_layer_comparison_sees_a_rounding_rule_that_is_not_the_file_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """Average pools rounded half up (hawqc's old rule) differ from the oracle layer by layer."""
    from hawqc.reference import kernels

    def half_up(acc, b, c, qmin, qmax, axis=None, input_zero_point=0, zero_point=0, tie_window=0):  # type: ignore[no-untyped-def]
        x = (acc.astype(np.int64) - input_zero_point) * int(b)
        return np.clip(((x + (1 << (int(c) - 1))) >> int(c)) + zero_point, qmin, qmax).astype(np.int32)

    model = qdq_model("avgpool", unsigned=False)
    x = images()
    values = oracle.oracle_run(model, x, intermediate=True)
    monkeypatch.setattr(kernels, "requantize", half_up)
    assert sum(layer.mismatches for layer in oracle.layer_by_layer(from_onnx(model), values, x)) > 0


def test_a_batch_norm_scale_quantized_twice_is_read_as_its_exact_value() -> None:
    """ONNX Runtime's quantizer shares equal BatchNormalization scales (DenseNet's ones, through ``Identity``) and
    quantizes them again: DequantizeLinear -> QuantizeLinear -> DequantizeLinear of a constant. The oracle divides
    in float64 (channels 0-2: quotients within 1e-6 of a tie that a float32 division rounds onto it) and
    dequantizes exactly (channel 3: ``255 * float32(1/255)``, which float32 holds as 1.0, an output 1.2e-6 steps
    above 40.5 that 1.0 puts below). hawqc equals it on every element."""
    g = _Graph(unsigned=False, seed=0)
    s_in, q_star, var, eps = np.float32(0.0123), 20, np.float32(0.99999), 1e-5
    x = g.q("input", float(s_in))
    q1 = np.array([62, 72, 67, 127], np.int8)
    s1 = np.array([0.006694526, 0.011328875, 0.013741864, 1 / 127], np.float32)
    s2 = np.array([0.016276887, 0.014436796, 0.023308985, 1 / 255], np.float32)
    zp = np.array([0, 0, 0, -128], np.int8)
    shared = g.node("DequantizeLinear", [g.init("g.q1", q1), g.init("g.s1", s1)], "gamma.shared", axis=0)
    again = g.node("QuantizeLinear", [g.node("Identity", [shared], "gamma"), g.init("g.s2", s2), g.init("g.zp", zp)],
                   "gamma.q", axis=0)
    gamma = g.node("DequantizeLinear", [again, "g.s2", "g.zp"], "gamma.dq", axis=0)
    exact = 255 * np.float64(s2[3])  # channel 3's scale; float32(exact) == 1.0
    d = np.sqrt(np.float64(var) + np.float64(np.float32(eps)))
    x_star = q_star * np.float64(s_in)
    s_out = np.float32(x_star / d * exact / 40.5)
    mean = np.zeros(4, np.float32)
    mean[3] = np.float32(x_star - (40.5 + 1.2e-6) * np.float64(s_out) * d / exact)
    steps = exact * (x_star - np.float64(mean[3])) / d / np.float64(s_out)
    assert 40.5 < steps < 40.5 + 2e-6 and np.float32(exact) * (x_star - np.float64(mean[3])) / d / np.float64(s_out) < 40.5
    params = [gamma, g.init("bn.beta", np.zeros(4, np.float32)), g.init("bn.mean", mean),
              g.init("bn.var", np.full(4, var, np.float32))]
    model = g.model(g.q(g.node("BatchNormalization", [x, *params], "bn", epsilon=eps), float(s_out)))
    images_ = images() * 0 + np.float32(x_star)  # every element of channel 3 on the tie's input
    images_[:, :3] = images()[:, :3]
    values = oracle.oracle_run(model, images_, intermediate=True)
    assert np.all(values["bn.q"][:, 3] == 41)
    layers = oracle.layer_by_layer(from_onnx(model), values, images_)
    assert [(layer.name, layer.mismatches) for layer in layers if layer.mismatches] == []


def test_oracle_dequantizes_int32_without_float32() -> None:
    g = _Graph(unsigned=False, seed=0)
    big = np.array([2**24 + 1, -(2**30) - 3], np.int32)
    out = g.node("DequantizeLinear", [g.init("big", big), g.init("s", np.array(1.0, np.float32))], "out")
    got = oracle.oracle_run(g.model(out), images())
    assert got.dtype == np.float64 and got.tolist() == big.tolist()


@pytest.mark.parametrize("attrs", [dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], ceil_mode=1),  # GoogLeNet's
                                   dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 0, 0], ceil_mode=1),
                                   dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 0], dilations=[2, 1])])
def test_oracle_max_pool_has_the_output_onnx_runtime_computes(attrs: dict[str, object]) -> None:
    """The stock reference pads a stride-1 ``ceil_mode`` MaxPool twice (12x12 -> 14x14); the oracle's equals ONNX
    Runtime's on every element."""
    import onnxruntime as ort

    g = _Graph(unsigned=False, seed=0)
    out = g.node("MaxPool", ["input"], "out", **attrs)
    model = g.model(out)
    x = images()
    theirs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_array_equal(oracle.oracle_run(model, x), theirs)


def test_pools_on_ties_and_of_concats_of_grids_equal_the_oracle() -> None:
    """Average pools whose sums lie exactly on ties (ratio 1/36, no dyadic number) round half to even, and a pool of
    a concat of two grids is a concat of two exact pools: layer by layer equal to the oracle."""
    model = qdq_model("pool_ties", unsigned=True)
    graph = from_onnx(model)
    x = images(2) * 4
    values = oracle.oracle_run(model, x, intermediate=True)
    real = values["pool6"] / float(np.float32(0.05))
    assert np.count_nonzero(np.abs(real - np.floor(real) - 0.5) < 1e-9) > 10
    assert [op.op for op in graph.ops].count("avgpool") == 3  # the 3x3 pool once per grid of the concat
    assert [(layer.name, layer.mismatches) for layer in oracle.layer_by_layer(graph, values, x) if layer.mismatches] == []


@pytest.mark.parametrize("name", ["residual_add", "batchnorm", "per_channel_activation", "activations",
                                  "pool_ties", "float_island", "accumulator_add"])
def test_compiled_module_equals_the_oracle(name: str) -> None:
    model = qdq_model(name, unsigned=True)
    module = hawqc.compile_integer_only(model, input_shape=SHAPE)
    x = images(1)
    got = module(x)
    np.testing.assert_array_equal(got, module.reference(x))
    result = oracle.agreement(got, oracle.oracle_run(model, x), output_step(model))
    assert result.exact == result.elements


@pytest.mark.parametrize("config", ["uniform8", "uniform4"])
def test_own_exports_mean_to_onnx_runtime_what_hawqc_computes(config: str, digits_model, digits_calibration,  # type: ignore[no-untyped-def]
                                                              tmp_path) -> None:
    """ONNX Runtime (optimisations off) runs hawqc's W8A8/W4A4 export at least as close to hawqc's
    compiled module as to the file's oracle; hawqc equals the oracle layer by layer."""
    import onnxruntime as ort

    from hawqc.quant.export import to_onnx

    qmodel = quantize(digits_model, config, digits_calibration)
    path = tmp_path / f"{config}.onnx"
    model = to_onnx(qmodel, path, digits_calibration[0])
    x = digits_calibration[0][:8].numpy()
    graph = from_onnx(model, x.shape)
    module = hawqc.compile_integer_only(path, input_shape=x.shape)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ours, theirs = module(x), session.run(None, {"input": x})[0]
    np.testing.assert_array_equal(ours, graph.run(x))
    np.testing.assert_array_equal(ours, qmodel.integer_graph().run(x))  # the file means the QuantModel's graph
    values = oracle.oracle_run(model, x, intermediate=True)
    assert [(layer.name, layer.mismatches) for layer in oracle.layer_by_layer(graph, values, x) if layer.mismatches] == []
    step = graph.ops[-1].consts["scale"]
    want = values[model.graph.output[0].name]
    assert oracle.agreement(ours, want, step).exact_pct == 100.0
    vs_hawqc, vs_oracle = oracle.agreement(theirs, ours, step), oracle.agreement(theirs, want, step)
    # the output is the fc's float accumulator: hawqc's float32 value lies within half a step of the oracle's
    assert vs_hawqc.exact >= vs_oracle.exact and vs_hawqc.mean_steps <= vs_oracle.mean_steps + 0.5


def operator_form(make: Callable[[], Any], tmp_path) -> tuple[onnx.ModelProto, tuple[int, ...]]:  # type: ignore[no-untyped-def]
    """The net ``make`` builds (3 input channels, random weights, seed 0) exported at batch 1 and quantized by ONNX Runtime in operator
    form (uint8 activations, per-channel int8 weights), calibrated on 4 images."""
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": images(k)[:1, :3]} for k in range(4)])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.batches, None)

    torch.manual_seed(0)
    net, shape = make(), (1, 3, *SHAPE[2:])
    float_path, path = tmp_path / "float.onnx", tmp_path / "qop.onnx"
    torch.onnx.export(net.eval(), (torch.randn(shape),), str(float_path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    quantize_static(str(float_path), str(path), Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(str(path)), shape


def operator_form_model(tmp_path) -> tuple[onnx.ModelProto, tuple[int, ...]]:  # type: ignore[no-untyped-def]
    """A small net in ONNX Runtime's operator form: QLinearConv, QLinearLeakyRelu, QLinearSigmoid, QLinearMul,
    QLinearAdd, QLinearConcat, QLinearAveragePool, QLinearGlobalAveragePool, QLinearMatMul."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
            self.pool = nn.AvgPool2d(3, 1, 1)
            self.w = nn.Parameter(torch.randn(16, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = nn.functional.leaky_relu(self.a(x), 0.1)
            b = self.b(x)
            y = torch.cat([a * torch.sigmoid(b), a + b], 1)
            return torch.matmul(torch.flatten(nn.functional.adaptive_avg_pool2d(self.pool(y), 1), 1), self.w)

    return operator_form(Net, tmp_path)


def test_operator_form_means_its_qdq_form_as_onnx_runtime_computes_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The oracle reads each QLinear* node as DequantizeLinear -> float op -> QuantizeLinear: ONNX Runtime (optimisations
    off) computes the same integers on every quantized tensor (within one step, nearly all equal), and hawqc equals
    the oracle layer by layer."""
    import onnxruntime as ort

    model, shape = operator_form_model(tmp_path)
    ops = {n.op_type for n in model.graph.node}
    assert {"QLinearConv", "QLinearLeakyRelu", "QLinearSigmoid", "QLinearMul", "QLinearAdd", "QLinearConcat",
            "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearMatMul"} <= ops
    assert not [n.op_type for n in oracle.as_qdq(model).graph.node if n.op_type.startswith(("QLinear", "QGemm"))]
    quantized = [n.output[0] for n in model.graph.node if n.op_type.startswith("QLinear")]
    exposed = onnx.ModelProto.FromString(model.SerializeToString())
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in quantized)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    graph = from_onnx(model, shape)
    equal = elements = 0
    for seed in range(3):
        x = images(seed)[:1, :3]
        values = oracle.oracle_run(model, x, intermediate=True)
        theirs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x})))
        for name in quantized:
            want, got = np.asarray(values[name], np.int64), theirs[name].astype(np.int64)
            assert np.abs(got - want).max() <= 1, name
            equal, elements = equal + np.count_nonzero(got == want), elements + got.size
        assert [(layer.name, layer.mismatches) for layer in oracle.layer_by_layer(graph, values, x)
                if layer.mismatches] == []
    assert equal >= 0.999 * elements


def test_operator_form_pads_of_the_float_input_and_of_integers_equal_the_oracle(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """ONNX Runtime's operator form of a TF-style explicit padding (EfficientNet-Lite's): a Pad of the float input
    before its QuantizeLinear, read as the quantized input padded with the quantized value, and a Pad of a uint8
    tensor with a non-zero zero point, whose constant is already an integer on the tensor's grid."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, 2), nn.Conv2d(8, 8, 3, 2, groups=8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(nn.functional.pad(self.a(nn.functional.pad(x, (0, 1, 0, 1))), (1, 1, 1, 1)))

    model, shape = operator_form(Net, tmp_path)
    nodes = {n.output[0]: n for n in model.graph.node}
    pads = [n for n in model.graph.node if n.op_type == "Pad"]
    assert [p.input[0] in nodes for p in pads] == [False, True]  # the input's pad, then a QLinearConv's
    zero_point = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == nodes[pads[1].input[0]].input[7]))
    assert zero_point != 0
    graph = from_onnx(model, shape)
    assert [op.attrs["pad_value"] for op in graph.ops if op.op == "pad"][1] == zero_point
    for seed in range(2):
        x = images(seed)[:1, :3]
        values = oracle.oracle_run(model, x, intermediate=True)
        layers = oracle.layer_by_layer(graph, values, x)
        assert len(layers) >= 3 and [(layer.name, layer.mismatches) for layer in layers if layer.mismatches] == []


def test_operator_form_pool_of_a_batch_norm_is_rounded_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """DenseNet's last layers in ONNX Runtime's operator form: a BatchNormalization in float on a dequantized concat,
    ReLU, GlobalAveragePool and Flatten, quantized only before the classifier. The mean is rounded once at that
    QuantizeLinear, from a grid 2^15 times finer than its output (it was first rounded onto a grid 16x finer than
    the BatchNorm's, then pooled on it and rounded again through the Flatten: 3 of 256 elements differed)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(3, 32, 3, padding=1)
            self.bn, self.fc = nn.BatchNorm2d(64), nn.Linear(64, 10)
            with torch.no_grad():
                self.bn.running_mean.uniform_(-0.3, 0.3)
                self.bn.running_var.uniform_(0.2, 2.0)
                self.bn.weight.uniform_(0.5, 3.0)
                self.bn.bias.uniform_(-1.0, 1.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    model, shape = operator_form(Net, tmp_path)
    assert [n.op_type for n in model.graph.node][4:9] == ["DequantizeLinear", "BatchNormalization", "Relu",
                                                          "GlobalAveragePool", "Flatten"]
    graph = from_onnx(model, shape)
    pool = next(op for op in graph.ops if op.op == "global_avgpool")
    fine = next(op for op in graph.ops if op.output == pool.inputs[0])
    assert fine.op == "requantize" and pool.attrs["scale"] / pool.attrs["input_scale"] == 2**15  # 144 cells, uint8
    module = hawqc.compile_integer_only(model, input_shape=shape)
    for seed in range(4):
        x = images(seed)[:1, :3]
        layers = oracle.layer_by_layer(graph, oracle.oracle_run(model, x, intermediate=True), x)
        assert [(layer.name, layer.mismatches) for layer in layers if layer.mismatches] == []
        np.testing.assert_array_equal(module(x), module.reference(x))
