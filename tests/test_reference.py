"""The integer graph format and the numpy kernels on hand-written graphs."""

from pathlib import Path

import numpy as np
import pytest
import torch

from hawqc import models, quantize
from hawqc.quant import torch_kernels
from hawqc.quant.dyadic import dyadic
from hawqc.reference import IntegerGraph, IntOp, execute, from_torch
from hawqc.reference.graph import pool_consts


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qmodel = quantize(models.get("tiny_resnet"), "uniform4", [torch.randn(4, 1, 28, 28)])
    graph = from_torch(qmodel)
    path = tmp_path / "tiny.npz"
    graph.save(path)
    loaded = IntegerGraph.load(path)
    assert [o.op for o in loaded.ops] == [o.op for o in graph.ops]
    assert loaded.metadata["bit_config"]["conv1"] == {"w_bits": 8, "a_bits": 8}
    assert loaded.metadata["input_shape"] == [None, 1, 28, 28]
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(loaded.run(x), graph.run(x))


def test_loading_a_foreign_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an integer graph file"):
        IntegerGraph.load(path)


def handmade_graph() -> IntegerGraph:
    b, c = dyadic(0.75)
    ops = [
        IntOp("quantize", ["input"], "q", {"qmin": -128, "qmax": 127}, {"scale": np.array(0.1, np.float32)}),
        IntOp("pad", ["q"], "padded", {"pads": [1, 0, 0, 2]}),
        IntOp("clip", ["padded"], "relu", {"qmin": 0, "qmax": 127}),
        IntOp("avgpool", ["relu"], "pooled", {"kernel": [2, 2], "stride": [1, 1], "padding": [0, 0, 1, 1],
                                             "qmin": 0, "qmax": 127},
              pool_consts(1.0, 1.0, 4, 127)[0]),
        IntOp("requantize", ["pooled"], "scaled", {"qmin": -8, "qmax": 7}, {"b": np.array(b), "c": np.array(c)}),
        IntOp("add", ["scaled", "relu_cropped"], "sum", {"qmin": -128, "qmax": 127}),
        IntOp("reshape", ["sum"], "flat", {"shape": [2, -1]}),
        IntOp("dequantize", ["flat"], "output", {}, {"scale": np.array(0.2, np.float32)}),
    ]
    # relu_cropped: a second path, same shape as "scaled"
    ops.insert(4, IntOp("maxpool", ["relu"], "relu_cropped", {"kernel": [1, 1], "stride": [1, 1], "padding": [0, 0, 0, 0]}))
    return IntegerGraph("input", "output", ops)


def test_handmade_graph_matches_hand_arithmetic() -> None:
    x = np.array([[[[0.14, -0.26], [0.35, 1.0]]], [[[-0.05, 0.25], [20.0, -0.5]]]], dtype=np.float32)
    out = handmade_graph().run(x)
    q = np.clip(np.rint(x / np.float64(np.float32(0.1))), -128, 127)      # [[1, -3], [3, 10]], [[0, 2], [127, -5]]
    assert q[0, 0, 1, 0] == 3 and np.rint(x[0, 0, 1, 0] / np.float32(0.1)) == 4  # float64, not float32, division
    padded = np.pad(q, ((0, 0), (0, 0), (1, 0), (0, 2)))                  # 3 x 4
    relu = np.maximum(padded, 0)
    windows = np.pad(relu, ((0, 0), (0, 0), (0, 1), (0, 1)))
    sums = sum(windows[:, :, i:i + 3, j:j + 4] for i in (0, 1) for j in (0, 1))
    pooled = np.clip(np.rint(sums / 4), 0, 127)                           # round half to even
    scaled = np.clip(np.rint(pooled * 0.75), -8, 7)
    expected = (np.clip(scaled + relu, -128, 127).reshape(2, -1) * np.float32(0.2)).astype(np.float32)
    np.testing.assert_array_equal(out, expected)
    from hawqc.reference.kernels import KERNELS

    np.testing.assert_array_equal(execute(handmade_graph(), torch.from_numpy(x), torch_kernels.KERNELS).numpy(),
                                  execute(handmade_graph(), x, KERNELS))


def test_accumulator_overflow_is_detected() -> None:
    weight = np.full((1, 1, 1, 1), 127, dtype=np.int8)
    graph = IntegerGraph("input", "output", [
        IntOp("quantize", ["input"], "q", {"qmin": -128, "qmax": 127}, {"scale": np.array(1.0, np.float32)}),
        IntOp("conv2d", ["q"], "acc", {"stride": [1, 1], "padding": [0, 0, 0, 0], "dilation": [1, 1], "groups": 1},
              {"weight": weight, "bias": np.array([2**31 - 100], dtype=np.int32)}),
        IntOp("dequantize", ["acc"], "output", {}, {"scale": np.array([1.0], np.float32)}),
    ])
    with pytest.raises(ValueError, match="int32 accumulator overflow"):
        graph.run(np.ones((1, 1, 2, 2), dtype=np.float32))
