"""CUDA Tensor Core kernels (sm_75; sm_90 with emulated INT4): generated source, nvcc, and the same TIR built
for llvm against the reference.

No GPU is needed except for the tests marked ``gpu`` (they skip without one)."""

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from quantized_models import quantized

from hawqc.cli import main as cli_main
from hawqc.frontend.integer_graph import to_relax
from hawqc.quant.dyadic import dyadic_per_channel, requantize
from hawqc.reference.graph import IntegerGraph, IntOp
from hawqc.relax_passes.tensor_core_conv import (
    KERNEL_PREFIX,
    TensorCoreConv,
    pack_activation,
    unpack_activation,
)
from hawqc.runtime.module import compile_graph
from hawqc.topi_int4.cuda.conv2d import (
    ConvSpec,
    operand_bits,
    pack_weight,
    pack_words,
)

SM75 = {"kind": "cuda", "arch": "sm_75"}


def has_gpu() -> bool:
    import tvm

    return bool(tvm.cuda().exist)


gpu = pytest.mark.skipif("not has_gpu()", reason="needs a CUDA GPU")


def quantized_graph(name: str, shape: tuple[int, ...], config: str, seed: int = 0) -> IntegerGraph:
    return quantized(name, shape, config, seed).integer_graph()


def conv_graph(*specs: ConvSpec, seed: int = 0) -> tuple[IntegerGraph, np.ndarray]:
    """``[clip -> (conv2d -> requantize) per spec]`` with random operands of each spec's widths, and an input
    for it (the clip declares the input range, as a producing requantize does in a model)."""
    rng = np.random.default_rng(seed)
    first = specs[0]
    half = 1 << (first.bits - 1)
    lo, hi = (-half, half - 1) if first.signed_input else (0, 2 * half - 1)
    ops = [IntOp("clip", ["x"], "a0", {"qmin": lo, "qmax": hi})]
    for i, conv in enumerate(specs):
        half = 1 << (conv.bits - 1)
        weight = rng.integers(-half, half, (conv.out_channels, conv.channels, *conv.kernel)).astype(np.int8)
        b, c = dyadic_per_channel(rng.uniform(2.0, 8.0, conv.out_channels) / (np.sqrt(conv.gemm_k) * half))
        ops.append(IntOp("conv2d", [f"a{i}"], f"acc{i}", {"stride": list(conv.stride), "padding": list(conv.padding),
                                                          "dilation": list(conv.dilation), "groups": 1},
                         {"weight": weight, "bias": rng.integers(-50, 50, conv.out_channels).astype(np.int32)}))
        step = np.int64(1) << c.astype(np.int64)  # offsets up to one output step, so that they show
        offset = {"offset": rng.integers(-step, step)} if i % 2 == 0 else {}
        ops.append(IntOp("requantize", [f"acc{i}"], f"a{i + 1}", {"qmin": conv.qmin, "qmax": conv.qmax},
                         {"b": b, "c": c, **offset}))
    graph = IntegerGraph(input="x", output=f"a{len(specs)}", ops=ops)
    x = rng.integers(lo, hi + 1, (first.batch, first.channels, first.height, first.width)).astype(first.input_dtype)
    return graph, x


