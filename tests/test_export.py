"""ONNX QDQ export: ONNX Runtime runs it and agrees with the integer simulation."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hawqc import models, quantize
from hawqc.quant.export import to_onnx


def test_onnx_runtime_agrees_with_integer_simulation(digits_model, digits_loaders, digits_calibration, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    qmodel = quantize(digits_model, "uniform8", digits_calibration)
    path = tmp_path / "digits_w8a8.onnx"
    model = to_onnx(qmodel, path, digits_calibration[0])
    assert model.opset_import[0].version == 13
    ops = [n.op_type for n in model.graph.node]
    pools = sum(n.kind in ("maxpool", "avgpool", "gap") for n in qmodel.nodes)
    assert ops.count("QuantizeLinear") == len(qmodel.acts) + pools
    assert ops.count("Conv") == 9 and ops.count("Gemm") == 1
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.cat([x for x, _ in digits_loaders[1]])
    ort_top1 = session.run(None, {"input": x.numpy()})[0].argmax(axis=1)
    with torch.no_grad():
        sim_top1 = qmodel(x).argmax(dim=1).numpy()
    assert (ort_top1 == sim_top1).mean() >= 0.99


def test_int4_export_passes_the_checker_at_opset_21(digits_model, digits_calibration, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    qmodel = quantize(digits_model, "uniform4", digits_calibration)
    path = tmp_path / "w4a4.onnx"
    to_onnx(qmodel, path)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 21
    initializers = {t.name: t for t in model.graph.initializer}
    assert initializers["layer1.0.conv1.weight_quantized"].data_type == onnx.TensorProto.INT4
    assert initializers["conv1.weight_quantized"].data_type == onnx.TensorProto.INT8
    zero_point_types = {t.data_type for name, t in initializers.items() if name.endswith(".zero_point")}
    assert onnx.TensorProto.UINT4 in zero_point_types  # 4-bit activations after ReLU
    bits = json.loads({p.key: p.value for p in model.metadata_props}["hawqc.bit_config"])
    assert bits["layer1.0.conv1"] == {"w_bits": 4, "a_bits": 4} and bits["conv1"] == {"w_bits": 8, "a_bits": 8}


def test_exported_weights_are_the_integer_graph_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.recalibrate_bn(models.get("resnet18"), [torch.randn(2, 3, 64, 64)])
    qmodel = quantize(model, "uniform8", [torch.randn(2, 3, 64, 64)])
    exported = to_onnx(qmodel, tmp_path / "r18.onnx")
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in exported.graph.initializer}
    for op in qmodel.integer_graph().ops:
        if op.op == "conv2d":
            layer = next(n.layer for n in qmodel.nodes if n.name == op.output.split(":")[0])
            np.testing.assert_array_equal(initializers[f"{layer}.weight_quantized"], op.consts["weight"])
            np.testing.assert_array_equal(initializers[f"{layer}.bias_quantized"], op.consts["bias"])


def test_int4_needs_opset_21_and_nothing_is_written(digits_model, digits_calibration, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    qmodel = quantize(digits_model, "uniform4", digits_calibration)
    with pytest.raises(ValueError, match="4-bit tensors need ONNX opset 21"):
        to_onnx(qmodel, tmp_path / "w4.onnx", opset=13)
    assert list(tmp_path.iterdir()) == []
