"""QDQ models quantized by ONNX Runtime's quantize_static compile and agree with ONNX Runtime."""

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch import nn

import hawqc
from hawqc import models
from hawqc.relax_passes.float_ops import float_ops


class DepthwiseReLU6(nn.Module):
    """A MobileNet-style block: ReLU6 everywhere, a depthwise 3x3 between pointwise convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.pw(self.dw(self.stem(x))), 1), 1))


NETS = {"tiny_resnet": (lambda: models.get("tiny_resnet"), (1, 1, 28, 28)),
        "depthwise_relu6": (DepthwiseReLU6, (1, 3, 32, 32)),
        "activations": (lambda: Activations(), (1, 3, 16, 16))}
COMPARED = ["tiny_resnet", "depthwise_relu6"]
MODES = {"qdq-uint8-asymmetric": (QuantFormat.QDQ, QuantType.QUInt8, False),
         "qdq-int8-symmetric": (QuantFormat.QDQ, QuantType.QInt8, True),
         "operator-form": (QuantFormat.QOperator, QuantType.QUInt8, False)}


class _Reader(CalibrationDataReader):
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.batches = iter([{"input": np.random.default_rng(i).standard_normal(shape).astype(np.float32)}
                             for i in range(8)])

    def get_next(self):  # type: ignore[no-untyped-def]
        return next(self.batches, None)


def ort_quantized(net: str, mode: str, folder: Path) -> tuple[Path, tuple[int, ...]]:
    """The float net exported to ONNX, then quantized by ONNX Runtime in the given mode."""
    build, shape = NETS[net]
    torch.manual_seed(0)
    model = models.recalibrate_bn(build(), [torch.randn(8, *shape[1:])])
    float_path, path = folder / f"{net}.onnx", folder / f"{net}_{mode}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(shape),), str(float_path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"])
    quant_format, activations, symmetric = MODES[mode]
    quantize_static(str(float_path), str(path), _Reader(shape), quant_format=quant_format, per_channel=True,
                    activation_type=activations, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": symmetric})
    return path, shape


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("net", COMPARED)
def test_agrees_with_onnx_runtime(net: str, mode: str, tmp_path: Path) -> None:
    path, shape = ort_quantized(net, mode, tmp_path)
    module = hawqc.compile_integer_only(path, input_shape=shape)
    assert float_ops(module.ir) == []
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours, theirs = [], []
    for seed in range(100):
        x = np.random.default_rng(1000 + seed).standard_normal(shape).astype(np.float32)
        y = module(x)
        np.testing.assert_array_equal(y, module.reference(x))
        ours.append(y)
        theirs.append(session.run(None, {"input": x})[0])
    ours, theirs = np.concatenate(ours), np.concatenate(theirs)
    assert (ours.argmax(axis=1) == theirs.argmax(axis=1)).mean() >= 0.99
    scale = final_scale(onnx.load(path))
    if scale is not None:  # the output is 8-bit values: compare them in LSBs
        assert (np.abs(ours - theirs) / scale <= 1 + 1e-4).mean() >= 0.99


def final_scale(model: onnx.ModelProto) -> float | None:
    """The scale of the DequantizeLinear that produces the output, None if the output is float."""
    producer = next(n for n in model.graph.node if model.graph.output[0].name in n.output)
    if producer.op_type != "DequantizeLinear":
        return None
    return float(next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == producer.input[1]))


class Activations(nn.Module):
    """SiLU, HardSwish, Sigmoid and Tanh between quantized convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 16, 3, 1, 1), nn.Conv2d(16, 16, 3, 1, 1), nn.Conv2d(16, 16, 3, 1, 1),
                                    nn.Conv2d(16, 16, 1)])
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, act in zip(self.convs, (nn.functional.silu, nn.functional.hardswish, torch.sigmoid, torch.tanh)):
            x = act(conv(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_nonlinearities_become_exact_lookup_tables(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path, shape = ort_quantized("activations", "qdq-uint8-asymmetric", tmp_path)
    capfd.readouterr()
    module = hawqc.compile_integer_only(path, input_shape=shape)
    assert "Fast mode segfaults" not in capfd.readouterr().err  # lookups take clipped indices: TVM has no warning
    tables = [op for op in module.graph.ops if op.op == "lut"]
    assert len(tables) == 4 and all(len(op.consts["table"]) == 256 for op in tables)
    assert any(op.op == "mul" for op in module.graph.ops)  # x * sigmoid(x), both quantized
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scale = final_scale(onnx.load(path))
    for seed in range(20):
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        y = module(x)
        np.testing.assert_array_equal(y, module.reference(x))
        assert np.abs(y - session.run(None, {"input": x})[0]).max() <= scale * (1 + 1e-4)


class ShapeArithmetic(nn.Module):
    """F.pad and x.view(x.size(0), -1): exporters leave Shape/ConstantOfShape/Slice/Concat sub-graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv(nn.functional.pad(x, (1, 1, 1, 1)))), 2)
        return self.fc(x.view(x.size(0), -1))


def test_shape_subgraphs_fold_once_the_batch_is_fixed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    float_path, path = tmp_path / "shape.onnx", tmp_path / "shape_q.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ShapeArithmetic().eval(), (torch.randn(1, 3, 12, 12),), str(float_path), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "N"}, "output": {0: "N"}})
    quantize_static(str(float_path), str(path), _Reader((1, 3, 12, 12)), quant_format=QuantFormat.QDQ, per_channel=True)
    assert {"Shape", "ConstantOfShape", "Slice"} <= {n.op_type for n in onnx.load(path).graph.node}
    with pytest.warns(UserWarning, match=r"compiled for batch 1; choose another batch with --input-shape N,3,12,12"):
        assert hawqc.compile_integer_only(path, kernels="generic").batch == 1  # the batch the Shape nodes fold at
    module = hawqc.compile_integer_only(path, input_shape=(4, 3, 12, 12))
    assert [op.op for op in module.graph.ops][:3] == ["quantize", "pad", "conv2d"]
    x = np.random.default_rng(0).standard_normal((4, 3, 12, 12)).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_array_equal(module(x), module.reference(x))
    assert np.abs(module(x) - expected).max() <= final_scale(onnx.load(path)) * (1 + 1e-4)


class StaticSamePadding(nn.Module):
    """EfficientNet-Lite's "static same" padding: a ZeroPad2d before a stride-2 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.pad, self.conv = nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 8, 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(self.pad(x)))


def test_a_quantized_pad_value_constant_folds(tmp_path: Path) -> None:
    float_path, path = tmp_path / "pad.onnx", tmp_path / "pad_q.onnx"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(StaticSamePadding().eval(), (torch.randn(1, 3, 12, 12),), str(float_path), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["output"])
    quantize_static(str(float_path), str(path), _Reader((1, 3, 12, 12)), quant_format=QuantFormat.QDQ, per_channel=True)
    graph = onnx.load(path).graph
    constants = {n.output[0] for n in graph.node if n.op_type == "Constant"}
    assert any(n.op_type == "QuantizeLinear" and n.input[0] in constants for n in graph.node)  # the Pad's value
    module = hawqc.compile_integer_only(path)
    x = np.random.default_rng(0).standard_normal((1, 3, 12, 12)).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_array_equal(module(x), module.reference(x))
    assert np.abs(module(x) - expected).max() <= final_scale(onnx.load(path)) * (1 + 1e-4)


def test_equal_biases_the_exporter_shares_are_quantized_in_operator_form(tmp_path: Path) -> None:
    """torch's exporter shares equal initializers through Identity nodes (VGG-16's zero biases); ONNX Runtime's
    operator-form quantizer finds no initializer for the second conv's bias unless ``export_float`` unshares them."""
    from third_party_quantizers import quantize_with

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    for conv in (net[0], net[2]):
        nn.init.zeros_(conv.bias)
    model = onnx.load(str(quantize_with("ort-qoperator", net, (1, 3, 16, 16), tmp_path)))
    assert [node.op_type for node in model.graph.node].count("QLinearConv") == 2
