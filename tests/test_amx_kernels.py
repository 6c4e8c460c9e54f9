"""The AMX conv kernel (``kernels="amx"``): bit-exact against the reference on every shape class it takes, and
taking only the layers it should. Skipped where the CPU or Linux has no AMX int8."""

import numpy as np
import pytest
from test_x86_kernels import _requantized_conv, layer_graph

from hawqc.reference.graph import IntegerGraph, IntOp
from hawqc.runtime import threads
from hawqc.runtime.module import _build, _lower, compile_graph, has_feature, resolve_kernels
from hawqc.runtime.target import parse_target
from hawqc.topi_int4.x86 import amx
from hawqc.topi_int4.x86 import conv2d as conv2d_kernel

TARGET = parse_target("llvm")
pytestmark = pytest.mark.skipif(not (has_feature(TARGET, "amx-int8") and threads.request_amx()),
                                reason="no AMX int8 on this CPU")

# (in channels, out channels, kernel, stride, padding, dilation, input range, pad value, row width)
CASES = {
    "3x3-int8": (64, 64, (3, 3), 1, 1, 1, (-128, 127), 0, 14),
    "3x3-s2-channels-padded-to-192-zero-point": (160, 64, (3, 3), 2, 1, 1, (0, 255), 7, 15),
    "1x1-s2": (128, 96, (1, 1), 2, 0, 1, (0, 255), 0, 28),
    "1x7-rows-of-7-in-tiles-of-4": (160, 64, (1, 7), 1, (0, 3), 1, (-128, 127), 0, 7),
    "7x1-rows-of-17-in-tiles-of-9": (128, 32, (7, 1), 1, (3, 0), 1, (0, 255), 3, 17),
    "dilated-3x3-odd-out-channels": (64, 60, (3, 3), 1, 2, 2, (-20, 100), 0, 12),
    "3x3-rows-of-40-in-2-pairs-of-10": (64, 32, (3, 3), 1, 1, 1, (-128, 127), 0, 40),
    "3x3-valid-rows-of-1-pixel": (256, 64, (3, 3), 1, 0, 1, (-128, 127), 0, 3),
}


def conv_graph(cin: int, cout: int, kernel: tuple[int, int], stride: int, pad: int | tuple[int, int],
               dilation: int, pad_value: int, seed: int = 0) -> IntegerGraph:
    square = layer_graph("conv2d", cin, cout, kernel[0], stride, 0, dilation, pad_value, True, seed=seed)
    conv, requant = square.ops
    rng = np.random.default_rng(seed)
    top, left = (pad, pad) if isinstance(pad, int) else pad
    attrs = dict(conv.attrs, padding=[top, left, top, left])
    consts = dict(conv.consts, weight=rng.integers(-128, 128, (cout, cin, *kernel)).astype(np.int8))
    return IntegerGraph("x", requant.output, [IntOp("conv2d", conv.inputs, conv.output, attrs, consts), requant])


def kernel_names(graph: IntegerGraph, shape: tuple, dtype: str) -> list[str]:
    _, lowered = _build(_lower(graph, shape, TARGET, "amx", input_dtype=dtype), TARGET, "amx")
    return [gv.name_hint for gv in lowered.functions]


@pytest.mark.parametrize("case", CASES)
def test_amx_conv_kernel_is_exact(case: str) -> None:
    cin, cout, kernel, stride, pad, dilation, (lo, hi), pad_value, width = CASES[case]
    graph = conv_graph(cin, cout, kernel, stride, pad, dilation, pad_value)
    dtype = "uint8" if lo >= 0 and hi > 127 else "int8"
    x = np.random.default_rng(1).integers(lo, hi + 1, (2, cin, 9, width)).astype(dtype)
    assert "conv2d_amx_requant" in kernel_names(graph, x.shape, dtype)
    module = compile_graph(graph, x.shape, TARGET, input_dtype=dtype, kernels="amx")
    assert module.kernels == "amx" and module.fused == (1, 1)
    np.testing.assert_array_equal(module(x), graph.run(x))


def test_auto_picks_amx_here_and_its_kernel_runs_tile_instructions() -> None:
    assert resolve_kernels("auto", TARGET) == "amx"
    graph = conv_graph(64, 64, (3, 3), 1, 1, 1, 0)
    executable, _ = _build(_lower(graph, (2, 64, 14, 14), TARGET, "amx", input_dtype="int8"), TARGET, "amx")
    assembly = executable.mod.imports[0].inspect_source("asm")
    assert "tdpbusd" in assembly and "ldtilecfg" in assembly


