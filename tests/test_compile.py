"""Integer-only TVM modules: bit-exact against the reference, through PyTorch and through ONNX."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from quantized_models import quantized

import hawqc
from hawqc import models, quantize
from hawqc.frontend.onnx_qdq import from_onnx
from hawqc.quant.export import to_onnx
from hawqc.relax_passes.float_ops import float_ops
from hawqc.runtime.module import compile_graph, first_divergence
from hawqc.runtime.target import parse_target

TARGET = parse_target("llvm")


CASES = [("tiny_resnet", (1, 28, 28)), ("resnet18", (3, 56, 56)), ("resnet50", (3, 64, 64)),
         ("inceptionv3", (3, 80, 80))]


@pytest.mark.parametrize("config", ["uniform8", "uniform4", "mixed"])
@pytest.mark.parametrize(("name", "shape"), CASES)
def test_compiled_module_is_bit_exact(name: str, shape: tuple[int, ...], config: str, tmp_path: Path) -> None:
    qmodel = quantized(name, shape, config)
    path = tmp_path / "model.onnx"
    to_onnx(qmodel, path)
    x = np.random.default_rng(1).standard_normal((2, *shape)).astype(np.float32)
    module = hawqc.compile_integer_only(path, input_shape=x.shape)  # in through ONNX QDQ
    expected = qmodel.integer_graph().run(x)  # the PyTorch path's reference
    np.testing.assert_array_equal(module(x), expected)
    np.testing.assert_array_equal(module.reference(x), expected)
    assert float_ops(module.ir) == []


def test_requantization_fuses_into_the_conv_kernels() -> None:
    qmodel = quantized("tiny_resnet", (1, 28, 28), "uniform8")
    module = compile_graph(qmodel.integer_graph(), (1, 1, 28, 28), TARGET)
    fused, kernels = module.fused
    assert kernels >= 6 and fused == kernels - 1  # all but the classifier, which ends in the dequantize


def test_python_api_export_and_load(tmp_path: Path) -> None:
    qmodel = quantized("tiny_resnet", (1, 28, 28), "uniform4")
    module = hawqc.compile_integer_only(qmodel, input_shape=(3, 1, 28, 28))
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    out = module.export(tmp_path / "artifact")
    assert sorted(p.name for p in out.iterdir()) == ["graph.int.npz", "manifest.json", "model.so"]
    loaded = hawqc.load(out)
    np.testing.assert_array_equal(loaded(x), module(x))
    np.testing.assert_array_equal(loaded.reference(x), module(x))
    assert loaded.summary()[1] == {"layer": "layer1.0.conv1", "op": "conv2d", "weight": [16, 16, 3, 3],
                                   "w_bits": 4, "a_bits": 4}
    with pytest.raises(ValueError, match="exists: choose another output folder"):
        module.export(out)
    with pytest.raises(ValueError, match=r"input has shape \(1, 1, 28, 28\), the module was compiled for"):
        module(x[:1])


@pytest.mark.parametrize("kernels", ["vnni", "generic"])
def test_the_input_is_read_in_place_only_by_the_input_quantize(kernels: str, tmp_path: Path) -> None:
    """Where the model's one reader of its input is the x86 input quantize (which assumes no alignment), a
    call hands the caller's array over as it is, here one whose data is 4 bytes past a 64-byte boundary;
    the artifact keeps the choice. The generic kernels read it in TVM's own, and get an aligned copy."""
    qmodel = quantized("tiny_resnet", (1, 28, 28), "uniform8")
    module = compile_graph(qmodel.integer_graph(), (2, 1, 28, 28), TARGET, kernels=kernels)
    assert module.input_in_place == (kernels == "vnni")
    storage = np.zeros(2 * 28 * 28 + 32, np.float32)
    start = (-storage.ctypes.data % 64) // 4 + 1
    x = storage[start:start + 2 * 28 * 28].reshape(2, 1, 28, 28)
    x[:] = np.random.default_rng(3).standard_normal(x.shape)
    assert x.ctypes.data % 64 == 4
    np.testing.assert_array_equal(module(x), qmodel.integer_graph().run(x))
    assert hawqc.load(module.export(tmp_path / "artifact")).input_in_place == module.input_in_place


def test_a_float_model_is_quantized_first() -> None:
    torch.manual_seed(0)
    model = models.get("tiny_resnet")
    calib = [torch.randn(4, 1, 28, 28)]
    module = hawqc.compile_integer_only(model, "uniform4", calib_data=calib, input_shape=(4, 1, 28, 28))
    np.testing.assert_array_equal(module(calib[0].numpy()), quantize(model, "uniform4", calib)(calib[0]).numpy())
    with pytest.raises(ValueError, match="needs calib_data"):
        hawqc.compile_integer_only(model, "uniform4")


