"""Float regions a quantizer left (NNCF's squeeze-excite, PT2E's mean of an unquantized ReLU), quantized
by hawqc from calibration inputs: integer-only, bit-exact, close to what the file means."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import hawqc
from hawqc.frontend.onnx_qdq import Unquantized, from_onnx
from hawqc.frontend.oracle import oracle_run
from hawqc.relax_passes.float_ops import float_ops

SHAPE = (2, 4, 6, 6)
OUTPUT_STEP = 0.02


def island_model(pt2e_gate: bool) -> onnx.ModelProto:
    """A quantized conv whose output a squeeze-excite block gates, the block left in float as NNCF leaves
    it (float 1x1 conv weights and biases, ReLU, Sigmoid quantized only at its output); then a conv whose
    ReLU output is gated by the sigmoid of another conv with no QuantizeLinear on either (PT2E's RegNet),
    or quantized and max pooled."""
    rng = np.random.default_rng(0)

    def q_dq(src: str, scale: str, dst: str) -> list:
        return [helper.make_node("QuantizeLinear", [src, scale, "z"], [f"{dst}_q"], name=f"{dst}_quantize"),
                helper.make_node("DequantizeLinear", [f"{dst}_q", scale, "z"], [dst], name=f"{dst}_dequantize")]

    def int8_weight(name: str, shape: tuple[int, ...]) -> list:
        return [numpy_helper.from_array(rng.integers(-127, 128, shape).astype(np.int8), f"{name}_int8"),
                numpy_helper.from_array((rng.uniform(0.5, 1.5, shape[0]) / 127 / np.sqrt(np.prod(shape[1:])))
                                        .astype(np.float32), f"{name}_scale"),
                numpy_helper.from_array(np.zeros(shape[0], np.int8), f"{name}_zero")]

    scales = {"s_in": 0.03, "s_a": 0.05, "s_gate": 1 / 127, "s_m": 0.03, "s_out": OUTPUT_STEP, "s_r": 0.04}
    inits = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in scales.items()]
    inits += [numpy_helper.from_array(np.array(0, np.int8), "z"), *int8_weight("w1", (8, 4, 3, 3)),
              *int8_weight("w4", (8, 8, 1, 1)), *int8_weight("w5", (8, 8, 1, 1)),
              numpy_helper.from_array(rng.normal(0, 0.5, (4, 8, 1, 1)).astype(np.float32), "w2"),
              numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b2"),
              numpy_helper.from_array(rng.normal(0, 0.5, (8, 4, 1, 1)).astype(np.float32), "w3"),
              numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b3")]
    weights = [helper.make_node("DequantizeLinear", [f"{w}_int8", f"{w}_scale", f"{w}_zero"], [w], name=f"{w}_dq",
                                axis=0) for w in ("w1", "w4", "w5")]
    nodes = [*weights, *q_dq("input", "s_in", "x"),
             helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"), *q_dq("r1", "s_a", "a"),
             helper.make_node("GlobalAveragePool", ["a"], ["g"], name="squeeze"),
             helper.make_node("Conv", ["g", "w2", "b2"], ["c2"], name="reduce"),
             helper.make_node("Relu", ["c2"], ["r2"], name="reduce_relu"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="expand"),
             helper.make_node("Sigmoid", ["c3"], ["sg"], name="gate"), *q_dq("sg", "s_gate", "gd"),
             helper.make_node("Mul", ["a", "gd"], ["m"], name="excite"), *q_dq("m", "s_m", "md"),
             helper.make_node("Conv", ["md", "w4"], ["c4"], name="conv4"),
             helper.make_node("Relu", ["c4"], ["r4"], name="relu4")]
    if pt2e_gate:
        nodes += [helper.make_node("Conv", ["md", "w5"], ["c5"], name="conv5"),
                  helper.make_node("Sigmoid", ["c5"], ["sg5"], name="gate5"),
                  helper.make_node("Mul", ["sg5", "r4"], ["y"], name="gated")]
    else:
        nodes += [*q_dq("r4", "s_r", "rd"), helper.make_node("MaxPool", ["rd"], ["y"], name="pool", kernel_shape=[2, 2],
                                                             strides=[2, 2])]
    nodes += q_dq("y", "s_out", "output")
    graph = helper.make_graph(nodes, "islands", [helper.make_tensor_value_info("input", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 8, *([6, 6] if pt2e_gate else [3, 3])])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def inputs(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *SHAPE[1:])).astype(np.float32)


@pytest.mark.parametrize("pt2e_gate", [False, True])
def test_float_regions_quantized_from_calibration_are_integer_and_bit_exact(pt2e_gate: bool) -> None:
    model = island_model(pt2e_gate)
    module = hawqc.compile_integer_only(model, calib_data=inputs(8, 0))
    assert "float_ops" not in module.graph.metadata and not float_ops(module.ir)
    calibrated = module.graph.metadata["calibrated"]
    assert calibrated["inputs"] == 8 and sorted(calibrated["weights"]) == ["w2", "w3"]
    expected = {"g (GlobalAveragePool)", "reduce (Conv)", "reduce_relu (Relu)", "expand (Conv)", "gate (Sigmoid)"}
    assert set(calibrated["nodes"]) == expected | ({"gated (Mul)"} if pt2e_gate else set())
    assert all(s > 0 for s in calibrated["tensors"].values())
    for seed in range(3):
        x = inputs(SHAPE[0], 10 + seed)
        y = module(x)
        np.testing.assert_array_equal(y, module.reference(x))
        steps = np.abs(y - oracle_run(model, x)) / OUTPUT_STEP  # the file's float64 meaning, islands in float
        assert steps.max() <= 2 + 1e-3  # a step of the 0.04 grid before the max pool


def test_without_calibration_float_regions_compute_in_float_and_are_reported() -> None:
    island = from_onnx(island_model(pt2e_gate=False))
    assert {f.split(" (")[0] for f in island.metadata["float_ops"]} == {"g", "reduce", "reduce_relu", "expand", "gate"}
    model = island_model(pt2e_gate=True)  # PT2E's gate: a sigmoid of a conv times a ReLU'd conv, neither rounded
    graph = from_onnx(model)
    assert {f.split(" (")[0] for f in graph.metadata["float_ops"]} == \
        {"g", "reduce", "reduce_relu", "expand", "gate", "gate5", "gated"}
    for seed in range(2):
        x = inputs(SHAPE[0], 20 + seed)
        y = graph.run(x)
        assert len(np.unique(y)) > 5
        assert (np.abs(y - oracle_run(model, x)) / OUTPUT_STEP).max() <= 1 + 1e-3  # float64 regions, one rounding
    with pytest.raises(Unquantized, match=r"^ONNX node 'gated' \(Mul\): .*--calib-data"):
        from_onnx(model, float_regions=False)  # how calibration finds what to quantize


def test_cli_compile_with_calib_data(tmp_path: Path) -> None:
    onnx.save(island_model(pt2e_gate=True), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", inputs(4, 0))
    np.save(tmp_path / "bad.npy", inputs(4, 0)[:, :3])

    def compile_(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hawqc.cli", "compile", str(tmp_path / "m.onnx"), "--strict",
                               "-o", str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=300)

    strict = compile_()  # the float regions compile in float, and --strict refuses them
    assert strict.returncode != 0 and "float ops remain inside the graph (--strict)" in strict.stderr
    assert "7 float ops" in strict.stderr and len(strict.stderr.strip().splitlines()) == 1
    done = compile_("--calib-data", str(tmp_path / "x.npy"))
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stdout.split())
    assert "quantized from 4 calibration inputs: 6 ops that computed or read float tensors" in said
    wrong = compile_("--calib-data", str(tmp_path / "bad.npy"), "--force")
    assert wrong.returncode != 0 and "calibration inputs of shape [4, 3, 6, 6]" in wrong.stderr
    assert "Traceback" not in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("mode", "transform"), [("linear", "pytorch_half_pixel"), ("linear", "align_corners"),
                                                 ("nearest", "asymmetric")])
def test_an_unquantized_resize_computes_in_float(mode: str, transform: str) -> None:
    """PT2E's LR-ASPP head: a ReLU'd conv gated by a sigmoid, neither rounded, resized (6x6 -> 11x11) before
    its QuantizeLinear: the product and the Resize compute in float64 (listed), equal in the compiled module
    and the reference, within a step of the file's meaning; calibration quantizes them (PT2E's mode)."""
    rng = np.random.default_rng(1)
    weights = {f"w{k}": rng.integers(-127, 128, (4, 4, 1, 1)).astype(np.int8) for k in (1, 2)}
    consts = {**weights, "ws": np.array(0.004, np.float32), "s": np.array(0.03, np.float32),
              "s_out": np.array(OUTPUT_STEP, np.float32), "z": np.array(0, np.int8),
              "sizes": np.array([SHAPE[0], 4, 11, 11], np.int64)}
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"]),
             *[helper.make_node("DequantizeLinear", [w, "ws"], [f"{w}_f"]) for w in weights],
             helper.make_node("Conv", ["x", "w1_f"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["x", "w2_f"], ["c2"], name="conv2"),
             helper.make_node("Sigmoid", ["c2"], ["sg"], name="gate"),
             helper.make_node("Mul", ["r1", "sg"], ["m"], name="gated"),
             helper.make_node("Resize", ["m", "", "", "sizes"], ["up"], name="up", mode=mode,
                              coordinate_transformation_mode=transform),
             helper.make_node("QuantizeLinear", ["up", "s_out", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s_out", "z"], ["output"])]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("input", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    module = hawqc.compile_integer_only(model)
    assert {f.split(" (")[0] for f in module.graph.metadata["float_ops"]} == {"gate", "gated", "up"}
    for seed in range(2):
        x = inputs(SHAPE[0], 30 + seed)
        y = module(x)
        np.testing.assert_array_equal(y, module.reference(x))
        assert y.shape == (SHAPE[0], 4, 11, 11) and len(np.unique(y)) > 5
        assert (np.abs(y - oracle_run(model, x)) / OUTPUT_STEP).max() <= 1 + 1e-3
    if transform == "pytorch_half_pixel":  # PT2E's
        calibrated = hawqc.compile_integer_only(model, calib_data=inputs(4, 0))
        assert "float_ops" not in calibrated.graph.metadata
        assert "up (Resize)" in calibrated.graph.metadata["calibrated"]["nodes"]
        np.testing.assert_array_equal(calibrated(x), calibrated.reference(x))
