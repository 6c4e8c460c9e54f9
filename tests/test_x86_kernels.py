"""hawqc's x86 kernels (VNNI and the AVX2 fallback, each selected explicitly): bit-exact against the
reference executor on single layers of every shape class and on whole models."""

import functools
import re

import numpy as np
import pytest
import torch

from hawqc import models, quantize
from hawqc.quant.dyadic import dyadic_per_channel
from hawqc.reference.graph import IntegerGraph, IntOp
from hawqc.runtime import threads
from hawqc.runtime.module import _build, _lower, compile_graph, has_feature
from hawqc.runtime.target import parse_target
from hawqc.topi_int4.x86 import conv2d as conv2d_kernel
from hawqc.topi_int4.x86.conv2d import pack_weight

TARGET = parse_target("llvm")
AMX = ["amx"] if has_feature(TARGET, "amx-int8") and threads.request_amx() else []
KERNELS = ["vnni", "vnni-w4", "avx2", *AMX]

# (in channels, out channels, kernel, stride, padding, dilation, input range, pad value, weight bits, groups)
CONVS = {
    "3x3": (64, 64, 3, 1, 1, 1, (-128, 127), 0, 8, 1),
    "3x3-s2-w4a4": (32, 48, 3, 2, 1, 1, (-8, 7), 0, 4, 1),
    "1x1-uint8": (64, 32, 1, 1, 0, 1, (0, 255), 0, 8, 1),
    "1x1-uint8-w4": (64, 32, 1, 1, 0, 1, (0, 255), 0, 4, 1),
    "stem-7x7-s2": (3, 16, 7, 2, 3, 1, (-128, 127), 0, 8, 1),
    "odd-channels-w4": (5, 10, 3, 1, 1, 1, (-128, 127), 0, 4, 1),
    "dilated-asym-pad": (16, 16, 3, 1, 2, 2, (-20, 100), 0, 8, 1),
    "zero-point-pad": (8, 16, 3, 1, 1, 1, (0, 255), 7, 8, 1),
    "depthwise-3x3": (32, 32, 3, 1, 1, 1, (-128, 127), 0, 8, 32),
    "depthwise-uint8-zero-point-pad": (32, 32, 3, 1, 1, 1, (0, 255), 5, 8, 32),
    "depthwise-s2-odd-channels-uint8": (72, 72, 3, 2, 1, 1, (0, 255), 9, 8, 72),
    "depthwise-5x5-dilated-w4": (20, 20, 5, 1, 4, 2, (-8, 7), 0, 4, 20),
    "depthwise-5x5-uint8-odd-channels": (40, 40, 5, 1, 2, 1, (0, 255), 3, 8, 40),
    "depthwise-dilated-uint8": (32, 32, 3, 1, 2, 2, (0, 255), 0, 8, 32),
    "grouped-4-per-group": (64, 64, 3, 1, 1, 1, (-128, 127), 0, 8, 16),
    "grouped-32-per-group-s2": (128, 128, 3, 2, 1, 1, (0, 255), 3, 8, 4),
    "grouped-uneven-w4": (30, 60, 3, 1, 1, 1, (-128, 127), 0, 4, 6),
    "grouped-1x1-multiplier": (24, 48, 1, 1, 0, 1, (-128, 127), 0, 8, 24),
}


