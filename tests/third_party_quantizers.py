"""Float PyTorch models exported to ONNX and quantized by other tools, the way their users run them
(shared by the reader tests and ``benchmarks/zoo_compile.py``).

Quantizers: ONNX Runtime ``quantize_static`` in QDQ form with symmetric int8 or asymmetric uint8
activations, in operator form (QLinearConv ...), and in QDQ form with float weights followed by a
QuantizeLinear -> DequantizeLinear pair (``AddQDQPairToWeight``, the TensorRT/ModelOpt style); Intel
NNCF's ONNX post-training quantization (when ``nncf`` imports); PyTorch's PT2E path (torchao's
``prepare_pt2e``/``convert_pt2e`` with the ``X86InductorQuantizer``, exported by ``torch.onnx.export(dynamo=True)``;
when ``torchao`` and ``onnxscript`` import); hawqc's own QDQ export.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

ORT_STYLES = {"ort-qdq-s8": ("QDQ", "QInt8", True, False), "ort-qdq-u8": ("QDQ", "QUInt8", False, False),
              "ort-qoperator": ("QOperator", "QUInt8", False, False),
              "ort-weight-qdq": ("QDQ", "QUInt8", False, True)}
"""name -> (format, activation type, symmetric activations, weights as float + Q/DQ pair)."""
QUANTIZERS = (*ORT_STYLES, "nncf", "pt2e-x86", "hawqc")


def calibration(shape: tuple[int, ...], batches: int = 4) -> list[np.ndarray]:
    return [np.random.default_rng(i).standard_normal(shape).astype(np.float32) for i in range(batches)]


def export_float(model: torch.nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    """``model`` (eval mode) as an ONNX opset-17 file with input ``input`` and output ``output``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"])
    return unshare_initializers(path)


def unshare_initializers(path: Path) -> Path:
    """The ONNX file at ``path`` with every ``Identity`` of an initializer replaced by a copy of it: the exporter
    shares equal weights that way (VGG-16's zero biases), and ONNX Runtime's operator-form quantizer then finds
    no initializer for a conv's bias."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    shared = [n for n in graph.node if n.op_type == "Identity" and n.input[0] in inits]
    if shared:
        for node in shared:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            graph.node.remove(node)
        onnx.save(model, str(path))
    return path


def quantize_pt2e(model: torch.nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    """``model`` quantized by PT2E (torchao, X86InductorQuantizer: uint8 activations, int8 per-channel
    weights, BatchNorm folded) on random batches, exported to ONNX by the dynamo exporter."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    example = (torch.from_numpy(calibration(shape, 1)[0]),)
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model.eval(), example).module(), quantizer)
    with torch.no_grad():
        for x in calibration(shape):
            prepared(torch.from_numpy(x))
    converted = allow_exported_model_train_eval(convert_pt2e(prepared))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(converted, example, str(path), dynamo=True, input_names=["input"], output_names=["output"],
                          verbose=False)
    return path


def quantize_with(quantizer: str, model: torch.nn.Module, shape: tuple[int, ...], folder: Path) -> Path:
    """The QDQ (or operator-form) ONNX file of ``model`` quantized by ``quantizer`` on random batches."""
    path = folder / f"{quantizer}.onnx"
    if quantizer == "hawqc":
        from hawqc import quantize
        from hawqc.quant.export import to_onnx

        to_onnx(quantize(model, "uniform8", [torch.from_numpy(x) for x in calibration(shape)]), path)
        return path
    if quantizer == "pt2e-x86":
        return quantize_pt2e(model, shape, path)
    float_path = export_float(model, shape, folder / "float.onnx")
    if quantizer == "nncf":
        os.environ.setdefault("NNCF_CI", "1")  # no telemetry
        import nncf
        import onnx

        quantized = nncf.quantize(onnx.load(float_path), nncf.Dataset([{"input": x} for x in calibration(shape)]),
                                  subset_size=len(calibration(shape)))
        onnx.save(quantized, path)
        return path
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": x} for x in calibration(shape)])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.batches, None)

    fmt, activations, symmetric, weight_pairs = ORT_STYLES[quantizer]
    quantize_static(str(float_path), str(path), Reader(), quant_format=getattr(QuantFormat, fmt), per_channel=True,
                    activation_type=getattr(QuantType, activations), weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": symmetric, "AddQDQPairToWeight": weight_pairs})
    return path
