"""Every small test model compiles for ``cuda -arch=sm_75`` with an open batch: the CUDA source passes nvcc,
and the graph after the Tensor Core rewrite (``mma`` as plain loops) built for llvm equals the reference.

The corpus: hawqc's own quantization (residual, mixed INT4/INT8) and ONNX Runtime's QDQ and operator forms
of the third-party test nets (residual, depthwise, grouped, concat, lookup-table activations)."""

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from quantized_models import quantized
from test_third_party import NETS, ort_quantized
from torch import nn

from hawqc import models
from hawqc.api import integer_graph_of
from hawqc.reference.graph import IntegerGraph
from hawqc.relax_passes.tensor_core_conv import KERNEL_PREFIX, TensorCoreConv
from hawqc.runtime.module import compile_graph

SM75 = {"kind": "cuda", "arch": "sm_75"}


class GroupedConcat(nn.Module):
    """A grouped 3x3 conv and a 1x1 conv side by side, concatenated, max-pooled, then a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=4), nn.ReLU())
        self.pointwise = nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU())
        self.mix = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = nn.functional.max_pool2d(torch.cat([self.grouped(x), self.pointwise(x)], 1), 2)
        y = torch.relu(self.mix(y) + y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


NETS["grouped_concat"] = (GroupedConcat, (1, 3, 16, 16))

CORPUS = {  # name: (quantizer, net, bit config or ONNX Runtime mode)
    "hawqc-tiny_resnet-mixed": ("hawqc", "tiny_resnet", "mixed"),
    "ort-tiny_resnet-qdq-uint8-asymmetric": ("ort", "tiny_resnet", "qdq-uint8-asymmetric"),
    "ort-depthwise_relu6-qdq-int8-symmetric": ("ort", "depthwise_relu6", "qdq-int8-symmetric"),
    "ort-depthwise_relu6-operator-form": ("ort", "depthwise_relu6", "operator-form"),
    "ort-grouped_concat-qdq-uint8-asymmetric": ("ort", "grouped_concat", "qdq-uint8-asymmetric"),
    "ort-activations-qdq-uint8-asymmetric": ("ort", "activations", "qdq-uint8-asymmetric"),
}
"""One model per graph style and block kind (the other ONNX Runtime modes of the same nets differ only in the
reader's view of them, checked in test_third_party)."""
WITHOUT_TENSOR_CORES = {"ort-activations-qdq-uint8-asymmetric"}
"""Its convs read activations with zero points (after SiLU, HardSwish...): they keep TVM's lowering."""


def corpus_graph(case: str, folder: Path) -> tuple[IntegerGraph, tuple[int, ...]]:
    """The integer graph of a corpus model and its input shape without the batch."""
    source, net, variant = CORPUS[case]
    if source == "hawqc":
        shape = models.spec(net).input_shape
        return quantized(net, shape, variant).integer_graph(), shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path, shape = ort_quantized(net, variant, folder)
    return integer_graph_of(path), shape[1:]


@pytest.fixture(scope="module", params=list(CORPUS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, IntegerGraph, tuple]:
    return request.param, *corpus_graph(request.param, tmp_path_factory.mktemp(request.param))


def test_rewritten_graph_on_llvm_equals_reference_at_any_batch(model: tuple[str, IntegerGraph, tuple]) -> None:
    import tvm
    from tvm import relax

    from hawqc.frontend.integer_graph import to_relax

    case, graph, shape = model
    ir = TensorCoreConv("sm_75", tensor_cores=False)(to_relax(graph, (None, *shape), layout="NHWC"))
    calls = [b.value.args[0].name_hint for block in ir["main"].body.blocks for b in block.bindings
             if getattr(getattr(b.value, "op", None), "name", "") == "relax.call_tir"]
    assert any(name.startswith(KERNEL_PREFIX) for name in calls) == (case not in WITHOUT_TENSOR_CORES)
    target = tvm.target.Target({"kind": "llvm"})
    vm = relax.VirtualMachine(tvm.compile(ir, target=target, relax_pipeline=relax.get_default_pipeline(target)),
                              tvm.cpu())
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
        expected = graph.run(x)
        assert len(np.unique(expected)) > 3
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), expected)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_source_compiles_with_nvcc_for_sm75(model: tuple[str, IntegerGraph, tuple]) -> None:
    import tvm
    from tvm.support import nvcc

    case, graph, shape = model
    module = compile_graph(graph, (None, *shape), SM75)
    assert module.batch == "any"
    source = module.source()
    assert ("mma.sync.aligned.m8n8k" in source) == (case not in WITHOUT_TENSOR_CORES)
    with tvm.target.Target(SM75):
        cubin = nvcc.compile_cuda(source, target_format="cubin", arch="sm_75", compiler="nvcc")
    assert len(cubin) > 1000