def layer_graph(op: str, cin: int, cout: int, k: int, stride: int, pad: int, dilation: int, pad_value: int,
                requant: bool, weight_bits: int = 8, groups: int = 1, seed: int = 0) -> IntegerGraph:
    rng = np.random.default_rng(seed)
    shape = (cout, cin // groups, k, k) if op == "conv2d" else (cout, cin)
    top = 2 ** (weight_bits - 1)
    consts = {"weight": rng.integers(-top, top, shape).astype(np.int8),
              "bias": rng.integers(-5000, 5000, cout).astype(np.int32)}
    attrs = {"stride": [stride] * 2, "padding": [pad] * 4, "dilation": [dilation] * 2, "groups": groups,
             "pad_value": pad_value} if op == "conv2d" else {}
    ops = [IntOp(op, ["x"], "acc", attrs, consts)]
    if requant:
        b, c = dyadic_per_channel(rng.uniform(2e-5, 2e-4, cout))
        ops.append(IntOp("requantize", ["acc"], "y", {"qmin": -128, "qmax": 127, "input_zero_point": 3,
                                                      "zero_point": -2},
                         {"b": b, "c": c, "offset": rng.integers(-(np.int64(1) << c), np.int64(1) << c)}))
    return IntegerGraph("x", ops[-1].output, ops)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("case", CONVS)
def test_conv_kernel_is_exact(case: str, kernels: str) -> None:
    cin, cout, k, stride, pad, dilation, (lo, hi), pad_value, weight_bits, groups = CONVS[case]
    graph = layer_graph("conv2d", cin, cout, k, stride, pad, dilation, pad_value, True, weight_bits, groups)
    x = np.random.default_rng(1).integers(lo, hi + 1, (2, cin, 15, 15))
    dtype = "uint8" if lo >= 0 and hi > 127 else "int8"
    module = compile_graph(graph, x.shape, TARGET, input_dtype=dtype, kernels=kernels)
    assert module.fused == (1, 1)
    np.testing.assert_array_equal(module(x.astype(dtype)), graph.run(x.astype(dtype)))


@pytest.mark.parametrize("kernels", ["vnni", "avx2"])
@pytest.mark.parametrize("case", ["3x3-s2-w4a4", "depthwise-3x3", "grouped-4-per-group", "dense"])
def test_kernels_with_an_open_batch_run_any_batch(case: str, kernels: str) -> None:
    """One module (batch a symbolic dimension of each kernel) is exact at batch 1 and at batch 3."""
    if case == "dense":
        graph, shape = layer_graph("dense", 40, 24, 1, 1, 0, 1, 0, requant=True), (40,)
    else:
        cin, cout, k, stride, pad, dilation, _, pad_value, weight_bits, groups = CONVS[case]
        graph = layer_graph("conv2d", cin, cout, k, stride, pad, dilation, pad_value, True, weight_bits, groups)
        shape = (cin, 9, 9)
    module = compile_graph(graph, (None, *shape), TARGET, input_dtype="int8", kernels=kernels)
    assert module.batch == "any" and module.fused == (1, 1)
    for batch in (1, 3):
        x = np.random.default_rng(batch).integers(-8, 8, (batch, *shape)).astype(np.int8)
        np.testing.assert_array_equal(module(x), graph.run(x))


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("op", ["conv2d", "dense"])
def test_kernel_without_requantize_gives_the_accumulator(op: str, kernels: str) -> None:
    graph = layer_graph(op, 24, 20, 3, 1, 1, 1, 0, requant=False)
    shape = (2, 24, 9, 9) if op == "conv2d" else (3, 24)
    x = np.random.default_rng(2).integers(-128, 128, shape).astype(np.int8)
    module = compile_graph(graph, x.shape, TARGET, input_dtype="int8", kernels=kernels)
    np.testing.assert_array_equal(module(x), graph.run(x))


@pytest.mark.parametrize("kernels", KERNELS)
def test_dense_kernel_with_requantize_is_exact(kernels: str) -> None:
    graph = layer_graph("dense", 100, 10, 1, 1, 0, 1, 0, requant=True)
    x = np.random.default_rng(3).integers(-128, 128, (4, 100)).astype(np.int8)
    module = compile_graph(graph, x.shape, TARGET, input_dtype="int8", kernels=kernels)
    np.testing.assert_array_equal(module(x), graph.run(x))


@pytest.mark.parametrize("kernels", [*KERNELS, "generic"])
@pytest.mark.parametrize(("name", "shape", "config"), [("resnet18", (3, 48, 48), "uniform4"),
                                                      ("inceptionv3", (3, 80, 80), "uniform8")])
def test_whole_models_are_exact(name: str, shape: tuple[int, ...], config: str, kernels: str) -> None:
    torch.manual_seed(0)
    model = models.get(name)
    calib = [torch.randn(2, *shape)]
    models.recalibrate_bn(model, calib)
    graph = quantize(model, config, calib).integer_graph()
    x = np.random.default_rng(4).standard_normal((2, *shape)).astype(np.float32)
    module = compile_graph(graph, x.shape, TARGET, kernels=kernels)
    np.testing.assert_array_equal(module(x), graph.run(x))


@pytest.mark.parametrize(("kernels", "weight_bits", "kernel"), [("vnni", 4, "conv2d_vnni_requant"),
                                                                ("vnni-w4", 4, "conv2d_vnni_w4_requant"),
                                                                ("vnni-w4", 8, "conv2d_vnni_requant"),
                                                                ("avx2", 8, "conv2d_avx2_requant")])
def test_the_vnni_kernels_run_vpdpbusd(kernels: str, weight_bits: int, kernel: str) -> None:
    graph = layer_graph("conv2d", 32, 32, 3, 1, 1, 1, 0, True, weight_bits)
    executable, lowered = _build(_lower(graph, (1, 32, 8, 8), TARGET, kernels, input_dtype="int8"), TARGET, kernels)
    assert kernel in [gv.name_hint for gv in lowered.functions]
    assembly = executable.mod.imports[0].inspect_source("asm")
    assert ("vpdpbusd" in assembly) == kernels.startswith("vnni")


@pytest.mark.parametrize(("kernels", "stride", "multiply"), [("vnni", 2, "vpmaddwd"), ("avx2", 1, "vpmaddwd"),
                                                              ("vnni", 1, "vpdpbusd")])
def test_depthwise_windows_of_unsigned_bytes_multiply_with_vpmaddwd(kernels: str, stride: int, multiply: str) -> None:
    """Outside the ``vpdpbusd`` step (VNNI, uint8, stride 1) the weights are int16, so LLVM multiplies each
    zero-extended uint8 activation with ``vpmaddwd`` instead of the two-uop ``vpmulld`` an int32 weight took."""
    graph = layer_graph("conv2d", 32, 32, 3, stride, 1, 1, 0, True, 8, 32)
    executable, _ = _build(_lower(graph, (2, 32, 16, 16), TARGET, kernels, input_dtype="uint8"), TARGET, kernels)
    assembly = executable.mod.imports[0].inspect_source("asm")
    assert assembly.count(multiply) > 4 * assembly.count("vpmulld")  # the window's, against the epilogue's


@pytest.mark.parametrize(("kernels", "width", "tensorized"), [("vnni", 16, True), ("vnni", 17, False), ("avx2", 16, False)])
def test_depthwise_epilogue_takes_the_high_word_intrinsic_on_whole_tiles(kernels: str, width: int, tensorized: bool) -> None:
    """The depthwise epilogue runs :func:`~hawqc.topi_int4.x86.intrin.requantize_name` (``vpmuldq`` on the even
    and odd lanes) where rows are whole tiles, and stays exact either way (17-pixel rows: 2 tiles of 9)."""
    graph = layer_graph("conv2d", 32, 32, 3, 1, 1, 1, 0, True, groups=32)
    shape = (1, 32, 6, width)
    lowered = _lower(graph, shape, TARGET, kernels, input_dtype="int8")
    executable, _ = _build(lowered, TARGET, kernels)
    assert ("vpmuldq" in executable.mod.imports[0].inspect_source("asm")) == tensorized
    x = np.random.default_rng(5).integers(-128, 128, shape).astype(np.int8)
    module = compile_graph(graph, shape, TARGET, input_dtype="int8", kernels=kernels)
    np.testing.assert_array_equal(module(x), graph.run(x))


def test_1x1_accumulators_stay_in_registers_and_requantize_with_vpmuldq() -> None:
    """A 1x1 conv's register tile (7 pixels x 2 channel vectors here) is a stack array, not a workspace,
    and its high-word requantization multiplies 32-bit lanes (``vpmuldq``), not sign-extended 64-bit ones;
    still equal to the reference."""
    graph = layer_graph("conv2d", 16, 96, 1, 1, 0, 1, 0, True)
    executable, lowered = _build(_lower(graph, (2, 16, 14, 14), TARGET, "vnni", input_dtype="uint8"), TARGET, "vnni")
    kernel = executable.mod.imports[0]
    assert "vpmuldq" in kernel.inspect_source("asm") and "vpmullq" not in kernel.inspect_source("asm")
    assert "AllocWorkspace" not in kernel.inspect_source("ll").split("conv2d_vnni_requant", 1)[1]
    x = np.random.default_rng(2).integers(0, 256, (2, 16, 14, 14)).astype("uint8")
    module = compile_graph(graph, x.shape, TARGET, input_dtype="uint8", kernels="vnni")
    np.testing.assert_array_equal(module(x), graph.run(x))


@pytest.mark.parametrize("kernels", KERNELS)
def test_own_residual_adds_run_in_their_convs_epilogue(kernels: str) -> None:
    """hawqc's own W8A8 ResNet: each residual Add reads a conv accumulator (clipped) on its exact grid; the
    kernel of the conv written last adds the other input in its epilogue, so no Add runs alone. Bit-exact."""
    torch.manual_seed(0)
    model = models.get("resnet18")
    calib = [torch.randn(2, 3, 32, 32)]
    models.recalibrate_bn(model, calib)
    graph = quantize(model, "uniform8", calib).integer_graph()
    _, lowered = _build(_lower(graph, (2, 3, 32, 32), TARGET, kernels), TARGET, kernels)
    calls = re.findall(r"^\s*(?:\w+ = )?(\w+)\(", lowered["main"].script(), re.MULTILINE)
    adds = [op for op in graph.ops if op.op == "add"]
    assert len(adds) == 8 and sum(re.search(r"conv2d_\w+_add\d*$", call) is not None for call in calls) == len(adds)
    x = np.random.default_rng(6).standard_normal((2, 3, 32, 32)).astype(np.float32)
    module = compile_graph(graph, x.shape, TARGET, kernels=kernels)
    np.testing.assert_array_equal(module(x), graph.run(x))


def _requantized_conv(name: str, source: str, cin: int, cout: int, seed: int, qmin: int, qmax: int) -> list[IntOp]:
    """A 1x1 conv and its requantize onto ``[qmin, qmax]`` (zero point 3), as ONNX Runtime's files have them."""
    rng = np.random.default_rng(seed)
    b, c = dyadic_per_channel(rng.uniform(2e-5, 2e-4, cout))
    attrs = {"stride": [1, 1], "padding": [0] * 4, "dilation": [1, 1], "groups": 1}
    return [IntOp("conv2d", [source], name + "_acc", attrs,
                  {"weight": rng.integers(-128, 128, (cout, cin, 1, 1)).astype(np.int8),
                   "bias": rng.integers(-5000, 5000, cout).astype(np.int32)}),
            IntOp("requantize", [name + "_acc"], name, {"qmin": qmin, "qmax": qmax, "zero_point": 3}, {"b": b, "c": c})]


@pytest.mark.parametrize("kernels", KERNELS)
def test_adds_of_requantized_convs_run_in_the_later_convs_epilogue(kernels: str) -> None:
    """ONNX Runtime's residual Adds read requantized 8-bit conv outputs: the Add (in its int32 form, a ReLU's
    clip included) runs in the epilogue of the conv written later, after its requantize, whether the other
    input is a conv's output or an earlier tensor; no Add runs alone. Bit-exact."""
    from hawqc.reference.graph import AddInput, aligned_add_op

    s = np.float32
    ops = [IntOp("quantize", ["input"], "q", {"qmin": 0, "qmax": 255, "zero_point": 10}, {"scale": np.array(0.1)}),
           *_requantized_conv("a", "q", 32, 64, 1, 0, 255), *_requantized_conv("b", "q", 32, 64, 2, -128, 127),
           aligned_add_op([AddInput("a", s(0.07), 3, 256), AddInput("b", s(0.05), 3, 256)], "sum", s(0.09), 0, 255, 5),
           *_requantized_conv("c", "sum", 64, 64, 3, 0, 255),
           aligned_add_op([AddInput("sum", s(0.09), 5, 256), AddInput("c", s(0.06), 3, 256)], "relu", s(0.0813), 7, 255, 7),
           IntOp("dequantize", ["relu"], "output", {"zero_point": 7}, {"scale": np.array(0.0813)})]
    graph = IntegerGraph("input", "output", ops)
    _, lowered = _build(_lower(graph, (2, 32, 14, 14), TARGET, kernels), TARGET, kernels)
    calls = re.findall(r"^\s*(?:\w+ = )?(\w+)\(", lowered["main"].script(), re.MULTILINE)
    assert sum(re.search(r"conv2d_\w+_requant_add\d*$", call) is not None for call in calls) == 2
    assert not [call for call in calls if "right_shift" in call]
    x = np.random.default_rng(6).standard_normal((2, 32, 14, 14)).astype(np.float32) * 5
    module = compile_graph(graph, x.shape, TARGET, kernels=kernels)
    np.testing.assert_array_equal(module(x), graph.run(x))


def test_every_kernel_of_a_model_is_scheduled() -> None:
    torch.manual_seed(0)
    model = models.get("resnet18")
    graph = quantize(model, "uniform8", [torch.randn(1, 3, 32, 32)]).integer_graph()
    _, lowered = _build(_lower(graph, (1, 3, 32, 32), TARGET, "auto"), TARGET)
    import tvm

    naive = [gv.name_hint for gv, f in lowered.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and "T.parallel" not in f.script() and "T.vectorized" not in f.script()]
    assert naive == []


def test_packed_weights_hold_every_weight_once() -> None:
    w = np.random.default_rng(5).integers(-127, 128, (20, 6, 3, 3)).astype(np.int8)
    packed = pack_weight(w)
    assert packed.shape == (2, 3, 3, 2, 16, 4)
    assert packed[1, 2, 0, 1, 3, 1] == w[16 + 3, 4 + 1, 2, 0]
    assert np.count_nonzero(packed) == np.count_nonzero(w)


def test_grouped_weights_pack_block_diagonally() -> None:
    w = np.random.default_rng(7).integers(1, 128, (40, 4, 3, 3)).astype(np.int8)  # 10 groups of 4 -> 4
    packed = pack_weight(w, groups=10)
    assert packed.shape == (3, 3, 3, 4, 16, 4)  # each block of 16 outputs meets 4 groups: 16 input channels
    assert packed[1, 2, 0, 1, 5, 2] == w[16 + 5, 2, 2, 0]  # output 21: group 5, input channels 20-23 = 16 + 4..7
    assert packed[1, 2, 0, 2, 5, 2] == 0  # channel 16 + 10 belongs to group 6
    assert np.count_nonzero(packed) == w.size


def test_4_bit_weights_pack_two_per_byte() -> None:
    w = np.random.default_rng(6).integers(-8, 8, (20, 6, 3, 3)).astype(np.int8)
    packed = pack_weight(w, weight_bits=4)
    assert packed.shape == (2, 3, 3, 2, 32)
    byte = int(packed[1, 2, 0, 1, 3 * 4 + 1]) & 0xFF  # channel 3 (low nibble) and channel 11 (high nibble)
    low, high = ((byte & 0xF) ^ 8) - 8, ((byte >> 4) ^ 8) - 8
    assert (low, high) == (w[16 + 3, 4 + 1, 2, 0], 0 if 16 + 11 >= 20 else w[16 + 11, 4 + 1, 2, 0])
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_weight(w * 2, weight_bits=4)


def test_4_bit_and_mixed_configs_run_the_8_bit_kernels() -> None:
    """By default 4-bit layers run the kernels of 8-bit ones (weights one per byte: packed two per byte
    is slower at every ResNet layer measured, ``benchmarks/int4_packing.py``), so W4A4 and mixed cost
    what W8A8 costs; ``vnni-w4`` packs them."""
    import tvm
    from tvm import relax

    from hawqc import BitConfig, LayerBits

    def kernels(config: object, choice: str = "auto") -> list[tuple[str, list[str]]]:
        """Each kernel call of the lowered model: the kernel and the types of its operands."""
        torch.manual_seed(0)
        model = models.get("resnet18")
        graph = quantize(model, config, [torch.randn(1, 3, 32, 32)]).integer_graph()
        main = _lower(graph, (1, 3, 32, 32), TARGET, choice)["main"]
        calls = [b.value for block in main.body.blocks for b in block.bindings
                 if isinstance(b.value, relax.Call) and b.value.op.same_as(tvm.ir.Op.get("relax.call_tir"))]
        return [(call.args[0].name_hint, [str(a.ty) for a in call.args[1].fields]) for call in calls]

    w8a8 = kernels("uniform8")
    layer1 = {n: LayerBits(8, 8) for n in models.quantizable_layers(models.get("resnet18")) if n.startswith("layer1")}
    mixed = BitConfig(default=LayerBits(4, 4), first_last=LayerBits(8, 8), layers=layer1)
    assert len(w8a8) >= 20 and kernels("uniform4") == w8a8 and kernels(mixed) == w8a8
    if any("vnni" in name for name, _ in w8a8):
        assert any("vnni_w4" in name for name, _ in kernels("uniform4", "vnni-w4"))


@pytest.mark.parametrize("kernels", ["vnni", "avx2"])
@pytest.mark.parametrize("ties", [False, True])
def test_both_epilogue_forms_are_exact(ties: bool, kernels: str) -> None:
    """The cheaper high-word epilogue where no accumulator can fall on a rounding tie, the full half-to-even
    one where one can (b = 3 * 2^28: a tie every 2^12 accumulator values); each equal to the reference."""
    graph = layer_graph("conv2d", 16, 32, 3, 1, 1, 1, 0, requant=True)
    if ties:
        graph.ops[-1].consts.update(b=np.full(32, 3 << 28, np.int32), c=np.full(32, 40, np.int32),
                                    offset=np.zeros(32, np.int64))
    lowered = _lower(graph, (2, 16, 15, 15), TARGET, kernels, input_dtype="int8")
    params = [[str(p) for p in f.params] for f in lowered.functions.values() if type(f).__name__ == "PrimFunc"]
    assert any(("round" in names) == ties and "shift" in names for names in params)
    x = np.random.default_rng(5).integers(-128, 128, (2, 16, 15, 15)).astype("int8")
    module = compile_graph(graph, x.shape, TARGET, input_dtype="int8", kernels=kernels)
    np.testing.assert_array_equal(module(x), graph.run(x))


@pytest.mark.parametrize("int32", [True, False])
@pytest.mark.parametrize("ties", [False, True])
def test_every_aligned_add_form_is_exact(ties: bool, int32: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """An Add of two 8-bit tensors of different scales in int32 (one shift), or where no int32 form exists (here
    forced) in the high-word form; where a pair of inputs lands on a rounding tie (an input scale half the
    output's: half to even is no floor of a linear form) in the full form. Each equal to the reference."""
    from hawqc.frontend import integer_graph
    from hawqc.reference.graph import AddInput, aligned_add_op

    if not int32:
        monkeypatch.setattr(integer_graph, "int32_sum_form", lambda *args, **kwargs: None)
    s_in, s_out = np.float32(0.1), np.float32(0.13)
    s_half = np.float32(s_out / 2) if ties else np.float32(0.0371)
    ops = [IntOp("quantize", ["input"], "q", {"qmin": -128, "qmax": 127}, {"scale": np.array(s_in)}),
           IntOp("clip", ["q"], "relu", {"qmin": 0, "qmax": 127}),
           aligned_add_op([AddInput("q", s_half, 0, 128), AddInput("relu", s_in, 0, 128)], "sum", s_out, -128, 127, 3),
           IntOp("dequantize", ["sum"], "output", {}, {"scale": np.array(s_out)})]
    graph = IntegerGraph("input", "output", ops)
    _, built = _build(_lower(graph, (2, 8, 9, 9), TARGET, "vnni"), TARGET, "vnni")
    add = next(gv.name_hint for gv in built.functions if "multiply" in gv.name_hint)
    form = "int32" if add.count("right_shift") == 1 else "full" if "bitwise_and" in add else "high word"
    assert form == ("full" if ties else "int32" if int32 else "high word")
    x = np.random.default_rng(6).standard_normal((2, 8, 9, 9)).astype(np.float32) * 8
    module = compile_graph(graph, x.shape, TARGET, kernels="vnni")
    np.testing.assert_array_equal(module(x), graph.run(x))


ROW_WIDTHS = {  # (case of CONVS or its spec, input size): rows no register tile divides, 8-pixel rows
    "depthwise-17-uint8": ("depthwise-uint8-zero-point-pad", 17),
    "depthwise-17-int8": ("depthwise-3x3", 17),
    "3x3-8x8-96": ((64, 96, 3, 1, 1, 1, (0, 255), 0, 8, 1), 8),
}


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("case", ROW_WIDTHS)
def test_conv_kernel_is_exact_on_other_row_widths(case: str, kernels: str) -> None:
    """17-pixel rows (depthwise tiles of 9 pixels, the last past the row's end on columns of the pad value)
    and 8-pixel rows of 6 channel vectors (tiles of 4 x 3): equal to the reference."""
    spec, size = ROW_WIDTHS[case]
    cin, cout, k, stride, pad, dilation, (lo, hi), pad_value, weight_bits, groups = CONVS.get(spec, spec)
    graph = layer_graph("conv2d", cin, cout, k, stride, pad, dilation, pad_value, True, weight_bits, groups, seed=4)
    x = np.random.default_rng(5).integers(lo, hi + 1, (2, cin, size, size))
    dtype = "uint8" if lo >= 0 and hi > 127 else "int8"
    module = compile_graph(graph, x.shape, TARGET, input_dtype=dtype, kernels=kernels)
    assert module.fused == (1, 1)
    np.testing.assert_array_equal(module(x.astype(dtype)), graph.run(x.astype(dtype)))


@pytest.mark.parametrize("batch", [2, None])
@pytest.mark.parametrize("case", ["3x3", "3x3-s2-w4a4", "grouped-32-per-group-s2", "odd-channels-w4"])
def test_layers_whose_weights_outgrow_the_l2_cache_run_channels_outer_exactly(
        case: str, batch: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a (pretended) 4 KB L2 every layer here takes the weight-resident order (blocks of output channels
    outside the batch's rows, fused into the parallel loop): equal to the reference at a fixed and an open batch."""
    monkeypatch.setattr(conv2d_kernel, "l2_bytes", lambda: 4096)
    cin, cout, k, stride, pad, dilation, (lo, hi), pad_value, weight_bits, groups = CONVS[case]
    wl = conv2d_kernel.Conv2dWorkload(batch, 15, 15, cin, cout, (k, k), (stride, stride), (pad,) * 4,
                                      (dilation, dilation), "int8", weight_bits=weight_bits, groups=groups)
    assert conv2d_kernel.channels_outer(wl)
    graph = layer_graph("conv2d", cin, cout, k, stride, pad, dilation, pad_value, True, weight_bits, groups, seed=6)
    dtype = "uint8" if lo >= 0 and hi > 127 else "int8"
    module = compile_graph(graph, (batch, cin, 15, 15), TARGET, input_dtype=dtype, kernels="vnni")
    assert module.fused == (1, 1)
    for n in (2,) if batch else (1, 3):
        x = np.random.default_rng(n).integers(lo, hi + 1, (n, cin, 15, 15)).astype(dtype)
        np.testing.assert_array_equal(module(x), graph.run(x))


def test_the_l2_cache_size_is_read_from_the_machine() -> None:
    assert 64 << 10 <= conv2d_kernel.l2_bytes() <= 64 << 20


@pytest.mark.parametrize("kernels", ["vnni", "avx2"])
@pytest.mark.parametrize(("shape", "zero_point", "unsigned"), [
    ((2, 3, 7, 37), 0, False),  # two 16-pixel steps and a 5-pixel tail per row
    ((None, 3, 4, 16), 3, True),  # any batch, whole steps only, uint8 with a zero point
    ((1, 1, 5, 5), -4, False),  # one channel, a tail only
    ((1, 4, 3, 33), 0, True),
    ((1, 5, 4, 16), 0, False),  # five channels: TVM's quantize and transpose
])
def test_the_input_quantize_into_nhwc_is_exact(shape: tuple, zero_point: int, unsigned: bool, kernels: str) -> None:
    """The model input's quantize and move to NHWC in one kernel (images of at most 4 channels): every value,
    exact ties of ``x / scale`` both ways, infinities and values past the range included, equal to the
    reference's ``rint(float64(x) / scale)``."""
    # x * (1 / scale) in float64 would round the ties 1.5, 3.5, 7.5, 11.5, ... of this scale the wrong way
    scale, (qmin, qmax) = np.float32(49 / 4096), (0, 255) if unsigned else (-128, 127)
    ops = [IntOp("quantize", ["input"], "q", {"qmin": qmin, "qmax": qmax, "zero_point": zero_point},
                 {"scale": np.array(scale)}),
           IntOp("dequantize", ["q"], "output", {"zero_point": zero_point}, {"scale": np.array(0.5, np.float32)})]
    graph = IntegerGraph("input", "output", ops)
    _, built = _build(_lower(graph, shape, TARGET, kernels), TARGET, kernels)
    assert any(gv.name_hint.startswith("quantize_nhwc") for gv in built.functions) == (shape[1] <= 4)
    module = compile_graph(graph, shape, TARGET, kernels=kernels)
    for batch in (1, 3) if shape[0] is None else (shape[0],):
        x = np.random.default_rng(batch).standard_normal((batch, *shape[1:])).astype(np.float32) * 2
        flat = x.reshape(-1)
        flat[:12] = scale * (np.arange(-6, 6, dtype=np.float32) * 2 + 1.5)  # x / scale = k + 1/2 exactly
        flat[12:15] = [np.inf, -np.inf, 1e30]
        np.testing.assert_array_equal(module(x), graph.run(x))


@pytest.mark.parametrize("kernels", ["vnni", "avx2"])
def test_average_pools_run_the_depthwise_kernel(kernels: str) -> None:
    """Average pools of one divisor (a padded 3x3 with an input zero point, an unpadded 2x2 of stride 2 on
    a grid of ties, a 1x1 of ratio 1 whose multiplier 2^32 is beyond the high-word intrinsic's 31 bits: VGG's)
    are depthwise convs with a ones kernel and their requantize: the depthwise kernel, equal to the reference."""
    from hawqc.reference.graph import pool_consts

    (c3, t3), (c2, t2), (c1, t1) = (pool_consts(0.7, 1.0, 9, 255 + 77), pool_consts(1.0, 1.0, 4, 128),
                                    pool_consts(1.0, 1.0, 1, 128))
    ops = [IntOp("quantize", ["input"], "q", {"qmin": 0, "qmax": 255, "zero_point": 77}, {"scale": np.array(0.1)}),
           IntOp("avgpool", ["q"], "p3", {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1, 1, 1], "qmin": -128,
                                          "qmax": 127, "input_zero_point": 77, "zero_point": -5, **t3}, c3),
           IntOp("avgpool", ["p3"], "p2", {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0, 0, 0], "qmin": -128,
                                           "qmax": 127, **t2}, c2),
           IntOp("avgpool", ["p2"], "p1", {"kernel": [1, 1], "stride": [1, 1], "padding": [0, 0, 0, 0], "qmin": -128,
                                           "qmax": 127, **t1}, c1),
           IntOp("dequantize", ["p1"], "output", {}, {"scale": np.array(0.1)})]
    graph = IntegerGraph("input", "output", ops)
    lowered = _lower(graph, (2, 32, 10, 10), TARGET, kernels)
    assert sum(gv.name_hint.startswith("depthwise_conv2d_requant") for gv in lowered.functions) == 3
    x = np.random.default_rng(8).standard_normal((2, 32, 10, 10)).astype(np.float32) * 6
    module = compile_graph(graph, x.shape, TARGET, kernels=kernels)
    np.testing.assert_array_equal(module(x), graph.run(x))


@pytest.mark.parametrize("groups", [1, 16])
def test_a_pad_before_a_conv_is_read_in_place(groups: int) -> None:
    """An explicit Pad with the zero point ("same" padding of a stride-2 conv, asymmetric), before a conv
    with padding of its own: folded into the conv (no pad kernel), equal to the reference."""
    graph = layer_graph("conv2d", 16, 16, 3, 2, 1, 1, 9, requant=True, groups=groups)
    graph.ops.insert(0, IntOp("pad", ["x"], "x_padded", {"pads": [0, 0, 1, 2], "pad_value": 9}))
    graph.ops[1].inputs = ["x_padded"]
    lowered = _lower(graph, (2, 16, 13, 13), TARGET, "vnni", input_dtype="uint8")
    assert "nn.pad" not in lowered["main"].script()
    x = np.random.default_rng(9).integers(0, 256, (2, 16, 13, 13)).astype("uint8")
    module = compile_graph(graph, x.shape, TARGET, input_dtype="uint8", kernels="vnni")
    np.testing.assert_array_equal(module(x), graph.run(x))


@pytest.mark.parametrize("shape", [(2, 5, 3, 3), (None, 16, 8, 8), (1, 65, 64, 64)])
@pytest.mark.parametrize("relu", [False, True])
def test_byte_table_lookup_is_exact(relu: bool, shape: tuple) -> None:
    """An activation's lookup table on an int8 (or, after a ReLU, uint8) tensor runs as the VBMI byte lookup:
    whole 64-byte vectors and a tail, any batch, on one thread and (from 256 KB) on all, equal to the
    reference."""
    table = np.random.default_rng(8).integers(-128, 128, 256).astype(np.int32)  # one entry per int8 value
    ops = [IntOp("quantize", ["input"], "q", {"qmin": -128, "qmax": 127}, {"scale": np.array(0.05, np.float32)}),
           IntOp("clip", ["q"], "r", {"qmin": 0 if relu else -128, "qmax": 127}),
           IntOp("lut", ["r"], "t", {"offset": -128}, {"table": table}),
           IntOp("dequantize", ["t"], "output", {}, {"scale": np.array(0.1, np.float32)})]
    graph = IntegerGraph("input", "output", ops)
    _, built = _build(_lower(graph, shape, TARGET, "vnni"), TARGET, "vnni")
    assert any(gv.name_hint.startswith("byte_lookup") for gv in built.functions)
    module = compile_graph(graph, shape, TARGET, kernels="vnni")
    for batch in (1, 3) if shape[0] is None else (shape[0],):
        x = np.random.default_rng(batch).standard_normal((batch, *shape[1:])).astype(np.float32) * 4
        np.testing.assert_array_equal(module(x), graph.run(x))


def conv_op(rng: np.random.Generator, src: str, dst: str, cin: int, cout: int, k: int, pad_value: int) -> IntOp:
    """A stride-1 same-padded conv of random weights, its bias cancelling the pad value's share."""
    w = rng.integers(-127, 128, (cout, cin, k, k)).astype(np.int8)
    bias = (-pad_value * w.astype(np.int64).sum(axis=(1, 2, 3))).astype(np.int32)
    return IntOp("conv2d", [src], dst, {"stride": [1, 1], "padding": [k // 2] * 4, "dilation": [1, 1],
                                        "groups": 1, "pad_value": pad_value}, {"weight": w, "bias": bias})


def test_int8_activations_read_by_convs_are_stored_unsigned() -> None:
    """ONNX Runtime's int8 activations (a zero point of -128 after a ReLU): a conv's output read by a 1x1 conv
    and a residual Add, the Add's max-pooled output read by another 1x1 conv, are produced 128 higher as uint8,
    so no 1x1 kernel copies its input; a tensor something else reads (the clip) stays int8. Bit-exact."""
    from hawqc.frontend.unsigned import unsigned_activations
    from hawqc.reference.graph import AddInput, aligned_add_op, rescale_op

    rng = np.random.default_rng(3)
    conv = functools.partial(conv_op, rng)

    s = [np.float32(v) for v in (0.05, 0.004, 0.07, 0.09, 0.11, 0.06)]
    ops = [IntOp("quantize", ["input"], "q", {"qmin": -128, "qmax": 127, "zero_point": -2}, {"scale": np.array(s[0])}),
           conv("q", "a1", 8, 16, 3, -2), rescale_op("a1", "r1", s[0], s[1], s[2], -128, 127, zero_point=-128),
           conv("r1", "a2", 16, 16, 1, -128), rescale_op("a2", "r2", s[2], s[1], s[3], -128, 127, zero_point=-5),
           aligned_add_op([AddInput("r2", s[3], -5, 133), AddInput("r1", s[2], -128, 256)], "sum", s[4], -128, 127, -128),
           IntOp("maxpool", ["sum"], "pooled", {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0, 0, 0]}),
           conv("pooled", "a3", 16, 16, 1, -128), rescale_op("a3", "r3", s[4], s[1], s[5], -128, 127, zero_point=3),
           IntOp("clip", ["r3"], "clipped", {"qmin": -100, "qmax": 120}),
           conv("clipped", "a4", 16, 16, 1, 3), rescale_op("a4", "r4", s[5], s[1], s[5], -128, 127, zero_point=3),
           IntOp("dequantize", ["r4"], "output", {"zero_point": 3}, {"scale": np.array(s[5])})]
    graph = IntegerGraph("input", "output", ops)
    ranges = {op.output: (op.attrs["qmin"], op.attrs["qmax"]) for op in unsigned_activations(graph).ops
              if "qmin" in op.attrs}
    assert all(ranges[t] == (0, 255) for t in ("q", "r1", "sum")) and ranges["r3"] == (-128, 127)
    lowered = _lower(graph, (2, 8, 10, 10), TARGET, "vnni")
    convs = [f for gv, f in lowered.functions.items() if "conv2d" in gv.name_hint]
    copies = sum('T.sblock("pad")' in f.script() for f in convs)
    assert len(convs) == 4 and copies == 2  # the 3x3 conv (padding) and the 1x1 conv reading the clip (int8)
    x = rng.standard_normal((2, 8, 10, 10)).astype(np.float32) * 3
    module = compile_graph(graph, x.shape, TARGET, kernels="vnni")
    np.testing.assert_array_equal(module(x), graph.run(x))


def test_a_concat_moves_with_all_its_inputs_and_pools_read_it_unsigned() -> None:
    """Inception's pattern: two branches requantized onto one grid and concatenated, the concat read by a 1x1
    conv and by a 3x3 average pool (padding with the zero point) whose output another 1x1 conv reads: the
    branches, the concat and the pool's output are produced 128 higher; a concat whose tensors only the
    output reads stays. Bit-exact."""
    from hawqc.frontend.unsigned import unsigned_activations
    from hawqc.reference.graph import pool_consts, rescale_op

    rng = np.random.default_rng(5)
    conv = functools.partial(conv_op, rng)

    s = [np.float32(v) for v in (0.05, 0.004, 0.07, 0.09, 0.06)]
    consts, tie = pool_consts(s[2], s[3], 9, 256)
    ops = [IntOp("quantize", ["input"], "q", {"qmin": -128, "qmax": 127, "zero_point": -1}, {"scale": np.array(s[0])}),
           conv("q", "a1", 8, 16, 3, -1), rescale_op("a1", "r1", s[0], s[1], s[2], -128, 127, zero_point=-128),
           conv("q", "a2", 8, 8, 1, -1), rescale_op("a2", "r2", s[0], s[1], s[2], -128, 127, zero_point=-128),
           IntOp("concat", ["r1", "r2"], "cat", {"axis": 1}),
           conv("cat", "a3", 24, 16, 1, -128), rescale_op("a3", "r3", s[2], s[1], s[3], -128, 127, zero_point=-128),
           IntOp("avgpool", ["cat"], "pooled", {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1, 1, 1],
                                                "qmin": -128, "qmax": 127, "input_zero_point": -128,
                                                "zero_point": -128, **tie}, consts),
           conv("pooled", "a4", 24, 16, 1, -128), rescale_op("a4", "r4", s[3], s[1], s[3], -128, 127, zero_point=-128),
           IntOp("concat", ["r3", "r4"], "out_cat", {"axis": 1}),
           IntOp("dequantize", ["out_cat"], "output", {"zero_point": -128}, {"scale": np.array(s[3])})]
    graph = IntegerGraph("input", "output", ops)
    moved = unsigned_activations(graph)
    ranges = {op.output: (op.attrs["qmin"], op.attrs["qmax"]) for op in moved.ops if "qmin" in op.attrs}
    assert all(ranges[t] == (0, 255) for t in ("q", "r1", "r2", "pooled"))
    assert ranges["r3"] == ranges["r4"] == (-128, 127)
    assert {op.output: op.attrs.get("input_zero_point") for op in moved.ops}["pooled"] == 0
    x = rng.standard_normal((2, 8, 9, 9)).astype(np.float32) * 3
    module = compile_graph(graph, x.shape, TARGET, kernels="vnni")
    np.testing.assert_array_equal(module(x), graph.run(x))
