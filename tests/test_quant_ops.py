"""hawqc's own quantizer on the operations between quantized layers of MobileNet-V3, EfficientNet, RegNet,
DenseNet and LR-ASPP: sigmoid, hard-sigmoid, SiLU and hard-swish activations, squeeze-excite products, a
BatchNorm no conv absorbs, bilinear resizes. Each small net: quantize -> export -> compile, bit-exact
against the PyTorch integer simulation and the reference; the fake-quant (QAT) forward within a step of it."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hawqc
from hawqc import BitConfig, LayerBits, models, quantize
from hawqc.frontend.onnx_qdq import from_onnx
from hawqc.quant.capture import capture
from hawqc.quant.export import to_onnx
from hawqc.quant.qat import train
from hawqc.relax_passes.float_ops import float_ops


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class Gate(nn.Module):
    """Squeeze-excitation: ``x * gate(fc2(act(fc1(mean(x)))))``."""

    def __init__(self, channels: int, act: nn.Module, gate: nn.Module) -> None:
        super().__init__()
        self.pool, self.fc1, self.act = nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 4, 1), act
        self.fc2, self.gate = nn.Conv2d(4, channels, 1), gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc2(self.act(self.fc1(self.pool(x))))) * x


class MobileBlocks(nn.Module):
    """Hard-swish and SiLU after conv+BN, hard-sigmoid and sigmoid squeeze-excite gates, a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 16, stride=2), nn.Hardswish())
        self.dw = nn.Sequential(*conv_bn(16, 16, groups=16), nn.SiLU())
        self.se1 = Gate(16, nn.ReLU(), nn.Hardsigmoid())
        self.se2 = Gate(16, nn.SiLU(), nn.Sigmoid())
        self.project = nn.Sequential(*conv_bn(16, 16, 1))
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.se2(self.se1(self.dw(x))))
        return self.fc(F.hardswish(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


class DenseBlocks(nn.Module):
    """DenseNet's pre-activation: concatenations read by BatchNorm -> ReLU -> conv, and a final BatchNorm
    with no ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1, self.conv1 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1, bias=False)
        self.norm3 = nn.BatchNorm2d(24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)
        b = self.conv1(F.relu(self.norm1(torch.cat([a], 1))))
        c = self.conv2(F.relu(self.norm2(torch.cat([a, b], 1))))
        return self.norm3(torch.cat([a, b, c], 1))


class Segmenter(nn.Module):
    """LR-ASPP's head: a sigmoid-gated high-resolution branch resized bilinearly to the low one's size,
    1x1 classifiers added, the logits resized to the input (``size=t.shape[-2:]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.low = nn.Sequential(*conv_bn(3, 8, stride=2), nn.ReLU())
        self.high = nn.Sequential(*conv_bn(8, 16, stride=2), nn.Hardswish())
        self.cbr = nn.Sequential(*conv_bn(16, 8, 1), nn.ReLU())
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 8, 1, bias=False), nn.Sigmoid())
        self.low_classifier, self.high_classifier = nn.Conv2d(8, 3, 1), nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.low(x)
        high = self.high(low)
        y = F.interpolate(self.cbr(high) * self.scale(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.low_classifier(low) + self.high_classifier(y)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test builds its nets and inputs from one seed, whatever ran before it in the worker."""
    torch.manual_seed(0)


def prepared(net: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    model = net.eval()
    for m in model.modules():  # BatchNorms that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    return model


NETS = {"mobile": (MobileBlocks, (3, 16, 16)), "dense": (DenseBlocks, (3, 8, 8)), "segment": (Segmenter, (3, 16, 16))}
CONFIGS = {"uniform8": BitConfig(default=LayerBits(8, 8)), "uniform4": BitConfig(default=LayerBits(4, 4))}


@pytest.mark.parametrize("config", ["uniform8", "uniform4"])
@pytest.mark.parametrize("net", list(NETS))
def test_exported_graph_is_the_integer_simulation(net: str, config: str, tmp_path: Path) -> None:
    """The ONNX reader makes of the export exactly the integer graph the PyTorch simulation runs; the
    fake-quant forward (QAT's) rounds alike: within one output step of it."""
    cls, shape = NETS[net]
    model = prepared(cls(), shape)
    qmodel = quantize(model, CONFIGS[config], [torch.randn(8, *shape) * 2])
    x = torch.randn(4, *shape) * 2
    to_onnx(qmodel, tmp_path / "m.onnx")
    expected = qmodel(x).numpy()
    np.testing.assert_array_equal(from_onnx(tmp_path / "m.onnx", input_shape=x.shape).run(x.numpy()), expected)
    qmodel.mode = "fake"
    with torch.no_grad():
        fake = qmodel(x).numpy()
    step = float(np.abs(np.diff(np.unique(expected))).min())  # at least the output grid's step
    assert np.abs(fake - expected).max() <= step


@pytest.mark.parametrize("net", list(NETS))
def test_compiled_module_is_bit_exact(net: str, tmp_path: Path) -> None:
    """Compiled as typed (no input shape: any batch), integer-only, equal to the simulation on every element."""
    cls, shape = NETS[net]
    qmodel = quantize(prepared(cls(), shape), "uniform8", [torch.randn(8, *shape) * 2])
    to_onnx(qmodel, tmp_path / "m.onnx")
    module = hawqc.compile_integer_only(tmp_path / "m.onnx")  # the export's open batch stays open
    for batch in (3, 1):
        x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32) * 2
        expected = qmodel.integer_graph().run(x)
        np.testing.assert_array_equal(module(x), expected)
        np.testing.assert_array_equal(module.reference(x), expected)
    assert float_ops(module.ir) == [] and not module.graph.metadata.get("float_ops")
    ops = {op.op for op in module.graph.ops}
    assert {"mobile": {"lut", "mul"}, "dense": {"affine"}, "segment": {"resize", "lut", "mul"}}[net] <= ops


def test_capture_names_the_new_kinds() -> None:
    kinds = [n.kind for n in capture(Segmenter().eval())]
    assert kinds.count("resize") == 2 and kinds.count("mul") == 1 and kinds.count("act") == 2
    assert [n.kind for n in capture(DenseBlocks().eval())].count("bn") == 3
    dense = {n.name: n for n in capture(DenseBlocks().eval())}
    assert dense["norm1"].relu and not dense["norm3"].relu


def test_lraspp_is_traced_with_its_torchvision_keys() -> None:
    model = models.get("lraspp_mobilenet_v3_large").eval()
    nodes = capture(model)
    assert [n.kind for n in nodes].count("resize") == 2
    assert "backbone.0.0" in {n.layer for n in nodes}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (1, 21, 64, 64)


@pytest.mark.parametrize(("module", "message"), [
    (lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"), "only bilinear interpolation"),
    (lambda x: F.softplus(x), "unsupported operation")])
def test_unsupported_variants_are_named(module, message: str) -> None:  # type: ignore[no-untyped-def]
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return module(self.conv(x))

    with pytest.raises(ValueError, match=message):
        quantize(Net(), "uniform8", [torch.randn(2, 3, 8, 8)])


@pytest.mark.parametrize("net", ["mobile", "dense"])
def test_qat_trains_through_the_new_operations(net: str, tmp_path: Path) -> None:
    """QAT's fake-quant forward trains the layers around activations, gates and standalone BatchNorms (whose
    affine parameters learn, their statistics frozen); the export still reads back as the integer graph."""
    cls, shape = NETS[net]
    model = prepared(cls(), shape)
    qmodel = quantize(model, "uniform4", [torch.randn(8, *shape) * 2])
    out = model(torch.zeros(1, *shape)).shape[1]
    batches = [(torch.randn(4, *shape), torch.randint(0, out, (4,) if net == "mobile" else (4, *shape[1:])))]
    before = [p.detach().clone() for p in qmodel.parameters()]
    losses = train(qmodel, batches, steps=2, lr=0.05, progress=False)
    assert len(losses) == 2 and all(np.isfinite(losses))
    changed = [not torch.equal(a, b) for a, b in zip(before, qmodel.parameters())]
    assert all(changed[i] for i, (n, _) in enumerate(qmodel.named_parameters()) if n.startswith("norms."))
    statistics = {k: v for k, v in qmodel.state_dict().items() if k.startswith("norms.") and "running" in k}
    assert all(torch.equal(v, model.state_dict()[k.split(".", 1)[1].replace("/", ".")]) for k, v in statistics.items())
    to_onnx(qmodel.eval(), tmp_path / "m.onnx")
    x = torch.randn(2, *shape)
    np.testing.assert_array_equal(from_onnx(tmp_path / "m.onnx", input_shape=x.shape).run(x.numpy()), qmodel(x).numpy())