def spec(bits: int, signed: bool, channels: int, out_channels: int, kernel: int, stride: int, dilation: int = 1,
         out: tuple[str, int, int] = ("int8", 0, 15)) -> ConvSpec:
    pad = dilation * (kernel // 2)
    input_dtype = "uint8" if bits == 8 and not signed else "int8"
    return ConvSpec(2, channels, 9, 11, out_channels, (kernel, kernel), (stride, stride), (pad, pad, pad, pad),
                    (dilation, dilation), bits, signed, input_dtype, *out)


SPECS = [spec(4, False, 64, 64, 3, 1), spec(4, True, 32, 40, 1, 2, out=("int8", -8, 7)),
         spec(8, True, 3, 64, 7, 2, out=("int8", -128, 127)), spec(8, False, 16, 72, 3, 1, dilation=2),
         spec(4, False, 24, 64, 3, 2, out=("int32", -(2**31), 2**31 - 1))]


@pytest.mark.parametrize("conv", SPECS, ids=lambda s: f"s{s.bits}{'s' if s.signed_input else 'u'}-c{s.channels}"
                         f"-k{s.kernel[0]}-s{s.stride[0]}-d{s.dilation[0]}-{s.out_dtype}")
def test_kernel_on_llvm_equals_reference(conv: ConvSpec) -> None:
    """The kernel's TIR (tiling, index math, packing) with mma replaced by loops equals the reference executor."""
    graph, x = conv_graph(conv)
    ir = rewritten(graph, x.shape, str(x.dtype))
    assert [name.startswith(f"{KERNEL_PREFIX}_s{conv.bits}") for name in tensor_core_calls(ir)] == [True]
    assert packed_io(ir) == [(conv.bits == 4, False)]  # the input clip packs what an INT4 kernel reads
    expected = graph.run(x)
    assert len(np.unique(expected)) > 3  # not saturated to a constant
    np.testing.assert_array_equal(run_on_llvm(ir, x), expected)


def int4_chain(signed: bool) -> tuple[IntegerGraph, np.ndarray]:
    """Two INT4 convs: the first writes its output packed from its epilogue (20 channels: 3 words, the
    last one padded with zeros), the second reads it packed; the input clip packs 12 channels."""
    out = ("int8", -8, 7) if signed else ("int8", 0, 15)
    first = spec(4, signed, 12, 20, 3, 1, out=out)
    second = dataclasses.replace(spec(4, signed, 20, 40, 3, 2), height=first.out_height, width=first.out_width)
    return conv_graph(first, second)


@pytest.mark.parametrize("signed", [False, True], ids=["u4", "s4"])
def test_packed_activations_between_int4_layers_on_llvm_equal_reference(signed: bool) -> None:
    graph, x = int4_chain(signed)
    ir = rewritten(graph, x.shape, str(x.dtype))
    assert packed_io(ir) == [(True, True), (True, False)]
    expected = graph.run(x)
    assert len(np.unique(expected)) > 3
    np.testing.assert_array_equal(run_on_llvm(ir, x), expected)


@pytest.mark.parametrize("bits", [4, 8])
def test_dense_with_requantize_runs_as_a_1x1_conv_on_llvm(bits: int) -> None:
    """A dense layer followed by a requantize goes to the kernel (as a 1x1 conv on [N, 1, 1, K]), bit-exact."""
    rng = np.random.default_rng(4)
    batch, k, o = 3, 40, 72
    half = 1 << (bits - 1)
    lo, hi = (0, 15) if bits == 4 else (-128, 127)
    b, c = dyadic_per_channel(rng.uniform(2.0, 8.0, o) / (np.sqrt(k) * half))
    ops = [IntOp("clip", ["x"], "a", {"qmin": lo, "qmax": hi}),
           IntOp("dense", ["a"], "acc", {}, {"weight": rng.integers(-half, half, (o, k)).astype(np.int8),
                                              "bias": rng.integers(-50, 50, o).astype(np.int32)}),
           IntOp("requantize", ["acc"], "y", {"qmin": -128, "qmax": 127},
                 {"b": b, "c": c, "offset": rng.integers(-(np.int64(1) << c), np.int64(1) << c)})]
    graph = IntegerGraph(input="x", output="y", ops=ops)
    x = rng.integers(lo, hi + 1, (batch, k)).astype(np.int8)
    ir = rewritten(graph, x.shape, "int8")
    assert [name.startswith(f"{KERNEL_PREFIX}_s{bits}") for name in tensor_core_calls(ir)] == [True]
    expected = graph.run(x)
    assert len(np.unique(expected)) > 3
    np.testing.assert_array_equal(run_on_llvm(ir, x), expected)


@pytest.mark.parametrize("signed", [False, True], ids=["u4", "s4"])
def test_pack_activation_is_pack_words_and_unpack_inverts_it(signed: bool) -> None:
    """The Relax packing (residual adds, pooling) follows the kernels' rule: ``pack_words`` along channels."""
    import tvm
    from tvm import relax

    lo, hi, dtype = (-8, 7, "int8") if signed else (0, 15, "uint8")
    x = np.random.default_rng(2).integers(lo, hi + 1, (2, 3, 5, 12)).astype(dtype)
    bb = relax.BlockBuilder()
    arg = relax.Var("x", relax.TensorType(x.shape, dtype))
    with bb.function("main", [arg]):
        with bb.dataflow():
            words = bb.emit(pack_activation(arg))
            out = bb.emit_output(relax.Tuple([words, bb.emit(unpack_activation(words, arg, signed))]))
        bb.emit_func_output(out)
    target = tvm.target.Target({"kind": "llvm"})
    ex = tvm.compile(bb.get(), target=target, relax_pipeline=relax.get_default_pipeline(target))
    packed, unpacked = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    np.testing.assert_array_equal(packed.numpy(), pack_words(np.pad(x, [(0, 0)] * 3 + [(0, 4)]), 4))
    assert unpacked.numpy().dtype == x.dtype
    np.testing.assert_array_equal(unpacked.numpy(), x)


def test_pack_words_places_element_e_at_bits_e() -> None:
    words = pack_words(np.array([[1, -1, 0, 7, -8, 2, 3, 4]]), 4)
    assert words.dtype == np.int32 and words.shape == (1, 1)
    assert int(words[0, 0]) & 0xFFFFFFFF == 0x4328_70F1
    assert pack_words(np.array([[-128, 127, 1, -1]]), 8)[0, 0] == np.array(0xFF017F80).astype(np.uint32).view(np.int32)


def test_operand_bits() -> None:
    assert operand_bits((-8, 7), (0, 15), int4=True) == 4
    assert operand_bits((-8, 7), (-8, 7), int4=True) == 4
    assert operand_bits((-8, 7), (0, 15), int4=False) == 8
    assert operand_bits((-9, 7), (0, 15), int4=True) == 8
    assert operand_bits((-8, 7), (0, 255), int4=True) == 8
    assert operand_bits((-8, 7), (-129, 0), int4=True) is None


def test_weights_too_wide_are_refused() -> None:
    conv = SPECS[0]
    with pytest.raises(ValueError, match="do not fit 4-bit"):
        pack_weight(np.full((conv.out_channels, conv.channels, 3, 3), 8), conv)


def rewritten(graph: IntegerGraph, shape: tuple[int, ...], input_dtype: str = "float32", arch: str = "sm_75",
              tensor_cores: bool = False) -> object:
    """The graph lowered as the CUDA path lowers it (NHWC) with the Tensor Core kernels (loops for mma unless
    ``tensor_cores``), 4-bit activations packed."""
    return TensorCoreConv(arch, tensor_cores=tensor_cores)(to_relax(graph, shape, input_dtype=input_dtype,
                                                                    layout="NHWC"))


def packed_io(ir: object) -> list[tuple[bool, bool]]:
    """(packed input, packed output) of each Tensor Core kernel call of ``main``, in order."""
    kernels = [ir[b.value.args[0]] for block in ir["main"].body.blocks for b in block.bindings
               if b.value.op.name == "relax.call_tir" and b.value.args[0].name_hint.startswith(KERNEL_PREFIX)]
    return [(bool(k.attrs["hawqc.packed_input"]), bool(k.attrs["hawqc.packed_output"])) for k in kernels]


def run_on_llvm(ir: object, x: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax

    target = tvm.target.Target({"kind": "llvm"})
    ex = tvm.compile(ir, target=target, relax_pipeline=relax.get_default_pipeline(target))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def tensor_core_calls(ir: object) -> list[str]:
    return [str(b.value.args[0].name_hint) for block in ir["main"].body.blocks for b in block.bindings
            if getattr(getattr(b.value, "op", None), "name", "") == "relax.call_tir"
            and str(b.value.args[0].name_hint).startswith(KERNEL_PREFIX)]


@pytest.mark.parametrize("config", ["mixed", "uniform4"])
def test_rewritten_model_on_llvm_equals_reference(config: str) -> None:
    """Every conv of a residual network goes to the kernel, 4-bit activations packed between INT4 layers
    (written packed by convs and residual adds); the whole graph stays bit-exact (CPU loops for mma)."""
    graph = quantized_graph("tiny_resnet", (1, 28, 28), config)
    x = np.random.default_rng(1).standard_normal((2, 1, 28, 28)).astype(np.float32)
    ir = rewritten(graph, x.shape)
    convs = [op for op in graph.ops if op.op == "conv2d"]
    calls = tensor_core_calls(ir)
    assert len(calls) == len(convs)
    int4 = [op.attrs["w_bits"] == 4 and op.attrs["a_bits"] == 4 for op in convs]
    assert sum(name.startswith(f"{KERNEL_PREFIX}_s4") for name in calls) == sum(int4)
    int4_inputs = {op.inputs[0] for op, is_int4 in zip(convs, int4) if is_int4}
    requantized = {op.inputs[0]: op.output for op in graph.ops if op.op == "requantize"}
    # INT4 kernels read packed words, all of them; a conv writes packed what an INT4 conv reads
    assert sorted(packed_io(ir)) == sorted((is_int4, requantized.get(op.output) in int4_inputs)
                                           for op, is_int4 in zip(convs, int4))
    if config == "uniform4":  # the residual adds (a sum rounded once: its last op the rounding shift) write packed too
        assert "relax.right_shift" in packed_producers(ir)
    np.testing.assert_array_equal(run_on_llvm(ir, x), graph.run(x))


def packed_producers(ir: object) -> set[str]:
    """The operators of ``main`` whose results :func:`pack_activation` packs (through casts and clips)."""
    bindings = {b.var: b.value for block in ir["main"].body.blocks for b in block.bindings}

    def origin(value: object) -> str:
        while value.op.name in ("relax.astype", "relax.clip") and value.args[0] in bindings:
            value = bindings[value.args[0]]
        return value.op.name

    return {origin(bindings[v.args[0]]) for v in bindings.values()  # pack starts with and(astype(x), 15)
            if v.op.name == "relax.bitwise_and" and v.args[0] in bindings and bindings[v.args[0]].op.name == "relax.astype"}


resnet18_group = pytest.mark.xdist_group("resnet18")  # one worker builds the shared ResNet-18 fixtures


@pytest.fixture(scope="module")
def resnet18() -> IntegerGraph:
    return quantized_graph("resnet18", (3, 64, 64), "mixed", seed=3)


@pytest.fixture(scope="module")
def resnet18_cuda(resnet18: IntegerGraph) -> object:
    return compile_graph(resnet18, (8, 3, 64, 64), SM75)


def kernels_of(source: str) -> dict[str, str]:
    """Kernel name -> source text up to the next kernel, for every ``__global__`` definition."""
    definitions = list(re.finditer(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^;{]*\)\s*\{", source))
    ends = [d.start() for d in definitions[1:]] + [len(source)]
    return {d.group(1): source[d.start():end] for d, end in zip(definitions, ends)}


@resnet18_group
def test_resnet18_source_uses_mma_for_every_conv(resnet18: IntegerGraph, resnet18_cuda: object) -> None:
    convs = [op for op in resnet18.ops if op.op == "conv2d"]
    ir = rewritten(resnet18, (8, 3, 64, 64), tensor_cores=True)
    calls = tensor_core_calls(ir)
    assert len(calls) == len(convs) == 20
    int4 = sum(op.attrs["w_bits"] == 4 and op.attrs["a_bits"] == 4 for op in convs)
    assert 0 < int4 < len(convs)  # the mixed config has both kinds
    assert sum(name.startswith(f"{KERNEL_PREFIX}_s4") for name in calls) == int4
    assert sum(packed_input for packed_input, _ in packed_io(ir)) == int4  # every INT4 kernel reads packed words
    kernels = kernels_of(resnet18_cuda.source())
    conv_kernels = {name: body for name, body in kernels.items() if name.startswith(KERNEL_PREFIX)}
    assert {name.removesuffix("_kernel") for name in conv_kernels} == set(calls)
    for name, body in conv_kernels.items():
        shape = "m8n8k32" if name.startswith(f"{KERNEL_PREFIX}_s4") else "m8n8k16"
        assert f"mma.sync.aligned.{shape}.row.col.s32" in body, name
        assert "__shared__" in body and ">> shift_ptr[" in body, name  # staged operands, requantized in the epilogue
    assert not [name for name in kernels if "conv2d" in name and not name.startswith(KERNEL_PREFIX)]


def test_sm90_runs_int4_layers_as_int8() -> None:
    graph = quantized_graph("tiny_resnet", (1, 28, 28), "uniform4")
    ir = rewritten(graph, (8, 1, 28, 28), arch="sm_90", tensor_cores=True)
    calls = tensor_core_calls(ir)
    assert len(calls) == sum(op.op == "conv2d" for op in graph.ops) and all(
        name.startswith(f"{KERNEL_PREFIX}_s8") for name in calls)
    assert not any(map(any, packed_io(ir)))  # nothing packed: no kernel reads packed words


INT4_MMA = re.compile(r"mma\.sync\.aligned\.m8n8k32\.row\.col\.s32\.[su]4\.s4\.s32")


@pytest.fixture(scope="module")
def sm90_emulated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_resnet W4A4 compiled by the CLI for sm_90 with ``--int4 emulated`` (artifact folder, model.cu)."""
    folder = tmp_path_factory.mktemp("sm90")
    quantized_graph("tiny_resnet", (1, 28, 28), "uniform4").save(folder / "tiny.int.npz")
    code = cli_main(["compile", str(folder / "tiny.int.npz"), "--input-shape", "8,1,28,28", "--target", "cuda",
                     "-arch=sm_90", "--int4", "emulated", "-o", str(folder / "out"), "--emit-source"])
    assert code == 0
    return folder / "out"


def test_int4_emulated_keeps_int4_mma_on_sm90(sm90_emulated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    graph = IntegerGraph.load(sm90_emulated / "graph.int.npz")
    convs = sum(op.op == "conv2d" for op in graph.ops)
    int4 = [name for name, body in kernels_of((sm90_emulated / "model.cu").read_text()).items()
            if INT4_MMA.search(body)]
    assert 0 < len(int4) and all(name.startswith(f"{KERNEL_PREFIX}_s4") for name in int4)
    assert json.loads((sm90_emulated / "manifest.json").read_text())["int4"] == "emulated"
    default = compile_graph(graph, (8, 1, 28, 28), {"kind": "cuda", "arch": "sm_90"})
    assert default.int4 == "auto" and "m8n8k32" not in default.source() and convs > 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_nvcc_compiles_int4_emulated_for_sm90(sm90_emulated: Path) -> None:
    import tvm
    from tvm.support import nvcc

    with tvm.target.Target({"kind": "cuda", "arch": "sm_90"}):
        cubin = nvcc.compile_cuda((sm90_emulated / "model.cu").read_text(), target_format="cubin", arch="sm_90",
                                  compiler="nvcc")
    assert len(cubin) > 10_000


def test_int4_emulated_needs_a_cuda_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    graph = quantized_graph("tiny_resnet", (1, 28, 28), "uniform4")
    with pytest.raises(ValueError, match="needs a cuda target"):
        compile_graph(graph, (1, 1, 28, 28), {"kind": "llvm"}, int4="emulated")
    graph.save(tmp_path / "tiny.int.npz")
    assert cli_main(["compile", str(tmp_path / "tiny.int.npz"), "--int4", "emulated", "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "needs a cuda target" in err and len(err.strip().splitlines()) == 1


@gpu
def test_int4_emulated_on_gpu_equals_reference() -> None:
    """On sm_90 (H100/H200) the emulated INT4 kernels; on sm_75 to sm_89, the native ones."""
    import tvm

    arch = "sm_" + tvm.cuda().compute_version.replace(".", "")
    graph = quantized_graph("tiny_resnet", (1, 28, 28), "mixed")
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    module = compile_graph(graph, x.shape, {"kind": "cuda", "arch": arch}, int4="emulated")
    assert INT4_MMA.search(module.source())
    np.testing.assert_array_equal(module(x), graph.run(x))


@resnet18_group
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_nvcc_compiles_resnet18_for_sm75(resnet18_cuda: object) -> None:
    import tvm
    from tvm.support import nvcc

    with tvm.target.Target(SM75):
        cubin = nvcc.compile_cuda(resnet18_cuda.source(), target_format="cubin", arch="sm_75", compiler="nvcc")
    assert len(cubin) > 10_000


def test_cli_compiles_for_cuda_and_emits_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    graph_file = tmp_path / "tiny.int.npz"
    quantized_graph("tiny_resnet", (1, 28, 28), "uniform4").save(graph_file)
    out = tmp_path / "out"
    code = cli_main(["compile", str(graph_file), "--input-shape", "8,1,28,28", "--target", "cuda", "-arch=sm_75",
                     "-o", str(out), "--emit-source"])
    assert code == 0
    assert {"model.so", "model.cu", "manifest.json", "graph.int.npz"} <= {p.name for p in out.iterdir()}
    assert "mma.sync.aligned.m8n8k32" in (out / "model.cu").read_text()
    assert "INT4 (mma m8n8k32)" in capsys.readouterr().out
    if not has_gpu():  # the artifact needs a GPU to load: one clear line, no traceback
        np.save(tmp_path / "x.npy", np.zeros((8, 1, 28, 28), np.float32))
        assert cli_main(["run", str(out), "--input", str(tmp_path / "x.npy")]) != 0
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_cli_refuses_unknown_arch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    graph_file = tmp_path / "tiny.int.npz"
    quantized_graph("tiny_resnet", (1, 28, 28), "uniform4").save(graph_file)
    assert cli_main(["compile", str(graph_file), "--target", "cuda", "-arch=sm_70", "-o", str(tmp_path / "o")]) != 0
    assert "sm_75" in capsys.readouterr().err


@gpu
@pytest.mark.parametrize("conv", SPECS, ids=["int4u", "int4s", "int8-7x7", "uint8-dilated", "int4-int32-out"])
def test_kernel_on_gpu_equals_reference(conv: ConvSpec) -> None:
    graph, x = conv_graph(conv)
    module = compile_graph(graph, x.shape, SM75, input_dtype=str(x.dtype))
    calls = tensor_core_calls(rewritten(graph, x.shape, str(x.dtype), tensor_cores=True))
    assert [name.startswith(f"{KERNEL_PREFIX}_s{conv.bits}") for name in calls] == [True]
    np.testing.assert_array_equal(module(x), graph.run(x))


@gpu
@pytest.mark.parametrize("signed", [False, True], ids=["u4", "s4"])
def test_packed_activations_on_gpu_equal_reference(signed: bool) -> None:
    graph, x = int4_chain(signed)
    np.testing.assert_array_equal(compile_graph(graph, x.shape, SM75, input_dtype=str(x.dtype))(x), graph.run(x))


@resnet18_group
@gpu
def test_resnet18_on_gpu_equals_reference(resnet18: IntegerGraph, resnet18_cuda: object) -> None:
    x = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(resnet18_cuda(x), resnet18.run(x))


def test_requantize_rule_is_the_dyadic_one() -> None:
    """The epilogue's formula on int64: checked against quant.dyadic on the llvm build of a 1x1 conv."""
    conv = ConvSpec(1, 16, 4, 4, 64, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 8, True, "int8", "int32",
                    -(2**31), 2**31 - 1)
    graph, x = conv_graph(conv, seed=5)
    _, acc, requant = graph.ops
    expected = requantize(np.einsum("nchw,oc->nohw", x.astype(np.int64), acc.consts["weight"][:, :, 0, 0])
                          + acc.consts["bias"].reshape(1, -1, 1, 1), requant.consts["b"], requant.consts["c"],
                          conv.qmin, conv.qmax, axis=1, offset=requant.consts["offset"])
    ir = rewritten(graph, x.shape, str(x.dtype))
    assert len(tensor_core_calls(ir)) == 1
    np.testing.assert_array_equal(run_on_llvm(ir, x), expected)


def test_cuda_targets_use_the_tensor_core_kernels() -> None:
    from hawqc.runtime.module import resolve_kernels

    assert resolve_kernels("auto", SM75) == "tensor_core"
    with pytest.raises(ValueError, match="for CPUs"):
        resolve_kernels("vnni", SM75)


def test_a_sum_over_h_w_of_a_requantized_tensor_lowers_for_cuda() -> None:
    """TVM 0.27's dlight GEMV rule fails an assertion on this fused function (PT2E's RegNet: a squeeze-excite
    mean of a conv's requantized output at batch 1); the CUDA pipeline leaves it to the next rule."""
    import tvm
    from tvm import relax

    from hawqc.topi_int4.cuda.pipeline import cuda_pipeline, cuda_source

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 4, 8), "int64"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.multiply(x, relax.const(np.full((1, 1, 1, 8), 3), "int64")))
            y = bb.emit(relax.op.right_shift(y, relax.const(2, "int64")))
            y = bb.emit(relax.op.astype(relax.op.clip(y, -100, 100), "int32"))
            out = bb.emit_output(relax.op.sum(y, axis=[1, 2], keepdims=True))
        bb.emit_func_output(out)
    target = tvm.target.Target(SM75, host={"kind": "llvm"})
    with target:
        lowered = cuda_pipeline(target)(bb.get())
    source = cuda_source(tvm.compile(lowered, target=target, relax_pipeline=tvm.transform.Sequential([])))
    assert "__global__" in source