def test_first_divergence_names_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    from hawqc.reference import kernels

    graph = quantized("tiny_resnet", (1, 28, 28), "uniform8").integer_graph()
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    assert first_divergence(graph, x, TARGET) == ("none", 0)
    broken = dict(kernels.KERNELS, requantize=lambda i, a, c: kernels.requantize_op(i, a, c) + 1)
    monkeypatch.setattr(kernels, "KERNELS", broken)
    first_requant = next(op.output for op in graph.ops if op.op == "requantize")
    assert first_divergence(graph, x, TARGET) == (f"requantize -> {first_requant}", 1)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("llvm -mcpu=znver4", {"kind": "llvm", "mcpu": "znver4"}),
     ("cuda -arch=sm_75", {"kind": "cuda", "arch": "sm_75"}),
     ('{"kind": "llvm", "mcpu": "skylake"}', {"kind": "llvm", "mcpu": "skylake"}),
     ("llvm -mattr=+avx2,+fma -mcpu=haswell", {"kind": "llvm", "mattr": ["+avx2", "+fma"], "mcpu": "haswell"})],
)
def test_target_strings(spec: str, expected: dict) -> None:  # type: ignore[type-arg]
    assert parse_target(spec) == expected
    assert parse_target("llvm")["mcpu"]  # the host CPU


@pytest.mark.parametrize(("flags", "amx"), [({"avx512_vnni", "amx_tile", "amx_int8"}, True), ({"avx512_vnni"}, False)])
def test_plain_llvm_is_the_host_with_the_amx_its_cpu_name_hides(flags: set, amx: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A VM may report an older CPU model than it runs on: plain ``llvm`` adds the AMX features Linux lists."""
    from hawqc.runtime import target
    from hawqc.runtime.module import has_feature

    monkeypatch.setattr(target, "host_cpu", lambda: "rocketlake")  # a name without AMX
    monkeypatch.setattr(target, "linux_cpu_flags", lambda: flags)
    config = parse_target("llvm")
    assert has_feature(config, "amx-int8") == amx and ("mattr" in config) == amx
    assert "mattr" not in parse_target("llvm -mcpu=znver4")  # an explicit CPU is taken as it is


@pytest.mark.parametrize("spec", ["tpu", "llvm mcpu", "-mcpu=x", "{nope"])
def test_unknown_targets_are_one_error(spec: str) -> None:
    with pytest.raises(ValueError, match="target"):
        parse_target(spec)


def test_weight_zero_points_and_unsupported_ops_are_named() -> None:
    def model_of(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], shape: list[int]) -> onnx.ModelProto:
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    # a weight with a zero point is no integer weight: its conv runs in float and is reported as such
    inits = [helper.make_tensor("w", TensorProto.INT8, [4, 4, 1, 1], list(range(16))),
             helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [3]),
             helper.make_tensor("sx", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("zx", TensorProto.INT8, [], [0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], name="dq_w"),
             helper.make_node("Conv", ["xf", "wf"], ["yf"], name="conv"),
             helper.make_node("QuantizeLinear", ["yf", "sx", "zx"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "sx", "zx"], ["y"])]
    assert from_onnx(model_of(nodes, inits, [1, 4, 2, 2])).metadata["float_ops"] == ["conv (Conv)"]
    with pytest.raises(ValueError, match="'act' \\(Erf\\): operator has no integer lowering"):
        from_onnx(model_of([helper.make_node("Erf", ["x"], ["y"], name="act")], [], [1, 4]))


def test_four_bit_lookup_table_has_16_entries() -> None:
    def const(name: str, value: object, dtype: int) -> onnx.TensorProto:
        return helper.make_tensor(name, dtype, [], [value])

    inits = [const("s_in", 0.25, TensorProto.FLOAT), const("z4", 0, TensorProto.INT4),
             const("s_out", 1 / 255, TensorProto.FLOAT), const("z8", 0, TensorProto.UINT8)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_in", "z4"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s_in", "z4"], ["xf"]),
             helper.make_node("Sigmoid", ["xf"], ["yf"]),
             helper.make_node("QuantizeLinear", ["yf", "s_out", "z8"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s_out", "z8"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "lut4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    module = hawqc.compile_integer_only(model)
    (table,) = [op.consts["table"] for op in module.graph.ops if op.op == "lut"]
    assert len(table) == 16
    x = np.linspace(-2.5, 2.5, 8, dtype=np.float32)[None]
    q = np.clip(np.rint(x / 0.25), -8, 7)
    expected = np.clip(np.rint((1 / (1 + np.exp(-q * 0.25))).astype(np.float32) / np.float32(1 / 255)), 0, 255) / 255
    np.testing.assert_allclose(module(x), expected.astype(np.float32), rtol=1e-6)
    np.testing.assert_array_equal(module(x), module.reference(x))