@pytest.mark.parametrize(("case", "kernel"), [((64, 64, (3, 3), 16), "amx"),
                                              ((64, 256, (1, 1), 16), "vnni"),  # 64 products per output
                                              ((32, 64, (3, 3), 16), "vnni"),  # fewer than 64 input channels
                                              ((144, 64, (1, 1), 16), "vnni"),  # a third more in padding
                                              ((64, 48, (3, 3), 16), "vnni"),  # a block of 16 channels left over
                                              ((64, 64, (3, 3), 2), "vnni")])  # under a million products
def test_layers_the_amx_kernel_leaves_to_vnni(case: tuple, kernel: str) -> None:
    cin, cout, size, width = *case[:3], case[3]
    graph = conv_graph(cin, cout, size, 1, size[0] // 2, 1, 0)
    assert f"conv2d_{kernel}_requant" in kernel_names(graph, (2, cin, width, width), "int8")


@pytest.mark.parametrize("batch", [2, None])
def test_amx_kernel_runs_any_batch_and_channels_outer(batch: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """An open batch, and (with a pretended 4 KB L2) blocks of output channels outside the rows: exact."""
    monkeypatch.setattr(conv2d_kernel, "l2_bytes", lambda: 4096)
    graph = conv_graph(64, 96, (3, 3), 1, 1, 1, 0, seed=3)
    module = compile_graph(graph, (batch, 64, 10, 10), TARGET, input_dtype="int8", kernels="amx")
    for n in (2,) if batch else (1, 3):
        x = np.random.default_rng(n).integers(-128, 128, (n, 64, 10, 10)).astype(np.int8)
        np.testing.assert_array_equal(module(x), graph.run(x))


def test_amx_epilogue_adds_a_residual() -> None:
    """A residual Add of two requantized 1x1 convs (128 input channels) in the later conv's AMX epilogue: exact."""
    from hawqc.reference.graph import AddInput, aligned_add_op

    s = np.float32
    ops = [IntOp("quantize", ["input"], "q", {"qmin": 0, "qmax": 255, "zero_point": 10}, {"scale": np.array(0.1)}),
           *_requantized_conv("a", "q", 128, 64, 1, 0, 255), *_requantized_conv("b", "q", 128, 64, 2, -128, 127),
           aligned_add_op([AddInput("a", s(0.07), 3, 256), AddInput("b", s(0.05), 3, 256)], "sum", s(0.09), 0, 255, 5),
           IntOp("dequantize", ["sum"], "output", {"zero_point": 5}, {"scale": np.array(0.09)})]
    graph = IntegerGraph("input", "output", ops)
    shape = (2, 128, 14, 14)
    assert "conv2d_amx_requant_add" in [gv.name_hint for gv in _build(_lower(graph, shape, TARGET, "amx"), TARGET)[1].functions]
    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32) * 5
    module = compile_graph(graph, shape, TARGET, kernels="amx")
    np.testing.assert_array_equal(module(x), graph.run(x))


def test_tiles_cover_rows_in_the_fewest_pairs_and_pointwise_maps_regrid() -> None:
    """Rows of up to 16 pixels: two rows of a tile each; wider ones: the fewest pairs of tiles, as small as hold
    the row. A pointwise conv's pixels laid out in rows that fill the tiles best."""
    tilings = [amx.Tiling(w) for w in (7, 14, 16, 17, 28, 56, 149)]
    assert [(t.lines, t.rows, t.pixels) for t in tilings] == [
        (2, 7, 7), (2, 14, 14), (2, 16, 16), (1, 9, 18), (1, 14, 28), (1, 14, 56), (1, 15, 150)]
    assert [amx.pixel_grid(p) for p in (8 * 49, 49, 8 * 196)] == [(7, 56), (1, 49), (49, 32)]


def test_onnx_runtime_runs_beside_an_amx_module(tmp_path) -> None:
    """ONNX Runtime's own AMX kernels load their tile configuration once per thread: an AMX module called in
    between must leave the thread's configuration as it found it (else ONNX Runtime stops on an illegal
    instruction: it did on this file, whose one AMX layer is a residual block's conv). Calls alternate."""
    import onnxruntime as ort
    from test_third_party import ort_quantized

    import hawqc

    path, shape = ort_quantized("tiny_resnet", "qdq-uint8-asymmetric", tmp_path)
    module = hawqc.compile_integer_only(path, input_shape=shape)
    assert "conv2d_amx" in module.lowered["main"].script()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed in range(10):
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(module(x), module.reference(x))
        assert session.run(None, {"input": x})[0].shape == (1, 10)
